#!/usr/bin/env bash
# Installs and runs the whole stack locally on CPU (no Docker, no GPU) with the Moonshine model
# from PyPI: the bridge on 127.0.0.1:8000 and the proxy on 127.0.0.1:20300. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[local]"
# Only the Silero VAD model file is needed from this wheel, not its torch dependency.
.venv/bin/python -m pip install -q --no-deps "silero-vad==6.2.3"
PY=.venv/bin/python

mkdir -p data
export MODELS_DIR="${MODELS_DIR:-$PWD/models}"
export DEFAULT_MODEL="${DEFAULT_MODEL:-moonshine-base-en}"
export SHERPA_PROVIDER="${SHERPA_PROVIDER:-cpu}"
export BRIDGE_HOST="${BRIDGE_HOST:-127.0.0.1}" BRIDGE_PORT="${BRIDGE_PORT:-8000}"
export AUTH_HOST="${AUTH_HOST:-127.0.0.1}" AUTH_PORT="${AUTH_PORT:-20300}"
export BRIDGE_URL="http://127.0.0.1:${BRIDGE_PORT}"
export API_KEYS_FILE="${API_KEYS_FILE:-$PWD/data/api-keys.json}"
export USAGE_DB="${USAGE_DB:-$PWD/data/usage.db}" USAGE_JSON="${USAGE_JSON:-$PWD/data/usage.json}"

"$PY" -m bridge models prepare "$DEFAULT_MODEL"

# A key to try, created once; kept (mode 600) in data/local-key.txt so it can be shown again.
if [ ! -s data/local-key.txt ]; then
    "$PY" -m auth_proxy keys revoke local >/dev/null 2>&1 || true
    (umask 077 && "$PY" -m auth_proxy keys add local --admin > data/local-key.txt)
fi
KEY="$(cat data/local-key.txt)"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait; }
trap cleanup EXIT INT TERM

"$PY" -m bridge &
pids+=($!)
"$PY" -m auth_proxy &
pids+=($!)

for _ in $(seq 1 240); do
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a service failed to start; see the log above" >&2; exit 1; }
    done
    if "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:${AUTH_PORT}/health').status_code != 200)" 2>/dev/null; then
        break
    fi
    sleep 0.5
done

cat <<MSG

  Ready: http://127.0.0.1:${AUTH_PORT}   (model ${DEFAULT_MODEL}, CPU)
  API key: ${KEY}

  curl http://127.0.0.1:${AUTH_PORT}/v1/audio/transcriptions \\
       -H "Authorization: Bearer ${KEY}" -F file=@your-recording.mp3

  Metrics: http://127.0.0.1:${BRIDGE_METRICS_PORT:-8001}/metrics (bridge), http://127.0.0.1:${AUTH_METRICS_PORT:-20301}/metrics (proxy)
  Ctrl-C stops both services.
MSG
wait -n

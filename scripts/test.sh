#!/usr/bin/env bash
# Installs everything the tests need (Debian packages when root, a venv with the project) and runs
# them. Extra arguments go to pytest, e.g. `scripts/test.sh -k switch` or `scripts/test.sh --run-slow`.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for tool in ffmpeg sox text2wave shellcheck pg_ctlcluster prometheus chromium redis-server; do
    command -v "$tool" >/dev/null 2>&1 || need_apt=1
done
[ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || need_apt=1
if [ "$need_apt" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            ffmpeg sox festival festvox-us-slt-hts shellcheck postgresql prometheus chromium redis-server >/dev/null
    else
        echo "missing system packages; run as root or: sudo apt-get install ffmpeg sox festival festvox-us-slt-hts shellcheck postgresql prometheus chromium redis-server" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[local,test,postgres]"
# Only the Silero VAD model file is needed from this wheel, not its torch dependency.
.venv/bin/python -m pip install -q --no-deps "silero-vad==6.2.3"
.venv/bin/ruff check .
.venv/bin/mypy common bridge adapters auth_proxy bench
# The image runs Ubuntu 22.04's Python 3.10: nothing in the code may need a newer one.
.venv/bin/vermin --target=3.10- --violations --no-tips --eval-annotations -q common bridge adapters auth_proxy bench
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Installs everything the tests need (Debian packages when root, a venv with the project) and runs
# them. Extra arguments go to pytest, e.g. `scripts/test.sh -k switch` or `scripts/test.sh --run-slow`.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for tool in ffmpeg sox text2wave shellcheck pg_ctlcluster prometheus chromium redis-server dockerd mmdebstrap strace; do
    command -v "$tool" >/dev/null 2>&1 || need_apt=1
done
[ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || need_apt=1
if [ "$need_apt" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            ffmpeg sox festival festvox-us-slt-hts shellcheck postgresql prometheus chromium redis-server \
            docker.io mmdebstrap strace >/dev/null
    else
        echo "missing system packages; run as root or: sudo apt-get install ffmpeg sox festival festvox-us-slt-hts" \
            "shellcheck postgresql prometheus chromium redis-server docker.io mmdebstrap strace" >&2
        exit 1
    fi
fi

# Compose v2 for the container tests (tests/test_containers.py), where Docker's own plugin is absent:
# Debian 12 has only the old docker-compose 1.29, so take Debian 13's static binary (2.26.1) with a
# private apt configuration (the machine's own sources are left as they are).
plugins=/usr/local/lib/docker/cli-plugins
if [ "$(id -u)" = 0 ] && ! docker compose version >/dev/null 2>&1; then
    apt_dir="$(mktemp -d)"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$apt_dir/sources.list"
    mkdir -p "$apt_dir/lists/partial"
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- \
              -o "Dir::State::Lists=$apt_dir/lists" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
    apt-get -qq "${apt_opts[@]}" update
    (cd "$apt_dir" && apt-get -qq "${apt_opts[@]}" download docker-compose 2>/dev/null)
    dpkg-deb -x "$apt_dir"/docker-compose_*.deb "$apt_dir/x"
    mkdir -p "$plugins"
    install -m 755 "$apt_dir/x/usr/libexec/docker/cli-plugins/docker-compose" "$plugins/docker-compose"
    rm -rf "$apt_dir"
    docker compose version
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

#!/usr/bin/env bash
# Installs what the test suite needs when it is missing, then starts the
# services it needs. Safe to run again: it only acts on what is missing.
#   tests/setup.sh deps   Debian packages (as root; otherwise says what to install)
#   tests/setup.sh venv   .venv with pytest, hypothesis, setuptools, wheel, awscli, moto[server]
#   tests/setup.sh docker a Docker engine (started when none answers) and the offline
#                         test image (debootstrap + docker import); as root only
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TEST_USER=mngr-test

deps() {
    local missing=()
    command -v tmux >/dev/null || missing+=(tmux)
    command -v git >/dev/null || missing+=(git)
    "$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v ssh >/dev/null || missing+=(openssh-client)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v crontab >/dev/null || missing+=(cron)   # the @reboot start of a cloud host's watcher
    if [ "$(id -u)" -eq 0 ] && ! id "$TEST_USER" >/dev/null 2>&1; then
        # an unprivileged user for the ssh tests: agents run as it on "untrusted" machines
        # password "*": none to log in with, but not locked (sshd refuses locked accounts)
        useradd --system --create-home --shell /bin/sh --password "*" "$TEST_USER"
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

venv() {
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv --system-site-packages .venv
    fi
    local need=()
    for mod in pytest hypothesis setuptools wheel; do
        .venv/bin/python -c "import $mod" 2>/dev/null || need+=("$mod")
    done
    # the AWS tests: the real aws CLI against a local EC2 emulator
    .venv/bin/python -c "import awscli" 2>/dev/null || need+=(awscli)
    .venv/bin/python -c "import moto.server, flask" 2>/dev/null || need+=("moto[server]")
    if [ ${#need[@]} -gt 0 ]; then
        echo "setup: installing ${need[*]} into .venv" >&2
        .venv/bin/python -m pip install --quiet "${need[@]}"
    fi
    # the test plugin, installed for real (editable: it follows its source) so that
    # mngr finds it through its entry points
    if ! .venv/bin/python -c "import mngr_test_recorder" 2>/dev/null; then
        .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation \
            --editable tests/plugins/recorder
    fi
}

docker() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: not root: not installing or starting Docker (docker tests skip)" >&2
        return 0
    fi
    bash tests/docker_setup.sh engine
    bash tests/docker_setup.sh image "${MNGR_TEST_IMAGE:-mngr-test-base:bookworm}"
}

for step in "$@"; do "$step"; done

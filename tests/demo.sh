#!/usr/bin/env bash
# mngr's main job on this machine: create a real agent in tmux, list it, talk
# to it, read its output, stop it, start it again, and destroy it.
set -euo pipefail
cd "$(dirname "$0")/.."
mngr() { echo "\$ mngr $*" >&2; "${PYTHON:-python3}" mngr.py "$@"; }

name="demo-$$"
work=$(mktemp -d)
trap 'python3 mngr.py destroy -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

mngr create "$name" --in-place --source "$work" --no-connect \
    --agent-cmd 'while read -r line; do echo "agent: you said \"$line\""; done'
mngr list --include "name=$name"
mngr message "$name" -m "hello from the demo"
sleep 0.5
mngr logs "$name" -n 5
mngr stop "$name"
mngr list --include "name=$name"
mngr start "$name"
mngr exec "$name" -- 'echo "running as $MNGR_AGENT_NAME in $(pwd)"'
mngr destroy -f "$name"
echo "demo finished: every step above ran against real tmux" >&2

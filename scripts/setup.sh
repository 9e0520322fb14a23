#!/usr/bin/env bash
# Create (or update) the project's virtualenv in .venv with lmcached installed from this clone.
#   scripts/setup.sh           lmcached and its test tools (torch's cached CPU build among them);
#                              used by test.sh
#   scripts/setup.sh daemon    lmcached alone: what the daemon needs, no torch; used by start.sh
# Idempotent: re-running only installs what changed. A test setup also serves the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-test}
case "$mode" in
  test) target=".[test]" ;;
  daemon) target="." ;;
  *) echo "usage: scripts/setup.sh [test|daemon]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lmcached-installed-$mode
fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ] && [ ! scripts/constraints.txt -nt "$1" ]; }
if [ "$mode" = daemon ] && fresh .venv/.lmcached-installed-test; then
  exit 0
fi
if ! fresh "$stamp"; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # The constraints pin torch to the CPU build these machines cache (see the file).
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e "$target"
  touch "$stamp"
fi

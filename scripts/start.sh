#!/usr/bin/env bash
# Quickstart: set up .venv and run the daemon in the foreground on the embedded default
# config (CPU tier, 2 workers, loopback, no Redis needed). Extra arguments go to `lmcached start`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh daemon   # no test tools, no torch: the daemon never imports it
exec .venv/bin/lmcached start --config config/lmcached.yaml "$@"

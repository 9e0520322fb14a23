#!/usr/bin/env bash
# Heartbeat of one worker (runs on every worker): prints a line every INTERVAL seconds and, when
# the setting `heartbeat_dir` is given, touches <heartbeat_dir>/worker-<id>.alive so that an
# external monitor can alert on a stale mtime. On SIGTERM (daemon shutdown or reload) the trap
# removes the file and exits 0 at once, instead of waiting for the current sleep to end.
#
# Settings (plugin_config: {worker_health.sh: {settings: {...}}}), passed as env variables:
#   interval       seconds between heartbeats (default 10)
#   heartbeat_dir  folder for the .alive files (default: none, log only)
set -u

interval="${LMCACHE_PLUGIN_SETTING_INTERVAL:-10}"
dir="${LMCACHE_PLUGIN_SETTING_HEARTBEAT_DIR:-}"
worker="${LMCACHE_PLUGIN_WORKER_ID:-?}"
alive=""
[ -n "$dir" ] && alive="$dir/worker-$worker.alive"

sleeper=""
cleanup() {
    [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
    [ -n "$alive" ] && rm -f "$alive"
    echo "worker $worker health: stopping"
    exit 0
}
trap cleanup TERM INT

echo "worker $worker health: every ${interval}s${alive:+, file $alive}"
beats=0
while true; do
    beats=$((beats + 1))
    [ -n "$alive" ] && touch "$alive"
    echo "worker $worker alive beat=$beats"
    # sleep in the background and wait: bash runs the trap as soon as a signal arrives.
    sleep "$interval" &
    sleeper=$!
    wait "$sleeper"
done

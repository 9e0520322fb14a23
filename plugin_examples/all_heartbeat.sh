#!/usr/bin/env bash
# A heartbeat for every lmcached process (the scheduler and each worker): every INTERVAL seconds
# it logs which process it belongs to, the pid and memory (RSS) of that process, and the host's
# load average, so a log search for "heartbeat" shows each process is alive and how big it is.
#
# Settings (plugin_config: {all_heartbeat.sh: {settings: {interval: 60}}}):
#   interval  seconds between lines (default 60)
set -u

interval="${LMCACHE_PLUGIN_SETTING_INTERVAL:-60}"
role="${LMCACHE_PLUGIN_ROLE:-?}"
worker="${LMCACHE_PLUGIN_WORKER_ID:-?}"
# The plugin's shim is our parent; the lmcached process is the shim's parent.
shim=$PPID
owner=$(awk '/^PPid:/ {print $2}' "/proc/$shim/status" 2>/dev/null)

trap 'exit 0' TERM INT
while true; do
    rss=$(awk '/^VmRSS:/ {print $2 $3}' "/proc/${owner:-0}/status" 2>/dev/null)
    load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
    echo "heartbeat role=$role worker=$worker pid=${owner:-?} rss=${rss:-?} load=${load:-?}"
    sleep "$interval" &
    wait $!
done

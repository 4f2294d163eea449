#!/usr/bin/env bash
# The agent's xDS server under many ADS streams: how long a change of the agent's view takes
# to reach every open stream, and the agent's memory meanwhile.
#
#   ops/bench/xds.sh [SERVICES=1000] [HOSTS=10] [STREAMS=200] [CHANGES=50]
#
# An in-memory registry filled with SERVICES x HOSTS endpoints (`tidings bench
# registry-lookup --fill`), one agent on it (gossip on 127.0.0.1, insecure, no peers), and
# `tidings bench xds`: STREAMS Envoy-like state-of-the-world ADS streams, each on its own
# connection, subscribed to every cluster (wildcard CDS) and every service's endpoints, each
# response acknowledged. Once all hold the whole catalog, CHANGES times one new endpoint is
# registered through the agent's local API and its arrival timed on every stream. The agent
# runs on CPU 0; the registry and the load client on CPU 1. Prints a JSON line with the
# latencies and the agent's RSS (steady, with the streams open) and peak memory (VmHWM).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
services="${1:-1000}"; hosts="${2:-10}"; streams="${3:-200}"; changes="${4:-50}"
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
view_size() {
  curl -fsS "$1/metrics" 2>/dev/null | awk '$1 == "tidings_agent_view_endpoints" {print int($2); f=1} END {if (!f) print 0}'
}

want=$((services * hosts))
api_port="$(free_port)"; gossip_port="$(free_port)"; xds_port="$(free_port)"
api="http://127.0.0.1:$api_port"
sized_registry "$services" "$hosts" "$work/registry.log"

taskset -c 0 "$bin" --log-level warn agent --registry "$reg" --api "127.0.0.1:$api_port" \
  --xds "127.0.0.1:$xds_port" --gossip "127.0.0.1:$gossip_port" --data-dir "$work/agent" \
  --gossip-insecure --keep-registered >"$work/agent.log" 2>&1 &
agent_pid=$!; pids+=("$agent_pid")
wait_http "$api/live"
synced=""
for _ in $(seq 1200); do
  if (( $(view_size "$api") >= want )); then synced=1; break; fi
  sleep 0.1
done
[[ -n "$synced" ]] || { echo "agent did not sync $want endpoints within 120 s" >&2; exit 1; }
rss_before=$(rss_kb "$agent_pid")

# The agent's RSS is sampled every 200 ms while the load client runs.
taskset -c 1 "$bin" bench xds --xds "127.0.0.1:$xds_port" --api "$api" --services "$services" \
  --streams "$streams" --changes "$changes" >"$work/xds.json" &
client=$!; pids+=("$client")
rss_max=0
while kill -0 "$client" 2>/dev/null; do
  r=$(rss_kb "$agent_pid"); (( r > rss_max )) && rss_max=$r
  sleep 0.2
done
wait "$client" || { echo "tidings bench xds failed" >&2; exit 1; }
rss_after=$(rss_kb "$agent_pid"); hwm_kb=$(hwm "$agent_pid")
python3 - "$work/xds.json" "$rss_before" "$rss_max" "$rss_after" "$hwm_kb" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mib = lambda kb: round(int(kb) / 1024, 1)
r.update({"agent_rss_before_mib": mib(sys.argv[2]), "agent_rss_max_mib": mib(sys.argv[3]),
          "agent_rss_after_mib": mib(sys.argv[4]), "agent_hwm_mib": mib(sys.argv[5]),
          "loadavg": sys.argv[6]})
print(json.dumps(r))
PY

#!/usr/bin/env bash
# The agent's footprint at a given catalog size: peak memory once it holds the whole catalog
# and after a steady spell, its disk cache file, its start-up time from that cache with the
# registry down and the CPU it spends serving from it (nothing asking), its lookup rate
# under wrk (closed loop: the tail at saturation), and its latency at a fixed rate (h2load).
#
#   ops/bench/agent.sh [SERVICESxHOSTS ...]      (default: 100x100 1000x100)
#
# Per size: an in-memory registry filled with SERVICES x HOSTS endpoints (`tidings bench
# registry-lookup --fill`), one agent on it (gossip on 127.0.0.1, insecure, no peers). The
# agent runs on CPU 0, the registry, the fill, wrk and h2load on CPU 1. STEADY_SECS (20) and
# WRK_SECS (10) set the timed phases, FIXED_RATE (30000) the fixed lookup rate. Exits non-zero when a step fails or misses its deadline.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
sizes=("$@")
[[ $# -gt 0 ]] || sizes=(100x100 1000x100)
steady="${STEADY_SECS:-20}"
wrk_secs="${WRK_SECS:-10}"
fixed_rate="${FIXED_RATE:-30000}"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

# rss_kb PID: current resident memory of a process, in kB (`hwm` gives the peak).
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# view_size API: the agent's tidings_agent_view_endpoints gauge (0 before it answers).
view_size() {
  curl -fsS "$1/metrics" 2>/dev/null | awk '$1 == "tidings_agent_view_endpoints" {print int($2); f=1} END {if (!f) print 0}'
}

# stop PID: SIGTERM, then SIGKILL after 10 s.
stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}

# first_complete URL HOSTS SECS: polls a v1 listing every ms until it lists HOSTS hosts and
# prints the wall-clock ns of that answer; fails after SECS.
first_complete() {
  python3 - "$@" <<'PY'
import json, sys, time, urllib.request
url, want, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + secs
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if len(json.load(r)["hosts"]) >= want:
                print(time.time_ns())
                sys.exit(0)
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.001)
sys.exit(1)
PY
}

cat >"$work/rotate.lua" <<'LUA'
-- Each request asks for the next service of the catalog in turn.
local n, i = 1, 0
function init(args) n = tonumber(args[1]) end
function request()
  i = (i + 1) % n
  return wrk.format("GET", string.format("/v1/registration/svc-%03d", i))
end
LUA

results="$work/results.tsv"
for size in "${sizes[@]}"; do
  services="${size%x*}"; hosts="${size#*x}"
  want=$((services * hosts))
  echo "== $services services x $hosts hosts = $want endpoints" >&2

  api_port="$(free_port)"; gossip_port="$(free_port)"
  api="http://127.0.0.1:$api_port"
  data="$work/agent-$size"
  sized_registry "$services" "$hosts" "$work/registry-$size.log"

  agent=(taskset -c 0 "$bin" --log-level warn agent --registry "$reg" --api "127.0.0.1:$api_port"
    --gossip "127.0.0.1:$gossip_port" --data-dir "$data" --gossip-insecure --keep-registered)
  t0=$(date +%s%N)
  "${agent[@]}" >"$work/agent-$size.log" 2>&1 &
  agent_pid=$!; pids+=("$agent_pid")
  wait_http "$api/live"
  synced=""
  for _ in $(seq 1200); do
    if (( $(view_size "$api") >= want )); then synced=$(( ($(date +%s%N) - t0) / 1000000 )); break; fi
    sleep 0.1
  done
  [[ -n "$synced" ]] || { echo "agent did not sync $want endpoints within 120 s" >&2; exit 1; }
  hwm_synced=$(hwm "$agent_pid")
  sleep "$steady"
  hwm_steady=$(hwm "$agent_pid"); rss_steady=$(rss_kb "$agent_pid")
  cache="$data/view.cache"
  [[ -s "$cache" ]] || { echo "no disk cache at $cache" >&2; exit 1; }
  cache_bytes=$(stat -c %s "$cache")

  taskset -c 1 wrk -t1 -c8 -d"${wrk_secs}s" --latency -s "$work/rotate.lua" "$api" -- "$services" >"$work/wrk-$size.txt"
  # wrk runs closed-loop, so its p99 is the tail at the agent's saturation; the same 8
  # connections at a fixed 30 000 lookups/s (the issue's rate) give the tail a client sees
  # at that load.
  for ((i = 0; i < services; i++)); do printf '%s/v1/registration/svc-%03d\n' "$api" "$i"; done >"$work/uris-$size"
  taskset -c 1 h2load --h1 -c8 -t1 --rps="$((fixed_rate / 8))" -D "$wrk_secs" --warm-up-time=1 \
    --log-file="$work/fixed-$size.log" -i "$work/uris-$size" >"$work/fixed-$size.txt"
  hwm_wrk=$(hwm "$agent_pid")

  # Start from the cache with the registry down: the same ports, a dead registry.
  stop "$agent_pid"
  kill -KILL "$reg_pid"; wait "$reg_pid" 2>/dev/null || true
  last="$api/v1/registration/svc-$(printf %03d $((services - 1)))"
  first_complete "$last" "$hosts" 30 >"$work/first-$size" &
  poller=$!; pids+=("$poller")
  sleep 0.5 # the poller is polling before the agent starts
  t0=$(date +%s%N)
  "${agent[@]}" >>"$work/agent-$size.log" 2>&1 &
  agent_pid=$!; pids+=("$agent_pid")
  wait "$poller" || { echo "the agent restarted from its cache did not list $hosts hosts of $last within 30 s" >&2; exit 1; }
  from_cache=$(( ($(cat "$work/first-$size") - t0) / 1000000 ))
  # CPU while it serves from the cache with the registry down, nothing asking: seconds 1-5.
  sleep 1
  c0=$(ticks "$agent_pid"); sleep 4; c1=$(ticks "$agent_pid")
  outage_cpu=$(( (c1 - c0) * 1000 / $(getconf CLK_TCK) / 4 ))
  (( $(view_size "$api") >= want )) || { echo "the agent restarted from its cache serves fewer than $want endpoints" >&2; exit 1; }
  hwm_cached=$(hwm "$agent_pid")
  stop "$agent_pid"

  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$want" "$synced" "$hwm_synced" "$hwm_steady" \
    "$rss_steady" "$cache_bytes" "$from_cache" "$hwm_cached" "$outage_cpu" "$hwm_wrk" "$work/wrk-$size.txt" "$work/fixed-$size.log" >>"$results"
done

python3 - "$results" "$steady" "$wrk_secs" "$fixed_rate" <<'PY'
import re, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
mib = lambda kb: int(kb) / 1024
def wrk(path):
    text = open(path).read()
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    pct = {p: float(v) * unit[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)}
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return rate, pct["50"], pct["99"], (int(bad.group(1)) if bad else 0), errors.group(1) if errors else ""
def fixed(path):
    # h2load's log: start (us since the epoch), status, latency (us); one line per request.
    lines = [l.split() for l in open(path) if l.strip()]
    lat = sorted(int(l[2]) for l in lines)
    bad = sum(1 for l in lines if l[1] != "200")
    n = len(lat)
    return lat[n // 2] / 1000, lat[min(n - 1, n * 99 // 100)] / 1000, bad
print(f"agent footprint: one agent, in-memory registry on loopback; steady {sys.argv[2]} s; "
      f"wrk -t1 -c8 -d{sys.argv[3]}s rotating over services; MiB = 2^20 bytes")
head = ("endpoints", "sync s", "HWM synced", "HWM steady", "RSS steady", "cache file",
        "start from cache", "HWM cached", "CPU registry down", "lookups/s", "p50", "p99",
        f"p50 · p99 at {int(sys.argv[4]):,}/s", "HWM after wrk")
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
failed = False
for n, synced, hs, hst, rs, cache, fc, hc, cpu, hw, wpath, fpath in rows:
    rate, p50, p99, bad, errors = wrk(wpath)
    f50, f99, fbad = fixed(fpath)
    bad += fbad
    failed |= bad > 0 or bool(errors)
    print(f"| {int(n):,} | {int(synced)/1000:.2f} | {mib(hs):.1f} MiB | {mib(hst):.1f} MiB | {mib(rs):.1f} MiB "
          f"| {int(cache)/2**20:.2f} MiB | {fc} ms | {mib(hc):.1f} MiB | {cpu} ms/s | {rate:,.0f} | {p50:.2f} ms | {p99:.2f} ms "
          f"| {f50:.2f} · {f99:.2f} ms | {mib(hw):.1f} MiB |")
    if bad or errors:
        print(f"  wrk and h2load: {bad} non-2xx answers; wrk socket errors: {errors or 'none'}")
sys.exit(1 if failed else 0)
PY

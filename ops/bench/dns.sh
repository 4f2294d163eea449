#!/usr/bin/env bash
# The agent's DNS against dnsmasq serving the same records, side by side in one run: peak
# queries per second on one core, and p99 latency at a fixed rate below both peaks.
#
#   ops/bench/dns.sh [SERVICES [HOSTS]]      (default: 1000 10)
#
# An in-memory registry filled with SERVICES x HOSTS endpoints (`tidings bench registry-lookup
# --fill`), one agent on it; once the agent holds them all, its catalog is written out as a
# hosts file for dnsmasq (one `IP svc-NNN.service.tidings` line per host: the same A records).
# Each server in turn runs alone on CPU 0; dnsperf (Debian) runs on CPU 1, cycling through A
# queries for every service. SECS (10) is each peak run, RATE (20000 q/s) and RATE_SECS (5)
# the fixed-rate runs whose per-query latencies (dnsperf -v) give the p99.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
services="${1:-1000}"
hosts="${2:-10}"
secs="${SECS:-10}"
rate="${RATE:-20000}"
rate_secs="${RATE_SECS:-5}"

missing=()
command -v dnsperf >/dev/null || missing+=(dnsperf)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
command -v dig >/dev/null || missing+=(bind9-dnsutils)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

want=$((services * hosts))
api_port="$(free_port)"; gossip_port="$(free_port)"
dns_port="$(free_port)"; peer_port="$(free_port)"
api="http://127.0.0.1:$api_port"
sized_registry "$services" "$hosts" "$work/registry.log"

taskset -c 0 "$bin" --log-level warn agent --registry "$reg" --api "127.0.0.1:$api_port" \
  --gossip "127.0.0.1:$gossip_port" --data-dir "$work/agent" --gossip-insecure --keep-registered \
  --dns "127.0.0.1:$dns_port" >"$work/agent.log" 2>&1 &
agent_pid=$!; pids+=("$agent_pid")
wait_http "$api/live"
held=0
for _ in $(seq 1200); do
  held=$(curl -fsS "$api/metrics" 2>/dev/null | awk '$1 == "tidings_agent_view_endpoints" {print int($2)}')
  (( ${held:-0} >= want )) && break
  sleep 0.1
done
(( ${held:-0} >= want )) || { echo "agent did not sync $want endpoints within 120 s" >&2; exit 1; }

# The same A records for dnsmasq, and the query list: every service once, in order.
curl -fsS "$api/v2/catalog" | python3 -c '
import json, sys
cat = json.load(sys.stdin)
with open(sys.argv[1], "w") as hosts, open(sys.argv[2], "w") as queries:
    for svc, hs in sorted(cat["services"].items()):
        if not svc.startswith("svc-"):
            continue
        name = f"{svc}.service.tidings"
        for ip in sorted({h["ip_address"] for h in hs}):
            hosts.write(f"{ip} {name}\n")
        queries.write(f"{name} A\n")
' "$work/hosts" "$work/queries"
taskset -c 0 dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
  --addn-hosts="$work/hosts" --listen-address=127.0.0.1 --bind-interfaces --port="$peer_port" \
  --cache-size=10000 --user=root --pid-file="$work/dnsmasq.pid" --log-facility="$work/dnsmasq.log" &
peer_pid=$!; pids+=("$peer_pid")

# Both must give the same addresses for a sample of names before anything is measured.
for i in 0 $((services / 2)) $((services - 1)); do
  name="$(printf 'svc-%03d.service.tidings' "$i")"
  ours=""; theirs=""
  for _ in $(seq 50); do
    ours="$(dig @127.0.0.1 -p "$dns_port" +short "$name" A | sort)"
    theirs="$(dig @127.0.0.1 -p "$peer_port" +short "$name" A | sort)"
    [[ -n "$ours" && "$ours" == "$theirs" ]] && break
    sleep 0.1
  done
  [[ -n "$ours" && "$ours" == "$theirs" ]] || { echo "answers differ for $name: [$ours] vs [$theirs]" >&2; exit 1; }
  (( $(wc -l <<<"$ours") == hosts )) || { echo "$name: $(wc -l <<<"$ours") addresses, want $hosts" >&2; exit 1; }
done

# peak PORT: dnsperf at up to 100 queries outstanding for SECS; prints "qps lost".
peak() {
  taskset -c 1 dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$secs" -c 1 -q 100 >"$work/peak-$1.txt" 2>&1
  awk '/Queries per second:/ {q=$4} /Queries lost:/ {l=$3} END {print q, l}' "$work/peak-$1.txt"
}
# p99 PORT: dnsperf at RATE q/s for RATE_SECS, every answer's latency; prints "p50 p99 lost" in ms.
p99() {
  taskset -c 1 dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$rate_secs" -c 1 -Q "$rate" -v >"$work/rate-$1.txt" 2>&1
  python3 - "$work/rate-$1.txt" <<'PY'
import sys
lat = []
lost = 0
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) >= 5 and parts[0] == ">":
        try:
            lat.append(float(parts[-1]) * 1000)
        except ValueError:
            pass
    elif line.strip().startswith("Queries lost:"):
        lost = int(line.split()[2])
lat.sort()
at = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] if lat else float("nan")
print(f"{at(0.50):.3f} {at(0.99):.3f} {lost}")
PY
}

load="$(cut -d' ' -f1-3 /proc/loadavg)"
read -r t_qps t_lost <<<"$(peak "$dns_port")"
read -r p_qps p_lost <<<"$(peak "$peer_port")"
read -r t_p50 t_p99 t_rlost <<<"$(p99 "$dns_port")"
read -r p_p50 p_p99 p_rlost <<<"$(p99 "$peer_port")"
dnsmasq_version="$(dnsmasq --version | head -1 | awk '{print $3}')"
echo "load average before: $load; after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| server | peak q/s (lost) | p50 at $rate q/s | p99 at $rate q/s (lost) |"
echo "|---|---|---|---|"
echo "| tidings agent | $t_qps ($t_lost) | $t_p50 ms | $t_p99 ms ($t_rlost) |"
echo "| dnsmasq $dnsmasq_version | $p_qps ($p_lost) | $p_p50 ms | $p_p99 ms ($p_rlost) |"
python3 -c "import sys; t, p = float(sys.argv[1]), float(sys.argv[2]); print(f'ratio: {t / p:.2f}x the peak rate of dnsmasq')" "$t_qps" "$p_qps"

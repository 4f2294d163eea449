#!/usr/bin/env bash
# Registry throughput, side by side with etcd, in one run on this machine.
#
#   ops/bench/registry.sh [seconds-per-phase]     (default 10)
#
# Tidings' in-memory registry and etcd (Debian's etcd-server) each get CPU 0; the one load
# generator (`tidings bench`, the same HTTP client for both) gets CPU 1. Both are filled with
# 100 services x 100 hosts, then measured for check-ins (our v1 form POST vs etcd's JSON-gateway
# put of the same endpoint record) and lookups (one service's 100 hosts: our v1 GET vs etcd's
# prefix range). Everything stays on 127.0.0.1 and every phase is bounded in time and count.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
secs="${1:-10}"
conc="${CONCURRENCY:-64}"

if ! command -v etcd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

reg_port="$(free_port)"; etcd_port="$(free_port)"; etcd_peer="$(free_port)"
taskset -c 0 "$bin" --log-level warn registry --listen "127.0.0.1:$reg_port" >"$work/registry.log" 2>&1 &
pids+=($!)
taskset -c 0 etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" --initial-cluster "default=http://127.0.0.1:$etcd_peer" \
  --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$reg_port/healthcheck"
wait_http "http://127.0.0.1:$etcd_port/health"

reg="http://127.0.0.1:$reg_port"; etcd_url="http://127.0.0.1:$etcd_port"
load() { taskset -c 1 "$bin" --log-level error bench "$@" --concurrency "$conc" --duration "${secs}s"; }
taskset -c 1 "$bin" bench registry-lookup --url "$reg" --fill >/dev/null
taskset -c 1 "$bin" bench etcd-get --url "$etcd_url" --fill >/dev/null

ours_w="$(load registry-checkin --url "$reg")"
etcd_w="$(load etcd-put --url "$etcd_url")"
ours_r="$(load registry-lookup --url "$reg")"
etcd_r="$(load etcd-get --url "$etcd_url")"

python3 - "$ours_w" "$etcd_w" "$ours_r" "$etcd_r" "$secs" "$conc" <<'PY'
import json, sys
ow, ew, orr, er = (json.loads(a) for a in sys.argv[1:5])
print(f"registry benchmark: 100 services x 100 hosts, {sys.argv[5]} s per phase, {sys.argv[6]} connections; server on CPU 0, client on CPU 1")
print(f"{'':22}{'tidings':>14}{'etcd':>14}{'ratio':>9}")
for name, a, b in (("check-ins (writes)/s", ow, ew), ("lookups (reads)/s", orr, er)):
    print(f"{name:22}{a['per_sec']:>14,.0f}{b['per_sec']:>14,.0f}{a['per_sec']/max(b['per_sec'],1):>8.1f}x")
    print(f"{'  p50 / p99 (ms)':22}{a['p50_us']/1000:>7.2f} /{a['p99_us']/1000:>5.2f}{b['p50_us']/1000:>7.2f} /{b['p99_us']/1000:>5.2f}")
    print(f"{'  errors':22}{a['errors']:>14}{b['errors']:>14}")
PY

#!/usr/bin/env bash
# A fleet of agent-like sync clients (`tidings bench fleet`, default 1 000, one connection
# each, in one process) against one memory registry holding 1 000 services x 100 hosts
# (100 000 endpoints, each on its own ip), under a churn of 10 endpoint changes per second for
# 60 s (new revisions, new endpoints, deregistrations in turn). Prints the bytes the clients
# read per change, the registry's CPU per change and as a share of one core (utime + stime
# from /proc, over the churn window), and how long a change takes to reach every client.
# Loopback only; every phase is bounded (fill, first sync <= 180 s, churn, drain <= 20 s).
#
#   ops/bench/fleet.sh                      # delta protocol, as agents sync now
#   ops/bench/fleet.sh --protocol full      # whole catalogs, as agents synced before deltas
#   ops/bench/fleet.sh --clients 100 --churn 20s --accept-encoding gzip
#   (TIDINGS_BIN=... to use a built binary; any flag of `tidings bench fleet` passes through)
#
# FLEET_URLS="http://127.0.0.1:P1 http://127.0.0.1:P2" FLEET_PIDS="PID1 PID2" runs against
# registries already started (sharing one store): clients are spread over them, fill and
# churn go through the first. Pass --no-fill when they are filled already.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

# A thousand client sockets here and as many in the registry.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# As the other benchmarks: the registry on CPU 0, the load (here the whole fleet) on CPU 1,
# so the registry's share of one core is its own. PIN=0 lets both float over both cores.
on_cpu0=(); on_cpu1=()
if [[ "${PIN:-1}" == 1 ]] && command -v taskset >/dev/null; then
  on_cpu0=(taskset -c 0); on_cpu1=(taskset -c 1)
fi

urls=()
pid_flags=()
if [[ -n "${FLEET_URLS:-}" ]]; then
  for u in $FLEET_URLS; do urls+=(--url "$u"); done
  for p in ${FLEET_PIDS:-}; do pid_flags+=(--registry-pid "$p"); done
else
  # ttl 1 h: the fill is not renewed during the run, and must not expire or trip
  # self-preservation; check_in_interval 5 s: the empty registry's warm-up lasts one interval,
  # and agents take no delta base from a warming registry. The connection and blocking-waiter
  # limits (4 096 and 8 192 by default) already exceed the fleet.
  cat >"$work/registry.toml" <<'TOML'
[registry]
ttl = "1h"
check_in_interval = "5s"
self_preservation = false
TOML
  port="$(free_port)"
  "${on_cpu0[@]}" "$bin" --log-level warn registry --config "$work/registry.toml" --listen "127.0.0.1:$port" \
    >"$work/registry.log" 2>&1 &
  regpid=$!
  pids+=("$regpid")
  reg="http://127.0.0.1:$port"
  wait_http "$reg/live"
  urls+=(--url "$reg")
  pid_flags+=(--registry-pid "$regpid")
fi

"${on_cpu1[@]}" "$bin" --log-level warn bench fleet "${urls[@]}" "${pid_flags[@]}" "$@"
if [[ -n "${regpid:-}" ]]; then
  echo "registry peak RSS: $(hwm "$regpid") kB"
  if grep -qiE 'warn|error' "$work/registry.log"; then
    echo "registry log (warnings):"; grep -iE 'warn|error' "$work/registry.log" | tail -n 5
  fi
fi

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
# STORE=dynamodb ops/bench/fleet.sh starts a local moto_server (the pinned one, from the repo's
# .venv, installed if missing) and two registry replicas on one DynamoDB table, each following
# the table's stream; clients are spread over both, fill and churn go through the first, so
# every change the second replica's clients see travelled through the stream. moto is a Python
# emulator: its CPU is printed beside the registries'.
#
# FLEET_URLS="http://127.0.0.1:P1 http://127.0.0.1:P2" FLEET_PIDS="PID1 PID2" runs against
# registries already started (sharing one store): clients are spread over them, fill and
# churn go through the first. Pass --no-fill when they are filled already.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
if [[ "${STORE:-memory}" == dynamodb && ! -x .venv/bin/moto_server ]]; then
  python3 -m venv .venv && .venv/bin/pip install --quiet -r ops/moto-requirements.txt
fi
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
if [[ "${STORE:-memory}" == dynamodb ]]; then
  # moto and both replicas on CPU 0 (the server side: "registries and their database"), the
  # fleet on CPU 1. The sweeper's full-table Scan is moved out of the window (moto takes
  # longer than the store's call deadline to Scan 100 000 rows on one core); each replica
  # still scans once at start, on the empty table. The fill goes in by v2 check-ins through
  # replica a (one conditional UpdateItem per endpoint) and reaches b by the stream.
  moto_port="$(free_port)"
  moto="http://127.0.0.1:$moto_port"
  "${on_cpu0[@]}" .venv/bin/moto_server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
  moto_pid=$!
  pids+=("$moto_pid")
  wait_http "$moto/moto-api/data.json" 60
  dyn=(--dynamodb-table tidings-fleet --dynamodb-endpoint "$moto" --region us-east-1)
  timeout 150 "$bin" --log-level warn registry init-table "${dyn[@]}" >/dev/null
  cat >"$work/registry.toml" <<'TOML'
[registry]
ttl = "1h"
check_in_interval = "5s"
self_preservation = false
sweep_interval = "1h"
TOML
  reg_pids=()
  for r in a b; do
    port="$(free_port)"
    "${on_cpu0[@]}" "$bin" --log-level warn registry --config "$work/registry.toml" --store dynamodb \
      "${dyn[@]}" --listen "127.0.0.1:$port" >"$work/registry-$r.log" 2>&1 &
    reg_pids+=($!)
    pids+=($!)
    wait_http "http://127.0.0.1:$port/live" 60
    urls+=(--url "http://127.0.0.1:$port")
    pid_flags+=(--registry-pid "$!")
  done
  moto_t0="$(ticks "$moto_pid")"
elif [[ -n "${FLEET_URLS:-}" ]]; then
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
if [[ -n "${moto_pid:-}" ]]; then
  echo "moto CPU over the whole run (fill included): $(( ($(ticks "$moto_pid") - moto_t0) / $(getconf CLK_TCK) )) s"
  for i in 0 1; do
    echo "replica $i peak RSS: $(hwm "${reg_pids[$i]}") kB"
  done
  for r in a b; do
    if grep -iE 'warn|error' "$work/registry-$r.log" | grep -qv 'no write secret'; then
      echo "replica $r log (warnings):"; grep -iE 'warn|error' "$work/registry-$r.log" | grep -v 'no write secret' | tail -n 5
    fi
  done
fi
if [[ -n "${regpid:-}" ]]; then
  echo "registry peak RSS: $(hwm "$regpid") kB"
  if grep -qiE 'warn|error' "$work/registry.log"; then
    echo "registry log (warnings):"; grep -iE 'warn|error' "$work/registry.log" | tail -n 5
  fi
fi

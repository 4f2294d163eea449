#!/usr/bin/env bash
# The registry on its DynamoDB store, against a local moto_server, beside the in-memory
# registry, in one run on this machine.
#
#   ops/bench/dynamodb.sh [seconds-per-phase]     (default 10)
#
# Three registries are measured one after the other, each filled with 20 services x 20 hosts
# and then loaded with check-ins (v1 form POST) and lookups (one service's hosts, v1 GET):
#   memory     --store memory
#   dynamo     --store dynamodb, default read cache (read_cache_ttl = 1s)
#   no-cache   --store dynamodb with read_cache_ttl = "0s": every lookup queries DynamoDB,
#              except that concurrent lookups of one service share a single in-flight Query
#
# CPUs: the registry under test and moto share CPU 0 -- the server side is "a registry and
# its database", so a store that costs more CPU shows up as fewer requests per second. The
# load generator (`tidings bench`, one HTTP client for all three) has CPU 1 to itself. The
# registry's and moto's CPU time are read from /proc around every phase, so the table also
# shows per request how much of the server side is ours and how much is the emulator's.
#
# moto is an emulator written in Python: these figures are our overhead against it, not what
# AWS DynamoDB would do. Everything stays on 127.0.0.1; every phase is bounded in time
# (--duration, plus `timeout`) and in count (--max-requests, the fill's services x hosts).
#
# TIDINGS_BIN=target/debug/tidings skips the release build (to check the script, not to
# measure); SERVICES / HOSTS / CONCURRENCY override the load shape.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
secs="${1:-10}"
# Smaller than registry.sh's 100 x 100 at 64 connections, because moto cannot take that: at
# 10,000 rows one 100-host Query cost moto ~1.6 s of CPU, so lookups overran the store's 2 s
# call deadline and answered 503, and the backlog moto kept working through failed the next
# phase too. At 20 x 20 and 8 connections every phase completes.
conc="${CONCURRENCY:-8}"
services="${SERVICES:-20}"
hosts="${HOSTS:-20}"

if [ ! -x .venv/bin/moto_server ]; then
  python3 -m venv .venv && .venv/bin/pip install --quiet -r ops/moto-requirements.txt
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

moto_port="$(free_port)"
moto="http://127.0.0.1:$moto_port"
taskset -c 0 .venv/bin/moto_server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
pids+=("$moto_pid")
wait_http "$moto/moto-api/data.json" 60
dyn=(--dynamodb-table tidings-bench --dynamodb-endpoint "$moto" --region us-east-1)
timeout 150 "$bin" --log-level warn registry init-table "${dyn[@]}" >/dev/null
# The sweeper's full-table Scan (every 5 s by default) is left out of the measurement: moto
# takes longer than the store's 2 s call deadline to Scan a few thousand rows on one core,
# and while it does, it answers nothing else. Same setting for all three, for a fair ratio;
# the sweeper still runs once, at start.
printf '[registry]\nsweep_interval = "1h"\n' >"$work/cache.toml"
printf '[registry]\nsweep_interval = "1h"\nread_cache_ttl = "0s"\n' >"$work/no-cache.toml"

shape=(--services "$services" --hosts "$hosts")
results="$work/results.jsonl"

# measure NAME PID URL KIND: one load phase, with the registry's and moto's CPU time.
measure() {
  local r0 m0 out
  r0="$(ticks "$2")"; m0="$(ticks "$moto_pid")"
  # `bench` exits 1 when nothing succeeded; that is a result to print, not a reason to stop.
  out="$(timeout $((secs + 60)) taskset -c 1 "$bin" --log-level error bench "$4" --url "$3" \
    "${shape[@]}" --concurrency "$conc" --duration "${secs}s")" || true
  [ -n "$out" ] || out='{"ok":0,"errors":0,"seconds":0,"per_sec":0,"p50_us":0,"p99_us":0,"bytes":0}'
  printf '{"name":"%s","kind":"%s","load":%s,"reg_ticks":%s,"moto_ticks":%s}\n' "$1" "$4" "$out" \
    "$(($(ticks "$2") - r0))" "$(($(ticks "$moto_pid") - m0))" >>"$results"
}

declare -A pid url
# start NAME [registry flags...]: a registry on CPU 0.
start() {
  local name="$1" port
  shift
  port="$(free_port)"
  taskset -c 0 "$bin" --log-level warn registry --listen "127.0.0.1:$port" "$@" >"$work/$name.log" 2>&1 &
  pid[$name]=$!
  pids+=("$!")
  url[$name]="http://127.0.0.1:$port"
  wait_http "${url[$name]}/healthcheck" 30
}

# run NAME fill|nofill: fill the registry (sequential and counted: services x hosts
# check-ins) unless its table already holds every row, then measure writes and reads.
run() {
  if [ "$2" = fill ]; then
    timeout 600 taskset -c 1 "$bin" --log-level error bench registry-checkin --url "${url[$1]}" --fill "${shape[@]}" >/dev/null
  fi
  measure "$1" "${pid[$1]}" "${url[$1]}" registry-checkin
  measure "$1" "${pid[$1]}" "${url[$1]}" registry-lookup
}

start memory --config "$work/cache.toml" --store memory
run memory fill
kill -KILL "${pid[memory]}" # a benchmark needs no graceful drain
wait "${pid[memory]}" 2>/dev/null || true
# Both DynamoDB registries start on the empty table, so their first sweep (at start) is
# instant; then they take turns, the idle one costing nothing.
start dynamo --config "$work/cache.toml" --store dynamodb "${dyn[@]}"
start no-cache --config "$work/no-cache.toml" --store dynamodb "${dyn[@]}"
run dynamo fill
run no-cache nofill

python3 - "$results" "$secs" "$conc" "$services" "$hosts" "$(getconf CLK_TCK)" <<'PY'
import json, sys
path, secs, conc, services, hosts, hz = sys.argv[1:7]
runs = {(r["name"], r["kind"]): r for r in map(json.loads, open(path))}
names = ("memory", "dynamo", "no-cache")
print(f"DynamoDB store vs in-memory: {services} services x {hosts} hosts, {secs} s per phase, "
      f"{conc} connections; registry + moto on CPU 0, load generator on CPU 1")
print(f"{'':26}{'memory':>14}{'dynamo':>14}{'no-cache':>14}")

def row(label, fmt, value):
    print(f"{label:26}" + "".join(fmt(value(runs[(n, kind)])) for n in names))

for title, kind in (("check-ins (writes)/s", "registry-checkin"), ("lookups (reads)/s", "registry-lookup")):
    row(title, lambda v: f"{v:>14,.0f}", lambda r: r["load"]["per_sec"])
    base = runs[("memory", kind)]["load"]["per_sec"]
    row("  memory / this", lambda v: f"{v:>13.1f}x", lambda r: base / max(r["load"]["per_sec"], 1))
    row("  p50 / p99 (ms)", lambda v: f"{v[0]:>8.2f} /{v[1]:>4.0f}",
        lambda r: (r["load"]["p50_us"] / 1000, r["load"]["p99_us"] / 1000))
    row("  errors", lambda v: f"{v:>14}", lambda r: r["load"]["errors"])
    per_req = lambda r, key: r[key] / int(hz) * 1e6 / max(r["load"]["ok"], 1)
    row("  registry CPU us/request", lambda v: f"{v:>14.0f}", lambda r: per_req(r, "reg_ticks"))
    row("  moto CPU us/request", lambda v: f"{v:>14.0f}", lambda r: per_req(r, "moto_ticks"))
PY

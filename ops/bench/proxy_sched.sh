#!/usr/bin/env bash
# Where an unpinned proxy's time goes (issue #18): for ours and HAProxy, each with THREADS
# threads (default 1), pinned (PIN=1: proxy on CPU 0, the rest on CPU 1) or not (default),
# one peak phase of wrk (CONNECTIONS, default 64) each, with per request: CPU time (user,
# system), context switches (voluntary: the thread blocked, in epoll_wait; involuntary: it was
# preempted), CPU migrations and system calls, from /proc and `perf stat` on the process.
#
#   ops/bench/proxy_sched.sh [seconds]       (default 5; TIDINGS_BIN as in proxy.sh)
#
# Same backend, registry and configs as ops/bench/proxy.sh mode a/b/c; loopback only; every
# phase bounded by `timeout`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
secs="${1:-5}"
conns="${CONNECTIONS:-64}"
threads="${THREADS:-1}"
pin="${PIN:-0}"
command -v perf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"
trap 'stop_ok_backend; cleanup' EXIT
on0=(); on1=()
if ((pin)); then on0=(taskset -c 0); on1=(taskset -c 1); fi

ok_backend "${on1[@]}"
ours_port="$(free_port)"; admin_port="$(free_port)"; hap_port="$(free_port)"
"${on0[@]}" "$bin" --log-level warn proxy --listen "127.0.0.1:$ours_port" --admin "127.0.0.1:$admin_port" \
  --agent "http://127.0.0.1:$reg_port" --route web=/ --worker-threads "$threads" >"$work/proxy.log" 2>&1 &
ours_pid=$!
pids+=($ours_pid)
ok_backend_haproxy "$threads" "127.0.0.1:$hap_port"
"${on0[@]}" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
hap_pid=$!
pids+=($hap_pid)
wait_http "http://127.0.0.1:$ours_port/" 20
wait_http "http://127.0.0.1:$hap_port/"

switches() { # voluntary and involuntary context switches of every thread of PID
  cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v, n}'
}
measure() { # name port pid
  timeout 30 "${on1[@]}" wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$2/" >/dev/null
  local before after stat0 stat1
  before="$(switches "$3")"; stat0="$(awk '{print $14, $15}' "/proc/$3/stat")"
  timeout $((secs + 30)) perf stat -x, -e task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter \
    -p "$3" -o "$work/perf-$1.txt" -- sleep "$secs" &
  local perf=$!
  timeout $((secs + 30)) "${on1[@]}" wrk -t1 -c"$conns" -d"${secs}s" "http://127.0.0.1:$2/" >"$work/wrk-$1.txt"
  wait "$perf" || true
  after="$(switches "$3")"; stat1="$(awk '{print $14, $15}' "/proc/$3/stat")"
  echo "$before $after $stat0 $stat1 $(ls /proc/"$3"/task | wc -l)" >"$work/sched-$1.txt"
}
measure ours "$ours_port" "$ours_pid"
measure haproxy "$hap_port" "$hap_pid"
python3 - "$work" "$(getconf CLK_TCK)" "$threads" "$pin" "$conns" <<'PY'
import re, sys
work, tck, threads, pin, conns = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
print(f"{threads} thread(s) each, {'pinned' if pin == '1' else 'unpinned'}, wrk -c{conns}; per request:")
print(f"{'':12}{'req/s':>10}{'user us':>9}{'sys us':>8}{'vol cs':>8}{'invol cs':>9}{'migr':>8}{'syscalls':>9}{'threads':>8}")
for name in ("ours", "haproxy"):
    w = open(f"{work}/wrk-{name}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", w).group(1))
    n = int(re.search(r"(\d+) requests in", w).group(1))
    v0, i0, v1, i1, u0, s0, u1, s1, nthreads = map(int, open(f"{work}/sched-{name}.txt").read().split())
    perf = {}
    for line in open(f"{work}/perf-{name}.txt"):
        cols = line.strip().split(",")
        if len(cols) > 2 and cols[0].replace(".", "").isdigit():
            perf[cols[2]] = float(cols[0])
    migr = perf.get("cpu-migrations", float("nan"))
    sysc = perf.get("raw_syscalls:sys_enter", float("nan"))
    print(f"{name:12}{rps:>10,.0f}{(u1 - u0) / tck * 1e6 / n:>9.2f}{(s1 - s0) / tck * 1e6 / n:>8.2f}"
          f"{(v1 - v0) / n:>8.3f}{(i1 - i0) / n:>9.3f}{migr / n:>8.4f}{sysc / n:>9.2f}{nthreads:>8}")
PY

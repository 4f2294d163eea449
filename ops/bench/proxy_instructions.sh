#!/usr/bin/env bash
# User-space instructions per request, ours and HAProxy's, counted by callgrind: a figure that
# does not move with the machine's load, so two builds (or two proxies) can be told apart by a
# few per cent where wall-clock runs on this VM move ±10 % (it has no hardware counters).
#
#   ops/bench/proxy_instructions.sh [--h1] [requests]     (default: HTTP/2, 20 000 requests)
#   env: TIDINGS_BIN (skip the release build and use this binary)
#
# Setup as `proxy.sh` mode e (or a with --h1): one nginx backend answering 3 bytes, its
# membership in a real registry, each proxy with one thread. Each proxy runs under
# `valgrind --tool=callgrind` in turn; after 2 000 warm-up requests the counters are zeroed,
# h2load sends the counted requests (10 connections; HTTP/2 with 10 streams each), and the
# counters are dumped. Kernel time is not counted: this measures what our code (and the
# crates it uses) execute, not system calls. Everything on 127.0.0.1, every wait bounded.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
h1=0
if [[ "${1:-}" == --h1 ]]; then h1=1; shift; fi
n="${1:-20000}"
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v valgrind >/dev/null || need+=(valgrind)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"
trap 'stop_ok_backend; cleanup' EXIT

ok_backend
ours_port="$(free_port)"; admin_port="$(free_port)"; hap_port="$(free_port)"
hap_bind="127.0.0.1:$hap_port"
((h1)) || hap_bind+=" proto h2"
ok_backend_haproxy 1 "$hap_bind"

load=(h2load -c10 -m10 -t1)
probe=(curl -fsS -o /dev/null --http2-prior-knowledge)
if ((h1)); then load=(h2load --h1 -c10 -t1); probe=(curl -fsS -o /dev/null); fi
measure() { # name port command... -> instructions per request
  local name="$1" port="$2" pid f ir
  shift 2
  valgrind --tool=callgrind --callgrind-out-file="$work/cg-$name.out" "$@" >"$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  # Under valgrind a start takes seconds: up to 60 s.
  for _ in $(seq 600); do "${probe[@]}" "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
  "${probe[@]}" "http://127.0.0.1:$port/" || { echo "$name never answered" >&2; cat "$work/$name.log" >&2; exit 1; }
  timeout 300 "${load[@]}" -n 2000 "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  timeout 600 "${load[@]}" -n "$n" "http://127.0.0.1:$port/" >"$work/$name.h2load"
  grep -q "$n succeeded" "$work/$name.h2load" || { echo "$name: not every request succeeded" >&2; cat "$work/$name.h2load" >&2; exit 1; }
  callgrind_control -d "$pid" >/dev/null 2>&1
  # The dump is written by the target; wait for it (bounded).
  for _ in $(seq 100); do compgen -G "$work/cg-$name.out.*" >/dev/null && break; sleep 0.1; done
  f="$(ls -t "$work/cg-$name.out".* | head -1)"
  ir="$(awk '/^summary:/ {print $2}' "$f")"
  kill -KILL "$pid" 2>/dev/null || true
  echo "$((ir / n))"
}
ours="$(measure ours "$ours_port" "$bin" --log-level warn proxy --listen "127.0.0.1:$ours_port" \
  --admin "127.0.0.1:$admin_port" --agent "http://127.0.0.1:$reg_port" --route web=/ --worker-threads 1)"
hap="$(measure haproxy "$hap_port" haproxy -db -f "$work/haproxy.cfg")"
proto="HTTP/2 (10 connections x 10 streams)"
((h1)) && proto="HTTP/1.1 keep-alive (10 connections)"
echo "user-space instructions per request, $proto, $n requests, callgrind:"
printf '  tidings %8d\n  haproxy %8d\n  ratio   %8.2fx (>1x: tidings executes fewer)\n' \
  "$ours" "$hap" "$(python3 -c "print($hap / $ours)")"

# Shared setup for the benchmark scripts (sourced, not run): the release binary, a scratch
# directory, cleanup of every process a script started, two loopback helpers, a memory reading
# and a filled registry.
# Expects `root` (the workspace) to be set and the working directory to be it.

if [[ -n "${TIDINGS_BIN:-}" ]]; then
  bin="$TIDINGS_BIN"
else
  cargo build --release --quiet --bin tidings
  bin="$root/target/release/tidings"
fi
work="$(mktemp -d)"
# Agents serve DNS on a port of their own unless a script says otherwise (7753 is one per host).
export TIDINGS_DNS="${TIDINGS_DNS:-127.0.0.1:0}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_http URL [SECONDS=10]: poll until URL answers 2xx, bounded.
wait_http() {
  local secs="${2:-10}"
  for _ in $(seq $((secs * 10))); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no answer from $1 within $secs s" >&2; return 1
}

# hwm PID: the process's peak resident memory (VmHWM), in kB.
hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# ticks PID: the process's utime + stime, in clock ticks (fields 14 and 15 of /proc/PID/stat,
# counted after the parenthesised command name, which may hold spaces).
ticks() { cut -d')' -f2- "/proc/$1/stat" | awk '{print $12 + $13}'; }

# sized_registry SERVICES HOSTS LOG: on CPU 1, a memory registry on a free loopback port
# (TTL 1 h: nobody renews the fill), filled with SERVICES x HOSTS endpoints, its warm-up over
# (a short check-in interval ends it before an agent starts). Sets `reg` (its URL) and
# `reg_pid`.
sized_registry() {
  local port
  port="$(free_port)"
  taskset -c 1 "$bin" --log-level warn registry --listen "127.0.0.1:$port" --ttl 1h \
    --check-in-interval 2s --max-endpoints-per-ip "$1" >"$3" 2>&1 &
  reg_pid=$!; pids+=("$reg_pid")
  reg="http://127.0.0.1:$port"
  wait_http "$reg/live"
  taskset -c 1 "$bin" bench registry-lookup --url "$reg" --fill --services "$1" --hosts "$2" >/dev/null
  for _ in $(seq 100); do
    curl -fsS -D - -o /dev/null "$reg/v1/registration/svc-000" | grep -qi '^x-tidings-warming: *true' || break
    sleep 0.1
  done
}

# filled_registry: starts a memory registry on a free loopback port, fills it with 100 services x
# 100 hosts (`tidings bench registry-lookup --fill`), and sets `reg` to its URL.
filled_registry() {
  local port
  port="$(free_port)"
  "$bin" --log-level warn registry --listen "127.0.0.1:$port" >"$work/registry.log" 2>&1 &
  pids+=($!)
  reg="http://127.0.0.1:$port"
  wait_http "$reg/live"
  "$bin" bench registry-lookup --url "$reg" --fill >/dev/null
}

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

# ok_backend [PREFIX...]: one nginx worker on a free loopback port answering every path with
# "ok\n", checked in as service `web` in a memory registry of its own; both run under PREFIX
# (`taskset -c 1`, or nothing). Sets `backend_port` and `reg_port`. Stop it with
# `stop_ok_backend` before `cleanup`: a SIGKILLed nginx master leaves its worker holding the port.
ok_backend() {
  backend_port="$(free_port)"; reg_port="$(free_port)"
  mkdir -p "$work/backend/logs"
  # nginx's worker drops root: it must be able to enter the scratch directory.
  chmod 755 "$work"
  cat >"$work/backend/nginx.conf" <<CONF
worker_processes 1;
pid $work/backend/nginx.pid;
error_log $work/backend/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/b; proxy_temp_path $work/p; fastcgi_temp_path $work/f;
  uwsgi_temp_path $work/u; scgi_temp_path $work/s;
  server { listen 127.0.0.1:$backend_port; location / { return 200 "ok\n"; } } }
CONF
  "$@" nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' &
  pids+=($!)
  wait_http "http://127.0.0.1:$backend_port/"
  "$@" "$bin" --log-level warn registry --listen "127.0.0.1:$reg_port" >"$work/registry.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$reg_port/healthcheck"
  "$bin" checkin --registry "http://127.0.0.1:$reg_port" --service web --ip 127.0.0.1 \
    --port "$backend_port" --no-splay >/dev/null
}
stop_ok_backend() {
  [[ -f $work/backend/nginx.pid ]] && kill -TERM "$(cat "$work/backend/nginx.pid")" 2>/dev/null
  sleep 0.3
}

# ok_backend_haproxy THREADS BIND: $work/haproxy.cfg, HAProxy with THREADS threads in front
# of ok_backend's nginx (keep-alive on both sides, a check every 5 s), listening as BIND says
# (`127.0.0.1:PORT`, maybe followed by `proto h2`).
ok_backend_haproxy() {
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread $1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend in
  bind $2
  default_backend web
backend web
  server b0 127.0.0.1:$backend_port check inter 5s
CONF
}

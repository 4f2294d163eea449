#!/usr/bin/env bash
# The proxy, side by side with HAProxy and nginx, in one run on this machine.
#
#   ops/bench/proxy.sh [--mode a|b|c|d|e|f|g | --all] [seconds-per-phase]   (default: a, 10 s)
#   env: CONNECTIONS (wrk, default 64), RATE (fixed-rate phase, requests/s, default 5000),
#        ROUNDS (default 3; 5 with --all, as two or three rounds swing p99 ratios by half
#        on two cores), HOSTS (backend addresses in the cluster, default 1; mode f: 1000),
#        TIDINGS_BIN (skip the release build and use this binary)
#
# Modes (issue #18), each one run with all three proxies taking turns:
#   a  pinned: each proxy on CPU 0 with one thread; backend, registry and load on CPU 1
#   b  unpinned, one thread: nothing pinned (the scheduler places everything, as for a sidecar)
#   c  unpinned, two threads each: ours --worker-threads 2, HAProxy nbthread 2, nginx 2 workers
#   d  TLS termination, pinned, one thread: the same certificate (ECDSA P-256) on all three,
#      TLS 1.3, keep-alive (wrk over https; the fixed-rate phase over https too)
#   e  HTTP/2 downstream, pinned, one thread: cleartext h2 (prior knowledge); peak with h2load,
#      100 streams over 10 connections
#   f  a's setup with HOSTS=1000 backend addresses
#   g  TCP: ours `protocol = "tcp"`, HAProxy `mode tcp`, nginx `stream`, pinned, one thread.
#      Bytes/s: wrk fetching a 1 MiB body over keep-alive; connections/s: wrk with
#      `Connection: close` (every request is a new TCP connection through the proxy).
# `--all` runs a to g one after the other, each as its own invocation (own processes, ports).
#
# One backend for all three: an nginx worker answering every path with a 3-byte body (and
# /big with 1 MiB), with its membership in a real registry (`tidings registry` + `tidings
# checkin`). Keep-alive to the backend everywhere but in g. The load generators (wrk, h2load;
# one thread) share CPU 1 with the backend and the registry when pinned. Proxies are measured
# one after the other, never at the same time. Access logs are off for all three (ours: log
# level warn). Everything stays on 127.0.0.1 and every phase is bounded in time (and by
# `timeout`).
#
# Phases per proxy: warm-up (2 s), peak throughput, latency at a fixed rate (h2load, 50
# clients, p50/p99 from its per-request log; HTTP/1.1 except in e). The three take turns,
# phase by phase, for ROUNDS rounds, so that drifting load from other work spreads over all
# three. Peak is the median of the rounds, the ratio the median of the per-round ratios,
# latencies percentiles over all rounds' requests. CPU time per request (user + system of
# every process of the proxy, from /proc/PID/stat over the peak phases) does not depend on
# how much of the CPU the proxy got. Then each proxy's peak RSS (VmHWM, summed over its
# processes: nginx's workers in c).
#
# Every proxy health-checks its hosts (ours every 5 s, HAProxy `check inter 5s`; nginx has no
# active checks).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
mode=a
if [[ "${1:-}" == --all ]]; then
  shift
  export TIDINGS_BIN="${TIDINGS_BIN:-}" ROUNDS="${ROUNDS:-5}"
  if [[ -z "$TIDINGS_BIN" ]]; then
    cargo build --release --quiet --bin tidings
    TIDINGS_BIN="$root/target/release/tidings"
  fi
  for m in a b c d e f g; do "$0" --mode "$m" "$@"; echo; done
  exit 0
fi
if [[ "${1:-}" == --mode ]]; then mode="$2"; shift 2; fi
[[ "$mode" =~ ^[a-g]$ ]] || { echo "unknown mode $mode (a to g)" >&2; exit 64; }
secs="${1:-10}"
conns="${CONNECTIONS:-64}"
rate="${RATE:-5000}"
rounds="${ROUNDS:-3}"
nhosts="${HOSTS:-1}"
pinned=1; threads=1; tls=0; h2=0; tcp=0
case "$mode" in
  b) pinned=0 ;;
  c) pinned=0; threads=2 ;;
  d) tls=1 ;;
  e) h2=1 ;;
  f) nhosts="${HOSTS:-1000}" ;;
  g) tcp=1 ;;
esac
# nginx preallocates its connection table: size it for the hosts, so that RSS stays comparable.
ngx_conns=$((nhosts > 100 ? 32768 : 4096))
clients=50
ulimit -n 65536 2>/dev/null || true
host_ip() { if (($1 == 0)); then echo 127.0.0.1; else echo "127.1.$(($1 / 250)).$(($1 % 250 + 1))"; fi; }
# The proxy under test on CPU 0, the rest on CPU 1 — or anywhere, unpinned.
on0=(); on1=()
if ((pinned)); then on0=(taskset -c 0); on1=(taskset -c 1); fi

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || need+=(libnginx-mod-stream)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"
# A SIGKILLed nginx master leaves its workers running (holding the port and our stdout):
# stop the masters with TERM, which takes the workers down, before the common cleanup.
stop_nginx() { for f in "$work"/*/nginx.pid; do [[ -f $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null; done; sleep 0.3; }
trap 'stop_nginx; cleanup' EXIT

backend_port="$(free_port)"; reg_port="$(free_port)"
ours_port="$(free_port)"; admin_port="$(free_port)"; hap_port="$(free_port)"; ngx_port="$(free_port)"
scheme=http; ((tls)) && scheme=https
if ((tls)); then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
  cat "$work/cert.pem" "$work/key.pem" >"$work/haproxy.pem"
fi
head -c 1048576 /dev/zero >"$work/big.bin"
# nginx's workers drop root: they must be able to read the body (mktemp makes the dir 0700).
chmod 755 "$work"; chmod 644 "$work/big.bin"

# nginx wants its temp paths writable; give each instance its own prefix.
nginx_conf() { # prefix, workers, http block body, [top-level extra]
  mkdir -p "$1/logs"
  cat >"$1/nginx.conf" <<EOF
${4:-}
worker_processes $2;
worker_rlimit_nofile 65536;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections $ngx_conns; }
http {
  access_log off;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fcgi;
  uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
  $3
}
EOF
}
listens=""; ngx_servers=""; hap_servers=""
for i in $(seq 0 $((nhosts - 1))); do
  ip="$(host_ip "$i")"
  listens+="listen $ip:$backend_port; "
  ngx_servers+="server $ip:$backend_port; "
  hap_servers+="  server b$i $ip:$backend_port check inter 5s"$'\n'
done
nginx_conf "$work/backend" 1 "server { $listens location / { return 200 \"ok\n\"; }
  location = /big { alias $work/big.bin; } }"
"${on1[@]}" nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_http "http://127.0.0.1:$backend_port/healthcheck"

"${on1[@]}" "$bin" --log-level warn registry --listen "127.0.0.1:$reg_port" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$reg_port/healthcheck"
for i in $(seq 0 $((nhosts - 1))); do
  "$bin" checkin --registry "http://127.0.0.1:$reg_port" --service web --ip "$(host_ip "$i")" \
    --port "$backend_port" --no-splay >/dev/null
done

# Ours: one config file per mode (a TLS or TCP listener needs one).
{
  echo "[admin]"; echo "address = \"127.0.0.1:$admin_port\""
  echo "[[listeners]]"; echo "address = \"127.0.0.1:$ours_port\""
  if ((tcp)); then echo 'protocol = "tcp"'; echo 'cluster = "web"'; fi
  if ((tls)); then echo "tls = { cert = \"$work/cert.pem\", key = \"$work/key.pem\" }"; fi
  if ((!tcp)); then echo "[[routes]]"; echo 'path_prefix = "/"'; echo 'cluster = "web"'; fi
  echo "[[clusters]]"; echo 'name = "web"'; echo 'service = "web"'
  echo "membership_url = \"http://127.0.0.1:$reg_port\""
} >"$work/proxy.toml"
"${on0[@]}" "$bin" --log-level warn proxy --config "$work/proxy.toml" --worker-threads "$threads" \
  >"$work/proxy.log" 2>&1 &
ours_pid=$!
pids+=($ours_pid)
for _ in $(seq 1200); do
  curl -fsS "http://127.0.0.1:$admin_port/clusters" 2>/dev/null | grep -q "\"routable_hosts\": $nhosts," && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$admin_port/clusters" | grep -q "\"routable_hosts\": $nhosts," \
  || { echo "tidings proxy never routed to the backend" >&2; cat "$work/proxy.log" >&2
    curl -fsS "http://127.0.0.1:$admin_port/clusters" | grep -E "routable_hosts|panic" >&2; exit 1; }

hap_mode=http; hap_bind="bind 127.0.0.1:$hap_port"
((tcp)) && hap_mode=tcp
((tls)) && hap_bind+=" ssl crt $work/haproxy.pem ssl-min-ver TLSv1.3"
((h2)) && hap_bind+=" proto h2"
hap_http="option http-keep-alive
  http-reuse always"
((tcp)) && hap_http=""
cat >"$work/haproxy.cfg" <<EOF
global
  nbthread $threads
  maxconn 4096
defaults
  mode $hap_mode
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  $hap_http
frontend in
  $hap_bind
  default_backend web
backend web
$hap_servers
EOF
"${on0[@]}" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
hap_pid=$!
pids+=($hap_pid)

ngx_listen="listen 127.0.0.1:$ngx_port"
((tls)) && ngx_listen+=" ssl; ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.3"
((h2)) && ngx_listen+=" http2"
if ((tcp)); then
  nginx_conf "$work/front" "$threads" "" "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
stream { upstream web { $ngx_servers } server { listen 127.0.0.1:$ngx_port; proxy_pass web; } }"
else
  nginx_conf "$work/front" "$threads" "upstream web { $ngx_servers keepalive 128; }
  server { $ngx_listen; location / { proxy_pass http://web;
    proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
fi
"${on0[@]}" nginx -p "$work/front" -c "$work/front/nginx.conf" -g 'daemon off;' &
pids+=($!)
probe() { # URL: answers 2xx within 10 s, in the mode's protocol
  local flags=(-fsS -o /dev/null -k)
  ((h2)) && flags+=(--http2-prior-knowledge)
  for _ in $(seq 100); do curl "${flags[@]}" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}
for p in "$ours_port" "$hap_port" "$ngx_port"; do probe "$scheme://127.0.0.1:$p/"; done
ngx_workers="$(pgrep -P "$(cat "$work/front/nginx.pid")" | tr '\n' ' ')"

cpu_ticks() { # user + system clock ticks of every PID given
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
rss_kb() { local t=0 p; for p in "$@"; do t=$((t + $(hwm "$p"))); done; echo "$t"; }
run_load() { # kind url seconds output
  local t=$(($3 + 30))
  case "$1" in
    wrk) timeout "$t" "${on1[@]}" wrk -t1 -c"$conns" -d"$3s" --latency "$2" >"$4" ;;
    h2) timeout "$t" "${on1[@]}" h2load -c10 -m10 -t1 -D "$3" "$2" >"$4" ;;
    big) timeout "$t" "${on1[@]}" wrk -t1 -c"$conns" -d"$3s" "$2big" >"$4" ;;
    close) timeout "$t" "${on1[@]}" wrk -t1 -c"$conns" -d"$3s" -H 'Connection: close' "$2" >"$4" ;;
  esac
}
kinds=(wrk)
((h2)) && kinds=(h2)
((tcp)) && kinds=(big close)
peak() { # name port round pids... -> a load output and CPU ticks per kind
  local url="$scheme://127.0.0.1:$2/" name="$1" round="$3" k t0
  shift 3
  for k in "${kinds[@]}"; do
    run_load "$k" "$url" 2 "$work/warm.txt"
    t0="$(cpu_ticks "$@")"
    run_load "$k" "$url" "$secs" "$work/peak-$k-$name-$round.txt"
    echo $(($(cpu_ticks "$@") - t0)) >"$work/cpu-$k-$name-$round.txt"
  done
}
fixed() { # name port round -> h2load per-request log
  local per=$((rate / clients)) proto=(--h1)
  ((h2)) && proto=()
  timeout $((secs + 30)) "${on1[@]}" h2load "${proto[@]}" -c"$clients" --rps="$per" -D "$secs" \
    --warm-up-time=1 --log-file="$work/h2load-$1-$3.log" "$scheme://127.0.0.1:$2/" >"$work/h2load-$1-$3.txt"
}
for r in $(seq "$rounds"); do
  # shellcheck disable=SC2086
  peak ours "$ours_port" "$r" $ours_pid
  peak haproxy "$hap_port" "$r" "$hap_pid"
  # shellcheck disable=SC2086
  peak nginx "$ngx_port" "$r" $ngx_workers
  for t in "ours $ours_port" "haproxy $hap_port" "nginx $ngx_port"; do
    # shellcheck disable=SC2086
    set -- $t
    fixed "$1" "$2" "$r"
  done
done
# shellcheck disable=SC2086
rss="$(rss_kb "$ours_pid") $(rss_kb "$hap_pid") $(rss_kb $ngx_workers)"
load="$(cut -d' ' -f1-3 /proc/loadavg)"
# shellcheck disable=SC2086
python3 "$root/ops/bench/proxy_report.py" "$work" "$mode" "$secs" "$conns" "$rate" "$rounds" \
  "$(getconf CLK_TCK)" "$nhosts" "$load" "${kinds[*]}" $rss

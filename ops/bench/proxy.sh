#!/usr/bin/env bash
# The proxy, side by side with HAProxy and nginx, in one run on this machine.
#
#   ops/bench/proxy.sh [seconds-per-phase]        (default 10)
#   env: CONNECTIONS (wrk, default 64), RATE (fixed-rate phase, requests/s, default 5000),
#        ROUNDS (default 3), HOSTS (backend addresses in the cluster, default 1),
#        TIDINGS_BIN (skip the release build and use this binary)
#
# One backend for all three: an nginx worker answering every path with a 3-byte body, pinned
# to CPU 1, with its membership in a real registry (`tidings registry` + `tidings checkin`).
# In front of it, each with ONE worker thread and pinned to CPU 0, keep-alive to the backend:
# `tidings proxy --worker-threads 1`, HAProxy 2.6 (`nbthread 1`), nginx 1.22 (`worker_processes
# 1`, upstream keepalive). The load generators (wrk, h2load; one thread) share CPU 1 with the
# backend and the registry: the machine has two CPUs, and the proxy under test gets one to
# itself. Proxies are measured one after the other, never at the same time. Access logs are
# off for all three (ours: log level warn). Everything stays on 127.0.0.1 and every phase is
# bounded in time (and by `timeout`).
#
# Phases per proxy: warm-up (2 s), peak throughput (wrk, keep-alive, CONNECTIONS connections),
# latency at a fixed rate (h2load --h1 --rps, 50 clients, p50/p99 from its per-request log).
# The three proxies take turns, phase by phase, for ROUNDS rounds: on a shared machine the
# load from other work drifts, and taking turns spreads it over all three instead of landing
# on whichever ran last. Peak req/s is the median of the rounds, the ratio is the median of
# the per-round ratios, latencies are percentiles over all rounds' requests. CPU time per
# request (user + system, from /proc/PID/stat over the peak phases) does not depend on how
# much of the CPU the proxy got, so it is the steadiest figure here. Then each proxy's peak
# RSS (VmHWM from /proc/PID/status).
#
# HOSTS=N puts N backend addresses in the cluster (127.0.0.1, then 127.1.x.y: the same nginx
# listens on all of them, all registered), balanced round robin by all three proxies, to
# show what the size of a cluster costs per request. Every proxy health-checks its hosts
# (ours by default every 5 s, HAProxy `check inter 5s`; nginx has no active checks).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
secs="${1:-10}"
conns="${CONNECTIONS:-64}"
rate="${RATE:-5000}"
rounds="${ROUNDS:-3}"
nhosts="${HOSTS:-1}"
# nginx preallocates its connection table: size it for the hosts, so that RSS stays comparable.
ngx_conns=$((nhosts > 100 ? 32768 : 4096))
clients=50
ulimit -n 65536 2>/dev/null || true
host_ip() { if (($1 == 0)); then echo 127.0.0.1; else echo "127.1.$(($1 / 250)).$(($1 % 250 + 1))"; fi; }

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
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

# nginx wants its temp paths writable; give each instance its own prefix.
nginx_conf() { # prefix, body of the server block
  mkdir -p "$1/logs"
  cat >"$1/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 65536;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections $ngx_conns; }
http {
  access_log off;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fcgi;
  uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
  $2
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
nginx_conf "$work/backend" "server { $listens location / { return 200 \"ok\n\"; } }"
taskset -c 1 nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_http "http://127.0.0.1:$backend_port/healthcheck"

taskset -c 1 "$bin" --log-level warn registry --listen "127.0.0.1:$reg_port" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$reg_port/healthcheck"
for i in $(seq 0 $((nhosts - 1))); do
  "$bin" checkin --registry "http://127.0.0.1:$reg_port" --service web --ip "$(host_ip "$i")" \
    --port "$backend_port" --no-splay >/dev/null
done

taskset -c 0 "$bin" --log-level warn proxy --listen "127.0.0.1:$ours_port" \
  --admin "127.0.0.1:$admin_port" --agent "http://127.0.0.1:$reg_port" --route web=/ \
  --worker-threads 1 >"$work/proxy.log" 2>&1 &
ours_pid=$!
pids+=($ours_pid)
for _ in $(seq 1200); do
  curl -fsS "http://127.0.0.1:$admin_port/clusters" 2>/dev/null | grep -q "\"routable_hosts\": $nhosts," && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$admin_port/clusters" | grep -q "\"routable_hosts\": $nhosts," \
  || { echo "tidings proxy never routed to the backend" >&2; cat "$work/proxy.log" >&2
    curl -fsS "http://127.0.0.1:$admin_port/clusters" | grep -E "routable_hosts|panic" >&2; exit 1; }

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend in
  bind 127.0.0.1:$hap_port
  default_backend web
backend web
$hap_servers
EOF
taskset -c 0 haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
hap_pid=$!
pids+=($hap_pid)

nginx_conf "$work/front" "upstream web { $ngx_servers keepalive 128; }
  server { listen 127.0.0.1:$ngx_port; location / { proxy_pass http://web;
    proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
taskset -c 0 nginx -p "$work/front" -c "$work/front/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_http "http://127.0.0.1:$ours_port/"
wait_http "http://127.0.0.1:$hap_port/"
wait_http "http://127.0.0.1:$ngx_port/"
ngx_worker="$(pgrep -P "$(cat "$work/front/nginx.pid")" | head -1)"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in clock ticks
peak() { # name port pid round -> wrk output file, CPU ticks used
  local url="http://127.0.0.1:$2/"
  timeout 30 taskset -c 1 wrk -t1 -c"$conns" -d2s "$url" >/dev/null
  local t0; t0="$(cpu_ticks "$3")"
  timeout $((secs + 30)) taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency "$url" >"$work/wrk-$1-$4.txt"
  echo $(($(cpu_ticks "$3") - t0)) >"$work/cpu-$1-$4.txt"
}
fixed() { # name port round -> h2load per-request log
  local per=$((rate / clients))
  timeout $((secs + 30)) taskset -c 1 h2load --h1 -c"$clients" --rps="$per" -D "$secs" \
    --warm-up-time=1 --log-file="$work/h2load-$1-$3.log" "http://127.0.0.1:$2/" >"$work/h2load-$1-$3.txt"
}
hap_worker="$hap_pid"
for r in $(seq "$rounds"); do
  for t in "ours $ours_port $ours_pid" "haproxy $hap_port $hap_worker" "nginx $ngx_port $ngx_worker"; do
    # shellcheck disable=SC2086
    set -- $t
    peak "$1" "$2" "$3" "$r"
  done
  for t in "ours $ours_port" "haproxy $hap_port" "nginx $ngx_port"; do
    # shellcheck disable=SC2086
    set -- $t
    fixed "$1" "$2" "$r"
  done
done
rss_ours="$(hwm "$ours_pid")"; rss_hap="$(hwm "$hap_pid")"; rss_ngx="$(hwm "$ngx_worker")"

python3 - "$work" "$secs" "$conns" "$rate" "$rounds" "$(getconf CLK_TCK)" "$rss_ours" "$rss_hap" "$rss_ngx" "$nhosts" <<'PY'
import re, statistics, sys
nhosts = int(sys.argv[10])
work, secs, conns, rate, rounds, tck = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rss = dict(zip(("ours", "haproxy", "nginx"), (int(x) / 1024 for x in sys.argv[7:10])))
names = ("ours", "haproxy", "nginx")
rounds = range(1, rounds + 1)

def wrk(name, r):
    text = open(f"{work}/wrk-{name}-{r}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors += int(m.group(1)) if m else 0
    cpu_us = int(open(f"{work}/cpu-{name}-{r}.txt").read()) / tck * 1e6 / max(total, 1)
    return rps, errors, cpu_us

def fixed(name):
    lat, bad = [], 0
    for r in rounds:
        for line in open(f"{work}/h2load-{name}-{r}.log"):
            cols = line.split("\t")
            if len(cols) < 3:
                continue
            if cols[1] != "200":
                bad += 1
            lat.append(int(cols[2]))
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else float("nan")
    achieved = len(lat) / float(secs) / len(rounds)
    return q(0.50), q(0.99), q(0.999), achieved, bad

w = {n: [wrk(n, r) for r in rounds] for n in names}
f = {n: fixed(n) for n in names}
med = statistics.median
print(f"proxy benchmark: one worker thread each on CPU 0; backend (nginx, {nhosts} address(es)), registry and load on CPU 1;"
      f" {secs} s per phase, {len(rounds)} rounds taking turns")
for r in rounds:
    print(f"  round {r}: peak req/s " + ", ".join(f"{n} {w[n][r - 1][0]:,.0f}" for n in names))
print(f"{'':34}{'tidings':>11}{'haproxy':>11}{'nginx':>11}{'vs haproxy':>12}{'vs nginx':>10}")
def row(label, vals, fmt, ratio=True, lower_better=False, ratios=None):
    a, b, c = vals
    out = f"{label:34}" + "".join(f"{v:>11{fmt}}" for v in vals)
    if ratios:
        out += f"{ratios[0]:>11.2f}x{ratios[1]:>9.2f}x"
    elif ratio:
        r = (lambda x, y: y / x if lower_better else x / y)
        out += f"{r(a, b):>11.2f}x{r(a, c):>9.2f}x"
    print(out)
per_round = lambda peer: med([w["ours"][i][0] / w[peer][i][0] for i in range(len(rounds))])
row(f"peak req/s (wrk, {conns} conns, median)", [med(x[0] for x in w[n]) for n in names], ",.0f",
    ratios=(per_round("haproxy"), per_round("nginx")))
row("  errors", [sum(x[1] for x in w[n]) for n in names], "d", ratio=False)
row("CPU us per request at peak", [med(x[2] for x in w[n]) for n in names], ".2f", lower_better=True)
row(f"p50 ms at {rate}/s (h2load --h1)", [f[n][0] for n in names], ".3f", lower_better=True)
row(f"p99 ms at {rate}/s", [f[n][1] for n in names], ".3f", lower_better=True)
row(f"p99.9 ms at {rate}/s", [f[n][2] for n in names], ".3f", lower_better=True)
row("  achieved req/s", [f[n][3] for n in names], ",.0f", ratio=False)
row("  non-200", [f[n][4] for n in names], "d", ratio=False)
row("peak RSS MB (VmHWM)", [rss[n] for n in names], ".1f", lower_better=True)
print("(ratios: >1x means tidings is better: more throughput, less CPU, lower latency, less memory;"
      " the peak ratio is the median of the per-round ratios)")
PY

#!/usr/bin/env bash
# Registry check-ins per second, unloaded and while a slowloris flood holds connections.
#
#   ops/bench/slowloris.sh [seconds-per-phase]     (default 20; the whole run stays under 2 min)
#
# The release registry runs with its default limits (4096 connections, 10 s to send a request
# head) and a file limit of 65536 where the hard limit allows it. The load generator
# (`tidings bench registry-checkin`, 64 keep-alive connections, the one registry.sh uses)
# measures v1 check-ins three times: unloaded, while FLOOD (default 5000) slowloris
# connections are held, and unloaded again. The attacker (a small Python client) opens its
# connections, sends half a request head on each and reopens every one the registry closes,
# for as long as the loaded phase lasts. Registry on CPU 0; load generator and attacker on
# CPU 1, the attacker at nice 19 so it does not take the load generator's CPU. Everything is
# on 127.0.0.1 and every phase is bounded in time.
#
# Prints both rates and loaded / unloaded (the mean of the two unloaded runs). Goal: >= 0.90.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
secs="${1:-20}"
conc="${CONCURRENCY:-64}"
flood="${FLOOD:-5000}"

if [[ -z "${TIDINGS_BIN:-}" ]]; then
  cargo build --release --quiet --bin tidings
  TIDINGS_BIN="${CARGO_TARGET_DIR:-$root/target}/release/tidings"
fi
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

# Room for the registry's 4096 connections and the attacker's 5000 (children inherit it).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
files="$(ulimit -n)"
if ((files < flood + 4096 + 256)); then
  echo "file limit $files is too low for $flood attackers plus the registry's 4096 connections" >&2
  exit 1
fi

cat >"$work/slowloris.py" <<'PY'
# Holds N connections to 127.0.0.1:PORT, each with half a request head, reopening every one
# the server closes, until SECS pass. Writes how many it holds to STATUS twice a second and a
# JSON summary to stdout at the end.
import json, selectors, signal, socket, sys, time

port, n, secs, status = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
HALF = b"GET /live HTTP/1.1\r\nHost: registry\r\nUser-Agent: slowloris"
sel = selectors.DefaultSelector()
stats = {"opened": 0, "closed_by_server": 0, "connect_errors": 0}
held = 0

def open_one():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    sel.register(s, selectors.EVENT_WRITE, "connecting")
    stats["opened"] += 1

def drop(s):
    sel.unregister(s)
    s.close()

stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

end = time.monotonic() + secs
next_status = 0.0
for _ in range(n):
    open_one()
while not stop and time.monotonic() < end:
    for key, _ in sel.select(0.2):
        s = key.fileobj
        if key.data == "connecting":
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                stats["connect_errors"] += 1
                drop(s)
                open_one()
                continue
            try:
                s.send(HALF)
            except OSError:
                pass
            sel.modify(s, selectors.EVENT_READ, "held")
            held += 1
        else:
            # Readable: a refusal, a FIN or a reset. Either way the server let go: reopen.
            try:
                s.recv(4096)
            except OSError:
                pass
            held -= 1
            stats["closed_by_server"] += 1
            drop(s)
            open_one()
    now = time.monotonic()
    if now >= next_status:
        with open(status, "w") as f:
            f.write(str(held))
        next_status = now + 0.5
stats["held_at_end"] = held
print(json.dumps(stats))
PY

reg_port="$(free_port)"
taskset -c 0 "$bin" --log-level warn registry --listen "127.0.0.1:$reg_port" >"$work/registry.log" 2>&1 &
pids+=($!)
reg_pid=$!
reg="http://127.0.0.1:$reg_port"
wait_http "$reg/healthcheck"

load() {
  taskset -c 1 "$bin" --log-level error bench registry-checkin --url "$reg" \
    --concurrency "$conc" --duration "${secs}s"
}
metric() { curl -fsS "$reg/metrics" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { print s + 0 }'; }

unloaded1="$(load)"

# The flood: ramp up, then measure while it is held (and churned) for the whole phase.
taskset -c 1 nice -n 19 python3 "$work/slowloris.py" "$reg_port" "$flood" "$((secs + 15))" \
  "$work/held" >"$work/slowloris.json" 2>"$work/slowloris.err" &
attacker=$!
pids+=("$attacker")
for _ in $(seq 150); do
  held="$(cat "$work/held" 2>/dev/null || echo 0)"
  ((held >= flood * 9 / 10)) && break
  sleep 0.1
done
held_before="$(cat "$work/held" 2>/dev/null || echo 0)"
open_before="$(metric tidings_registry_connections_open)"
loaded="$(load)"
held_after="$(cat "$work/held" 2>/dev/null || echo 0)"
open_after="$(metric tidings_registry_connections_open)"
kill -TERM "$attacker" 2>/dev/null || true
wait "$attacker" 2>/dev/null || true

unloaded2="$(load)"
evicted="$(metric 'tidings_registry_connections_evicted_total{reason="oldest_idle"}')"
refused="$(metric 'tidings_registry_connections_evicted_total{reason="at_capacity"}')"
header_to="$(metric 'tidings_registry_connections_timed_out_total{reason="header"}')"
accept_err="$(metric tidings_registry_accept_errors_total)"
reg_files="$(awk '/Max open files/ { print $4 }' "/proc/$reg_pid/limits")"

python3 - "$unloaded1" "$loaded" "$unloaded2" "$secs" "$conc" "$flood" "$held_before" "$held_after" \
  "$open_before" "$open_after" "$evicted" "$refused" "$header_to" "$accept_err" "$reg_files" <<'PY'
import json, sys
u1, lo, u2 = (json.loads(a) for a in sys.argv[1:4])
secs, conc, flood, hb, ha, ob, oa, ev, rf, ht, ae, files = sys.argv[4:16]
base = (u1["per_sec"] + u2["per_sec"]) / 2
ratio = lo["per_sec"] / max(base, 1)
print(f"slowloris benchmark: {secs} s per phase, {conc} load connections, {flood} slowloris connections; registry on CPU 0 (file limit {files}), load and attacker on CPU 1")
print(f"{'':34}{'check-ins/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
for name, r in (("unloaded", u1), ("under slowloris", lo), ("unloaded again", u2)):
    print(f"{name:34}{r['per_sec']:>12,.0f}{r['p50_us']/1000:>9.2f}{r['p99_us']/1000:>9.2f}{r['errors']:>8}")
print(f"ratio (under slowloris / mean unloaded): {ratio:.2f}  (goal >= 0.90: {'met' if ratio >= 0.90 else 'NOT met'})")
print(f"attacker held {hb} before and {ha} after the loaded phase; registry open connections {ob} -> {oa}")
print(f"registry totals: evicted oldest idle {ev}, refused at capacity {rf}, header timeouts {ht}, accept errors {ae}")
PY
echo "attacker: $(cat "$work/slowloris.json" 2>/dev/null)"

"""The table `ops/bench/proxy.sh` prints for one mode: peaks, CPU per unit of work, latency at a
fixed rate and RSS for tidings, HAProxy and nginx, with ratios and issue #18's goals.

Arguments: work mode secs conns rate rounds clk_tck nhosts load kinds rss_ours rss_hap rss_ngx
(RSS in kB; kinds: the peak loads run, space-separated: wrk, h2, big, close).
"""
import re
import statistics
import sys

(work, mode, secs, conns, rate, rounds, tck, nhosts, load, kinds) = sys.argv[1:11]
rate, rounds, tck = int(rate), range(1, int(rounds) + 1), int(tck)
names = ("ours", "haproxy", "nginx")
rss = dict(zip(names, (int(x) / 1024 for x in sys.argv[11:14])))
med = statistics.median

TITLES = {
    "a": "pinned, one thread",
    "b": "unpinned, one thread",
    "c": "unpinned, two threads each",
    "d": "TLS 1.3 termination, pinned, one thread",
    "e": "HTTP/2 downstream (h2load, 100 streams over 10 connections), pinned, one thread",
    "f": f"{nhosts} backend addresses, pinned, one thread",
    "g": "TCP (ours protocol = tcp, HAProxy mode tcp, nginx stream), pinned, one thread",
}
# What one unit of peak work is, per kind: (label, unit of CPU cost).
UNITS = {
    "wrk": (f"peak req/s (wrk, {conns} conns)", "request"),
    "h2": ("peak req/s (h2load -c10 -m10)", "request"),
    "big": (f"peak MB/s (1 MiB bodies, {conns} conns)", "MB"),
    "close": (f"peak connections/s ({conns} conns)", "connection"),
}


def size(text):
    value, unit = float(text[:-2]), text[-2:]
    return value * {"KB": 1e-3, "MB": 1.0, "GB": 1e3}.get(unit, 1e-6)


def peak(kind, name, r):
    """(units per second, errors, CPU us per unit) of one peak phase."""
    text = open(f"{work}/peak-{kind}-{name}-{r}.txt").read()
    if kind == "h2":
        m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
        rps, elapsed = float(m.group(2)), float(m.group(1))
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
        total, errors = int(done.group(1)), int(done.group(1)) - int(done.group(2))
        per_sec = rps
    else:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
        total = int(re.search(r"(\d+) requests in", text).group(1))
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
        m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
        errors += int(m.group(1)) if m else 0
        per_sec = rps
        if kind == "big":
            per_sec = size(re.search(r"Transfer/sec:\s+([\d.]+[KMG]?B)", text).group(1))
            elapsed = float(re.search(r"requests in ([\d.]+)s", text).group(1))
            total = per_sec * elapsed
    cpu = int(open(f"{work}/cpu-{kind}-{name}-{r}.txt").read()) / tck * 1e6
    return per_sec, errors, cpu / max(total, 1)


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
    return q(0.50), q(0.99), q(0.999), len(lat) / float(secs) / len(rounds), bad


print(f"mode {mode}: {TITLES[mode]}; {secs} s per phase, {len(rounds)} rounds taking turns;"
      f" load average at the end {load}")
print(f"{'':40}{'tidings':>11}{'haproxy':>11}{'nginx':>11}{'vs haproxy':>12}{'vs nginx':>10}")


def row(label, vals, fmt, lower_better=False, ratios=None, ratio=True):
    out = f"{label:40}" + "".join(f"{v:>11{fmt}}" for v in vals)
    a, b, c = vals
    if ratios:
        out += f"{ratios[0]:>11.2f}x{ratios[1]:>9.2f}x"
    elif ratio:
        r = (lambda x, y: y / x if x else float("nan")) if lower_better else (
            lambda x, y: x / y if y else float("nan"))
        out += f"{r(a, b):>11.2f}x{r(a, c):>9.2f}x"
    print(out)


goals = []
for kind in kinds.split():
    label, unit = UNITS[kind]
    w = {n: [peak(kind, n, r) for r in rounds] for n in names}
    for r in rounds:
        print(f"  round {r}: " + ", ".join(f"{n} {w[n][r - 1][0]:,.1f}" for n in names))
    per_round = lambda peer: med([w["ours"][i][0] / w[peer][i][0] for i in range(len(rounds))])
    vs = (per_round("haproxy"), per_round("nginx"))
    row(f"{label}, median", [med(x[0] for x in w[n]) for n in names], ",.1f", ratios=vs)
    row("  errors", [sum(x[1] for x in w[n]) for n in names], "d", ratio=False)
    cpu = [med(x[2] for x in w[n]) for n in names]
    row(f"CPU us per {unit} at peak", cpu, ".2f", lower_better=True)
    goals.append((f"peak ({kind}) >= 1.1x HAProxy", vs[0], vs[0] >= 1.1))
    goals.append((f"CPU per {unit} <= 0.9x HAProxy", cpu[0] / cpu[1], cpu[0] / cpu[1] <= 0.9))
f = {n: fixed(n) for n in names}
proto = "h2load" if mode == "e" else "h2load --h1"
row(f"p50 ms at {rate}/s ({proto})", [f[n][0] for n in names], ".3f", lower_better=True)
row(f"p99 ms at {rate}/s", [f[n][1] for n in names], ".3f", lower_better=True)
row(f"p99.9 ms at {rate}/s", [f[n][2] for n in names], ".3f", lower_better=True)
row("  achieved req/s", [f[n][3] for n in names], ",.0f", ratio=False)
row("  non-200", [f[n][4] for n in names], "d", ratio=False)
row("peak RSS MB (VmHWM)", [rss[n] for n in names], ".1f", lower_better=True)
p99 = f["ours"][1] / f["haproxy"][1]
goals.append(("p99 <= 1.0x HAProxy's", p99, p99 <= 1.0))
cap = 40 if mode == "f" else 30
goals.append((f"RSS <= {cap} MB", rss["ours"], rss["ours"] <= cap))
print("(ratios: >1x means tidings is better; peak ratios are medians of per-round ratios)")
print("goals: " + "; ".join(f"{g} {v:.2f}: {'met' if ok else 'NOT met'}" for g, v, ok in goals))

// The registry dashboard: its state from /v1/ops/status (store, warm-up, self-preservation)
// and every live host from /v2/catalog, refreshed every 3 s.
"use strict";

async function render() {
  const [st, cat] = await Promise.all([T.mustJson("/v1/ops/status"), T.mustJson("/v2/catalog")]);
  const s = st.body;
  const c = cat.body;
  const sp = s.self_preservation;
  const warming = cat.headers.get("x-tidings-warming") === "true";
  const stale = cat.headers.get("x-tidings-stale") === "true";

  T.fill("flags",
    s.ready ? T.badge("ready", "ok") : T.badge("draining", "bad"),
    s.auth === "open" ? T.badge("writes open: no auth", "warn") : null,
    warming ? T.badge("warming up", "warn") : null,
    sp.active ? T.badge("self-preservation ON", "bad") : null,
    stale ? T.badge("stale answers", "warn") : null);

  const sweep = s.last_sweep;
  const renewals = sp.renewals === null ? "— (no sweep yet)" : String(sp.renewals);
  const state = [
    ["store", "store", s.store],
    ["env", "env", s.env],
    ["auth", "write auth",
      s.auth === "open" ? "open: anyone who reaches the registry can register or deregister anything"
        : "tokens (host, scoped or operator)",
      s.auth === "open" ? "warn" : ""],
    ["warming", "warming up (X-Tidings-Warming)", String(warming), warming ? "warn" : ""],
    ["stale", "answers flagged stale (X-Tidings-Stale)", String(stale), stale ? "warn" : ""],
    ["self_preservation", "self-preservation",
      !sp.enabled ? "disabled" : sp.active ? "active: expiry paused" : "off",
      sp.active ? "bad" : ""],
    ["expected_renewals", "expected check-ins per interval (baseline)", String(sp.expected_renewals)],
    ["renewals", "check-ins in the last interval", renewals],
    ["min_renewals", `fewest that keep preservation off (${Math.round(sp.threshold * 100)} %)`,
      String(sp.min_renewals)],
    ["live", "live / stored rows", sweep ? `${sweep.live} / ${sweep.stored}` : "—"],
    ["last_sweep", "last sweep", sweep ? `${T.age(sweep.ms_ago)} ago, ${sweep.deleted} deleted` : "—"],
    ["ttl", "TTL / check-in interval",
      `${T.age(s.ttl_ms)} / ${T.age(s.check_in_interval_ms)}`],
    ["uptime", "uptime", T.age(s.uptime_ms)],
  ];
  if (s.last_sweep_error) {
    state.push(["sweep_error", "last failed sweep",
      `${T.age(s.last_sweep_error.ms_ago)} ago: ${s.last_sweep_error.message}`, "bad"]);
  }
  T.fill("state", T.facts(state));

  const { summary, details } = T.catalog(c.services, c.generated_at_ms);
  T.fill("services", summary);
  T.fill("hosts", details);
}

T.start(render, 3000);

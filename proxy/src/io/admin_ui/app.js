// The proxy admin dashboard: /ready and every cluster's hosts from /clusters, every 2 s.
"use strict";

const DECISION_CLASS = { route: "ok", hold: "warn", drain: "warn", remove: "bad" };
const HEALTH_CLASS = { healthy: "ok", unchecked: "warn", unhealthy: "bad" };

function clusterSection(c) {
  const m = c.membership;
  const facts = T.facts([
    ["service", "service", c.service],
    ["lb_policy", "load balancer", c.lb_policy],
    ["routable", "routable hosts", `${c.routable_hosts} of ${c.hosts.length}`,
      c.routable_hosts ? "" : "bad"],
    ["panic", "panic mode (routing to every host)", String(c.panic), c.panic ? "bad" : ""],
    ["active_requests", "active requests", String(c.active_requests)],
    ["membership", "membership source",
      !m.initialized ? "no answer yet"
        : `last answer ${T.age(m.last_ok_ms_ago)} ago, index ${m.index || "—"}`,
      m.initialized ? "" : "warn"],
    ["membership_errors", "consecutive membership errors",
      m.consecutive_errors ? `${m.consecutive_errors}: ${m.last_error || ""}` : "0",
      m.consecutive_errors ? "warn" : ""],
  ]);
  const rows = c.hosts.map((h) => T.el("tr", {
    data: {
      cluster: c.name, host: h.address, discovery: h.discovery, health: h.health,
      decision: h.decision,
    },
  },
  T.el("td", { class: "mono" }, h.address),
  T.el("td", null, h.discovery),
  T.el("td", { class: HEALTH_CLASS[h.health] || "" }, h.health),
  T.el("td", { class: DECISION_CLASS[h.decision] || "" }, h.decision),
  T.el("td", { class: "num" }, h.weight),
  T.el("td", null, h.zone || ""),
  T.el("td", null, h.canary ? "yes" : ""),
  T.el("td", { class: "num" }, h.active_requests),
  T.el("td", { class: h.ejected ? "bad" : "" }, h.ejected ? "ejected" : ""),
  T.el("td", { class: "num" }, h.ejections_total),
  T.el("td", { class: "num" }, h.health_checks)));
  const hosts = T.table(["host", "discovery", "health", "decision", "weight#", "zone", "canary",
    "active#", "outlier", "ejections#", "checks#"], rows, "no hosts");
  return T.el("div", { data: { clusterName: c.name } },
    T.el("h3", { class: "mono" }, c.name), facts, hosts);
}

async function render() {
  const [ready, clusters] = await Promise.all([T.getJson("/ready"), T.mustJson("/clusters")]);
  if (ready.body === null) throw new Error(`/ready answered HTTP ${ready.status}`);
  const r = ready.body;
  const waiting = (r.clusters || []).join(", ");
  T.fill("flags", r.ready ? T.badge("ready", "ok") : T.badge("not ready", "bad"));
  T.fill("ready", T.facts([
    ["ready", "ready (/ready)", String(r.ready), r.ready ? "ok" : "bad"],
    ["reason", "why not", r.ready ? "—" : `${r.reason || ""}${waiting ? `: ${waiting}` : ""}`],
  ]));
  const list = clusters.body.clusters || [];
  T.fill("clusters", list.length ? list.map(clusterSection) : T.el("p", { class: "muted" }, "no clusters"));
}

T.start(render, 2000);

// The agent dashboard: /v1/agent/self, /v1/agent/members and the merged view (/v2/catalog)
// with its freshness headers, refreshed every 3 s.
"use strict";

async function render() {
  const [me, mem, cat] = await Promise.all([
    T.mustJson("/v1/agent/self"), T.mustJson("/v1/agent/members"), T.mustJson("/v2/catalog")]);
  const s = me.body;
  const c = cat.body;
  const ageHeader = Number(cat.headers.get("x-tidings-registry-age-ms"));
  const source = cat.headers.get("x-tidings-source") || "";
  const members = mem.body.members || [];
  const down = members.filter((m) => m.state !== "alive").length;

  T.fill("who", s.gossip_addr);
  T.fill("flags",
    s.registry_ok ? T.badge("registry ok", "ok") : T.badge("registry unreachable", "bad"),
    c.stale ? T.badge("serving unconfirmed data", "warn") : null,
    source && source !== "registry" ? T.badge(`source: ${source}`, "warn") : null,
    down ? T.badge(`${down} member(s) down`, "warn") : null);

  T.fill("self", T.facts([
    ["gossip_addr", "gossip address", s.gossip_addr],
    ["epoch", "epoch", String(s.epoch)],
    ["host_ip", "host ip", s.host_ip],
    ["zone", "zone", s.zone || "—"],
    ["registry", "registry", s.registry || "— (none: gossip only)"],
    ["registry_ok", "last registry sync succeeded", String(s.registry_ok), s.registry_ok ? "ok" : "bad"],
    ["registry_age", "since the registry data was last known current (X-Tidings-Registry-Age-Ms)",
      ageHeader >= 0 ? T.age(ageHeader) : "never", ageHeader < 0 || !s.registry_ok ? "warn" : ""],
    ["source", "weakest source in the view (X-Tidings-Source)", source, source === "registry" ? "" : "warn"],
    ["view", "view: services / hosts / index",
      `${s.view.services} / ${s.view.hosts} / ${s.view.index}`],
    ["cache_pending", "hosts known only from the disk cache", String(s.cache.entries_pending)],
  ]));

  T.fill("local", T.table(["service", "endpoint"], (s.endpoints || []).map((e) =>
    T.el("tr", { data: { localService: e.service, localEndpoint: e.addr } },
      T.el("td", { class: "mono" }, e.service), T.el("td", { class: "mono" }, e.addr))),
  "no endpoints on this host"));

  T.fill("members", T.table(["member", "state", "epoch#", ""], members.map((m) =>
    T.el("tr", { data: { member: m.addr, state: m.state } },
      T.el("td", { class: "mono" }, m.addr),
      T.el("td", { class: m.state === "alive" ? "ok" : "bad" }, m.state),
      T.el("td", { class: "num" }, m.epoch),
      T.el("td", { class: "muted" }, m.self ? "this agent" : ""))),
  "no members"));

  const { summary, details } = T.catalog(c.services, c.generated_at_ms);
  T.fill("services", summary);
  T.fill("hosts", details);
}

T.start(render, 3000);

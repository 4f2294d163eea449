// Shared helpers of the Tidings dashboards, served at /ui/common.js by the registry, every
// agent and every proxy admin. API data reaches the page only as text (textContent, text
// nodes, dataset): service names and tags come from hosts and are not trusted.
"use strict";

const T = (() => {
  // el("td", {class: "num", data: {service: "web"}}, "text", childNode, [more, children])
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "data") {
        for (const [dk, dv] of Object.entries(v)) {
          if (dv !== undefined && dv !== null) e.dataset[dk] = String(dv);
        }
      } else if (k === "class") {
        e.className = v;
      } else {
        e.setAttribute(k, String(v));
      }
    }
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  // {ok, status, headers, body}: body is null when the answer is not JSON.
  async function getJson(path) {
    const r = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    return { ok: r.ok, status: r.status, headers: r.headers, body };
  }

  // getJson, but anything other than a 2xx JSON answer is an error.
  async function mustJson(path) {
    const r = await getJson(path);
    if (!r.ok || r.body === null) {
      const why = r.body && r.body.error ? `: ${r.body.error.message}` : "";
      throw new Error(`${path} answered HTTP ${r.status}${why}`);
    }
    return r;
  }

  // `columns`: header labels; a label ending in "#" is a numeric (right-aligned) column.
  function table(columns, rows, empty) {
    const head = el("tr", null, columns.map((c) => c.endsWith("#")
      ? el("th", { class: "num" }, c.slice(0, -1))
      : el("th", null, c)));
    const body = rows.length
      ? rows
      : [el("tr", { class: "empty" }, el("td", { colspan: columns.length }, empty || "none"))];
    return el("table", null, el("thead", null, head), el("tbody", null, body));
  }

  // Key/value rows, each <tr data-key=... data-value=...> so tools can read them back.
  function facts(items) {
    const rows = items.map(([key, label, value, cls]) =>
      el("tr", { data: { key, value } }, el("th", null, label), el("td", { class: cls }, value)));
    return el("table", { class: "facts" }, el("tbody", null, rows));
  }

  function age(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(ms) || ms < 0) return "—";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 90) return `${s.toFixed(1)} s`;
    if (s < 90 * 60) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind || ""}` }, text);
  }

  function hostPort(ip, port) {
    return ip.includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`;
  }

  // A v1 host's tags other than the ones shown in their own columns, as "k=v, k=v".
  const OWN_COLUMNS = new Set(["az", "load_balancing_weight", "canary"]);
  function otherTags(tags) {
    return Object.entries(tags || {})
      .filter(([k]) => !OWN_COLUMNS.has(k))
      .map(([k, v]) => `${k}=${v}`)
      .join(", ");
  }

  // The hosts table of one service in a v1-shaped catalog; ages against `nowMs`, the
  // answering component's clock, so a skewed browser clock does not distort them.
  function hostsTable(service, hosts, nowMs) {
    const rows = hosts.map((h) => {
      const endpoint = hostPort(h.ip_address, h.port);
      const tags = h.tags || {};
      const checkedIn = Date.parse(h.last_check_in);
      return el("tr", { data: { service, endpoint } },
        el("td", { class: "mono" }, endpoint),
        el("td", null, tags.az || ""),
        el("td", { class: "num" }, tags.load_balancing_weight ?? ""),
        el("td", null, tags.canary ? "yes" : ""),
        el("td", { class: "mono" }, h.revision || ""),
        el("td", null, otherTags(tags)),
        el("td", { class: "num" }, checkedIn > 0 ? age(nowMs - checkedIn) : "—"));
    });
    return table(["endpoint", "zone", "weight#", "canary", "revision", "tags", "check-in age#"], rows);
  }

  // Service summary rows and one hosts table per service, from {service: [v1 host]}.
  function catalog(services, nowMs) {
    const names = Object.keys(services || {}).sort();
    const summary = table(["service", "hosts#"], names.map((s) =>
      el("tr", { data: { service: s, hosts: services[s].length } },
        el("td", { class: "mono" }, s), el("td", { class: "num" }, services[s].length))),
    "no services");
    const details = names.map((s) => [el("h3", { class: "mono" }, s), hostsTable(s, services[s], nowMs)]);
    return { summary, details };
  }

  // Replaces the children of #id with `nodes` (nested arrays flattened, null skipped).
  function fill(id, ...nodes) {
    const n = document.getElementById(id);
    if (n) n.replaceChildren(...nodes.flat(Infinity).filter((x) => x !== null && x !== undefined));
  }

  // Renders now, then every `everyMs`. On failure the last good render stays on screen (fail
  // static, as the components themselves do) under a banner that says what failed;
  // body[data-loaded] is set after the first success, body[data-error] while failing.
  function start(render, everyMs) {
    const tick = async () => {
      try {
        await render();
        document.body.dataset.loaded = "1";
        delete document.body.dataset.error;
        fill("status", `updated ${new Date().toLocaleTimeString()}, every ${everyMs / 1000} s`);
        fill("error");
      } catch (e) {
        const msg = String((e && e.message) || e);
        document.body.dataset.error = msg;
        fill("error", `refresh failed: ${msg} — showing the last good data`);
      }
      setTimeout(tick, everyMs);
    };
    tick();
  }

  return { el, getJson, mustJson, table, facts, age, badge, hostPort, otherTags, hostsTable,
    catalog, fill, start };
})();

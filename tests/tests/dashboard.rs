//! The web dashboards in a real browser (docs/OPERATING.md#dashboards): `tidings demo` runs as a process,
//! headless Chromium (Debian's `chromium` package, which ops/test.sh installs) loads the
//! registry's, an agent's and the proxy admin's `/ui`, and what each page rendered — its
//! `data-*` rows, read back from the DOM Chromium dumps — must equal what the same
//! component's JSON API answers right after. Both sides may move between the two reads (check-
//! ins, health checks), so each comparison is retried until they agree, with a deadline.
//!
//! The demo SIGKILLs its registry 15 % into its run, after its hosts settle. It runs for 300 s
//! here, so the kill comes at least 45 s after the registry is up, and the registry page is
//! checked first, within 40 s: it is checked before the kill. The test then stops the demo
//! with SIGTERM and checks that it took every process it started with it.
//!
//! Without Chromium the test fails and says how to install it; it never passes silently.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use schema::agent_api::{AgentSelf, Members};
use serde_json::Value;
use tests::{Proc, http, poll};

const HOSTS: usize = 2;
/// Services every demo host runs (besides its agent's own `tidings-agent` endpoint).
const SERVICES: [&str; 2] = ["web", "api"];
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(45);

/// The running demo. Stopped with SIGTERM, on drop too, so even a failed assertion leaves
/// no process behind (a SIGKILLed demo could not stop its children).
struct Demo {
    proc: Proc,
    stopped: bool,
}

impl Demo {
    fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        self.proc.signal("TERM")?;
        self.proc.wait_exit(Duration::from_secs(30))?;
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

fn chromium() -> Result<PathBuf> {
    let path = std::env::var_os("TIDINGS_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    ensure!(
        path.exists(),
        "Chromium not found at {}: install Debian's package (apt-get install -y chromium; \
         ops/test.sh does) or point TIDINGS_CHROMIUM at a Chromium binary",
        path.display()
    );
    Ok(path)
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Kills Chromium's whole process group: it forks helpers (zygote, renderer) that must not
/// outlive the run.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Loads `url` in a fresh headless Chromium, lets its scripts run (5 s of virtual time: the
/// first render and a refresh or two) and returns the DOM as serialised HTML.
fn dump_dom(url: &str) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let mut child = Command::new(chromium()?)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start Chromium")?;
    let out = read_all(child.stdout.take().context("no stdout")?);
    let err = read_all(child.stderr.take().context("no stderr")?);
    let end = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= end {
            kill_group(&mut child);
            bail!("Chromium did not finish loading {url} within {CHROMIUM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill_group(&mut child);
    let dom = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    ensure!(
        status.success() && dom.contains("<body"),
        "Chromium failed on {url} ({status}); stderr:\n{err}"
    );
    Ok(dom)
}

type Attrs = BTreeMap<String, String>;

/// The page as rendered: `<body>`'s attributes and every table row's.
struct Dom {
    body: Attrs,
    rows: Vec<Attrs>,
}

impl Dom {
    fn parse(html: &str) -> Dom {
        let body = tags(html, "body").into_iter().next().unwrap_or_default();
        Dom {
            body,
            rows: tags(html, "tr"),
        }
    }

    /// Rows carrying every one of `keys` (data-* attribute names).
    fn rows_with<'a>(&'a self, keys: &'a [&str]) -> impl Iterator<Item = &'a Attrs> + 'a {
        self.rows
            .iter()
            .filter(move |r| keys.iter().all(|k| r.contains_key(*k)))
    }

    /// `data-value` of the key/value row `data-key="key"`.
    fn fact(&self, key: &str) -> Option<&str> {
        self.rows
            .iter()
            .find(|r| r.get("data-key").map(String::as_str) == Some(key))
            .and_then(|r| r.get("data-value"))
            .map(String::as_str)
    }

    /// Rendered at least once and the last refresh worked.
    fn check_loaded(&self, url: &str) -> Result<()> {
        if let Some(e) = self.body.get("data-error") {
            bail!("{url} shows a refresh error: {e}");
        }
        ensure!(
            self.body.get("data-loaded").map(String::as_str) == Some("1"),
            "{url} never finished rendering: body {:?}",
            self.body
        );
        Ok(())
    }
}

/// The attributes of every `<name ...>` start tag. Chromium serialises attribute values in
/// double quotes with `&`, `"`, `<` and `>` escaped, so a value never contains `"` or `>`.
fn tags(html: &str, name: &str) -> Vec<Attrs> {
    let open = format!("<{name}");
    let mut found = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        if !rest.starts_with([' ', '>', '\n', '\t']) {
            continue; // a longer tag name (`<track`, `<tbody>` for `<t...`)
        }
        let Some(end) = rest.find('>') else { break };
        found.push(attributes(&rest[..end]));
        rest = &rest[end..];
    }
    found
}

fn attributes(mut s: &str) -> Attrs {
    let mut out = Attrs::new();
    loop {
        s = s.trim_start();
        let name_end = s.find(['=', ' ']).unwrap_or(s.len());
        if name_end == 0 {
            return out;
        }
        let name = s[..name_end].to_string();
        s = &s[name_end..];
        if let Some(v) = s.strip_prefix("=\"") {
            let Some(close) = v.find('"') else {
                return out;
            };
            out.insert(name, unescape(&v[..close]));
            s = &v[close + 1..];
        } else {
            out.insert(name, String::new());
        }
    }
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

fn json(url: &str) -> Result<(Value, http::Response)> {
    let r = http::get(url)?;
    ensure!(r.status == 200, "{url}: HTTP {}", r.status);
    Ok((r.json()?, r))
}

fn endpoint(host: &Value) -> String {
    let ip = host["ip_address"].as_str().unwrap_or_default();
    let port = host["port"].as_u64().unwrap_or_default();
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `(service, endpoint)` of every host in a `/v2/catalog` answer.
fn catalog_endpoints(catalog: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (service, hosts) in catalog["services"].as_object().into_iter().flatten() {
        for h in hosts.as_array().into_iter().flatten() {
            out.insert((service.clone(), endpoint(h)));
        }
    }
    out
}

fn page_endpoints(dom: &Dom) -> BTreeSet<(String, String)> {
    dom.rows_with(&["data-service", "data-endpoint"])
        .map(|r| (r["data-service"].clone(), r["data-endpoint"].clone()))
        .collect()
}

/// Loads `url` and reads `page` from it, fetches `api`, until both give the same value and
/// `ready` accepts it; fails after `deadline` showing the last disagreement. Returns the
/// value and the DOM it was read from.
fn agree<T: PartialEq + std::fmt::Debug>(
    url: &str,
    deadline: Duration,
    page: impl Fn(&Dom) -> Result<T>,
    api: impl Fn() -> Result<T>,
    ready: impl Fn(&T) -> bool,
) -> Result<(T, String)> {
    let end = Instant::now() + deadline;
    let mut last = String::from("no attempt finished");
    for attempt in 1..=100 {
        if Instant::now() >= end {
            break;
        }
        let res = dump_dom(url).and_then(|html| {
            let dom = Dom::parse(&html);
            dom.check_loaded(url)?;
            let shown = page(&dom)?;
            let served = api()?;
            Ok((shown, served, html))
        });
        match res {
            Ok((shown, served, html)) if shown == served && ready(&shown) => {
                println!("{url}: page matches the API (attempt {attempt}): {shown:?}");
                return Ok((shown, html));
            }
            Ok((shown, served, _)) => {
                last = format!("page shows {shown:?}\n   API says {served:?}");
            }
            Err(e) => last = format!("{e:#}"),
        }
        println!("{url}: attempt {attempt}: not yet: {last}");
    }
    bail!("{url}: the page never matched its API within {deadline:?}; last: {last}")
}

#[derive(Debug, PartialEq)]
struct RegistryShown {
    endpoints: BTreeSet<(String, String)>,
    counts: BTreeMap<String, usize>,
    store: String,
    expected_renewals: String,
    preserving: bool,
}

fn registry_page(dom: &Dom) -> Result<RegistryShown> {
    let counts = dom
        .rows_with(&["data-service", "data-hosts"])
        .map(|r| Ok((r["data-service"].clone(), r["data-hosts"].parse()?)))
        .collect::<Result<_>>()?;
    Ok(RegistryShown {
        endpoints: page_endpoints(dom),
        counts,
        store: dom.fact("store").context("no store row")?.to_string(),
        expected_renewals: dom
            .fact("expected_renewals")
            .context("no expected_renewals row")?
            .to_string(),
        preserving: dom
            .fact("self_preservation")
            .context("no self_preservation row")?
            .starts_with("active"),
    })
}

fn registry_api(base: &str) -> Result<RegistryShown> {
    let (catalog, _) = json(&format!("{base}/v2/catalog"))?;
    let (status, _) = json(&format!("{base}/v1/ops/status"))?;
    let sp = &status["self_preservation"];
    Ok(RegistryShown {
        endpoints: catalog_endpoints(&catalog),
        counts: catalog["services"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(s, h)| (s.clone(), h.as_array().map_or(0, Vec::len)))
            .collect(),
        store: status["store"].as_str().unwrap_or_default().to_string(),
        expected_renewals: sp["expected_renewals"].to_string(),
        preserving: sp["active"] == true,
    })
}

/// Every demo service is there with one endpoint per host.
fn complete(endpoints: &BTreeSet<(String, String)>) -> bool {
    SERVICES
        .iter()
        .all(|s| endpoints.iter().filter(|(svc, _)| svc == s).count() == HOSTS)
}

#[derive(Debug, PartialEq)]
struct AgentShown {
    gossip_addr: String,
    members: BTreeSet<(String, String)>,
    local: BTreeSet<(String, String)>,
    endpoints: BTreeSet<(String, String)>,
}

fn agent_page(dom: &Dom) -> Result<AgentShown> {
    Ok(AgentShown {
        gossip_addr: dom.fact("gossip_addr").context("no gossip_addr")?.into(),
        members: dom
            .rows_with(&["data-member", "data-state"])
            .map(|r| (r["data-member"].clone(), r["data-state"].clone()))
            .collect(),
        local: dom
            .rows_with(&["data-local-service", "data-local-endpoint"])
            .map(|r| {
                let (s, e) = (&r["data-local-service"], &r["data-local-endpoint"]);
                (s.clone(), e.clone())
            })
            .collect(),
        endpoints: page_endpoints(dom),
    })
}

fn agent_api(base: &str) -> Result<AgentShown> {
    let me: AgentSelf = http::get(&format!("{base}/v1/agent/self"))?.parse()?;
    let members: Members = http::get(&format!("{base}/v1/agent/members"))?.parse()?;
    let (catalog, resp) = json(&format!("{base}/v2/catalog"))?;
    ensure!(
        resp.header(schema::wire::HEADER_SOURCE).is_some(),
        "no X-Tidings-Source"
    );
    Ok(AgentShown {
        gossip_addr: me.gossip_addr,
        members: members
            .members
            .into_iter()
            .map(|m| (m.addr, m.state.as_str().to_string()))
            .collect(),
        local: me
            .endpoints
            .into_iter()
            .map(|e| (e.service, e.addr))
            .collect(),
        endpoints: catalog_endpoints(&catalog),
    })
}

/// `(cluster, host, discovery, health, decision)` per proxy host, and readiness.
type ProxyShown = (BTreeSet<[String; 5]>, String);

fn proxy_page(dom: &Dom) -> Result<ProxyShown> {
    let keys = [
        "data-cluster",
        "data-host",
        "data-discovery",
        "data-health",
        "data-decision",
    ];
    let hosts = dom
        .rows_with(&keys)
        .map(|r| keys.map(|k| r[k].clone()))
        .collect();
    Ok((hosts, dom.fact("ready").context("no ready row")?.into()))
}

fn proxy_api(base: &str) -> Result<ProxyShown> {
    let (clusters, _) = json(&format!("{base}/clusters"))?;
    let ready = http::get(&format!("{base}/ready"))?;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut hosts = BTreeSet::new();
    for c in clusters["clusters"].as_array().into_iter().flatten() {
        for h in c["hosts"].as_array().into_iter().flatten() {
            hosts.insert([
                s(&c["name"]),
                s(&h["address"]),
                s(&h["discovery"]),
                s(&h["health"]),
                s(&h["decision"]),
            ]);
        }
    }
    Ok((hosts, ready.json()?["ready"].to_string()))
}

/// A tag a hostile or broken host could send: markup that would run if a page ever put API
/// data into `innerHTML`.
const HOSTILE_TAG: &str = r#"<img src=x onerror="document.title='pwned'">"#;

/// Checks in a host whose tag is [`HOSTILE_TAG`], as any host may.
fn check_in_hostile_host(registry: &str) -> Result<()> {
    let body = serde_json::json!({"endpoints": [{
        "service": "probe", "ip": "127.0.0.99", "port": 9,
        "tags": {"note": HOSTILE_TAG},
    }]});
    let r = http::request(
        "POST",
        &format!("{registry}/v2/checkin"),
        Some("application/json"),
        body.to_string().as_bytes(),
        Duration::from_secs(10),
    )?;
    ensure!(r.status == 200, "check-in: HTTP {}", r.status);
    Ok(())
}

#[test]
fn the_dom_reader_reads_rows_and_escaped_attributes() {
    let html = r#"<html><body data-loaded="1"><table><tbody><tr data-service="a&amp;b" data-endpoint="[::1]:80"><td>x</td></tr><tr><td></td></tr><track data-service="no"></tbody></table></body></html>"#;
    let dom = Dom::parse(html);
    assert_eq!(dom.body.get("data-loaded").map(String::as_str), Some("1"));
    assert_eq!(dom.rows.len(), 2, "{:?}", dom.rows);
    let e = page_endpoints(&dom);
    assert_eq!(
        e.into_iter().collect::<Vec<_>>(),
        vec![("a&b".to_string(), "[::1]:80".to_string())]
    );
    assert_eq!(
        attributes(r#" data-v="&lt;img src=&quot;x&quot;&gt;" hidden"#),
        Attrs::from([
            ("data-v".to_string(), "<img src=\"x\">".to_string()),
            ("hidden".to_string(), String::new()),
        ])
    );
    assert!(Dom::parse("<body>").check_loaded("u").is_err());
    assert!(
        Dom::parse(r#"<body data-loaded="1" data-error="x">"#)
            .check_loaded("u")
            .is_err()
    );
}

#[test]
fn each_dashboard_renders_what_its_api_serves() -> Result<()> {
    chromium()?;
    let hosts = HOSTS.to_string();
    let mut demo = Demo {
        stopped: false,
        proc: Proc::start(
            "demo",
            &[
                "demo",
                "--duration",
                "300s",
                "--hosts",
                &hosts,
                "--rate",
                "20",
                "--json",
            ],
            HOSTS + 3,
            Duration::from_secs(60),
        )?,
    };
    let registry = format!("http://{}", demo.proc.addr("demo registry")?);
    let agent = format!("http://{}", demo.proc.addr("agent-0 api")?);
    let admin = format!("http://{}", demo.proc.addr("proxy admin")?);

    // The registry first, well before the demo kills it (see the module docs).
    check_in_hostile_host(&registry)?;
    let probe = ("probe".to_string(), "127.0.0.99:9".to_string());
    let (shown, html) = agree(
        &format!("{registry}/ui"),
        Duration::from_secs(40),
        registry_page,
        || registry_api(&registry),
        |r| complete(&r.endpoints) && r.endpoints.contains(&probe),
    )?;
    assert_eq!(shown.store, "memory");
    assert_eq!(shown.counts.get("web"), Some(&HOSTS), "{shown:?}");
    // The hostile tag is shown as text: escaped in the DOM, never an element, never run.
    assert!(
        html.contains("note=&lt;img src=x onerror=\"document.title='pwned'\"&gt;"),
        "the tag is not shown as text: {html}"
    );
    assert_eq!(tags(&html, "img").len(), 0, "{html}");
    assert!(html.contains("<title>Tidings registry</title>"), "{html}");

    let (shown, _) = agree(
        &format!("{agent}/ui"),
        Duration::from_secs(60),
        agent_page,
        || agent_api(&agent),
        |a| {
            complete(&a.endpoints)
                && a.members.len() == HOSTS
                && a.members.iter().all(|(_, state)| state == "alive")
        },
    )?;
    assert!(
        shown
            .members
            .iter()
            .any(|(addr, _)| *addr == shown.gossip_addr),
        "the agent lists itself: {shown:?}"
    );
    assert_eq!(
        shown.local.len(),
        SERVICES.len() + 1,
        "web, api and its own: {shown:?}"
    );

    let ((shown, ready), _) = agree(
        &format!("{admin}/ui"),
        Duration::from_secs(60),
        proxy_page,
        || proxy_api(&admin),
        |(hosts, ready)| ready == "true" && hosts.len() == HOSTS * SERVICES.len(),
    )?;
    assert_eq!(ready, "true");
    assert!(
        shown.iter().all(|[_, _, _, health, _]| health == "healthy"),
        "{shown:?}"
    );

    // SIGTERM stops the demo and, with it, every process it started.
    demo.stop()?;
    for base in [&registry, &agent, &admin] {
        poll(
            &format!("{base} to stop answering"),
            Duration::from_secs(10),
            || http::get(&format!("{base}/live")).is_err().then_some(()),
        )?;
    }
    Ok(())
}

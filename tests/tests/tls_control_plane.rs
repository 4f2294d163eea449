//! TLS on the control plane with the real binary: a registry and an agent API serving HTTPS
//! with certificates from a throwaway CA (rcgen, in a temp dir), an agent syncing from the
//! registry, a cron `tidings checkin`, and a proxy watching the agent over HTTPS; the
//! registry's certificate renewed under a load of check-ins; and clients that do not trust it.
//!
//! Everything is on loopback: the registry on 127.0.0.1, the agent, backend and proxy on
//! addresses of their own (`loopback(120, host)`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use discovery::RegistryClient;
use rustls::pki_types::ServerName;
use schema::{Endpoint, ServiceName};
use tests::backend::{Backend, runtime};
use tests::fleet::{local_agent, loopback};
use tests::{Proc, START, poll, run};

/// A throwaway CA that issues server certificates into a directory.
struct Ca {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tidings test CA");
        let pem = params.self_signed(&key).expect("ca cert").pem();
        Ca { key, params, pem }
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).expect("write ca");
        path.to_path_buf()
    }

    /// Issues a certificate for `names` (IP literals become IP SANs) into `<dir>/<stem>.pem`
    /// and `<dir>/<stem>.key`, each renamed into place (the key first) as a renewal tool
    /// would. Returns the paths and the certificate's DER.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let params = rcgen::CertificateParams::new(names).expect("params");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        for (path, pem) in [(&key_path, key.serialize_pem()), (&cert_path, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, pem).expect("write");
            std::fs::rename(&tmp, path).expect("rename");
        }
        (cert_path, key_path, cert.der().to_vec())
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `tidings registry` on 127.0.0.1 serving HTTPS with `cert`/`key`.
fn tls_registry(cert: &Path, key: &Path) -> Result<(Proc, SocketAddr)> {
    let reg = Proc::start(
        "registry",
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--ttl",
            "30s",
            "--check-in-interval",
            "1s",
            "--tls-cert",
            &s(cert),
            "--tls-key",
            &s(key),
        ],
        1,
        START,
    )?;
    let addr = reg.addr("registry")?;
    Ok((reg, addr))
}

/// `tidings checkin` of `web` at `ip:port`; (exit code, stdout + stderr).
fn checkin(registry: &str, ca: Option<&Path>, ip: &str, port: u16) -> Result<(i32, String)> {
    let port = port.to_string();
    let mut args = vec![
        "checkin",
        "--registry",
        registry,
        "--service",
        "web",
        "--port",
        &port,
        "--ip",
        ip,
        "--no-splay",
    ];
    let ca = ca.map(s);
    if let Some(ca) = &ca {
        args.extend(["--ca-file", ca.as_str()]);
    }
    let (code, out, err) = run(&args, Duration::from_secs(30))?;
    Ok((code, format!("{out}{err}")))
}

#[test]
fn an_https_registry_agent_and_proxy_route_a_cron_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new();
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (agent_ip, backend_ip, proxy_ip) = (loopback(120, 1), loopback(120, 2), loopback(120, 3));
    let (reg_cert, reg_key, _) = ca.issue(dir.path(), "registry", &["127.0.0.1", "localhost"]);
    let (agent_cert, agent_key, _) = ca.issue(dir.path(), "agent", &[&agent_ip]);
    let (_reg, reg_addr) = tls_registry(&reg_cert, &reg_key)?;
    let reg_url = format!("https://127.0.0.1:{}", reg_addr.port());

    // The agent syncs from the registry over HTTPS (verified with the CA) and serves its
    // own API over HTTPS.
    let (ca_s, agent_cert_s, agent_key_s) = (s(&ca_file), s(&agent_cert), s(&agent_key));
    let agent_dir = dir.path().join("agent");
    let _agent = local_agent(
        "agent",
        &agent_ip,
        &agent_dir,
        &reg_url,
        &[
            "--ca-file",
            &ca_s,
            "--tls-cert",
            &agent_cert_s,
            "--tls-key",
            &agent_key_s,
        ],
    )?;

    // The backend, checked in by cron over HTTPS.
    let rt = runtime()?;
    let backend = rt.block_on(Backend::start(&backend_ip, "cron-host"))?;
    let (code, out) = checkin(&reg_url, Some(&ca_file), &backend_ip, backend.addr.port())?;
    assert_eq!(code, 0, "checkin over https: {out}");

    // The proxy watches the agent's API over HTTPS.
    let proxy_config = dir.path().join("proxy.toml");
    std::fs::write(
        &proxy_config,
        format!(
            r#"[admin]
address = "{proxy_ip}:0"

[[listeners]]
address = "{proxy_ip}:0"

[[routes]]
host = "web"
cluster = "web"

[[clusters]]
name = "web"
service = "web"
membership_url = "https://{agent_ip}:7701"
membership_ca_file = "{ca}"

[clusters.health_check]
interval = "300ms"
"#,
            ca = s(&ca_file)
        ),
    )?;
    let proxy = Proc::start("proxy", &["proxy", "--config", &s(&proxy_config)], 2, START)?;
    let admin = proxy.addr("admin")?.to_string();
    let want: BTreeSet<String> = [backend.addr.to_string()].into();
    poll("the proxy to route to the cron host", START, || {
        tests::proxy::all_routed(&admin, &want).ok()
    })
    .with_context(|| format!("proxy log:\n{}", proxy.log_text()))?;
    // An operator reads the agent's HTTPS API with the same CA file.
    let agent_url = format!("https://{agent_ip}:7701");
    let (code, out, err) = run(
        &["lookup", "web", "--agent", &agent_url, "--ca-file", &ca_s],
        Duration::from_secs(30),
    )?;
    assert_eq!(code, 0, "lookup over https: {out}{err}");
    assert!(out.contains(&backend.addr.ip().to_string()), "{out}");
    rt.block_on(backend.kill());
    Ok(())
}

/// The DER of the certificate a fresh TLS connection to `addr` is served.
async fn served_cert(addr: SocketAddr, ca_file: &Path) -> Result<Vec<u8>> {
    let roots = serve::tls::load_roots(ca_file)?;
    let config = serve::tls::client_config(roots)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let certs = conn.peer_certificates().context("no server certificate")?;
    Ok(certs.first().context("empty chain")?.to_vec())
}

/// Check-ins until `stop`: one client keeps its connection alive across requests, the other
/// opens a new connection each time. Returns (successes, failures).
async fn check_in_load(
    url: String,
    ca_file: PathBuf,
    fresh: bool,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> Vec<String> {
    let web = ServiceName::new("web").expect("name");
    let ep = Endpoint::new(
        web,
        "127.0.0.1".parse().expect("ip"),
        std::num::NonZeroU16::new(9000).expect("port"),
    );
    let client = |()| RegistryClient::with_ca(&url, None, Duration::from_secs(5), Some(&ca_file));
    let mut failures = Vec::new();
    let mut kept = match client(()) {
        Ok(c) => c,
        Err(e) => return vec![e.to_string()],
    };
    let end = Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        if fresh {
            match client(()) {
                Ok(c) => kept = c,
                Err(e) => failures.push(e.to_string()),
            }
        }
        match kept.check_in(std::slice::from_ref(&ep)).await {
            Ok(_) => {
                ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    failures
}

#[test]
fn a_renewed_registry_certificate_reaches_new_connections_without_failing_a_check_in() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let ca = Ca::new();
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (cert, key, first) = ca.issue(dir.path(), "registry", &["127.0.0.1"]);
    let (reg, addr) = tls_registry(&cert, &key)?;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let rt = runtime()?;
    assert_eq!(rt.block_on(served_cert(addr, &ca_file))?, first);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let loads: Vec<_> = [false, true]
        .into_iter()
        .map(|fresh| {
            rt.spawn(check_in_load(
                url.clone(),
                ca_file.clone(),
                fresh,
                stop.clone(),
                ok.clone(),
            ))
        })
        .collect();
    poll("check-ins under way", START, || {
        (ok.load(Ordering::SeqCst) >= 20).then_some(())
    })?;

    let (_, _, second) = ca.issue(dir.path(), "registry", &["127.0.0.1"]);
    assert_ne!(first, second);
    let before = ok.load(Ordering::SeqCst);
    poll(
        "new connections to get the renewed certificate",
        START,
        || {
            let served = rt.block_on(served_cert(addr, &ca_file)).ok()?;
            (served == second).then_some(())
        },
    )
    .with_context(|| format!("registry log:\n{}", reg.log_text()))?;
    // Check-ins go on across the swap, on the kept-alive connection and on new ones.
    let after_swap = ok.load(Ordering::SeqCst);
    poll("check-ins after the swap", START, || {
        (ok.load(Ordering::SeqCst) >= after_swap + 20).then_some(())
    })?;
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for load in loads {
        failures.extend(rt.block_on(load)?);
    }
    assert!(failures.is_empty(), "failed check-ins: {failures:?}");
    assert!(after_swap > before || ok.load(Ordering::SeqCst) > after_swap);
    assert!(
        reg.log_text().contains("TLS certificate reloaded"),
        "registry log:\n{}",
        reg.log_text()
    );
    Ok(())
}

#[test]
fn a_client_without_the_ca_gets_a_tls_error_and_checkin_exits_1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(dir.path(), "registry", &["127.0.0.1"]);
    let (_reg, addr) = tls_registry(&cert, &key)?;
    let url = format!("https://127.0.0.1:{}", addr.port());

    // A CA file, but not the one that signed the registry's certificate.
    let stranger = Ca::new().write(&dir.path().join("other-ca.pem"));
    let started = Instant::now();
    let (code, out) = checkin(&url, Some(&stranger), "127.0.0.1", 9000)?;
    assert_eq!(code, 1, "an untrusted certificate is not transient: {out}");
    assert!(
        out.contains("cannot verify the registry") && out.contains("certificate"),
        "{out}"
    );
    // Not retried: the same certificate fails the same way.
    assert!(started.elapsed() < Duration::from_secs(10), "{out}");

    // The right CA but a name the certificate does not carry.
    let (code, out) = checkin(
        &format!("https://localhost:{}", addr.port()),
        Some(&ca.write(&dir.path().join("ca.pem"))),
        "127.0.0.1",
        9000,
    )?;
    assert_eq!(code, 1, "a name mismatch: {out}");
    assert!(out.contains("cannot verify the registry"), "{out}");

    // An unreadable CA file is bad usage.
    let (code, out) = checkin(
        &url,
        Some(&dir.path().join("missing.pem")),
        "127.0.0.1",
        9000,
    )?;
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("missing.pem"), "{out}");
    Ok(())
}

#[test]
fn a_registry_with_a_secret_on_plain_http_warns_that_tokens_cross_in_clear() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123")?;
    let reg = Proc::start(
        "registry",
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            &s(&secret),
        ],
        1,
        START,
    )?;
    poll("the clear-text warning", START, || {
        reg.log_text().contains("in clear").then_some(())
    })?;
    // With TLS, no such warning.
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(dir.path(), "registry", &["127.0.0.1"]);
    let tls = Proc::start(
        "registry-tls",
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            &s(&secret),
            "--tls-cert",
            &s(&cert),
            "--tls-key",
            &s(&key),
        ],
        1,
        START,
    )?;
    let addr = tls.addr("registry")?;
    // Once it answers, its start-up logging is done.
    let rt = runtime()?;
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    rt.block_on(served_cert(addr, &ca_file))?;
    if tls.log_text().contains("in clear") {
        bail!("warned despite TLS:\n{}", tls.log_text());
    }
    Ok(())
}

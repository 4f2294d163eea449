//! The registry and the cron check-in as an operator runs them: real `tidings` processes on
//! loopback, driven through their command lines and HTTP.

use std::time::Duration;

use tests::{Proc, http, run};

const START: Duration = Duration::from_secs(20);

fn registry(extra: &[&str]) -> anyhow::Result<(Proc, String)> {
    let mut args = vec!["registry", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proc = Proc::start("registry", &args, 1, START)?;
    let url = format!("http://{}", proc.addr("registry")?);
    Ok((proc, url))
}

#[test]
fn cron_checkins_are_served_and_sigterm_drains() -> anyhow::Result<()> {
    let (mut reg, url) = registry(&[])?;
    let (code, out, err) = run(
        &[
            "checkin",
            "--registry",
            &url,
            "--service",
            "web",
            "--port",
            "8080",
            "--ip",
            "127.0.0.5",
            "--tag",
            "az=zone-a",
            "--no-splay",
        ],
        START,
    )?;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("checked in web at 127.0.0.5:8080"), "{out}");

    let listing = http::get(&format!("{url}/v1/registration/web"))?.json()?;
    assert_eq!(listing["service"], "web");
    assert_eq!(listing["hosts"][0]["ip_address"], "127.0.0.5");
    assert_eq!(listing["hosts"][0]["port"], 8080);
    assert_eq!(listing["hosts"][0]["tags"]["az"], "zone-a");

    // A second instance on the same ip, another port: two endpoints, not an overwrite.
    let (code, _, err) = run(
        &[
            "checkin",
            "--registry",
            &url,
            "--service",
            "web",
            "--port",
            "8081",
            "--ip",
            "127.0.0.5",
            "--no-splay",
        ],
        START,
    )?;
    assert_eq!(code, 0, "{err}");
    let listing = http::get(&format!("{url}/v1/registration/web"))?.json()?;
    assert_eq!(listing["hosts"].as_array().map(Vec::len), Some(2));

    reg.signal("TERM")?;
    let status = reg.wait_exit(Duration::from_secs(20))?;
    assert!(
        status.success(),
        "registry exited with {status}; log:\n{}",
        reg.log_text()
    );
    Ok(())
}

#[test]
fn checkin_exit_codes_say_what_to_do() -> anyhow::Result<()> {
    // Bad usage: exit 64 with a one-line reason, no request made.
    let (code, _, err) = run(
        &[
            "checkin",
            "--registry",
            "http://127.0.0.1:9",
            "--service",
            "Bad Name",
            "--port",
            "80",
            "--ip",
            "127.0.0.1",
            "--no-splay",
        ],
        START,
    )?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("invalid service name"), "{err}");
    let (code, _, err) = run(
        &[
            "checkin",
            "--registry",
            "http://127.0.0.1:9",
            "--service",
            "web",
            "--port",
            "0",
            "--ip",
            "127.0.0.1",
            "--no-splay",
        ],
        START,
    )?;
    assert_eq!(code, 64, "{err}");

    // Nothing listening: transient, exit 2 after brief retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (code, _, err) = run(
        &[
            "checkin",
            "--registry",
            &format!("http://{closed}"),
            "--service",
            "web",
            "--port",
            "80",
            "--ip",
            "127.0.0.1",
            "--no-splay",
            "--timeout",
            "1s",
        ],
        START,
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unavailable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    Ok(())
}

#[test]
fn tokens_guard_writes_when_a_secret_is_set() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a-test-secret-of-enough-length\n")?;
    let secret = secret.to_string_lossy().into_owned();
    let (_reg, url) = registry(&["--secret-file", &secret])?;

    let checkin = |token: Option<&str>, ip: &str| -> anyhow::Result<(i32, String)> {
        let mut args = vec![
            "checkin",
            "--registry",
            &url,
            "--service",
            "api",
            "--port",
            "9000",
            "--ip",
            ip,
            "--no-splay",
        ];
        let token_path = dir.path().join(format!("token-{ip}"));
        let token_path = token_path.to_string_lossy().into_owned();
        if let Some(t) = token {
            std::fs::write(&token_path, t)?;
            args.extend_from_slice(&["--token-file", &token_path]);
        }
        let (code, _, err) = run(&args, START)?;
        Ok((code, err))
    };
    let (code, err) = checkin(None, "127.0.0.7")?;
    assert_eq!(code, 1, "no token is refused, not retried: {err}");

    let (code, host_token, err) = run(
        &[
            "registry",
            "token",
            "--secret-file",
            &secret,
            "--ip",
            "127.0.0.7",
        ],
        START,
    )?;
    assert_eq!(code, 0, "{err}");
    let (code, err) = checkin(Some(host_token.trim()), "127.0.0.7")?;
    assert_eq!(code, 0, "own ip with its host token: {err}");
    let (code, err) = checkin(Some(host_token.trim()), "127.0.0.8")?;
    assert_eq!(code, 1, "another ip with that host token: {err}");

    let (_, operator, _) = run(
        &["registry", "token", "--secret-file", &secret, "--operator"],
        START,
    )?;
    let (code, err) = checkin(Some(operator.trim()), "127.0.0.8")?;
    assert_eq!(code, 0, "the operator token writes anything: {err}");

    let listing = http::get(&format!("{url}/v1/registration/api"))?.json()?;
    assert_eq!(
        listing["hosts"].as_array().map(Vec::len),
        Some(2),
        "reads stay open"
    );
    Ok(())
}

#[test]
fn registry_starts_from_a_toml_config_and_refuses_a_bad_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:0\"\n[registry]\nttl = \"30s\"\ncheck_in_interval = \"10s\"\nenv = \"staging\"\n",
    )?;
    let proc = Proc::start(
        "registry",
        &["registry", "--config", &good.to_string_lossy()],
        1,
        START,
    )?;
    let url = format!("http://{}", proc.addr("registry")?);
    assert_eq!(http::get(&format!("{url}/ready"))?.status, 200);
    assert_eq!(
        http::get(&format!("{url}/v1/registration/none"))?.json()?["env"],
        "staging"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[registry]\nttl = \"10s\"\ncheck_in_interval = \"60s\"\n",
    )?;
    let (code, _, err) = run(&["registry", "--config", &bad.to_string_lossy()], START)?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("ttl"), "{err}");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[registry]\nttl_seconds = 10\n")?;
    let (code, _, err) = run(&["registry", "--config", &typo.to_string_lossy()], START)?;
    assert_eq!(code, 64, "{err}");
    Ok(())
}

//! The deployment files in ops/deploy/ are exercised, not just shipped: the systemd units
//! pass `systemd-analyze verify`, and the binary speaks the `Type=notify` protocol they rely
//! on (READY=1, WATCHDOG=1, STOPPING=1) over a real notify socket.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tests::{Proc, tidings_bin};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy")
}

#[test]
fn systemd_units_verify_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = std::fs::canonicalize(tidings_bin())
        .context("build the binary first (ops/test.sh does)")?;
    let mut checked = 0;
    for entry in std::fs::read_dir(deploy_dir().join("systemd"))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for key in [
            "Type=notify",
            "WatchdogSec=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "DynamicUser=yes",
        ] {
            assert!(text.contains(key), "{} lacks {key}", path.display());
        }
        // Point ExecStart at the binary under test so verify can check it is executable.
        let unit = dir.path().join(path.file_name().context("name")?);
        std::fs::write(
            &unit,
            text.replace("/usr/local/bin/tidings", &bin.to_string_lossy()),
        )?;
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .context("systemd-analyze (package systemd)")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&*unit.to_string_lossy()))
            .collect();
        assert!(
            out.status.success() && complaints.is_empty(),
            "{}: {stderr}",
            path.display()
        );
        checked += 1;
    }
    assert_eq!(checked, 3, "registry, agent and proxy units");
    Ok(())
}

fn recv_until(sock: &UnixDatagram, want: &str, deadline: Duration) -> Result<String> {
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))?;
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == want) {
                return Ok(msg);
            }
            seen.push(msg);
        }
    }
    bail!("no {want} within {deadline:?}; got {seen:?}")
}

#[test]
fn registry_speaks_the_notify_protocol() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    let path = path.to_string_lossy().into_owned();
    let mut reg = Proc::start_env(
        "registry",
        &["registry", "--listen", "127.0.0.1:0"],
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "200000"),
        ],
        1,
        Duration::from_secs(20),
    )?;
    let ready = recv_until(&sock, "READY=1", Duration::from_secs(10))?;
    assert!(ready.contains("STATUS=serving on 127.0.0.1:"), "{ready}");
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(5))?;
    reg.signal("TERM")?;
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10))?;
    assert!(reg.wait_exit(Duration::from_secs(20))?.success());
    Ok(())
}

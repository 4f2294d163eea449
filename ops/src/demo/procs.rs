//! Child `tidings` processes for the demo: started from this same executable with JSON logs,
//! their bound addresses learned from their "listening" log lines, killed on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub struct Proc {
    pub name: String,
    child: Child,
    pub addrs: HashMap<String, SocketAddr>,
}

impl Proc {
    /// Starts `tidings <args>`, copies its log to `log_path`, and waits until it has logged
    /// `listeners` addresses.
    pub async fn start(
        name: &str,
        args: &[String],
        listeners: usize,
        log_path: PathBuf,
    ) -> Result<Proc> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut child = Command::new(exe)
            .args(["--log-format", "json", "--log-level", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut log = tokio::fs::File::create(&log_path).await.ok();
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(found) = listening(&line) {
                    let _ = tx.send(found);
                }
                if let Some(f) = log.as_mut() {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        let mut addrs = HashMap::new();
        while addrs.len() < listeners {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some((msg, addr))) => {
                    addrs.insert(msg, addr);
                }
                _ => bail!("{name} did not start (see its log)"),
            }
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            addrs,
        })
    }

    pub fn addr(&self, what: &str) -> Result<SocketAddr> {
        self.addrs
            .iter()
            .find(|(m, _)| m.contains(what))
            .map(|(_, a)| *a)
            .with_context(|| format!("{} reported no {what} address", self.name))
    }

    /// SIGKILL: the crash the demo is about (no deregistration, no goodbye).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

fn listening(line: &str) -> Option<(String, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let msg = v.get("message")?.as_str()?;
    if !msg.contains("listening") {
        return None;
    }
    Some((msg.to_string(), v.get("addr")?.as_str()?.parse().ok()?))
}

//! Harness for the end-to-end tests: start the real `tidings` binary as a child process,
//! learn the addresses it bound from its JSON log, signal it, and poll for conditions with
//! deadlines (never sleep-and-hope).
//!
//! The binary is `$TIDINGS_BIN` or `target/debug/tidings` (ops/test.sh builds it first).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a process may take to start, or a condition to come true, in these tests.
pub const START: Duration = Duration::from_secs(20);

/// Path of the binary under test.
pub fn tidings_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TIDINGS_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target").join("debug").join("tidings")
}

/// A running `tidings` process. Killed (SIGKILL) on drop if still running.
pub struct Proc {
    child: Child,
    name: String,
    /// Every `... listening` log line's message → the `addr` it carried.
    pub addrs: HashMap<String, SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `tidings <args>` with JSON logs and waits until it has logged `expect_listeners`
    /// "listening" lines (or fails after `deadline`, showing its log).
    pub fn start(
        name: &str,
        args: &[&str],
        expect_listeners: usize,
        deadline: Duration,
    ) -> Result<Proc> {
        Proc::start_env(name, args, &[], expect_listeners, deadline)
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_env(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        expect_listeners: usize,
        deadline: Duration,
    ) -> Result<Proc> {
        Proc::launch(None, name, args, env, expect_listeners, deadline)
    }

    /// [`Proc::start`] inside the network namespace `netns` (`ip netns exec`, which execs
    /// the binary in place: the child's pid is the `tidings` process itself, so
    /// [`Proc::signal`] reaches it).
    pub fn start_in(
        netns: &str,
        name: &str,
        args: &[&str],
        expect_listeners: usize,
        deadline: Duration,
    ) -> Result<Proc> {
        Proc::launch(Some(netns), name, args, &[], expect_listeners, deadline)
    }

    /// [`Proc::start_in`] with extra environment variables (`None`: the test's own namespace).
    pub fn start_in_env(
        netns: Option<&str>,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        expect_listeners: usize,
        deadline: Duration,
    ) -> Result<Proc> {
        Proc::launch(netns, name, args, env, expect_listeners, deadline)
    }

    /// Whether the process has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    fn launch(
        netns: Option<&str>,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        expect_listeners: usize,
        deadline: Duration,
    ) -> Result<Proc> {
        let bin = tidings_bin();
        // TIDINGS_TEST_LOG sets every started process's log filter (EnvFilter syntax), to
        // replay a failing seed with more detail; the evidence logs keep it.
        let filter = std::env::var("TIDINGS_TEST_LOG").unwrap_or_else(|_| "info".to_string());
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            // Agents serve DNS on a port of their own (the default port is one per host).
            .env("TIDINGS_DNS", "127.0.0.1:0")
            .envs(env.iter().copied())
            .args(["--log-format", "json", "--log-level", &filter])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (run ops/test.sh or cargo build --bin tidings)",
                    bin.display()
                )
            })?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<(String, SocketAddr)>();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if let Some(found) = listening(&line) {
                    let _ = tx.send(found);
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let mut proc = Proc {
            child,
            name: name.to_string(),
            addrs: HashMap::new(),
            log,
        };
        let end = Instant::now() + deadline;
        while proc.addrs.len() < expect_listeners {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((msg, addr)) => {
                    proc.addrs.insert(msg, addr);
                }
                Err(_) => bail!(
                    "{name} did not report {expect_listeners} listeners in time; log:\n{}",
                    proc.log_text()
                ),
            }
        }
        Ok(proc)
    }

    /// The one address whose log message contains `what` (e.g. "registry").
    pub fn addr(&self, what: &str) -> Result<SocketAddr> {
        self.addrs
            .iter()
            .find(|(m, _)| m.contains(what))
            .map(|(_, a)| *a)
            .with_context(|| {
                format!(
                    "{} logged no {what:?} listener: {:?}",
                    self.name, self.addrs
                )
            })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -{sig} {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits for exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= end {
                bail!(
                    "{} still running after {deadline:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening(line: &str) -> Option<(String, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let msg = v.get("message")?.as_str()?;
    if !msg.contains("listening") {
        return None;
    }
    let addr = v.get("addr")?.as_str()?.parse().ok()?;
    Some((msg.to_string(), addr))
}

/// Polls `cond` every 20 ms until it returns `Some`, or fails after `deadline`.
pub fn poll<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `tidings <args>` to completion and returns (exit code, stdout, stderr).
pub fn run(args: &[&str], deadline: Duration) -> Result<(i32, String, String)> {
    let mut child = Command::new(tidings_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let end = Instant::now() + deadline;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            bail!("tidings {args:?} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub mod backend;
pub mod campaign;
pub mod echo;
pub mod fleet;
pub mod hammer;
pub mod http;
pub mod netns;
pub mod proxy;
pub mod python;
pub mod traffic;

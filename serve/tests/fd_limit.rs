//! A real server process under a low open-file limit, flooded with half-open connections.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{HALF_HEAD, live_within};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const FILE_LIMIT: &str = "--nofile=256:256";

/// The probe under `prlimit`, its address, and its log lines as they come.
struct Probe {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Probe {
    async fn start(max_connections: usize) -> Probe {
        let mut child = Command::new("prlimit")
            .args([FILE_LIMIT, "--", env!("CARGO_BIN_EXE_serve-probe")])
            .arg(max_connections.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("prlimit (util-linux) runs the probe");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("probe starts")
            .expect("read")
            .expect("a line");
        let addr = first
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("log").push(line);
            }
        });
        Probe { child, addr, log }
    }

    fn log_lines(&self, needle: &str) -> usize {
        let log = self.log.lock().expect("log");
        log.iter().filter(|l| l.contains(needle)).count()
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "probe exited: {status}; log: {:?}",
                self.log.lock().expect("log")
            );
        }
    }

    /// Closes stdin (the probe's stop signal) and waits for a clean exit.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("probe stops when stdin closes")
            .expect("wait");
        assert!(status.success(), "probe exit status {status}");
    }
}

/// The attackers' sockets live in this process: make sure it may open them.
fn ensure_own_file_limit(needed: u64) {
    if serve::open_files_limit().is_none_or(|l| l >= needed) {
        return;
    }
    let pid = std::process::id().to_string();
    // Raise the soft limit to the hard one (allowed without privileges).
    let _ = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=:"])
        .status();
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        })
        .unwrap_or_default();
    let _ = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status();
    let now = serve::open_files_limit();
    assert!(
        now.is_none_or(|l| l >= needed),
        "this test needs {needed} open files in the test process; the limit is {now:?}"
    );
}

/// Opens `n` connections that each send half a request head, and keeps them.
async fn half_open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        // A connect or write that fails (the server reset us) is part of the game.
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(HALF_HEAD).await;
            held.push(s);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_256_files_answers_live_through_1100_half_open_connections() {
    ensure_own_file_limit(1400);
    let mut probe = Probe::start(200).await;
    let addr = probe.addr;
    let flood = tokio::spawn(half_open(addr, 1100));
    // While the flood arrives, and after, /live is answered within a second.
    let mut answered = 0;
    while !flood.is_finished() || answered < 20 {
        live_within(addr, Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("/live after {answered} answers: {e}"));
        answered += 1;
        probe.assert_alive();
    }
    let held = flood.await.expect("flood");
    assert!(
        held.len() >= 1000,
        "only {} attackers connected",
        held.len()
    );
    live_within(addr, Duration::from_secs(1))
        .await
        .expect("/live with the flood held open");
    probe.assert_alive();
    // The cap kept the process below its file limit: accepting never failed.
    assert_eq!(probe.log_lines("accept failed"), 0, "{:?}", probe.log);
    // 200 connections + a margin do not fit in 256 files: the operator was warned.
    assert_eq!(probe.log_lines("open-file limit"), 1, "{:?}", probe.log);
    drop(held);
    probe.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_files_does_not_stop_the_accept_loop() {
    ensure_own_file_limit(1000);
    // A cap above the file limit: a misconfiguration, so accepting runs out of files.
    let mut probe = Probe::start(1000).await;
    let addr = probe.addr;
    let t0 = Instant::now();
    let held = half_open(addr, 400).await;
    // Wait (bounded) for the server to hit the limit and say so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe.log_lines("accept failed") == 0 {
        assert!(
            Instant::now() < deadline,
            "no accept error: {:?}",
            probe.log
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    probe.assert_alive();
    // Once the flood lets go, the same loop accepts again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match live_within(addr, Duration::from_secs(1)).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
    }
    probe.assert_alive();
    // Logged at most about once a second, not once per failed accept.
    let logged = probe.log_lines("accept failed");
    let secs = t0.elapsed().as_secs() as usize;
    assert!(
        logged <= secs + 2,
        "{logged} accept-failure lines in {secs}s"
    );
    probe.stop().await;
}

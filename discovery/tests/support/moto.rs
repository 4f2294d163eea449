//! Test harness: a real `moto_server` (a DynamoDB-compatible server) on an ephemeral loopback
//! port, killed when the handle drops (docs/ARCHITECTURE.md#stores).
//!
//! The binary is `$TIDINGS_MOTO_SERVER`, else `<workspace>/.venv/bin/moto_server` (what
//! `ops/test.sh` installs from `ops/moto-requirements.txt`). A missing binary fails the test:
//! CI must never pass by silently skipping the DynamoDB tests.

#![allow(dead_code)] // each test binary uses its own subset

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use discovery::DynamoConfig;

/// How often test stores read the table's stream: short, so tests wait little.
pub const STREAM_POLL: Duration = Duration::from_millis(200);

/// How long moto may take to start answering (a cold Python import on a loaded machine).
const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Moto {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Moto {
    /// Starts moto on a free port. Retries with a new port if another process took the one
    /// we picked between probing and moto binding it.
    pub fn start() -> Moto {
        let bin = binary();
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut moto = Moto {
                bin: bin.clone(),
                port,
                child: None,
                log: log_path(port),
            };
            match moto.spawn() {
                Ok(()) => return moto,
                Err(e) => last_error = e,
            }
        }
        panic!("moto_server did not start: {last_error}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A store config for `table` on this server, with a 180 s TTL and the stream read every
    /// [`STREAM_POLL`].
    pub fn config(&self, table: &str) -> DynamoConfig {
        DynamoConfig {
            table: table.to_string(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_string()),
            ttl: Duration::from_secs(180),
            stream_poll: STREAM_POLL,
        }
    }

    /// SIGKILLs the server (no graceful close: connections just die, as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port. moto keeps its data in memory, so the
    /// tables are gone: callers run `init_table` again.
    pub fn restart(&mut self) {
        self.kill();
        // The old socket may linger for a moment after the kill; werkzeug binds with
        // SO_REUSEADDR, so a few tries within the deadline are enough.
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("moto_server did not restart on {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log =
            File::create(&self.log).map_err(|e| format!("creating {}: {e}", self.log.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            // To a file, not a pipe: moto logs every request, and a pipe nobody drains would
            // eventually block it.
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls until moto answers its own API, the process exits, or the deadline passes.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "moto_server exited with {status}; log:\n{}",
                        self.log_text()
                    ));
                }
            }
            if answers(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "moto_server not answering after {START_DEADLINE:?}; log:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn binary() -> PathBuf {
    let bin = match std::env::var_os("TIDINGS_MOTO_SERVER") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server"),
    };
    assert!(
        bin.is_file(),
        "moto_server not found at {}. The DynamoDB tests need it; install it with\n  \
         python3 -m venv .venv && .venv/bin/pip install -r ops/moto-requirements.txt\n\
         from the workspace root, or point TIDINGS_MOTO_SERVER at a moto_server binary.",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn log_path(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("tidings-moto-{}-{port}.log", std::process::id()))
}

/// Whether moto (not just anything) answers on `port`: a 200 from its `/moto-api/` page.
fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head.ends_with(b"200")
}

//! Python helpers the tests drive as processes: grpcio's own xDS client and a gRPC test
//! server (`tests/py/xds_grpc.py`). The interpreter is `$TIDINGS_PYTHON`, else the
//! workspace's `.venv/bin/python` that ops/test.sh fills from ops/moto-requirements.txt.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::poll;

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TIDINGS_PYTHON") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join(".venv").join("bin").join("python")
}

/// Path of a script under `tests/py`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(name)
}

/// A running Python process whose stdout lines are kept. Killed on drop.
pub struct Py {
    child: Child,
    /// Held open: a `serve` process stops when it closes.
    _stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Py {
    /// Runs `script args` with `env`; fails at once if grpcio cannot be imported.
    pub fn start(script_name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Py> {
        let py = python();
        let ok = Command::new(&py)
            .args(["-c", "import grpc"])
            .status()
            .with_context(|| format!("cannot run {}", py.display()))?;
        ensure!(
            ok.success(),
            "{} cannot import grpc: run ops/test.sh (it installs ops/moto-requirements.txt into .venv) or set TIDINGS_PYTHON",
            py.display()
        );
        let mut child = Command::new(&py)
            .arg(script(script_name))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {script_name}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        Ok(Py {
            child,
            _stdin: stdin,
            lines,
        })
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many lines it has printed.
    pub fn count(&self) -> usize {
        self.lines.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Waits until it has printed `n` lines.
    pub fn wait_lines(&self, n: usize, deadline: Duration) -> Result<()> {
        poll(&format!("{n} lines of output"), deadline, || {
            (self.count() >= n).then_some(())
        })
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

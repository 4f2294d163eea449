//! Logs as machines read them: a `tidings` process whose stderr is a pipe (journald, a file,
//! a log shipper) writes plain text, with no terminal colour codes in it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{Context, Result};
use tests::{START, tidings_bin};

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() -> Result<()> {
    let mut child = Command::new(tidings_bin())
        .args(["--log-format", "text", "--log-level", "info"])
        .args(["registry", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start tidings (cargo build --bin tidings)")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr)
            .lines()
            .map_while(std::io::Result::ok)
        {
            let done = line.contains("listening");
            if tx.send(line).is_err() || done {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let outcome = loop {
        match rx.recv_timeout(START) {
            Ok(line) => {
                let done = line.contains("listening");
                seen.push(line);
                if done {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome.with_context(|| format!("no listening line within {START:?}: {seen:?}"))?;
    for line in &seen {
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in a piped log line: {line:?}"
        );
    }
    assert!(seen.iter().any(|l| l.contains("INFO")), "{seen:?}");
    Ok(())
}

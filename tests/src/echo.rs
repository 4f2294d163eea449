//! A TCP backend for the proxy's TCP listeners: on connect it greets with its name and a
//! newline (as Redis, MySQL or SMTP servers speak first), then echoes every byte until the
//! client half-closes, then closes. Killing it closes the listener and every connection, as
//! if its process died.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub struct EchoBackend {
    pub name: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Binds `ip` on a free port and serves until [`EchoBackend::kill`]; call it on the
    /// runtime that should run it.
    pub async fn start(ip: &str, name: &str) -> Result<EchoBackend> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let greeting = format!("{name}\n").into_bytes();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task closes them with the listener.
            let mut conns = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let greeting = greeting.clone();
                conns.spawn(async move {
                    let (mut r, mut w) = stream.split();
                    if w.write_all(&greeting).await.is_ok() {
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(EchoBackend {
            name: name.to_string(),
            addr,
            task,
        })
    }

    /// Closes the listener and every open connection, and waits until they are closed.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// What one connection through a TCP proxy to echo backends gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echoed {
    /// The greeting: the backend's name.
    pub backend: String,
    /// Everything after the greeting.
    pub echo: Vec<u8>,
}

/// Connects to `addr`, sends `msg`, half-closes and reads until the other side closes,
/// within `within`.
pub async fn exchange(addr: SocketAddr, msg: &[u8], within: Duration) -> Result<Echoed> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        anyhow::Ok(got)
    };
    let got = tokio::time::timeout(within, io)
        .await
        .context("no close in time")??;
    split(got)
}

/// Splits a connection's bytes into the greeting and the rest.
pub fn split(got: Vec<u8>) -> Result<Echoed> {
    let Some(nl) = got.iter().position(|&b| b == b'\n') else {
        bail!("no greeting in {:?}", String::from_utf8_lossy(&got));
    };
    Ok(Echoed {
        backend: String::from_utf8_lossy(&got[..nl]).into_owned(),
        echo: got[nl + 1..].to_vec(),
    })
}

/// Reads the greeting of a connection just made; the connection stays open.
pub async fn greeting(s: &mut TcpStream, within: Duration) -> Result<String> {
    let mut line = Vec::new();
    let read = async {
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b).await? == 0 {
                bail!("closed before the greeting ended: {line:?}");
            }
            if b[0] == b'\n' {
                return Ok(());
            }
            line.push(b[0]);
        }
    };
    tokio::time::timeout(within, read)
        .await
        .context("no greeting in time")??;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

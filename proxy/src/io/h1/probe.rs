//! Active HTTP health checks on the fast path's plain connections: one request, the head
//! parsed, a small body read to its end so the connection can carry the next check. A host
//! checked every few seconds then holds an idle socket between checks and no buffers (hyper's
//! client kept a connection task with its buffers per host, about 20 KB: 20 MB at a thousand
//! hosts).

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;

use super::chunked::Chunked;
use super::exchange::{HeadError, response_head};
use super::head::Framing;
use crate::io::upstream::{HostConns, RawConn, Upstream};

/// Bodies of check responses longer than this are not read to the end; the connection is
/// closed instead.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// Sends `request` to `addr` over the host's idle check connection or a new one; the status,
/// or `None` when no valid response came.
pub async fn health_check(
    upstream: &Upstream,
    conns: &HostConns,
    addr: SocketAddr,
    request: &[u8],
) -> Option<u16> {
    if let Some(mut conn) = upstream.pop_raw(conns) {
        match exchange(&mut conn, request).await {
            Ok((status, reusable)) => {
                if reusable {
                    upstream.release_raw(conns, conn);
                }
                return Some(status);
            }
            // Closed while idle: check on a new connection.
            Err(HeadError::Nothing) => {}
            Err(HeadError::Bad(_)) => return None,
        }
    }
    let mut conn = upstream.connect_raw(addr).await.ok()?;
    let (status, reusable) = exchange(&mut conn, request).await.ok()?;
    if reusable {
        upstream.release_raw(conns, conn);
    }
    Some(status)
}

/// One check on `conn`: the status, and whether the response ended cleanly within
/// [`MAX_CHECK_BODY`] so the connection can be reused.
async fn exchange(conn: &mut RawConn, request: &[u8]) -> Result<(u16, bool), HeadError> {
    let (mut up, mut fields) = (Vec::new(), Vec::new());
    let head = response_head(conn, request, &mut up, &mut fields, false).await?;
    up.drain(..head.len);
    let done = match head.framing {
        Framing::Empty => up.is_empty(),
        Framing::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            while up.len() < n && n <= MAX_CHECK_BODY {
                if !matches!(conn.stream.read_buf(&mut up).await, Ok(1..)) {
                    break;
                }
            }
            up.len() == n
        }
        Framing::Chunked => {
            let mut chunks = Chunked::default();
            let mut seen = 0;
            loop {
                match chunks.scan(&up[seen..]) {
                    Ok((used, true)) => break seen + used == up.len(),
                    Ok((used, false)) if up.len() < MAX_CHECK_BODY => {
                        seen += used;
                        if !matches!(conn.stream.read_buf(&mut up).await, Ok(1..)) {
                            break false;
                        }
                    }
                    _ => break false,
                }
            }
        }
        Framing::UntilClose => false,
    };
    Ok((head.status, done && !head.close))
}

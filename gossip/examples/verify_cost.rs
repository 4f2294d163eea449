//! CPU cost of checking a full repair under signed gossip: 10 000 signed rows of 1 000
//! owners (10 endpoints each, one certificate and one row-set signature each) applied to an
//! empty store, as a node joining with `--gossip-signing require` takes them. Pass `rows`
//! to leave the row-set signatures out (one signature per row, as before them).
//!
//!     cargo run --release -p gossip --example verify_cost

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Instant;

use gossip::broadcast::Store;
use gossip::repair::{self, Proofs};
use gossip::sign::{CertBody, Certificate, SigningKey, SigningMode, Trust, sign_row, sign_row_set};
use gossip::{Row, RowStatus, Version};
use schema::{Endpoint, ServiceName};

const NOW: u64 = 1_780_000_000_000;
const OWNERS: u32 = 1_000;
const ROWS_PER_OWNER: u16 = 10;

fn main() {
    let registry = SigningKey::generate();
    let service = ServiceName::new("web").unwrap_or_else(|e| panic!("{e}"));
    let (mut rows, mut proofs) = (Vec::new(), Proofs::default());
    for o in 0..OWNERS {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + o));
        let owner = SocketAddr::new(ip, 7702);
        let key = SigningKey::generate();
        let body = CertBody {
            owner_key: key.public(),
            ip,
            services: None,
            not_before_ms: NOW - 1,
            not_after_ms: NOW + 3_600_000,
        };
        let cert = Certificate::issue(&registry, body).unwrap_or_else(|| panic!("issue"));
        proofs.certs.push((owner, cert));
        for p in 1..=ROWS_PER_OWNER {
            let port = NonZeroU16::new(8000 + p).unwrap_or(NonZeroU16::MIN);
            let ep = Endpoint::new(service.clone(), ip, port);
            let v = Version {
                epoch: NOW,
                seq: u64::from(p),
            };
            let row = Row::new(owner, ep.key(), RowStatus::Up(ep.into()), v);
            proofs.sigs.push(sign_row(&key, &row));
            rows.push(row);
        }
        // The owner's signature of all its rows, as a node that holds it sends it.
        let own = &rows[rows.len() - usize::from(ROWS_PER_OWNER)..];
        let set = sign_row_set(&key, owner, own).unwrap_or_else(|| panic!("sign set"));
        proofs.row_sets.push((owner, set));
    }
    let mut store = Store {
        now_ms: NOW,
        trust: Trust {
            registry: Some(registry.public()),
            mode: SigningMode::Require,
            grace_ms: 0,
        },
        ..Store::default()
    };
    if std::env::args().nth(1).as_deref() == Some("rows") {
        proofs.row_sets.clear();
    }
    let n = rows.len();
    let t = Instant::now();
    repair::apply_certs(&mut store, &proofs);
    let applied = repair::apply(&mut store, rows[0].owner, rows, Vec::new(), &proofs);
    let took = t.elapsed();
    println!(
        "verified and applied {applied} of {n} rows ({OWNERS} owners, {OWNERS} certificates) in {:.1} ms ({:.1} µs per row)",
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / n as f64
    );
}

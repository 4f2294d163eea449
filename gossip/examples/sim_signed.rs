//! The deterministic simulator with signed gossip (`require`) on every node, beside the
//! same run unsigned:
//!
//!     cargo run --release -p gossip --example sim_signed -- 1000
//!
//! (`tidings gossip simulate` runs unsigned; this is the signed counterpart, without
//! building the whole binary.)

use gossip::{SimConfig, simulate};

fn main() {
    let nodes = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    for sign in [false, true] {
        let cfg = SimConfig {
            nodes,
            seed: 1,
            sign,
            ..SimConfig::default()
        };
        println!("### {nodes} nodes, signed: {sign}\n{}", simulate(cfg));
    }
}

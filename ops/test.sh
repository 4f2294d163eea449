#!/usr/bin/env bash
# The README's test command, and exactly what CI runs (.ci/run calls it).
# On a fresh machine it installs what the tests need, then runs formatting, clippy
# (-D warnings) and every test of the workspace. Safe to run again: installs are skipped
# when already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE=1
step() { printf '\n==> %s\n' "$*"; }

step "Rust components (rustfmt, clippy)"
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then rustup component add "$c"; fi
done

# Debian packages the tests use: systemd-analyze (the unit files in ops/deploy/systemd are
# verified), iproute2 (network namespaces, veths and a bridge for the chaos tests), nftables
# (their partitions and packet loss: this kernel has no netem qdisc) and chromium (headless,
# loads the dashboards in tests/tests/dashboard.rs).
step "Debian packages (systemd, iproute2, nftables, chromium, bind9-dnsutils, dnsmasq-base)"
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# tests/tests/dns.rs queries the agent's DNS with dig and through dnsmasq.
command -v dig >/dev/null || missing+=(bind9-dnsutils)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# moto_server is a real DynamoDB-compatible server; discovery's DynamoDB tests start it on
# an ephemeral loopback port. grpcio is the xDS tests' gRPC client. Pinned in
# ops/moto-requirements.txt, installed in ./.venv.
step "Python venv with moto_server and grpcio (pinned in ops/moto-requirements.txt)"
if [ -f ops/moto-requirements.txt ]; then
  want="$(sha256sum ops/moto-requirements.txt | cut -d' ' -f1)"
  have="$(cat .venv/.requirements.sha 2>/dev/null || true)"
  if [ ! -x .venv/bin/moto_server ] || [ "$want" != "$have" ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r ops/moto-requirements.txt
    echo "$want" > .venv/.requirements.sha
  fi
  export TIDINGS_MOTO_SERVER="$root/.venv/bin/moto_server"
  "$TIDINGS_MOTO_SERVER" --help >/dev/null
  # grpcio (same file): the xDS tests' proxyless gRPC client.
  export TIDINGS_PYTHON="$root/.venv/bin/python"
  "$TIDINGS_PYTHON" -c "import grpc"
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# End-to-end tests in tests/ start the real binary; build it first so they find it.
step "build the tidings binary"
cargo build --locked --bin tidings

step "cargo test"
cargo test --workspace --locked

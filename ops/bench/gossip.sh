#!/usr/bin/env bash
# Gossip at scale, in the deterministic simulator (virtual time, seeded, no sockets):
#
#   ops/bench/gossip.sh [nodes]      (default 1000)
#
# Runs `tidings gossip simulate` (release build) at 100 and N nodes with 0 % and 10 % UDP
# loss, N nodes with 25 % loss, and N nodes with a 20 s partition that heals, printing rounds
# to 99.99 % dissemination, dead-owner hiding time, false "down" verdicts (and identity
# renewals), the indirect probes loss drove nodes to, and steady-state bytes per node.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
n="${1:-1000}"
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"
run() { echo "### tidings gossip simulate $*"; timeout 900 "$bin" --log-level warn gossip simulate "$@"; echo; }
run --nodes 100 --seed 1
run --nodes "$n" --seed 1
run --nodes 100 --loss 0.1 --seed 1
run --nodes "$n" --loss 0.1 --seed 1
run --nodes "$n" --loss 0.25 --seed 1
run --nodes "$n" --partition 20s --seed 1
# Registry snapshots at fleet size (#15): 100 000 endpoints held in 1 000 service snapshots,
# 10 endpoint changes/s for 30 s, each agent fetching each change itself 20-1000 ms after it
# (1 % of nodes cannot reach the registry). At 1 000 nodes this takes about half an hour.
run --nodes "${REGISTRY_NODES:-100}" --seed 1 --registry-services 1000 --registry-hosts 100 --registry-churn 10 --registry-churn-for 30s

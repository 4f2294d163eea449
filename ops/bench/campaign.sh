#!/usr/bin/env bash
# The long fault campaign: random seeds, one after another, for at least the given time:
#
#   sudo -E ops/bench/campaign.sh [minutes=30] [seconds-per-seed=120]
#
# Each seed draws a schedule of faults (registry kills, stops and empty restarts; agent
# restarts with and without their disk cache; backend kills; deregistrations and churn;
# clock steps; gossip loss and partitions) and runs it against real processes in network
# namespaces while the invariants are checked (tests/src/campaign). Needs root, `ip`, `nft`
# and moto_server (TIDINGS_MOTO_SERVER, default .venv/bin/moto_server) for DynamoDB seeds.
# Prints each seed's faults, checks and violations, then a summary; a failing seed replays
# with TIDINGS_CAMPAIGN_SEEDS=<seed> TIDINGS_CAMPAIGN_SECS=<same> cargo test -p tests --test campaign.
# Exit status: 1 if any seed found a violation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
minutes="${1:-30}"
secs="${2:-120}"
if [[ -z "${TIDINGS_BIN:-}" ]]; then
  cargo build --quiet --bin tidings
  export TIDINGS_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/tidings"
fi
export TIDINGS_MOTO_SERVER="${TIDINGS_MOTO_SERVER:-$root/.venv/bin/moto_server}"
# The campaign engine itself: built here, or a frozen copy given as TIDINGS_CAMPAIGN_TEST_BIN
# (so a long run is not rebuilt halfway by edits to the tree).
if [[ -z "${TIDINGS_CAMPAIGN_TEST_BIN:-}" ]]; then
  TIDINGS_CAMPAIGN_TEST_BIN="$(cargo test --quiet -p tests --test campaign --no-run --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)"
fi
[[ -x "$TIDINGS_CAMPAIGN_TEST_BIN" ]] || { echo "no campaign test binary" >&2; exit 2; }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
end=$(( $(date +%s) + minutes * 60 ))
# Bounded: at most one seed per 20 s of the budget.
max_seeds=$(( minutes * 3 + 1 ))
failed=()
ran=0
for _ in $(seq "$max_seeds"); do
  [[ $(date +%s) -lt $end ]] || break
  seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  echo "=== seed $seed ($secs s)"
  if TIDINGS_CAMPAIGN_SEEDS="$seed" TIDINGS_CAMPAIGN_SECS="$secs" \
    timeout $(( secs * 3 + 300 )) "$TIDINGS_CAMPAIGN_TEST_BIN" campaign --exact --nocapture \
    >"$log" 2>&1; then
    :
  else
    failed+=("$seed")
  fi
  ran=$(( ran + 1 ))
  # The schedule, the per-seed summary and every violation; not the backtrace.
  grep -E '^(campaign |  t=|  VIOLATION|  ENGINE|  cron |[0-9]+ violations|replay)' "$log" || tail -30 "$log"
done
echo
echo "=== $ran seeds of $secs s each; ${#failed[@]} found violations: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]

#!/usr/bin/env bash
# Size of the registry's whole catalog (`GET /v2/catalog`) for 100 services x 100 hosts, as
# identity, gzip and zstd, and a check that curl's own decoding (`--compressed`) gives back the
# identity catalog.
#
#   ops/bench/catalog.sh          (TIDINGS_BIN=... to use a built binary)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

filled_registry

for enc in identity gzip zstd; do
  curl -sS -o /dev/null -H "accept-encoding: $enc" \
    -w "$enc: %{size_download} bytes (content-encoding: %header{content-encoding})\n" "$reg/v2/catalog"
done
curl -sS "$reg/v2/catalog" >"$work/plain.json"
curl -sS --compressed -D "$work/headers" "$reg/v2/catalog" >"$work/decoded.json"
python3 - "$work/plain.json" "$work/decoded.json" "$work/headers" <<'PY'
import json, sys
plain, decoded = (json.load(open(p)) for p in sys.argv[1:3])
encoding = [l for l in open(sys.argv[3]) if l.lower().startswith("content-encoding")]
same = plain["services"] == decoded["services"]
hosts = sum(len(h) for h in plain["services"].values())
print(f"curl --compressed: {''.join(encoding).strip() or 'identity'}, same catalog: {same} ({hosts} hosts)")
sys.exit(0 if same else 1)
PY

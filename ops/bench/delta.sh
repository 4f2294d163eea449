#!/usr/bin/env bash
# Bytes an agent receives for one single-endpoint change at 100 services x 100 hosts: the whole
# catalog (as agents synced before deltas) against the delta from the index it held
# (`GET /v2/catalog?delta=true&index=I`), identity and gzip, headers included. Loopback only.
#
#   ops/bench/delta.sh          (TIDINGS_BIN=... to use a built binary)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=ops/bench/common.sh
source "$root/ops/bench/common.sh"

filled_registry

# index_of: the index of the registry's catalog now (a delta-mode whole answer).
index_of() { curl -sS "$reg/v2/catalog?delta=true" | python3 -c 'import json,sys; print(json.load(sys.stdin)["index"])'; }

# measure WHAT INDEX: what an agent at INDEX receives now, whole and as a delta.
measure() {
  local what="$1" index="$2"
  for enc in identity gzip; do
    curl -sS -o /dev/null -H "accept-encoding: $enc" \
      -w "$what, whole catalog, $enc: %{size_download} body + %{size_header} header bytes\n" \
      "$reg/v2/catalog?index=$index"
    curl -sS -o "$work/delta.json" -H "accept-encoding: $enc" \
      -w "$what, delta, $enc: %{size_download} body + %{size_header} header bytes\n" \
      "$reg/v2/catalog?delta=true&index=$index"
  done
  python3 - "$work/delta.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert not d["full"], "expected a delta, got the whole catalog"
ups = sum(len(h) for h in d["services"].values())
gone = sum(len(k) for k in d.get("removed", {}).values())
print(f"  (delta: {ups} upserted, {gone} removed, {len(d.get('removed_services', []))} services gone)")
PY
}

# 1. A new endpoint checks in.
i="$(index_of)"
curl -sS -o /dev/null -X POST "$reg/v1/registration/svc-042" \
  -d ip=10.200.0.1 -d port=8080 -d revision=abc123 -d 'tags={"az":"zone-a","region":"local","instance_id":"i-1"}'
measure "new endpoint" "$i"

# 2. An endpoint deploys a new revision.
i="$(index_of)"
curl -sS -o /dev/null -X POST "$reg/v1/registration/svc-007" \
  -d ip=10.0.0.7 -d port=8080 -d revision=def456 -d 'tags={"az":"zone-a","region":"local","instance_id":"i-1"}'
measure "new revision" "$i"

# 3. An endpoint deregisters.
i="$(index_of)"
curl -sS -o /dev/null -X DELETE "$reg/v1/registration/svc-042/10.200.0.1?port=8080"
measure "deregistration" "$i"

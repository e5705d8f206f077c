#!/usr/bin/env bash
# What a rolling upgrade costs a cluster under load (UPGRADING.md): three
# runs on a fresh 3-node cluster (R=2) each, the same open-loop load
# (`quill-harness load`, SMTP deliveries and POP3 sessions at --rate), and
# a Raft-write prober (IMAP CREATE + DELETE of a folder, which go through
# the Raft leader, every 100 ms on the nodes in turn):
#
#   baseline   no upgrade
#   0.1.0->new release 0.1.0's nodes replaced by this build's, node by
#              node (0.1.0 has no step-down: the leader is just stopped)
#   new->new   this build's nodes restarted node by node (step-down first)
#
# It prints per run: deliveries/s over the whole load and its lowest
# second while `upgrade` ran, errors by kind, what verify found, how long
# each node was away, and the longest Raft write the prober saw.
#
#   bash bench/upgrade.sh                      # builds release 0.1.0 if needed
#   QUILL_OLD=/path/to/0.1.0/quill RATE=200 DURATION=60 bash bench/upgrade.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RATE=${RATE:-150}
DURATION=${DURATION:-60}
START_AT=${START_AT:-15}   # seconds into the load when the upgrade starts
WORK=${WORK:-/tmp/quill-bench-upgrade}
SUBNET=${SUBNET:-127.77.1}
PY=${PY:-python3}
[ -n "${QUILL_NEW:-}" ] || { cargo build --release --bins -q; QUILL_NEW=$ROOT/target/release/quill; }
HARNESS=$(dirname "$QUILL_NEW")/quill-harness
QUILL_OLD=${QUILL_OLD:-$(bash "$ROOT/tests/fixtures/old-release.sh")}
H() { "$HARNESS" "$@"; }

# prober DIR SECONDS OUT: Raft writes through IMAP, on the nodes in turn.
prober() {
  "$PY" - "$1" "$2" "$3" "$SUBNET" <<'PY'
import imaplib, json, sys, time
dirname, secs, out, subnet = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
pw = json.load(open(dirname + "/harness.json"))["password"]
lat, failed, down, ended, i = [], 0, 0, 0, 0
end = time.time() + secs
while time.time() < end:
    host = f"{subnet}.{1 + i % 3}"
    i += 1
    try:
        c = imaplib.IMAP4(host, 2143, timeout=15)
        c.login("alice@example.org", pw)
    except Exception:
        down += 1          # the node being replaced: not a Raft write
        time.sleep(0.1)
        continue
    t = time.time()
    try:
        ok = c.create(f"probe{i}")[0] == "OK" and c.delete(f"probe{i}")[0] == "OK"
        lat.append(time.time() - t)
        failed += 0 if ok else 1      # a NO: the write was refused
        c.logout()
    except (imaplib.IMAP4.abort, OSError):
        ended += 1         # BYE or a closed connection: its node stopped
    time.sleep(0.1)
lat.sort()
json.dump({"writes": len(lat), "failed": failed, "node_down": down, "ended": ended,
           "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
           "max_ms": 1000 * lat[-1] if lat else None}, open(out, "w"))
PY
}

# run NAME FROM TO: FROM's cluster, the load, TO's upgrade at START_AT
# (no upgrade if TO is empty).
run() {
  local name=$1 from=$2 to=$3 dir=$WORK/$1
  rm -rf "$dir"
  H up --dir "$dir" --nodes 3 --subnet "$SUBNET" --password bench --binary "$from" --detach >/dev/null
  trap 'H down --dir "$dir" >/dev/null 2>&1 || true' RETURN
  # The load's users first (argon2 per user), so that the load is steady.
  H load --dir "$dir" --duration 2s --users 50 --connections 2 --out "$dir/warm" --quiet >/dev/null
  prober "$dir" "$DURATION" "$dir/prober.json" &
  local probe=$!
  H load --dir "$dir" --duration "${DURATION}s" --rate "$RATE" --connections 64 --users 50 \
    --out "$dir/load" --quiet >"$dir/load.txt" &
  local load=$!
  local up_start="" up_end=""
  if [ -n "$to" ]; then
    sleep "$START_AT"
    up_start=$START_AT
    local t0=$SECONDS
    H upgrade --dir "$dir" --to "$to" | tee "$dir/upgrade.txt" | grep -E '^n[0-9]:' | sed "s/^/  [$name] /"
    up_end=$((START_AT + SECONDS - t0))
  fi
  wait "$load"
  wait "$probe"
  H verify --dir "$dir" --out "$dir/load" | grep -o 'lost [0-9]*.*' | sed "s/^/  [$name] verify: /"
  "$PY" - "$dir" "$name" "${up_start:-}" "${up_end:-}" <<'PY'
import json, sys
d, name, s, e = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
load = json.load(open(d + "/load/load.json"))
p = json.load(open(d + "/prober.json"))
secs = load["seconds"][1:-1]
rate = sum(x["deliveries"] for x in secs) / max(1, len(secs))
line = f"  [{name}] deliveries/s {rate:.0f} (p99 {load['delivery_p99_ms']:.0f} ms)"
if s:
    win = [x["deliveries"] for x in secs if int(s) <= x["t"] <= int(e)]
    line += f"; during the upgrade ({s}-{e} s) mean {sum(win)/max(1,len(win)):.0f}, lowest second {min(win) if win else '-'}"
print(line)
kinds = {}
for x in load["seconds"]:
    for k, v in x["errors"].items():
        kinds[k] = kinds.get(k, 0) + v
print(f"  [{name}] operations failed: {load['errors']} {json.dumps(kinds, sort_keys=True)}")
print(f"  [{name}] raft writes (IMAP CREATE+DELETE): {p['writes']}, failed {p['failed']}, "
      f"p50 {p['p50_ms']:.0f} ms, longest {p['max_ms']:.0f} ms; sessions a stopping node ended: {p['ended']}, "
      f"logins refused by a node being replaced: {p['node_down']}")
PY
}

mkdir -p "$WORK"
echo "rate $RATE ops/s, $DURATION s, upgrade at ${START_AT} s; old: $QUILL_OLD ($("$QUILL_OLD" --version)), new: $QUILL_NEW ($("$QUILL_NEW" --version))"
run baseline "$QUILL_NEW" ""
run old-to-new "$QUILL_OLD" "$QUILL_NEW"
run new-to-new "$QUILL_NEW" "$QUILL_NEW"

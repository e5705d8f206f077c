#!/usr/bin/env bash
# IMAP beside Dovecot's, in one run, with the same Python clients:
# UID FETCH 1:* (BODY.PEEK[]) messages/s (../shared/bench/baseline/
# retrieve_load.py --proto imap), STORE operations/s (bench/imap_store.py,
# one message per UID STORE, then again with CONDSTORE enabled) and APPEND
# messages/s (bench/imap_append.py),
# on one Quill node, on a 3-node Quill cluster (R=2, every client on node 1,
# which fetches from the replicas), and on Dovecot 2.3 (maildir, fsync on,
# argon2id passwords like Quill's: PASS_SCHEME=ARGON2ID, then again with
# PLAIN passwords, whose logins cost nothing, like Quill's warm ones).
#
#   bash bench/imap_compare.sh            # N=20000 messages to fetch
#   N=5000 bash bench/imap_compare.sh
#   SKIP_BASELINE=1 bash bench/imap_compare.sh
#   QUILL=/tmp/before/quill SKIP_BASELINE=1 bash bench/imap_compare.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
BASE=$SHARED/bench/baseline
WORK=${WORK:-/tmp/quill-imap-compare}
N=${N:-20000}
CONC=${CONC:-16}
SIZE=${SIZE:-4096}
PER=${PER:-200}   # APPENDs per session, 16 sessions
STORES=${STORES:-400}   # STOREs per session, 16 sessions
PY=${PY:-python3}
TOKEN=imap-compare

log() { printf '[imap-compare %s] %s\n' "$(date +%T)" "$*" >&2; }
cd "$ROOT"
# QUILL=/path/to/quill measures another build (e.g. before and after a
# change, back to back); by default this tree's, built now.
if [ -z "${QUILL:-}" ]; then
  cargo build --release --bins -q
  QUILL=$ROOT/target/release/quill
fi
mkdir -p "$WORK"
PIDS=()
# shellcheck source=nodes.sh
. "$ROOT/bench/nodes.sh"
cleanup() {
  stop_nodes
  [ "${SKIP_BASELINE:-0}" = 1 ] || WORK=$WORK/baseline bash "$BASE/run.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

# node K on 127.0.1.K: LMTP 12624 IMAP 12643 (admin 12680, cluster 12674)
node_flags() { FLAGS=(--lmtp "$1:12624" --imap "$1:12643" --default-login-domain example.com); }
bench_imap() {  # host lmtp_port imap_port label
  "$PY" "$BASE/lmtp_load.py" --host "$1" --port "$2" -n "$N" -c "$CONC" --size "$SIZE" --users 100 --label "$4 fill (LMTP)"
  "$PY" "$BASE/retrieve_load.py" --proto imap --host "$1" --port "$3" --users 100 -c "$CONC" --label "$4 UID FETCH BODY.PEEK[] (first logins)"
  "$PY" "$BASE/retrieve_load.py" --proto imap --host "$1" --port "$3" --users 100 -c "$CONC" --label "$4 UID FETCH BODY.PEEK[]"
  "$PY" "$ROOT/bench/imap_store.py" --host "$1" --port "$3" --users 16 -c 16 --per "$STORES" --label "$4 STORE"
  CONDSTORE=1 "$PY" "$ROOT/bench/imap_store.py" --host "$1" --port "$3" --users 16 -c 16 --per "$STORES" --label "$4 STORE (CONDSTORE)"
  "$PY" "$ROOT/bench/imap_append.py" --host "$1" --port "$3" --users 16 -c 16 --per "$PER" --size "$SIZE" --label "$4 APPEND"
}

start_one
bench_imap 127.0.1.1 12624 12643 "quill 1 node"
cleanup

start_three
bench_imap 127.0.1.1 12624 12643 "quill 3 nodes R=2"
cleanup

[ "${SKIP_BASELINE:-0}" = 1 ] && exit 0
BW=$WORK/baseline
WORK=$BW bash "$BASE/run.sh" install >&2
WORK=$BW PASS_SCHEME=ARGON2ID bash "$BASE/run.sh" configure >&2
WORK=$BW bash "$BASE/run.sh" start >&2
bench_imap 127.0.0.1 24024 11143 "dovecot"
# Again with plain-text passwords in Dovecot's passdb: its logins then cost
# next to nothing, like Quill's after the first (Quill keeps a keyed hash of
# each verified password): the FETCH figures compare the servers, not argon2.
WORK=$BW bash "$BASE/run.sh" stop >&2
WORK=$BW PASS_SCHEME=PLAIN bash "$BASE/run.sh" configure >&2
WORK=$BW bash "$BASE/run.sh" start >&2
bench_imap 127.0.0.1 24024 11143 "dovecot (PLAIN passwords)"

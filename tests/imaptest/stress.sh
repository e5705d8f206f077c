#!/usr/bin/env bash
# imaptest's stress run against a 3-node cluster (R=2), its clients spread
# over the nodes by a round-robin host name, with state tracking, and with
# `checkpoint=N` when given: every N seconds the clients of each mailbox
# stop, CHECK, and imaptest compares their views (flags, keywords, \Recent
# counts, UIDs). Prints imaptest's totals and its errors; exits 1 on any.
#
#   bash tests/imaptest/stress.sh [SECS] [imaptest options...]
#   bash tests/imaptest/stress.sh 120 clients=20 checkpoint=10
#
# imaptest at 5827950 aborts on its own assertions in checkpoint mode
# (against Dovecot too): checkpoint.patch, applied to a copy built under
# target/imaptest-stress, fixes its bookkeeping (see the patch). Needs
# root for the host name (three lines in /etc/hosts, removed at the end),
# the quill binary (QUILL, default target/debug/quill) and what
# ../shared/tools/imaptest/build.sh needs. Nodes on 127.0.79.1-3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SECS=${1:-60}
shift || true
QUILL=${QUILL:-$ROOT/target/debug/quill}
BUILD=${IMAPTEST_BUILD:-}
for d in ../shared/tools/imaptest shared/tools/imaptest; do
  [ -z "$BUILD" ] && [ -f "$d/build.sh" ] && BUILD=$d/build.sh
done
[ -n "$BUILD" ] || { echo "no imaptest build script (../shared/tools/imaptest/build.sh)" >&2; exit 2; }
OUT=$ROOT/target/imaptest-stress
IT=$OUT/imaptest/src/imaptest
if [ ! -x "$IT" ] || [ ! -f "$OUT/patched" ]; then
  rm -rf "$OUT"
  bash "$BUILD" "$OUT" >/dev/null
  (cd "$OUT/imaptest" && patch -p1 <"$ROOT/tests/imaptest/checkpoint.patch" >/dev/null && make -j2 >>build.log 2>&1)
  touch "$OUT/patched"
fi
WORK=$(mktemp -d /tmp/quill-imaptest.XXXXXX)
NAME=quill-imaptest-rr
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  sed -i "/ $NAME\$/d" /etc/hosts
  rm -rf "$WORK"
}
trap cleanup EXIT
start() { # k [flags]
  local k=$1; shift
  "$QUILL" node --data "$WORK/n$k" --cluster-addr "127.0.79.$k:7400" --imap "127.0.79.$k:2143" \
    --smtp "127.0.79.$k:2525" --admin "127.0.79.$k:8080" --admin-token tok --replicas 2 \
    --log warn "$@" >"$WORK/n$k.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do curl -sf "http://127.0.79.$k:8080/health" >/dev/null && return 0; sleep 0.1; done
  echo "node $k did not start: $(tail -3 "$WORK/n$k.log")" >&2; exit 1
}
start 1
for _ in $(seq 1 100); do [ -s "$WORK/n1/join-token" ] && break; sleep 0.1; done
for k in 2 3; do start "$k" --seed 127.0.79.1:7400 --join-token "$(cat "$WORK/n1/join-token")"; done
admin() { "$QUILL" admin --node 127.0.79.1:8080 --token tok "$@"; }
admin domain add example.org >/dev/null
USERS=20
for i in $(seq 1 $USERS); do echo pw-stress-1 | admin user add "u$i@example.org" --password-file - >/dev/null; done
# The directory reaches every node through Raft: wait for the last user.
for k in 1 2 3; do
  for _ in $(seq 1 100); do
    python3 -c "import imaplib; c=imaplib.IMAP4('127.0.79.$k',2143); c.login('u$USERS@example.org','pw-stress-1')" \
      2>/dev/null && break
    sleep 0.2
  done
done
printf '127.0.79.%s %s\n' 1 "$NAME" 2 "$NAME" 3 "$NAME" >>/etc/hosts
MBOX=$WORK/stress.mbox
python3 - "$MBOX" <<'PY'
import random, sys
random.seed(1)
with open(sys.argv[1], "w") as f:
    for i in range(200):
        f.write(f"From s{i}@example.net Mon Dec  7 08:00:00 2026\n")
        f.write(f"From: Sender {i} <s{i}@example.net>\nTo: u@example.org\n"
                f"Subject: stress {i}\nMessage-ID: <stress{i}@example.net>\n\n")
        for j in range(random.randint(1, 30)):
            f.write(f"line {j} of message {i}\n")
        f.write("\n")
PY
set +e
LD_LIBRARY_PATH=/usr/lib/dovecot timeout $((SECS + 120)) "$IT" host=$NAME port=2143 'user=u%d@example.org' \
  users=$USERS pass=pw-stress-1 secs="$SECS" mbox="$MBOX" "$@" >"$WORK/out.txt" 2>&1
rc=$?
set -e
tail -4 "$WORK/out.txt"
errors=$(grep -ciE "error|panic|assert" "$WORK/out.txt" || true)
grep -iE "error|panic|assert" "$WORK/out.txt" | sed 's/client [0-9]*/client N/' | cut -c1-160 | sort | uniq -c | sort -rn | head -20 || true
echo "imaptest exit $rc, $errors error lines"
[ "$rc" -eq 0 ] && [ "$errors" -eq 0 ]

#!/usr/bin/env bash
# Quill beside Dovecot/Postfix, in one session, with the same load generators
# (../shared/bench/baseline: lmtp_load.py, retrieve_load.py, smtp-source).
#
#   bash bench/side-by-side.sh            # N=20000 messages per run
#   N=5000 bash bench/side-by-side.sh     # shorter
#   SKIP_BASELINE=1 bash bench/side-by-side.sh
#
# Quill: one node on 127.0.0.1 (ports 12625 SMTP, 12624 LMTP, 12610 POP3,
# 12680 admin), release build, fsync on (always), users user0001..user0100 /
# passNNNN in example.com like the baseline. Results go to $WORK/quill.txt.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
BASE=$SHARED/bench/baseline
WORK=${WORK:-/tmp/quill-side-by-side}
N=${N:-20000}
CONC=${CONC:-16}
SIZE=${SIZE:-4096}
PY=${PY:-python3}
H=127.0.0.1
SMTP=12625 LMTP=12624 POP3=12610 ADMIN=12680 CLUSTER=12674
TOKEN=side-by-side

log() { printf '[side-by-side %s] %s\n' "$(date +%T)" "$*" >&2; }
now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN{d=b-a; printf "secs=%.2f msgs_per_sec=%.1f", d, n/d}'; }

cd "$ROOT"
cargo build --release --bins -q
QUILL=$ROOT/target/release/quill
mkdir -p "$WORK"
RESULTS=$WORK/quill.txt
: > "$RESULTS"
result() { echo "$*" | tee -a "$RESULTS"; }

start_quill() {
  rm -rf "$WORK/quill-data"
  "$QUILL" node --data "$WORK/quill-data" --cluster-addr $H:$CLUSTER --smtp $H:$SMTP --lmtp $H:$LMTP \
    --pop3 $H:$POP3 --admin $H:$ADMIN --admin-token $TOKEN --default-login-domain example.com \
    --replicas 1 --log warn </dev/null >"$WORK/quill.log" 2>&1 &
  QPID=$!
  for _ in $(seq 1 100); do curl -sf "http://$H:$ADMIN/health" >/dev/null && break; sleep 0.1; done
  A="$QUILL admin --node $H:$ADMIN --token $TOKEN"
  $A domain add example.com >/dev/null
  for i in $(seq 1 100); do printf 'user%04d@example.com pass%04d\n' "$i" "$i"; done |
    xargs -P 2 -n 2 sh -c "$A"' user add "$0" --password "$1" >/dev/null'
}
stop_quill() { kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; }
trap stop_quill EXIT
stored() { curl -s "http://$H:$ADMIN/metrics" | awk '$1=="quill_store_entries"{print $2}'; }

start_quill
log "quill node pid $QPID up with 100 users"
result "$("$PY" "$BASE/lmtp_load.py" --port $LMTP -n "$N" -c "$CONC" --size "$SIZE" --users 100 \
  --label 'Q1 LMTP->quill, python, random users, persistent sessions')"
[ "$(stored)" = "$N" ] || { log "Q1: expected $N stored, found $(stored)"; exit 1; }
result "$("$PY" "$BASE/retrieve_load.py" --proto pop3 --port $POP3 --users 100 -c "$CONC" \
  --label 'Q2 POP3 RETR+DELE from quill, python poplib (first logins: argon2id)')"
[ "$(stored)" = 0 ] || { log "Q2: $(stored) left"; exit 1; }
result "$("$PY" "$BASE/lmtp_load.py" --proto smtp --port $SMTP -n "$N" -c "$CONC" --size "$SIZE" --users 100 \
  --label 'Q3 SMTP->quill, python, random users, persistent sessions')"
result "$("$PY" "$BASE/retrieve_load.py" --proto pop3 --port $POP3 --users 100 -c "$CONC" \
  --label 'Q4 POP3 RETR+DELE from quill, python poplib (auth cache warm)')"
t0=$(now); smtp-source -s "$CONC" -m "$N" -l 4700 -c -f loadgen@example.net -t user0001@example.com $H:$SMTP >/dev/null; t1=$(now)
result "Q5 SMTP->quill, smtp-source -s $CONC, new conn/msg, n=$N, 4700B, one mailbox: $(rate "$N" "$t0" "$t1")"
per=$((N / CONC)); pids=(); t0=$(now)
for k in $(seq 1 "$CONC"); do
  u=$(printf 'user%04d' $(( (k - 1) * 100 / CONC + 1 )))
  smtp-source -L -d -s 1 -m "$per" -l "$SIZE" -f loadgen@example.net -t "$u@example.com" $H:$LMTP & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done; t1=$(now)
result "Q6 LMTP->quill, smtp-source -L -d x$CONC procs, $CONC users, n=$((per * CONC)): $(rate $((per * CONC)) "$t0" "$t1")"
stop_quill
trap - EXIT
"$ROOT/target/release/quill-harness" bench-node --messages "$N" --connections "$CONC" --log warn | sed 's/^/Q7 quill-harness bench-node: /' | tee -a "$RESULTS"

if [ "${SKIP_BASELINE:-0}" != 1 ]; then
  log "baseline (Dovecot/Postfix) with the same N=$N"
  WORK=$WORK/baseline N=$N bash "$BASE/run.sh" all 2>&1 | tee "$WORK/baseline.txt" | grep -E 'msgs_per_sec|smoke' || true
fi
echo "==== quill ($(nproc) cores, N=$N, c=$CONC) ===="; cat "$RESULTS"

#!/usr/bin/env bash
# TLS on Quill beside TLS on Postfix, in one run: full handshakes/s on the
# implicit-TLS port and deliveries/s over persistent sessions, plaintext and
# STARTTLS. Three clients: `quill-harness bench-tls` (rustls, light enough
# that the server's cost shows on 2 cores; Quill only), bench/tls_bench.py
# (Python's ssl, for both servers) and `openssl s_time -new` (both).
#
#   bash bench/tls_compare.sh                 # 10 s a phase, 4 clients
#   SECONDS_PER_PHASE=5 CLIENTS=2 bash bench/tls_compare.sh
#   SKIP_BASELINE=1 bash bench/tls_compare.sh # Quill only
#
# Postfix: ../shared/bench/baseline/run.sh (install, configure) plus
# smtpd_tls_* with a P-256 ECDSA self-signed certificate (the kind Quill
# makes for itself), STARTTLS on 12525 and wrapper-mode TLS on 12465; mail
# is queued (fsync) and relayed to Dovecot's LMTP. Quill: one release node,
# fsync on, self-signed certificate, SMTP 12625 and SMTPS 12665.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
BASE=$SHARED/bench/baseline
WORK=${WORK:-/tmp/quill-tls-compare}
SECS=${SECONDS_PER_PHASE:-10}
CLIENTS=${CLIENTS:-4}
MESSAGES=${MESSAGES:-20000}     # per bench-tls delivery round
HANDSHAKES=${HANDSHAKES:-5000}
PY=${PY:-python3}
H=127.0.0.1
SMTP=12625 SMTPS=12665 ADMIN=12680 CLUSTER=12674
PF_SMTP=12525 PF_SMTPS=12465
TOKEN=tls-compare

# openssl's own client: sequential full handshakes, one process, no
# greeting read (Python's client above waits for the 220 greeting).
s_time() {
  openssl s_time -connect "$H:$1" -new -time "$SECS" 2>/dev/null |
    awk '/real seconds/ {printf "openssl s_time -new, one client: %.0f handshakes/s\n", $1 / $4}'
}
log() { printf '[tls-compare %s] %s\n' "$(date +%T)" "$*" >&2; }

cd "$ROOT"
cargo build --release --bins -q
QUILL=$ROOT/target/release/quill
mkdir -p "$WORK"
QPID=""
cleanup() {
  [ -n "$QPID" ] && { kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; }
  [ "${SKIP_BASELINE:-0}" = 1 ] || WORK=$WORK/baseline bash "$BASE/run.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== Quill, the harness's rustls client (quill-harness bench-tls)"
"$ROOT/target/release/quill-harness" bench-tls --messages "$MESSAGES" --handshakes "$HANDSHAKES"
rm -rf "$WORK/quill-data"
"$QUILL" node --data "$WORK/quill-data" --cluster-addr $H:$CLUSTER --smtp $H:$SMTP --smtps $H:$SMTPS \
  --admin $H:$ADMIN --admin-token $TOKEN --replicas 1 --log warn </dev/null >"$WORK/quill.log" 2>&1 &
QPID=$!
for _ in $(seq 1 100); do curl -sf "http://$H:$ADMIN/health" >/dev/null && break; sleep 0.1; done
A="$QUILL admin --node $H:$ADMIN --token $TOKEN"
$A domain add example.com >/dev/null
$A user add user0001@example.com --password pass0001 >/dev/null
log "quill node pid $QPID up"
echo "== Quill (pid $QPID)"
"$PY" "$ROOT/bench/tls_bench.py" --host $H --smtp $SMTP --smtps $SMTPS --to user0001@example.com \
  --clients "$CLIENTS" --seconds "$SECS" --pid "$QPID"
s_time "$SMTPS"
kill "$QPID"; wait "$QPID" 2>/dev/null || true; QPID=""

[ "${SKIP_BASELINE:-0}" = 1 ] && exit 0
BW=$WORK/baseline
WORK=$BW bash "$BASE/run.sh" install >&2
WORK=$BW bash "$BASE/run.sh" configure >&2
PF=$BW/etc/postfix
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=mx.mailpeer.test \
  -keyout "$PF/tls.key" -out "$PF/tls.crt" 2>/dev/null
chmod 600 "$PF/tls.key"
cat >>"$PF/main.cf" <<EOF
smtpd_tls_cert_file = $PF/tls.crt
smtpd_tls_key_file = $PF/tls.key
smtpd_tls_security_level = may
smtpd_tls_session_cache_database =
EOF
sed -i "s|^$H:$PF_SMTP inet n - n - - smtpd\$|&\n$H:$PF_SMTPS inet n - n - - smtpd -o smtpd_tls_wrappermode=yes|" "$PF/master.cf"
grep -q "^$H:$PF_SMTPS " "$PF/master.cf" || { log "could not add the smtps service to $PF/master.cf"; exit 1; }
postfix -c "$PF" check
WORK=$BW bash "$BASE/run.sh" start >&2
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/$H/$PF_SMTPS) 2>/dev/null && break; sleep 0.1; done
echo "== Postfix 3.7 (smtpd, queued with fsync, relayed to Dovecot LMTP)"
"$PY" "$ROOT/bench/tls_bench.py" --host $H --smtp $PF_SMTP --smtps $PF_SMTPS --to user0001@example.com \
  --clients "$CLIENTS" --seconds "$SECS"
s_time "$PF_SMTPS"

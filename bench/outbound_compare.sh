#!/usr/bin/env bash
# Outbound mail beside Postfix, in one run, with the same client and the
# same remote server: messages/s from submission to Postfix's smtp-sink
# (the "remote MX", reached as a smarthost by both: Quill's --relay-host,
# Postfix's relayhost), on one Quill node, on a 3-node cluster (R=2,
# clients spread over the nodes), and on the baseline Postfix 3.7 (queue on
# disk with fsync, like Quill's R copies); then the time to drain DRAIN
# messages queued while the remote server was down, once it is back (both
# retry every 1-2 s: Quill --retry-initial 1s --retry-max 2s, Postfix
# minimal_backoff_time 1s, maximal_backoff_time 2s, queue_run_delay 1s).
# Quill's clients log in (AUTH PLAIN on --submission, argon2id hashes);
# Postfix's relay for 127.0.0.0/8 without AUTH: the extra work is Quill's.
# Quill's per-account sending limits are lifted (Postfix has none).
#
#   bash bench/outbound_compare.sh            # N=10000 DRAIN=10000
#   N=2000 DRAIN=2000 SKIP_BASELINE=1 bash bench/outbound_compare.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
BASE=$SHARED/bench/baseline
WORK=${WORK:-/tmp/quill-outbound-compare}
N=${N:-10000}
DRAIN=${DRAIN:-10000}
CONC=${CONC:-16}
SIZE=${SIZE:-4096}
PY=${PY:-python3}
TOKEN=outbound-compare
SINK=127.0.2.1:12526

log() { printf '[outbound-compare %s] %s\n' "$(date +%T)" "$*" >&2; }
cd "$ROOT"
cargo build --release --bins -q
QUILL=$ROOT/target/release/quill
mkdir -p "$WORK"
PIDS=()
# shellcheck source=nodes.sh
. "$ROOT/bench/nodes.sh"
SINK_PID=
stop_sink() {
  if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=; fi
}
start_sink() {  # a fresh counter file each time
  : >"$WORK/sink.out"
  smtp-sink -c -u root "$SINK" 1024 >"$WORK/sink.out" 2>&1 </dev/null &
  SINK_PID=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/${SINK%:*}/${SINK#*:}") 2>/dev/null && return 0; sleep 0.05; done
  log "smtp-sink did not come up"; exit 1
}
sink_count() { tr '\r' '\n' <"$WORK/sink.out" | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2 | sed 's/^$/0/'; }
cleanup() {
  stop_nodes
  stop_sink
  [ "${SKIP_BASELINE:-0}" = 1 ] || WORK=$WORK/baseline bash "$BASE/run.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

# node K on 127.0.1.K: submission 12587, admin 12680, cluster 12674
node_flags() {
  FLAGS=(--submission "$1:12587" --relay-host "$SINK" --retry-initial 1s --retry-max 2s
    --max-submissions-per-minute 1000000 --max-submission-recipients-per-hour 1000000000)
}
# submit HOST PORT N LABEL [--auth]: through to the sink, end to end
submit() {
  local host=$1 port=$2 n=$3 label=$4; shift 4
  "$PY" "$ROOT/bench/submit_load.py" --host "$host" --port "$port" -n "$n" -c "$CONC" --size "$SIZE" \
    --sink-count "$WORK/sink.out" --sink-base "$(sink_count)" --label "$label" "$@"
}
# drain HOST PORT LABEL [--auth]: queue DRAIN with the sink down, then time its return
drain() {
  local host=$1 port=$2 label=$3; shift 3
  stop_sink
  "$PY" "$ROOT/bench/submit_load.py" --host "$host" --port "$port" -n "$DRAIN" -c "$CONC" --size "$SIZE" \
    --label "$label: queued while the remote server is down" "$@"
  sleep 3   # a few failed tries each, so both are in back-off
  local t0; t0=$(date +%s.%N)
  start_sink
  local deadline=$(( $(date +%s) + ${DRAIN_WAIT:-300} ))
  local t99=
  while [ "$(sink_count)" -lt "$DRAIN" ] && [ "$(date +%s)" -lt "$deadline" ]; do
    if [ -z "$t99" ] && [ "$(sink_count)" -ge $(( DRAIN * 99 / 100 )) ]; then t99=$(date +%s.%N); fi
    sleep 0.05
  done
  local t1; t1=$(date +%s.%N)
  [ -n "$t99" ] || t99=$t1
  echo "$label: drained $(sink_count) of $DRAIN in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s after the remote server came back (99% in $(awk -v a="$t0" -v b="$t99" 'BEGIN { printf "%.2f", b - a }') s)"
}

start_sink
start_one
submit 127.0.1.1 12587 "$N" "quill 1 node" --auth
drain 127.0.1.1 12587 "quill 1 node" --auth
cleanup

start_sink
start_three
# The clients spread over the three nodes (DNS round robin's effect), at
# once; end to end is until the sink has all of them.
base=$(sink_count); t0=$(date +%s.%N)
CLIENTS=()
for k in 1 2 3; do
  "$PY" "$ROOT/bench/submit_load.py" --host 127.0.1.$k --port 12587 -n $((N / 3)) -c $((CONC / 2)) --size "$SIZE" \
    --label "quill 3 nodes R=2, clients on node $k" --auth &
  CLIENTS+=($!)
done
for p in "${CLIENTS[@]}"; do wait "$p"; done
want=$(( base + N / 3 / (CONC / 2) * (CONC / 2) * 3 ))
deadline=$(( $(date +%s) + 900 ))
while [ "$(sink_count)" -lt "$want" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
t1=$(date +%s.%N)
echo "quill 3 nodes R=2: $((want - base)) messages at the sink in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f s = %.1f", b - a, '"$((want - base))"' / (b - a) }') msgs/s end to end"
drain 127.0.1.1 12587 "quill 3 nodes R=2" --auth
cleanup

[ "${SKIP_BASELINE:-0}" = 1 ] && exit 0
BW=$WORK/baseline
WORK=$BW bash "$BASE/run.sh" install >&2
WORK=$BW bash "$BASE/run.sh" configure >&2
PF=$BW/etc/postfix
postconf -c "$PF" -e "relayhost = [${SINK%:*}]:${SINK#*:}" "minimal_backoff_time = 1s" \
  "maximal_backoff_time = 2s" "queue_run_delay = 1s" "smtp_connection_cache_on_demand = yes"
WORK=$BW bash "$BASE/run.sh" start >&2
start_sink
submit 127.0.0.1 12525 "$N" "postfix"
drain 127.0.0.1 12525 "postfix"

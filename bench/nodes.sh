# What the compare scripts share about the Quill nodes they run: stopping
# them, waiting until one is up, and the users of the load generators.
# Sourced; the script sets QUILL, TOKEN, WORK, PIDS (the nodes it
# started), log() and node_flags() (its protocols' flags for a node at
# host $1, into the array FLAGS). Node K listens on 127.0.1.K: cluster
# 12674, admin 12680.

# Stops the nodes this script started (by the PIDs it recorded).
stop_nodes() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# wait_up K: until node K's /health answers (20 s at most).
wait_up() {
  for _ in $(seq 1 200); do curl -sf "http://127.0.1.$1:12680/health" >/dev/null && return 0; sleep 0.1; done
  log "node $1 did not come up"; exit 1
}

# Domain example.com and users user0001..user0100 (password passNNNN),
# through node 1, the load generators' defaults.
users() {
  local A="$QUILL admin --node 127.0.1.1:12680 --token $TOKEN"
  $A domain add example.com >/dev/null
  for i in $(seq 1 100); do printf 'user%04d@example.com pass%04d\n' "$i" "$i"; done |
    xargs -P 2 -n 2 sh -c "$A"' user add "$0" --password "$1" >/dev/null'
}

# start_node K [FLAGS...]: node K with its data in $WORK/qK, up.
start_node() {
  local k=$1; shift
  local h=127.0.1.$k
  node_flags "$h"
  "$QUILL" node --data "$WORK/q$k" --cluster-addr "$h:12674" --admin "$h:12680" --admin-token "$TOKEN" \
    --log warn "${FLAGS[@]}" "$@" </dev/null >"$WORK/q$k.log" 2>&1 &
  PIDS+=($!)
  wait_up "$k"
}

# start_one: a fresh node 1 with R=1. start_three: a fresh three-node
# cluster with R=2, every node up. Then the users, everywhere.
start_one() {
  rm -rf "$WORK"/q*
  start_node 1 --replicas 1
  users
}
start_three() {
  rm -rf "$WORK"/q*
  start_node 1 --replicas 2
  for k in 2 3; do start_node $k --replicas 2 --seed 127.0.1.1:12674 --join-token "$(cat "$WORK/q1/join-token")"; done
  for _ in $(seq 1 300); do
    up=$(curl -sf -H "Authorization: Bearer $TOKEN" http://127.0.1.1:12680/v1/cluster/status | grep -o '"state":"up"' | wc -l || true)
    [ "$up" -ge 3 ] && break; sleep 0.2
  done
  users
  sleep 2   # the directory reaches the other nodes through Raft
}

#!/usr/bin/env bash
# How long a fragment store takes to open in a fresh process (a restarted
# node's start), three ways, alternated: from its checkpoint of the index
# (`index.qckp`, what a start normally has), from the sealed segments'
# summaries alone, and reading every segment whole.
#
#     bench/store_restart.sh DIR [ENTRIES] [ROUNDS]
#
# DIR holds a store made by `store_open` (made first, with ENTRIES
# 300-byte messages, if DIR holds none); it is kept. The page cache is
# warm every way alike. Bounded: ROUNDS (3) rounds of three opens.
set -euo pipefail
dir=${1:?usage: bench/store_restart.sh DIR [ENTRIES] [ROUNDS]}
entries=${2:-1000000}
rounds=${3:-3}
cd "$(dirname "$0")/.."
cargo build --release -q -p replication --example store_open
bin=target/release/examples/store_open
if ! ls "$dir"/seg-*.qseg > /dev/null 2>&1; then
    STORE_OPEN_DIR="$dir" "$bin" "$entries" > /dev/null
fi
aside=$(mktemp -d -p "$(dirname "$dir")" store-aside-XXXX)
trap 'rm -rf "$aside"' EXIT
# A checkpoint to start from (the store writes one after an open without).
STORE_OPEN_DIR="$dir" "$bin" > /dev/null
cp "$dir/index.qckp" "$aside/"
for r in $(seq 1 "$rounds"); do
    for how in checkpoint summaries whole; do
        rm -f "$dir/index.qckp"
        case $how in
            checkpoint) cp "$aside/index.qckp" "$dir/" ;;
            whole) rm -f "$dir"/seg-*.qidx ;;
        esac
        # The open alone is timed (the example then writes a checkpoint
        # when it found none: not part of the figure).
        line=$(STORE_OPEN_DIR="$dir" "$bin" | grep '^open ')
        echo "round=$r from=$how $line"
    done
done
rm -f "$dir/index.qckp"
cp "$aside/index.qckp" "$dir/"

#!/usr/bin/env bash
# Where the machine's time goes while chatmesh carries a load: three release nodes in
# cluster mode on one redis-server (as in compare.sh), chatmesh-bench offering the load,
# and a system-wide `perf record` of 5 s in the middle of the run. Prints the run's
# result, then each party's share of the machine split into kernel and user time.
#
#   bench/profile.sh direct 15     # 1000 users in pairs, 15 msg/s each (15,000 msg/s)
#   bench/profile.sh room 128      # one room of 1000, one sender at 128 msg/s
#
# Needs perf (Debian: linux-perf), redis-server and a release build
# (cargo build --release --bin chatmesh --bin chatmesh-bench). The perf data is kept
# in bench/results/profile-<scenario>.data for `perf report -i`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCENARIO=${1:?scenario: direct or room}
RATE=${2:?rate per sender}
case "$SCENARIO" in direct|room) ;; *) echo "scenario: direct or room" >&2; exit 2 ;; esac
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 2; }
[ -x "$BIN/chatmesh" ] && [ -x "$BIN/chatmesh-bench" ] || { echo "build first: cargo build --release --bin chatmesh --bin chatmesh-bench" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TMP=$(mktemp -d /tmp/chatmesh-profile.XXXXXX)
mkdir -p "$ROOT/bench/results"
DATA=$ROOT/bench/results/profile-$SCENARIO.data
PIDS=()
cleanup() {
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {
    for _ in $(seq 100); do
        curl -sf -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    echo "$1 did not become ready" >&2
    return 1
}

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
    --logfile "$TMP/redis.log" --daemonize no &
PIDS+=($!)
PIDARGS=(--pid "redis=$!")
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

TARGETS=""
SECRET=profile-$RANDOM$RANDOM
for i in 1 2 3; do
    p=$(free_port); q=$(free_port)
    RUST_LOG=warn "$BIN/chatmesh" --listen "127.0.0.1:$p" --internal-listen "127.0.0.1:$q" \
        --node-id "cm$i" --workers 1 --rate-per-sec 1000000 --rate-burst 1000000 \
        --redis-url "redis://127.0.0.1:$RPORT" --cluster-secret "$SECRET" \
        >"$TMP/node$i.log" 2>&1 &
    PIDS+=($!)
    PIDARGS+=(--pid "cm$i=$!")
    wait_ready "http://127.0.0.1:$p/readyz"
    TARGETS+="${TARGETS:+,}ws://127.0.0.1:$p"
done

if [ "$SCENARIO" = direct ]; then
    LOAD=(--users 1000)
else
    LOAD=(--rooms 1 --members 1000 --senders 1)
fi
"$BIN/chatmesh-bench" "$SCENARIO" --system chatmesh --targets "$TARGETS" "${PIDARGS[@]}" \
    "${LOAD[@]}" --rate "$RATE" --duration 12 --warmup 3 >"$TMP/run.txt" 2>&1 &
BENCH=$!
sleep 7
perf record -a -F 999 -o "$DATA" -- sleep 5 2>/dev/null >/dev/null
wait "$BENCH" || true
grep -E "^== |offered|delivered|latency ms|cpu  |result" "$TMP/run.txt"

echo
echo "share of the machine (100% = both cores) in the 5 s profile, by party:"
# Thread names: a node's are chatmesh and actix-rt|system (its HTTP workers), the
# client's tokio-rt-worker, Redis's redis-server.
perf report -i "$DATA" --sort comm,dso --stdio 2>/dev/null | awk '
    /^ +[0-9.]+%/ {
        pct = $1; sub("%", "", pct)
        dso = $NF
        comm = $2; if (NF > 3) comm = comm " " $3
        if (comm == "chatmesh" || comm ~ /^actix/) who = "chatmesh nodes"
        else if (comm ~ /^tokio-rt/ || comm == "chatmesh-bench") who = "chatmesh-bench"
        else if (comm == "redis-server") who = "redis-server"
        else who = "other"
        if (dso ~ /kernel/) kernel[who] += pct; else user[who] += pct
        seen[who] = 1
    }
    END {
        n = split("chatmesh nodes,chatmesh-bench,redis-server,other", order, ",")
        for (i = 1; i <= n; i++) {
            w = order[i]
            if (w in seen)
                printf "  %-15s %5.1f%%  kernel %5.1f%%  user %5.1f%%\n", w, kernel[w] + user[w], kernel[w], user[w]
        }
    }'

#!/usr/bin/env bash
# Instructions per message in the chatmesh nodes: a repeatable figure to judge a change
# by, whatever else the machine is doing (valgrind counts instructions, not seconds).
#
#   bench/instructions.sh              # both scenarios
#   bench/instructions.sh direct       # or only one: direct | room
#
# Three release nodes in cluster mode (PostgreSQL store, redis-server directory, as in
# compare.sh) each run under `valgrind --tool=callgrind` with instrumentation off;
# chatmesh-bench connects its users, warms up, and switches instrumentation on when its
# window opens and off when it closes (--at-window-start/--at-window-end), so start-up,
# connecting and shutdown are not counted. The figure is the three nodes' instructions
# (callgrind's Ir) in the window divided by the messages sent (direct) or deliveries
# made (room) in it. Timers and heartbeats in the window count too, as they would in
# production. PostgreSQL, Redis and the client are not counted.
#
# The loads are small and fixed because a node under valgrind runs ~50x slower:
#   direct  DIRECT_USERS (40) users in pairs across nodes, DIRECT_RATE (2) msg/s each
#   room    one room of ROOM_MEMBERS (60) over the nodes, one sender at ROOM_RATE (4)/s
# for WINDOW (10) seconds after WARMUP (3). The callgrind files stay in the results
# directory (bench/results/instructions-<time>/) for `callgrind_annotate`; the top
# functions of node 1 are printed.
#
# Needs valgrind, redis-server, PostgreSQL's server programs and a release build
# (cargo build --release -p chatmesh -p chatmesh-bench).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/../nginx/local-postgres.sh
source "$ROOT/nginx/local-postgres.sh"
SCENARIOS=${1:-direct room}
for s in $SCENARIOS; do
    case "$s" in direct|room) ;; *) echo "scenario: direct or room" >&2; exit 2 ;; esac
done
: "${DIRECT_USERS:=40}" "${DIRECT_RATE:=2}"
: "${ROOM_MEMBERS:=60}" "${ROOM_RATE:=4}"
: "${WINDOW:=10}" "${WARMUP:=3}"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
CHATMESH=$TARGET_DIR/release/chatmesh
BENCH=$TARGET_DIR/release/chatmesh-bench
for tool in valgrind callgrind_control callgrind_annotate redis-server redis-cli curl; do
    command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 2; }
done
if [ ! -x "$CHATMESH" ] || [ ! -x "$BENCH" ]; then
    echo "build first: cargo build --release -p chatmesh -p chatmesh-bench" >&2
    exit 2
fi
_pg_find_bin || exit 2

OUT=$ROOT/bench/results/instructions-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/chatmesh-instructions.XXXXXX)
[ "$(id -u)" != 0 ] || chmod 711 "$TMP"

NODES=()
REDIS_PID=""
stop_nodes() {
    [ ${#NODES[@]} -eq 0 ] && return 0
    kill -TERM "${NODES[@]}" 2>/dev/null || true
    # valgrind writes its file on the way out; a node under it stops slowly.
    for _ in $(seq 600); do
        local alive=0 p
        for p in "${NODES[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    kill -KILL "${NODES[@]}" 2>/dev/null || true
    local p
    for p in "${NODES[@]}"; do wait "$p" 2>/dev/null || true; done
    NODES=()
}
cleanup() {
    local rc=$?
    stop_nodes || true
    pg_stop 20 || true
    if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; fi
    cp "$TMP"/*.log "$OUT/" 2>/dev/null || true
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

echo "commit:   $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ' (with local changes)')"
echo "valgrind: $(valgrind --version), $(rustc --version)"
echo "results:  $OUT"

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
    --logfile "$TMP/redis.log" --daemonize no &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

run() {
    local scenario=$1 db=chatmesh_$1 secret targets="" i
    pg_create_db "$db"
    secret=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for i in 1 2 3; do
        local p q
        p=$(free_port); q=$(free_port)
        RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$OUT/callgrind-$scenario-cm$i.out" \
            "$CHATMESH" --listen "127.0.0.1:$p" --internal-listen "127.0.0.1:$q" \
            --node-id "cm$i" --workers 1 --rate-per-sec 1000000 --rate-burst 1000000 \
            --redis-url "redis://127.0.0.1:$RPORT" --cluster-secret "$secret" \
            --database-url "$(pg_url "$db")" >"$TMP/$scenario-cm$i.log" 2>&1 &
        NODES+=("$!")
        local ready=0
        for _ in $(seq 1200); do
            kill -0 "$!" 2>/dev/null || break
            if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$p/readyz" || true)" = 200 ]; then
                ready=1
                break
            fi
            sleep 0.1
        done
        if [ $ready = 0 ]; then
            echo "node cm$i did not become ready under valgrind; its log:"
            tail -20 "$TMP/$scenario-cm$i.log"
            return 1
        fi
        targets+="${targets:+,}ws://127.0.0.1:$p"
    done
    local on="" off=""
    for i in "${NODES[@]}"; do
        on+="callgrind_control -i on $i >/dev/null && "
        off+="callgrind_control -i off $i >/dev/null && "
    done
    local load=()
    case "$scenario" in
        direct) load=(direct --users "$DIRECT_USERS" --rate "$DIRECT_RATE") ;;
        room) load=(room --members "$ROOM_MEMBERS" --rate "$ROOM_RATE") ;;
    esac
    "$BENCH" "${load[@]}" --system chatmesh --targets "$targets" \
        --duration "$WINDOW" --warmup "$WARMUP" --timeout 60 --drain-timeout 60 \
        --at-window-start "${on}true" --at-window-end "${off}true" \
        --json "$OUT/$scenario.json" | tee "$TMP/$scenario-bench.log"
    stop_nodes
    local ir=0 n
    for i in 1 2 3; do
        n=$(awk '/^totals:/ {print $2; exit}' "$OUT/callgrind-$scenario-cm$i.out")
        echo "  cm$i instructions in the window: $n"
        ir=$((ir + n))
    done
    local sent delivered
    sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["between_hooks"]["sent"])' "$OUT/$scenario.json")
    delivered=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["between_hooks"]["delivered"])' "$OUT/$scenario.json")
    python3 - "$scenario" "$ir" "$sent" "$delivered" <<'EOF' | tee -a "$OUT/summary.md"
import sys
scenario, ir, sent, delivered = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"| {scenario} | {sent} | {delivered} | {ir / 1e6:,.1f} M | {ir / max(sent, 1):,.0f} | {ir / max(delivered, 1):,.0f} |")
EOF
    callgrind_annotate --inclusive=no "$OUT/callgrind-$scenario-cm1.out" 2>/dev/null \
        | sed -n '/^Ir/,$p' | head -40 > "$OUT/top-$scenario-cm1.txt" || true
}

echo "| scenario | sent in window | delivered in window | node instructions | per message sent | per delivery |" > "$OUT/summary.md"
echo "|---|---:|---:|---:|---:|---:|" >> "$OUT/summary.md"
pg_start "$TMP/pg" "$TMP/postgres.log"
for s in $SCENARIOS; do
    echo
    echo "=== $s"
    run "$s"
done
echo
echo "=== instructions in the three nodes (callgrind Ir)"
cat "$OUT/summary.md"
for s in $SCENARIOS; do
    echo
    echo "=== top functions of node cm1, $s (self instructions; $OUT/top-$s-cm1.txt)"
    head -30 "$OUT/top-$s-cm1.txt"
done

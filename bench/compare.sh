#!/usr/bin/env bash
# chatmesh vs Socket.IO 4 on this machine: three chatmesh nodes in cluster mode on one
# PostgreSQL (their store of record) and one redis-server (their registry and directory),
# three Socket.IO processes on the same redis-server (its adapter's pub/sub); the same
# scenarios and loads measured by one client (chatmesh-bench), then a side-by-side table.
#
#   bench/compare.sh                  # idle, direct and room at fixed loads
#   bench/compare.sh --find-max       # also step the offered load to each system's highest
#                                     # sustainable rate (p99 < 50 ms, zero loss)
#   bench/compare.sh --quick          # short smoke run (small loads, 5 s windows)
#
# Options: --chatmesh-mode auto|cluster|single (auto: cluster, or one node on SQLite if
# cluster mode does not start), --only-find-max, --out DIR. Loads and PostgreSQL's
# settings are environment variables, see below. Redis and PostgreSQL are private to the
# run (PostgreSQL on a unix socket only); the servers listen on 127.0.0.1; every process
# started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/../nginx/local-postgres.sh
source "$ROOT/nginx/local-postgres.sh"
FIND_MAX=0
FIXED=1
MODE=auto
QUICK=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --find-max) FIND_MAX=1 ;;
        --only-find-max) FIND_MAX=1; FIXED=0 ;;
        --quick) QUICK=1 ;;
        --chatmesh-mode) MODE=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$MODE" in auto|cluster|single) ;; *) echo "--chatmesh-mode: auto, cluster or single" >&2; exit 2 ;; esac

# Loads (same for both systems). Per-scenario windows are short so a comparison takes minutes.
if [ "$QUICK" = 1 ]; then
    : "${DURATION:=5}" "${WARMUP:=2}" "${IDLE_CONNS:=2000}" "${IDLE_HOLD:=2}"
    : "${DIRECT_USERS:=200}" "${ROOM_MEMBERS:=200}"
    : "${MAX_DURATION:=5}" "${MAX_WARMUP:=2}"
fi
: "${DURATION:=15}"          # measured seconds per scenario
: "${WARMUP:=5}"             # seconds of load before the window (JIT, caches, connection pools)
: "${IDLE_CONNS:=19000}"     # idle connections on node 1 (capped by the open-files limit)
: "${IDLE_HOLD:=5}"
: "${DIRECT_USERS:=1000}"    # users in pairs, each pair across two nodes
: "${DIRECT_RATE:=5}"        # messages/s per user
: "${ROOM_MEMBERS:=1000}"    # one room, members over the three nodes
: "${ROOM_SENDERS:=1}"
: "${ROOM_RATE:=10}"         # messages/s per sender
: "${MAX_P99_MS:=50}"        # sustainable: p99 under this, zero loss
: "${MAX_DURATION:=10}"
: "${MAX_WARMUP:=5}"
: "${DIRECT_MAX_RATES:=2 3 4.5 7 10 15 22 33 50 75}"   # per user, x DIRECT_USERS msgs/s
: "${ROOM_MAX_RATES:=5 7.5 11 17 25 38 57 85 128 192 288 432}"  # per sender, x (members-1) deliveries/s
: "${CHATMESH_WORKERS:=1}"  # HTTP worker threads per chatmesh node
: "${CHATMESH_LOG:=warn}"    # RUST_LOG of the chatmesh nodes (info logs every connection)
# PostgreSQL runs with its defaults (every commit flushed to disk before chatmesh says
# `sent`) except for these; e.g. PG_SYNCHRONOUS_COMMIT=off to commit without waiting for
# the flush (a crash of the machine can then lose the last few hundred ms of messages).
: "${PG_SYNCHRONOUS_COMMIT:=on}"
: "${PG_MAX_CONNECTIONS:=100}"  # each chatmesh node keeps at most 5

OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d /tmp/chatmesh-compare.XXXXXX)
# As root, PostgreSQL runs as the postgres user, which must reach its directory in here.
[ "$(id -u)" != 0 ] || chmod 711 "$TMP"
LOG="$OUT/compare.log"
exec > >(tee -a "$LOG") 2>&1

PIDS=()
REDIS_PID=""
cleanup() {
    local rc=$?
    stop_all || true
    pg_stop 20 || true
    if [ -n "$REDIS_PID" ]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    cp "$TMP"/*.log "$OUT/" 2>/dev/null || true
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n=== %s\n' "$*"; }

stop_all() {
    [ ${#PIDS[@]} -eq 0 ] && return 0
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    kill -KILL "${PIDS[@]}" 2>/dev/null || true
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

free_port() {
    node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# wait_http URL PID SECONDS: until URL answers 200, while PID lives.
wait_http() {
    local url=$1 pid=$2 secs=$3
    for _ in $(seq $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || return 1
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- prerequisites
say "prerequisites"
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v node >/dev/null || need+=(nodejs npm)
if [ "$MODE" != single ] && ! _pg_find_bin 2>/dev/null; then need+=(postgresql); fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
(cd "$ROOT/bench/peers/socketio" && npm ci --no-audit --no-fund --loglevel=error)
(cd "$ROOT" && cargo build --release -p chatmesh -p chatmesh-bench)
# cargo puts the binaries under CARGO_TARGET_DIR when it is set (relative to $ROOT, where
# cargo ran).
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
CHATMESH=$TARGET_DIR/release/chatmesh
BENCH=$TARGET_DIR/release/chatmesh-bench
SIO=$ROOT/bench/peers/socketio/server.js

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$IDLE_CONNS" -gt $((NOFILE - 500)) ]; then
    echo "open-files limit is $NOFILE: idle connections capped at $((NOFILE - 500)) (was $IDLE_CONNS)"
    IDLE_CONNS=$((NOFILE - 500))
fi

PG_VERSION=-
if [ "$MODE" != single ]; then PG_VERSION=$(pg_version 2>/dev/null || echo missing); fi

say "machine"
echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)')"
echo "cpu:      $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "memory:   $(free -h | awk '/^Mem:/ {print $2 " total, " $7 " available"}')"
echo "load avg: $(cut -d' ' -f1-3 /proc/loadavg) (before the run)"
echo "versions: redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), postgresql $PG_VERSION, node $(node --version), socket.io $(node -p 'require("'"$ROOT"'/bench/peers/socketio/node_modules/socket.io/package.json").version'), $(rustc --version)"
echo "loads:    duration ${DURATION}s + warm-up ${WARMUP}s; idle $IDLE_CONNS; direct $DIRECT_USERS users x $DIRECT_RATE/s; room 1 x $ROOM_MEMBERS members, $ROOM_SENDERS sender(s) x $ROOM_RATE/s"
[ "$MODE" = single ] || echo "postgres: synchronous_commit=$PG_SYNCHRONOUS_COMMIT, max_connections=$PG_MAX_CONNECTIONS, otherwise defaults; WAL warmed with 600 MB (pg_warm_wal); data in $TMP/pg"
echo "results:  $OUT"

# ---------------------------------------------------------------- redis
RPORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$RPORT
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
    --logfile "$TMP/redis.log" --daemonize no &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$RPORT" ping >/dev/null || { echo "redis-server did not start"; exit 1; }
# Redis is stopped last, by the EXIT trap.

# ---------------------------------------------------------------- postgresql
# chatmesh's store of record in cluster mode: a fresh cluster (initdb) on a unix socket
# in $TMP/pg, no TCP port, whose WAL is warmed first (pg_warm_wal: a new cluster stalls
# its commits while it makes each new WAL file; one that has run for a while recycles
# them). Stopped by the EXIT trap.
DATABASE_URL=""
PG_NOTE=""
if [ "$MODE" != single ]; then
    if pg_start "$TMP/pg" "$TMP/postgres.log" "synchronous_commit=$PG_SYNCHRONOUS_COMMIT" \
        "max_connections=$PG_MAX_CONNECTIONS" && pg_create_db chatmesh && pg_warm_wal; then
        DATABASE_URL=$(pg_url chatmesh)
        PG_NOTE="PostgreSQL $PG_VERSION (synchronous_commit=$PG_SYNCHRONOUS_COMMIT)"
        echo "postgresql ready: $DATABASE_URL"
    elif [ "$MODE" = cluster ]; then
        echo "PostgreSQL did not start (cluster mode needs it)"
        exit 1
    else
        echo "PostgreSQL did not start: chatmesh cannot run in cluster mode"
    fi
fi

# ---------------------------------------------------------------- servers
TARGETS=""
PIDARGS=()
NODE1_PID=""
SYSTEM_NOTE=()

start_chatmesh() {
    local mode=$1 n=3 secret
    secret=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    [ "$mode" = single ] && n=1
    if [ "$mode" = cluster ] && [ -z "$DATABASE_URL" ]; then return 1; fi
    TARGETS=""; PIDARGS=(--pid "redis=$REDIS_PID")
    # PostgreSQL's CPU counts whole: chatmesh-bench adds a watched process's children
    # (one backend per connection) to it.
    if [ "$mode" = cluster ]; then PIDARGS+=(--pid "postgres=$PG_PID"); fi
    local i
    for i in $(seq $n); do
        local p q args
        p=$(free_port); q=$(free_port)
        args=(--listen "127.0.0.1:$p" --internal-listen "127.0.0.1:$q" --node-id "cm$i"
              --rate-per-sec 1000000 --rate-burst 1000000
              # three nodes share two cores: one HTTP worker each, as each Socket.IO
              # node is one Node.js process
              --workers "$CHATMESH_WORKERS")
        if [ "$mode" = cluster ]; then
            args+=(--redis-url "$REDIS_URL" --cluster-secret "$secret" --database-url "$DATABASE_URL")
        else
            # one node: the embedded store, as a single node runs by default
            args+=(--database-url "sqlite://$TMP/chatmesh-single.db")
        fi
        RUST_LOG=$CHATMESH_LOG "$CHATMESH" "${args[@]}" >"$TMP/chatmesh-$i.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        if ! wait_http "http://127.0.0.1:$p/readyz" "$pid" 20; then
            echo "chatmesh node $i ($mode) did not become ready; its log:"
            tail -5 "$TMP/chatmesh-$i.log"
            stop_all
            return 1
        fi
        TARGETS+="${TARGETS:+,}ws://127.0.0.1:$p"
        PIDARGS+=(--pid "cm$i=$pid")
        [ "$i" = 1 ] && NODE1_PID=$pid
    done
    echo "chatmesh: $n node(s) ($mode) at $TARGETS"
}

start_socketio() {
    TARGETS=""; PIDARGS=(--pid "redis=$REDIS_PID")
    local i
    for i in 1 2 3; do
        local p
        p=$(free_port)
        NODE_ENV=production PORT=$p REDIS_URL=$REDIS_URL NODE_ID=sio$i node "$SIO" >"$TMP/socketio-$i.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        wait_http "http://127.0.0.1:$p/healthz" "$pid" 20 || { echo "socket.io $i did not start"; tail -5 "$TMP/socketio-$i.log"; return 1; }
        TARGETS+="${TARGETS:+,}ws://127.0.0.1:$p"
        PIDARGS+=(--pid "sio$i=$pid")
        [ "$i" = 1 ] && NODE1_PID=$pid
    done
    echo "socket.io: 3 processes at $TARGETS"
}

FAILED=()
# bench SYSTEM NAME LABEL SCENARIO ARGS...: one run, JSON into $OUT/SYSTEM-NAME.json;
# runs with one LABEL are one row group of the table. Returns the bench's exit code.
bench() {
    local system=$1 name=$2 label=$3 scenario=$4; shift 4
    local json="$OUT/$system-$name.json" rc=0
    "$BENCH" "$scenario" --system "$system" --targets "$TARGETS" "${PIDARGS[@]}" \
        --label "$label" --json "$json" "$@" || rc=$?
    return $rc
}

fixed_scenarios() {
    local system=$1 rc
    say "$system: idle ($IDLE_CONNS connections on node 1)"
    local first=${TARGETS%%,*}
    local saved_targets=$TARGETS saved_pids=("${PIDARGS[@]}")
    # Idle first, on freshly started processes, so the RSS growth is the connections'.
    TARGETS=$first
    PIDARGS=(--pid "node1=$NODE1_PID")
    rc=0; bench "$system" idle idle idle --connections "$IDLE_CONNS" --hold "$IDLE_HOLD" \
        --connect-concurrency 200 || rc=$?
    [ $rc = 0 ] || FAILED+=("$system idle (exit $rc)")
    TARGETS=$saved_targets; PIDARGS=("${saved_pids[@]}")
    sleep 2

    say "$system: direct"
    rc=0; bench "$system" direct direct direct --users "$DIRECT_USERS" --rate "$DIRECT_RATE" \
        --duration "$DURATION" --warmup "$WARMUP" || rc=$?
    [ $rc = 0 ] || FAILED+=("$system direct (exit $rc)")
    sleep 2

    say "$system: room"
    rc=0; bench "$system" room room room --rooms 1 --members "$ROOM_MEMBERS" --senders "$ROOM_SENDERS" \
        --rate "$ROOM_RATE" --duration "$DURATION" --warmup "$WARMUP" || rc=$?
    [ $rc = 0 ] || FAILED+=("$system room (exit $rc)")
    sleep 2
}

# try_step SYSTEM SCENARIO NAME RATE: one load step, tried twice before it counts as not
# sustained (other programs on the machine can spoil one run). Returns 0 if sustained.
try_step() {
    local system=$1 scenario=$2 name=$3 rate=$4 try rc=1 args
    if [ "$scenario" = direct ]; then
        args=(--users "$DIRECT_USERS")
    else
        args=(--rooms 1 --members "$ROOM_MEMBERS" --senders "$ROOM_SENDERS")
    fi
    for try in 1 2; do
        rc=0; bench "$system" "$name-$try" "max-$scenario" "$scenario" "${args[@]}" --rate "$rate" \
            --duration "$MAX_DURATION" --warmup "$MAX_WARMUP" --max-p99-ms "$MAX_P99_MS" \
            --drain-timeout 15 >/dev/null || rc=$?
        echo "  $scenario $rate/s per sender (try $try): $( [ $rc = 0 ] && echo sustained || echo "not sustained (exit $rc)")"
        sleep 2
        [ $rc = 0 ] && return 0
        ensure_up "$system"
    done
    return 1
}

# ensure_up SYSTEM: after an overload, restart the system's servers if any of them died.
ensure_up() {
    local system=$1 p dead=0
    if [ "$system" = chatmesh ] && [ "$CM_MODE" = cluster ] && ! kill -0 "$PG_PID" 2>/dev/null; then
        echo "  PostgreSQL exited (its log: $OUT/postgres.log); cannot go on"
        exit 1
    fi
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || dead=1; done
    [ $dead = 0 ] && return 0
    echo "  a $system process exited under overload (its log is kept in $OUT): restarting $system"
    local n
    for n in "$TMP"/"${system}"-*.log; do
        [ -f "$n" ] && cp "$n" "$OUT/$(basename "$n" .log)-crash-$(date +%s).log"
    done
    stop_all
    redis-cli -p "$RPORT" flushall >/dev/null
    if [ "$system" = chatmesh ]; then start_chatmesh "$CM_MODE"; else start_socketio; fi
}

# find_max SYSTEM: step each scenario's offered load up (geometric steps) until a step is
# not sustained, then try once halfway between the last sustained and that step.
find_max() {
    local system=$1 scenario rates rate step pass fail mid
    for scenario in direct room; do
        say "$system: highest sustainable $scenario rate (p99 < $MAX_P99_MS ms, zero loss)"
        if [ "$scenario" = direct ]; then rates=$DIRECT_MAX_RATES; else rates=$ROOM_MAX_RATES; fi
        step=0; pass=""; fail=""
        for rate in $rates; do
            step=$((step + 1))
            if try_step "$system" "$scenario" "max-$scenario-$step" "$rate"; then
                pass=$rate
            else
                fail=$rate
                break
            fi
        done
        if [ -n "$pass" ] && [ -n "$fail" ]; then
            mid=$(awk -v a="$pass" -v b="$fail" 'BEGIN { m = (a + b) / 2; if (m >= 100) printf "%d", m; else printf "%.3g", m }')
            try_step "$system" "$scenario" "max-$scenario-mid" "$mid" || true
        fi
        sleep 3
    done
}

run_system() {
    local system=$1
    if [ "$FIXED" = 1 ]; then fixed_scenarios "$system"; fi
    if [ "$FIND_MAX" = 1 ]; then find_max "$system"; fi
}

# ---------------------------------------------------------------- chatmesh
say "chatmesh"
CM_MODE=$MODE
if [ "$MODE" = auto ] || [ "$MODE" = cluster ]; then
    if start_chatmesh cluster; then
        CM_MODE=cluster
    elif [ "$MODE" = auto ]; then
        echo "cluster mode did not start: falling back to ONE chatmesh node on SQLite (not comparable to 3 Socket.IO nodes)"
        CM_MODE=single
        start_chatmesh single
    else
        exit 1
    fi
else
    start_chatmesh single
fi
[ "$CM_MODE" = single ] && SYSTEM_NOTE+=("chatmesh ran as ONE node on SQLite (no cluster mode): its direct pairs are not cross-node")
run_system chatmesh
stop_all
redis-cli -p "$RPORT" flushall >/dev/null

# ---------------------------------------------------------------- socket.io
say "socket.io"
start_socketio
run_system socketio
stop_all
redis-cli -p "$RPORT" flushall >/dev/null

# ---------------------------------------------------------------- table
say "comparison"
{
    if [ "$CM_MODE" = cluster ]; then
        echo "chatmesh: cluster (3 nodes) on $PG_NOTE and redis-server; socket.io: 3 processes on the same redis-server; all on 127.0.0.1"
    else
        echo "chatmesh: single (1 node, SQLite); socket.io: 3 processes on one redis-server; all on 127.0.0.1"
    fi
    for n in "${SYSTEM_NOTE[@]+"${SYSTEM_NOTE[@]}"}"; do echo "NOTE: $n"; done
    "$BENCH" compare "$OUT"/*.json
} | tee "$OUT/table.md"

if [ ${#FAILED[@]} -gt 0 ]; then
    echo
    echo "runs that failed (loss, duplicates, refused sends, or load not sustained):"
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi

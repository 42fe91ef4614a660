#!/usr/bin/env bash
# Where the machine's time goes while chatmesh carries a load: three release nodes in
# cluster mode on one PostgreSQL and one redis-server (as in compare.sh), chatmesh-bench
# offering the load, and a system-wide `perf record` of 5 s in the middle of the run.
# Prints the run's result, then each party's share of the machine split into kernel and
# user time, then what PostgreSQL did per message stored (WAL records and bytes, shared
# buffers touched; figures that do not depend on the machine's speed) and how many
# transactions it committed and rolled back.
#
#   bench/profile.sh direct 15     # 1000 users in pairs, 15 msg/s each (15,000 msg/s)
#   bench/profile.sh room 128      # one room of 1000, one sender at 128 msg/s
#
# Needs perf (Debian: linux-perf), redis-server, PostgreSQL's server programs (Debian:
# postgresql; PG_BIN to choose; as root it runs as the postgres user) and a release build
# (cargo build --release -p chatmesh -p chatmesh-bench). PostgreSQL runs with its
# defaults except PG_SYNCHRONOUS_COMMIT (on), as in compare.sh. The perf data is kept in
# bench/results/profile-<scenario>.data for `perf report -i`.
#
#   CALL_GRAPH=1 bench/profile.sh direct 5
#
# also records call stacks (perf --call-graph dwarf, at 499 Hz instead of 999: the
# unwinding costs the machine too, so the run's CPU figures are higher than without)
# and prints the nodes' samples by the part of chatmesh they were in: the first of
# these found anywhere in the sample's stack names it (store, peer API, peer client,
# Redis, ...; see PARTS below). A stack cut short by perf's copy limit may miss its
# outer frames, so a sample counts in the innermost part it shows.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/../nginx/local-postgres.sh
source "$ROOT/nginx/local-postgres.sh"
SCENARIO=${1:?scenario: direct or room}
RATE=${2:?rate per sender}
case "$SCENARIO" in direct|room) ;; *) echo "scenario: direct or room" >&2; exit 2 ;; esac
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release
: "${PG_SYNCHRONOUS_COMMIT:=on}"
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 2; }
if [ ! -x "$BIN/chatmesh" ] || [ ! -x "$BIN/chatmesh-bench" ]; then
    echo "build first: cargo build --release -p chatmesh -p chatmesh-bench" >&2
    exit 2
fi
_pg_find_bin || exit 2
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TMP=$(mktemp -d /tmp/chatmesh-profile.XXXXXX)
# As root, PostgreSQL runs as the postgres user, which must reach its directory in here.
[ "$(id -u)" != 0 ] || chmod 711 "$TMP"
mkdir -p "$ROOT/bench/results"
DATA=$ROOT/bench/results/profile-$SCENARIO.data
PIDS=()
cleanup() {
    # The nodes and the client first, then PostgreSQL, then Redis.
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    pg_stop 20
    if [ -n "$REDIS_PID" ]; then
        kill -TERM "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
REDIS_PID=""
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # wait_ready URL LOG
    for _ in $(seq 200); do
        curl -sf -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    echo "$1 did not become ready; the end of $2:" >&2
    tail -n 5 "$2" >&2
    return 1
}

# Redis: the registry and directory only (no persistence).
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
    --logfile "$TMP/redis.log" --daemonize no &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$RPORT" ping >/dev/null || { echo "redis-server did not start" >&2; exit 1; }

# PostgreSQL: the store of record, on a unix socket in $TMP/pg only.
pg_start "$TMP/pg" "$TMP/postgres.log" "synchronous_commit=$PG_SYNCHRONOUS_COMMIT" || exit 1
pg_create_db chatmesh || exit 1
pg_warm_wal || exit 1  # as compare.sh does: WAL files to recycle, as on a server that has run
DATABASE_URL=$(pg_url chatmesh)
# chatmesh-bench adds a watched process's children (PostgreSQL's backends) to its CPU.
PIDARGS=(--pid "redis=$REDIS_PID" --pid "postgres=$PG_PID")

TARGETS=""
SECRET=profile-$RANDOM$RANDOM
for i in 1 2 3; do
    p=$(free_port); q=$(free_port)
    RUST_LOG=warn "$BIN/chatmesh" --listen "127.0.0.1:$p" --internal-listen "127.0.0.1:$q" \
        --node-id "cm$i" --workers 1 --rate-per-sec 1000000 --rate-burst 1000000 \
        --redis-url "redis://127.0.0.1:$RPORT" --cluster-secret "$SECRET" \
        --database-url "$DATABASE_URL" \
        >"$TMP/node$i.log" 2>&1 &
    PIDS+=($!)
    PIDARGS+=(--pid "cm$i=$!")
    wait_ready "http://127.0.0.1:$p/readyz" "$TMP/node$i.log"
    TARGETS+="${TARGETS:+,}ws://127.0.0.1:$p"
done

pg_sql() {
    PGCONNECT_TIMEOUT=10 timeout 30 "$PG_BIN/psql" -X -q -A -t -h "$PG_SOCKET_DIR" \
        -U postgres -d chatmesh -c "$1"
}
# What PostgreSQL has done before the load (start-up, migrations), to take from the end's.
STORE_COUNTS="SELECT w.wal_records, w.wal_bytes, d.blks_hit + d.blks_read, \
    d.xact_commit, d.xact_rollback \
    FROM pg_stat_wal w, pg_stat_database d WHERE d.datname = current_database()"
STORE_BEFORE=$(pg_sql "$STORE_COUNTS")

if [ "$SCENARIO" = direct ]; then
    LOAD=(--users 1000)
else
    LOAD=(--rooms 1 --members 1000 --senders 1)
fi
"$BIN/chatmesh-bench" "$SCENARIO" --system chatmesh --targets "$TARGETS" "${PIDARGS[@]}" \
    "${LOAD[@]}" --rate "$RATE" --duration 12 --warmup 3 >"$TMP/run.txt" 2>&1 &
BENCH=$!
PIDS+=("$BENCH")
sleep 7
if [ -n "${CALL_GRAPH:-}" ]; then
    perf record -a -F 499 --call-graph dwarf,32768 -o "$DATA" -- sleep 5 2>/dev/null >/dev/null
else
    perf record -a -F 999 -o "$DATA" -- sleep 5 2>/dev/null >/dev/null
fi
wait "$BENCH" || true
grep -E "^== |offered|delivered|latency ms|cpu  |result" "$TMP/run.txt"
# The nodes stop first: a backend hands its counts to the statistics when it exits.
for p in "${PIDS[@]:0:3}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${PIDS[@]:0:3}"; do wait "$p" 2>/dev/null || true; done
STORE_AFTER=$(pg_sql "$STORE_COUNTS")
STORED=$(pg_sql "SELECT count(*) FROM messages")

echo
echo "share of the machine (100% = both cores) in the 5 s profile, by party:"
# Thread names: a node's are chatmesh and actix-rt|system (its HTTP workers), the
# client's tokio-rt-worker, Redis's redis-server, PostgreSQL's postgres (every backend).
perf report -i "$DATA" --no-children -g none --sort comm,dso --stdio 2>/dev/null | awk '
    /^ +[0-9.]+%/ {
        pct = $1; sub("%", "", pct)
        dso = $NF
        comm = $2; if (NF > 3) comm = comm " " $3
        if (comm == "chatmesh" || comm ~ /^actix/) who = "chatmesh nodes"
        else if (comm ~ /^tokio-rt/ || comm == "chatmesh-bench") who = "chatmesh-bench"
        else if (comm == "redis-server") who = "redis-server"
        else if (comm == "postgres") who = "postgresql"
        else who = "other"
        if (dso ~ /kernel/) kernel[who] += pct; else user[who] += pct
        seen[who] = 1
    }
    END {
        n = split("chatmesh nodes,chatmesh-bench,postgresql,redis-server,other", order, ",")
        for (i = 1; i <= n; i++) {
            w = order[i]
            if (w in seen)
                printf "  %-15s %5.1f%%  kernel %5.1f%%  user %5.1f%%\n", w, kernel[w] + user[w], kernel[w], user[w]
        }
    }'

echo
echo "PostgreSQL per message stored, over the whole run ($STORED messages):"
python3 - "$STORE_BEFORE" "$STORE_AFTER" "$STORED" <<'PY'
import sys
before, after = ([int(x) for x in a.split("|")] for a in sys.argv[1:3])
n = max(int(sys.argv[3]), 1)
records, wal, buffers, commits, rollbacks = (a - b for a, b in zip(after, before))
print(f"  WAL records {records / n:5.1f}   WAL bytes {wal / n:6,.0f}   shared buffers touched {buffers / n:5.1f}")
print(f"  transactions: {commits:,} committed, {rollbacks:,} rolled back (a writer's retry)")
PY

[ -n "${CALL_GRAPH:-}" ] || exit 0
echo
echo "the nodes' samples by part of chatmesh (first match in the stack, in this order):"
NODE_PIDS=$(printf '%s,' "${PIDS[@]:0:3}")
perf script -i "$DATA" --pid "${NODE_PIDS%,}" -F ip,sym 2>/dev/null | python3 -c '
import collections, sys
# (part, what in a frame names it), checked in this order.
PARTS = [
    ("store (writer and readers, sqlx)", ("chatmesh::store::", "sqlx_")),
    ("peer API, receiving", ("chatmesh::http::peer",)),
    ("peer client, sending (awc)", ("awc::",)),
    ("directory (Redis)", ("redis::", "cluster::directory")),
    ("bridge and delivery queues", ("chatmesh::cluster::",)),
    ("chat rules (chat.rs)", ("chatmesh::chat",)),
    ("ChatServer (server.rs)", ("chatmesh::server",)),
    ("sessions and outboxes", ("chatmesh::session", "chatmesh::outbox")),
    ("websocket and HTTP I/O (actix-http)", ("actix_http::",)),
    ("runtime, waiting (epoll, timers)", ("park", "epoll")),
]
counts, total, stack = collections.Counter(), 0, []
def done():
    global total
    if not stack:
        return
    total += 1
    for part, marks in PARTS:
        if any(m in f for f in stack for m in marks):
            counts[part] += 1
            return
    counts["other"] += 1
for line in sys.stdin:
    if not line.strip():
        done(); stack = []
    else:
        stack.append(line)
done()
for part, n in counts.most_common():
    print(f"  {part:38s} {100 * n / max(total, 1):5.1f}%")
print(f"  ({total} samples)")
'

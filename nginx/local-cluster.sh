#!/usr/bin/env bash
# A chatmesh cluster on loopback, behind nginx, in one command:
# PostgreSQL (the store of record) + redis-server (the registry and directory) + NODES
# chatmesh nodes + nginx, all in a temporary directory that is removed again on Ctrl-C.
#
#   nginx/local-cluster.sh [--debug] [--no-build] [-- EXTRA NODE FLAGS...]
#
#   --debug     build and run the debug binary (default: release)
#   --no-build  do not run cargo; use the binary that is already in target/
#   -- ...      passed to every node, e.g. -- --api-key devkey --ping-interval-ms 5000
#
# Environment (defaults in brackets):
#   PORT [8080]                 nginx, the address to open in a browser
#   NODES [3]                   number of nodes, named node-1, node-2, ...
#   BASE_PORT [8081]            public port of node-1; node-i gets BASE_PORT+i-1
#   INTERNAL_BASE_PORT [BASE_PORT+1000]  peer API port of node-1, likewise
#   CHATMESH_BIN                run this binary instead of building one
#   NGINX [/usr/sbin/nginx, else nginx on PATH], REDIS_SERVER [redis-server]
#   PG_BIN [newest /usr/lib/postgresql/*/bin]  directory of initdb, postgres, psql
#   PG_USER [postgres]          as root: the user PostgreSQL runs as (it refuses root)
#   KEEP=1                      keep the temporary directory (logs, database) after exit
#   RUST_LOG [info]             log level of the nodes
set -euo pipefail

usage() { sed -n '2,24s/^# \{0,1\}//p' "$0"; }
die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=SCRIPTDIR/local-postgres.sh
source "$root/nginx/local-postgres.sh"

profile=release
build=1
node_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --debug) profile=debug ;;
        --no-build) build=0 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; node_args=("$@"); break ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
    shift
done

PORT=${PORT:-8080}
NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-8081}
INTERNAL_BASE_PORT=${INTERNAL_BASE_PORT:-$((BASE_PORT + 1000))}
for v in PORT NODES BASE_PORT INTERNAL_BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
((NODES >= 1)) || die "NODES must be at least 1"
((INTERNAL_BASE_PORT + NODES - 1 <= 65535 && BASE_PORT + NODES - 1 <= 65535)) || die "ports above 65535"
export RUST_LOG=${RUST_LOG:-info}

# --- programs -----------------------------------------------------------------------

need() { # need PROGRAM HINT
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}
if [[ -z ${NGINX:-} ]]; then
    if [[ -x /usr/sbin/nginx ]]; then NGINX=/usr/sbin/nginx; else NGINX=nginx; fi
fi
REDIS_SERVER=${REDIS_SERVER:-redis-server}
need "$NGINX" "install nginx (Debian/Ubuntu: apt-get install nginx-light) or set NGINX=/path/to/nginx"
need "$REDIS_SERVER" "install Redis (apt-get install redis-server) or set REDIS_SERVER=/path/to/redis-server"
need redis-cli "install the Redis tools (apt-get install redis-tools)"
need curl "install curl (apt-get install curl)"
need setsid "install util-linux"
_pg_find_bin || die "PostgreSQL is needed: the nodes of a cluster share one database"

if [[ -n ${CHATMESH_BIN:-} ]]; then
    bin=$CHATMESH_BIN
    [[ -x $bin ]] || die "CHATMESH_BIN=$bin is not an executable file"
else
    target=${CARGO_TARGET_DIR:-$root/target}
    bin=$target/$profile/chatmesh
    if ((build)); then
        need cargo "install Rust (https://rustup.rs) or set CHATMESH_BIN=/path/to/chatmesh"
        say "building chatmesh ($profile)"
        # The same packages as bench/compare.sh builds, so the two share their artifacts
        # (cargo unifies features over the packages it builds together).
        cargo_flags=(build -p chatmesh -p chatmesh-bench --manifest-path "$root/Cargo.toml")
        [[ $profile == release ]] && cargo_flags+=(--release)
        cargo "${cargo_flags[@]}" || die "cargo build failed"
    fi
    [[ -x $bin ]] || die "no binary at $bin (run without --no-build, or set CHATMESH_BIN)"
fi

# --- ports --------------------------------------------------------------------------

port_busy() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports=("$PORT")
for ((i = 0; i < NODES; i++)); do
    ports+=($((BASE_PORT + i)) $((INTERNAL_BASE_PORT + i)))
done
[[ $(printf '%s\n' "${ports[@]}" | sort | uniq -d) == "" ]] ||
    die "port ranges overlap: PORT=$PORT, public ${BASE_PORT}.., internal ${INTERNAL_BASE_PORT}.."
for p in "${ports[@]}"; do
    ! port_busy "$p" || die "port $p is already in use (choose others with PORT, BASE_PORT, INTERNAL_BASE_PORT)"
done

# --- runtime directory and cleanup --------------------------------------------------

# Logs, sockets and the database are for this user's eyes only.
umask 077
dir=$(mktemp -d "${TMPDIR:-/tmp}/chatmesh-cluster.XXXXXX")
# As root, PostgreSQL runs as another user, which must be able to reach its own
# directory in here: let others traverse (not list) this one.
[[ $(id -u) != 0 ]] || chmod 711 "$dir"
nginx_pid=
redis_pid=
node_pids=()
node_names=()

# stop NAME PID TIMEOUT_SECONDS: SIGTERM, wait up to the timeout, then SIGKILL.
stop() {
    local name=$1 pid=$2 secs=$3 status
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + secs))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not stop within ${secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    status=0
    wait "$pid" 2>/dev/null || status=$?
    # 127: already reaped by the monitor loop below.
    if ((status != 0 && status != 127)); then
        say "$name exited with status $status"
    fi
}

cleanup() {
    local status=$?
    set +e
    trap - INT TERM
    echo
    # Front door first (no new connections), then the nodes (they close websockets
    # with 1012, finish their writes and deregister from Redis), then Redis and
    # PostgreSQL (fast shutdown: it disconnects what is left and checkpoints).
    stop nginx "$nginx_pid" 10
    local i
    for i in "${!node_pids[@]}"; do kill -TERM "${node_pids[$i]}" 2>/dev/null; done
    for i in "${!node_pids[@]}"; do stop "${node_names[$i]}" "${node_pids[$i]}" 20; done
    stop redis-server "$redis_pid" 10
    pg_stop 20
    if [[ ${KEEP:-0} == 1 ]]; then
        say "kept $dir (logs: $dir/*.log, $dir/nginx/logs/)"
    else
        rm -rf "$dir"
    fi
    say "stopped"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# show_log NAME FILE: the end of a log, for a failure message.
show_log() {
    echo "----- last lines of $1 ($2) -----" >&2
    tail -n 40 "$2" >&2 2>/dev/null || true
    echo "-----" >&2
}

# Children run in their own session, so a Ctrl-C in the terminal reaches only this
# script, which then stops them in order (see cleanup). In a script without job
# control the background child is not a process group leader, so setsid does not
# fork and $! is the program's own pid.
spawn() { # spawn LOGFILE COMMAND...
    local log=$1
    shift
    setsid "$@" </dev/null >"$log" 2>&1 &
}

# --- postgresql ---------------------------------------------------------------------

say "runtime directory $dir"
# Unix socket in $dir/pg only, no TCP port. Each node keeps up to 5 connections.
pg_start "$dir/pg" "$dir/postgres.log" "max_connections=$((NODES * 5 > 80 ? NODES * 5 + 20 : 100))" ||
    die "PostgreSQL did not start (KEEP=1 keeps its log, $dir/postgres.log)"
pg_create_db chatmesh || die "could not create the database"
database_url=$(pg_url chatmesh)
say "PostgreSQL $(pg_version) ready on $dir/pg, database chatmesh"

# --- redis --------------------------------------------------------------------------

# Redis holds only the registry of live nodes and the directory of who is connected
# where, which the nodes rebuild: no persistence.
sock=$dir/redis.sock
spawn "$dir/redis.log" "$REDIS_SERVER" --port 0 --unixsocket "$sock" --unixsocketperm 700 \
    --save "" --appendonly no --dir "$dir" --daemonize no
redis_pid=$!
deadline=$((SECONDS + 10))
until [[ $(redis-cli -s "$sock" ping 2>/dev/null) == PONG ]]; do
    if ! kill -0 "$redis_pid" 2>/dev/null; then
        show_log redis-server "$dir/redis.log"
        die "redis-server exited before answering PING"
    fi
    if ((SECONDS >= deadline)); then
        show_log redis-server "$dir/redis.log"
        die "redis-server did not answer PING within 10s"
    fi
    sleep 0.05
done
say "redis-server ready on $sock"

# --- nodes --------------------------------------------------------------------------

secret=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
for ((i = 1; i <= NODES; i++)); do
    name=node-$i
    pub=$((BASE_PORT + i - 1))
    int=$((INTERNAL_BASE_PORT + i - 1))
    # The secret goes in the environment, not on the command line (ps shows that).
    CHATMESH_CLUSTER_SECRET=$secret spawn "$dir/$name.log" "$bin" \
        --node-id "$name" \
        --listen "127.0.0.1:$pub" \
        --internal-listen "127.0.0.1:$int" \
        --advertise "http://127.0.0.1:$int" \
        --redis-url "redis+unix://$sock" \
        --database-url "$database_url" \
        ${node_args[@]+"${node_args[@]}"}
    node_pids+=($!)
    node_names+=("$name")
done

# wait_ready NAME PID URL LOG...: polls URL until 200, failing (with the logs) if the
# process exits or the deadline passes.
wait_ready() {
    local name=$1 pid=$2 url=$3 deadline=$((SECONDS + 30)) status log
    shift 3
    until curl -fs -o /dev/null --max-time 1 "$url"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            for log in "$@"; do show_log "$name" "$log"; done
            die "$name exited (status $status) before $url answered 200; see its log above"
        fi
        if ((SECONDS >= deadline)); then
            for log in "$@"; do show_log "$name" "$log"; done
            die "$name: $url did not answer 200 within 30s"
        fi
        sleep 0.1
    done
}

for i in "${!node_pids[@]}"; do
    wait_ready "${node_names[$i]}" "${node_pids[$i]}" \
        "http://127.0.0.1:$((BASE_PORT + i))/readyz" "$dir/${node_names[$i]}.log"
    say "${node_names[$i]} ready"
done

# --- nginx --------------------------------------------------------------------------

ngx=$dir/nginx
mkdir -p "$ngx/logs" "$ngx/temp"
upstreams=()
for ((i = 0; i < NODES; i++)); do upstreams+=("127.0.0.1:$((BASE_PORT + i))"); done
"$here/render-conf.sh" "127.0.0.1:$PORT" "$ngx" "${upstreams[@]}" >"$ngx/nginx.conf"
if ! "$NGINX" -t -q -p "$ngx/" -c "$ngx/nginx.conf" -g 'daemon off;' 2>"$ngx/test.log"; then
    show_log "nginx -t" "$ngx/test.log"
    die "nginx rejected the rendered configuration $ngx/nginx.conf"
fi
spawn "$ngx/stderr.log" "$NGINX" -p "$ngx/" -c "$ngx/nginx.conf" -g 'daemon off;'
nginx_pid=$!
wait_ready nginx "$nginx_pid" "http://127.0.0.1:$PORT/healthz" "$ngx/stderr.log" "$ngx/logs/error.log"

# --- running ------------------------------------------------------------------------

cat <<EOF

chatmesh cluster is up: $NODES nodes behind nginx, PostgreSQL in $dir/pg, Redis at $sock

  through nginx:   http://127.0.0.1:$PORT/
EOF
for i in "${!node_names[@]}"; do
    printf '  %-16s http://127.0.0.1:%d/   (peer API on 127.0.0.1:%d, not proxied)\n' \
        "${node_names[$i]}:" $((BASE_PORT + i)) $((INTERNAL_BASE_PORT + i))
done
cat <<EOF

Try it: open these two in separate windows and chat.
  http://127.0.0.1:$PORT/chat?uid=alice&to=bob
  http://127.0.0.1:$PORT/chat?uid=bob&to=alice
To see a message cross nodes, open them on two different nodes, e.g.
  http://127.0.0.1:$BASE_PORT/chat?uid=alice&to=bob
  http://127.0.0.1:$((BASE_PORT + NODES - 1))/chat?uid=bob&to=alice

Database: psql '$database_url'
Logs: $dir/node-*.log, $dir/postgres.log, $dir/redis.log, $ngx/logs/{access,error}.log
Stop a node to watch failover:  kill ${node_pids[0]}   (${node_names[0]})
Ctrl-C stops everything.
EOF

# Report children that exit on their own (e.g. a node you killed). nginx going away
# ends the run; a node going away does not (nginx routes around it).
declare -A reported=()
while true; do
    wait -n || true
    if ! kill -0 "$nginx_pid" 2>/dev/null; then
        show_log "nginx error log" "$ngx/logs/error.log"
        die "nginx exited"
    fi
    if ! kill -0 "$redis_pid" 2>/dev/null && [[ -z ${reported[redis]:-} ]]; then
        reported[redis]=1
        show_log redis-server "$dir/redis.log"
        say "redis-server exited; the nodes lose the registry and directory (no cross-node delivery) until it is back"
    fi
    if ! kill -0 "$PG_PID" 2>/dev/null && [[ -z ${reported[postgres]:-} ]]; then
        reported[postgres]=1
        show_log postgres "$dir/postgres.log"
        say "PostgreSQL exited; the nodes cannot store or read messages until it is back"
    fi
    for i in "${!node_pids[@]}"; do
        if ! kill -0 "${node_pids[$i]}" 2>/dev/null && [[ -z ${reported[$i]:-} ]]; then
            reported[$i]=1
            say "${node_names[$i]} (pid ${node_pids[$i]}) exited; nginx sends its traffic to the others"
            tail -n 5 "$dir/${node_names[$i]}.log" | sed 's/^/    /'
        fi
    done
done

# shellcheck shell=bash
# A throwaway PostgreSQL for the scripts in nginx/ and bench/ (sourced, not run):
# `initdb` into a directory, the server listening on a unix socket in that directory
# only (no TCP port), trust authentication for the `postgres` role. The same recipe as
# tests/common/postgres.rs.
#
#   pg_start DIR LOG [NAME=VALUE...]
#       Creates DIR (it must not exist; its parent must be searchable by the server's
#       user), runs initdb into DIR/data and starts `postgres` with its socket in DIR
#       and the given extra settings (`-c NAME=VALUE`). Waits up to PG_START_TIMEOUT
#       seconds (30) until it accepts connections. Sets PG_PID (the postmaster) and
#       PG_SOCKET_DIR. Output of initdb and the server goes to LOG.
#   pg_create_db NAME   creates database NAME (fails if it exists)
#   pg_url NAME         prints the URL of database NAME, for --database-url
#   pg_warm_wal [MB]    writes about MB (600) of WAL into a scratch table, drops it and
#                       checkpoints, so that the server has that much of used WAL segment
#                       files to recycle, as a server that has run for a while does. A
#                       fresh cluster has none: each 16 MB of WAL written makes a new
#                       file, zero-filled and fsynced inside some commit, which stalls
#                       every commit behind it (pg_stat_activity shows IO/WALInitSync).
#                       For benchmarks; takes a few seconds.
#   pg_stop [SECS]      fast shutdown (SIGINT: clients are disconnected, the server
#                       checkpoints and exits), up to SECS (10) seconds; then immediate
#                       shutdown (SIGQUIT), then SIGKILL. Does nothing if not running.
#   pg_version          prints e.g. "15.20"
#
# Every function prints what went wrong to stderr and returns non-zero; none exits.
#
# Environment: PG_BIN, the directory of initdb, postgres, pg_isready and psql (default:
# the newest /usr/lib/postgresql/*/bin, else where initdb or pg_config is on PATH);
# PG_USER, as root only, the user the server runs as (default: postgres; PostgreSQL
# refuses to run as root, and initdb's directories must belong to that user).
#
# Start the server from a script without job control (the default for scripts): then
# `setsid` does not fork and PG_PID is the server's own pid, a child of the script.

PG_PID=
PG_SOCKET_DIR=
_pg_as_user=()

_pg_err() { echo "postgres: $*" >&2; }

# Finds PG_BIN.
_pg_find_bin() {
    local d v best='' best_v=-1
    if [[ -z ${PG_BIN:-} ]]; then
        for d in /usr/lib/postgresql/*/bin; do
            [[ -x $d/postgres ]] || continue
            v=${d#/usr/lib/postgresql/}
            v=${v%/bin}
            if [[ $v =~ ^[0-9]+$ ]] && ((v > best_v)); then
                best=$d
                best_v=$v
            fi
        done
        if [[ -z $best ]] && command -v initdb >/dev/null 2>&1; then
            best=$(dirname "$(command -v initdb)")
        fi
        if [[ -z $best ]] && command -v pg_config >/dev/null 2>&1; then
            best=$(pg_config --bindir)
        fi
        if [[ -z $best ]]; then
            _pg_err "no PostgreSQL found: install it (Debian/Ubuntu: apt-get install postgresql) or set PG_BIN=/path/to/its/bin"
            return 1
        fi
        PG_BIN=$best
    fi
    for v in initdb postgres pg_isready psql; do
        if [[ ! -x $PG_BIN/$v ]]; then
            _pg_err "PG_BIN=$PG_BIN has no $v"
            return 1
        fi
    done
}

# Sets _pg_as_user: the command prefix that runs a program as the server's user.
_pg_find_user() {
    _pg_as_user=()
    [[ $(id -u) == 0 ]] || return 0
    local user=${PG_USER:-postgres}
    if ! id -u "$user" >/dev/null 2>&1; then
        _pg_err "PostgreSQL refuses to run as root, and there is no user '$user' to run it as (create one, or set PG_USER)"
        return 1
    fi
    if [[ $(id -u "$user") == 0 ]]; then
        _pg_err "PG_USER=$user is root; PostgreSQL refuses to run as root"
        return 1
    fi
    if ! command -v setpriv >/dev/null 2>&1; then
        _pg_err "setpriv (util-linux) is needed to run PostgreSQL as '$user'"
        return 1
    fi
    _pg_as_user=(setpriv "--reuid=$(id -u "$user")" "--regid=$(id -g "$user")" --init-groups)
}

pg_version() {
    _pg_find_bin || return 1
    "$PG_BIN/postgres" --version | sed 's/^[^0-9]*\([0-9][0-9.]*\).*/\1/'
}

pg_start() {
    local dir=$1 log=$2 secs=${PG_START_TIMEOUT:-30} setting deadline
    shift 2
    _pg_find_bin || return 1
    _pg_find_user || return 1
    if [[ -n $PG_PID ]]; then
        _pg_err "already started (pid $PG_PID)"
        return 1
    fi
    if [[ $dir != /* ]]; then
        _pg_err "DIR must be an absolute path, got '$dir'"
        return 1
    fi
    # The socket path must fit in sun_path (107 bytes).
    if ((${#dir} + 16 > 107)); then
        _pg_err "'$dir' is too long for a unix socket path; set TMPDIR to a shorter directory"
        return 1
    fi
    mkdir -m 700 "$dir" || return 1
    if ((${#_pg_as_user[@]})); then
        chown "${_pg_as_user[1]#--reuid=}:${_pg_as_user[2]#--regid=}" "$dir" || return 1
        if ! "${_pg_as_user[@]}" test -w "$dir"; then
            _pg_err "user ${PG_USER:-postgres} cannot write to $dir: every directory above it must be searchable by that user (chmod o+x)"
            return 1
        fi
    fi
    # The server's user may not be able to enter this script's working directory.
    if ! (cd "$dir" && ${_pg_as_user[@]+"${_pg_as_user[@]}"} "$PG_BIN/initdb" \
        --auth=trust --username=postgres --encoding=UTF8 --locale=C --no-sync \
        -D "$dir/data") </dev/null >"$log" 2>&1; then
        _pg_err "initdb failed; its output:"
        tail -n 20 "$log" >&2
        return 1
    fi
    local args=(-D "$dir/data" -k "$dir" -c listen_addresses= -c unix_socket_permissions=0700)
    for setting in "$@"; do args+=(-c "$setting"); done
    (cd "$dir" && exec setsid ${_pg_as_user[@]+"${_pg_as_user[@]}"} "$PG_BIN/postgres" "${args[@]}") \
        </dev/null >>"$log" 2>&1 &
    PG_PID=$!
    PG_SOCKET_DIR=$dir
    deadline=$((SECONDS + secs))
    until "$PG_BIN/pg_isready" -q -h "$dir" -U postgres -d postgres -t 1 2>/dev/null; do
        if ! kill -0 "$PG_PID" 2>/dev/null; then
            wait "$PG_PID" 2>/dev/null || true
            PG_PID=
            _pg_err "the server exited before it accepted connections; its log:"
            tail -n 20 "$log" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            _pg_err "the server did not accept connections within ${secs}s; its log:"
            tail -n 20 "$log" >&2
            pg_stop 5
            return 1
        fi
        sleep 0.1
    done
}

pg_create_db() {
    local name=$1
    if [[ ! $name =~ ^[a-z_][a-z0-9_]*$ ]]; then
        _pg_err "database name must be lower-case letters, digits and _, got '$name'"
        return 1
    fi
    if [[ -z $PG_SOCKET_DIR ]]; then
        _pg_err "pg_create_db before pg_start"
        return 1
    fi
    PGCONNECT_TIMEOUT=10 timeout 30 "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$PG_SOCKET_DIR" -U postgres -d postgres -c "CREATE DATABASE $name" </dev/null ||
        { _pg_err "could not create database $name"; return 1; }
}

pg_warm_wal() {
    local mb=${1:-600}
    if [[ -z $PG_SOCKET_DIR ]]; then
        _pg_err "pg_warm_wal before pg_start"
        return 1
    fi
    # About 1 KiB of WAL a row.
    PGCONNECT_TIMEOUT=10 timeout 120 "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$PG_SOCKET_DIR" -U postgres -d postgres \
        -c "CREATE TABLE pg_warm_wal AS SELECT g, repeat('x', 900) AS pad FROM generate_series(1, $((mb * 1000))) g" \
        -c "DROP TABLE pg_warm_wal" -c "CHECKPOINT" </dev/null ||
        { _pg_err "could not warm the WAL"; return 1; }
}

pg_url() {
    local name=$1 enc='' c i
    # The socket directory goes in the query string: percent-encode what is not plain.
    for ((i = 0; i < ${#PG_SOCKET_DIR}; i++)); do
        c=${PG_SOCKET_DIR:i:1}
        if [[ $c =~ [A-Za-z0-9/._~-] ]]; then enc+=$c; else enc+=$(printf '%%%02X' "'$c"); fi
    done
    printf 'postgres://postgres@localhost/%s?host=%s\n' "$name" "$enc"
}

# The pids whose parent is $1.
_pg_children() {
    local stat f rest
    for f in /proc/[0-9]*/stat; do
        stat=$(cat "$f" 2>/dev/null) || continue
        rest=${stat##*) }
        rest=${rest#* }
        if [[ ${rest%% *} == "$1" ]]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

_pg_wait_gone() { # _pg_wait_gone PID SECONDS
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

pg_stop() {
    local secs=${1:-10} pid=$PG_PID children=()
    [[ -n $pid ]] || return 0
    PG_PID=
    if kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null || true
        if ! _pg_wait_gone "$pid" "$secs"; then
            _pg_err "no fast shutdown within ${secs}s; immediate shutdown"
            kill -QUIT "$pid" 2>/dev/null || true
            if ! _pg_wait_gone "$pid" 5; then
                _pg_err "still running; killing the server and its processes"
                # Backends run in sessions of their own: each is signalled by pid.
                mapfile -t children < <(_pg_children "$pid")
                kill -KILL "$pid" ${children[@]+"${children[@]}"} 2>/dev/null || true
            fi
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

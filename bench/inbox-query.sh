#!/usr/bin/env bash
# How long the `inbox` query takes for a user with many conversations, on SQLite and on
# PostgreSQL: the schema from migrations/, filled with CONVS (1000) DM conversations of
# one user of MESSAGES (20) messages each (half from the other side, the user's read mark
# at 10), plus as many conversations of other users; then the store's inbox statement
# for the first page and a page deep in the list (50 conversations each), timed REPEAT
# (20) times by each database (SQLite: 10 x REPEAT in one sqlite3 shell, less its own
# cost; PostgreSQL: EXPLAIN ANALYZE), with the plan. The statements are the ones in src/store/sql/.
#
#   bench/inbox-query.sh
#
# Needs sqlite3 and PostgreSQL's server programs. Everything is in a temporary
# directory, removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/../nginx/local-postgres.sh
source "$ROOT/nginx/local-postgres.sh"
: "${CONVS:=1000}" "${MESSAGES:=20}" "${REPEAT:=20}"
command -v sqlite3 >/dev/null || { echo "sqlite3 is missing" >&2; exit 2; }
_pg_find_bin || exit 2

TMP=$(mktemp -d /tmp/chatmesh-inbox.XXXXXX)
[ "$(id -u)" != 0 ] || chmod 711 "$TMP"
cleanup() { pg_stop 5 >/dev/null 2>&1 || true; rm -rf "$TMP"; }
trap cleanup EXIT

COLS="l.conv, l.seq, l.id, l.sender, l.body, l.ts, l.edit_of, l.delete_of, l.edited, l.deleted"
# The page of conversations ($2: before this ts, $4: ties after this conv), then the
# last message and the unread count of just those.
inbox_sql() { # $1: "sqlite" or "postgres"
    local deleted="u.deleted = 0" nulls="c.last_ts IS NULL, c.last_ts DESC" pnulls="p.last_ts IS NULL, p.last_ts DESC"
    local t2="\$2" t4="\$4"
    if [ "$1" = postgres ]; then
        deleted="NOT u.deleted"; nulls="c.last_ts DESC NULLS LAST"; pnulls="p.last_ts DESC NULLS LAST"
        t2="\$2::bigint"; t4="\$4::text"
    fi
    echo "WITH page AS (
  SELECT m.conv, m.read_seq, c.last_seq, c.last_ts FROM members m
  LEFT JOIN conversations c ON c.conv = m.conv
  WHERE m.uid = \$1 AND ($t2 IS NULL OR c.last_ts IS NULL OR c.last_ts < \$2
     OR (c.last_ts = \$2 AND m.conv > $t4))
  ORDER BY $nulls, m.conv LIMIT \$3)
SELECT p.conv, p.read_seq,
  (SELECT count(*) FROM messages u WHERE u.conv = p.conv AND u.seq > p.read_seq
   AND u.sender <> \$1 AND u.edit_of IS NULL AND u.delete_of IS NULL AND $deleted),
  $COLS
FROM page p LEFT JOIN messages l ON l.conv = p.conv AND l.seq = p.last_seq
ORDER BY $pnulls, p.conv"
}

# Rows: users me and other, each with CONVS conversations with u0001.. (other's with
# v0001..), MESSAGES messages each, conversation k's last message at ts 1e12 + k.
fill_sql() { # $1: sqlite | postgres
    local series
    if [ "$1" = sqlite ]; then
        series="WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < $CONVS),
  s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $MESSAGES),
  who(me, peer) AS (VALUES ('me', 'u'), ('other', 'v'))"
    else
        series="WITH n(k) AS (SELECT generate_series(1, $CONVS)),
  s(i) AS (SELECT generate_series(1, $MESSAGES)),
  who(me, peer) AS (VALUES ('me', 'u'), ('other', 'v'))"
    fi
    local pad="substr('000' || k, -4, 4)" false=0
    if [ "$1" = postgres ]; then pad="lpad(k::text, 4, '0')"; false=false; fi
    cat <<SQL
BEGIN;
CREATE TEMP TABLE convs AS $series
  SELECT 'dm:' || me || ':' || peer || $pad AS conv, me, peer || $pad AS peer, k FROM n, who;
INSERT INTO conversations (conv, last_seq, last_ts) SELECT conv, $MESSAGES, 1000000000000 + k FROM convs;
INSERT INTO members (conv, uid, role, read_seq, delivered_seq) SELECT conv, me, 'dm', 10, 10 FROM convs;
INSERT INTO members (conv, uid, role, read_seq, delivered_seq) SELECT conv, peer, 'dm', 0, 0 FROM convs;
INSERT INTO messages (conv, seq, id, sender, body, ts, edited, deleted)
  $( [ "$1" = sqlite ] && echo "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $MESSAGES)" || echo "WITH s(i) AS (SELECT generate_series(1, $MESSAGES))" )
  SELECT conv, i, conv || '/' || i, CASE WHEN i % 2 = 0 THEN me ELSE peer END,
         'a message body of about sixty-four bytes, as in the benchmark.', 1000000000000 + k - $MESSAGES + i, $false, $false
  FROM convs, s;
COMMIT;
SQL
}

echo "inbox of a user with $CONVS conversations of $MESSAGES messages ($((2 * CONVS * MESSAGES)) messages, $((4 * CONVS)) member rows in all), pages of 50"

# --- SQLite
DB=$TMP/inbox.db
sqlite3 "$DB" < "$ROOT/migrations/sqlite/0001_init.sql"
fill_sql sqlite | sqlite3 "$DB"
sqlite3 "$DB" "ANALYZE;"
Q=$(inbox_sql sqlite)
echo
echo "== SQLite $(sqlite3 --version | cut -d' ' -f1)"
for page in first deep; do
    if [ $page = first ]; then before_ts=NULL; else before_ts=$((1000000000000 + CONVS / 2)); fi
    params=".parameter set \$1 \"'me'\"
.parameter set \$2 $before_ts
.parameter set \$3 51
.parameter set \$4 NULL"
    rows=$(printf '%s\n%s;\n' "$params" "$Q" | sqlite3 "$DB" | wc -l)
    # The shell's timer has 1 ms resolution: time 10 x REPEAT queries in one shell
    # instead, less the same shell running as many trivial statements.
    n=$((10 * REPEAT))
    run() { { echo "$params"; for _ in $(seq "$n"); do echo "$1;"; done; } > "$TMP/q.sql"
            local t0; t0=$(date +%s%N); sqlite3 "$DB" < "$TMP/q.sql" >/dev/null; echo $(( $(date +%s%N) - t0 )); }
    total=$(run "$Q"); base=$(run "SELECT 1")
    echo "$page page ($rows rows): $(awk -v t="$total" -v b="$base" -v n="$n" 'BEGIN { printf "%.3f", (t - b) / n / 1e6 }') ms per query (mean of $n)"
done
echo "plan:"
printf '.parameter set $1 "'"'me'"'"\n.parameter set $2 NULL\n.parameter set $3 51\n.parameter set $4 NULL\nEXPLAIN QUERY PLAN %s;\n' "$Q" | sqlite3 "$DB" | sed 's/^/  /'

# --- PostgreSQL
pg_start "$TMP/pg" "$TMP/pg.log" >/dev/null
pg_create_db inbox
PSQL=("$PG_BIN/psql" -h "$PG_SOCKET_DIR" -U postgres -d inbox -q -X -v ON_ERROR_STOP=1)
"${PSQL[@]}" -f <(cat "$ROOT"/migrations/postgres/*.sql) >/dev/null
fill_sql postgres | "${PSQL[@]}" >/dev/null
"${PSQL[@]}" -c "ANALYZE" >/dev/null
echo
echo "== PostgreSQL $(pg_version)"
Q=$(inbox_sql postgres)
for page in first deep; do
    if [ $page = first ]; then before_ts=NULL; else before_ts=$((1000000000000 + CONVS / 2)); fi
    prep="PREPARE inbox(text, bigint, bigint, text) AS $Q;"
    times=$( { echo "$prep"; for _ in $(seq "$REPEAT"); do echo "EXPLAIN (ANALYZE, TIMING OFF) EXECUTE inbox('me', $before_ts, 51, NULL);"; done; } \
        | "${PSQL[@]}" -t | awk '/Execution Time/ {print $3}' | sort -n)
    echo "$page page: ms per query (execution), min $(echo "$times" | head -1), median $(echo "$times" | sed -n "$((REPEAT / 2))p"), max $(echo "$times" | tail -1)"
done
echo "plan (first page):"
{ echo "PREPARE inbox(text, bigint, bigint, text) AS $Q;"; echo "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE inbox('me', NULL, 51, NULL);"; } \
    | "${PSQL[@]}" -t | sed 's/^/  /'

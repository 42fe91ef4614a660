-- chatmesh schema, SQLite. The same tables as migrations/postgres/0001_init.sql; see
-- README "Database schema". Every table that holds a message or a mark is keyed by
-- conversation first.

-- The epoch (the life of this database) and other single values.
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per conversation: its seq counter. last_seq is taken in the same
-- transaction that inserts the message, so seqs are gap-free.
CREATE TABLE conversations (
    conv TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_ts INTEGER
) WITHOUT ROWID;

-- Every message, never trimmed (an optional retention purges by age). An edit or a
-- delete is a message of its own naming the seq it changes (edit_of, delete_of); the
-- changed message carries its latest body and edited, or no body and deleted.
CREATE TABLE messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT,
    ts INTEGER NOT NULL,
    edit_of INTEGER,
    delete_of INTEGER,
    edited INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE INDEX messages_ts ON messages (ts);
CREATE INDEX messages_edits ON messages (conv, edit_of) WHERE edit_of IS NOT NULL;

-- Who takes part in a conversation: the two participants of a DM (role 'dm', from
-- its first message on) and the members of a room ('owner' or 'member'), with their
-- read and delivered marks.
CREATE TABLE members (
    conv TEXT NOT NULL,
    uid TEXT NOT NULL,
    role TEXT NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, uid)
) WITHOUT ROWID;
CREATE INDEX members_uid ON members (uid, conv);

-- Rooms: public or private, with their member count (kept with every change).
CREATE TABLE rooms (
    room TEXT PRIMARY KEY,
    private INTEGER NOT NULL DEFAULT 0,
    created_ts INTEGER NOT NULL,
    members INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Users banned from a room until an owner adds them again.
CREATE TABLE bans (
    room TEXT NOT NULL,
    uid TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (room, uid)
) WITHOUT ROWID;

-- The message first stored under a client id, for idempotent resends; purged after
-- expiry.
CREATE TABLE idempotency (
    sender TEXT NOT NULL,
    client_id TEXT NOT NULL,
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (sender, client_id)
) WITHOUT ROWID;
CREATE INDEX idempotency_expires ON idempotency (expires);

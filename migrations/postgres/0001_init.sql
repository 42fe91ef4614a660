-- chatmesh schema, PostgreSQL. The same tables as migrations/sqlite/0001_init.sql; see
-- README "Database schema". Every table that holds a message or a mark is keyed by
-- conversation first, so they can be distributed by conversation (e.g. Citus).

-- The epoch (the life of this database) and other single values.
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per conversation: its seq counter. The append transaction locks the row
-- (SELECT ... FOR UPDATE), takes the next seqs and inserts the messages, so seqs are
-- gap-free with any number of nodes writing.
CREATE TABLE conversations (
    conv TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL DEFAULT 0,
    last_ts BIGINT
);

-- Every message, never trimmed (an optional retention purges by age). An edit or a
-- delete is a message of its own naming the seq it changes (edit_of, delete_of); the
-- changed message carries its latest body and edited, or no body and deleted.
CREATE TABLE messages (
    conv TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT,
    ts BIGINT NOT NULL,
    edit_of BIGINT,
    delete_of BIGINT,
    edited BOOLEAN NOT NULL DEFAULT FALSE,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (conv, seq)
);
CREATE INDEX messages_ts ON messages (ts);
CREATE INDEX messages_edits ON messages (conv, edit_of) WHERE edit_of IS NOT NULL;

-- Who takes part in a conversation: the two participants of a DM (role 'dm', from
-- its first message on) and the members of a room ('owner' or 'member'), with their
-- read and delivered marks.
CREATE TABLE members (
    conv TEXT NOT NULL,
    uid TEXT NOT NULL,
    role TEXT NOT NULL,
    read_seq BIGINT NOT NULL DEFAULT 0,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, uid)
);
CREATE INDEX members_uid ON members (uid, conv);

-- Rooms: public or private, with their member count (kept with every change, under
-- the room row's lock, which every membership change takes first).
CREATE TABLE rooms (
    room TEXT PRIMARY KEY,
    private BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts BIGINT NOT NULL,
    members BIGINT NOT NULL DEFAULT 0
);

-- Users banned from a room until an owner adds them again.
CREATE TABLE bans (
    room TEXT NOT NULL,
    uid TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (room, uid)
);

-- The message first stored under a client id, for idempotent resends; purged after
-- expiry.
CREATE TABLE idempotency (
    sender TEXT NOT NULL,
    client_id TEXT NOT NULL,
    conv TEXT NOT NULL,
    seq BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    PRIMARY KEY (sender, client_id)
);
CREATE INDEX idempotency_expires ON idempotency (expires);

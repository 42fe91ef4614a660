-- The two indexes that only the purge reads (messages by age for the retention,
-- client ids past their expiry) become BRIN indexes. Both columns grow with the order
-- rows are written in (ts and ts + the id's lifetime), so a summary of each range of
-- pages finds the old rows as well as a B-tree; and a BRIN index costs an append
-- nothing while its newest range is unsummarised, where each B-tree cost a descent and
-- a WAL record for every message (two of the append's thirteen; see BENCHMARKS.md).
-- autosummarize has autovacuum summarise each range once it is full.
--
-- Building an index here locks its table against writes until the build ends (every
-- node's appends wait). On a large database, build them beforehand without the lock
-- (README, "Database schema"): then this finds them and only drops the B-trees.
DROP INDEX IF EXISTS messages_ts;
CREATE INDEX IF NOT EXISTS messages_ts_brin ON messages USING brin (ts)
    WITH (autosummarize = on);
DROP INDEX IF EXISTS idempotency_expires;
CREATE INDEX IF NOT EXISTS idempotency_expires_brin ON idempotency USING brin (expires)
    WITH (autosummarize = on);

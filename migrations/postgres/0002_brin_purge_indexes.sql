-- The two indexes that only the purge reads (messages by age for the retention,
-- client ids past their expiry) become BRIN indexes. Both columns grow with the order
-- rows are written in (ts and ts + the id's lifetime), so a summary of each range of
-- pages finds the old rows as well as a B-tree; and a BRIN index costs an append
-- nothing while its newest range is unsummarised, where each B-tree cost a descent and
-- a WAL record for every message (two of the append's thirteen; see BENCHMARKS.md).
-- autosummarize has autovacuum summarise each range once it is full.
DROP INDEX messages_ts;
CREATE INDEX messages_ts ON messages USING brin (ts) WITH (autosummarize = on);
DROP INDEX idempotency_expires;
CREATE INDEX idempotency_expires ON idempotency USING brin (expires) WITH (autosummarize = on);

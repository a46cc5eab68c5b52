-- The window table's primary key leads with (key, window_start): the same unique set, which
-- now also serves lookups by key and time, so the separate (key, window_start) index goes.
-- Inserting a window row maintains one btree instead of two, and its comparisons mostly end
-- at the key and the window start instead of walking five equal leading columns (a COPY of
-- 276 k window rows in 10 transactions, measured with psql on the 2-core machine: 1.20 s
-- instead of 2.17 s).
ALTER TABLE window_aggregates DROP CONSTRAINT window_aggregates_pkey;
ALTER TABLE window_aggregates
    ADD PRIMARY KEY (key, window_start, window_kind, size_ms, slide_ms, partition, source_topic);
DROP INDEX window_aggregates_key_start;

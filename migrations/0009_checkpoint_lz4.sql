-- Checkpoint bytes are compressed with lz4 instead of pglz when PostgreSQL stores them out of
-- line (TOAST): pglz_compress was nearly all of the 3.5 s a 1 M-key base (77 MB) took to
-- commit; with lz4 0.35-0.39 s (`cargo bench --bench state`). A server built without lz4 (or
-- older than PostgreSQL 14) keeps pglz: the migration then changes nothing.
DO $$
BEGIN
    ALTER TABLE partition_checkpoints ALTER COLUMN state SET COMPRESSION lz4;
    ALTER TABLE partition_checkpoint_deltas ALTER COLUMN delta SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'lz4 is not available on this server: checkpoints stay compressed with pglz';
END
$$;

-- Checkpoint deltas: what changed in a partition's state since its base checkpoint
-- (partition_checkpoints.state, whose next_offset is the base's own), oldest first by seq. A
-- worker restores the base and applies the deltas that name it (base_offset = the base's
-- next_offset) in order; writing a new base deletes them. A binary that knows no deltas reads
-- the base and its offset, a consistent pair, and replays from there. Written in the same
-- transaction as the outputs they account for.
CREATE TABLE partition_checkpoint_deltas (
    group_id     text        NOT NULL,
    source_topic text        NOT NULL,
    partition    integer     NOT NULL,
    seq          bigint      NOT NULL,
    base_offset  bigint      NOT NULL,
    next_offset  bigint      NOT NULL,
    delta        bytea       NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, source_topic, partition, seq)
);

-- How far each partition's checkpoint has come: the next offset of its latest checkpoint, base
-- or delta (partition_checkpoints.next_offset alone is the base's).
CREATE OR REPLACE VIEW partition_progress AS
SELECT c.group_id, c.source_topic, c.partition,
       GREATEST(c.next_offset, COALESCE(max(d.next_offset), c.next_offset)) AS next_offset,
       GREATEST(c.updated_at, COALESCE(max(d.written_at), c.updated_at)) AS updated_at,
       count(d.seq) AS deltas
FROM partition_checkpoints c
LEFT JOIN partition_checkpoint_deltas d
       ON d.group_id = c.group_id AND d.source_topic = c.source_topic
      AND d.partition = c.partition AND d.base_offset = c.next_offset
GROUP BY c.group_id, c.source_topic, c.partition, c.next_offset, c.updated_at;

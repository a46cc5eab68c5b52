-- Checkpoint deltas: what changed in a partition's state since its base checkpoint
-- (partition_checkpoints.state), oldest first by seq. A worker restores the base and applies
-- the deltas in order; writing a new base deletes them. Written in the same transaction as the
-- outputs they account for; partition_checkpoints.next_offset follows the latest delta.
CREATE TABLE partition_checkpoint_deltas (
    group_id     text        NOT NULL,
    source_topic text        NOT NULL,
    partition    integer     NOT NULL,
    seq          bigint      NOT NULL,
    next_offset  bigint      NOT NULL,
    delta        bytea       NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, source_topic, partition, seq)
);

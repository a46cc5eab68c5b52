-- Per-partition checkpoints: the processor's state snapshot and the next offset to read.
-- Written in the same transaction as the outputs they account for.
CREATE TABLE partition_checkpoints (
    group_id     text        NOT NULL,
    source_topic text        NOT NULL,
    partition    integer     NOT NULL,
    next_offset  bigint      NOT NULL,
    state        bytea       NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, source_topic, partition)
);

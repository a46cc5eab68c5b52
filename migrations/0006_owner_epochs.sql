-- Partition ownership epochs (fencing). A worker claims its partition (epoch + 1) before it
-- reads the checkpoint; every batch transaction locks this row and commits only while the epoch
-- is still its own, so a worker that lost its partition can never write after the next owner
-- started.
CREATE TABLE partition_owners (
    group_id     text        NOT NULL,
    source_topic text        NOT NULL,
    partition    integer     NOT NULL,
    epoch        bigint      NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, source_topic, partition)
);

-- "Active in the last hour" in event time: within an hour of the latest cluster update of the
-- same source partition (the wall clock says nothing about replayed or historical streams).
CREATE OR REPLACE VIEW clusters_active_last_hour AS
SELECT c.*
FROM clusters c
WHERE c.updated_at >= (
    SELECT max(l.updated_at) FROM clusters l
    WHERE l.source_topic = c.source_topic AND l.partition = c.partition
) - interval '1 hour';

-- One row per (source partition, window, key): a later revision or the final replaces updates.
CREATE TABLE window_aggregates (
    source_topic  text             NOT NULL,
    partition     integer          NOT NULL,
    window_kind   text             NOT NULL CHECK (window_kind IN ('tumbling', 'hopping', 'sliding')),
    size_ms       bigint           NOT NULL,
    slide_ms      bigint           NOT NULL,
    key           text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    window_end    timestamptz      NOT NULL,
    count         bigint           NOT NULL,
    sum           double precision NOT NULL,
    mean          double precision,
    std           double precision,
    min           double precision,
    max           double precision,
    is_final      boolean          NOT NULL,
    revision      integer          NOT NULL,
    source_offset bigint           NOT NULL,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, partition, window_kind, size_ms, slide_ms, key, window_start)
);

CREATE INDEX window_aggregates_key_start ON window_aggregates (key, window_start);

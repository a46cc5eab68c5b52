-- Drift alerts and outliers (filled by the NCS engine); keyed by their source offset.
CREATE TABLE drift_alerts (
    source_topic      text        NOT NULL,
    partition         integer     NOT NULL,
    source_offset     bigint      NOT NULL,
    detector          text        NOT NULL,
    severity          text        NOT NULL CHECK (severity IN ('low', 'medium', 'high')),
    affected_clusters bigint[]    NOT NULL,
    statistic         double precision,
    recommendation    text,
    detected_at       timestamptz NOT NULL,
    PRIMARY KEY (source_topic, partition, source_offset, detector)
);

CREATE TABLE outliers (
    source_topic  text             NOT NULL,
    partition     integer          NOT NULL,
    source_offset bigint           NOT NULL,
    event_id      text,
    key           text             NOT NULL,
    ts            timestamptz      NOT NULL,
    features      double precision[] NOT NULL,
    outlier_score double precision NOT NULL,
    reason        text             NOT NULL,
    PRIMARY KEY (source_topic, partition, source_offset)
);

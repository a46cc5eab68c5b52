-- Clustering outputs (filled by the NCS engine): latest state per cluster and the history.
CREATE TABLE clusters (
    source_topic      text             NOT NULL,
    partition         integer          NOT NULL,
    cluster_id        bigint           NOT NULL,
    centroid          double precision[] NOT NULL,
    weight            double precision NOT NULL,
    radius            double precision NOT NULL,
    quality           double precision,
    drift_coefficient double precision,
    status            text             NOT NULL,
    created_at        timestamptz      NOT NULL,
    updated_at        timestamptz      NOT NULL,
    source_offset     bigint           NOT NULL,
    PRIMARY KEY (source_topic, partition, cluster_id)
);

CREATE TABLE cluster_updates (
    source_topic      text             NOT NULL,
    partition         integer          NOT NULL,
    cluster_id        bigint           NOT NULL,
    source_offset     bigint           NOT NULL,
    event             text             NOT NULL,
    centroid          double precision[] NOT NULL,
    weight            double precision NOT NULL,
    radius            double precision NOT NULL,
    quality           double precision,
    drift_coefficient double precision,
    created_at        timestamptz      NOT NULL,
    updated_at        timestamptz      NOT NULL,
    PRIMARY KEY (source_topic, partition, cluster_id, source_offset, event)
);

-- Several alarms of one detector can share a source offset (two clusters vanishing at the same
-- refresh each raise a `vanished` alarm): the affected clusters tell them apart, and a replay of
-- the same alarm still conflicts with its row.
ALTER TABLE drift_alerts
    DROP CONSTRAINT drift_alerts_pkey,
    ADD PRIMARY KEY (source_topic, partition, source_offset, detector, affected_clusters);

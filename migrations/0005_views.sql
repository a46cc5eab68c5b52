-- Views for the questions the README answers with SQL.

-- Final window aggregates, one row per window and key, with the source partitions summed.
CREATE VIEW window_series AS
SELECT window_kind, size_ms, slide_ms, key, window_start, window_end,
       sum(count)::bigint AS count,
       sum(sum)          AS sum,
       min(min)          AS min,
       max(max)          AS max,
       bool_and(is_final) AS is_final
FROM window_aggregates
GROUP BY window_kind, size_ms, slide_ms, key, window_start, window_end;

-- Clusters updated within the last hour.
CREATE VIEW clusters_active_last_hour AS
SELECT * FROM clusters WHERE updated_at >= now() - interval '1 hour';

-- Drift alerts per day and severity.
CREATE VIEW drift_alerts_per_day AS
SELECT date_trunc('day', detected_at) AS day, severity, count(*) AS alerts
FROM drift_alerts
GROUP BY 1, 2;

-- How far each partition's checkpoint has come.
CREATE VIEW partition_progress AS
SELECT group_id, source_topic, partition, next_offset, updated_at
FROM partition_checkpoints;

//! Telemetry: every metric name in one list, the shared progress counters, and logging set-up.
//!
//! Metric names follow `neurostream_<noun>_<unit>[_total]`; labels come from a small fixed set
//! (topic, partition, stage, reason), never keys or ids; hot loops count per batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::{LogConfig, LogFormat};

/// Input messages accepted by the processor. Labels: topic, partition.
pub const EVENTS_TOTAL: &str = "neurostream_events_total";
/// Input messages sent to the dead-letter topic. Labels: topic, reason.
pub const DEAD_LETTERS_TOTAL: &str = "neurostream_dead_letters_total";
/// Events dropped because their window had closed. Labels: topic, partition.
pub const LATE_EVENTS_TOTAL: &str = "neurostream_late_events_dropped_total";
/// Messages produced to output topics. Labels: topic.
pub const OUTPUT_MESSAGES_TOTAL: &str = "neurostream_output_messages_total";
/// Rows upserted into PostgreSQL. Labels: topic.
pub const SINK_ROWS_TOTAL: &str = "neurostream_sink_rows_total";
/// Seconds per sink transaction (outputs + checkpoint).
pub const SINK_COMMIT_SECONDS: &str = "neurostream_sink_commit_seconds";
/// Retries of a failed stage. Labels: stage (`produce`, `sink`, `checkpoint_load`).
pub const RETRIES_TOTAL: &str = "neurostream_retries_total";
/// Partition pauses because a worker's queue was full (backpressure).
pub const PARTITION_PAUSES_TOTAL: &str = "neurostream_partition_pauses_total";
/// Partitions currently assigned to this instance.
pub const ASSIGNED_PARTITIONS: &str = "neurostream_assigned_partitions";
/// Rebalance callbacks served. Labels: stage (`assign`, `revoke`).
pub const REBALANCES_TOTAL: &str = "neurostream_rebalances_total";

/// Re-delivered messages a worker dropped (offset below the next expected). Labels: topic.
pub const OFFSET_DUPLICATES_TOTAL: &str = "neurostream_offset_duplicates_total";
/// Offsets skipped between consecutive messages (compaction, transaction markers, retention,
/// or a broker fault). Labels: topic.
pub const OFFSETS_SKIPPED_TOTAL: &str = "neurostream_offsets_skipped_total";
/// Batches rolled back because another worker owns the partition now. Labels: topic.
pub const FENCED_BATCHES_TOTAL: &str = "neurostream_fenced_batches_total";
/// Output rows PostgreSQL refused for a data reason (dead-lettered instead). Labels: topic.
pub const SINK_REJECTED_ROWS_TOTAL: &str = "neurostream_sink_rejected_rows_total";
/// Messages Kafka refused for good and that were diverted. Labels: topic, reason
/// (`dead_letter_truncated`, `output_dead_lettered`).
pub const PRODUCE_DIVERTED_TOTAL: &str = "neurostream_produce_diverted_total";

/// Messages between a partition's durable position and its high watermark. Labels: topic,
/// partition.
pub const CONSUMER_LAG: &str = "neurostream_consumer_lag_messages";

/// Registers descriptions for every metric (call once after installing a recorder).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_TOTAL, Unit::Count, "Input events processed");
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        Unit::Count,
        "Input messages sent to the dead-letter topic"
    );
    describe_counter!(
        LATE_EVENTS_TOTAL,
        Unit::Count,
        "Events dropped because their window had closed"
    );
    describe_counter!(
        OUTPUT_MESSAGES_TOTAL,
        Unit::Count,
        "Messages produced to output topics"
    );
    describe_counter!(
        SINK_ROWS_TOTAL,
        Unit::Count,
        "Rows upserted into PostgreSQL"
    );
    describe_histogram!(
        SINK_COMMIT_SECONDS,
        Unit::Seconds,
        "Sink transaction duration"
    );
    describe_counter!(RETRIES_TOTAL, Unit::Count, "Retries of a failed stage");
    describe_counter!(
        PARTITION_PAUSES_TOTAL,
        Unit::Count,
        "Partitions paused by backpressure"
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Partitions assigned to this instance"
    );
    describe_counter!(REBALANCES_TOTAL, Unit::Count, "Rebalance callbacks served");
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Messages between the durable position and the high watermark"
    );
    describe_counter!(
        OFFSET_DUPLICATES_TOTAL,
        Unit::Count,
        "Re-delivered messages dropped by their worker"
    );
    describe_counter!(
        OFFSETS_SKIPPED_TOTAL,
        Unit::Count,
        "Offsets skipped between consecutive messages"
    );
    describe_counter!(
        FENCED_BATCHES_TOTAL,
        Unit::Count,
        "Batches rolled back because the partition has a newer owner"
    );
    describe_counter!(
        SINK_REJECTED_ROWS_TOTAL,
        Unit::Count,
        "Output rows PostgreSQL refused, dead-lettered instead"
    );
    describe_counter!(
        PRODUCE_DIVERTED_TOTAL,
        Unit::Count,
        "Messages Kafka refused for good, diverted"
    );
}

/// One partition's status, for `/status`, `/ready` and the demo's progress line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStatus {
    /// Whether this instance owns the partition now.
    pub assigned: bool,
    /// Next offset whose effects are not yet durable.
    pub next_offset: i64,
    /// Events processed by this instance.
    pub events: u64,
    /// Messages sent to the dead-letter topic by this instance.
    pub dead_letters: u64,
    /// The worker restored the checkpoint and is consuming.
    pub restored: bool,
    /// The partition's high watermark (log end), from the consumer's statistics.
    pub high_watermark: Option<i64>,
    /// Messages between the durable position and the high watermark.
    pub lag: Option<i64>,
    /// What the worker is waiting for or retrying while it makes a batch durable (producing,
    /// committing, or the last error of a retry).
    pub retrying: Option<String>,
    /// Since when it waits or retries (one batch).
    #[serde(skip)]
    pub retrying_since: Option<std::time::Instant>,
}

impl PartitionStatus {
    fn update_lag(&mut self) {
        self.lag = self
            .high_watermark
            .filter(|_| self.restored)
            .map(|hw| (hw - self.next_offset).max(0));
    }
}

/// What one durable batch of a partition contained.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchCounts {
    /// The partition's next offset after the batch.
    pub next_offset: i64,
    /// Events processed.
    pub events: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_letters: u64,
    /// Messages produced to output topics.
    pub outputs: u64,
    /// Rows upserted into PostgreSQL.
    pub rows: u64,
}

/// Counters shared by the pipeline and whoever watches it (HTTP, demo, tests).
#[derive(Debug, Default)]
pub struct Progress {
    events: AtomicU64,
    dead_letters: AtomicU64,
    rows: AtomicU64,
    outputs: AtomicU64,
    sink_micros: AtomicU64,
    running: AtomicBool,
    partitions: Mutex<BTreeMap<(String, i32), PartitionStatus>>,
}

/// A copy of [`Progress`] at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressSnapshot {
    /// Events processed (durable or not).
    pub events: u64,
    /// Dead letters produced.
    pub dead_letters: u64,
    /// Rows written to PostgreSQL.
    pub rows: u64,
    /// Messages produced to output topics.
    pub outputs: u64,
    /// Seconds spent in sink transactions, summed over workers.
    pub sink_seconds: f64,
    /// Per `topic/partition`.
    pub partitions: BTreeMap<String, PartitionStatus>,
}

impl Progress {
    fn with_partition(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionStatus)) {
        let mut map = self
            .partitions
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it");
        f(map.entry((topic.to_string(), partition)).or_default());
    }

    /// A partition was assigned (`true`) or revoked.
    pub fn set_assigned(&self, topic: &str, partition: i32, assigned: bool) {
        self.with_partition(topic, partition, |p| {
            p.assigned = assigned;
            if !assigned {
                p.restored = false;
                p.retrying = None;
                p.retrying_since = None;
            }
        });
    }

    /// The partition's worker restored its checkpoint (`next_offset`: where it starts, when
    /// known).
    pub fn set_restored(&self, topic: &str, partition: i32, next_offset: Option<i64>) {
        self.with_partition(topic, partition, |p| {
            p.restored = true;
            if let Some(next) = next_offset {
                p.next_offset = p.next_offset.max(next);
            }
            p.update_lag();
        });
    }

    /// The partition's high watermark, from the consumer's statistics.
    pub fn set_high_watermark(&self, topic: &str, partition: i32, high_watermark: i64) {
        self.with_partition(topic, partition, |p| {
            p.high_watermark = Some(high_watermark);
            p.update_lag();
        });
    }

    /// Assigned partitions lagging more than `max` messages behind their high watermark.
    pub fn lagging(&self, max: i64) -> Vec<String> {
        self.partitions
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it")
            .iter()
            .filter(|(_, s)| s.assigned && s.lag.is_some_and(|l| l > max))
            .map(|((t, p), s)| format!("{t}/{p} ({} behind)", s.lag.unwrap_or(0)))
            .collect()
    }

    /// The partition's worker retries a batch because of `problem` (`None`: it succeeded).
    pub fn set_retrying(&self, topic: &str, partition: i32, problem: Option<String>) {
        self.with_partition(topic, partition, |p| {
            match (&problem, p.retrying_since) {
                (Some(_), None) => p.retrying_since = Some(std::time::Instant::now()),
                (None, _) => p.retrying_since = None,
                _ => {}
            }
            p.retrying = problem;
        });
    }

    /// Partitions that have been retrying for longer than `limit`, with what they retry.
    pub fn stalled(&self, limit: std::time::Duration) -> Vec<String> {
        self.partitions
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it")
            .iter()
            .filter(|(_, s)| s.assigned && s.retrying_since.is_some_and(|t| t.elapsed() > limit))
            .map(|((t, p), s)| format!("{t}/{p}: {}", s.retrying.as_deref().unwrap_or("?")))
            .collect()
    }

    /// A batch became durable.
    pub fn record_batch(&self, topic: &str, partition: i32, batch: &BatchCounts) {
        self.events.fetch_add(batch.events, Ordering::Relaxed);
        self.dead_letters
            .fetch_add(batch.dead_letters, Ordering::Relaxed);
        self.outputs.fetch_add(batch.outputs, Ordering::Relaxed);
        self.rows.fetch_add(batch.rows, Ordering::Relaxed);
        self.with_partition(topic, partition, |p| {
            p.next_offset = p.next_offset.max(batch.next_offset);
            p.events += batch.events;
            p.dead_letters += batch.dead_letters;
            p.update_lag();
        });
    }

    /// Time spent in sink transactions.
    pub fn record_sink_time(&self, elapsed: std::time::Duration) {
        self.sink_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The pipeline is consuming (`/ready`).
    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }

    /// Whether the pipeline is consuming.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let partitions = self
            .partitions
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it")
            .iter()
            .map(|((t, p), s)| (format!("{t}/{p}"), s.clone()))
            .collect();
        ProgressSnapshot {
            events: self.events.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            outputs: self.outputs.load(Ordering::Relaxed),
            sink_seconds: self.sink_micros.load(Ordering::Relaxed) as f64 / 1e6,
            partitions,
        }
    }

    /// Sum over partitions of the durable next offsets (events + dead letters made durable).
    pub fn durable_offsets(&self) -> i64 {
        self.partitions
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it")
            .values()
            .map(|p| p.next_offset)
            .sum()
    }
}

/// Installs the global `tracing` subscriber.
pub fn init_logging(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

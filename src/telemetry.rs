//! Telemetry: every metric name in one list, the shared progress counters, and logging set-up.
//!
//! Metric names follow `neurostream_<noun>_<unit>[_total]`; labels come from a small fixed set
//! (topic, partition, stage, reason), never keys or ids; hot loops count per batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::{LogConfig, LogFormat};

/// What kind of metric a catalogue entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A value now.
    Gauge,
    /// A distribution with the entry's buckets.
    Histogram,
}

/// One metric of the catalogue: name, kind, labels, meaning, and buckets for histograms.
#[derive(Debug, Clone, Copy)]
pub struct MetricSpec {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its label names (a small fixed set).
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
    /// Histogram buckets (empty for counters and gauges).
    pub buckets: &'static [f64],
}

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $id:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal $(, $buckets:expr)? ; )*) => {
        $( $(#[$doc])* pub const $id: &str = $name; )*
        /// Every metric the service exports, in one list (the README's table is checked against it).
        pub const CATALOGUE: &[MetricSpec] = &[
            $( MetricSpec {
                name: $name,
                kind: MetricKind::$kind,
                labels: &[$($label),*],
                help: $help,
                buckets: catalogue!(@buckets $($buckets)?),
            }, )*
        ];
    };
    (@buckets $b:expr) => { $b };
    (@buckets) => { &[] };
}

/// Latency buckets in seconds: 1 ms … 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Per-message processing buckets in seconds: 1 µs … 10 ms.
const PROCESSING_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2,
];
/// Sink transaction buckets in seconds: 1 ms … 30 s.
const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Rows per sink batch.
const ROW_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 5_000.0, 20_000.0, 100_000.0,
];

catalogue! {
    /// Version of the running binary (value 1).
    BUILD_INFO = "neurostream_build_info", Gauge, ["version"], "Version of the running binary (value 1)";
    /// Messages taken by partition workers (events and rejected alike).
    MESSAGES_CONSUMED_TOTAL = "neurostream_messages_consumed_total", Counter, ["topic", "partition"], "Messages taken by partition workers";
    /// Events processed and made durable.
    EVENTS_TOTAL = "neurostream_events_total", Counter, ["topic", "partition"], "Events processed and made durable";
    /// Messages sent to the dead-letter topic, by kind.
    DEAD_LETTERS_TOTAL = "neurostream_dead_letters_total", Counter, ["topic", "reason"], "Messages sent to the dead-letter topic, by kind";
    /// Events dropped because their window had closed (`late = "drop"`).
    LATE_EVENTS_TOTAL = "neurostream_late_events_dropped_total", Counter, ["topic"], "Events dropped because their window had closed";
    /// Messages produced to output topics.
    OUTPUT_MESSAGES_TOTAL = "neurostream_output_messages_total", Counter, ["topic"], "Messages produced to output topics";
    /// Outlier records emitted.
    OUTLIERS_TOTAL = "neurostream_outliers_total", Counter, ["topic"], "Outlier records emitted";
    /// Drift alerts emitted, by severity.
    DRIFT_ALERTS_TOTAL = "neurostream_drift_alerts_total", Counter, ["topic", "severity"], "Drift alerts emitted, by severity";
    /// Live clusters of a partition.
    ACTIVE_CLUSTERS = "neurostream_active_clusters", Gauge, ["topic", "partition"], "Live clusters of a partition";
    /// Messages between a partition's durable position and its high watermark.
    CONSUMER_LAG = "neurostream_consumer_lag_messages", Gauge, ["topic", "partition"], "Messages between the durable position and the high watermark";
    /// Kafka message timestamp to outputs acknowledged and checkpoint committed, per event.
    END_TO_END_LATENCY_SECONDS = "neurostream_end_to_end_latency_seconds", Histogram, ["topic"], "Kafka message timestamp to outputs acknowledged and checkpoint committed, per event", LATENCY_BUCKETS;
    /// Kafka message timestamp to its batch's outputs acknowledged by Kafka, per event.
    OUTPUT_LATENCY_SECONDS = "neurostream_output_latency_seconds", Histogram, ["topic"], "Kafka message timestamp to its batch's outputs acknowledged by Kafka, per event", LATENCY_BUCKETS;
    /// Processor time per message (one message in 16 is timed).
    PROCESSING_LATENCY_SECONDS = "neurostream_processing_latency_seconds", Histogram, ["topic"], "Processor time per message (one in 16 timed)", PROCESSING_BUCKETS;
    /// Seconds per sink transaction (outputs + checkpoint).
    SINK_COMMIT_SECONDS = "neurostream_sink_commit_seconds", Histogram, [], "Sink transaction duration (outputs + checkpoint)", COMMIT_BUCKETS;
    /// Seconds from a flush's outputs handed to the producer to the last acknowledgement
    /// (retries included), per delivered flush: the wait the next flush's outputs may have.
    DELIVERY_SECONDS = "neurostream_delivery_seconds", Histogram, ["topic"], "Seconds from a flush's outputs handed to the Kafka producer to the last acknowledgement (retries included), per flush", COMMIT_BUCKETS;
    /// Output rows per sink transaction.
    SINK_BATCH_ROWS = "neurostream_sink_batch_rows", Histogram, [], "Output rows per sink transaction", ROW_BUCKETS;
    /// Rows upserted into PostgreSQL.
    SINK_ROWS_TOTAL = "neurostream_sink_rows_total", Counter, ["topic"], "Rows inserted or changed in PostgreSQL";
    /// Output rows PostgreSQL refused for a data reason (dead-lettered instead).
    SINK_REJECTED_ROWS_TOTAL = "neurostream_sink_rejected_rows_total", Counter, ["topic"], "Output rows PostgreSQL refused, dead-lettered instead";
    /// Sink transactions whose fast window path met a stored first emission (then upserted).
    SINK_FAST_PATH_CONFLICTS_TOTAL = "neurostream_sink_fast_path_conflicts_total", Counter, [], "Sink transactions written again through the upsert: a window's first emission was already stored";
    /// Size of the partition's last checkpoint (processor snapshot).
    CHECKPOINT_BYTES = "neurostream_checkpoint_bytes", Gauge, ["topic", "partition"], "Size of the partition's last checkpoint";
    /// Checkpoint bytes written to PostgreSQL, per partition.
    CHECKPOINT_BYTES_TOTAL = "neurostream_checkpoint_bytes_total", Counter, ["topic", "partition"], "Checkpoint bytes written to PostgreSQL";
    /// Seconds a partition's processing paused to take a checkpoint (a delta, or the copy of
    /// the state a new base is encoded from), per transaction.
    CHECKPOINT_SECONDS = "neurostream_checkpoint_seconds", Histogram, ["topic"], "Seconds the partition's processing paused to take a checkpoint (a delta, or the copy of the state for a new base), per transaction", COMMIT_BUCKETS;
    /// Seconds to sort and serialise a new base from its copy, beside the partition's
    /// processing (on a blocking thread, before its transaction), per full checkpoint.
    CHECKPOINT_ENCODE_SECONDS = "neurostream_checkpoint_encode_seconds", Histogram, ["topic"], "Seconds to encode a new base from its copy, beside the partition's processing, per full checkpoint", COMMIT_BUCKETS;
    /// Checkpoints written, by kind: `full` (a new base) or `delta` (what changed since).
    CHECKPOINTS_TOTAL = "neurostream_checkpoints_total", Counter, ["topic", "kind"], "Checkpoints written to PostgreSQL, full (a new base) or delta";
    /// Keys with state in a partition's windows.
    STATE_KEYS = "neurostream_state_keys", Gauge, ["topic", "partition"], "Keys with state in the partition's windows";
    /// Open windows (per key) of a partition.
    STATE_OPEN_WINDOWS = "neurostream_state_open_windows", Gauge, ["topic", "partition"], "Open windows (per key) of the partition";
    /// How long the partition has been producing, committing or retrying its current batch.
    BATCH_RETRYING_SECONDS = "neurostream_batch_retrying_seconds", Gauge, ["topic", "partition"], "How long the partition has been on its current batch (0 when idle)";
    /// Where a partition worker's time goes: `idle` (waiting for input), `busy` (processing,
    /// encoding, checkpointing), `waiting_kafka` (for the acks of the previous flush, which
    /// was delivered while the worker processed the next batch), `waiting_postgres`
    /// (for a transaction, when too many flushes wait or a stop needs them durable),
    /// `waiting_registry` (for a writer schema).
    WORKER_TIME_MICROSECONDS_TOTAL = "neurostream_worker_time_microseconds_total", Counter, ["topic", "partition", "state"], "Partition worker time by state: idle, busy, waiting_kafka, waiting_postgres, waiting_registry";
    /// Retries of a failed stage.
    RETRIES_TOTAL = "neurostream_retries_total", Counter, ["stage"], "Retries of a failed stage (produce, sink, checkpoint_load)";
    /// Partition pauses because a worker's queue was full (backpressure).
    PARTITION_PAUSES_TOTAL = "neurostream_partition_pauses_total", Counter, [], "Partitions paused by backpressure";
    /// Partitions currently assigned to this instance.
    ASSIGNED_PARTITIONS = "neurostream_assigned_partitions", Gauge, [], "Partitions assigned to this instance";
    /// Rebalance callbacks served.
    REBALANCES_TOTAL = "neurostream_rebalances_total", Counter, ["stage"], "Rebalance callbacks served (assign, revoke)";
    /// Workers that missed the revoke deadline (their last batch is replayed by the next owner).
    REVOKE_DEADLINE_MISSES_TOTAL = "neurostream_revoke_deadline_misses_total", Counter, [], "Workers that missed the revoke deadline";
    /// Messages in the producer's queue, waiting for the broker's acknowledgement.
    PRODUCER_QUEUE_MESSAGES = "neurostream_producer_queue_messages", Gauge, [], "Messages in the producer's queue awaiting acknowledgement";
    /// Re-delivered messages a worker dropped (offset below the next expected).
    OFFSET_DUPLICATES_TOTAL = "neurostream_offset_duplicates_total", Counter, ["topic"], "Messages below the next expected offset, dropped";
    /// Offsets skipped between consecutive messages (compaction, transaction markers, retention).
    OFFSETS_SKIPPED_TOTAL = "neurostream_offsets_skipped_total", Counter, ["topic"], "Offsets skipped between consecutive messages";
    /// Batches rolled back because another worker owns the partition now.
    FENCED_BATCHES_TOTAL = "neurostream_fenced_batches_total", Counter, ["topic"], "Batches rolled back because the partition has a newer owner";
    /// Messages Kafka refused for good and that were diverted.
    PRODUCE_DIVERTED_TOTAL = "neurostream_produce_diverted_total", Counter, ["topic", "reason"], "Messages Kafka refused for good, diverted (dead_letter_truncated, output_dead_lettered, dead_letter_lost)";
    /// Messages re-sent in smaller groups after Kafka refused their batch as too large.
    PRODUCE_RESENT_IN_HALVES_TOTAL = "neurostream_produce_resent_in_halves_total", Counter, ["topic"], "Messages re-sent in halves after Kafka refused their batch as too large (a topic's max.message.bytes below the producer's batch.size)";
}

/// Registers descriptions for every metric and the label-free and fixed-label series at zero
/// (call once after installing a recorder), so `/metrics` lists them from start-up.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for m in CATALOGUE {
        match m.kind {
            MetricKind::Counter => describe_counter!(m.name, m.help),
            MetricKind::Gauge => describe_gauge!(m.name, m.help),
            MetricKind::Histogram => describe_histogram!(m.name, m.help),
        }
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::counter!(PARTITION_PAUSES_TOTAL).absolute(0);
    metrics::counter!(REVOKE_DEADLINE_MISSES_TOTAL).absolute(0);
    metrics::counter!(SINK_FAST_PATH_CONFLICTS_TOTAL).absolute(0);
    metrics::gauge!(ASSIGNED_PARTITIONS).set(0.0);
    metrics::gauge!(PRODUCER_QUEUE_MESSAGES).set(0.0);
    for stage in ["produce", "sink", "checkpoint_load"] {
        metrics::counter!(RETRIES_TOTAL, "stage" => stage).absolute(0);
    }
    for stage in ["assign", "revoke"] {
        metrics::counter!(REBALANCES_TOTAL, "stage" => stage).absolute(0);
    }
}

/// The dead-letter kinds (the `reason` label of [`DEAD_LETTERS_TOTAL`]).
pub const DEAD_LETTER_KINDS: &[&str] = &[
    "empty",
    "oversized",
    "not_json",
    "invalid_field",
    "missing_timestamp",
    "timestamp_out_of_range",
    "future_timestamp",
    "nul_character",
    "key_too_long",
    "field_too_long",
    "dimension_mismatch",
    "late",
    "sink_rejected",
    "output_rejected",
];

/// Registers an input topic's series at zero.
pub fn register_topic(topic: &str) {
    let t = topic.to_string();
    for reason in DEAD_LETTER_KINDS {
        metrics::counter!(DEAD_LETTERS_TOTAL, "topic" => t.clone(), "reason" => *reason)
            .absolute(0);
    }
    for severity in ["low", "medium", "high"] {
        metrics::counter!(DRIFT_ALERTS_TOTAL, "topic" => t.clone(), "severity" => severity)
            .absolute(0);
    }
    for reason in [
        "dead_letter_truncated",
        "output_dead_lettered",
        "dead_letter_lost",
    ] {
        metrics::counter!(PRODUCE_DIVERTED_TOTAL, "topic" => t.clone(), "reason" => reason)
            .absolute(0);
    }
    for name in [
        LATE_EVENTS_TOTAL,
        OUTPUT_MESSAGES_TOTAL,
        OUTLIERS_TOTAL,
        SINK_ROWS_TOTAL,
        SINK_REJECTED_ROWS_TOTAL,
        OFFSET_DUPLICATES_TOTAL,
        OFFSETS_SKIPPED_TOTAL,
        PRODUCE_RESENT_IN_HALVES_TOTAL,
        FENCED_BATCHES_TOTAL,
    ] {
        metrics::counter!(name, "topic" => t.clone()).absolute(0);
    }
}

/// Sets a revoked partition's gauges back to 0: the next owner exports the partition now, and
/// a stale value here (a lag, a stuck batch) would keep alerts firing.
pub fn clear_partition(topic: &str, partition: i32) {
    let (t, p) = (topic.to_string(), partition.to_string());
    for name in [
        CONSUMER_LAG,
        ACTIVE_CLUSTERS,
        CHECKPOINT_BYTES,
        STATE_KEYS,
        STATE_OPEN_WINDOWS,
        BATCH_RETRYING_SECONDS,
    ] {
        metrics::gauge!(name, "topic" => t.clone(), "partition" => p.clone()).set(0.0);
    }
}

/// Registers an assigned partition's series at zero.
pub fn register_partition(topic: &str, partition: i32) {
    let (t, p) = (topic.to_string(), partition.to_string());
    for name in [MESSAGES_CONSUMED_TOTAL, EVENTS_TOTAL] {
        metrics::counter!(name, "topic" => t.clone(), "partition" => p.clone()).absolute(0);
    }
    clear_partition(topic, partition);
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
    /// The clustering status after the last durable batch (the `algorithm_status` record).
    pub algorithm_status: Option<crate::output::StatusRecord>,
    /// Event time of the partition's last drift alert.
    pub last_drift_at: Option<i64>,
    /// Points clustered per second over the last batches.
    pub points_per_second: Option<f64>,
    /// Processor time per message, milliseconds: p50, p95, p99 of recent samples.
    pub processing_latency_ms: Option<[f64; 3]>,
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
    profile: Mutex<String>,
    partitions: Mutex<BTreeMap<(String, i32), PartitionStatus>>,
}

/// What a durable batch changed in a partition's status (see [`Progress::record_status`]).
#[derive(Debug, Clone, Default)]
pub struct StatusUpdate {
    /// The clustering status now.
    pub algorithm_status: Option<crate::output::StatusRecord>,
    /// Event time of the batch's last drift alert, if it raised one.
    pub drift_at: Option<i64>,
    /// Points clustered per second.
    pub points_per_second: Option<f64>,
    /// Processor time per message, milliseconds: p50, p95, p99.
    pub processing_latency_ms: Option<[f64; 3]>,
}

/// A copy of [`Progress`] at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressSnapshot {
    /// The effective profile.
    pub profile: String,
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

    /// The effective profile (for `/status`).
    pub fn set_profile(&self, profile: &str) {
        *self
            .profile
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it") =
            profile.to_string();
    }

    /// A durable batch's effect on the partition's status.
    pub fn record_status(&self, topic: &str, partition: i32, update: StatusUpdate) {
        self.with_partition(topic, partition, |p| {
            if update.algorithm_status.is_some() {
                p.algorithm_status = update.algorithm_status;
            }
            if update.drift_at.is_some() {
                p.last_drift_at = update.drift_at;
            }
            if update.points_per_second.is_some() {
                p.points_per_second = update.points_per_second;
            }
            if update.processing_latency_ms.is_some() {
                p.processing_latency_ms = update.processing_latency_ms;
            }
        });
    }

    /// Seconds each assigned partition has been on its current batch (0 when idle).
    pub fn batch_ages(&self) -> Vec<(String, i32, f64)> {
        self.partitions
            .lock()
            .expect("progress lock is never poisoned: no code panics while holding it")
            .iter()
            .filter(|(_, s)| s.assigned)
            .map(|((t, p), s)| {
                let age = s.retrying_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                (t.clone(), *p, age)
            })
            .collect()
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
            profile: self
                .profile
                .lock()
                .expect("progress lock is never poisoned: no code panics while holding it")
                .clone(),
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

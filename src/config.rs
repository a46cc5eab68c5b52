//! Typed configuration: compiled-in defaults → `--config FILE` → `NEUROSTREAM__SECTION__KEY`.
//!
//! Every struct denies unknown fields; [`load`] reports every unknown key, every type error it can
//! see and every failed [`Config::validate`] check at once, before anything connects.
//! Profiles (`throughput`, `balanced`, `latency`) fill in librdkafka and sink settings that the
//! user did not set explicitly; an explicit typed field or raw pass-through entry always wins.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub mod formats;
pub mod security;

pub use formats::{InputFormat, OutputFormat, SchemaRegistryConfig};
use security::shown_path;
pub use security::{KafkaProtocol, PgSslMode, SaslMechanism, Secret, SecurityConfig};

/// Prefix of environment overrides; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "NEUROSTREAM__";

/// The whole service configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Brokers, consumer group, topics and raw librdkafka settings.
    pub kafka: KafkaConfig,
    /// Latency/throughput trade-off for the Kafka clients and the sink.
    pub profile: Profile,
    /// What the per-partition processor computes.
    pub processing: ProcessingConfig,
    /// The PostgreSQL sink and checkpoint store.
    pub postgres: PostgresConfig,
    /// The Schema Registry of Avro input and output.
    pub schema_registry: SchemaRegistryConfig,
    /// Metrics and health endpoints.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Kafka connection, topics and client tuning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Consumer group every instance of one deployment shares.
    pub group_id: String,
    /// Topics to consume; a comma-separated string is accepted too.
    #[serde(deserialize_with = "string_or_list")]
    pub input_topics: Vec<String>,
    /// Names of the output topics.
    pub topics: OutputTopics,
    /// Security settings (SASL/SSL).
    pub security: SecurityConfig,
    /// Format of every input topic unless `input_formats` names it.
    pub input_format: InputFormat,
    /// Per-topic input formats: `{ "sensors" = "avro" }`.
    pub input_formats: BTreeMap<String, InputFormat>,
    /// The writer schema (Avro JSON) of `avro-raw` input.
    pub avro_writer_schema_file: Option<std::path::PathBuf>,
    /// Format of the output topics (the dead-letter topic keeps the original bytes).
    pub output_format: OutputFormat,
    /// Where a partition without a checkpoint or committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Consumer group session timeout; a revoked partition must be drained well within it.
    pub session_timeout_ms: u64,
    /// Deadline for a revoked partition's worker to stop, flush and checkpoint.
    /// Must be below `session_timeout_ms`.
    pub revoke_deadline_ms: u64,
    /// Messages buffered per partition between the consumer and its worker; when full, the
    /// partition is paused (backpressure) instead of buffering more. The queue absorbs what
    /// arrives while the worker flushes a batch: every pause and resume costs a fetch round
    /// trip, so a queue smaller than one flush's worth of messages stalls the partition. The
    /// queue allocates as it fills: the bytes budget is what bounds its memory.
    pub partition_queue_capacity: usize,
    /// Payload and key bytes buffered per partition at most (the partition is paused past
    /// them): bounds the queue's memory whatever the message size.
    pub partition_queue_bytes: usize,
    /// Larger input messages go to the dead-letter topic with reason `oversized`. The producer's
    /// `message.max.bytes` is set to this plus 64 KiB so a dead letter of any accepted size fits
    /// (a broker with a lower limit gets it truncated, with a header saying so).
    pub max_event_bytes: usize,
    /// Create missing output topics at start-up (input topics must exist). When false, a
    /// missing output topic is a start-up error naming it.
    pub create_topics: bool,
    /// Read the output and dead-letter topics' `max.message.bytes` at start-up (DescribeConfigs,
    /// 2 s at most) and lower the producer's `batch.size` to the smallest: the broker refuses a
    /// whole batch over a topic's limit. Off: no request (brokers that refuse DescribeConfigs,
    /// librdkafka's mock cluster, which does not serve it).
    pub fit_batch_to_topics: bool,
    /// Partitions of the output topics the service creates; unset: the broker's default.
    pub topic_partitions: Option<i32>,
    /// Replication factor of the output topics the service creates; unset: the broker's default.
    pub topic_replication_factor: Option<i32>,
    /// Producer linger; unset: from the profile.
    pub linger_ms: Option<u64>,
    /// Producer batch size in bytes; unset: from the profile.
    pub batch_size_bytes: Option<u64>,
    /// Producer compression (`none`, `gzip`, `snappy`, `lz4`, `zstd`); unset: from the profile.
    pub compression: Option<String>,
    /// Consumer fetch wait; unset: from the profile.
    pub fetch_wait_max_ms: Option<u64>,
    /// Consumer minimum fetch size; unset: from the profile.
    pub fetch_min_bytes: Option<u64>,
    /// Raw librdkafka consumer properties; they win over everything else.
    pub consumer: RawProperties,
    /// Raw librdkafka producer properties; they win over everything else, except that
    /// `acks` and `enable.idempotence` cannot weaken durability.
    pub producer: RawProperties,
}

/// Raw librdkafka properties (`kafka.consumer`, `kafka.producer`): a map whose `Debug` hides
/// the values of secret keys (`sasl.password`, `ssl.key.pem`, `...secret`, ...).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawProperties(pub BTreeMap<String, String>);

impl std::ops::Deref for RawProperties {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for RawProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a RawProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for RawProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret_property(k) { "****" } else { v };
                (k, shown)
            }))
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            group_id: "neurostream".into(),
            input_topics: vec!["events".into()],
            topics: OutputTopics::default(),
            security: SecurityConfig::default(),
            input_format: InputFormat::Json,
            input_formats: BTreeMap::new(),
            avro_writer_schema_file: None,
            output_format: OutputFormat::Json,
            auto_offset_reset: "earliest".into(),
            session_timeout_ms: 45_000,
            revoke_deadline_ms: 15_000,
            partition_queue_capacity: 262_144,
            partition_queue_bytes: 64 << 20,
            max_event_bytes: 1 << 20,
            create_topics: true,
            fit_batch_to_topics: true,
            topic_partitions: None,
            topic_replication_factor: None,
            linger_ms: None,
            batch_size_bytes: None,
            compression: None,
            fetch_wait_max_ms: None,
            fetch_min_bytes: None,
            consumer: RawProperties::default(),
            producer: RawProperties::default(),
        }
    }
}

/// Output topic names (DESIGN.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputTopics {
    /// `cluster_update` messages.
    pub clusters: String,
    /// `drift_detection` messages.
    pub drift: String,
    /// `outlier` messages.
    pub outliers: String,
    /// `window_aggregate` messages.
    pub windows: String,
    /// `algorithm_status` messages.
    pub status: String,
    /// Undecodable or rejected input, original bytes plus reason headers.
    pub dlq: String,
}

impl Default for OutputTopics {
    fn default() -> Self {
        Self {
            clusters: "neurostream.clusters".into(),
            drift: "neurostream.drift".into(),
            outliers: "neurostream.outliers".into(),
            windows: "neurostream.windows".into(),
            status: "neurostream.status".into(),
            dlq: "neurostream.dlq".into(),
        }
    }
}

impl OutputTopics {
    /// Every output topic name, for validation and topic creation.
    pub fn all(&self) -> [&str; 6] {
        [
            &self.clusters,
            &self.drift,
            &self.outliers,
            &self.windows,
            &self.status,
            &self.dlq,
        ]
    }
}

/// A named trade-off between latency and throughput. It never trades durability.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Large fetches, long linger, big sink batches.
    Throughput,
    /// The default.
    #[default]
    Balanced,
    /// Small fetches, a short linger, small sink batches.
    Latency,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Throughput => "throughput",
            Profile::Balanced => "balanced",
            Profile::Latency => "latency",
        })
    }
}

/// What a profile sets when the user did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileSettings {
    /// librdkafka `fetch.wait.max.ms`.
    pub fetch_wait_max_ms: u64,
    /// librdkafka `fetch.min.bytes`.
    pub fetch_min_bytes: u64,
    /// librdkafka `linger.ms`.
    pub linger_ms: u64,
    /// librdkafka `batch.size`.
    pub batch_size_bytes: u64,
    /// librdkafka `max.in.flight.requests.per.connection` of the producer (at most 5: the
    /// idempotent producer's limit).
    pub max_in_flight: u64,
    /// librdkafka `compression.type`.
    pub compression: &'static str,
    /// Sink: output rows that trigger a flush.
    pub sink_batch_rows: usize,
    /// Sink: the least time between the starts of a partition's PostgreSQL transactions.
    pub sink_commit_interval_ms: u64,
    /// Sink: the longest a processed event waits for its flush.
    pub sink_linger_ms: u64,
}

impl Profile {
    /// The settings this profile stands for.
    pub fn settings(self) -> ProfileSettings {
        match self {
            // Measured with `benches/e2e/run.py` (500,000 events, alternating runs). Producer
            // linger 100 → 10 ms: 72.8 k → 82.9–91.2 k events/s; a flush's outputs fill 1 MB
            // batches at once, the linger only holds its last, partial batch. With deliveries
            // pipelined, sink linger 1,000 → 200 ms: 96.9–100.6 k, and batch_rows 20,000 →
            // 10,000: 97.8–106.5 k (balanced meanwhile 84.8–85.3 k). Under load batches fill by
            // rows; a long linger only delayed the tail. Rechecked with the binary COPY
            // (2026-12-04, 1 M events, alternating): batch_rows 10,000: 158–182 k, 20,000:
            // 160–170 k, 40,000: 160–161 k; producer linger 2 / 10 / 30 ms: no difference.
            // Compression none vs lz4 (2026-12-04, broker on loopback, 3 alternating runs each):
            // 224–236 k at 3.8–3.9 CPU-s per M events vs 224–230 k at 4.2–4.3: the same rate.
            // lz4 stays: on a real network and broker disk the outputs' bytes are what it saves.
            //
            // fetch.min.bytes 1 MiB → 256 KiB (2026-12-08, 3 rounds each, throughput against
            // balanced in the same runs): a fetch of one partition returns at most
            // `max.partition.fetch.bytes` (1 MiB), whole batches, so a little less; below the
            // minimum, the broker held it for the whole 500 ms. While backpressure paused one of
            // two partitions, the other was fed a fetch every 500 ms and its worker idled (17 %
            // of worker time against balanced's 8 %): 0.05 ms data 499–515 k against balanced's
            // 571–607 k events/s; with 256 KiB 572–624 k against 551–623 k, and on the 5 ms data
            // 141–147 k against 138–141 k.
            Profile::Throughput => ProfileSettings {
                fetch_wait_max_ms: 500,
                fetch_min_bytes: 256 << 10,
                linger_ms: 10,
                batch_size_bytes: 1_000_000,
                max_in_flight: 5,
                compression: "lz4",
                sink_batch_rows: 10_000,
                // A transaction starts as soon as the previous one ended: under load PostgreSQL
                // is what bounds the rate, and an idle gap between transactions is lost rate;
                // when idle, the sink linger already spaces the flushes.
                sink_commit_interval_ms: 0,
                sink_linger_ms: 200,
            },
            // Sink linger 200 → 100 ms: p99 at 10,000 events/s 219 ms → 116–149 ms, the rate
            // unchanged (80.3–90.6 k → 93.3–95.9 k events/s, alternating runs).
            Profile::Balanced => ProfileSettings {
                fetch_wait_max_ms: 100,
                fetch_min_bytes: 1,
                linger_ms: 10,
                batch_size_bytes: 262_144,
                max_in_flight: 5,
                compression: "lz4",
                sink_batch_rows: 5_000,
                sink_commit_interval_ms: 0,
                sink_linger_ms: 100,
            },
            // Measured with `benches/e2e/run.py` at 10,000 events/s (20 k events, p99 send →
            // output on Kafka): producer linger 0 → 139–384 ms, 1 → 139 ms, 2 → 32–48 ms,
            // 3 → 21–26 ms, 5 → 33 ms. Below 2 ms each flush's outputs leave in requests of a
            // message or two, five in flight per connection (idempotence), and the acks of a
            // flush queue behind each other: 60–280 ms per flush under load. Sink linger 5 ms
            // with producer linger 3 gave p99 21–22 ms in three runs (10 ms: 26 ms).
            //
            // One produce request in flight per connection, not five (2026-12-07, 100 k events,
            // 10,000 events/s, 2-core machine): while a request waits for its ack and a batch
            // is ready, librdkafka 2.12's producer thread polls with a zero timeout, a whole
            // core for as long as the broker is slow (measured by pausing the broker: 10-12 of
            // 10 possible CPU ticks per 100 ms, against 1-2 with one in flight). On a loaded
            // machine that core is taken from the broker, which slows it further. The load
            // generator and the service with one in flight: p99 26.8-41.8 ms in six runs,
            // against 92-107 ms with five; the latency profile's rate unchanged (44-48 k
            // events/s against 39-49 k) at 8.5-9.1 CPU-s per M events against 11.8-15.5.
            // Throughput and balanced keep five: on loopback one was no slower for them, but
            // on a network one request at a time per broker serialises every partition's
            // batches behind a round trip each.
            Profile::Latency => ProfileSettings {
                fetch_wait_max_ms: 10,
                fetch_min_bytes: 1,
                linger_ms: 3,
                batch_size_bytes: 1_000_000,
                max_in_flight: 1,
                compression: "none",
                sink_batch_rows: 500,
                // A flush every 5 ms would be a transaction (and a WAL flush) every 5 ms: 100 ms
                // halved the transactions of the 10,000 events/s run (1,164 → 512 in 30 s),
                // their outputs still reach Kafka at each flush.
                sink_commit_interval_ms: 100,
                sink_linger_ms: 5,
            },
        }
    }
}

/// Checkpoint bytes an open (key, window) pair takes beyond its key, with margin
/// (`benches/state.rs` measured about 115).
const CHECKPOINT_BYTES_PER_WINDOW: u128 = 200;
/// The largest checkpoint the configuration may allow (PostgreSQL's bytea holds 1 GB).
const MAX_CHECKPOINT_BYTES: u128 = 768 << 20;

/// The longest `postgres.commit_interval_ms`.
pub const MAX_COMMIT_INTERVAL_MS: u64 = 60_000;

/// The longest window: 100 years, so window ends of accepted event times stay storable.
pub const MAX_WINDOW_MS: u64 = 3_155_760_000_000;

/// The largest `processing.max_metadata_bytes`: the clustering warm-up holds `warmup_points`
/// events' metadata in memory and in the checkpoint.
pub const MAX_METADATA_BYTES: usize = 256 * 1024;

/// The most the clustering warm-up may hold of events waiting to be placed (with the windows'
/// [`MAX_CHECKPOINT_BYTES`], under the 1 GB PostgreSQL holds in one value).
const MAX_WARMUP_BYTES: u128 = 128 << 20;

/// The most windows one event may join (a hopping window's `size_ms / slide_ms`).
pub const MAX_WINDOWS_PER_EVENT: u64 = 10_000;

/// The per-partition processor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// Feature dimension; unset: fixed by the first event of each partition.
    pub dimension: Option<usize>,
    /// Longest grouping key accepted, in UTF-8 bytes; longer keys go to the dead-letter topic
    /// (`key_too_long`). PostgreSQL's index rows cap keys near 2,700 bytes.
    pub max_key_bytes: usize,
    /// How far an event's `ts` may be ahead of its Kafka timestamp (or of the wall clock when
    /// that is earlier) before it is rejected (`future_timestamp`): one bogus far-future event
    /// must never move stream time.
    pub max_event_time_ahead_ms: u64,
    /// Most open (key, window) pairs a partition holds over all its windows: an event that
    /// would open one more is dead-lettered (`state_limit`) and changes nothing, until windows
    /// close. This bounds a partition's memory and checkpoint (about 230 bytes per open
    /// tumbling window and short key, see the README's State at scale); with
    /// `max_key_bytes` it must keep the worst-case checkpoint under 768 MiB (PostgreSQL holds
    /// at most 1 GB in one value).
    pub max_open_windows: usize,
    /// Longest `metadata` (its JSON text) an event may carry: it is echoed in outlier records
    /// and held with the event through the clustering warm-up (`warmup_points` of them), so it
    /// is bounded like the key; longer is dead-lettered (`field_too_long`). An `id` is bounded
    /// by `max_key_bytes`.
    pub max_metadata_bytes: usize,
    /// Online clustering of the events' features.
    pub clustering: ClusteringConfig,
    /// Event-time windows, each a `[[processing.windows]]` table.
    pub windows: Vec<WindowConfig>,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        Self {
            dimension: None,
            max_key_bytes: 1_024,
            max_event_time_ahead_ms: 86_400_000,
            max_open_windows: 500_000,
            max_metadata_bytes: 16_384,
            clustering: ClusteringConfig::default(),
            windows: vec![WindowConfig::default()],
        }
    }
}

/// Clustering algorithms.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Algorithm {
    /// The corrected algorithm (default).
    #[default]
    #[serde(rename = "ncs")]
    Ncs,
    /// The NCS V8 reference port.
    #[serde(rename = "ncs-v8")]
    NcsV8,
}

impl Algorithm {
    /// The name used in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ncs => "ncs",
            Algorithm::NcsV8 => "ncs-v8",
        }
    }
}

/// The NCS API's named parameter sets.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Fewer clusters, faster adaptation.
    RealTimeLowLatency,
    /// More clusters, slower and stricter adaptation.
    HighAccuracyResearch,
    /// Many clusters, the reference's defaults otherwise.
    LargeScaleProduction,
    /// Few clusters, fast decay for sensor streams.
    StreamingIot,
}

/// `[processing.clustering]`: the algorithm and its parameters. The reference's parameter names
/// carry over for `ncs-v8`; `max_clusters` applies to both; `accept_sigmas`,
/// `min_cluster_points` and `warmup_points` are `ncs`'s own. A preset fills what is not set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusteringConfig {
    /// Cluster the events' features (they are then required).
    pub enabled: bool,
    /// `ncs` (default) or `ncs-v8`.
    pub algorithm: Algorithm,
    /// A named parameter set; explicit parameters override it field by field.
    pub preset: Option<Preset>,
    /// `ncs-v8`: starting similarity threshold.
    pub base_threshold: Option<f64>,
    /// `ncs-v8`: centroid learning rate.
    pub learning_rate: Option<f64>,
    /// `ncs-v8`: confidence decay per maintenance.
    pub decay_rate: Option<f64>,
    /// `ncs-v8`: clusters below this confidence are dropped.
    pub min_confidence: Option<f64>,
    /// `ncs-v8`: merge score threshold.
    pub merge_threshold: Option<f64>,
    /// `ncs-v8`: outlier score threshold.
    pub outlier_threshold: Option<f64>,
    /// `ncs-v8`: similarity history length.
    pub stability_window: Option<usize>,
    /// Both: cluster cap.
    pub max_clusters: Option<usize>,
    /// `ncs`: acceptance `D² ≤ d + accept_sigmas·√(2d)`.
    pub accept_sigmas: Option<f64>,
    /// `ncs`: unplaced points that found a cluster together.
    pub min_cluster_points: Option<usize>,
    /// `ncs`: points that estimate the scales before clustering starts.
    pub warmup_points: Option<usize>,
    /// At most one `updated` cluster_update per cluster per this much event time.
    pub emit_interval_ms: u64,
    /// An `algorithm_status` every this many clustered points.
    pub status_every_points: u64,
}

impl Default for ClusteringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            algorithm: Algorithm::Ncs,
            preset: None,
            base_threshold: None,
            learning_rate: None,
            decay_rate: None,
            min_confidence: None,
            merge_threshold: None,
            outlier_threshold: None,
            stability_window: None,
            max_clusters: None,
            accept_sigmas: None,
            min_cluster_points: None,
            warmup_points: None,
            emit_interval_ms: 1_000,
            status_every_points: 10_000,
        }
    }
}

impl ClusteringConfig {
    /// The preset's V8 parameters (our reading of the NCS API presets).
    fn preset_v8(&self) -> crate::ncs::v8::V8Params {
        let base = crate::ncs::v8::V8Params::default();
        match self.preset {
            None => base,
            Some(Preset::RealTimeLowLatency) => crate::ncs::v8::V8Params {
                base_threshold: 0.75,
                learning_rate: 0.08,
                stability_window: 50,
                max_clusters: 20,
                ..base
            },
            Some(Preset::HighAccuracyResearch) => crate::ncs::v8::V8Params {
                base_threshold: 0.65,
                learning_rate: 0.04,
                merge_threshold: 0.92,
                stability_window: 200,
                max_clusters: 50,
                performance_mode: false,
                ..base
            },
            Some(Preset::LargeScaleProduction) => crate::ncs::v8::V8Params {
                max_clusters: 100,
                ..base
            },
            Some(Preset::StreamingIot) => crate::ncs::v8::V8Params {
                base_threshold: 0.7,
                learning_rate: 0.1,
                decay_rate: 0.005,
                max_clusters: 15,
                ..base
            },
        }
    }

    /// Effective `ncs-v8` parameters: preset, then explicit fields.
    pub fn v8_params(&self) -> crate::ncs::v8::V8Params {
        let mut p = self.preset_v8();
        p.base_threshold = self.base_threshold.unwrap_or(p.base_threshold);
        p.learning_rate = self.learning_rate.unwrap_or(p.learning_rate);
        p.decay_rate = self.decay_rate.unwrap_or(p.decay_rate);
        p.min_confidence = self.min_confidence.unwrap_or(p.min_confidence);
        p.merge_threshold = self.merge_threshold.unwrap_or(p.merge_threshold);
        p.outlier_threshold = self.outlier_threshold.unwrap_or(p.outlier_threshold);
        p.stability_window = self.stability_window.unwrap_or(p.stability_window);
        p.max_clusters = self.max_clusters.unwrap_or(p.max_clusters);
        p
    }

    /// Effective `ncs` parameters: preset (its cluster cap), then explicit fields.
    pub fn ncs_params(&self) -> crate::ncs::corrected::NcsParams {
        let mut p = crate::ncs::corrected::NcsParams::default();
        if self.preset.is_some() {
            p.max_clusters = self.preset_v8().max_clusters;
        }
        if self.preset == Some(Preset::StreamingIot) {
            p.decay = 0.999;
        }
        p.max_clusters = self.max_clusters.unwrap_or(p.max_clusters);
        p.accept_sigmas = self.accept_sigmas.unwrap_or(p.accept_sigmas);
        p.min_cluster_points = self.min_cluster_points.unwrap_or(p.min_cluster_points);
        p.warmup_points = self.warmup_points.unwrap_or(p.warmup_points);
        p
    }
}

/// One event-time window definition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// `tumbling`, `hopping` or `sliding`.
    pub kind: WindowKind,
    /// Window length.
    pub size_ms: u64,
    /// Hop between window starts (hopping only).
    pub slide_ms: Option<u64>,
    /// How long after its end a window still accepts out-of-order events.
    pub grace_ms: u64,
    /// When aggregates are emitted: `final`, `update` or `both`.
    pub emit: EmitMode,
    /// What happens to an event whose window already closed: `drop`, `dlq` or `update`.
    pub late: LatePolicy,
    /// With `late = "update"`: how long after close a window still takes late events.
    pub allowed_lateness_ms: u64,
    /// Advance stream time with the wall clock after this much idleness; unset: off.
    pub idle_close_ms: Option<u64>,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            kind: WindowKind::Tumbling,
            size_ms: 60_000,
            slide_ms: None,
            grace_ms: 0,
            emit: EmitMode::Final,
            late: LatePolicy::Drop,
            allowed_lateness_ms: 0,
            idle_close_ms: None,
        }
    }
}

/// Window shapes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// Fixed, non-overlapping, epoch-aligned.
    #[default]
    Tumbling,
    /// Fixed size, overlapping, starting every `slide_ms`.
    Hopping,
    /// Defined by the records (Kafka Streams `SlidingWindows`).
    Sliding,
}

impl WindowKind {
    /// The name used in messages and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Tumbling => "tumbling",
            WindowKind::Hopping => "hopping",
            WindowKind::Sliding => "sliding",
        }
    }
}

/// Window emit modes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EmitMode {
    /// Once, when the window closes.
    #[default]
    Final,
    /// On change, then the final.
    Update,
    /// Both updates and the final.
    Both,
}

/// Late-event policies.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Count in a metric and drop.
    #[default]
    Drop,
    /// Send to the dead-letter topic with reason `late`.
    Dlq,
    /// Re-emit the corrected final.
    Update,
}

/// PostgreSQL sink.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db` (secret: the password is masked when printed).
    /// libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` parameters work in it too.
    pub url: Option<Secret>,
    /// A file holding the URL (a mounted secret); instead of `url`.
    pub url_file: Option<std::path::PathBuf>,
    /// The password, when the URL carries none (secret); it wins over the URL's.
    pub password: Option<Secret>,
    /// A file holding the password; instead of `password`.
    pub password_file: Option<std::path::PathBuf>,
    /// `disable`, `allow`, `prefer`, `require`, `verify-ca` or `verify-full` (libpq's
    /// `sslmode`); unset: the URL's, else `prefer`.
    pub ssl_mode: Option<PgSslMode>,
    /// PEM file of the CA certificate(s) that signed the server's certificate (`verify-ca`,
    /// `verify-full`); unset: the system's trust store.
    pub ssl_root_cert: Option<std::path::PathBuf>,
    /// PEM file of this client's certificate, for servers that require one.
    pub ssl_cert: Option<std::path::PathBuf>,
    /// PEM file (PKCS#8) of this client's private key.
    pub ssl_key: Option<std::path::PathBuf>,
    /// Connection pool size.
    pub pool_max: u32,
    /// Output rows that trigger a flush; unset: from the profile.
    pub batch_rows: Option<usize>,
    /// The longest a processed event waits for its flush; unset: from the profile.
    pub linger_ms: Option<u64>,
    /// The least time between the starts of one partition's transactions; unset: from the
    /// profile. Flushes delivered to Kafka meanwhile wait and go in the next transaction (at
    /// most 8 × `batch_rows` rows wait: past that it starts at once), so PostgreSQL commits at
    /// most this often per partition whatever the flush rate. Like Kafka Streams'
    /// `commit.interval.ms`: longer means fewer, larger transactions and a checkpoint that
    /// trails the output topics by up to this long.
    pub commit_interval_ms: Option<u64>,
    /// Apply migrations at start-up.
    pub migrate_on_start: bool,
    /// Ceiling of the exponential retry backoff while PostgreSQL is unavailable.
    pub retry_max_backoff_ms: u64,
    /// A batch transaction still unfinished after this long (a hung connection, a lock held
    /// elsewhere) is abandoned, rolled back and retried.
    pub commit_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            password: None,
            password_file: None,
            ssl_mode: None,
            ssl_root_cert: None,
            ssl_cert: None,
            ssl_key: None,
            pool_max: 8,
            batch_rows: None,
            linger_ms: None,
            commit_interval_ms: None,
            migrate_on_start: true,
            retry_max_backoff_ms: 5_000,
            commit_timeout_ms: 60_000,
        }
    }
}

/// HTTP endpoints (`/metrics`, `/health`, `/ready`, `/status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address; `""` turns the HTTP server off. Failing to bind it stops start-up.
    #[serde(with = "optional_address")]
    pub address: Option<SocketAddr>,
    /// `/health` fails when a partition has been retrying one batch (produce or sink) for
    /// longer than this.
    pub stall_timeout_ms: u64,
    /// `/ready` waits until every assigned partition is at most this many messages behind its
    /// high watermark (from the consumer's statistics, every 5 s).
    pub ready_max_lag: i64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            address: Some(SocketAddr::from(([0, 0, 0, 0], 9100))),
            stall_timeout_ms: 60_000,
            ready_max_lag: 10_000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `neurostream=debug,rdkafka=warn`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line formats.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

/// A loaded configuration together with the layers it came from (`Debug` shows the
/// configuration only: the layers hold secrets in clear).
#[derive(Clone)]
pub struct Loaded {
    /// The typed, validated configuration.
    pub config: Config,
    /// The layers, for `neurostream config`'s provenance column.
    pub figment: Figment,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The layered figment: defaults → optional file → environment.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| {
                    raw_client_map(key.as_str()).is_none()
                        && secret_env_path(key.as_str()).is_none()
                })
                .split("__"),
        )
        .merge(SecretEnv::from_env())
        .merge(RawClientEnv::from_env())
}

/// `kafka__security__sasl_password` (after the prefix) → `kafka.security.sasl_password` when
/// that key is a secret.
fn secret_env_path(key: &str) -> Option<String> {
    let path = key.to_ascii_lowercase().replace("__", ".");
    is_secret(&path).then_some(path)
}

/// Secrets from the environment, taken as the exact strings they are: figment's `Env` would
/// parse `20240601` as a number (a type error quoting it) and `"x"` as a quoted string.
struct SecretEnv(Vec<(String, String)>);

impl SecretEnv {
    fn from_env() -> Self {
        let vars = std::env::vars().filter_map(|(name, value)| {
            let key = name.strip_prefix(ENV_PREFIX)?;
            if raw_client_map(key).is_some() {
                return None;
            }
            Some((secret_env_path(key)?, value))
        });
        Self(vars.collect())
    }
}

impl figment::Provider for SecretEnv {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable(s) (secret)")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        fn insert(dict: &mut Dict, keys: &[&str], value: Value) {
            match keys {
                [] => {}
                [leaf] => {
                    dict.insert(leaf.to_string(), value);
                }
                [head, rest @ ..] => {
                    let entry = dict
                        .entry(head.to_string())
                        .or_insert_with(|| Value::from(Dict::new()));
                    if let Value::Dict(_, inner) = entry {
                        insert(inner, rest, value);
                    }
                }
            }
        }
        let mut root = Dict::new();
        for (path, value) in &self.0 {
            let keys: Vec<&str> = path.split('.').collect();
            insert(&mut root, &keys, Value::from(value.clone()));
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

/// `kafka__consumer__…` / `kafka__producer__…` (after the prefix): the raw map and the rest.
fn raw_client_map(key: &str) -> Option<(&'static str, &str)> {
    let lower = key.to_ascii_lowercase();
    ["consumer", "producer"].into_iter().find_map(|map| {
        let head = format!("kafka__{map}__");
        lower.starts_with(&head).then(|| (map, &key[head.len()..]))
    })
}

/// Raw librdkafka properties from the environment:
/// `NEUROSTREAM__KAFKA__CONSUMER__CLIENT_ID=x` sets `kafka.consumer."client.id"`. librdkafka
/// names are dotted (which figment's nesting would split) and have no underscores, so `_` (or a
/// literal `.`) in the variable name stands for a dot.
struct RawClientEnv(Vec<(&'static str, String, String)>);

impl RawClientEnv {
    fn from_env() -> Self {
        let vars = std::env::vars().filter_map(|(name, value)| {
            let key = name.strip_prefix(ENV_PREFIX)?;
            let (map, property) = raw_client_map(key)?;
            Some((map, property.to_ascii_lowercase().replace('_', "."), value))
        });
        Self(vars.collect())
    }
}

impl figment::Provider for RawClientEnv {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable(s) (raw librdkafka)")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        let mut maps: Dict = Dict::new();
        for (map, property, value) in &self.0 {
            let entry = maps
                .entry((*map).to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, dict) = entry {
                dict.insert(property.clone(), Value::from(value.clone()));
            }
        }
        let mut kafka = Dict::new();
        kafka.insert("kafka".into(), Value::from(maps));
        Ok(figment::Profile::Default.collect(kafka))
    }
}

/// Loads and validates the configuration.
///
/// # Errors
/// [`ConfigErrors`] listing every unknown key, every type error and every failed check.
pub fn load(file: Option<&Path>) -> Result<Loaded, ConfigErrors> {
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigErrors(vec![format!(
                "config file {} does not exist",
                path.display()
            )]));
        }
    }
    load_figment(figment(file))
}

/// Loads and validates a configuration from any figment (tests build their own).
///
/// # Errors
/// See [`load`].
pub fn load_figment(figment: Figment) -> Result<Loaded, ConfigErrors> {
    let mut problems = Vec::new();
    let schema = serde_json::to_value(Config::schema_example())
        .expect("the default configuration serialises");
    let mut raw = match figment.extract::<serde_json::Value>() {
        Ok(raw) => raw,
        Err(err) => {
            problems.extend(err.into_iter().map(|e| describe_error(&figment, &e)));
            return Err(ConfigErrors(problems));
        }
    };
    unknown_keys(&raw, &schema, "", &mut problems);
    // serde stops at the first type error; to report them all, each broken value is replaced by
    // its default (unknown keys are removed: listed above) and the extraction repeated.
    let mut broken: Vec<String> = Vec::new();
    let config = loop {
        match Figment::from(Serialized::defaults(&raw)).extract::<Config>() {
            Ok(config) => break Some(config),
            Err(err) => {
                let mut repaired = false;
                for e in err {
                    let unknown = match &e.kind {
                        figment::error::Kind::UnknownField(key, _) => Some(key.clone()),
                        _ => None,
                    };
                    if unknown.is_none() {
                        problems.push(describe_error(&figment, &e));
                        broken.push(display_path(&e.path));
                    }
                    repaired |= repair(&mut raw, &schema, &e.path, unknown.as_deref());
                }
                if !repaired || broken.len() > 256 {
                    break None;
                }
            }
        }
    };
    let Some(mut config) = config else {
        return Err(ConfigErrors(problems));
    };
    // Secrets from files are read now, so a missing or unreadable one is reported with the rest.
    config.kafka.security.read_secret_files(&mut problems);
    config.postgres.read_secret_files(&mut problems);
    config.schema_registry.read_secret_files(&mut problems);
    if let Err(ConfigErrors(more)) = config.validate() {
        // A value that had the wrong type was replaced by its default: its checks say nothing.
        problems.extend(more.into_iter().filter(|m| {
            !broken.iter().any(|b| {
                !b.is_empty() && (m.starts_with(b.as_str()) || m.contains(&format!("({b} is")))
            })
        }));
    }
    if problems.is_empty() {
        Ok(Loaded { config, figment })
    } else {
        Err(ConfigErrors(problems))
    }
}

/// A key path as the checks name it: `processing.windows[0].size_ms`.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// One extraction error as a user reads it: the key's path and where the value came from
/// (figment's own message names its internal profile).
fn describe_error(figment: &Figment, e: &figment::Error) -> String {
    let path = display_path(&e.path);
    let source = if path.is_empty() {
        String::new()
    } else {
        match source_of(figment, &e.path.join(".")).as_str() {
            "default" => String::new(),
            s => format!(" (from {s})"),
        }
    };
    let kind = redacted(&e.path.join("."), &e.kind);
    if path.is_empty() {
        format!("{kind}{source}")
    } else {
        format!("{path}: {kind}{source}")
    }
}

/// An extraction error's text without anything that could be a secret: the offending value is
/// left out where the key is (or may hold) a secret, and a parse error's quoted source lines
/// (`3 | sasl_password = hunter2`) are always dropped.
fn redacted(path: &str, kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let sensitive = path.is_empty()
        || is_secret(path)
        || path.starts_with("kafka.consumer")
        || path.starts_with("kafka.producer")
        || ["kafka", "kafka.security", "postgres"].contains(&path);
    let category = |actual: &Actual| match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "another type",
    };
    let text = match kind {
        Kind::InvalidType(actual, expected) if sensitive => {
            format!(
                "invalid type: found {}, expected {expected}",
                category(actual)
            )
        }
        Kind::InvalidValue(actual, expected) if sensitive => {
            format!(
                "invalid value: found {}, expected {expected}",
                category(actual)
            )
        }
        Kind::Message(_) if sensitive && !path.is_empty() => "invalid value".to_string(),
        other => other.to_string(),
    };
    text.lines()
        .filter(|line| {
            let t = line.trim_start();
            let digits = t.trim_start_matches(|c: char| c.is_ascii_digit());
            !digits.trim_start().starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replaces the value at `path` in `raw` by the schema's default (or removes it); returns
/// whether anything changed.
fn repair(
    raw: &mut serde_json::Value,
    schema: &serde_json::Value,
    path: &[String],
    unknown: Option<&str>,
) -> bool {
    use serde_json::Value;
    let Some((last, parents)) = path.split_last() else {
        // An unknown top-level key, or the whole document has the wrong shape.
        return match (unknown, raw) {
            (Some(key), Value::Object(map)) => map.remove(key).is_some(),
            _ => false,
        };
    };
    let mut value = raw;
    let mut default = Some(schema);
    for seg in parents {
        default = default.and_then(|d| match d {
            Value::Array(items) => items.first(),
            d => d.get(seg),
        });
        value = match value {
            Value::Object(map) => match map.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(items) => match seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    let default = default.and_then(|d| match d {
        Value::Array(items) => items.first(),
        d => d.get(last),
    });
    match (unknown, value) {
        (Some(key), Value::Object(map)) if key == last => map.remove(key).is_some(),
        (Some(key), v) => {
            // The error's path ends at the struct holding the unknown key.
            let target = match v {
                Value::Object(map) => map.get_mut(last),
                Value::Array(items) => last.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
                _ => None,
            };
            match target {
                Some(Value::Object(map)) => map.remove(key).is_some(),
                _ => false,
            }
        }
        (None, Value::Object(map)) => match default {
            Some(d) => map.insert(last.clone(), d.clone()).as_ref() != Some(d),
            None => map.remove(last).is_some(),
        },
        (None, Value::Array(items)) => match (last.parse::<usize>(), default) {
            (Ok(i), Some(d)) if i < items.len() && items[i] != *d => {
                items[i] = d.clone();
                true
            }
            (Ok(i), _) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Paths whose tables accept any key (raw librdkafka pass-through).
const FREE_FORM: [&str; 3] = ["kafka.consumer", "kafka.producer", "kafka.input_formats"];

fn unknown_keys(
    value: &serde_json::Value,
    schema: &serde_json::Value,
    path: &str,
    problems: &mut Vec<String>,
) {
    use serde_json::Value;
    if FREE_FORM.contains(&path) {
        return;
    }
    match (value, schema) {
        (Value::Object(fields), Value::Object(known)) => {
            for (key, inner) in fields {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    Some(inner_schema) => unknown_keys(inner, inner_schema, &child, problems),
                    None => problems.push(format!(
                        "unknown key `{child}` (known here: {})",
                        known.keys().cloned().collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }
        (Value::Array(items), Value::Array(example)) => {
            if let Some(item_schema) = example.first() {
                for (i, item) in items.iter().enumerate() {
                    unknown_keys(item, item_schema, &format!("{path}[{i}]"), problems);
                }
            }
        }
        _ => {}
    }
}

impl Config {
    /// A configuration whose serialised form names every accepted key.
    fn schema_example() -> Config {
        let mut config = Config::default();
        config.processing.windows = vec![WindowConfig::default()];
        config
    }

    /// Checks everything that can be checked without connecting, and reports it all.
    ///
    /// # Errors
    /// [`ConfigErrors`] with one line per problem.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Vec::new();
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            p.push("kafka.brokers must name at least one broker".into());
        }
        if k.group_id.trim().is_empty() {
            p.push("kafka.group_id must not be empty".into());
        }
        if k.input_topics.is_empty() || k.input_topics.iter().any(|t| t.trim().is_empty()) {
            p.push("kafka.input_topics must list at least one non-empty topic".into());
        }
        for name in k.topics.all() {
            if name.trim().is_empty() {
                p.push("kafka.topics: output topic names must not be empty".into());
            } else if k.input_topics.iter().any(|t| t == name) {
                p.push(format!(
                    "kafka.topics: `{name}` is both an input and an output topic"
                ));
            }
        }
        if !matches!(k.auto_offset_reset.as_str(), "earliest" | "latest") {
            p.push(format!(
                "kafka.auto_offset_reset must be `earliest` or `latest`, not `{}`",
                k.auto_offset_reset
            ));
        }
        if k.revoke_deadline_ms == 0 || k.revoke_deadline_ms >= k.session_timeout_ms {
            p.push(format!(
                "kafka.revoke_deadline_ms ({}) must be positive and below kafka.session_timeout_ms ({})",
                k.revoke_deadline_ms, k.session_timeout_ms
            ));
        }
        if k.partition_queue_bytes == 0 {
            p.push("kafka.partition_queue_bytes must be at least 1".into());
        }
        if k.partition_queue_capacity == 0 {
            p.push("kafka.partition_queue_capacity must be at least 1".into());
        }
        if k.max_event_bytes == 0 || k.max_event_bytes > 64 << 20 {
            p.push("kafka.max_event_bytes must be between 1 and 67108864".into());
        }
        if k.topic_partitions.is_some_and(|n| n < 1) {
            p.push("kafka.topic_partitions must be at least 1 when set".into());
        }
        if k.topic_replication_factor.is_some_and(|n| n < 1) {
            p.push("kafka.topic_replication_factor must be at least 1 when set".into());
        }
        if let Some(c) = &k.compression {
            if !matches!(c.as_str(), "none" | "gzip" | "snappy" | "lz4" | "zstd") {
                p.push(format!(
                    "kafka.compression must be none, gzip, snappy, lz4 or zstd, not `{c}`"
                ));
            }
        }
        for (key, value) in &k.producer {
            let weakens = match key.as_str() {
                "acks" | "request.required.acks" => !matches!(value.as_str(), "all" | "-1"),
                "enable.idempotence" => value != "true",
                _ => false,
            };
            if weakens {
                p.push(format!(
                    "kafka.producer.{key} = {value:?} would weaken durability; acks=all and idempotence stay on"
                ));
            }
        }
        for key in k.consumer.keys() {
            if matches!(
                key.as_str(),
                "enable.auto.offset.store" | "group.id" | "bootstrap.servers"
            ) {
                p.push(format!(
                    "kafka.consumer.{key} is managed by neurostream; use the typed setting instead"
                ));
            }
        }
        // One set of security settings for every client, checked as a whole: the properties
        // [kafka.security] covers cannot be set (differently) in a raw map.
        for (map, keys) in [
            ("consumer", k.consumer.keys()),
            ("producer", k.producer.keys()),
        ] {
            for key in keys {
                if let Some(typed) = security::typed_equivalent(key) {
                    p.push(format!(
                        "kafka.{map}.{key} is set through kafka.security.{typed}; set it there"
                    ));
                }
            }
        }
        // librdkafka checks property names and values when they are set: report what it refuses
        // now, before anything connects.
        for (client, settings) in [
            ("kafka.consumer", self.consumer_settings()),
            ("kafka.producer", self.producer_settings()),
        ] {
            for s in &settings {
                let mut single = rdkafka::ClientConfig::new();
                single.set(&s.key, &s.value);
                if let Err(err) = single.create_native_config() {
                    let why = if is_secret_property(&s.key) {
                        "invalid value (masked)".to_string()
                    } else {
                        err.to_string()
                    };
                    p.push(format!(
                        "{client}: librdkafka refuses `{}` (from {}): {why}",
                        s.key, s.source
                    ));
                }
            }
        }
        if let Some(d) = self.processing.dimension {
            if !(1..=1024).contains(&d) {
                p.push(format!(
                    "processing.dimension must be within 1..=1024, not {d}"
                ));
            }
        }
        let worst = (self.processing.max_open_windows as u128)
            * (self.processing.max_key_bytes as u128 + CHECKPOINT_BYTES_PER_WINDOW);
        if self.processing.max_open_windows == 0 {
            p.push("processing.max_open_windows must be at least 1".to_string());
        } else if worst > MAX_CHECKPOINT_BYTES
            && (1..=2_048).contains(&self.processing.max_key_bytes)
        {
            p.push(format!(
                "processing.max_open_windows = {} with processing.max_key_bytes = {} allows a checkpoint of {} MiB, above the {} MiB a partition's checkpoint may take (PostgreSQL holds at most 1 GB in one value): lower either",
                self.processing.max_open_windows,
                self.processing.max_key_bytes,
                worst >> 20,
                MAX_CHECKPOINT_BYTES >> 20
            ));
        }
        if !(1..=MAX_METADATA_BYTES).contains(&self.processing.max_metadata_bytes) {
            p.push(format!(
                "processing.max_metadata_bytes must be within 1..={MAX_METADATA_BYTES}, not {}",
                self.processing.max_metadata_bytes
            ));
        }
        if !(1..=2_048).contains(&self.processing.max_key_bytes) {
            p.push(format!(
                "processing.max_key_bytes must be within 1..=2048 (PostgreSQL index rows), not {}",
                self.processing.max_key_bytes
            ));
        }
        let cl = &self.processing.clustering;
        if cl.max_clusters == Some(0) {
            p.push("processing.clustering.max_clusters must be at least 1".into());
        }
        if cl
            .accept_sigmas
            .is_some_and(|a| !(a.is_finite() && a > 0.0))
        {
            p.push("processing.clustering.accept_sigmas must be positive".into());
        }
        if cl.min_cluster_points.is_some_and(|n| n < 2) {
            p.push("processing.clustering.min_cluster_points must be at least 2".into());
        }
        if cl.warmup_points.is_some_and(|n| n < 2) {
            p.push("processing.clustering.warmup_points must be at least 2".into());
        }
        // `ncs` holds its warm-up events (id, key, features, metadata) until it has placed
        // them, in memory and in every checkpoint meanwhile.
        let warming = cl.enabled && cl.algorithm == Algorithm::Ncs;
        let held = (warming as u128)
            * (cl.ncs_params().warmup_points as u128)
            * (self.processing.max_metadata_bytes as u128
                + 2 * self.processing.max_key_bytes as u128
                + 8 * 1_024
                + 128);
        if held > MAX_WARMUP_BYTES {
            p.push(format!(
                "processing.clustering.warmup_points = {} may hold {} MiB of events (with max_metadata_bytes = {} and max_key_bytes = {}), above {} MiB: lower either",
                cl.ncs_params().warmup_points,
                held >> 20,
                self.processing.max_metadata_bytes,
                self.processing.max_key_bytes,
                MAX_WARMUP_BYTES >> 20
            ));
        }
        if cl.stability_window == Some(0) {
            p.push("processing.clustering.stability_window must be at least 1".into());
        }
        if cl.status_every_points == 0 {
            p.push("processing.clustering.status_every_points must be at least 1".into());
        }
        for (i, w) in self.processing.windows.iter().enumerate() {
            let at = format!("processing.windows[{i}]");
            if w.size_ms == 0 || w.size_ms > MAX_WINDOW_MS {
                p.push(format!(
                    "{at}.size_ms must be within 1..={MAX_WINDOW_MS} (100 years)"
                ));
            }
            match (w.kind, w.slide_ms) {
                (WindowKind::Hopping, None) => {
                    p.push(format!("{at}: hopping windows need slide_ms"))
                }
                (WindowKind::Hopping, Some(s)) if s == 0 || s > w.size_ms => p.push(format!(
                    "{at}.slide_ms ({s}) must be positive and at most size_ms ({})",
                    w.size_ms
                )),
                // Every event joins size / slide windows: each one is a slot to update, count
                // and checkpoint.
                (WindowKind::Hopping, Some(s)) if w.size_ms / s > MAX_WINDOWS_PER_EVENT => {
                    p.push(format!(
                        "{at}: size_ms / slide_ms ({} / {s}) puts every event into more than {MAX_WINDOWS_PER_EVENT} windows; raise slide_ms",
                        w.size_ms
                    ))
                }
                (WindowKind::Tumbling | WindowKind::Sliding, Some(_)) => {
                    p.push(format!("{at}.slide_ms only applies to hopping windows"))
                }
                _ => {}
            }
            if w.kind == WindowKind::Sliding && w.late == LatePolicy::Update {
                p.push(format!(
                    "{at}.late = \"update\" is not available for sliding windows (use drop or dlq)"
                ));
            }
            if w.allowed_lateness_ms > 0 && w.late != LatePolicy::Update {
                p.push(format!(
                    "{at}.allowed_lateness_ms only applies with late = \"update\""
                ));
            }
            if w.grace_ms > MAX_WINDOW_MS || w.allowed_lateness_ms > MAX_WINDOW_MS {
                p.push(format!(
                    "{at}.grace_ms and allowed_lateness_ms must be at most {MAX_WINDOW_MS} (100 years)"
                ));
            }
            if w.idle_close_ms == Some(0) {
                p.push(format!("{at}.idle_close_ms must be positive when set"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for w in &self.processing.windows {
            if !seen.insert((w.kind, w.size_ms, w.slide_ms)) {
                p.push(format!(
                    "processing.windows: {} window of size_ms {} is configured twice",
                    w.kind.as_str(),
                    w.size_ms
                ));
            }
        }
        self.kafka.security.check(&mut p);
        self.check_formats(&mut p);
        let pg = &self.postgres;
        pg.check(&mut p);
        if pg.pool_max == 0 {
            p.push("postgres.pool_max must be at least 1".into());
        }
        if pg.batch_rows == Some(0) {
            p.push("postgres.batch_rows must be at least 1".into());
        }
        if pg
            .commit_interval_ms
            .is_some_and(|ms| ms > MAX_COMMIT_INTERVAL_MS)
        {
            p.push(format!(
                "postgres.commit_interval_ms must be at most {MAX_COMMIT_INTERVAL_MS} (the checkpoint would trail the outputs by longer)"
            ));
        }
        if self.http.ready_max_lag < 0 {
            p.push("http.ready_max_lag must not be negative".into());
        }
        if self.http.stall_timeout_ms == 0 {
            p.push("http.stall_timeout_ms must be positive".into());
        }
        if pg.commit_timeout_ms == 0 {
            p.push("postgres.commit_timeout_ms must be positive".into());
        }
        if pg.retry_max_backoff_ms == 0 {
            p.push("postgres.retry_max_backoff_ms must be positive".into());
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!(
                "log.level `{}` is not a valid filter: {err}",
                self.log.level
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(p))
        }
    }

    /// Output rows that trigger a sink flush.
    pub fn sink_batch_rows(&self) -> usize {
        self.postgres
            .batch_rows
            .unwrap_or(self.profile.settings().sink_batch_rows)
    }

    /// The least time between the starts of a partition's PostgreSQL transactions.
    pub fn sink_commit_interval_ms(&self) -> u64 {
        self.postgres
            .commit_interval_ms
            .unwrap_or(self.profile.settings().sink_commit_interval_ms)
    }

    /// The longest a processed event waits for its flush.
    pub fn sink_linger_ms(&self) -> u64 {
        self.postgres
            .linger_ms
            .unwrap_or(self.profile.settings().sink_linger_ms)
    }

    /// Effective librdkafka consumer properties with where each came from.
    pub fn consumer_settings(&self) -> Vec<ClientSetting> {
        let k = &self.kafka;
        let s = self.profile.settings();
        let mut out = Settings::default();
        out.set("bootstrap.servers", &k.brokers, "kafka.brokers");
        out.set("group.id", &k.group_id, "kafka.group_id");
        out.set("enable.auto.commit", "true", "neurostream");
        out.set("enable.auto.offset.store", "false", "neurostream");
        out.set(
            "auto.offset.reset",
            &k.auto_offset_reset,
            "kafka.auto_offset_reset",
        );
        out.set(
            "session.timeout.ms",
            &k.session_timeout_ms.to_string(),
            "kafka.session_timeout_ms",
        );
        self.profiled(
            &mut out,
            "fetch.wait.max.ms",
            k.fetch_wait_max_ms,
            s.fetch_wait_max_ms,
            "kafka.fetch_wait_max_ms",
        );
        self.profiled(
            &mut out,
            "fetch.min.bytes",
            k.fetch_min_bytes,
            s.fetch_min_bytes,
            "kafka.fetch_min_bytes",
        );
        out.set(
            "statistics.interval.ms",
            "5000",
            "neurostream (high watermarks for /ready and the lag gauge)",
        );
        // librdkafka stops fetching a partition whose prefetch queue holds `queued.min.messages`
        // (100,000) and looks again after this backoff, 1,000 ms by default: a fast broker fills
        // the queue in tens of milliseconds and the partition then starves for most of a second
        // (workers idle 50-65 %). Measured (1 M events, throughput profile, alternating):
        // 1,000 ms: 158-231 k events/s (4 of 5 runs under 185 k), 10 ms: 222-232 k (5 of 5).
        out.set(
            "fetch.queue.backoff.ms",
            "10",
            "neurostream (librdkafka's 1,000 ms default starves a partition whose prefetch queue filled)",
        );
        self.security(&mut out);
        for (key, value) in &k.consumer {
            out.set(key, value, "kafka.consumer (raw)");
        }
        out.0
    }

    /// A warning when the consumer's `fetch.min.bytes` is at or above what a fetch of one
    /// partition returns (whole batches up to `max.partition.fetch.bytes`, 1 MiB unless set, so
    /// a little less): whenever only one partition is fetched (one assigned, or the others
    /// paused by backpressure) the broker then holds every fetch for the whole
    /// `fetch.wait.max.ms` (measured: the throughput profile's 1 MiB minimum cost it 15 % of its
    /// rate on a two-partition backlog).
    pub fn fetch_size_warning(&self) -> Option<String> {
        let settings = self.consumer_settings();
        let value = |names: &[&str]| {
            // The last setting of either name wins, as in librdkafka.
            settings
                .iter()
                .rev()
                .find(|s| names.contains(&s.key.as_str()))
                .map(|s| (s.value.parse::<u64>().ok(), s.source.as_str()))
        };
        let (Some(min), min_source) = value(&["fetch.min.bytes"])? else {
            return None;
        };
        let (partition_max, max_source) =
            match value(&["max.partition.fetch.bytes", "fetch.message.max.bytes"]) {
                Some((Some(max), source)) => (max, source),
                Some((None, _)) => return None,
                None => (1 << 20, "librdkafka's default"),
            };
        (min >= partition_max).then(|| {
            format!(
                "fetch.min.bytes {min} (from {min_source}) is not below max.partition.fetch.bytes \
                 {partition_max} (from {max_source}): a fetch of one partition returns whole \
                 batches up to that maximum and rarely reaches it, so the broker holds each such \
                 fetch for the whole fetch.wait.max.ms"
            )
        })
    }

    /// Effective librdkafka producer properties with where each came from.
    pub fn producer_settings(&self) -> Vec<ClientSetting> {
        let k = &self.kafka;
        let s = self.profile.settings();
        let mut out = Settings::default();
        out.set("bootstrap.servers", &k.brokers, "kafka.brokers");
        self.profiled(
            &mut out,
            "linger.ms",
            k.linger_ms,
            s.linger_ms,
            "kafka.linger_ms",
        );
        self.profiled(
            &mut out,
            "batch.size",
            k.batch_size_bytes,
            s.batch_size_bytes,
            "kafka.batch_size_bytes",
        );
        // librdkafka has two names for it: a raw setting under either wins.
        if !["max.in.flight", "max.in.flight.requests.per.connection"]
            .iter()
            .any(|name| k.producer.contains_key(*name))
        {
            out.set(
                "max.in.flight.requests.per.connection",
                &s.max_in_flight.to_string(),
                &format!("profile {}", self.profile),
            );
        }
        match &k.compression {
            Some(c) => out.set("compression.type", c, "kafka.compression"),
            None => out.set(
                "compression.type",
                s.compression,
                &format!("profile {}", self.profile),
            ),
        }
        out.set(
            "message.max.bytes",
            &(k.max_event_bytes + 65_536).to_string(),
            "kafka.max_event_bytes + 64 KiB",
        );
        self.security(&mut out);
        for (key, value) in &k.producer {
            out.set(key, value, "kafka.producer (raw)");
        }
        // Durability is not negotiable, whatever the profile or the raw map says.
        out.set("enable.idempotence", "true", "neurostream");
        out.set("acks", "all", "neurostream");
        out.0
    }

    fn profiled(
        &self,
        out: &mut Settings,
        key: &str,
        explicit: Option<u64>,
        profile: u64,
        field: &str,
    ) {
        match explicit {
            Some(v) => out.set(key, &v.to_string(), field),
            None => out.set(
                key,
                &profile.to_string(),
                &format!("profile {}", self.profile),
            ),
        }
    }

    fn security(&self, out: &mut Settings) {
        for (key, value) in self.kafka.security.client_properties() {
            out.set(key, &value, "kafka.security");
        }
    }

    /// Prints the effective configuration, secrets masked, each value with its source.
    pub fn describe(&self, figment: &Figment) -> String {
        let mut out = String::new();
        let value = serde_json::to_value(self).expect("the configuration serialises");
        let mut leaves = Vec::new();
        flatten(&value, "", &mut leaves);
        out.push_str("# effective configuration (value  # source)\n");
        let file_of = |path: &str| {
            let file = format!("{path}_file");
            leaves
                .iter()
                .find(|(p, v)| *p == file && v != "null")
                .map(|(_, v)| format!("read from {v} ({file})"))
        };
        for (path, value) in &leaves {
            let shown = if is_secret(path) {
                mask(path, value)
            } else if is_path_key(path) && value != "null" {
                format!("{:?}", shown_path(Path::new(value.trim_matches('"'))))
            } else {
                value.clone()
            };
            let source = file_of(path).unwrap_or_else(|| source_of(figment, path));
            out.push_str(&format!("{path} = {shown}  # {source}\n"));
        }
        out.push_str(&format!(
            "\n# sink batching (profile {})\npostgres.batch_rows (effective) = {}\npostgres.linger_ms (effective) = {}\npostgres.commit_interval_ms (effective) = {}\n",
            self.profile,
            self.sink_batch_rows(),
            self.sink_linger_ms(),
            self.sink_commit_interval_ms()
        ));
        for (title, settings) in [
            ("librdkafka consumer", self.consumer_settings()),
            ("librdkafka producer", self.producer_settings()),
        ] {
            out.push_str(&format!("\n# effective {title} properties\n"));
            for s in settings {
                let shown = if is_secret_property(&s.key) {
                    mask(&s.key, &format!("{:?}", s.value))
                } else {
                    format!("{:?}", s.value)
                };
                out.push_str(&format!("{} = {}  # {}\n", s.key, shown, s.source));
            }
        }
        out
    }
}

/// One librdkafka property and where its value came from (`Debug` hides secret values).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSetting {
    /// librdkafka property name.
    pub key: String,
    /// Its value.
    pub value: String,
    /// The config field, profile or rule that set it.
    pub source: String,
}

impl fmt::Debug for ClientSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = if is_secret_property(&self.key) {
            "****"
        } else {
            &self.value
        };
        f.debug_struct("ClientSetting")
            .field("key", &self.key)
            .field("value", &value)
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Default)]
struct Settings(Vec<ClientSetting>);

impl Settings {
    fn set(&mut self, key: &str, value: &str, source: &str) {
        let setting = ClientSetting {
            key: key.into(),
            value: value.into(),
            source: source.into(),
        };
        match self.0.iter_mut().find(|s| s.key == key) {
            Some(existing) => *existing = setting,
            None => self.0.push(setting),
        }
    }
}

impl ClientSetting {
    /// Builds an rdkafka client config from effective settings.
    pub fn to_client_config(settings: &[ClientSetting]) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        for s in settings {
            config.set(&s.key, &s.value);
        }
        config
    }
}

fn flatten(value: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                flatten(v, &child, out);
            }
        }
        other => out.push((path.to_string(), other.to_string())),
    }
}

fn is_secret(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    if p.ends_with("_file") {
        // The path of a mounted secret, not the secret.
        return false;
    }
    let raw = p.starts_with("kafka.consumer.") || p.starts_with("kafka.producer.");
    p.contains("password")
        || p.contains("secret")
        || p.ends_with("postgres.url")
        || p.ends_with("schema_registry.url")
        || p.contains("sasl.jaas")
        || p.ends_with("ssl_key_pem")
        // librdkafka's own keys: key material, tokens and PEM blobs are secrets too.
        || (raw
            && ["key", "token", "pem", "credential", "oauthbearer"]
                .iter()
                .any(|w| p.contains(w)))
}

/// A librdkafka property (`ssl.key.pem`) judged like a raw-map key.
fn is_secret_property(key: &str) -> bool {
    is_secret(&format!("kafka.consumer.{key}"))
}

/// Keys whose values are file paths (shown unless they do not look like one).
fn is_path_key(path: &str) -> bool {
    path.ends_with("_file")
        || path.ends_with("_location")
        || path.ends_with("postgres.ssl_root_cert")
        || path.ends_with("postgres.ssl_cert")
        || path.ends_with("postgres.ssl_key")
}

/// A secret as `config` prints it: `postgres.url` keeps its shape with the password (in the
/// userinfo or a `password` query parameter) replaced; anything else is hidden entirely.
fn mask(path: &str, value: &str) -> String {
    if value == "null" {
        return value.to_string();
    }
    let text = value.trim_matches('"');
    let scheme_end = text.find("://").map(|i| i + 3);
    let url_shaped = path.ends_with("postgres.url") || path.ends_with("schema_registry.url");
    let (Some(scheme_end), true) = (scheme_end, url_shaped) else {
        return "\"****\"".into();
    };
    // The userinfo ends at the LAST `@` of the whole URL: a password may hold `@`, `/`, `?` or
    // `#` (unencoded, which also breaks the URL, but must not print it).
    let rest = &text[scheme_end..];
    let mut out = text[..scheme_end].to_string();
    let after = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => out.push_str(&format!("{}:****", &userinfo[..colon])),
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    out.push_str(&after[..authority_len]);
    let tail = &after[authority_len..];
    match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=****")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&format!("{path}?{}", params.join("&")));
        }
        None => out.push_str(tail),
    }
    if value.starts_with('"') {
        format!("\"{out}\"")
    } else {
        out
    }
}

fn source_of(figment: &Figment, path: &str) -> String {
    // A raw librdkafka key is dotted itself: ask for its map.
    let lookup = match path.splitn(3, '.').collect::<Vec<_>>()[..] {
        ["kafka", map @ ("consumer" | "producer"), _] => format!("kafka.{map}"),
        _ => path.to_string(),
    };
    match figment.find_metadata(&lookup) {
        Some(meta) if meta.name.contains("TOML") => match &meta.source {
            Some(source) => format!("file {source}"),
            None => "file".into(),
        },
        Some(meta) if meta.name.contains("raw librdkafka") => {
            format!(
                "env {ENV_PREFIX}{}",
                path.to_ascii_uppercase()
                    .replacen('.', "__", 2)
                    .replace('.', "_")
            )
        }
        Some(meta) if meta.name.contains("environment") || meta.name.contains("env") => {
            format!(
                "env {ENV_PREFIX}{}",
                path.to_ascii_uppercase().replace('.', "__")
            )
        }
        _ => "default".into(),
    }
}

/// `http.address`: a socket address, or `""` for none (TOML has no null).
mod optional_address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not host:port ({e})")))
    }
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Either::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Loaded, ConfigErrors> {
        load_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn every_unknown_key_and_problem_is_reported_at_once() {
        let err = from_toml(
            r#"
            [kafka]
            brokerz = "x"
            group_id = ""
            revoke_deadline_ms = 60000
            [postgres]
            colour = "blue"
            [[processing.windows]]
            kind = "tumbling"
            size_ms = 0
            sise_ms = 5
            "#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown key `kafka.brokerz`"), "{text}");
        assert!(text.contains("unknown key `postgres.colour`"), "{text}");
        assert!(
            text.contains("unknown key `processing.windows[0].sise_ms`"),
            "{text}"
        );
    }

    #[test]
    fn type_errors_do_not_hide_each_other_or_the_range_checks() {
        let err = from_toml(
            r#"
            profile = "fast"
            [kafka]
            max_event_bytes = "big"
            bogus = 1
            [processing]
            dimension = "x"
            max_key_bytes = 99999
            [[processing.windows]]
            size_ms = "long"
            [[processing.windows]]
            size_ms = 0
            [postgres]
            pool_max = 0
            "#,
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "profile: unknown variant",
            "kafka.max_event_bytes: invalid type",
            "unknown key `kafka.bogus`",
            "processing.dimension: invalid type",
            "processing.windows[0].size_ms: invalid type",
            "processing.max_key_bytes must be within",
            "processing.windows[1].size_ms must be within",
            "postgres.pool_max must be at least 1",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
        assert!(
            !text.contains("default."),
            "figment's profile leaks: {text}"
        );
        assert_eq!(err.0.len(), 8, "{text}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn raw_librdkafka_properties_come_from_the_environment_with_their_dots() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("NEUROSTREAM__KAFKA__CONSUMER__CLIENT_ID", "pod-7");
            jail.set_env("NEUROSTREAM__KAFKA__PRODUCER__QUEUE.BUFFERING.MAX.MS", "3");
            jail.set_env("NEUROSTREAM__KAFKA__BROKERS", "b1:9092");
            let loaded = load(None).map_err(|e| e.to_string())?;
            let k = &loaded.config.kafka;
            assert_eq!(
                k.consumer.get("client.id").map(String::as_str),
                Some("pod-7")
            );
            assert_eq!(
                k.producer.get("queue.buffering.max.ms").map(String::as_str),
                Some("3")
            );
            assert_eq!(k.brokers, "b1:9092");
            let described = loaded.config.describe(&loaded.figment);
            assert!(
                described.contains(
                    "kafka.consumer.client.id = \"pod-7\"  # env NEUROSTREAM__KAFKA__CONSUMER__CLIENT_ID"
                ),
                "{described}"
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_are_masked_whatever_they_contain() {
        assert_eq!(
            mask(
                "postgres.url",
                "\"postgres://bob:Pa@ss@db.example:5432/app?sslmode=require\""
            ),
            "\"postgres://bob:****@db.example:5432/app?sslmode=require\""
        );
        assert_eq!(
            mask(
                "postgres.url",
                "\"postgres://bob@db/app?password=hunter2&sslmode=disable\""
            ),
            "\"postgres://bob@db/app?password=****&sslmode=disable\""
        );
        assert_eq!(mask("postgres.password", "\"p@ss:word\""), "\"****\"");
        assert_eq!(
            mask("postgres.url", "\"postgres://app:2024#Se/c?re@db/ns\""),
            "\"postgres://app:****@db/ns\""
        );
        assert_eq!(
            mask("kafka.security.sasl_password", "\"x://y:z@h\""),
            "\"****\""
        );
        assert!(is_secret("kafka.consumer.ssl.key.pem"));
        assert!(is_secret("kafka.producer.sasl.oauthbearer.config"));
        assert!(is_secret("kafka.consumer.sasl.oauthbearer.client.secret"));
        assert!(is_secret("kafka.producer.ssl.certificate.pem"));
        assert!(!is_secret("processing.max_key_bytes"));
        assert!(!is_secret("kafka.consumer.fetch.wait.max.ms"));
    }

    #[test]
    fn validate_lists_every_problem() {
        let mut c = Config::default();
        c.kafka.group_id.clear();
        c.kafka.revoke_deadline_ms = 50_000;
        c.processing.windows[0].size_ms = 0;
        c.postgres.pool_max = 0;
        c.kafka.producer.insert("acks".into(), "1".into());
        let err = c.validate().unwrap_err();
        assert_eq!(err.0.len(), 5, "{err}");
    }

    #[test]
    fn the_clustering_warm_up_holds_a_bounded_number_of_bytes() {
        let mut c = Config::default();
        c.validate().unwrap();
        c.processing.clustering.warmup_points = Some(100_000);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("may hold 2551 MiB of events"), "{err}");
        c.processing.clustering.algorithm = Algorithm::NcsV8;
        c.validate().unwrap();
        c.processing.clustering.algorithm = Algorithm::Ncs;
        c.processing.clustering.enabled = false;
        c.validate().unwrap();
        c.processing.clustering.enabled = true;
        c.processing.clustering.warmup_points = Some(4_000);
        c.validate().unwrap();
        c.processing.max_metadata_bytes = MAX_METADATA_BYTES + 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_hopping_window_joins_each_event_to_at_most_ten_thousand_windows() {
        let mut c = Config::default();
        c.processing.windows[0] = WindowConfig {
            kind: WindowKind::Hopping,
            size_ms: 86_400_000,
            slide_ms: Some(1),
            ..WindowConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("more than 10000 windows"), "{err}");
        c.processing.windows[0].slide_ms = Some(8_640);
        c.validate().unwrap();
    }

    #[test]
    fn the_open_window_cap_keeps_the_checkpoint_storable() {
        let mut c = Config::default();
        c.processing.max_open_windows = 1_000_000;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("allows a checkpoint of 1167 MiB"), "{err}");
        c.processing.max_key_bytes = 256;
        c.validate().unwrap();
        c.processing.max_open_windows = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn explicit_settings_win_over_the_profile() {
        let loaded = from_toml(
            r#"
            profile = "throughput"
            [kafka]
            linger_ms = 7
            [kafka.producer]
            "batch.size" = "12345"
            [postgres]
            linger_ms = 3
            commit_interval_ms = 40
            "#,
        )
        .unwrap();
        let c = loaded.config;
        let producer = c.producer_settings();
        let get = |k: &str| producer.iter().find(|s| s.key == k).unwrap().clone();
        assert_eq!(get("linger.ms").value, "7");
        assert_eq!(get("batch.size").value, "12345");
        assert_eq!(get("batch.size").source, "kafka.producer (raw)");
        assert_eq!(get("compression.type").source, "profile throughput");
        assert_eq!(get("acks").value, "all");
        assert_eq!(c.sink_linger_ms(), 3);
        assert_eq!(c.sink_batch_rows(), 10_000);
        assert_eq!(c.sink_commit_interval_ms(), 40);
    }

    #[test]
    fn a_fetch_minimum_one_partition_cannot_reach_is_warned_about() {
        let warning = |toml: &str| from_toml(toml).unwrap().config.fetch_size_warning();
        for profile in ["throughput", "balanced", "latency"] {
            assert_eq!(
                warning(&format!("profile = \"{profile}\"")),
                None,
                "{profile}"
            );
        }
        // The throughput profile's minimum before 2026-12-08: equal to the partition maximum.
        assert!(warning("[kafka]\nfetch_min_bytes = 1048576").is_some());
        let above = warning("[kafka]\nfetch_min_bytes = 2000000").unwrap();
        assert!(
            above.contains("2000000 (from kafka.fetch_min_bytes)")
                && above.contains("1048576 (from librdkafka's default)"),
            "{above}"
        );
        // A larger partition maximum, under either of librdkafka's names, answers it.
        for name in ["max.partition.fetch.bytes", "fetch.message.max.bytes"] {
            let toml = format!(
                "[kafka]\nfetch_min_bytes = 2000000\n[kafka.consumer]\n\"{name}\" = \"4000000\""
            );
            assert_eq!(warning(&toml), None, "{name}");
        }
        let raw = warning(
            "[kafka.consumer]\n\"fetch.min.bytes\" = \"300000\"\n\"max.partition.fetch.bytes\" = \"200000\"",
        )
        .unwrap();
        assert!(raw.contains("from kafka.consumer (raw)"), "{raw}");
    }

    #[test]
    fn the_latency_profile_keeps_one_produce_request_in_flight_unless_the_raw_map_says() {
        let in_flight = |toml: &str| {
            let producer = from_toml(toml).unwrap().config.producer_settings();
            producer
                .iter()
                .filter(|s| s.key.starts_with("max.in.flight"))
                .map(|s| (s.key.clone(), s.value.clone()))
                .collect::<Vec<_>>()
        };
        let full = "max.in.flight.requests.per.connection".to_string();
        assert_eq!(
            in_flight("profile = \"latency\""),
            [(full.clone(), "1".into())]
        );
        assert_eq!(
            in_flight("profile = \"throughput\""),
            [(full.clone(), "5".into())]
        );
        // Either of librdkafka's two names in the raw map is the only one set.
        assert_eq!(
            in_flight("profile = \"latency\"\n[kafka.producer]\n\"max.in.flight\" = \"3\""),
            [("max.in.flight".into(), "3".into())]
        );
        assert_eq!(
            in_flight(
                "profile = \"latency\"\n[kafka.producer]\n\"max.in.flight.requests.per.connection\" = \"2\""
            ),
            [(full, "2".into())]
        );
    }

    #[test]
    fn presets_apply_and_explicit_parameters_win() {
        let loaded = from_toml(
            r#"
            [processing.clustering]
            algorithm = "ncs-v8"
            preset = "streaming_iot"
            learning_rate = 0.5
            "#,
        )
        .unwrap();
        let c = &loaded.config.processing.clustering;
        assert_eq!(c.algorithm, Algorithm::NcsV8);
        let v8 = c.v8_params();
        assert_eq!(v8.learning_rate, 0.5, "explicit wins");
        assert_eq!(v8.max_clusters, 15, "from the preset");
        assert_eq!(v8.decay_rate, 0.005, "from the preset");
        assert_eq!(v8.base_threshold, 0.7, "from the preset");
        assert_eq!(c.ncs_params().max_clusters, 15);
        assert!(from_toml("[processing.clustering]\npreset = \"fastest\"").is_err());
    }

    #[test]
    fn secrets_are_masked_and_sources_named() {
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(
            r#"
            [postgres]
            url = "postgres://app:hunter2@db:5432/ns"
            password = "pg-pass-77"
            [kafka.security]
            protocol = "SASL_SSL"
            sasl_mechanism = "scram-sha-512"
            sasl_username = "app"
            sasl_password = "s3cret"
            ssl_key_pem = "-----BEGIN PRIVATE KEY-----inline-key-material"
            ssl_key_password = "key-pass-42"
            [kafka.consumer]
            "sasl.oauthbearer.client.secret" = "oauth-9"
            "#,
        ));
        // The client key does not parse (it is not a key): reported without its contents.
        let err = load_figment(figment.clone()).unwrap_err().to_string();
        assert!(err.contains("kafka.security.ssl_key_pem"), "{err}");
        let secrets = [
            "hunter2",
            "pg-pass-77",
            "s3cret",
            "inline-key-material",
            "key-pass-42",
            "oauth-9",
        ];
        for s in secrets {
            assert!(!err.contains(s), "{s} in {err}");
        }
        let figment = figment.merge(Toml::string(
            "[kafka.security]\nssl_key_pem = \"\"\nssl_key_password = \"\"",
        ));
        let mut config: Config = figment.extract().unwrap();
        config.kafka.security.ssl_key_pem = Some(Secret::new("inline-key-material"));
        config.kafka.security.ssl_key_password = Some(Secret::new("key-pass-42"));
        let debug = format!("{config:?}");
        let text = config.describe(&figment);
        for s in secrets {
            assert!(!text.contains(s), "{s} in {text}");
            assert!(!debug.contains(s), "{s} in {debug}");
        }
        assert!(
            text.contains("sasl.mechanism = \"SCRAM-SHA-512\"  # kafka.security"),
            "{text}"
        );
        assert!(text.contains("postgres://app:****@db:5432/ns"), "{text}");
        assert!(
            text.contains("kafka.brokers = \"localhost:9092\"  # default"),
            "{text}"
        );
    }

    /// `openssl` CLI output in `dir`: a CA, a second CA, and a PKCS#1 (traditional) key.
    fn pems(dir: &Path) {
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs")
                .status
                .success();
            assert!(ok, "openssl {args:?}");
        };
        for name in ["a", "b"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-subj",
                &format!("/CN={name}"),
            ]);
        }
        run(&["ec", "-in", "a.key", "-out", "a-traditional.key"]);
        let bundle = [
            std::fs::read(dir.join("a.pem")).unwrap(),
            std::fs::read(dir.join("b.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
    }

    #[test]
    fn postgres_tls_and_raw_security_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        pems(dir.path());
        let p = |name: &str| dir.path().join(name).display().to_string();
        let err = from_toml(
            r#"
            [kafka.security]
            protocol = "ssl"
            sasl_username = "u"
            [kafka.consumer]
            "sasl.password" = "x"
            [postgres]
            url = "postgres://u@db/ns?foo=1"
            "#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "kafka.consumer.sasl.password is set through kafka.security.sasl_password",
            "kafka.security.sasl_username only applies with protocol sasl_plaintext or sasl_ssl",
            "postgres.url: unknown parameter `foo`",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
        let err = from_toml(&format!(
            r#"
            [postgres]
            url = "postgres://u@db/ns"
            ssl_mode = "prefer"
            ssl_root_cert = "{}"
            ssl_cert = "{}"
            ssl_key = "{}"
            "#,
            p("bundle.pem"),
            p("a.pem"),
            p("a-traditional.key")
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "holds 2 certificates, but only the first would be trusted",
            "must be an unencrypted PKCS#8 PEM key",
            "sslmode prefer does not verify the server",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
        // The registry's TLS files are checked with the rest.
        let err = from_toml(&format!(
            "[schema_registry]\nurl = \"https://r\"\nssl_ca_location = \"{}\"\n\
             ssl_certificate_location = \"{}\"\nssl_key_location = \"{}\"\n",
            p("a-traditional.key"),
            p("a.pem"),
            p("a-traditional.key")
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "schema_registry.ssl_ca_location: not a PEM certificate",
            "schema_registry.ssl_key_location must be an unencrypted PKCS#8 PEM key",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
        // A root certificate alone means verify-full; with require, verify-ca.
        let mut pg = PostgresConfig {
            url: Some("postgres://u@db/ns".into()),
            ssl_root_cert: Some(dir.path().join("a.pem")),
            ..PostgresConfig::default()
        };
        assert!(matches!(
            pg.connect_options().unwrap().get_ssl_mode(),
            sqlx::postgres::PgSslMode::VerifyFull
        ));
        pg.ssl_mode = Some(PgSslMode::Require);
        assert!(matches!(
            pg.connect_options().unwrap().get_ssl_mode(),
            sqlx::postgres::PgSslMode::VerifyCa
        ));
        // Secret files: a FIFO is not read (it would block), nor a file over 1 MiB.
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; (1 << 20) + 1]).unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        for (path, want) in [(&big, "larger than"), (&fifo, "not a regular file")] {
            if path == &fifo && !made.as_ref().is_ok_and(|s| s.success()) {
                continue;
            }
            let err = from_toml(&format!(
                "[postgres]\nurl = \"postgres://u@db/ns\"\npassword_file = \"{}\"\n",
                path.display()
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn formats_are_checked_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let bad_schema = dir.path().join("bad.avsc");
        std::fs::write(
            &bad_schema,
            r#"{"type":"record","name":"R","fields":[{"name":"ts","type":"boolean"}]}"#,
        )
        .unwrap();
        let err = from_toml(&format!(
            r#"
            [kafka]
            input_topics = ["a", "b"]
            input_format = "avro"
            input_formats = {{ b = "avro-raw", c = "json" }}
            avro_writer_schema_file = "{}"
            output_format = "avro"
            [schema_registry]
            password = "p"
            "#,
            bad_schema.display()
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "kafka.input_formats names `c`, which is not an input topic",
            "kafka.avro_writer_schema_file: field `ts` (ts) is boolean",
            "schema_registry.url is required",
            "schema_registry.password is set without schema_registry.username",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
        let ok = from_toml(
            "[kafka]\ninput_format = \"auto\"\n[schema_registry]\nurl = \"https://u:pw-x@reg:8081\"\n",
        )
        .unwrap();
        assert_eq!(ok.config.input_format("events"), InputFormat::Auto);
        let text = ok.config.describe(&ok.figment);
        assert!(text.contains("https://u:****@reg:8081"), "{text}");
        assert!(!text.contains("pw-x"), "{text}");
    }

    #[test]
    fn no_error_quotes_a_secret() {
        let secret = "hunter2secret";
        let cases = [
            format!("[kafka.security]\nsasl_password = {secret}\n"),
            format!("[kafka.security]\nsasl_password = \"pa\\q{secret}\"\n"),
            "[kafka.security]\nsasl_password = 20240601\n".to_string(),
            "[kafka.producer]\n\"ssl.keystore.password\" = 20240601\n".to_string(),
            format!("[postgres]\nurl_file = \"postgres://u:{secret}@h/db\"\n"),
            format!(
                "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\n\
                 sasl_username = \"u\"\nsasl_password_file = \"{secret}\"\n"
            ),
            format!(
                "[kafka.security]\nprotocol = \"ssl\"\nssl_ca_location = \"-----BEGIN {secret}\"\n"
            ),
            format!("[postgres]\nurl = \"postgres://u:{secret}@h/db?sslpassword={secret}\"\n"),
        ];
        for doc in &cases {
            let err = from_toml(doc).unwrap_err().to_string();
            assert!(!err.contains(secret), "{doc}\n{err}");
            assert!(!err.contains("20240601"), "{doc}\n{err}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's error type, test only
    fn secrets_from_the_environment_are_taken_verbatim() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("NEUROSTREAM__POSTGRES__PASSWORD", "007");
            jail.set_env("NEUROSTREAM__POSTGRES__URL", "postgres://u@h/db");
            jail.set_env(
                "NEUROSTREAM__KAFKA__SECURITY__SASL_PASSWORD",
                " \"quoted\" ",
            );
            jail.set_env("NEUROSTREAM__KAFKA__SECURITY__PROTOCOL", "SASL-SSL");
            jail.set_env("NEUROSTREAM__KAFKA__SECURITY__SASL_MECHANISM", "PLAIN");
            jail.set_env("NEUROSTREAM__KAFKA__SECURITY__SASL_USERNAME", "u");
            let loaded = load(None).map_err(|e| e.to_string())?;
            let c = &loaded.config;
            assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "007");
            let sasl = c.kafka.security.sasl_password.as_ref().unwrap();
            assert_eq!(sasl.expose(), " \"quoted\" ");
            let text = c.describe(&loaded.figment);
            assert!(
                text.contains(
                    "postgres.password = \"****\"  # env NEUROSTREAM__POSTGRES__PASSWORD"
                ),
                "{text}"
            );
            // A mistyped variable naming a whole section: its value (a URL with a password) is
            // not quoted.
            jail.clear_env();
            jail.set_env("NEUROSTREAM__POSTGRES", "postgres://u:pw-hunter2@h/db");
            let err = load(None).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_come_from_files_and_problems_come_together() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "from-a-file\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let loaded = from_toml(&format!(
            r#"
            [kafka.security]
            protocol = "sasl_plaintext"
            sasl_mechanism = "PLAIN"
            sasl_username = "u"
            sasl_password_file = "{}"
            [postgres]
            url = "postgres://u@db/ns"
            password_file = "{}"
            "#,
            password.display(),
            password.display()
        ))
        .unwrap();
        let sec = &loaded.config.kafka.security;
        assert_eq!(sec.sasl_password.as_ref().unwrap().expose(), "from-a-file");
        let pg = &loaded.config.postgres;
        assert_eq!(pg.password.as_ref().unwrap().expose(), "from-a-file");
        let text = loaded.config.describe(&loaded.figment);
        assert!(!text.contains("from-a-file"), "{text}");
        assert!(
            text.contains(&password.display().to_string()),
            "paths are shown: {text}"
        );

        let err = from_toml(&format!(
            r#"
            [kafka.security]
            protocol = "bogus"
            sasl_mechanism = "GSSAPI"
            ssl_ca_location = "/nonexistent/ca.pem"
            [postgres]
            url = "postgres://u@db/ns"
            password = "p"
            password_file = "{}"
            url_file = "/nonexistent/url"
            ssl_mode = "verify-everything"
            "#,
            empty.display()
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "unknown security protocol `bogus`",
            "unknown SASL mechanism `GSSAPI`",
            "postgres.password and postgres.password_file are both set",
            "postgres.url and postgres.url_file are both set",
            "unknown sslmode `verify-everything`",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }

        let err = from_toml(&format!(
            r#"
            [kafka.security]
            protocol = "SASL_SSL"
            ssl_ca_location = "/nonexistent/ca.pem"
            ssl_certificate_location = "{}"
            [postgres]
            password_file = "{}"
            ssl_root_cert = "{}"
            "#,
            password.display(),
            empty.display(),
            password.display()
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "kafka.security.sasl_mechanism is required with protocol sasl_ssl",
            "kafka.security.sasl_username is required",
            "kafka.security.sasl_password (or sasl_password_file) is required",
            "kafka.security.ssl_ca_location: cannot read /nonexistent/ca.pem",
            "kafka.security.ssl_certificate_location is set without its private key",
            "postgres.password_file",
            "is empty",
            "postgres.ssl_root_cert: not a PEM certificate",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
        assert!(!err.contains("from-a-file"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's error type, test only
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ns.toml",
                "[kafka]\ngroup_id = \"from-file\"\nbrokers = \"f:1\"",
            )?;
            jail.set_env("NEUROSTREAM__KAFKA__GROUP_ID", "from-env");
            jail.set_env("NEUROSTREAM__KAFKA__INPUT_TOPICS", "a, b");
            let loaded = load(Some(Path::new("ns.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(loaded.config.kafka.group_id, "from-env");
            assert_eq!(loaded.config.kafka.brokers, "f:1");
            assert_eq!(loaded.config.kafka.input_topics, vec!["a", "b"]);
            let text = loaded.config.describe(&loaded.figment);
            assert!(
                text.contains("# env NEUROSTREAM__KAFKA__GROUP_ID"),
                "{text}"
            );
            assert!(text.contains("kafka.brokers = \"f:1\"  # file"), "{text}");
            Ok(())
        });
    }
}

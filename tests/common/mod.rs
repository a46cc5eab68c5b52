//! Test harness: a private PostgreSQL server per test binary (a fresh database per test) and
//! Kafka brokers: librdkafka's in-process mock cluster, and Apache Kafka itself (KRaft, from the
//! Maven Central jars `.ci/install-kafka.sh` installs; see [`kafka`]).
#![allow(dead_code)]

pub mod kafka;
pub mod registry;
pub mod tls;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use neurostream::config::{Config, Profile, WindowConfig};
use neurostream::output::Emitted;
use neurostream::pgserver::{Durability, PgServer};
use neurostream::processor::{Processor, Record};
use neurostream::store::{PgStore, Store};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use rdkafka::{Offset, TopicPartitionList};

static PG: OnceLock<Option<PgServer>> = OnceLock::new();

/// A fresh, migrated database on the binary's private server.
pub async fn fresh_db() -> (String, PgStore) {
    let server = PG
        .get_or_init(|| Some(PgServer::start(Durability::Fast).expect("private PostgreSQL starts")))
        .as_ref()
        .expect("server started");
    let name = format!("t_{}", unique());
    let admin = PgStore::connect_lazy(&server.url("postgres"), 2).unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin.pool())
        .await
        .unwrap();
    admin.pool().close().await;
    let url = server.url(&name);
    let store = PgStore::connect_lazy(&url, 8).unwrap();
    store.migrate().await.unwrap();
    (url, store)
}

/// A private PostgreSQL server of the test's own (to kill and restart), with durable settings
/// (with `synchronous_commit=off` a crash loses acknowledged commits), migrated.
pub async fn own_postgres() -> (PgServer, String, PgStore) {
    let server = PgServer::start(Durability::Default).expect("private PostgreSQL starts");
    let url = server.url("postgres");
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    store.migrate().await.unwrap();
    (server, url, store)
}

/// A process-unique suffix for topic, group and database names.
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A Kafka broker for one test.
pub enum Broker {
    /// librdkafka's in-process mock cluster.
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    /// Apache Kafka: a private single-node KRaft cluster.
    Kafka(kafka::KafkaCluster),
}

impl Broker {
    /// The in-process mock cluster.
    pub fn mock() -> Broker {
        Broker::Mock(MockCluster::new(1).expect("mock cluster starts"))
    }

    /// A private Apache Kafka node, or `None` (test skipped) when the jars are not installed
    /// and not required. `.ci/run` installs them and sets `NEUROSTREAM_REQUIRE_KAFKA=1`, so CI
    /// never skips.
    pub fn kafka() -> Option<Broker> {
        kafka::KafkaCluster::start_or_skip(1).map(Broker::Kafka)
    }

    /// Bootstrap servers.
    pub fn brokers(&self) -> String {
        match self {
            Broker::Mock(m) => m.bootstrap_servers(),
            Broker::Kafka(k) => k.bootstrap(),
        }
    }

    /// Creates a topic.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match self {
            Broker::Mock(m) => m.create_topic(name, partitions, 1).unwrap(),
            Broker::Kafka(k) => {
                let replication = k.node_ids().len().min(3) as i32;
                k.create_topic(name, partitions, replication).await
            }
        }
    }
}

/// A service configuration for `broker` with unique topic and group names, its topics created.
pub async fn config_for(broker: &Broker, partitions: i32, db_url: &str) -> Config {
    let mut c = base_config(&broker.brokers(), db_url);
    // The mock cluster does not serve DescribeConfigs.
    c.kafka.fit_batch_to_topics = matches!(broker, Broker::Kafka(_));
    broker
        .create_topic(&c.kafka.input_topics[0], partitions)
        .await;
    for topic in c.kafka.topics.all() {
        broker.create_topic(topic, 1).await;
    }
    c
}

/// A service configuration for `brokers` and `db_url` with unique topic and group names (no
/// topic created), quick rebalances, small batches, no HTTP, and two tumbling windows.
pub fn base_config(brokers: &str, db_url: &str) -> Config {
    neurostream::telemetry::init_logging(&neurostream::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    });
    let id = unique();
    let mut c = Config::default();
    c.kafka.brokers = brokers.to_string();
    c.kafka.group_id = format!("g_{id}");
    c.kafka.input_topics = vec![format!("in_{id}")];
    let t = &mut c.kafka.topics;
    t.clusters = format!("clusters_{id}");
    t.drift = format!("drift_{id}");
    t.outliers = format!("outliers_{id}");
    t.windows = format!("windows_{id}");
    t.status = format!("status_{id}");
    t.dlq = format!("dlq_{id}");
    c.kafka.session_timeout_ms = 6_000;
    c.kafka.revoke_deadline_ms = 5_000;
    // Small queues, so backpressure pauses and resumes partitions all the time: by count, and
    // by bytes (the test events are 40-70 bytes, so about 60 fill 4 KiB).
    c.kafka.partition_queue_capacity = 64;
    c.kafka.partition_queue_bytes = 4_096;
    c.profile = Profile::Latency;
    c.postgres.url = Some(db_url.into());
    c.postgres.batch_rows = Some(50);
    c.postgres.linger_ms = Some(20);
    c.http.address = None;
    if let Ok(d) = std::env::var("NS_TEST_RDKAFKA_DEBUG") {
        c.kafka.consumer.insert("debug".into(), d);
    }
    c.processing.windows = vec![
        WindowConfig {
            size_ms: 100,
            grace_ms: 20,
            ..WindowConfig::default()
        },
        WindowConfig {
            size_ms: 1_000,
            ..WindowConfig::default()
        },
    ];
    c.validate().unwrap();
    c
}

/// A deterministic stream per partition: `n` events, keys cycling, slightly out of order.
pub fn stream(partition: i32, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let ts = 1_000_000 + (i as i64) * 7 - ((i as i64 * 13) % 40);
            format!(
                r#"{{"key":"k{}","ts":{ts},"value":{}.5,"features":[{}.0,1.0]}}"#,
                (i * 7 + partition as usize) % 5,
                i % 17,
                partition
            )
            .into_bytes()
        })
        .collect()
}

/// Produces `messages[p]` to partition `p` of `topic`, in order, acked.
///
/// NB: one message per record batch, so resuming mid-batch is exercised at every offset.
pub async fn produce(brokers: &str, topic: &str, messages: &[Vec<Vec<u8>>]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for (p, msgs) in messages.iter().enumerate() {
        for m in msgs {
            let record = FutureRecord::<str, [u8]>::to(topic)
                .partition(p as i32)
                .payload(m.as_slice())
                .timestamp(1);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Every output the pure processor emits over each partition's messages, offset by offset.
pub fn replay(config: &Config, messages: &[Vec<Vec<u8>>]) -> Vec<(i32, Emitted)> {
    let mut all = Vec::new();
    for (p, msgs) in messages.iter().enumerate() {
        let mut processor =
            Processor::new(&config.processing, config.kafka.max_event_bytes, p as i32);
        let mut out: Vec<Emitted> = Vec::new();
        for (offset, m) in msgs.iter().enumerate() {
            let record = Record {
                payload: Some(m),
                key: None,
                timestamp_ms: Some(1),
                offset: offset as i64,
            };
            let _ = processor.process(record, &mut out);
        }
        all.extend(out.into_iter().map(|e| (p as i32, e)));
    }
    all
}

/// The window rows a clean run stores.
pub fn expected_rows(config: &Config, messages: &[Vec<Vec<u8>>]) -> Vec<WindowRow> {
    let topic = &config.kafka.input_topics[0];
    let mut rows: Vec<WindowRow> = replay(config, messages)
        .into_iter()
        .filter_map(|(_, e)| WindowRow::from_output(topic, &e))
        .collect();
    rows.sort_by(WindowRow::order);
    rows
}

/// One `window_aggregates` row, as compared by the tests.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WindowRow {
    pub source_topic: String,
    pub partition: i32,
    pub window_kind: String,
    pub size_ms: i64,
    pub key: String,
    pub window_start_ms: i64,
    pub count: i64,
    pub sum: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub is_final: bool,
    pub source_offset: i64,
}

impl WindowRow {
    /// The row a window aggregate output becomes (`None` for other outputs).
    pub fn from_output(topic: &str, e: &Emitted) -> Option<WindowRow> {
        match &e.output {
            neurostream::output::Output::WindowAggregate(w) => Some(WindowRow {
                source_topic: topic.to_string(),
                partition: w.partition,
                window_kind: w.window.as_str().to_string(),
                size_ms: w.size_ms as i64,
                key: w.key.clone(),
                window_start_ms: w.window_start,
                count: w.count as i64,
                sum: w.sum,
                min: w.min,
                max: w.max,
                is_final: w.is_final,
                source_offset: e.source_offset,
            }),
            _ => None,
        }
    }

    fn order(a: &WindowRow, b: &WindowRow) -> std::cmp::Ordering {
        (
            a.partition,
            &a.window_kind,
            a.size_ms,
            a.window_start_ms,
            &a.key,
        )
            .cmp(&(
                b.partition,
                &b.window_kind,
                b.size_ms,
                b.window_start_ms,
                &b.key,
            ))
    }
}

/// Every stored window row, sorted like [`expected_rows`].
pub async fn stored_rows(store: &PgStore) -> Vec<WindowRow> {
    let mut rows: Vec<WindowRow> = sqlx::query_as(
        "SELECT source_topic, partition, window_kind, size_ms, key,
                (extract(epoch FROM window_start) * 1000)::bigint AS window_start_ms,
                count, sum, min, max, is_final, source_offset
         FROM window_aggregates",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.sort_by(WindowRow::order);
    rows
}

/// Waits until every partition's checkpoint reached `ends[p]`.
pub async fn wait_for_checkpoints(store: &PgStore, group: &str, ends: &[i64], timeout: Duration) {
    let started = Instant::now();
    loop {
        let rows = checkpoint_map(store, group).await;
        let done = ends
            .iter()
            .enumerate()
            .all(|(p, end)| rows.get(&(p as i32)).is_some_and(|off| off >= end));
        if done {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "checkpoints did not reach {ends:?} within {timeout:?}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of checkpointed offsets of `group`.
pub async fn checkpointed(store: &PgStore, group: &str) -> i64 {
    let (sum,): (Option<i64>,) = sqlx::query_as(
        "SELECT sum(next_offset)::bigint FROM partition_progress WHERE group_id = $1",
    )
    .bind(group)
    .fetch_one(store.pool())
    .await
    .unwrap();
    sum.unwrap_or(0)
}

/// The store as the service uses it.
pub fn service_store(store: &PgStore) -> Store {
    Store::Postgres(store.clone())
}

/// Shorthand for an `Arc`'d config.
pub fn arc(config: &Config) -> Arc<Config> {
    Arc::new(config.clone())
}

/// Asserts two row lists are equal, reporting the first difference (lists can be long).
pub fn assert_rows_eq(got: &[WindowRow], want: &[WindowRow]) {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!(
            "row {i} differs (of {} stored, {} expected):\n stored   {:?}\n expected {:?}",
            got.len(),
            want.len(),
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "row counts differ");
}

/// Clustering rows as compared by the tests: (partition, cluster id, source offset, event) of
/// `cluster_updates`, and (partition, source offset, reason) of `outliers`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterRows {
    pub updates: Vec<(i32, i64, i64, String)>,
    pub outliers: Vec<(i32, i64, String)>,
}

/// The clustering rows a clean run stores.
pub fn expected_cluster_rows(config: &Config, messages: &[Vec<Vec<u8>>]) -> ClusterRows {
    use neurostream::output::Output;
    let mut rows = ClusterRows::default();
    for (p, e) in replay(config, messages) {
        match e.output {
            Output::ClusterUpdate(c) => {
                rows.updates
                    .push((p, c.cluster_id as i64, e.source_offset, c.event))
            }
            Output::Outlier(o) => rows.outliers.push((p, o.offset, o.reason)),
            _ => {}
        }
    }
    rows.updates.sort();
    rows.updates.dedup();
    rows.outliers.sort();
    rows
}

/// The clustering rows stored.
pub async fn stored_cluster_rows(store: &PgStore) -> ClusterRows {
    let mut updates: Vec<(i32, i64, i64, String)> =
        sqlx::query_as("SELECT partition, cluster_id, source_offset, event FROM cluster_updates")
            .fetch_all(store.pool())
            .await
            .unwrap();
    updates.sort();
    let mut outliers: Vec<(i32, i64, String)> =
        sqlx::query_as("SELECT partition, source_offset, reason FROM outliers")
            .fetch_all(store.pool())
            .await
            .unwrap();
    outliers.sort();
    ClusterRows { updates, outliers }
}

/// Messages of partition 0 of `topic` from the beginning: until `n` were read (30 s at most), or
/// with `n = None` until none arrived for 3 s.
pub fn read_topic(brokers: &str, topic: &str, n: Option<usize>) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader_{}", unique()))
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", "2000000")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let (started, mut last) = (Instant::now(), Instant::now());
    loop {
        match n {
            Some(n) if out.len() >= n || started.elapsed() > Duration::from_secs(30) => break,
            None if last.elapsed() > Duration::from_secs(3) => break,
            _ => {}
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.detach());
            last = Instant::now();
        }
    }
    out
}

/// A message header's value as text.
pub fn header<'a>(m: &'a OwnedMessage, key: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Each partition's checkpointed next offset of `group`.
pub async fn checkpoint_map(store: &PgStore, group: &str) -> std::collections::BTreeMap<i32, i64> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM partition_progress WHERE group_id = $1")
            .bind(group)
            .fetch_all(store.pool())
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// `neurostream --config <path> run` as a child process, logging at `rust_log` to stderr.
pub fn spawn_run(config_path: &std::path::Path, rust_log: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_neurostream"))
        .args(["--config", config_path.to_str().unwrap(), "run"])
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Runs the `neurostream` binary with `args` and the environment `env` to completion; its output
/// and how long it took. Panics, with what it printed, when it is still running after `limit`.
pub fn run_binary(
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (std::process::Output, Duration) {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_neurostream"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`neurostream {}` still running after {limit:?}:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), started.elapsed())
}

/// Runs the service in-process (`app::run`) until the returned token is cancelled.
pub fn spawn_service(
    config: &Config,
    store: &PgStore,
) -> (
    tokio_util::sync::CancellationToken,
    Arc<neurostream::telemetry::Progress>,
    tokio::task::JoinHandle<Result<(), neurostream::app::AppError>>,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let progress = Arc::new(neurostream::telemetry::Progress::default());
    let handle = tokio::spawn(neurostream::app::run(
        arc(config),
        service_store(store),
        progress.clone(),
        shutdown.clone(),
    ));
    (shutdown, progress, handle)
}

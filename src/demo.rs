//! `neurostream demo`: the whole pipeline on one machine.
//!
//! An in-process Kafka-protocol broker (librdkafka's mock cluster), a private PostgreSQL started
//! from the local binaries (or `DATABASE_URL`), the built-in generator of drifting clustered
//! events (with a few malformed ones for the dead-letter topic), the real service in between, a
//! live progress line, and a report that ends with answers to SQL questions on the stored
//! aggregates.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Profile, Secret, WindowConfig};
use crate::generator::{Generator, GeneratorConfig};
use crate::kafka::producer::InFlight;
use crate::pgserver::{Durability, PgServer, PgServerError};
use crate::store::{MemoryStore, Store};
use crate::telemetry::Progress;

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Events to generate.
    pub events: u64,
    /// Input partitions.
    pub partitions: i32,
    /// Client/sink profile.
    pub profile: Profile,
    /// An existing database instead of a private server.
    pub database_url: Option<String>,
    /// Print the live progress line.
    pub progress_line: bool,
}

/// What the demo measured.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// Messages produced (events + malformed).
    pub messages: u64,
    /// Events processed.
    pub events: u64,
    /// Messages routed to the dead-letter topic.
    pub dead_letters: u64,
    /// Output rows written.
    pub rows: u64,
    /// Wall time from first produce to last checkpoint.
    pub seconds: f64,
    /// Whether PostgreSQL was used.
    pub postgres: bool,
    /// The printed report.
    pub text: String,
}

const INPUT_TOPIC: &str = "events";

/// Runs the demo and returns its report (also printed).
///
/// # Errors
/// When the broker, database or pipeline cannot start, or the pipeline stops on an error.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let cluster = MockCluster::new(1).context("starting the in-process Kafka broker")?;
    let brokers = cluster.bootstrap_servers();
    let mut config = Config::default();
    config.kafka.brokers = brokers.clone();
    config.kafka.group_id = "neurostream-demo".into();
    // The mock cluster does not serve DescribeConfigs (start-up would wait 2 s for nothing).
    config.kafka.fit_batch_to_topics = false;
    config.kafka.input_topics = vec![INPUT_TOPIC.into()];
    config.profile = opts.profile;
    config.http.address = None;
    config.processing.windows = vec![
        WindowConfig {
            size_ms: 10_000,
            grace_ms: 1_000,
            ..WindowConfig::default()
        },
        WindowConfig {
            size_ms: 60_000,
            grace_ms: 1_000,
            ..WindowConfig::default()
        },
    ];
    cluster
        .create_topic(INPUT_TOPIC, opts.partitions, 1)
        .context("creating the input topic")?;
    for topic in config.kafka.topics.all() {
        cluster
            .create_topic(topic, 1, 1)
            .context("creating an output topic")?;
    }

    // PostgreSQL: DATABASE_URL, else a private server, else the Kafka side only.
    let mut notes = Vec::new();
    let mut _server = None;
    let url = match &opts.database_url {
        Some(url) => Some(url.clone()),
        None => match PgServer::start(Durability::Default) {
            Ok(server) => {
                let url = server.url("postgres");
                notes.push(format!(
                    "PostgreSQL: private server on 127.0.0.1:{} (data in {}, removed at exit)",
                    server.port(),
                    server.data_dir().display()
                ));
                _server = Some(server);
                Some(url)
            }
            Err(err @ (PgServerError::NoBinaries | PgServerError::NoUser)) => {
                notes.push(format!(
                    "PostgreSQL: SKIPPED ({err}). The Kafka side ran in full; outputs and \
                     checkpoints stayed in memory. To enable: install the server binaries \
                     (`apt-get install -y postgresql`) or set DATABASE_URL=postgres://…"
                ));
                None
            }
            Err(err) => return Err(err).context("starting the private PostgreSQL server"),
        },
    };
    config.postgres.url = url.clone().map(Secret::from);
    config.validate()?;
    let store = match &url {
        Some(_) => {
            Store::Postgres(crate::app::open_postgres(&config, Duration::from_secs(30)).await?)
        }
        None => Store::Memory(MemoryStore::default()),
    };

    let config = Arc::new(config);
    let progress = Arc::new(Progress::default());
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(crate::app::run(
        config.clone(),
        store.clone(),
        progress.clone(),
        shutdown.clone(),
    ));

    let started = Instant::now();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .context("creating the demo's event producer")?;
    let total = opts.events;
    let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let generator = {
        let (produced, progress) = (produced.clone(), progress.clone());
        tokio::spawn(async move { generate(producer, total, produced, progress).await })
    };

    // Progress until every message is durable (checkpointed), or the service stops.
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    // When the group had formed and the first batch was durable, and how many events were
    // durable by then: the steady rate counts only what became durable after that.
    let mut first_durable: Option<(Instant, u64)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if service.is_finished() {
            break;
        }
        let snap = progress.snapshot();
        let durable = progress.durable_offsets().max(0) as u64;
        if durable > 0 {
            first_durable.get_or_insert_with(|| (Instant::now(), durable));
        }
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64();
        if dt >= 1.0 {
            rate = (durable - last.1.min(durable)) as f64 / dt;
            last = (now, durable);
        }
        let sent = produced.load(std::sync::atomic::Ordering::Relaxed);
        if opts.progress_line {
            eprint!(
                "\r  produced {sent:>9} | durable {durable:>9} | {rate:>9.0} ev/s | lag {:>8} | rows {:>7} | dlq {:>5}   ",
                sent.saturating_sub(durable),
                snap.rows,
                snap.dead_letters
            );
            let _ = std::io::stderr().flush();
        }
        if generator.is_finished() && durable >= total {
            break;
        }
    }
    if opts.progress_line {
        eprintln!();
    }
    let seconds = started.elapsed().as_secs_f64();
    let steady = first_durable.map(|(t, at)| (t.elapsed().as_secs_f64(), total.saturating_sub(at)));
    generator.await.context("generator task")??;
    shutdown.cancel();
    service.await.context("service task")??;

    let snap = progress.snapshot();
    anyhow::ensure!(
        snap.events + snap.dead_letters == total,
        "only {} of {total} messages were accounted for",
        snap.events + snap.dead_letters
    );
    let mut text = String::new();
    let out = &mut text;
    out.push_str("\n== neurostream demo report ==\n");
    for n in &notes {
        out.push_str(&format!("{n}\n"));
    }
    out.push_str(&format!(
        "Kafka: in-process mock cluster at {brokers}; input topic `{INPUT_TOPIC}` with {} partitions; profile {}\n",
        opts.partitions, config.profile
    ));
    out.push_str(&format!(
        "messages produced {total}: events processed {}, dead-lettered {} (malformed on purpose)\n",
        snap.events, snap.dead_letters
    ));
    let path = if url.is_some() {
        "produce → process → Kafka outputs → PostgreSQL checkpoint"
    } else {
        "produce → process → Kafka outputs; PostgreSQL skipped, checkpoints in memory"
    };
    let after = match steady {
        Some((secs, n)) if n > 0 && secs >= 0.5 => format!(
            "{:.0} events/s after the consumer group formed ({n} events made durable in the last {secs:.2} s)",
            n as f64 / secs
        ),
        _ => "the rate after the consumer group formed is not measurable (almost everything was \
              durable at the first sample)"
            .to_string(),
    };
    out.push_str(&format!(
        "end to end ({path}): {seconds:.2} s in all, {:.0} events/s counting the group's start; {after}\n",
        total as f64 / seconds.max(1e-9),
    ));
    out.push_str(&format!(
        "outputs: {} messages produced to Kafka (windows, clusters, outliers, drift, status), {} rows upserted",
        snap.outputs, snap.rows
    ));
    if snap.sink_seconds > 0.0 {
        out.push_str(&format!(
            " ({:.0} rows/s inside sink transactions: COPY + upsert + checkpoint)",
            snap.rows as f64 / snap.sink_seconds
        ));
    }
    out.push('\n');
    if let Store::Postgres(pg) = &store {
        out.push_str(&answers(pg.pool()).await?);
    }
    println!("{text}");
    Ok(DemoReport {
        messages: total,
        events: snap.events,
        dead_letters: snap.dead_letters,
        rows: snap.rows,
        seconds,
        postgres: url.is_some(),
        text,
    })
}

/// The most messages the generator runs ahead of the pipeline. NB: the mock cluster keeps only
/// about 5 MB per partition and silently drops the oldest messages beyond that, like a tiny
/// retention; staying within this lag keeps every generated message readable.
const MAX_LAG: u64 = 40_000;

async fn generate(
    producer: FutureProducer,
    total: u64,
    produced: Arc<std::sync::atomic::AtomicU64>,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let mut generator = Generator::new(GeneratorConfig {
        malformed_every: 997,
        ..GeneratorConfig::default()
    });
    let mut in_flight = InFlight::new(50_000);
    for n in 0..total {
        while n.saturating_sub(progress.durable_offsets().max(0) as u64) >= MAX_LAG {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let msg = generator.next_message();
        let record = FutureRecord::to(INPUT_TOPIC)
            .key(&msg.key)
            .payload(&msg.payload);
        in_flight.send(&producer, record).await?;
        produced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    in_flight.finish().await?;
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

/// Answers the README's SQL questions against the stored aggregates.
async fn answers(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    let mut out = String::from("\nSQL answers (views from migrations/0005_views.sql):\n");
    let (windows, keys, finals): (i64, i64, i64) = sqlx::query_as(
        "-- how much did we store?
         SELECT count(*), count(DISTINCT key), count(*) FILTER (WHERE is_final)
         FROM window_aggregates",
    )
    .fetch_one(pool)
    .await?;
    out.push_str(&format!(
        "  Q1 rows in window_aggregates: {windows} ({finals} final) over {keys} keys\n"
    ));
    let top: Vec<(String, i64, Option<f64>)> = sqlx::query_as(
        "-- busiest keys over all closed one-minute windows
         SELECT key, sum(count)::bigint, max(max) FROM window_series
         WHERE window_kind = 'tumbling' AND size_ms = 60000
         GROUP BY key ORDER BY 2 DESC, 1 LIMIT 5",
    )
    .fetch_all(pool)
    .await?;
    out.push_str("  Q2 busiest keys (one-minute windows): key | events | max value\n");
    for (key, count, max) in top {
        out.push_str(&format!(
            "       {key:<10} | {count:>6} | {}\n",
            max.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into())
        ));
    }
    let series: Vec<(chrono::DateTime<chrono::Utc>, i64, Option<f64>)> = sqlx::query_as(
        "-- the last five 10-second windows of one key
         SELECT window_start, count, sum / NULLIF(count, 0)
         FROM window_series
         WHERE key = 'sensor-7' AND size_ms = 10000
         ORDER BY window_start DESC LIMIT 5",
    )
    .fetch_all(pool)
    .await?;
    out.push_str("  Q3 window series of sensor-7 (10 s): start | events | mean value\n");
    for (start, count, mean) in series {
        out.push_str(&format!(
            "       {} | {count:>4} | {}\n",
            start.format("%H:%M:%S"),
            mean.map(|m| format!("{m:.3}"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    let progress: Vec<(i32, i64)> = sqlx::query_as(
        "-- where each partition's checkpoint stands
         SELECT partition, next_offset FROM partition_progress ORDER BY partition",
    )
    .fetch_all(pool)
    .await?;
    let clusters: Vec<(i32, i64, f64)> = sqlx::query_as(
        "-- active clusters per partition and their mean confidence
         SELECT partition, count(*), avg(quality)::float8 FROM clusters
         WHERE status = 'active' GROUP BY partition ORDER BY partition",
    )
    .fetch_all(pool)
    .await?;
    out.push_str("  Q4 active clusters (partition: clusters, mean confidence): ");
    out.push_str(
        &clusters
            .iter()
            .map(|(p, n, q)| format!("{p}: {n} ({q:.2})"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push('\n');
    let (outliers, history): (i64, i64) = sqlx::query_as(
        "-- outliers flagged, and cluster history rows
         SELECT (SELECT count(*) FROM outliers), (SELECT count(*) FROM cluster_updates)",
    )
    .fetch_one(pool)
    .await?;
    out.push_str(&format!(
        "  Q5 outliers stored: {outliers}; cluster_updates history rows: {history}\n"
    ));
    let drift: Vec<(String, i64)> = sqlx::query_as(
        "-- drift alerts per severity (view drift_alerts_per_day)
         SELECT severity, sum(alerts)::bigint FROM drift_alerts_per_day GROUP BY severity ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    out.push_str("  Q6 drift alerts by severity: ");
    if drift.is_empty() {
        out.push_str("none");
    }
    out.push_str(
        &drift
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push('\n');
    out.push_str("  Q7 checkpoints (partition → next offset): ");
    out.push_str(
        &progress
            .iter()
            .map(|(p, o)| format!("{p}→{o}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push('\n');
    Ok(out)
}

//! The service: wires configuration, store, producer and consumer together and runs until
//! shutdown or a fatal error.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::kafka::intake::{Intake, Shared};
use crate::kafka::producer::OutputProducer;
use crate::store::{PgStore, Store, StoreError};
use crate::telemetry::Progress;
use crate::worker::Fatal;

/// Why the service stopped unsuccessfully; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Fix the configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigErrors),
    /// The Kafka client could not be created (check brokers and client properties).
    #[error("Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic the service needs is missing or cannot be created.
    #[error(transparent)]
    Topics(#[from] crate::kafka::TopicError),
    /// The store could not be opened or rejected data.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The PostgreSQL connection settings are unusable.
    #[error("{0}")]
    PostgresSettings(String),
    /// The Schema Registry is unusable (client settings, or it refused an output schema).
    #[error("schema registry: {0}")]
    Registry(String),
    /// PostgreSQL could not be reached within the start-up wait.
    #[error("cannot reach PostgreSQL: {0}")]
    Postgres(String),
    /// A worker hit a condition retrying cannot fix.
    #[error("stopped: {0}")]
    Fatal(String),
}

/// Connects to PostgreSQL (`postgres.url` with the TLS and password settings over it) and applies
/// migrations (when configured to), retrying while the database is not reachable yet for up to
/// `wait`.
///
/// # Errors
/// [`AppError::PostgresSettings`] when the URL is unset or unusable, [`AppError::Store`] when
/// migrations fail, [`AppError::Postgres`] when the database stays away.
pub async fn open_postgres(config: &Config, wait: Duration) -> Result<PgStore, AppError> {
    let options = config
        .postgres
        .connect_options()
        .map_err(AppError::PostgresSettings)?;
    let store = PgStore::connect_lazy_with(options.clone(), config.postgres.pool_max)
        .with_commit_timeout(Duration::from_millis(config.postgres.commit_timeout_ms));
    if config.postgres.migrate_on_start {
        let started = std::time::Instant::now();
        loop {
            match store.migrate().await {
                Ok(()) => break,
                Err(StoreError::Migrate(sqlx::migrate::MigrateError::Execute(
                    err @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut),
                ))) if started.elapsed() < wait => {
                    info!(error = %err, "PostgreSQL not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(StoreError::Migrate(sqlx::migrate::MigrateError::Execute(
                    sqlx::Error::PoolTimedOut,
                ))) => {
                    // NB: the pool only says it timed out; one direct connection says why
                    // (connection refused, authentication, unknown database, ...).
                    use sqlx::Connection as _;
                    let why = match sqlx::PgConnection::connect_with(&options).await {
                        Ok(_) => "the database accepted a direct connection but the pool timed out"
                            .to_string(),
                        Err(err) => err.to_string(),
                    };
                    return Err(AppError::Postgres(why));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(store)
}

/// Runs the pipeline until `shutdown` is cancelled (clean drain) or a fatal error occurs.
///
/// # Errors
/// [`AppError`] when the Kafka clients cannot be created or a worker raised a fatal error.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    crate::kafka::prepare_topics(&config).await?;
    let codecs = crate::avro::Codecs::start(&config)
        .await
        .map_err(AppError::Registry)?;
    let mut settings = config.producer_settings();
    let limit = if config.kafka.fit_batch_to_topics {
        crate::kafka::smallest_message_limit(&config).await
    } else {
        None
    };
    if let Some((topic, limit)) = limit {
        if let Some(was) = crate::kafka::producer::cap_batch_size(&mut settings, &topic, limit) {
            warn!(
                topic,
                max_message_bytes = limit,
                batch_size = was,
                "the producer's batch.size is above a topic's max.message.bytes; lowered to it (set kafka.batch_size_bytes to at most that)"
            );
        }
    }
    let mut producer = OutputProducer::with_settings(&config, &settings)?;
    if let Some(encoder) = &codecs.output {
        producer = producer.with_avro(encoder.clone());
    }
    progress.set_profile(&config.profile.to_string());
    for topic in &config.kafka.input_topics {
        crate::telemetry::register_topic(topic);
    }
    let queue_gauge = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                metrics::gauge!(crate::telemetry::PRODUCER_QUEUE_MESSAGES)
                    .set(producer.queued() as f64);
            }
        })
    };
    let fatal = Fatal::default();
    let stop = CancellationToken::new();
    let shared = Shared {
        config: config.clone(),
        store,
        producer: producer.clone(),
        progress,
        fatal: fatal.clone(),
        codecs,
    };
    let intake = Intake::start(shared, stop.clone())?;
    info!(topics = ?config.kafka.input_topics, group = %config.kafka.group_id, "consuming");
    tokio::select! {
        _ = shutdown.cancelled() => info!("shutdown requested; draining"),
        _ = fatal.raised() => {}
    }
    stop.cancel();
    // Draining is bounded by the revoke deadline; committing offsets and leaving the group can
    // still block while brokers are unreachable: never longer than this.
    let bound = Duration::from_millis(config.kafka.revoke_deadline_ms) + Duration::from_secs(10);
    if tokio::time::timeout(bound, intake.join()).await.is_err() {
        error!("the consumer did not stop within the drain deadline + 10 s; exiting anyway (the checkpoints are consistent)");
    }
    queue_gauge.abort();
    // NB: librdkafka's flush blocks; not on the async runtime.
    let flushing = producer.clone();
    let flushed = tokio::task::spawn_blocking(move || flushing.flush(Duration::from_secs(10)));
    let _ = tokio::time::timeout(Duration::from_secs(11), flushed).await;
    match fatal.reason() {
        Some(reason) => {
            error!(%reason, "stopped on a fatal error");
            Err(AppError::Fatal(reason))
        }
        None => {
            info!("stopped cleanly");
            Ok(())
        }
    }
}

//! The Kafka edge: consumption with rebalances ([`intake`]), output production ([`producer`]) and
//! topic administration.

pub mod client_log;
pub mod intake;
pub mod producer;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::{ClientSetting, Config};

/// Why the topics the service needs are not usable.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// No broker answered a metadata request.
    #[error("cannot reach the Kafka brokers `{brokers}`: {source}")]
    Unreachable {
        /// Bootstrap servers.
        brokers: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// Input topics that do not exist (the service never creates them).
    #[error("input topic(s) {0:?} do not exist; create them (the service consumes, it does not create inputs)")]
    MissingInput(Vec<String>),
    /// Output topics that do not exist while `kafka.create_topics = false`.
    #[error("output topic(s) {0:?} do not exist and kafka.create_topics is false")]
    MissingOutput(Vec<String>),
    /// The broker refused to create an output topic.
    #[error("cannot create output topic `{topic}`: {code}")]
    CreateFailed {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: RDKafkaErrorCode,
    },
}

/// Checks that the input topics exist and creates missing output topics (or names them), before
/// anything consumes.
///
/// # Errors
/// [`TopicError`], saying which topic and what to do.
pub async fn prepare_topics(config: &Config) -> Result<(), TopicError> {
    let brokers = config.kafka.brokers.clone();
    let unreachable = |source| TopicError::Unreachable {
        brokers: brokers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> =
        ClientSetting::to_client_config(&config.producer_settings())
            .create()
            .map_err(unreachable)?;
    let admin = std::sync::Arc::new(admin);
    let existing: Vec<String> = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(15))
                .map(|m| m.topics().iter().map(|t| t.name().to_string()).collect())
        })
        .await
        .expect("the metadata request does not panic")
        .map_err(unreachable)?
    };
    let missing = |names: Vec<&str>| -> Vec<String> {
        names
            .into_iter()
            .filter(|t| !existing.iter().any(|e| e == t))
            .map(String::from)
            .collect()
    };
    let inputs = missing(
        config
            .kafka
            .input_topics
            .iter()
            .map(String::as_str)
            .collect(),
    );
    if !inputs.is_empty() {
        return Err(TopicError::MissingInput(inputs));
    }
    let outputs = missing(config.kafka.topics.all().to_vec());
    if outputs.is_empty() {
        return Ok(());
    }
    if !config.kafka.create_topics {
        return Err(TopicError::MissingOutput(outputs));
    }
    let partitions = config.kafka.topic_partitions.unwrap_or(-1);
    let replication = config.kafka.topic_replication_factor.unwrap_or(-1);
    let names: Vec<&str> = outputs.iter().map(String::as_str).collect();
    tracing::info!(topics = ?names, partitions, replication, "creating output topics");
    create_topics(&admin, &names, partitions, replication)
        .await
        .map_err(|(topic, code)| TopicError::CreateFailed { topic, code })
}

async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&str],
    partitions: i32,
    replication: i32,
) -> Result<(), (String, RDKafkaErrorCode)> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &opts).await.map_err(|e| {
        (
            topics.join(","),
            e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail),
        )
    })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err(failed) => return Err(failed),
        }
    }
    Ok(())
}

/// Creates `topics` with `partitions` partitions where they do not exist yet (tests, demo).
///
/// # Errors
/// [`KafkaError`] when the broker refuses for another reason than "already exists".
pub async fn ensure_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::error!(topic, error = %code, "topic creation failed"),
                )
            }
        }
    }
    Ok(())
}

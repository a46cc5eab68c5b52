//! The Kafka edge: consumption with rebalances ([`intake`]), output production ([`producer`]) and
//! topic administration.

pub mod client_log;
pub mod intake;
pub mod producer;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::{ClientSetting, Config};
use client_log::ClientLog;

/// Why the topics the service needs are not usable.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// No broker answered a metadata request.
    #[error("cannot reach the Kafka brokers `{brokers}`: {reason}")]
    Unreachable {
        /// Bootstrap servers.
        brokers: String,
        /// librdkafka's last reason (a refused connection, a timeout, ...).
        reason: String,
    },
    /// The brokers refused this client's credentials or TLS: no retry can fix that.
    #[error(
        "the Kafka brokers `{brokers}` refused the connection: {reason} (check kafka.security)"
    )]
    Refused {
        /// Bootstrap servers.
        brokers: String,
        /// librdkafka's reason (authentication failed, certificate verify failed, ...).
        reason: String,
    },
    /// The client could not be created from its properties.
    #[error("Kafka client: {0}")]
    Client(#[source] KafkaError),
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
    let existing: Vec<String> = {
        let (settings, brokers) = (config.producer_settings(), config.kafka.brokers.clone());
        tokio::task::spawn_blocking(move || {
            let probe: BaseProducer<CheckContext> = ClientSetting::to_client_config(&settings)
                .create_with_context(CheckContext::default())
                .map_err(TopicError::Client)?;
            fetch_metadata(
                probe.client(),
                || probe.poll(Duration::ZERO),
                None,
                &brokers,
            )
            .map(|m| m.topics().iter().map(|t| t.name().to_string()).collect())
        })
        .await
        .expect("the metadata request does not panic")?
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
    let admin: AdminClient<CheckContext> =
        ClientSetting::to_client_config(&config.producer_settings())
            .create_with_context(CheckContext::default())
            .map_err(TopicError::Client)?;
    create_topics(&admin, &names, partitions, replication)
        .await
        .map_err(|(topic, code)| TopicError::CreateFailed { topic, code })
}

/// The smallest `max.message.bytes` among the output and dead-letter topics, with its topic;
/// `None` when the brokers do not say (no DescribeConfigs permission, no answer in 2 s).
pub async fn smallest_message_limit(config: &Config) -> Option<(String, u64)> {
    let admin: AdminClient<CheckContext> =
        ClientSetting::to_client_config(&config.producer_settings())
            .create_with_context(CheckContext::default())
            .ok()?;
    let topics: Vec<ResourceSpecifier<'_>> = config
        .kafka
        .topics
        .all()
        .into_iter()
        .map(ResourceSpecifier::Topic)
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(2)));
    let described = match admin.describe_configs(&topics, &opts).await {
        Ok(described) => described,
        Err(err) => {
            tracing::debug!(error = %err, "the topics' max.message.bytes are unknown");
            return None;
        }
    };
    described
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|resource| {
            let OwnedResourceSpecifier::Topic(topic) = &resource.specifier else {
                return None;
            };
            let limit = resource.get("max.message.bytes")?.value.as_deref()?;
            Some((topic.clone(), limit.parse().ok()?))
        })
        .min_by_key(|(_, limit)| *limit)
}

/// How long start-up waits for a broker to answer before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The client context of the start-up checks and the command-line tools: librdkafka's logs and
/// errors as the service writes them, and the first authentication or TLS failure remembered,
/// so that a wrong password, an untrusted CA or a missing client certificate stops at once with
/// librdkafka's own reason instead of a timeout.
#[derive(Debug, Default)]
pub struct CheckContext {
    log: ClientLog,
    /// The last reason librdkafka gave, and whether it was a security failure.
    last: Mutex<Option<(bool, String)>>,
}

impl CheckContext {
    /// The first security failure seen, if any.
    fn refused(&self) -> Option<String> {
        match &*self
            .last
            .lock()
            .expect("never poisoned: nothing panics holding it")
        {
            Some((true, reason)) => Some(reason.clone()),
            _ => None,
        }
    }

    fn last_reason(&self) -> Option<String> {
        let last = self
            .last
            .lock()
            .expect("never poisoned: nothing panics holding it");
        last.as_ref().map(|(_, reason)| reason.clone())
    }
}

impl ClientContext for CheckContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.log.log(level, fac, message);
        // A broker closing the connection is only logged (facility FAIL), not raised as an
        // error: it is the only trace of a plaintext client on a TLS listener.
        if fac == "FAIL" {
            self.remember(is_refusal(message), true, message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
        // "1/1 brokers are down" says less than the reason before it.
        let informative = error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown);
        self.remember(is_security_failure(&error, reason), informative, reason);
    }
}

impl CheckContext {
    fn remember(&self, security: bool, informative: bool, reason: &str) {
        let mut last = self
            .last
            .lock()
            .expect("never poisoned: nothing panics holding it");
        // A security failure is kept over any later reason.
        if !matches!(&*last, Some((true, _))) && (informative || last.is_none()) {
            *last = Some((security, reason.to_string()));
        }
    }
}

impl ConsumerContext for CheckContext {}

impl rdkafka::producer::ProducerContext for CheckContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Errors no reconnection fixes: the broker refused the credentials, this client could not
/// verify the broker's certificate, or the broker refused this client's certificate. A
/// connection merely closed or reset (a broker restarting, a load balancer) is not one.
fn is_security_failure(error: &KafkaError, reason: &str) -> bool {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::Authentication | C::SaslAuthenticationFailed) => true,
        Some(C::SSL | C::BrokerTransportFailure) => is_refusal(reason),
        _ => false,
    }
}

/// librdkafka's words for a refusal (also in its connection-failure log lines, which carry no
/// error code): SASL authentication failed, the broker's certificate did not verify, or the
/// broker sent a TLS alert rejecting this client's certificate (or its absence).
fn is_refusal(reason: &str) -> bool {
    [
        "SASL authentication error",
        "certificate verify failed",
        "alert bad certificate",
        "certificate required",
        "alert unknown ca",
    ]
    .iter()
    .any(|words| reason.contains(words))
}

/// The cluster's metadata (of `topic`, or of all topics), failing fast on a security failure.
/// `drain` polls the client's main queue (where librdkafka reports errors: `poll` of a
/// `BaseProducer` or of a `BaseConsumer` not subscribed yet). Blocks: call it from a blocking
/// thread.
///
/// # Errors
/// [`TopicError::Refused`] as soon as the brokers refuse the client's credentials or TLS,
/// [`TopicError::Unreachable`] with librdkafka's last reason after 15 s without an answer.
pub fn fetch_metadata(
    client: &Client<CheckContext>,
    drain: impl Fn(),
    topic: Option<&str>,
    brokers: &str,
) -> Result<Metadata, TopicError> {
    let started = Instant::now();
    loop {
        // Short attempts first, to notice a refusal quickly; then longer ones, for a cluster
        // whose metadata takes longer to answer.
        let attempt = if started.elapsed() < Duration::from_secs(5) {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        };
        let err = match client.fetch_metadata(topic, attempt) {
            Ok(metadata) => return Ok(metadata),
            Err(err) => err,
        };
        drain();
        if let Some(reason) = client.context().refused() {
            return Err(TopicError::Refused {
                brokers: brokers.to_string(),
                reason,
            });
        }
        if started.elapsed() >= CONNECT_TIMEOUT {
            let mut reason = client
                .context()
                .last_reason()
                .unwrap_or_else(|| err.to_string());
            if reason.contains("APIVERSION_QUERY") {
                reason.push_str(
                    "; a broker that closes the connection at its first request usually expects \
                     TLS or SASL: check that kafka.security.protocol matches the listener",
                );
            }
            return Err(TopicError::Unreachable {
                brokers: brokers.to_string(),
                reason,
            });
        }
    }
}

async fn create_topics(
    admin: &AdminClient<CheckContext>,
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

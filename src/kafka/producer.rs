//! The idempotent producer of outputs and dead letters.
//!
//! Every message carries `neurostream.source.offset` (and its topic and partition) so downstream
//! consumers can drop replays. [`OutputProducer::send`] returns once every message of the batch
//! is acknowledged by the broker (acks=all) or failed; failures are classified ([`classify`]) so
//! the worker retries what may recover, diverts what never will, and checkpoints only after
//! every message is delivered.

use std::collections::VecDeque;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::{ClientSetting, Config, OutputTopics};
use crate::kafka::client_log::QuietContext;
use crate::output::Emitted;

/// A message rejected as bad input, on its way to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original payload.
    pub payload: Option<Vec<u8>>,
    /// Short reason (`not_json`, `oversized`, …).
    pub kind: &'static str,
    /// Human-readable reason, at most [`MAX_REASON_BYTES`].
    pub reason: String,
    /// Source offset.
    pub offset: i64,
    /// The original payload size when the payload was cut to fit the broker.
    pub truncated_from: Option<usize>,
    /// How often it was shrunk because Kafka refused it (0: as received).
    shrunk: u8,
}

/// The longest `neurostream.error` header: reasons quote the offending value, which may be
/// nearly as large as the message itself.
pub const MAX_REASON_BYTES: usize = 1_024;

/// A dead letter's payload is cut to this many bytes when the broker refuses it whole.
pub const TRUNCATED_PAYLOAD_BYTES: usize = 64 * 1024;

/// A refused dead letter's key is cut to this many bytes.
pub const TRUNCATED_KEY_BYTES: usize = 1_024;

impl DeadLetter {
    /// A dead letter of `payload` (key `key`) at source offset `offset`; `reason` is cut to
    /// [`MAX_REASON_BYTES`].
    pub fn new(
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        kind: &'static str,
        reason: String,
        offset: i64,
    ) -> Self {
        Self {
            key,
            payload,
            kind,
            reason: cap_text(reason, MAX_REASON_BYTES),
            offset,
            truncated_from: None,
            shrunk: 0,
        }
    }

    /// Memory it holds: its own size, the key, the payload and the reason.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.reason.len()
    }

    /// Delivered: only its kind and offset are used from here on (counted when its batch is
    /// durable); the payload, up to a megabyte or more, is let go rather than held until
    /// PostgreSQL commits the batch.
    pub fn forget_content(&mut self) {
        self.key = None;
        self.payload = None;
        self.reason = String::new();
    }

    /// A smaller version for a broker that refused this one for its size or shape, or `None`
    /// when nothing is left to cut: first the payload cut to [`TRUNCATED_PAYLOAD_BYTES`] and the
    /// key to [`TRUNCATED_KEY_BYTES`], then a stub without payload and key (the headers keep the
    /// reason, the source coordinates and the original size).
    pub fn shrink(&self) -> Option<DeadLetter> {
        let mut dead = self.clone();
        dead.shrunk += 1;
        let size = self.payload.as_ref().map_or(0, Vec::len);
        match self.shrunk {
            0 if size > TRUNCATED_PAYLOAD_BYTES
                || self
                    .key
                    .as_ref()
                    .is_some_and(|k| k.len() > TRUNCATED_KEY_BYTES) =>
            {
                if let Some(p) = &mut dead.payload {
                    if p.len() > TRUNCATED_PAYLOAD_BYTES {
                        dead.truncated_from = Some(p.len());
                        p.truncate(TRUNCATED_PAYLOAD_BYTES);
                    }
                }
                if let Some(k) = &mut dead.key {
                    k.truncate(TRUNCATED_KEY_BYTES);
                }
                Some(dead)
            }
            0 | 1 if self.payload.is_some() || self.key.is_some() => {
                dead.truncated_from = Some(self.truncated_from.unwrap_or(size));
                dead.payload = None;
                dead.key = None;
                dead.shrunk = 2;
                Some(dead)
            }
            _ => None,
        }
    }
}

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
fn cap_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Header names (DESIGN.md).
pub mod headers {
    /// Offset of the input message the output derives from.
    pub const SOURCE_OFFSET: &str = "neurostream.source.offset";
    /// Input topic.
    pub const SOURCE_TOPIC: &str = "neurostream.source.topic";
    /// Input partition.
    pub const SOURCE_PARTITION: &str = "neurostream.source.partition";
    /// Why a dead letter was rejected (human-readable).
    pub const ERROR: &str = "neurostream.error";
    /// Why a dead letter was rejected (machine-readable kind).
    pub const ERROR_KIND: &str = "neurostream.error.kind";
    /// Position of an output among the outputs of the same source offset (0, 1, …).
    pub const SOURCE_SEQ: &str = "neurostream.source.seq";
    /// On a dead letter whose payload was cut to fit the broker: the original size in bytes.
    pub const TRUNCATED_FROM: &str = "neurostream.payload.truncated_from";
}

/// A message of a batch: the `i`th output or the `i`th dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageRef {
    /// An output.
    Output(usize),
    /// A dead letter.
    DeadLetter(usize),
}

/// How a delivery failed, by what the worker should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The idempotent producer hit a fatal error: no message can be produced until it is
    /// recreated, so the service stops (and restarts) with the message.
    Fatal,
    /// The broker or network may recover (timeouts, leader changes, full queues): retry.
    Retriable,
    /// This message can never be delivered as it is (too large, invalid, refused by policy):
    /// divert it (a dead letter is truncated, an output dead-lettered).
    Message,
    /// The destination refuses everything (authorization, missing topic): retry with backoff and
    /// say so loudly (health, log, metric); an operator must act.
    Destination,
}

/// librdkafka's `batch.size` when nothing sets it.
const LIBRDKAFKA_BATCH_SIZE: u64 = 1_000_000;

/// Lowers `batch.size` in `settings` to `limit`, the smallest `max.message.bytes` of the topics
/// written (`topic`'s), when it is larger: the broker refuses a whole batch over a topic's
/// limit and librdkafka fails every message in it, which the delivery then has to split up.
/// Returns the `batch.size` it replaced.
pub fn cap_batch_size(settings: &mut Vec<ClientSetting>, topic: &str, limit: u64) -> Option<u64> {
    let current = settings
        .iter()
        .find(|s| s.key == "batch.size")
        .and_then(|s| s.value.parse().ok())
        .unwrap_or(LIBRDKAFKA_BATCH_SIZE);
    if current <= limit {
        return None;
    }
    settings.retain(|s| s.key != "batch.size");
    settings.push(ClientSetting {
        key: "batch.size".into(),
        value: limit.max(1).to_string(),
        source: format!("max.message.bytes of topic {topic}"),
    });
    Some(current)
}

/// Classifies a producer error.
pub fn classify(err: &KafkaError) -> FailureClass {
    use RDKafkaErrorCode as C;
    let code = match err {
        KafkaError::MessageProduction(code) => *code,
        _ => return FailureClass::Retriable,
    };
    match code {
        C::Fatal => FailureClass::Fatal,
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidRecord
        | C::PolicyViolation => FailureClass::Message,
        C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::InvalidTopic => FailureClass::Destination,
        _ => FailureClass::Retriable,
    }
}

/// What a [`OutputProducer::send`] left undelivered.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Undelivered messages with their errors.
    pub failed: Vec<(MessageRef, KafkaError)>,
}

impl SendReport {
    /// Whether everything was delivered.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Shared producer for all partition workers of one instance.
#[derive(Clone)]
pub struct OutputProducer {
    producer: FutureProducer<QuietContext>,
    topics: OutputTopics,
    /// Avro outputs; `None`: JSON.
    avro: Option<std::sync::Arc<crate::avro::output::OutputEncoder>>,
}

impl std::fmt::Debug for OutputProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputProducer")
            .field("topics", &self.topics)
            .finish()
    }
}

impl OutputProducer {
    /// Creates the producer from the effective configuration.
    ///
    /// # Errors
    /// [`KafkaError`] when librdkafka rejects a property.
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        Self::with_settings(config, &config.producer_settings())
    }

    /// Creates the producer from `settings` (the configuration's, adjusted).
    ///
    /// # Errors
    /// [`KafkaError`] when librdkafka rejects a property.
    pub fn with_settings(config: &Config, settings: &[ClientSetting]) -> Result<Self, KafkaError> {
        let producer = ClientSetting::to_client_config(settings)
            .create_with_context(QuietContext::default())?;
        Ok(Self {
            producer,
            avro: None,
            topics: config.kafka.topics.clone(),
        })
    }

    /// Writes outputs in the Confluent Avro wire format with `encoder` from now on.
    pub fn with_avro(
        mut self,
        encoder: std::sync::Arc<crate::avro::output::OutputEncoder>,
    ) -> Self {
        self.avro = Some(encoder);
        self
    }

    /// Produces the messages `which` of a partition batch and waits for every ack; returns the
    /// ones that failed (classify them with [`classify`]).
    pub async fn send(
        &self,
        source_topic: &str,
        source_partition: i32,
        outputs: &[Emitted],
        dead_letters: &[DeadLetter],
        which: &[MessageRef],
    ) -> SendReport {
        let partition = source_partition.to_string();
        let mut report = SendReport::default();
        let mut deliveries = Vec::with_capacity(which.len());
        // librdkafka copies key and value when it enqueues: one buffer each serves the batch.
        let (mut key, mut json) = (String::new(), Vec::new());
        let (mut offset, mut seq) = (itoa::Buffer::new(), itoa::Buffer::new());
        for &m in which {
            let queued = match m {
                MessageRef::Output(i) => {
                    let emitted = &outputs[i];
                    emitted.output.write_key(&mut key);
                    let value = match &self.avro {
                        Some(avro) => std::borrow::Cow::Owned(avro.encode(&emitted.output)),
                        None => {
                            emitted.output.write_json(&mut json);
                            std::borrow::Cow::Borrowed(json.as_slice())
                        }
                    };
                    // `neurostream.source.seq` tells apart outputs of one source offset, so a
                    // consumer deduplicating on (topic, partition, offset, seq) drops only replays.
                    let headers = source_headers(
                        source_topic,
                        &partition,
                        offset.format(emitted.source_offset),
                    )
                    .insert(Header {
                        key: headers::SOURCE_SEQ,
                        value: Some(seq.format(emitted.seq)),
                    });
                    let record = FutureRecord::to(emitted.output.topic(&self.topics))
                        .key(key.as_str())
                        .payload(value.as_ref())
                        .headers(headers);
                    enqueue(&self.producer, record).await
                }
                MessageRef::DeadLetter(i) => {
                    let dead = &dead_letters[i];
                    let offset = dead.offset.to_string();
                    let mut headers = source_headers(source_topic, &partition, &offset)
                        .insert(Header {
                            key: headers::ERROR,
                            value: Some(dead.reason.as_str()),
                        })
                        .insert(Header {
                            key: headers::ERROR_KIND,
                            value: Some(dead.kind),
                        });
                    let original = dead.truncated_from.map(|n| n.to_string());
                    if let Some(n) = &original {
                        headers = headers.insert(Header {
                            key: headers::TRUNCATED_FROM,
                            value: Some(n.as_str()),
                        });
                    }
                    let mut record =
                        FutureRecord::<[u8], [u8]>::to(&self.topics.dlq).headers(headers);
                    if let Some(k) = &dead.key {
                        record = record.key(k.as_slice());
                    }
                    if let Some(p) = &dead.payload {
                        record = record.payload(p.as_slice());
                    }
                    enqueue(&self.producer, record).await
                }
            };
            match queued {
                Ok(delivery) => deliveries.push((m, delivery)),
                Err(err) => report.failed.push((m, err)),
            }
        }
        for (m, delivery) in deliveries {
            if let Err(err) = await_delivery(delivery).await {
                report.failed.push((m, err));
            }
        }
        report
    }

    /// Messages in the producer's queue, not yet acknowledged.
    pub fn queued(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Waits until every queued message is delivered or `timeout` passes.
    pub fn flush(&self, timeout: std::time::Duration) {
        let _ = self.producer.flush(Timeout::After(timeout));
    }
}

/// Enqueues `record`, waiting while librdkafka's local queue is full.
async fn enqueue<K, P>(
    producer: &FutureProducer<QuietContext>,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // Local queue full: deliveries are progressing; give them a moment.
                record = back;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

fn source_headers(topic: &str, partition: &str, offset: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: headers::SOURCE_OFFSET,
            value: Some(offset),
        })
        .insert(Header {
            key: headers::SOURCE_TOPIC,
            value: Some(topic),
        })
        .insert(Header {
            key: headers::SOURCE_PARTITION,
            value: Some(partition),
        })
}

async fn await_delivery(delivery: DeliveryFuture) -> Result<(), KafkaError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(err),
        Err(_canceled) => Err(KafkaError::Canceled),
    }
}

/// Deliveries in flight: `send` enqueues without waiting, except that it waits for the oldest
/// delivery while librdkafka's local queue is full or more than `max` are outstanding; `finish`
/// waits for the rest. The first failed delivery is returned.
pub struct InFlight {
    pending: VecDeque<DeliveryFuture>,
    max: usize,
}

impl InFlight {
    /// At most `max` deliveries outstanding.
    pub fn new(max: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            max,
        }
    }

    /// Enqueues `record`.
    ///
    /// # Errors
    /// The first failed delivery, or a record librdkafka refuses.
    pub async fn send<K, P, C>(
        &mut self,
        producer: &FutureProducer<C>,
        mut record: FutureRecord<'_, K, P>,
    ) -> Result<(), KafkaError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
        C: rdkafka::ClientContext + 'static,
    {
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Local queue full: make room by waiting for the oldest delivery.
                    record = back;
                    match self.pending.pop_front() {
                        Some(delivery) => await_delivery(delivery).await?,
                        None => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                    }
                }
                Err((err, _)) => return Err(err),
            }
        }
        while self.pending.len() > self.max {
            if let Some(delivery) = self.pending.pop_front() {
                await_delivery(delivery).await?;
            }
        }
        Ok(())
    }

    /// Waits for every outstanding delivery.
    ///
    /// # Errors
    /// The first failed delivery.
    pub async fn finish(mut self) -> Result<(), KafkaError> {
        while let Some(delivery) = self.pending.pop_front() {
            await_delivery(delivery).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_is_capped_at_the_smallest_topic_limit() {
        let mut config = Config::default();
        config.profile = crate::config::Profile::Throughput;
        let mut settings = config.producer_settings();
        let batch_size = |s: &[ClientSetting]| {
            let found: Vec<_> = s.iter().filter(|s| s.key == "batch.size").collect();
            assert_eq!(found.len(), 1, "{s:?}");
            found[0].value.clone()
        };
        assert_eq!(batch_size(&settings), "1000000");
        assert_eq!(cap_batch_size(&mut settings, "dlq", 2_000_000), None);
        assert_eq!(
            cap_batch_size(&mut settings, "dlq", 500_000),
            Some(1_000_000)
        );
        assert_eq!(batch_size(&settings), "500000");
        // librdkafka's own default counts when nothing sets it.
        let mut bare = vec![];
        assert_eq!(cap_batch_size(&mut bare, "t", 100_000), Some(1_000_000));
        assert_eq!(batch_size(&bare), "100000");
    }

    #[test]
    fn a_refused_dead_letter_shrinks_to_a_stub_then_gives_up() {
        let big = DeadLetter::new(
            Some(vec![b'k'; 5_000]),
            Some(vec![b'x'; 1_000_000]),
            "not_json",
            "é".repeat(2_000),
            7,
        );
        assert!(big.reason.len() <= MAX_REASON_BYTES && big.reason.ends_with('…'));
        let cut = big.shrink().unwrap();
        assert_eq!(cut.payload.as_ref().unwrap().len(), TRUNCATED_PAYLOAD_BYTES);
        assert_eq!(cut.key.as_ref().unwrap().len(), TRUNCATED_KEY_BYTES);
        assert_eq!(cut.truncated_from, Some(1_000_000));
        let stub = cut.shrink().unwrap();
        assert_eq!((stub.payload.as_ref(), stub.key.as_ref()), (None, None));
        assert_eq!(stub.truncated_from, Some(1_000_000));
        assert_eq!(stub.shrink(), None);
        // A small dead letter refused for its shape goes straight to the stub.
        let small = DeadLetter::new(None, Some(b"{}".to_vec()), "late", "late".into(), 1);
        let stub = small.shrink().unwrap();
        assert_eq!((stub.payload, stub.truncated_from), (None, Some(2)));
        assert_eq!(stub.shrunk, 2);
    }

    #[test]
    fn failures_are_classified_by_what_can_fix_them() {
        use RDKafkaErrorCode as C;
        let class = |c| classify(&KafkaError::MessageProduction(c));
        assert_eq!(class(C::MessageSizeTooLarge), FailureClass::Message);
        assert_eq!(class(C::Fatal), FailureClass::Fatal);
        assert_eq!(
            class(C::TopicAuthorizationFailed),
            FailureClass::Destination
        );
        assert_eq!(class(C::UnknownTopicOrPartition), FailureClass::Destination);
        assert_eq!(class(C::MessageTimedOut), FailureClass::Retriable);
        assert_eq!(class(C::NotLeaderForPartition), FailureClass::Retriable);
    }
}

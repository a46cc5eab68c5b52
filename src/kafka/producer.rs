//! The idempotent producer of outputs and dead letters.
//!
//! Every message carries `neurostream.source.offset` (and its topic and partition) so downstream
//! consumers can drop replays. [`OutputProducer::send_batch`] returns only when every message of
//! the batch is acknowledged by the broker (acks=all), which is what lets the worker checkpoint.

use std::collections::VecDeque;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::{ClientSetting, Config, OutputTopics};
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
    /// Human-readable reason.
    pub reason: String,
    /// Source offset.
    pub offset: i64,
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
}

/// Produce failures; all are retryable from the worker's point of view (the batch is re-sent,
/// which at worst duplicates messages: at-least-once).
#[derive(Debug, thiserror::Error)]
#[error("producing to Kafka failed: {0}")]
pub struct ProduceError(#[from] pub KafkaError);

/// Shared producer for all partition workers of one instance.
#[derive(Clone)]
pub struct OutputProducer {
    producer: FutureProducer,
    topics: OutputTopics,
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
        let producer = ClientSetting::to_client_config(&config.producer_settings()).create()?;
        Ok(Self {
            producer,
            topics: config.kafka.topics.clone(),
        })
    }

    /// Produces a partition batch (outputs, then dead letters) and waits for every ack.
    ///
    /// # Errors
    /// [`ProduceError`] for the first message that could not be delivered.
    pub async fn send_batch(
        &self,
        source_topic: &str,
        source_partition: i32,
        outputs: &[Emitted],
        dead_letters: &[DeadLetter],
    ) -> Result<(), ProduceError> {
        let partition = source_partition.to_string();
        let mut in_flight = InFlight::new(usize::MAX);
        for emitted in outputs {
            let key = emitted.output.key();
            let value = emitted.output.to_json();
            let offset = emitted.source_offset.to_string();
            let headers = source_headers(source_topic, &partition, &offset);
            let record = FutureRecord::to(emitted.output.topic(&self.topics))
                .key(&key)
                .payload(&value)
                .headers(headers);
            in_flight.send(&self.producer, record).await?;
        }
        for dead in dead_letters {
            let offset = dead.offset.to_string();
            let headers = source_headers(source_topic, &partition, &offset)
                .insert(Header {
                    key: headers::ERROR,
                    value: Some(dead.reason.as_str()),
                })
                .insert(Header {
                    key: headers::ERROR_KIND,
                    value: Some(dead.kind),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topics.dlq).headers(headers);
            if let Some(k) = &dead.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &dead.payload {
                record = record.payload(p.as_slice());
            }
            in_flight.send(&self.producer, record).await?;
        }
        Ok(in_flight.finish().await?)
    }

    /// Waits until every queued message is delivered or `timeout` passes.
    pub fn flush(&self, timeout: std::time::Duration) {
        let _ = self.producer.flush(Timeout::After(timeout));
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
    pub async fn send<K, P>(
        &mut self,
        producer: &FutureProducer,
        mut record: FutureRecord<'_, K, P>,
    ) -> Result<(), KafkaError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
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

//! All offset handling: where a partition starts, which messages a worker takes, and when an
//! offset may be committed.
//!
//! The rules:
//! - An offset is stored only after its effects are durable, i.e. after the PostgreSQL
//!   transaction holding the partition's outputs and checkpoint has committed, and what is stored
//!   is exactly the checkpoint's next offset (the committed offset is the next message to read,
//!   as Kafka's own tools expect). librdkafka auto-commits stored offsets; on revoke and shutdown
//!   they are committed synchronously.
//! - A newly assigned partition starts at its checkpoint's next offset. When the checkpoint could
//!   not be read during the rebalance, the partition is assigned paused; its worker reads the
//!   checkpoint itself and asks the consumer thread to position and resume the partition
//!   ([`Offsets::start_at`]), dropping whatever was fetched before ([`Delivery::Positioned`]
//!   marks the point).
//! - A worker never takes a message below the next offset it expects (a re-delivery): it is
//!   dropped and counted. A forward gap is taken (compaction and transaction markers make gaps
//!   legitimate) but counted and logged.

use std::sync::Weak;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

/// What the consumer thread hands a partition worker.
#[derive(Debug)]
pub enum Delivery {
    /// The next fetched message.
    Message(Inbound),
    /// The partition was positioned as the worker asked: every message before this marker was
    /// fetched before and is dropped; messages after it start at the requested offset.
    Positioned,
}

/// A fetched message as a worker needs it: its key and payload, offset and timestamp.
///
/// The topic and partition are the worker's own, and input headers are not read, so neither is
/// copied: key and payload share one allocation (`OwnedMessage` makes three or four, and
/// validates the topic name as UTF-8, for every message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The key's bytes, then the payload's.
    bytes: Box<[u8]>,
    /// The key's length; `None` when the message has no key.
    key_len: Option<usize>,
    /// Whether the message has a payload (a tombstone has none).
    has_payload: bool,
    offset: i64,
    timestamp_ms: Option<i64>,
}

impl Inbound {
    /// Fixed bytes counted per queued message besides its key and payload.
    const OVERHEAD: usize = 128;

    /// A message with these parts.
    pub fn new(
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        offset: i64,
        timestamp_ms: Option<i64>,
    ) -> Self {
        let (k, p) = (key.unwrap_or_default(), payload.unwrap_or_default());
        let mut bytes = Vec::with_capacity(k.len() + p.len());
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(p);
        Self {
            bytes: bytes.into_boxed_slice(),
            key_len: key.map(<[u8]>::len),
            has_payload: payload.is_some(),
            offset,
            timestamp_ms,
        }
    }

    /// Copies what a worker needs out of a message the consumer fetched.
    pub fn from_message(msg: &impl Message) -> Self {
        Self::new(
            msg.key(),
            msg.payload(),
            msg.offset(),
            msg.timestamp().to_millis(),
        )
    }

    /// The key, if the message has one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.map(|n| &self.bytes[..n])
    }

    /// The payload, if the message has one.
    pub fn payload(&self) -> Option<&[u8]> {
        self.has_payload
            .then(|| &self.bytes[self.key_len.unwrap_or(0)..])
    }

    /// The message's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The message's timestamp (create or log-append time) in ms since the epoch, if it has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }

    /// The bytes it holds, as counted against `kafka.partition_queue_bytes`: key, payload, and
    /// a fixed 128 bytes for the message itself.
    pub fn queued_size(&self) -> usize {
        Self::OVERHEAD + self.bytes.len()
    }
}

/// The consumer operations the offset rules need; the consumer implements it (so this module
/// does not depend on the consumer's concrete type).
pub trait OffsetStore: Send + Sync {
    /// Stores `next_offset` as the partition's offset to commit.
    ///
    /// # Errors
    /// A description of the failure (e.g. the partition was revoked meanwhile).
    fn store(&self, topic: &str, partition: i32, next_offset: i64) -> Result<(), String>;

    /// Asks the consumer thread to start the (paused) partition at `next_offset` (`None`: at the
    /// committed offset or the reset policy), then to send [`Delivery::Positioned`] and resume.
    fn start_at(&self, topic: &str, partition: i32, next_offset: Option<i64>);
}

/// A worker's handle on the consumer's offsets.
#[derive(Clone)]
pub struct Offsets {
    consumer: Weak<dyn OffsetStore>,
}

impl std::fmt::Debug for Offsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Offsets")
    }
}

impl Offsets {
    /// Offsets of `consumer` (held weakly: a worker never keeps the consumer alive).
    pub fn new(consumer: Weak<dyn OffsetStore>) -> Self {
        Self { consumer }
    }

    /// Records that everything below `next_offset` is durable; librdkafka commits it.
    pub fn mark_durable(&self, topic: &str, partition: i32, next_offset: i64) {
        if let Some(consumer) = self.consumer.upgrade() {
            if let Err(err) = consumer.store(topic, partition, next_offset) {
                // NB: fails after the partition was revoked; the new owner starts from the
                // checkpoint, so nothing is lost.
                debug!(topic, partition, next_offset, error = %err, "offset not stored");
            }
        }
    }

    /// See [`OffsetStore::start_at`].
    pub fn start_at(&self, topic: &str, partition: i32, next_offset: Option<i64>) {
        if let Some(consumer) = self.consumer.upgrade() {
            consumer.start_at(topic, partition, next_offset);
        }
    }
}

/// Stores exactly `next_offset` for one partition.
///
/// NB: `rd_kafka_offset_store` (rdkafka's `store_offset`) stores offset + 1, which would commit
/// one past the checkpoint; `rd_kafka_offsets_store` stores the list as given.
///
/// # Errors
/// librdkafka's refusal, as text.
pub fn store_exact<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
    next_offset: i64,
) -> Result<(), String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset))
        .map_err(|e| e.to_string())?;
    consumer.store_offsets(&tpl).map_err(|e| e.to_string())
}

/// Sets each partition's start in an assignment to its checkpoint's next offset, where known.
pub fn start_at_checkpoints(tpl: &mut TopicPartitionList, starts: &[(String, i32, Option<i64>)]) {
    for (topic, partition, next) in starts {
        if let Some(next) = next {
            if let Err(err) = tpl.set_partition_offset(topic, *partition, Offset::Offset(*next)) {
                warn!(topic = %topic, partition, error = %err, "cannot position partition");
            }
        }
    }
}

/// Commits stored offsets now (revoke, shutdown).
pub fn commit_now<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(consumer: &C) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing stored since the last commit.
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {}
        Err(err) => {
            warn!(error = %err, "committing offsets failed; the checkpoint remains authoritative")
        }
    }
}

/// Which messages a worker takes: the offset continuity rules of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The next offset expected; `None` until the first message when nothing is known.
    expected: Option<i64>,
    /// Dropping everything until [`Delivery::Positioned`].
    awaiting_position: bool,
}

/// What to do with a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Process it.
    Next,
    /// Process it, but `skipped` offsets before it never arrived (compaction, transaction
    /// markers, retention, or a broker fault): count and log.
    AfterGap {
        /// How many offsets were skipped.
        skipped: i64,
    },
    /// Already processed (a re-delivery): drop and count.
    Duplicate,
    /// Fetched before the partition was positioned: drop silently.
    Stale,
}

impl Cursor {
    /// A cursor starting at `next_offset` (the checkpoint's), or at whatever comes first.
    pub fn at(next_offset: Option<i64>) -> Self {
        Self {
            expected: next_offset,
            awaiting_position: false,
        }
    }

    /// A cursor that drops everything until the partition is positioned at `next_offset`.
    pub fn positioning(next_offset: Option<i64>) -> Self {
        Self {
            expected: next_offset,
            awaiting_position: true,
        }
    }

    /// The partition was positioned.
    pub fn positioned(&mut self) {
        self.awaiting_position = false;
    }

    /// Classifies the message at `offset`; a taken message advances the cursor.
    pub fn take(&mut self, offset: i64) -> Take {
        if self.awaiting_position {
            return Take::Stale;
        }
        let verdict = match self.expected {
            Some(next) if offset < next => return Take::Duplicate,
            Some(next) if offset > next => Take::AfterGap {
                skipped: offset - next,
            },
            _ => Take::Next,
        };
        self.expected = Some(offset + 1);
        verdict
    }

    /// The next offset expected, when known.
    pub fn expected(&self) -> Option<i64> {
        self.expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbound_message_keeps_key_and_payload_apart_in_one_allocation() {
        let m = Inbound::new(Some(b"k1"), Some(b"{\"v\":1}"), 7, Some(1_700_000_000_000));
        assert_eq!(m.key(), Some(&b"k1"[..]));
        assert_eq!(m.payload(), Some(&b"{\"v\":1}"[..]));
        assert_eq!((m.offset(), m.timestamp_ms()), (7, Some(1_700_000_000_000)));
        assert_eq!(m.queued_size(), 128 + 2 + 7);
        // No key and an empty key differ, as do no payload (a tombstone) and an empty one.
        let none = Inbound::new(None, None, 0, None);
        assert_eq!((none.key(), none.payload()), (None, None));
        let empty = Inbound::new(Some(b""), Some(b""), 0, None);
        assert_eq!(
            (empty.key(), empty.payload()),
            (Some(&b""[..]), Some(&b""[..]))
        );
        let tombstone = Inbound::new(Some(b"k"), None, 0, None);
        assert_eq!(
            (tombstone.key(), tombstone.payload()),
            (Some(&b"k"[..]), None)
        );
        let unkeyed = Inbound::new(None, Some(b"p"), 0, None);
        assert_eq!((unkeyed.key(), unkeyed.payload()), (None, Some(&b"p"[..])));
    }

    #[test]
    fn the_cursor_takes_each_offset_once_and_reports_gaps() {
        let mut c = Cursor::at(Some(5));
        assert_eq!(c.take(4), Take::Duplicate);
        assert_eq!(c.take(5), Take::Next);
        assert_eq!(c.take(5), Take::Duplicate);
        assert_eq!(c.take(9), Take::AfterGap { skipped: 3 });
        assert_eq!(c.take(7), Take::Duplicate);
        assert_eq!(c.take(10), Take::Next);
        assert_eq!(c.expected(), Some(11));
    }

    #[test]
    fn without_a_checkpoint_the_first_message_starts_the_cursor() {
        let mut c = Cursor::at(None);
        assert_eq!(c.take(42), Take::Next);
        assert_eq!(c.take(42), Take::Duplicate);
    }

    #[test]
    fn before_positioning_everything_is_stale() {
        let mut c = Cursor::positioning(Some(3));
        assert_eq!(c.take(100), Take::Stale);
        assert_eq!(c.take(3), Take::Stale);
        c.positioned();
        assert_eq!(c.take(3), Take::Next);
    }
}

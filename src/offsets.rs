//! All offset handling: where a partition starts, and when an offset may be committed.
//!
//! The rule: an offset is stored only after its effects are durable, i.e. after the PostgreSQL
//! transaction holding the partition's outputs and checkpoint has committed. librdkafka then
//! auto-commits stored offsets; on revoke and shutdown they are committed synchronously. Because a
//! committed Kafka offset is therefore never ahead of the checkpoint, a newly assigned partition
//! starts exactly at its checkpoint's next offset; messages below it are skipped.

use std::sync::Weak;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::kafka::intake::IntakeConsumer;

/// A worker's handle on the consumer's offset store.
#[derive(Clone)]
pub struct Offsets {
    consumer: Weak<IntakeConsumer>,
}

impl std::fmt::Debug for Offsets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Offsets")
    }
}

impl Offsets {
    pub(crate) fn new(consumer: Weak<IntakeConsumer>) -> Self {
        Self { consumer }
    }

    /// Records that everything below `next_offset` is durable; librdkafka commits it.
    pub fn mark_durable(&self, topic: &str, partition: i32, next_offset: i64) {
        if let Some(consumer) = self.consumer.upgrade() {
            if let Err(err) = consumer.store_offset(topic, partition, next_offset) {
                // NB: fails after the partition was revoked; the new owner starts from the
                // checkpoint, so nothing is lost.
                debug!(topic, partition, next_offset, error = %err, "offset not stored");
            }
        }
    }

    /// Moves a partition's fetch position back to `offset` (a checkpoint behind the committed
    /// offset, e.g. after PostgreSQL was restored from a backup).
    pub fn seek(&self, topic: &str, partition: i32, offset: i64) {
        if let Some(consumer) = self.consumer.upgrade() {
            if let Err(err) = consumer.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                warn!(topic, partition, offset, error = %err, "seek to checkpoint failed");
            }
        }
    }
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
pub fn commit_now(consumer: &IntakeConsumer) {
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

/// Where the worker stands relative to its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The message is already reflected in the checkpoint: skip it.
    Behind,
    /// The message is the next one to process.
    Next,
    /// Messages between the checkpoint and this one were never processed: seek back.
    Gap,
}

/// Classifies a message offset against the next offset the checkpoint expects.
pub fn position(expected: Option<i64>, offset: i64) -> Position {
    match expected {
        Some(next) if offset < next => Position::Behind,
        Some(next) if offset > next => Position::Gap,
        _ => Position::Next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(position(None, 5), Position::Next);
        assert_eq!(position(Some(5), 4), Position::Behind);
        assert_eq!(position(Some(5), 5), Position::Next);
        assert_eq!(position(Some(5), 9), Position::Gap);
    }
}

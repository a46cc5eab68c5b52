//! The partition worker: sole owner of one partition's processor and pending batch.
//!
//! It restores the checkpoint, processes messages from its bounded queue, and flushes a batch
//! when it holds `batch_rows` output rows or its oldest event has waited `linger_ms`: outputs and
//! dead letters to Kafka (acked), then outputs and checkpoint to the store (one transaction), then
//! the offset. A stop request flushes what was processed and returns; unprocessed queued messages
//! are left for the next owner, who starts at the checkpoint.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::kafka::producer::{DeadLetter, OutputProducer};
use crate::offsets::{self, Offsets, Position};
use crate::output::Emitted;
use crate::processor::{Processor, Record};
use crate::store::{Batch, Checkpoint, PartitionId, Store};
use crate::telemetry::{self as tm, Progress};

/// Everything a worker needs, passed in.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// The service configuration.
    pub config: Arc<Config>,
    /// Outputs and checkpoints.
    pub store: Store,
    /// Output topics.
    pub producer: OutputProducer,
    /// Offset store of the consumer.
    pub offsets: Offsets,
    /// Shared counters.
    pub progress: Arc<Progress>,
    /// Cancelled, with a reason in `fatal_reason`, when the service must stop.
    pub fatal: Fatal,
}

/// A fatal condition any task can raise to stop the service with a message.
#[derive(Debug, Clone, Default)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<std::sync::Mutex<Option<String>>>,
}

impl Fatal {
    /// Raises the condition (the first reason wins).
    pub fn raise(&self, reason: String) {
        let mut slot = self
            .reason
            .lock()
            .expect("fatal slot lock is never poisoned: no code panics while holding it");
        slot.get_or_insert(reason);
        self.token.cancel();
    }

    /// Resolves when raised.
    pub async fn raised(&self) {
        self.token.cancelled().await
    }

    /// The reason, once raised.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .expect("fatal slot lock is never poisoned: no code panics while holding it")
            .clone()
    }
}

#[derive(Default)]
struct Pending {
    outputs: Vec<Emitted>,
    dead: Vec<DeadLetter>,
    events: u64,
    /// Offset after the last message taken into this batch.
    next_offset: Option<i64>,
    /// When the first message of this batch was taken.
    since: Option<Instant>,
}

impl Pending {
    fn rows(&self) -> usize {
        self.outputs.len() + self.dead.len()
    }
}

/// One partition's worker.
pub struct PartitionWorker {
    id: PartitionId,
    ctx: WorkerContext,
    processor: Processor,
    /// First offset not reflected in the processor's state (from the checkpoint).
    expected: Option<i64>,
    pending: Pending,
    /// Next offset after the last processed message (or the checkpoint's).
    position: Option<i64>,
    batch_rows: usize,
    linger: Duration,
}

impl PartitionWorker {
    /// Runs until `stop` is cancelled or the queue closes. `preloaded` is the checkpoint read at
    /// assignment, if that succeeded; otherwise the worker reads it itself, retrying.
    pub async fn run(
        id: PartitionId,
        ctx: WorkerContext,
        preloaded: Option<Option<Checkpoint>>,
        mut messages_rx: mpsc::Receiver<OwnedMessage>,
        stop: CancellationToken,
    ) {
        let checkpoint = match preloaded {
            Some(c) => c,
            None => match load_with_retry(&id, &ctx, &stop).await {
                Some(c) => c,
                None => return,
            },
        };
        let config = &ctx.config;
        let max_bytes = config.kafka.max_event_bytes;
        let (processor, expected) = match checkpoint {
            Some(c) => {
                match Processor::restore(&config.processing, max_bytes, id.partition, &c.state) {
                    Ok(p) => (p, Some(c.next_offset)),
                    Err(err) => {
                        ctx.fatal.raise(format!(
                        "partition {}/{}: {err}; refusing to start from scratch over a checkpoint",
                        id.topic, id.partition
                    ));
                        return;
                    }
                }
            }
            None => (
                Processor::new(&config.processing, max_bytes, id.partition),
                None,
            ),
        };
        info!(next_offset = ?expected, "partition worker started");
        let mut worker = PartitionWorker {
            batch_rows: config.sink_batch_rows(),
            linger: Duration::from_millis(config.sink_linger_ms()),
            id,
            ctx,
            processor,
            expected,
            position: expected,
            pending: Pending::default(),
        };
        // Idle close needs wall-clock ticks; a quarter of the shortest idle interval is precise
        // enough without busy-waking.
        let tick_every = worker
            .processor
            .wants_ticks()
            .map(|ms| Duration::from_millis((ms / 4).max(50)));
        let mut ticks = tokio::time::interval(tick_every.unwrap_or(Duration::from_secs(3600)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = worker.pending.since.map(|t| t + worker.linger);
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    if !worker.flush().await { return; }
                }
                _ = ticks.tick(), if tick_every.is_some() => worker.tick(),
                msg = messages_rx.recv() => match msg {
                    Some(msg) => {
                        worker.take(&msg);
                        if worker.pending.rows() >= worker.batch_rows && !worker.flush().await {
                            return;
                        }
                    }
                    None => break,
                },
            }
        }
        // Drain: what was processed becomes durable; what is still queued is left for the next
        // owner (it starts at the checkpoint written here).
        drop(messages_rx);
        if worker.pending.next_offset.is_some() || worker.pending.rows() > 0 {
            worker.flush().await;
        }
        info!("partition worker stopped");
    }

    fn tick(&mut self) {
        let before = self.pending.outputs.len();
        self.processor
            .tick(wall_clock_ms(), &mut self.pending.outputs);
        if self.pending.outputs.len() > before {
            self.pending.since.get_or_insert_with(Instant::now);
        }
    }

    fn take(&mut self, msg: &OwnedMessage) {
        let offset = msg.offset();
        match offsets::position(self.expected, offset) {
            Position::Behind => return,
            Position::Gap => {
                let next = self.expected.expect("a gap implies an expected offset");
                error!(
                    expected = next,
                    got = offset,
                    "checkpoint is behind the consumed position; seeking back to the checkpoint"
                );
                self.ctx
                    .offsets
                    .seek(&self.id.topic, self.id.partition, next);
                return;
            }
            Position::Next => self.expected = None,
        }
        let record = Record {
            payload: msg.payload(),
            key: msg.key(),
            timestamp_ms: msg.timestamp().to_millis(),
            offset,
        };
        let late_before = self.processor.late_dropped();
        self.processor.set_wall_clock(wall_clock_ms());
        match self.processor.process(record, &mut self.pending.outputs) {
            Ok(None) => self.pending.events += 1,
            Ok(Some(late)) => {
                self.pending.events += 1;
                self.pending.dead.push(DeadLetter {
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    kind: "late",
                    reason: format!(
                        "late: event time is {} ms behind stream time and its window has closed",
                        late.behind_ms
                    ),
                    offset,
                });
            }
            Err(err) => self.pending.dead.push(DeadLetter {
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().map(<[u8]>::to_vec),
                kind: err.kind(),
                reason: err.to_string(),
                offset,
            }),
        }
        let late = self.processor.late_dropped() - late_before;
        if late > 0 {
            metrics::counter!(tm::LATE_EVENTS_TOTAL, "topic" => self.id.topic.clone())
                .increment(late);
        }
        self.pending.next_offset = Some(offset + 1);
        self.position = Some(offset + 1);
        self.pending.since.get_or_insert_with(Instant::now);
    }

    /// Makes the pending batch durable. Returns false when the service must stop.
    async fn flush(&mut self) -> bool {
        self.processor.end_batch(&mut self.pending.outputs);
        let next_offset = match self.pending.next_offset {
            Some(next) => next,
            None if self.pending.rows() > 0 => match self.position {
                Some(position) => position,
                None => return true,
            },
            None => {
                self.pending.since = None;
                return true;
            }
        };
        let topic = self.id.topic.clone();
        let mut backoff = Backoff::new(self.ctx.config.postgres.retry_max_backoff_ms);
        loop {
            match self
                .ctx
                .producer
                .send_batch(
                    &topic,
                    self.id.partition,
                    &self.pending.outputs,
                    &self.pending.dead,
                )
                .await
            {
                Ok(()) => break,
                Err(err) => {
                    warn!(error = %err, "producing outputs failed; retrying the batch");
                    metrics::counter!(tm::RETRIES_TOTAL, "stage" => "produce").increment(1);
                    backoff.wait().await;
                }
            }
        }
        let checkpoint = Checkpoint {
            next_offset,
            state: self.processor.snapshot(),
        };
        let batch = Batch {
            id: &self.id,
            outputs: &self.pending.outputs,
            checkpoint: &checkpoint,
        };
        let mut backoff = Backoff::new(self.ctx.config.postgres.retry_max_backoff_ms);
        let rows = loop {
            let started = std::time::Instant::now();
            match self.ctx.store.commit(&batch).await {
                Ok(rows) => {
                    let elapsed = started.elapsed();
                    metrics::histogram!(tm::SINK_COMMIT_SECONDS).record(elapsed.as_secs_f64());
                    self.ctx.progress.record_sink_time(elapsed);
                    break rows;
                }
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "sink transaction failed; retrying (consumption of this partition waits)");
                    metrics::counter!(tm::RETRIES_TOTAL, "stage" => "sink").increment(1);
                    backoff.wait().await;
                }
                Err(err) => {
                    self.ctx.fatal.raise(format!(
                        "partition {}/{}: {err}",
                        self.id.topic, self.id.partition
                    ));
                    return false;
                }
            }
        };
        self.ctx
            .offsets
            .mark_durable(&topic, self.id.partition, next_offset);
        let p = &self.pending;
        self.ctx.progress.record_batch(
            &topic,
            self.id.partition,
            &tm::BatchCounts {
                next_offset,
                events: p.events,
                dead_letters: p.dead.len() as u64,
                outputs: p.outputs.len() as u64,
                rows,
            },
        );
        metrics::counter!(tm::EVENTS_TOTAL, "topic" => topic.clone()).increment(p.events);
        metrics::counter!(tm::OUTPUT_MESSAGES_TOTAL, "topic" => topic.clone())
            .increment(p.outputs.len() as u64);
        metrics::counter!(tm::SINK_ROWS_TOTAL, "topic" => topic.clone()).increment(rows);
        for dead in &p.dead {
            metrics::counter!(tm::DEAD_LETTERS_TOTAL, "topic" => topic.clone(), "reason" => dead.kind)
                .increment(1);
        }
        self.pending = Pending::default();
        true
    }
}

async fn load_with_retry(
    id: &PartitionId,
    ctx: &WorkerContext,
    stop: &CancellationToken,
) -> Option<Option<Checkpoint>> {
    let mut backoff = Backoff::new(ctx.config.postgres.retry_max_backoff_ms);
    loop {
        match ctx.store.load(id).await {
            Ok(c) => return Some(c),
            Err(err) if err.is_retryable() => {
                warn!(error = %err, "loading the checkpoint failed; retrying");
                metrics::counter!(tm::RETRIES_TOTAL, "stage" => "checkpoint_load").increment(1);
            }
            Err(err) => {
                ctx.fatal
                    .raise(format!("partition {}/{}: {err}", id.topic, id.partition));
                return None;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = backoff.wait() => {}
        }
    }
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff from 50 ms up to a ceiling.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff capped at `max_ms`.
    pub fn new(max_ms: u64) -> Self {
        Self {
            next: Duration::from_millis(50),
            max: Duration::from_millis(max_ms.max(50)),
        }
    }

    /// Sleeps for the current delay and doubles it.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

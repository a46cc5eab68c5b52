//! The partition worker: sole owner of one partition's processor and pending batch.
//!
//! It restores the checkpoint, processes messages from its bounded queue, and flushes a batch
//! when it holds `batch_rows` output rows, [`FLUSH_BYTES`] of outputs and dead letters, or its
//! oldest event has waited `linger_ms`. A flush is
//! two stages in batch order. First the batch's outputs and dead letters go to Kafka and every
//! ack is awaited: the outputs are visible from here. Then the batch joins those waiting for
//! PostgreSQL, and one transaction writes all of them with the checkpoint taken after the last
//! (the processor's snapshot and next offset), then the offset is stored for commit.
//!
//! One delivery is in flight at a time, while the worker processes the next batch: the next
//! flush waits for it first, so a partition's outputs reach Kafka in order. A checkpoint is
//! taken at a batch boundary only: when a flush's transaction is to start as soon as its acks
//! are in, the checkpoint taken at the flush goes with its delivery.
//!
//! One transaction is in flight at a time, while the worker goes on processing and delivering
//! the next batches; they coalesce into the next transaction, which starts no sooner than
//! `postgres.commit_interval_ms` after the previous one started. PostgreSQL trails Kafka by at
//! most [`MAX_WAITING_BATCHES`] batches' worth of rows or [`MAX_WAITING_BYTES`]: past that the
//! worker waits for the transaction in flight and starts the next at once. A stop
//! request flushes what was processed, waits for PostgreSQL and returns; unprocessed queued
//! messages are left for the next owner, who starts at the checkpoint.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::kafka::producer::{classify, DeadLetter, FailureClass, MessageRef, OutputProducer};
use crate::offsets::{Cursor, Delivery, Inbound, Offsets, Take};
use crate::output::Emitted;
use crate::processor::{Processor, Record, StateCopy};
use crate::store::{Batch, Checkpoint, Epoch, PartitionId, Store, StoreError};
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
    /// Input and output formats.
    pub codecs: crate::avro::Codecs,
    /// Payload and key bytes in this partition's queue: the consumer adds what it queues
    /// (and pauses the partition past `kafka.partition_queue_bytes`), the worker subtracts
    /// what it receives.
    pub queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
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

/// How many batches' worth (`batch_rows` output rows or messages) may wait for PostgreSQL
/// besides the transaction in flight; past that the worker waits for the transaction. This
/// bounds how far PostgreSQL trails the output topics, and so what a crash can make the next
/// owner produce twice, in rows rather than flushes: a `linger_ms` flush of a few rows counts
/// for what it holds.
pub const MAX_WAITING_BATCHES: usize = 8;

/// Memory of outputs and dead letters (payloads included) that flushes a batch whatever its
/// row count: a flood of megabyte-sized invalid messages would otherwise gather `batch_rows`
/// copies (10 GB in the `throughput` profile) before its flush.
pub const FLUSH_BYTES: usize = 16 << 20;

/// Memory of delivered outputs that may wait for PostgreSQL besides the transaction in flight;
/// past it, as past [`MAX_WAITING_BATCHES`], the worker waits for the transaction. A delivered
/// dead letter holds no payload any more.
pub const MAX_WAITING_BYTES: usize = 64 << 20;

/// Deltas written after one base at most; the next checkpoint is full. Bounds what a restore
/// reads and applies besides the byte rule (deltas stop when they sum to the base's size).
pub const MAX_DELTAS: usize = 1_000;

/// Queued deliveries a worker takes at once; a stop, a finished delivery or transaction is
/// seen between chunks (a chunk of events takes well under a millisecond).
const INBOX_CHUNK: usize = 256;

/// The partition's checkpoint in PostgreSQL as this worker wrote it: the base and the deltas
/// after it. A worker's first checkpoint is full (the chain it restored may come from another
/// configuration), and so is one after a transaction that gave up (its delta was lost).
#[derive(Debug, Default)]
struct Chain {
    /// Bytes and next offset of the base this worker wrote; `None`: the next checkpoint is full.
    base: Option<(usize, i64)>,
    /// Bytes of the deltas after it.
    delta_bytes: usize,
    /// Deltas after it.
    deltas: usize,
}

/// A checkpoint as the worker takes it: a delta is encoded at once (it costs what changed); a
/// new base is a copy of the state, sorted and serialised on a blocking thread from the moment
/// it is taken, while the worker goes on and the flush's outputs go to Kafka (at 1 M keys the
/// copy takes ~50 ms of the ~0.6 s a whole snapshot took in the worker). A base dropped unused
/// (its delivery gave up at a stop) finishes encoding and is freed.
enum Taken {
    Ready(Checkpoint),
    Base {
        next_offset: i64,
        encoding: tokio::task::JoinHandle<Vec<u8>>,
    },
}

impl Taken {
    /// A new base from `state`, its encoding started.
    fn base(next_offset: i64, state: StateCopy, encode_seconds: metrics::Histogram) -> Self {
        let encoding = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let bytes = state.encode();
            encode_seconds.record(started.elapsed().as_secs_f64());
            bytes
        });
        Taken::Base {
            next_offset,
            encoding,
        }
    }

    fn next_offset(&self) -> i64 {
        match self {
            Taken::Ready(checkpoint) => checkpoint.next_offset,
            Taken::Base { next_offset, .. } => *next_offset,
        }
    }

    /// The checkpoint, once a base is encoded; `None` when the runtime shuts down first. A
    /// panic while encoding is the caller's.
    async fn checkpoint(self) -> Option<Checkpoint> {
        match self {
            Taken::Ready(checkpoint) => Some(checkpoint),
            Taken::Base {
                next_offset,
                encoding,
            } => match encoding.await {
                Ok(bytes) => Some(Checkpoint::full(next_offset, bytes)),
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(_) => None,
            },
        }
    }
}

/// What a transaction wrote of the checkpoint.
#[derive(Debug, Clone, Copy)]
struct Written {
    bytes: usize,
    delta: bool,
    next_offset: i64,
}

/// Messages taken and what they produced: the batch being processed, or the flushes delivered
/// to Kafka and waiting for their PostgreSQL transaction (several coalesce into one).
#[derive(Default)]
struct Pending {
    outputs: Vec<Emitted>,
    dead: Vec<DeadLetter>,
    events: u64,
    /// Messages taken (events and rejected).
    consumed: u64,
    /// Kafka timestamps of the events, for the end-to-end latency.
    timestamps: Vec<i64>,
    /// Offset after the last message taken.
    next_offset: Option<i64>,
    /// When the first message of this batch was taken.
    since: Option<Instant>,
    /// Memory held by the outputs and dead letters counted so far ([`Pending::account`]).
    bytes: usize,
    /// How many outputs and dead letters `bytes` counts.
    counted: (usize, usize),
}

impl Pending {
    fn rows(&self) -> usize {
        self.outputs.len() + self.dead.len()
    }

    /// Adds what was pushed since the last call to `bytes`.
    fn account(&mut self) {
        let (outputs, dead) = self.counted;
        self.bytes += self
            .outputs
            .iter()
            .skip(outputs)
            .map(Emitted::memory_bytes)
            .sum::<usize>()
            + self
                .dead
                .iter()
                .skip(dead)
                .map(DeadLetter::memory_bytes)
                .sum::<usize>();
        self.counted = (self.outputs.len(), self.dead.len());
    }

    /// Whether the batch is to be flushed for its size: `batch_rows` rows, or
    /// [`FLUSH_BYTES`] of memory.
    fn full(&mut self, batch_rows: usize) -> bool {
        self.account();
        self.rows() >= batch_rows || self.bytes >= FLUSH_BYTES
    }

    /// Acknowledged by Kafka: the dead letters let their contents go (only their kinds are
    /// counted from here on); the outputs wait for PostgreSQL.
    fn delivered(&mut self) {
        for dead in &mut self.dead {
            dead.forget_content();
        }
        self.bytes = 0;
        self.counted = (0, 0);
        self.account();
    }

    fn is_empty(&self) -> bool {
        self.next_offset.is_none() && self.rows() == 0
    }

    /// Every output and dead letter, to deliver.
    fn refs(&self) -> Vec<MessageRef> {
        (0..self.outputs.len())
            .map(MessageRef::Output)
            .chain((0..self.dead.len()).map(MessageRef::DeadLetter))
            .collect()
    }

    /// Appends a later batch (it was taken after everything here).
    fn absorb(&mut self, mut later: Pending) {
        self.account();
        later.account();
        self.bytes += later.bytes;
        self.outputs.extend(later.outputs);
        self.dead.extend(later.dead);
        self.events += later.events;
        self.consumed += later.consumed;
        self.timestamps.extend(later.timestamps);
        self.next_offset = later.next_offset.or(self.next_offset);
        self.since = self.since.or(later.since);
        self.counted = (self.outputs.len(), self.dead.len());
    }

    /// What it holds, measured against the bounds of what may wait for PostgreSQL: rows or
    /// messages (the larger), and bytes.
    fn held(&mut self) -> (usize, usize) {
        self.account();
        (self.rows().max(self.consumed as usize), self.bytes)
    }
}

/// Whether `held` (rows or messages, bytes) passes the bounds of what may wait for PostgreSQL:
/// [`MAX_WAITING_BATCHES`] batches' worth of rows or messages, or [`MAX_WAITING_BYTES`].
fn too_much_waits((rows, bytes): (usize, usize), batch_rows: usize) -> bool {
    rows > MAX_WAITING_BATCHES * batch_rows || bytes > MAX_WAITING_BYTES
}

/// How a worker got its partition.
#[derive(Debug)]
pub enum Start {
    /// Claimed during the rebalance: the consumer starts at the checkpoint's next offset.
    Claimed {
        /// The ownership epoch.
        epoch: Epoch,
        /// The checkpoint read with the claim.
        checkpoint: Option<Checkpoint>,
    },
    /// PostgreSQL did not answer during the rebalance: the partition is assigned paused; the
    /// worker claims it, then asks the consumer to position and resume it.
    Unclaimed,
}

/// Why a flush did not make the batch durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// Stop requested (revoke, shutdown) while retrying: the next owner replays the batch.
    Stopped,
    /// Another worker owns the partition now: this one must stop without writing.
    Fenced,
    /// The service must stop (already raised on [`Fatal`]).
    Fatal,
}

/// A PostgreSQL transaction in flight: the flushes it carries come back with its outcome and the
/// checkpoint's size.
type InFlight = tokio::task::JoinHandle<Committed>;

/// A transaction's flushes, what it wrote of the checkpoint, and its outcome.
type Committed = (Pending, Written, Result<u64, Halt>);

/// A flush on its way to Kafka.
type Delivering = tokio::task::JoinHandle<Delivered>;

/// A delivery's batch, back with its outcome, and the checkpoint taken at its end when its
/// transaction starts once it is delivered.
struct Delivered {
    batch: Pending,
    checkpoint: Option<Taken>,
    result: Result<(), Halt>,
}

/// The partition's way out: Kafka, then PostgreSQL. Cheap to clone into a commit task.
#[derive(Clone)]
struct Sink {
    id: PartitionId,
    ctx: WorkerContext,
    epoch: Epoch,
}

/// One partition's worker.
pub struct PartitionWorker {
    sink: Sink,
    processor: Processor,
    /// Which delivered messages to take.
    cursor: Cursor,
    /// Messages dropped since the last taken one for being below the expected offset.
    duplicates_run: u64,
    /// The batch being processed.
    pending: Pending,
    /// Flushes delivered to Kafka, waiting for the next PostgreSQL transaction.
    waiting: Pending,
    /// The flush on its way to Kafka.
    delivering: Option<Delivering>,
    /// The PostgreSQL transaction in flight.
    in_flight: Option<InFlight>,
    /// The checkpoint chain written so far.
    chain: Chain,
    /// Next offset after the last processed message (or the checkpoint's).
    position: Option<i64>,
    batch_rows: usize,
    linger: Duration,
    /// Least time between the starts of two transactions (`postgres.commit_interval_ms`).
    commit_interval: Duration,
    /// When the last transaction started.
    last_commit: Option<Instant>,
    stop: CancellationToken,
    metrics: WorkerMetrics,
}

/// A worker's metric handles (labels resolved once) and recent samples for `/status`.
struct WorkerMetrics {
    consumed: metrics::Counter,
    events: metrics::Counter,
    end_to_end: metrics::Histogram,
    output_latency: metrics::Histogram,
    processing: metrics::Histogram,
    checkpoint_seconds: metrics::Histogram,
    checkpoint_encode_seconds: metrics::Histogram,
    checkpoint_bytes_total: metrics::Counter,
    active_clusters: metrics::Gauge,
    checkpoint_bytes: metrics::Gauge,
    state_keys: metrics::Gauge,
    state_open_windows: metrics::Gauge,
    /// Messages taken, to time one in [`WorkerMetrics::SAMPLE_EVERY`].
    taken: u64,
    /// The latest processing-time samples, seconds.
    samples: std::collections::VecDeque<f64>,
    /// When the previous batch became durable, and the points clustered by then.
    last_batch: Option<(Instant, u64)>,
    /// Where the worker's time goes.
    time: TimeUse,
}

/// What a worker is doing, for [`tm::WORKER_TIME_MICROSECONDS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doing {
    Idle,
    Busy,
    WaitingKafka,
    WaitingPostgres,
    WaitingRegistry,
}

impl Doing {
    const ALL: [Doing; 5] = [
        Doing::Idle,
        Doing::Busy,
        Doing::WaitingKafka,
        Doing::WaitingPostgres,
        Doing::WaitingRegistry,
    ];

    fn label(self) -> &'static str {
        match self {
            Doing::Idle => "idle",
            Doing::Busy => "busy",
            Doing::WaitingKafka => "waiting_kafka",
            Doing::WaitingPostgres => "waiting_postgres",
            Doing::WaitingRegistry => "waiting_registry",
        }
    }
}

/// A stopwatch per [`Doing`]: the time since the last switch goes to the state switched from,
/// exported in whole microseconds (the rest carried over).
struct TimeUse {
    counters: [metrics::Counter; 5],
    carry_ns: [u64; 5],
    doing: Doing,
    since: std::time::Instant,
}

impl TimeUse {
    fn new(topic: &str, partition: &str) -> Self {
        Self {
            counters: Doing::ALL.map(|d| {
                metrics::counter!(tm::WORKER_TIME_MICROSECONDS_TOTAL, "topic" => topic.to_string(), "partition" => partition.to_string(), "state" => d.label())
            }),
            carry_ns: [0; 5],
            doing: Doing::Busy,
            since: std::time::Instant::now(),
        }
    }

    /// Awaits `wait` as `doing`, then goes back to busy.
    async fn waiting<F: std::future::Future>(&mut self, doing: Doing, wait: F) -> F::Output {
        self.switch(doing);
        let out = wait.await;
        self.switch(Doing::Busy);
        out
    }

    /// Ends what the worker was doing and starts `next`.
    fn switch(&mut self, next: Doing) {
        let now = std::time::Instant::now();
        let i = self.doing as usize;
        let ns = self.carry_ns[i] + (now - self.since).as_nanos() as u64;
        self.counters[i].increment(ns / 1_000);
        self.carry_ns[i] = ns % 1_000;
        (self.doing, self.since) = (next, now);
    }
}

impl WorkerMetrics {
    const SAMPLE_EVERY: u64 = 16;
    const SAMPLES: usize = 1_024;

    fn new(id: &PartitionId) -> Self {
        tm::register_partition(&id.topic, id.partition);
        let (t, p) = (id.topic.clone(), id.partition.to_string());
        Self {
            consumed: metrics::counter!(tm::MESSAGES_CONSUMED_TOTAL, "topic" => t.clone(), "partition" => p.clone()),
            events: metrics::counter!(tm::EVENTS_TOTAL, "topic" => t.clone(), "partition" => p.clone()),
            end_to_end: metrics::histogram!(tm::END_TO_END_LATENCY_SECONDS, "topic" => t.clone()),
            output_latency: metrics::histogram!(tm::OUTPUT_LATENCY_SECONDS, "topic" => t.clone()),
            processing: metrics::histogram!(tm::PROCESSING_LATENCY_SECONDS, "topic" => t.clone()),
            checkpoint_seconds: metrics::histogram!(tm::CHECKPOINT_SECONDS, "topic" => t.clone()),
            checkpoint_encode_seconds: metrics::histogram!(tm::CHECKPOINT_ENCODE_SECONDS, "topic" => t.clone()),
            checkpoint_bytes_total: metrics::counter!(tm::CHECKPOINT_BYTES_TOTAL, "topic" => t.clone(), "partition" => p.clone()),
            active_clusters: metrics::gauge!(tm::ACTIVE_CLUSTERS, "topic" => t.clone(), "partition" => p.clone()),
            checkpoint_bytes: metrics::gauge!(tm::CHECKPOINT_BYTES, "topic" => t.clone(), "partition" => p.clone()),
            state_keys: metrics::gauge!(tm::STATE_KEYS, "topic" => t.clone(), "partition" => p.clone()),
            state_open_windows: metrics::gauge!(tm::STATE_OPEN_WINDOWS, "topic" => t.clone(), "partition" => p.clone()),
            taken: 0,
            samples: std::collections::VecDeque::with_capacity(Self::SAMPLES),
            last_batch: None,
            time: TimeUse::new(&t, &p),
        }
    }

    fn sample(&mut self, seconds: f64) {
        self.processing.record(seconds);
        if self.samples.len() == Self::SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(seconds);
    }

    /// p50, p95, p99 of the recent samples, in milliseconds.
    fn quantiles_ms(&self) -> Option<[f64; 3]> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = self.samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize] * 1e3;
        Some([at(0.5), at(0.95), at(0.99)])
    }
}

impl PartitionWorker {
    /// Runs until `stop` is cancelled, the queue closes, or the partition is fenced.
    pub async fn run(
        id: PartitionId,
        ctx: WorkerContext,
        start: Start,
        mut deliveries_rx: mpsc::Receiver<Delivery>,
        stop: CancellationToken,
    ) {
        let (epoch, checkpoint, cursor) = match start {
            Start::Claimed { epoch, checkpoint } => {
                let next = checkpoint.as_ref().map(|c| c.next_offset);
                (epoch, checkpoint, Cursor::at(next))
            }
            Start::Unclaimed => match claim_with_retry(&id, &ctx, &stop).await {
                Some((epoch, checkpoint)) => {
                    let next = checkpoint.as_ref().map(|c| c.next_offset);
                    ctx.offsets.start_at(&id.topic, id.partition, next);
                    (epoch, checkpoint, Cursor::positioning(next))
                }
                None => return,
            },
        };
        let config = &ctx.config;
        let max_bytes = config.kafka.max_event_bytes;
        let mut processor = match &checkpoint {
            Some(c) => {
                let (partition, deltas) = (id.partition, &c.deltas);
                match Processor::restore_chain(
                    &config.processing,
                    max_bytes,
                    partition,
                    &c.state,
                    deltas,
                ) {
                    Ok(p) => p,
                    Err(err) => {
                        ctx.fatal.raise(format!(
                            "partition {}/{}: {err}; refusing to start from scratch over a checkpoint",
                            id.topic, id.partition
                        ));
                        return;
                    }
                }
            }
            None => Processor::new(&config.processing, max_bytes, id.partition),
        };
        processor.track_changes();
        processor.resume_idle_clocks(wall_clock_ms());
        let decoder = ctx.codecs.input_decoder(config.input_format(&id.topic));
        processor.set_input(decoder.clone());
        let registry = ctx.codecs.registry.clone();
        let position = checkpoint.as_ref().map(|c| c.next_offset);
        info!(next_offset = ?position, epoch, "partition worker started");
        ctx.progress.set_restored(&id.topic, id.partition, position);
        let metrics = WorkerMetrics::new(&id);
        let mut worker = PartitionWorker {
            batch_rows: config.sink_batch_rows(),
            linger: Duration::from_millis(config.sink_linger_ms()),
            commit_interval: Duration::from_millis(config.sink_commit_interval_ms()),
            last_commit: None,
            sink: Sink { id, ctx, epoch },
            processor,
            cursor,
            duplicates_run: 0,
            position,
            pending: Pending::default(),
            waiting: Pending::default(),
            delivering: None,
            in_flight: None,
            chain: Chain::default(),
            stop: stop.clone(),
            metrics,
        };
        // Idle close needs wall-clock ticks; a quarter of the shortest idle interval is precise
        // enough without busy-waking.
        let tick_every = worker
            .processor
            .wants_ticks()
            .map(|ms| Duration::from_millis((ms / 4).max(50)));
        let mut ticks = tokio::time::interval(tick_every.unwrap_or(Duration::from_secs(3600)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inbox = Vec::with_capacity(INBOX_CHUNK);
        'run: loop {
            let deadline = worker.pending.since.map(|t| t + worker.linger);
            let commit_at = worker.commit_at();
            worker.metrics.time.switch(Doing::Idle);
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                done = join(&mut worker.in_flight), if worker.in_flight.is_some() => {
                    worker.metrics.time.switch(Doing::Busy);
                    worker.in_flight = None;
                    match worker.settle(done) {
                        Ok(()) => {}
                        Err(Halt::Stopped) => break,
                        Err(_) => return,
                    }
                }
                done = join(&mut worker.delivering), if worker.delivering.is_some() => {
                    worker.metrics.time.switch(Doing::Busy);
                    worker.delivering = None;
                    match worker.delivered(done, &stop) {
                        Ok(()) => {}
                        Err(Halt::Stopped) => break,
                        Err(_) => return worker.abandon().await,
                    }
                }
                // Between batches, the flushes that waited go when the interval is over;
                // otherwise with the next flush (within `linger_ms`).
                _ = sleep_until_opt(commit_at), if commit_at.is_some() => {
                    worker.metrics.time.switch(Doing::Busy);
                    worker.commit_now(&stop);
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    worker.metrics.time.switch(Doing::Busy);
                    if worker.flush(false).await.is_err() { return worker.abandon().await; }
                }
                // Deliveries before ticks: a backlog is never mistaken for a quiet partition.
                // What is queued comes in chunks: one pass of this loop (its timers, clock reads
                // and select) per chunk, not per message.
                received = deliveries_rx.recv_many(&mut inbox, INBOX_CHUNK) => {
                    if received == 0 {
                        break;
                    }
                    worker.metrics.time.switch(Doing::Busy);
                    // The wall clock idle close compares with: read once per chunk (a clock read
                    // per message was ~3 % of the service's CPU), and again after each wait.
                    worker.processor.set_wall_clock(wall_clock_ms());
                    for delivery in inbox.drain(..) {
                        let msg = match delivery {
                            Delivery::Message(msg) => msg,
                            Delivery::Positioned => {
                                worker.cursor.positioned();
                                continue;
                            }
                        };
                        worker
                            .sink
                            .ctx
                            .queued_bytes
                            .fetch_sub(msg.queued_size(), std::sync::atomic::Ordering::Relaxed);
                        // An Avro message's writer schema is fetched first (retrying while the
                        // registry is away); a stop meanwhile leaves the message, and the rest
                        // of the chunk, unprocessed.
                        if let (Some(id), Some(registry)) = (decoder.schema_id(msg.payload()), &registry) {
                            // One request first; only an answer that needs retries (an outage,
                            // an id the registry may not know yet) makes the partition wait.
                            let answered = registry.has(id) || tokio::select! {
                                answered = registry.try_fetch(id) => answered,
                                // The message stays unprocessed, as in a wait below.
                                _ = stop.cancelled() => break 'run,
                            };
                            if !answered {
                                // What is processed becomes durable before a wait of unknown
                                // length.
                                if worker.flush(true).await.is_err() {
                                    return worker.abandon().await;
                                }
                                let (progress, w) = (&worker.sink.ctx.progress, &worker.sink.id);
                                let waiting = |why| progress.set_retrying(&w.topic, w.partition, why);
                                let fetch = registry.ensure(id, &stop, waiting);
                                let fetched = worker.metrics.time.waiting(Doing::WaitingRegistry, fetch).await;
                                if fetched.is_err() {
                                    break 'run;
                                }
                                worker.processor.set_wall_clock(wall_clock_ms());
                            }
                        }
                        worker.take(&msg);
                        if worker.pending.full(worker.batch_rows) {
                            if worker.flush(false).await.is_err() {
                                return worker.abandon().await;
                            }
                            worker.processor.set_wall_clock(wall_clock_ms());
                        }
                    }
                }
                _ = ticks.tick(), if tick_every.is_some() => {
                    worker.metrics.time.switch(Doing::Busy);
                    worker.tick();
                }
            }
        }
        // Drain: what was processed becomes durable; what is still queued is left for the next
        // owner (it starts at the checkpoint written here). The transaction in flight gives up
        // at the stop if it was retrying; its flushes then go with the final one, which does not.
        drop(deliveries_rx);
        worker.metrics.time.switch(Doing::Busy);
        if let Some(handle) = worker.delivering.take() {
            let done = worker
                .metrics
                .time
                .waiting(Doing::WaitingKafka, handle)
                .await;
            // A delivery that gave up at the stop put its batch back: the final flush has it.
            match worker.delivered(done, &CancellationToken::new()) {
                Ok(()) | Err(Halt::Stopped) => {}
                Err(_) => return,
            }
        }
        if let Some(handle) = worker.in_flight.take() {
            let done = worker
                .metrics
                .time
                .waiting(Doing::WaitingPostgres, handle)
                .await;
            match worker.settle(done) {
                Ok(()) | Err(Halt::Stopped) => {}
                Err(_) => return,
            }
        }
        if !worker.pending.is_empty() || !worker.waiting.is_empty() {
            let _ = worker.flush_until(&CancellationToken::new(), true).await;
        }
        worker.metrics.time.switch(Doing::Busy);
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

    fn take(&mut self, msg: &Inbound) {
        let offset = msg.offset();
        let topic = &self.sink.id.topic;
        let verdict = self.cursor.take(offset);
        if verdict != Take::Duplicate && self.duplicates_run > 0 {
            warn!(
                dropped = self.duplicates_run,
                "dropped messages below the next expected offset (already processed, or the log was truncated or recreated below the checkpoint)"
            );
            metrics::counter!(tm::OFFSET_DUPLICATES_TOTAL, "topic" => topic.clone())
                .increment(self.duplicates_run);
            self.duplicates_run = 0;
        }
        match verdict {
            Take::Next => {}
            Take::Stale => return,
            Take::Duplicate => {
                if self.duplicates_run == 0 {
                    warn!(offset, expected = ?self.cursor.expected(), "message below the next expected offset; dropping until the expected offset arrives");
                }
                self.duplicates_run += 1;
                return;
            }
            Take::AfterGap { skipped } => {
                warn!(
                    offset,
                    skipped,
                    "offsets skipped before this message (compaction, transaction markers, retention or a broker fault)"
                );
                metrics::counter!(tm::OFFSETS_SKIPPED_TOTAL, "topic" => topic.clone())
                    .increment(skipped as u64);
            }
        }
        let record = Record {
            payload: msg.payload(),
            key: msg.key(),
            timestamp_ms: msg.timestamp_ms(),
            offset,
        };
        let late_before = self.processor.late_dropped();
        self.pending.consumed += 1;
        self.metrics.consumed.increment(1);
        self.metrics.taken += 1;
        let timed =
            (self.metrics.taken % WorkerMetrics::SAMPLE_EVERY == 0).then(std::time::Instant::now);
        let processed = self.processor.process(record, &mut self.pending.outputs);
        if let Some(started) = timed {
            self.metrics.sample(started.elapsed().as_secs_f64());
        }
        if processed.is_ok() {
            if let Some(ts) = record.timestamp_ms {
                self.pending.timestamps.push(ts);
            }
        }
        match processed {
            Ok(None) => self.pending.events += 1,
            Ok(Some(late)) => {
                self.pending.events += 1;
                self.pending.dead.push(DeadLetter::new(
                    msg.key().map(<[u8]>::to_vec),
                    msg.payload().map(<[u8]>::to_vec),
                    "late",
                    format!(
                        "late: event time is {} ms behind stream time and its window has closed",
                        late.behind_ms
                    ),
                    offset,
                ));
            }
            Err(err) => self.pending.dead.push(DeadLetter::new(
                msg.key().map(<[u8]>::to_vec),
                msg.payload().map(<[u8]>::to_vec),
                err.kind(),
                err.to_string(),
                offset,
            )),
        }
        let late = self.processor.late_dropped() - late_before;
        if late > 0 {
            metrics::counter!(tm::LATE_EVENTS_TOTAL, "topic" => topic.clone()).increment(late);
        }
        self.pending.next_offset = Some(offset + 1);
        self.position = Some(offset + 1);
        self.pending.since.get_or_insert_with(Instant::now);
    }

    /// After a flush gave up: the transaction in flight, if any, still ends here (it stops at the
    /// stop request when retrying), so what it made durable is stored for commit before the
    /// worker returns.
    async fn abandon(&mut self) {
        if let Some(handle) = self.delivering.take() {
            handle.abort();
        }
        if let Some(handle) = self.in_flight.take() {
            let _ = self.settle(handle.await);
        }
    }

    /// Flushes the pending batch, giving up when the worker is asked to stop; `durable`: and
    /// waits until PostgreSQL holds it.
    async fn flush(&mut self, durable: bool) -> Result<(), Halt> {
        let stop = self.stop.clone();
        let started = Instant::now();
        let result = self.flush_until(&stop, durable).await;
        if started.elapsed() > Duration::from_secs(1) {
            // The input was not watched meanwhile (a sink outage): quiet time restarts now.
            self.processor.resume_idle_clocks(wall_clock_ms());
        }
        result
    }

    /// When the waiting flushes' transaction starts between batches: none in flight, nothing
    /// pending or being delivered, something waiting; at the end of the commit interval.
    fn commit_at(&self) -> Option<Instant> {
        if self.in_flight.is_some()
            || self.delivering.is_some()
            || !self.pending.is_empty()
            || self.waiting.is_empty()
        {
            return None;
        }
        Some(self.commit_due().unwrap_or_else(Instant::now))
    }

    /// When the commit interval since the last transaction's start is over; `None` before the
    /// first transaction.
    fn commit_due(&self) -> Option<Instant> {
        self.last_commit.map(|t| t + self.commit_interval)
    }

    /// Sends the pending batch to Kafka once the previous flush is delivered: in the background,
    /// or, when `durable`, awaiting every ack and then PostgreSQL for all waiting flushes.
    /// Delivered flushes wait for PostgreSQL; their transaction starts when none is in flight
    /// and the commit interval is over. Waits for the one in flight when too many flushes wait.
    async fn flush_until(&mut self, stop: &CancellationToken, durable: bool) -> Result<(), Halt> {
        self.processor.end_batch(&mut self.pending.outputs);
        if self.pending.next_offset.is_none() {
            match self.position {
                // Outputs of a tick or of the batch end: they belong after the last message.
                Some(position) if self.pending.rows() > 0 => {
                    self.pending.next_offset = Some(position)
                }
                _ => self.pending = Pending::default(),
            }
        }
        // A partition's outputs reach Kafka in batch order.
        if let Some(handle) = self.delivering.take() {
            let done = self.metrics.time.waiting(Doing::WaitingKafka, handle).await;
            self.delivered(done, stop)?;
        }
        if self.pending.is_empty() {
            return self.commit_waiting(stop, durable).await;
        }
        if durable {
            let all = self.pending.refs();
            let delivered = self
                .metrics
                .time
                .waiting(
                    Doing::WaitingKafka,
                    self.sink.deliver(&mut self.pending, all, stop),
                )
                .await;
            delivered?;
            let batch = std::mem::take(&mut self.pending);
            self.join_waiting(batch);
            return self.commit_waiting(stop, true).await;
        }
        // This flush's transaction starts as soon as it is delivered if none is in flight (a
        // finished one is settled first) and the commit interval is over: its checkpoint is
        // taken now, at its end.
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            let handle = self.in_flight.take().expect("checked above");
            self.settle(handle.await)?;
        }
        let ((rows, bytes), (more_rows, more_bytes)) = (self.waiting.held(), self.pending.held());
        let urgent = too_much_waits((rows + more_rows, bytes + more_bytes), self.batch_rows);
        let early = self.commit_due().is_some_and(|due| Instant::now() < due);
        let mut batch = std::mem::take(&mut self.pending);
        let checkpoint = (self.in_flight.is_none() && (urgent || !early)).then(|| {
            let next_offset = batch
                .next_offset
                .expect("a pending flush always has its next offset");
            self.take_checkpoint(next_offset)
        });
        let all = batch.refs();
        let (sink, stop) = (self.sink.clone(), stop.clone());
        self.delivering = Some(tokio::spawn(async move {
            let result = sink.deliver(&mut batch, all, &stop).await;
            Delivered {
                batch,
                checkpoint,
                result,
            }
        }));
        // Too much waits for PostgreSQL: the worker waits for the transaction in flight, with
        // this flush's outputs already on their way (the next flush then carries a checkpoint).
        if urgent {
            if let Some(handle) = self.in_flight.take() {
                let done = self
                    .metrics
                    .time
                    .waiting(Doing::WaitingPostgres, handle)
                    .await;
                self.settle(done)?;
            }
        }
        Ok(())
    }

    /// Takes a delivery's outcome: the batch waits for PostgreSQL, its transaction starting now
    /// when it carries its checkpoint; a delivery that gave up at a stop puts its batch back in
    /// front of the pending one.
    fn delivered(
        &mut self,
        done: Result<Delivered, tokio::task::JoinError>,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        let done = done.map_err(|err| {
            self.sink.ctx.fatal.raise(format!(
                "partition {}/{}: the Kafka delivery's task failed: {err}",
                self.sink.id.topic, self.sink.id.partition
            ));
            Halt::Fatal
        })?;
        let Delivered {
            mut batch,
            checkpoint,
            result,
        } = done;
        if let Err(halt) = result {
            if halt == Halt::Stopped {
                if checkpoint.is_some() {
                    // Its delta is lost with it: the next checkpoint is full.
                    self.chain.base = None;
                }
                batch.absorb(std::mem::take(&mut self.pending));
                self.pending = batch;
            }
            return Err(halt);
        }
        self.join_waiting(batch);
        if let Some(checkpoint) = checkpoint {
            self.start_commit(stop, checkpoint);
        }
        Ok(())
    }

    /// A delivered flush: its events' time to output is recorded, and it waits for PostgreSQL.
    fn join_waiting(&mut self, mut batch: Pending) {
        let now = wall_clock_ms();
        for ts in &batch.timestamps {
            self.metrics
                .output_latency
                .record((now - ts).max(0) as f64 / 1e3);
        }
        batch.since = None;
        batch.delivered();
        self.waiting.absorb(batch);
    }

    /// Starts the waiting flushes' transaction when none is in flight and the commit interval is
    /// over, after waiting for the one in flight when too many flushes wait; for all of them
    /// when `durable`. Nothing is pending or being delivered: the checkpoint is of this moment.
    async fn commit_waiting(
        &mut self,
        stop: &CancellationToken,
        durable: bool,
    ) -> Result<(), Halt> {
        loop {
            let urgent = durable || too_much_waits(self.waiting.held(), self.batch_rows);
            if let Some(handle) = &self.in_flight {
                if !urgent && !handle.is_finished() {
                    return Ok(());
                }
                let handle = self.in_flight.take().expect("checked above");
                let done = self
                    .metrics
                    .time
                    .waiting(Doing::WaitingPostgres, handle)
                    .await;
                self.settle(done)?;
            }
            let early = self.commit_due().is_some_and(|due| Instant::now() < due);
            if self.waiting.is_empty() || (!urgent && early) {
                return Ok(());
            }
            self.commit_now(stop);
            if !durable {
                return Ok(());
            }
        }
    }

    /// Starts the transaction of the waiting flushes with the checkpoint of this moment: nothing
    /// is pending or being delivered.
    fn commit_now(&mut self, stop: &CancellationToken) {
        debug_assert!(self.pending.is_empty() && self.delivering.is_none());
        let next_offset = self
            .waiting
            .next_offset
            .expect("a waiting flush always has its next offset");
        let checkpoint = self.take_checkpoint(next_offset);
        self.start_commit(stop, checkpoint);
    }

    /// Starts the transaction of the waiting flushes with `checkpoint`, taken after the last
    /// of them (a new base's encoding, started when it was taken, is awaited first in the
    /// transaction's task).
    fn start_commit(&mut self, stop: &CancellationToken, checkpoint: Taken) {
        debug_assert!(self.in_flight.is_none());
        let batch = std::mem::take(&mut self.waiting);
        debug_assert_eq!(batch.next_offset, Some(checkpoint.next_offset()));
        self.last_commit = Some(Instant::now());
        let (sink, stop) = (self.sink.clone(), stop.clone());
        self.in_flight = Some(tokio::spawn(async move {
            let mut batch = batch;
            let next_offset = checkpoint.next_offset();
            let Some(checkpoint) = checkpoint.checkpoint().await else {
                // The runtime is shutting down: as a transaction that gave up at a stop.
                let written = Written {
                    bytes: 0,
                    delta: false,
                    next_offset,
                };
                return (batch, written, Err(Halt::Stopped));
            };
            let written = Written {
                bytes: checkpoint.bytes(),
                delta: checkpoint.is_delta(),
                next_offset,
            };
            let result = sink.commit(&mut batch, &checkpoint, &stop).await;
            (batch, written, result)
        }));
    }

    /// [`Self::checkpoint`], timed (the time the partition's processing paused for it).
    fn take_checkpoint(&mut self, next_offset: i64) -> Taken {
        let started = std::time::Instant::now();
        let checkpoint = self.checkpoint(next_offset);
        self.metrics
            .checkpoint_seconds
            .record(started.elapsed().as_secs_f64());
        checkpoint
    }

    /// The checkpoint to write now: what changed since the last one while the deltas after the
    /// base stay smaller than the base (and fewer than [`MAX_DELTAS`]), else a new base. So a
    /// checkpoint costs what changed, PostgreSQL holds at most twice the state, and a restore
    /// reads at most that.
    fn checkpoint(&mut self, next_offset: i64) -> Taken {
        if let Some((base, base_offset)) = self.chain.base {
            let room = base.saturating_sub(self.chain.delta_bytes);
            if self.chain.deltas < MAX_DELTAS && self.processor.delta_may_fit(base, room) {
                let delta = self.processor.take_delta();
                if self.chain.delta_bytes + delta.len() < base {
                    return Taken::Ready(Checkpoint::delta(next_offset, base_offset, delta));
                }
            }
        }
        let state = self.processor.copy_state();
        self.processor.forget_changes();
        Taken::base(
            next_offset,
            state,
            self.metrics.checkpoint_encode_seconds.clone(),
        )
    }

    /// Takes the outcome of a transaction: on success the offset is stored and the batch
    /// counted; a transaction that stopped while retrying puts its flushes back in front of
    /// those waiting.
    fn settle(&mut self, done: Result<Committed, tokio::task::JoinError>) -> Result<(), Halt> {
        let (batch, written, result) = match done {
            Ok(done) => done,
            Err(err) => {
                self.sink.ctx.fatal.raise(format!(
                    "partition {}/{}: the PostgreSQL transaction's task failed: {err}",
                    self.sink.id.topic, self.sink.id.partition
                ));
                return Err(Halt::Fatal);
            }
        };
        let (id, ctx) = (&self.sink.id, &self.sink.ctx);
        ctx.progress.set_retrying(&id.topic, id.partition, None);
        let rows = match result {
            Ok(rows) => rows,
            Err(Halt::Stopped) => {
                // Its delta is lost with it: the next checkpoint is full.
                self.chain.base = None;
                let mut batch = batch;
                batch.absorb(std::mem::take(&mut self.waiting));
                self.waiting = batch;
                return Err(Halt::Stopped);
            }
            Err(halt) => {
                if halt == Halt::Fenced {
                    metrics::counter!(tm::FENCED_BATCHES_TOTAL, "topic" => id.topic.clone())
                        .increment(1);
                    // Until the group hands the partition over, it is paused here (the intake
                    // sees the closed queue) and reported: /health fails after
                    // `http.stall_timeout_ms` if no rebalance comes.
                    ctx.progress.set_retrying(
                        &id.topic,
                        id.partition,
                        Some("fenced: a newer owner holds the partition; waiting for the group to hand it over".into()),
                    );
                }
                return Err(halt);
            }
        };
        let next_offset = batch
            .next_offset
            .expect("a committed batch always has its next offset");
        ctx.offsets
            .mark_durable(&id.topic, id.partition, next_offset);
        ctx.progress.record_batch(
            &id.topic,
            id.partition,
            &tm::BatchCounts {
                next_offset,
                events: batch.events,
                dead_letters: batch.dead.len() as u64,
                outputs: batch.outputs.len() as u64,
                rows,
            },
        );
        self.chain = if written.delta {
            Chain {
                base: self.chain.base,
                delta_bytes: self.chain.delta_bytes + written.bytes,
                deltas: self.chain.deltas + 1,
            }
        } else {
            Chain {
                base: Some((written.bytes, written.next_offset)),
                ..Chain::default()
            }
        };
        let kind = if written.delta { "delta" } else { "full" };
        metrics::counter!(tm::CHECKPOINTS_TOTAL, "topic" => id.topic.clone(), "kind" => kind)
            .increment(1);
        self.record_batch_metrics(&batch, rows, written.bytes);
        Ok(())
    }

    /// Metrics and `/status` of a batch that just became durable (counted per batch).
    fn record_batch_metrics(&mut self, p: &Pending, rows: u64, checkpoint_bytes: usize) {
        let topic = self.sink.id.topic.as_str();
        let m = &mut self.metrics;
        let now = wall_clock_ms();
        for ts in &p.timestamps {
            m.end_to_end.record((now - ts).max(0) as f64 / 1e3);
        }
        m.events.increment(p.events);
        metrics::counter!(tm::OUTPUT_MESSAGES_TOTAL, "topic" => topic.to_string())
            .increment(p.outputs.len() as u64);
        metrics::counter!(tm::SINK_ROWS_TOTAL, "topic" => topic.to_string()).increment(rows);
        metrics::histogram!(tm::SINK_BATCH_ROWS).record(rows as f64);
        for dead in &p.dead {
            metrics::counter!(tm::DEAD_LETTERS_TOTAL, "topic" => topic.to_string(), "reason" => dead.kind)
                .increment(1);
        }
        let (mut outliers, mut drift_at) = (0, None);
        for e in &p.outputs {
            match &e.output {
                crate::output::Output::Outlier(_) => outliers += 1,
                crate::output::Output::DriftDetection(d) => {
                    metrics::counter!(tm::DRIFT_ALERTS_TOTAL, "topic" => topic.to_string(), "severity" => d.severity.clone())
                        .increment(1);
                    drift_at = Some(d.detected_at);
                }
                _ => {}
            }
        }
        if outliers > 0 {
            metrics::counter!(tm::OUTLIERS_TOTAL, "topic" => topic.to_string()).increment(outliers);
        }
        m.checkpoint_bytes.set(checkpoint_bytes as f64);
        m.checkpoint_bytes_total.increment(checkpoint_bytes as u64);
        let (keys, open) = self.processor.state_size();
        m.state_keys.set(keys as f64);
        m.state_open_windows.set(open as f64);
        let mut status = self.processor.status();
        let points = status.as_ref().map_or(0, |s| s.points_processed);
        let rate = m.last_batch.and_then(|(at, before)| {
            let secs = at.elapsed().as_secs_f64();
            (secs > 0.0).then(|| points.saturating_sub(before) as f64 / secs)
        });
        m.last_batch = Some((Instant::now(), points));
        if let Some(s) = &mut status {
            m.active_clusters.set(s.active_clusters as f64);
            s.points_per_second = rate;
        }
        self.sink.ctx.progress.record_status(
            topic,
            self.sink.id.partition,
            tm::StatusUpdate {
                algorithm_status: status,
                drift_at,
                points_per_second: rate,
                processing_latency_ms: m.quantiles_ms(),
            },
        );
    }
}

impl Sink {
    /// Produces `which` until every one is acknowledged. Retriable failures back off; a message
    /// Kafka refuses for good is diverted (a dead letter truncated, an output dead-lettered); a
    /// destination that refuses everything is retried with the partition reported as stalled.
    ///
    /// A refusal for size or shape is judged on the message alone: the broker refuses a whole
    /// batch when it passes the topic's `max.message.bytes` (a topic limit under the producer's
    /// `batch.size`), and librdkafka fails every message in it with "too large". Messages
    /// refused in company are sent again in halves, one half at a time and each awaited, halved
    /// again while refused: only a message refused alone is diverted. A flush of n messages
    /// into a topic that takes b of them per batch costs about n / b + 2 log2(n / b) requests.
    /// The halves go after the rest of the flush: a consumer orders a window's outputs by
    /// revision, not by arrival.
    async fn deliver(
        &self,
        batch: &mut Pending,
        mut which: Vec<MessageRef>,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        let topic = self.id.topic.clone();
        let mut backoff = Backoff::new(self.ctx.config.postgres.retry_max_backoff_ms);
        let mut retried = false;
        let started = Instant::now();
        // Groups refused in company, halved: each sent on its own after the rest.
        let mut smaller: std::collections::VecDeque<Vec<MessageRef>> = Default::default();
        let mut halving = false;
        loop {
            let report = self
                .ctx
                .producer
                .send(
                    &topic,
                    self.id.partition,
                    &batch.outputs,
                    &batch.dead,
                    &which,
                )
                .await;
            let in_company = which.len() > 1;
            which.clear();
            let mut refused_in_company = Vec::new();
            let mut wait = None;
            for (m, err) in report.failed {
                match (classify(&err), m) {
                    (FailureClass::Fatal, _) => {
                        self.ctx.fatal.raise(format!(
                            "the Kafka producer failed for good and must be recreated: {err}"
                        ));
                        return Err(Halt::Fatal);
                    }
                    (FailureClass::Message, m) if in_company => refused_in_company.push(m),
                    (FailureClass::Message, MessageRef::DeadLetter(i)) => {
                        let dead = &batch.dead[i];
                        match dead.shrink() {
                            Some(smaller) => {
                                warn!(offset = dead.offset, error = %err, "dead letter refused by Kafka; sending it smaller");
                                metrics::counter!(tm::PRODUCE_DIVERTED_TOTAL, "topic" => topic.clone(), "reason" => "dead_letter_truncated").increment(1);
                                batch.dead[i] = smaller;
                                which.push(m);
                            }
                            None => {
                                // Even a stub (reason and source coordinates only) is refused:
                                // retrying cannot help, and stalling would stop the partition.
                                error!(offset = dead.offset, kind = dead.kind, reason = %dead.reason, error = %err, "Kafka refuses even a stub of this dead letter; it is lost (logged here)");
                                metrics::counter!(tm::PRODUCE_DIVERTED_TOTAL, "topic" => topic.clone(), "reason" => "dead_letter_lost").increment(1);
                            }
                        }
                    }
                    (FailureClass::Message, MessageRef::Output(i)) => {
                        let emitted = &batch.outputs[i];
                        warn!(source_offset = emitted.source_offset, error = %err, "output refused by Kafka; sending it to the dead-letter topic");
                        metrics::counter!(tm::PRODUCE_DIVERTED_TOTAL, "topic" => topic.clone(), "reason" => "output_dead_lettered").increment(1);
                        batch.dead.push(DeadLetter::new(
                            Some(emitted.output.key().into_bytes()),
                            Some(emitted.output.to_json()),
                            "output_rejected",
                            format!(
                                "Kafka refused this {} output: {err}",
                                emitted.output.type_name()
                            ),
                            emitted.source_offset,
                        ));
                        which.push(MessageRef::DeadLetter(batch.dead.len() - 1));
                    }
                    (class, m) => {
                        if class != FailureClass::Retriable {
                            wait = Some(format!(
                                "Kafka refuses the partition's messages for good: {err}"
                            ));
                        } else if wait.is_none() {
                            wait = Some(format!("producing failed: {err}"));
                        }
                        which.push(m);
                    }
                }
            }
            if let Some(problem) = wait {
                if problem.contains("for good") {
                    error!(
                        problem,
                        "the batch cannot be delivered; retrying until an operator fixes it"
                    );
                } else {
                    warn!(problem, "producing outputs failed; retrying");
                }
                metrics::counter!(tm::RETRIES_TOTAL, "stage" => "produce").increment(1);
                self.ctx
                    .progress
                    .set_retrying(&topic, self.id.partition, Some(problem));
                retried = true;
                tokio::select! {
                    _ = stop.cancelled() => return Err(Halt::Stopped),
                    _ = backoff.wait() => {}
                }
            }
            if !refused_in_company.is_empty() {
                if !halving {
                    halving = true;
                    warn!(
                        messages = refused_in_company.len(),
                        "Kafka refused a batch as too large; re-sending its messages in halves (a topic's max.message.bytes is below the producer's batch.size)"
                    );
                }
                metrics::counter!(tm::PRODUCE_RESENT_IN_HALVES_TOTAL, "topic" => topic.clone())
                    .increment(refused_in_company.len() as u64);
            }
            if refused_in_company.len() > 1 {
                let second = refused_in_company.split_off(refused_in_company.len() / 2);
                smaller.push_front(second);
            }
            if !refused_in_company.is_empty() {
                smaller.push_front(refused_in_company);
            }
            if which.is_empty() {
                match smaller.pop_front() {
                    Some(_) if stop.is_cancelled() => return Err(Halt::Stopped),
                    Some(group) => which = group,
                    None => break,
                }
            }
        }
        if retried {
            self.ctx
                .progress
                .set_retrying(&topic, self.id.partition, None);
        }
        metrics::histogram!(tm::DELIVERY_SECONDS, "topic" => topic)
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Commits the batch and its checkpoint; rows PostgreSQL refuses are dead-lettered first
    /// and the batch is committed without them. Returns the rows written.
    async fn commit(
        &self,
        batch: &mut Pending,
        checkpoint: &Checkpoint,
        stop: &CancellationToken,
    ) -> Result<u64, Halt> {
        let mut backoff = Backoff::new(self.ctx.config.postgres.retry_max_backoff_ms);
        loop {
            let rows = Batch {
                id: &self.id,
                epoch: self.epoch,
                outputs: &batch.outputs,
                checkpoint,
            };
            let started = std::time::Instant::now();
            self.ctx.progress.set_retrying(
                &self.id.topic,
                self.id.partition,
                Some("committing the batch to PostgreSQL".into()),
            );
            // A transaction past `postgres.commit_timeout_ms` is abandoned by the store
            // (`StoreError::TimedOut`, retried).
            let result = self.ctx.store.commit(&rows).await;
            match result {
                Ok(rows) => {
                    let elapsed = started.elapsed();
                    metrics::histogram!(tm::SINK_COMMIT_SECONDS).record(elapsed.as_secs_f64());
                    self.ctx.progress.record_sink_time(elapsed);
                    return Ok(rows);
                }
                Err(StoreError::Rejected(rows)) => {
                    let topic = self.id.topic.clone();
                    metrics::counter!(tm::SINK_REJECTED_ROWS_TOTAL, "topic" => topic)
                        .increment(rows.len() as u64);
                    let first = batch.dead.len();
                    for row in &rows {
                        let emitted = &batch.outputs[row.index];
                        warn!(source_offset = emitted.source_offset, reason = %row.reason, "PostgreSQL refused an output row; dead-lettering it");
                        batch.dead.push(DeadLetter::new(
                            Some(emitted.output.key().into_bytes()),
                            Some(emitted.output.to_json()),
                            "sink_rejected",
                            format!(
                                "PostgreSQL refused this {} row: {}",
                                emitted.output.type_name(),
                                row.reason
                            ),
                            emitted.source_offset,
                        ));
                    }
                    let new: Vec<MessageRef> = (first..batch.dead.len())
                        .map(MessageRef::DeadLetter)
                        .collect();
                    self.deliver(batch, new, stop).await?;
                    let refused: std::collections::HashSet<usize> =
                        rows.iter().map(|r| r.index).collect();
                    let mut index = 0;
                    batch.outputs.retain(|_| {
                        index += 1;
                        !refused.contains(&(index - 1))
                    });
                }
                Err(StoreError::Fenced { mine, current }) => {
                    warn!(
                        epoch = mine,
                        owner_epoch = current,
                        "the partition has a newer owner; this worker stops without writing"
                    );
                    return Err(Halt::Fenced);
                }
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "sink transaction failed; retrying (consumption of this partition waits)");
                    metrics::counter!(tm::RETRIES_TOTAL, "stage" => "sink").increment(1);
                    self.ctx.progress.set_retrying(
                        &self.id.topic,
                        self.id.partition,
                        Some(format!("PostgreSQL: {err}")),
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return Err(Halt::Stopped),
                        _ = backoff.wait() => {}
                    }
                }
                Err(err) => {
                    self.ctx.fatal.raise(format!(
                        "partition {}/{}: {err}",
                        self.id.topic, self.id.partition
                    ));
                    return Err(Halt::Fatal);
                }
            }
        }
    }
}

async fn claim_with_retry(
    id: &PartitionId,
    ctx: &WorkerContext,
    stop: &CancellationToken,
) -> Option<(Epoch, Option<Checkpoint>)> {
    let mut backoff = Backoff::new(ctx.config.postgres.retry_max_backoff_ms);
    loop {
        match ctx.store.claim(id).await {
            Ok(claimed) => return Some(claimed),
            Err(err) if err.is_retryable() => {
                warn!(error = %err, "claiming the partition failed; retrying");
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

/// The outcome of the task in flight (never resolves without one).
async fn join<T>(
    in_flight: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match in_flight {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(offset: i64, bytes: usize) -> DeadLetter {
        DeadLetter::new(
            Some(b"key".to_vec()),
            Some(vec![b'x'; bytes]),
            "not_json",
            "not JSON".into(),
            offset,
        )
    }

    /// A flood of megabyte-sized invalid messages flushes by memory, long before `batch_rows`
    /// of them (10,000 in the `throughput` profile: 10 GB).
    #[test]
    fn a_batch_of_large_dead_letters_is_full_by_memory() {
        let mut batch = Pending::default();
        let mut taken = 0;
        while !batch.full(10_000) {
            batch.dead.push(invalid(taken, 1 << 20));
            taken += 1;
        }
        assert_eq!(taken, 16, "16 MiB of payloads");
        assert!(batch.bytes >= FLUSH_BYTES);
    }

    /// Once Kafka has them, dead letters wait for PostgreSQL without their payloads, and what
    /// waits is bounded by memory as well as by rows.
    #[test]
    fn delivered_dead_letters_let_their_payloads_go() {
        let mut waiting = Pending::default();
        for round in 0..20 {
            let mut batch = Pending::default();
            for i in 0..16 {
                batch.dead.push(invalid(round * 16 + i, 1 << 20));
            }
            batch.consumed = 16;
            assert!(batch.full(10_000));
            batch.delivered();
            assert!(batch
                .dead
                .iter()
                .all(|d| d.payload.is_none() && d.key.is_none()));
            waiting.absorb(batch);
        }
        let (rows, bytes) = waiting.held();
        assert_eq!(rows, 320);
        assert!(
            bytes < 64 * 1024,
            "{bytes} bytes held for 320 delivered dead letters"
        );
        assert!(!too_much_waits((rows, bytes), 10_000));
        assert_eq!(
            waiting.dead.iter().filter(|d| d.kind == "not_json").count(),
            320
        );
    }

    #[test]
    fn what_waits_is_bounded_by_rows_and_by_memory() {
        assert!(!too_much_waits((8 * 500, MAX_WAITING_BYTES), 500));
        assert!(too_much_waits((8 * 500 + 1, 0), 500));
        assert!(too_much_waits((1, MAX_WAITING_BYTES + 1), 500));
        // Outputs count with their heap data: an outlier with a large metadata tree.
        let metadata: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"note":"{}","tags":[1,2,3]}}"#,
            "y".repeat(10_000)
        ))
        .unwrap();
        let mut batch = Pending::default();
        batch.outputs.push(Emitted {
            source_offset: 0,
            seq: 0,
            output: crate::output::Output::Outlier(crate::output::OutlierRecord {
                partition: 0,
                offset: 0,
                id: None,
                key: "k".into(),
                ts: 0,
                features: vec![0.0; 1_000],
                outlier_score: 0.9,
                reason: "score".into(),
                metadata: Some(metadata),
            }),
        });
        let (_, bytes) = batch.held();
        assert!(bytes > 18_000, "{bytes}");
    }
}

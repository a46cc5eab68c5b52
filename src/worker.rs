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
use crate::kafka::producer::{classify, DeadLetter, FailureClass, MessageRef, OutputProducer};
use crate::offsets::{Cursor, Delivery, Offsets, Take};
use crate::output::Emitted;
use crate::processor::{Processor, Record};
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

/// The bytes a queued message holds, as counted against `kafka.partition_queue_bytes`:
/// payload, key, headers, and a fixed 128 bytes for the message itself.
pub fn queued_size(msg: &OwnedMessage) -> usize {
    use rdkafka::message::Headers as _;
    let headers = msg.headers().map_or(0, |h| {
        h.iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    128 + msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len) + headers
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
    /// Messages taken (events and rejected).
    consumed: u64,
    /// Kafka timestamps of the batch's events, for the end-to-end latency.
    timestamps: Vec<i64>,
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
enum Halt {
    /// Stop requested (revoke, shutdown) while retrying: the next owner replays the batch.
    Stopped,
    /// Another worker owns the partition now: this one must stop without writing.
    Fenced,
    /// The service must stop (already raised on [`Fatal`]).
    Fatal,
}

/// One partition's worker.
pub struct PartitionWorker {
    id: PartitionId,
    ctx: WorkerContext,
    processor: Processor,
    epoch: Epoch,
    /// Which delivered messages to take.
    cursor: Cursor,
    /// Messages dropped since the last taken one for being below the expected offset.
    duplicates_run: u64,
    pending: Pending,
    /// Next offset after the last processed message (or the checkpoint's).
    position: Option<i64>,
    batch_rows: usize,
    linger: Duration,
    stop: CancellationToken,
    metrics: WorkerMetrics,
}

/// A worker's metric handles (labels resolved once) and recent samples for `/status`.
struct WorkerMetrics {
    consumed: metrics::Counter,
    events: metrics::Counter,
    end_to_end: metrics::Histogram,
    processing: metrics::Histogram,
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
            processing: metrics::histogram!(tm::PROCESSING_LATENCY_SECONDS, "topic" => t.clone()),
            active_clusters: metrics::gauge!(tm::ACTIVE_CLUSTERS, "topic" => t.clone(), "partition" => p.clone()),
            checkpoint_bytes: metrics::gauge!(tm::CHECKPOINT_BYTES, "topic" => t.clone(), "partition" => p.clone()),
            state_keys: metrics::gauge!(tm::STATE_KEYS, "topic" => t.clone(), "partition" => p.clone()),
            state_open_windows: metrics::gauge!(tm::STATE_OPEN_WINDOWS, "topic" => t, "partition" => p),
            taken: 0,
            samples: std::collections::VecDeque::with_capacity(Self::SAMPLES),
            last_batch: None,
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
                match Processor::restore(&config.processing, max_bytes, id.partition, &c.state) {
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
            id,
            ctx,
            processor,
            epoch,
            cursor,
            duplicates_run: 0,
            position,
            pending: Pending::default(),
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
        loop {
            let deadline = worker.pending.since.map(|t| t + worker.linger);
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    if worker.flush().await.is_err() { return; }
                }
                // Deliveries before ticks: a backlog is never mistaken for a quiet partition.
                delivery = deliveries_rx.recv() => match delivery {
                    Some(Delivery::Message(msg)) => {
                        worker
                            .ctx
                            .queued_bytes
                            .fetch_sub(queued_size(&msg), std::sync::atomic::Ordering::Relaxed);
                        // An Avro message's writer schema is fetched first (retrying while the
                        // registry is away); a stop meanwhile leaves the message unprocessed.
                        if let (Some(id), Some(registry)) = (decoder.schema_id(msg.payload()), &registry) {
                            if !registry.has(id) {
                                // What is processed becomes durable before a wait of unknown
                                // length.
                                if worker.flush().await.is_err() {
                                    return;
                                }
                                let (progress, w) = (&worker.ctx.progress, &worker.id);
                                let waiting = |why| progress.set_retrying(&w.topic, w.partition, why);
                                if registry.ensure(id, &stop, waiting).await.is_err() {
                                    break;
                                }
                            }
                        }
                        worker.take(&msg);
                        if worker.pending.rows() >= worker.batch_rows && worker.flush().await.is_err() {
                            return;
                        }
                    }
                    Some(Delivery::Positioned) => worker.cursor.positioned(),
                    None => break,
                },
                _ = ticks.tick(), if tick_every.is_some() => worker.tick(),
            }
        }
        // Drain: what was processed becomes durable; what is still queued is left for the next
        // owner (it starts at the checkpoint written here). A stop during the final flush's
        // retries leaves the batch to the next owner too.
        drop(deliveries_rx);
        if worker.pending.next_offset.is_some() || worker.pending.rows() > 0 {
            let _ = worker.flush_until(CancellationToken::new()).await;
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
        let verdict = self.cursor.take(offset);
        if verdict != Take::Duplicate && self.duplicates_run > 0 {
            warn!(
                dropped = self.duplicates_run,
                "dropped messages below the next expected offset (already processed, or the log was truncated or recreated below the checkpoint)"
            );
            metrics::counter!(tm::OFFSET_DUPLICATES_TOTAL, "topic" => self.id.topic.clone())
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
                metrics::counter!(tm::OFFSETS_SKIPPED_TOTAL, "topic" => self.id.topic.clone())
                    .increment(skipped as u64);
            }
        }
        let record = Record {
            payload: msg.payload(),
            key: msg.key(),
            timestamp_ms: msg.timestamp().to_millis(),
            offset,
        };
        let late_before = self.processor.late_dropped();
        self.processor.set_wall_clock(wall_clock_ms());
        self.pending.consumed += 1;
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
            metrics::counter!(tm::LATE_EVENTS_TOTAL, "topic" => self.id.topic.clone())
                .increment(late);
        }
        self.pending.next_offset = Some(offset + 1);
        self.position = Some(offset + 1);
        self.pending.since.get_or_insert_with(Instant::now);
    }

    /// Makes the pending batch durable, giving up when the worker is asked to stop.
    async fn flush(&mut self) -> Result<(), Halt> {
        let stop = self.stop.clone();
        let started = Instant::now();
        let result = self.flush_until(stop).await;
        if started.elapsed() > Duration::from_secs(1) {
            // The input was not watched meanwhile (a sink outage): quiet time restarts now.
            self.processor.resume_idle_clocks(wall_clock_ms());
        }
        result
    }

    /// Makes the pending batch durable: outputs and dead letters to Kafka (acked), then outputs
    /// and checkpoint to PostgreSQL in one transaction, then the offset.
    async fn flush_until(&mut self, stop: CancellationToken) -> Result<(), Halt> {
        self.processor.end_batch(&mut self.pending.outputs);
        let next_offset = match self.pending.next_offset {
            Some(next) => next,
            None if self.pending.rows() > 0 => match self.position {
                Some(position) => position,
                None => return Ok(()),
            },
            None => {
                self.pending.since = None;
                return Ok(());
            }
        };
        let all: Vec<MessageRef> = (0..self.pending.outputs.len())
            .map(MessageRef::Output)
            .chain((0..self.pending.dead.len()).map(MessageRef::DeadLetter))
            .collect();
        let result = self.deliver(all, &stop).await;
        let result = match result {
            Ok(()) => self.commit(next_offset, &stop).await,
            Err(halt) => Err(halt),
        };
        self.ctx
            .progress
            .set_retrying(&self.id.topic, self.id.partition, None);
        let (rows, checkpoint_bytes) = match result {
            Ok(done) => done,
            Err(halt) => {
                if let Halt::Fenced = halt {
                    metrics::counter!(tm::FENCED_BATCHES_TOTAL, "topic" => self.id.topic.clone())
                        .increment(1);
                }
                return Err(halt);
            }
        };
        let topic = self.id.topic.clone();
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
        self.record_batch_metrics(&topic, rows, checkpoint_bytes);
        self.pending = Pending::default();
        Ok(())
    }

    /// Metrics and `/status` of a batch that just became durable (counted per batch).
    fn record_batch_metrics(&mut self, topic: &str, rows: u64, checkpoint_bytes: usize) {
        let p = &self.pending;
        let m = &mut self.metrics;
        let now = wall_clock_ms();
        for ts in &p.timestamps {
            m.end_to_end.record((now - ts).max(0) as f64 / 1e3);
        }
        m.consumed.increment(p.consumed);
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
        self.ctx.progress.record_status(
            topic,
            self.id.partition,
            tm::StatusUpdate {
                algorithm_status: status,
                drift_at,
                points_per_second: rate,
                processing_latency_ms: m.quantiles_ms(),
            },
        );
    }

    /// Produces `which` until every one is acknowledged. Retriable failures back off; a message
    /// Kafka refuses for good is diverted (a dead letter truncated, an output dead-lettered); a
    /// destination that refuses everything is retried with the partition reported as stalled.
    async fn deliver(
        &mut self,
        mut which: Vec<MessageRef>,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        let topic = self.id.topic.clone();
        let mut backoff = Backoff::new(self.ctx.config.postgres.retry_max_backoff_ms);
        loop {
            self.ctx.progress.set_retrying(
                &topic,
                self.id.partition,
                Some("producing the batch to Kafka".into()),
            );
            let report = self
                .ctx
                .producer
                .send(
                    &topic,
                    self.id.partition,
                    &self.pending.outputs,
                    &self.pending.dead,
                    &which,
                )
                .await;
            if report.is_complete() {
                return Ok(());
            }
            which.clear();
            let mut wait = None;
            for (m, err) in report.failed {
                match (classify(&err), m) {
                    (FailureClass::Fatal, _) => {
                        self.ctx.fatal.raise(format!(
                            "the Kafka producer failed for good and must be recreated: {err}"
                        ));
                        return Err(Halt::Fatal);
                    }
                    (FailureClass::Message, MessageRef::DeadLetter(i)) => {
                        let dead = &self.pending.dead[i];
                        match dead.shrink() {
                            Some(smaller) => {
                                warn!(offset = dead.offset, error = %err, "dead letter refused by Kafka; sending it smaller");
                                metrics::counter!(tm::PRODUCE_DIVERTED_TOTAL, "topic" => topic.clone(), "reason" => "dead_letter_truncated").increment(1);
                                self.pending.dead[i] = smaller;
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
                        let emitted = &self.pending.outputs[i];
                        warn!(source_offset = emitted.source_offset, error = %err, "output refused by Kafka; sending it to the dead-letter topic");
                        metrics::counter!(tm::PRODUCE_DIVERTED_TOTAL, "topic" => topic.clone(), "reason" => "output_dead_lettered").increment(1);
                        self.pending.dead.push(DeadLetter::new(
                            Some(emitted.output.key().into_bytes()),
                            Some(emitted.output.to_json()),
                            "output_rejected",
                            format!(
                                "Kafka refused this {} output: {err}",
                                emitted.output.type_name()
                            ),
                            emitted.source_offset,
                        ));
                        which.push(MessageRef::DeadLetter(self.pending.dead.len() - 1));
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
                tokio::select! {
                    _ = stop.cancelled() => return Err(Halt::Stopped),
                    _ = backoff.wait() => {}
                }
            }
        }
    }

    /// Commits the batch and its checkpoint; rows PostgreSQL refuses are dead-lettered first
    /// and the batch is committed without them. Returns the rows written.
    async fn commit(
        &mut self,
        next_offset: i64,
        stop: &CancellationToken,
    ) -> Result<(u64, usize), Halt> {
        let checkpoint = Checkpoint {
            next_offset,
            state: self.processor.snapshot(),
        };
        let mut backoff = Backoff::new(self.ctx.config.postgres.retry_max_backoff_ms);
        loop {
            let batch = Batch {
                id: &self.id,
                epoch: self.epoch,
                outputs: &self.pending.outputs,
                checkpoint: &checkpoint,
            };
            let started = std::time::Instant::now();
            self.ctx.progress.set_retrying(
                &self.id.topic,
                self.id.partition,
                Some("committing the batch to PostgreSQL".into()),
            );
            let timeout = Duration::from_millis(self.ctx.config.postgres.commit_timeout_ms);
            let result = match tokio::time::timeout(timeout, self.ctx.store.commit(&batch)).await {
                Ok(result) => result,
                // Dropping the transaction rolls it back (the connection is closed).
                Err(_) => Err(StoreError::TimedOut),
            };
            match result {
                Ok(rows) => {
                    let elapsed = started.elapsed();
                    metrics::histogram!(tm::SINK_COMMIT_SECONDS).record(elapsed.as_secs_f64());
                    self.ctx.progress.record_sink_time(elapsed);
                    return Ok((rows, checkpoint.state.len()));
                }
                Err(StoreError::Rejected(rows)) => {
                    let topic = self.id.topic.clone();
                    metrics::counter!(tm::SINK_REJECTED_ROWS_TOTAL, "topic" => topic)
                        .increment(rows.len() as u64);
                    let first = self.pending.dead.len();
                    for row in &rows {
                        let emitted = &self.pending.outputs[row.index];
                        warn!(source_offset = emitted.source_offset, reason = %row.reason, "PostgreSQL refused an output row; dead-lettering it");
                        self.pending.dead.push(DeadLetter::new(
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
                    let new: Vec<MessageRef> = (first..self.pending.dead.len())
                        .map(MessageRef::DeadLetter)
                        .collect();
                    self.deliver(new, stop).await?;
                    let refused: std::collections::HashSet<usize> =
                        rows.iter().map(|r| r.index).collect();
                    let mut index = 0;
                    self.pending.outputs.retain(|_| {
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

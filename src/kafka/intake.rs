//! Consumption: the consumer group, its rebalances, and dispatch to partition workers.
//!
//! The consumer is polled on one dedicated thread. Rebalance callbacks run on that thread and
//! block until the partitions are set up (checkpoints read, workers spawned, positions set) or
//! drained (workers stopped, batches flushed and checkpointed, offsets committed), within
//! `revoke_deadline_ms`. Each message goes to its partition's bounded queue; when a queue is
//! full the partition is paused and the message held until the worker catches up, so a slow
//! sink stops fetching instead of growing memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::{ClientSetting, Config};
use crate::kafka::client_log::ClientLog;
use crate::kafka::producer::OutputProducer;
use crate::offsets::{self, Delivery, Inbound, OffsetStore, Offsets};
use crate::store::{Checkpoint, Epoch, PartitionId, Store};
use crate::telemetry::{self as tm, Progress};
use crate::worker::{Fatal, PartitionWorker, Start, WorkerContext};

/// The consumer type of the service.
pub type IntakeConsumer = BaseConsumer<IntakeContext>;

type TopicPartition = (String, i32);

struct WorkerHandle {
    deliveries_tx: mpsc::Sender<Delivery>,
    /// Bytes in the queue (see [`WorkerContext::queued_bytes`]).
    queued_bytes: Arc<AtomicUsize>,
    stop: CancellationToken,
    join: JoinHandle<()>,
}

/// Shared pieces every worker gets.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The service configuration.
    pub config: Arc<Config>,
    /// Outputs and checkpoints.
    pub store: Store,
    /// Output producer.
    pub producer: OutputProducer,
    /// Counters.
    pub progress: Arc<Progress>,
    /// Service-stopping condition.
    pub fatal: Fatal,
    /// Input and output formats.
    pub codecs: crate::avro::Codecs,
}

/// Consumer context: owns the partition workers and serves rebalances.
pub struct IntakeContext {
    consumer: OnceLock<Weak<IntakeConsumer>>,
    runtime: tokio::runtime::Handle,
    shared: Shared,
    workers: Mutex<HashMap<TopicPartition, WorkerHandle>>,
    /// Deliveries held for paused partitions, in order.
    held: Mutex<HashMap<TopicPartition, VecDeque<Delivery>>>,
    /// Partitions whose workers asked to be positioned ([`OffsetStore::start_at`]).
    start_requests: Mutex<Vec<(TopicPartition, Option<i64>)>>,
    /// Client log lines and consumer errors, rate-limited.
    log: ClientLog,
}

impl OffsetStore for IntakeConsumer {
    fn store(&self, topic: &str, partition: i32, next_offset: i64) -> Result<(), String> {
        offsets::store_exact(self, topic, partition, next_offset)
    }

    fn start_at(&self, topic: &str, partition: i32, next_offset: Option<i64>) {
        self.context()
            .start_requests
            .lock()
            .expect("start-request lock is never poisoned: no code panics while holding it")
            .push(((topic.to_string(), partition), next_offset));
    }
}

impl ClientContext for IntakeContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.log.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }

    /// High watermarks for `/ready` and the lag gauge (`statistics.interval.ms`).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let progress = &self.shared.progress;
        for (name, topic) in &statistics.topics {
            for (partition, p) in &topic.partitions {
                // -1 is librdkafka's internal "unassigned" partition.
                if *partition >= 0 && p.hi_offset >= 0 {
                    progress.set_high_watermark(name, *partition, p.hi_offset);
                }
            }
        }
        for (name, status) in progress.snapshot().partitions {
            if let (true, Some(lag)) = (status.assigned, status.lag) {
                let (topic, partition) = name.rsplit_once('/').unwrap_or((&name, ""));
                metrics::gauge!(tm::CONSUMER_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
                    .set(lag as f64);
            }
        }
        for (topic, partition, age) in progress.batch_ages() {
            metrics::gauge!(tm::BATCH_RETRYING_SECONDS, "topic" => topic, "partition" => partition.to_string())
                .set(age);
        }
    }
}

impl ConsumerContext for IntakeContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                error!(error = ?other, "rebalance failed; releasing all partitions");
                let all: Vec<_> = self.lock_workers().keys().cloned().collect();
                self.drain(consumer, &all);
                let _ = consumer.unassign();
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn single(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

impl IntakeContext {
    fn lock_workers(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, WorkerHandle>> {
        self.workers
            .lock()
            .expect("worker map lock is never poisoned: no code panics while holding it")
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, VecDeque<Delivery>>> {
        self.held
            .lock()
            .expect("held-message lock is never poisoned: no code panics while holding it")
    }

    fn id(&self, tp: &TopicPartition) -> PartitionId {
        PartitionId {
            group_id: self.shared.config.kafka.group_id.clone(),
            topic: tp.0.clone(),
            partition: tp.1,
        }
    }

    fn assign(&self, consumer: &IntakeConsumer, tpl: &mut TopicPartitionList) {
        let parts = partitions(tpl);
        metrics::counter!(tm::REBALANCES_TOTAL, "stage" => "assign").increment(1);
        info!(partitions = ?parts, "partitions assigned");
        // Claim the partitions and read their checkpoints now, so fetching starts exactly at
        // them. A partition PostgreSQL does not answer for quickly is assigned paused; its
        // worker claims it and asks for it to be positioned (see `offsets`).
        let store = self.shared.store.clone();
        let ids: Vec<PartitionId> = parts.iter().map(|tp| self.id(tp)).collect();
        let claims: Vec<Option<(Epoch, Option<Checkpoint>)>> = self.runtime.block_on(async {
            let claims = ids.iter().map(|id| async {
                match tokio::time::timeout(Duration::from_secs(3), store.claim(id)).await {
                    Ok(Ok(claimed)) => Some(claimed),
                    Ok(Err(err)) => {
                        warn!(partition = id.partition, error = %err, "partition not claimed at assignment; its worker retries");
                        None
                    }
                    Err(_) => None,
                }
            });
            futures::future::join_all(claims).await
        });
        let starts: Vec<_> = parts
            .iter()
            .zip(&claims)
            .map(|(tp, c)| {
                let next = c
                    .as_ref()
                    .and_then(|(_, c)| c.as_ref().map(|c| c.next_offset));
                (tp.0.clone(), tp.1, next)
            })
            .collect();
        offsets::start_at_checkpoints(tpl, &starts);
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        if let Err(err) = result {
            error!(error = %err, "assign failed");
            return;
        }
        let weak: Weak<dyn OffsetStore> = match self.consumer.get() {
            Some(c) => c.clone(),
            None => Weak::<IntakeConsumer>::new(),
        };
        let offsets = Offsets::new(weak);
        {
            // Messages held for an earlier owner of these partitions are not the new worker's.
            let mut held = self.lock_held();
            for tp in &parts {
                held.remove(tp);
            }
        }
        let mut workers = self.lock_workers();
        for (tp, claim) in parts.into_iter().zip(claims) {
            if let Some(old) = workers.remove(&tp) {
                // Assigned again without a revoke in between: the old worker's view is stale
                // (and fenced by the new claim).
                old.stop.cancel();
            }
            // NB: librdkafka keeps a partition's pause across unassign and assign
            // (confluentinc/librdkafka#1849): a partition paused by backpressure before a
            // rebalance would stay paused for good. Every assigned partition is set explicitly.
            let (start, paused) = match claim {
                Some((epoch, checkpoint)) => (
                    Start::Claimed { epoch, checkpoint },
                    consumer.resume(&single(&tp)),
                ),
                None => (Start::Unclaimed, consumer.pause(&single(&tp))),
            };
            if let Err(err) = paused {
                warn!(error = %err, "pause/resume at assignment failed");
            }
            let (deliveries_tx, deliveries_rx) =
                mpsc::channel(self.shared.config.kafka.partition_queue_capacity);
            let stop = CancellationToken::new();
            let queued_bytes = Arc::new(AtomicUsize::new(0));
            let ctx = WorkerContext {
                queued_bytes: queued_bytes.clone(),
                config: self.shared.config.clone(),
                store: self.shared.store.clone(),
                producer: self.shared.producer.clone(),
                offsets: offsets.clone(),
                progress: self.shared.progress.clone(),
                fatal: self.shared.fatal.clone(),
                codecs: self.shared.codecs.clone(),
            };
            let span = info_span!("partition", topic = %tp.0, partition = tp.1);
            // A worker that panicked would leave its partition silently stalled (its queue
            // closed, nothing committed): stop the service with the reason instead.
            let (fatal, name) = (self.shared.fatal.clone(), format!("{}/{}", tp.0, tp.1));
            let worker =
                PartitionWorker::run(self.id(&tp), ctx, start, deliveries_rx, stop.clone());
            let join = self.runtime.spawn(
                async move {
                    use futures::FutureExt as _;
                    if let Err(panic) = std::panic::AssertUnwindSafe(worker).catch_unwind().await {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        fatal.raise(format!("the worker of partition {name} panicked: {why}"));
                    }
                }
                .instrument(span),
            );
            self.shared.progress.set_assigned(&tp.0, tp.1, true);
            workers.insert(
                tp,
                WorkerHandle {
                    deliveries_tx,
                    queued_bytes,
                    stop,
                    join,
                },
            );
        }
        metrics::gauge!(tm::ASSIGNED_PARTITIONS).set(workers.len() as f64);
    }

    fn revoke(&self, consumer: &IntakeConsumer, tpl: &mut TopicPartitionList) {
        let parts = partitions(tpl);
        metrics::counter!(tm::REBALANCES_TOTAL, "stage" => "revoke").increment(1);
        info!(partitions = ?parts, lost = consumer.assignment_lost(), "partitions revoked");
        self.drain(consumer, &parts);
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(err) = result {
            warn!(error = %err, "unassign failed");
        }
    }

    /// Stops the workers of `parts`, waits (up to the deadline) for their final flush, commits.
    fn drain(&self, consumer: &IntakeConsumer, parts: &[TopicPartition]) {
        let handles: Vec<(TopicPartition, WorkerHandle)> = {
            let mut held = self.lock_held();
            let mut workers = self.lock_workers();
            parts
                .iter()
                .filter_map(|tp| {
                    held.remove(tp);
                    workers.remove(tp).map(|h| (tp.clone(), h))
                })
                .collect()
        };
        for (_, h) in &handles {
            h.stop.cancel();
        }
        let deadline = Duration::from_millis(self.shared.config.kafka.revoke_deadline_ms);
        let joins = handles.into_iter().map(|(tp, h)| async move {
            let abort = h.join.abort_handle();
            if tokio::time::timeout(deadline, h.join).await.is_err() {
                warn!(topic = %tp.0, partition = tp.1, "worker missed the revoke deadline; its last batch will be replayed by the next owner (fencing keeps it from committing later)");
                metrics::counter!(tm::REVOKE_DEADLINE_MISSES_TOTAL).increment(1);
                abort.abort();
            }
            tp
        });
        let drained = self.runtime.block_on(futures::future::join_all(joins));
        for tp in &drained {
            self.shared.progress.set_assigned(&tp.0, tp.1, false);
            tm::clear_partition(&tp.0, tp.1);
        }
        offsets::commit_now(consumer);
        metrics::gauge!(tm::ASSIGNED_PARTITIONS).set(self.lock_workers().len() as f64);
    }

    /// Hands a message to its worker, or holds it and pauses the partition when the worker's
    /// queue is full.
    fn dispatch(&self, consumer: &IntakeConsumer, topic: &str, partition: i32, msg: Inbound) {
        let tp = (topic.to_string(), partition);
        let mut held = self.lock_held();
        if let Some(queue) = held.get_mut(&tp) {
            queue.push_back(Delivery::Message(msg));
            return;
        }
        let workers = self.lock_workers();
        let Some(worker) = workers.get(&tp) else {
            debug!(topic = %tp.0, partition = tp.1, "message for a partition without a worker; the owner re-reads it");
            return;
        };
        match self.queue(worker, Delivery::Message(msg)) {
            Ok(()) => {}
            Err(TrySendError::Full(delivery)) => {
                if let Err(err) = consumer.pause(&single(&tp)) {
                    warn!(error = %err, "pause failed");
                }
                metrics::counter!(tm::PARTITION_PAUSES_TOTAL).increment(1);
                held.insert(tp, VecDeque::from([delivery]));
            }
            Err(TrySendError::Closed(_)) => {
                // The worker stopped (fenced by a newer owner): fetching on only to drop would
                // spin; the partition stays paused until it is assigned again (assignment
                // resumes explicitly). Nothing of it was stored as consumed, so the owner
                // re-reads this message.
                warn!(topic = %tp.0, partition = tp.1, "the partition's worker has stopped; pausing it until the group reassigns it");
                if let Err(err) = consumer.pause(&single(&tp)) {
                    warn!(error = %err, "pause failed");
                }
            }
        }
    }

    /// Queues `delivery` for `worker`, or hands it back as `Full` when the queue holds
    /// `kafka.partition_queue_capacity` messages or `kafka.partition_queue_bytes` bytes (a
    /// message larger than the budget alone is still queued into an empty queue).
    fn queue(
        &self,
        worker: &WorkerHandle,
        delivery: Delivery,
    ) -> Result<(), TrySendError<Delivery>> {
        let size = match &delivery {
            Delivery::Message(msg) => msg.queued_size(),
            Delivery::Positioned => 0,
        };
        let queued = worker.queued_bytes.load(Ordering::Relaxed);
        if queued > 0 && queued + size > self.shared.config.kafka.partition_queue_bytes {
            return Err(TrySendError::Full(delivery));
        }
        // Counted before the send: the worker may receive and subtract it at once.
        worker.queued_bytes.fetch_add(size, Ordering::Relaxed);
        worker.deliveries_tx.try_send(delivery).inspect_err(|_| {
            worker.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        })
    }

    /// Serves workers' requests to position their paused partitions: what was fetched before is
    /// dropped, the partition is sought (on this thread, never the async runtime), and a
    /// [`Delivery::Positioned`] marker is held for the worker; the partition resumes once the
    /// marker is handed over (see [`Self::release_held`]).
    fn serve_start_requests(&self, consumer: &IntakeConsumer) {
        let requests = std::mem::take(
            &mut *self
                .start_requests
                .lock()
                .expect("start-request lock is never poisoned: no code panics while holding it"),
        );
        for (tp, next) in requests {
            if !self.lock_workers().contains_key(&tp) {
                continue;
            }
            if let Some(next) = next {
                if let Err(err) =
                    consumer.seek(&tp.0, tp.1, Offset::Offset(next), Duration::from_secs(5))
                {
                    warn!(topic = %tp.0, partition = tp.1, error = %err, "seek to the checkpoint failed; the worker drops what is below it and reports gaps");
                }
            }
            self.lock_held()
                .insert(tp, VecDeque::from([Delivery::Positioned]));
        }
    }

    /// Feeds held messages to workers that have room again; resumes their partitions.
    /// Returns whether any partition is still held.
    fn release_held(&self, consumer: &IntakeConsumer) -> bool {
        let mut held = self.lock_held();
        if held.is_empty() {
            return false;
        }
        let workers = self.lock_workers();
        held.retain(|tp, queue| {
            let Some(worker) = workers.get(tp) else {
                return false;
            };
            while let Some(delivery) = queue.pop_front() {
                match self.queue(worker, delivery) {
                    Ok(()) => {}
                    Err(TrySendError::Full(delivery)) => {
                        queue.push_front(delivery);
                        return true;
                    }
                    Err(TrySendError::Closed(_)) => return false,
                }
            }
            if let Err(err) = consumer.resume(&single(tp)) {
                warn!(error = %err, "resume failed");
            }
            false
        });
        !held.is_empty()
    }
}

/// A running consumer thread.
pub struct Intake {
    thread: ThreadHandle<()>,
}

impl Intake {
    /// Creates the consumer, subscribes, and starts polling on a dedicated thread until `stop`.
    ///
    /// # Errors
    /// [`KafkaError`] when the consumer cannot be created or subscribed.
    pub fn start(shared: Shared, stop: CancellationToken) -> Result<Self, KafkaError> {
        let config = shared.config.clone();
        let context = IntakeContext {
            consumer: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
            shared,
            workers: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            start_requests: Mutex::new(Vec::new()),
            log: ClientLog::default(),
        };
        if let Some(warning) = config.fetch_size_warning() {
            warn!("{warning}");
        }
        let consumer: IntakeConsumer = ClientSetting::to_client_config(&config.consumer_settings())
            .create_with_context(context)?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = config
            .kafka
            .input_topics
            .iter()
            .map(String::as_str)
            .collect();
        consumer.subscribe(&topics)?;
        let thread = std::thread::Builder::new()
            .name("neurostream-intake".into())
            .spawn(move || poll_loop(consumer, stop))
            .expect("spawning a thread only fails when the OS is out of resources");
        Ok(Self { thread })
    }

    /// Waits for the thread to finish (after its stop token was cancelled).
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

fn poll_loop(consumer: Arc<IntakeConsumer>, stop: CancellationToken) {
    let ctx = consumer.context();
    ctx.shared.progress.set_running(true);
    // After a message, the next poll does not wait: the fetched backlog is handed over without
    // librdkafka's clock reads for a timeout (one in four per message).
    let mut busy = false;
    while !stop.is_cancelled() {
        ctx.serve_start_requests(&consumer);
        let holding = ctx.release_held(&consumer);
        let timeout = if busy {
            Duration::ZERO
        } else if holding {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        busy = false;
        match consumer.poll(timeout) {
            Some(Ok(msg)) => {
                busy = true;
                let inbound = Inbound::from_message(&msg);
                ctx.dispatch(&consumer, msg.topic(), msg.partition(), inbound);
            }
            Some(Err(err)) => {
                if let Some(held) = ctx.log.admit(&format!("consumer:{err}")) {
                    warn!(error = %err, held_back = held, "consumer error");
                }
            }
            None => {}
        }
    }
    ctx.shared.progress.set_running(false);
    info!("stopping intake: draining partition workers");
    let all: Vec<_> = ctx.lock_workers().keys().cloned().collect();
    ctx.drain(&consumer, &all);
    consumer.unsubscribe();
    // Serve the final revoke so the group learns we left promptly.
    let _ = consumer.poll(Duration::from_millis(100));
    drop(consumer);
}

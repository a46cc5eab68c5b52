//! Consumption: the consumer group, its rebalances, and dispatch to partition workers.
//!
//! The consumer is polled on one dedicated thread. Rebalance callbacks run on that thread and
//! block until the partitions are set up (checkpoints read, workers spawned, positions set) or
//! drained (workers stopped, batches flushed and checkpointed, offsets committed), within
//! `revoke_deadline_ms`. Each message goes to its partition's bounded queue; when a queue is
//! full the partition is paused and the message held until the worker catches up, so a slow
//! sink stops fetching instead of growing memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::{ClientSetting, Config};
use crate::kafka::producer::OutputProducer;
use crate::offsets::{self, Offsets};
use crate::store::{Checkpoint, PartitionId, Store};
use crate::telemetry::{self as tm, Progress};
use crate::worker::{Fatal, PartitionWorker, WorkerContext};

/// The consumer type of the service.
pub type IntakeConsumer = BaseConsumer<IntakeContext>;

type TopicPartition = (String, i32);

struct WorkerHandle {
    messages_tx: mpsc::Sender<OwnedMessage>,
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
}

/// Consumer context: owns the partition workers and serves rebalances.
pub struct IntakeContext {
    consumer: OnceLock<Weak<IntakeConsumer>>,
    runtime: tokio::runtime::Handle,
    shared: Shared,
    workers: Mutex<HashMap<TopicPartition, WorkerHandle>>,
    /// Messages held for paused partitions, in offset order.
    held: Mutex<HashMap<TopicPartition, VecDeque<OwnedMessage>>>,
}

impl ClientContext for IntakeContext {}

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

    fn lock_held(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, VecDeque<OwnedMessage>>> {
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
        // Read checkpoints now so fetching starts exactly at them. If PostgreSQL does not answer
        // quickly, the worker reads its checkpoint itself and skips what it already holds.
        let store = self.shared.store.clone();
        let ids: Vec<PartitionId> = parts.iter().map(|tp| self.id(tp)).collect();
        let loaded: Vec<Option<Option<Checkpoint>>> = self.runtime.block_on(async {
            let loads = ids.iter().map(|id| async {
                match tokio::time::timeout(Duration::from_secs(3), store.load(id)).await {
                    Ok(Ok(c)) => Some(c),
                    Ok(Err(err)) => {
                        warn!(partition = id.partition, error = %err, "checkpoint not read at assignment");
                        None
                    }
                    Err(_) => None,
                }
            });
            futures::future::join_all(loads).await
        });
        let starts: Vec<_> = parts
            .iter()
            .zip(&loaded)
            .map(|(tp, c)| {
                let next = c.as_ref().and_then(|c| c.as_ref().map(|c| c.next_offset));
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
        let offsets = Offsets::new(self.consumer.get().cloned().unwrap_or_default());
        let mut workers = self.lock_workers();
        for (tp, preloaded) in parts.into_iter().zip(loaded) {
            if let Some(old) = workers.remove(&tp) {
                // Assigned again without a revoke in between: the old worker's view is stale.
                old.stop.cancel();
            }
            let (messages_tx, messages_rx) =
                mpsc::channel(self.shared.config.kafka.partition_queue_capacity);
            let stop = CancellationToken::new();
            let ctx = WorkerContext {
                config: self.shared.config.clone(),
                store: self.shared.store.clone(),
                producer: self.shared.producer.clone(),
                offsets: offsets.clone(),
                progress: self.shared.progress.clone(),
                fatal: self.shared.fatal.clone(),
            };
            let span = info_span!("partition", topic = %tp.0, partition = tp.1);
            let join = self.runtime.spawn(
                PartitionWorker::run(self.id(&tp), ctx, preloaded, messages_rx, stop.clone())
                    .instrument(span),
            );
            self.shared.progress.set_assigned(&tp.0, tp.1, true);
            workers.insert(
                tp,
                WorkerHandle {
                    messages_tx,
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
                warn!(topic = %tp.0, partition = tp.1, "worker missed the revoke deadline; its last batch will be replayed by the next owner");
                abort.abort();
            }
            tp
        });
        let drained = self.runtime.block_on(futures::future::join_all(joins));
        for tp in &drained {
            self.shared.progress.set_assigned(&tp.0, tp.1, false);
        }
        offsets::commit_now(consumer);
        metrics::gauge!(tm::ASSIGNED_PARTITIONS).set(self.lock_workers().len() as f64);
    }

    /// Hands a message to its worker, or holds it and pauses the partition when the worker's
    /// queue is full.
    fn dispatch(&self, consumer: &IntakeConsumer, msg: OwnedMessage) {
        let tp = (msg.topic().to_string(), msg.partition());
        let mut held = self.lock_held();
        if let Some(queue) = held.get_mut(&tp) {
            queue.push_back(msg);
            return;
        }
        let workers = self.lock_workers();
        let Some(worker) = workers.get(&tp) else {
            debug!(topic = %tp.0, partition = tp.1, "message for a partition without a worker; the owner re-reads it");
            return;
        };
        match worker.messages_tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                if let Err(err) = consumer.pause(&single(&tp)) {
                    warn!(error = %err, "pause failed");
                }
                metrics::counter!(tm::PARTITION_PAUSES_TOTAL).increment(1);
                held.insert(tp, VecDeque::from([msg]));
            }
            Err(TrySendError::Closed(_)) => {}
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
            while let Some(msg) = queue.pop_front() {
                match worker.messages_tx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(msg)) => {
                        queue.push_front(msg);
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
        };
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
    while !stop.is_cancelled() {
        let holding = ctx.release_held(&consumer);
        let timeout = if holding {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(timeout) {
            Some(Ok(msg)) => ctx.dispatch(&consumer, msg.detach()),
            Some(Err(err)) => warn!(error = %err, "consumer error"),
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

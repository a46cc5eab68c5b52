//! Durable outputs and checkpoints.
//!
//! [`Store::commit`] writes one partition batch in one transaction: the outputs (COPY into a
//! staging table, then one `INSERT … SELECT … ON CONFLICT`) and the partition's checkpoint (state
//! snapshot + next offset). A replayed batch hits primary keys and changes nothing; a checkpoint
//! never moves backwards.
//!
//! Ownership is fenced: a worker [`Store::claim`]s its partition (the owner epoch goes up by one)
//! before it reads the checkpoint, and every batch transaction locks the owner row and commits
//! only while the epoch is still its own. A worker that lost its partition therefore can never
//! commit after the next owner started: the claim waits for a batch in flight, and a batch after
//! the claim is rolled back with [`StoreError::Fenced`].
//!
//! A row PostgreSQL rejects for a data reason never stops the service: the batch is halved under
//! savepoints, down to single rows, to find the rejected rows, which come back as
//! [`StoreError::Rejected`] for the caller to dead-letter before it commits the rest.
//!
//! Without PostgreSQL (the demo's fallback) a [`MemoryStore`] keeps the
//! checkpoints in process and counts the rows it would have written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::str::FromStr as _;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Connection as _;
use sqlx::{PgConnection, Postgres};

use crate::output::{ClusterUpdate, DriftRecord, Emitted, OutlierRecord, Output, WindowAggregate};
use crate::pgcopy::BinaryCopy;
use crate::telemetry as tm;

/// A partition's checkpoint: a full snapshot (the base) and the deltas written after it.
///
/// Read ([`Store::load`], [`Store::claim`]): the base and every delta that follows it, oldest
/// first. Written ([`Store::commit`]): with no deltas, `state` becomes the new base and the old
/// deltas are dropped; with deltas (and an empty `state`), they are appended after the base
/// whose next offset is `base_offset`, which must be the stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The first offset not yet reflected in the state (the base and its deltas).
    pub next_offset: i64,
    /// The processor's full snapshot (empty in a write of deltas).
    pub state: Vec<u8>,
    /// Processor deltas after `state`, oldest first.
    pub deltas: Vec<Vec<u8>>,
    /// The base's own next offset: the deltas name their base by it.
    pub base_offset: i64,
}

impl Checkpoint {
    /// A new base: the full snapshot.
    pub fn full(next_offset: i64, state: Vec<u8>) -> Self {
        Self {
            next_offset,
            state,
            deltas: Vec::new(),
            base_offset: next_offset,
        }
    }

    /// One delta after the base of `base_offset` and the deltas after it.
    pub fn delta(next_offset: i64, base_offset: i64, delta: Vec<u8>) -> Self {
        Self {
            next_offset,
            state: Vec::new(),
            deltas: vec![delta],
            base_offset,
        }
    }

    /// Whether this write extends the chain rather than replacing the base.
    pub fn is_delta(&self) -> bool {
        !self.deltas.is_empty()
    }

    /// Bytes written or read: the base and the deltas.
    pub fn bytes(&self) -> usize {
        self.state.len() + self.deltas.iter().map(Vec::len).sum::<usize>()
    }
}

/// Identity of a partition's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionId {
    /// Consumer group.
    pub group_id: String,
    /// Input topic.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

/// A partition owner's epoch, from [`Store::claim`]; batches of an older epoch are fenced.
pub type Epoch = i64;

/// One batch of a partition: outputs plus the checkpoint that accounts for them.
#[derive(Debug)]
pub struct Batch<'a> {
    /// Whose batch.
    pub id: &'a PartitionId,
    /// The writer's ownership epoch.
    pub epoch: Epoch,
    /// Outputs to store.
    pub outputs: &'a [Emitted],
    /// Checkpoint after this batch.
    pub checkpoint: &'a Checkpoint,
}

/// An output row PostgreSQL refused for a data reason.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRow {
    /// Index of the output in [`Batch::outputs`].
    pub index: usize,
    /// PostgreSQL's message (with its SQLSTATE).
    pub reason: String,
}

/// Store failures, classified by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable or the transaction was interrupted: retry with backoff.
    #[error("PostgreSQL unavailable (will retry): {0}")]
    Retryable(#[source] sqlx::Error),
    /// Schema, permission or configuration problem that retrying cannot fix: stop with this message.
    #[error("PostgreSQL rejected the batch: {0}")]
    Fatal(#[source] sqlx::Error),
    /// Some output rows are data PostgreSQL refuses (nothing was committed): dead-letter them and
    /// commit the batch without them.
    #[error("PostgreSQL refused {} output row(s) of the batch: {}", .0.len(), .0.first().map_or("", |r| r.reason.as_str()))]
    Rejected(Vec<RejectedRow>),
    /// Another worker claimed the partition since this one did (nothing was committed): stop
    /// this worker.
    #[error("partition ownership moved on (epoch {current}, this writer holds {mine}); nothing committed")]
    Fenced {
        /// The writer's epoch.
        mine: Epoch,
        /// The current owner's epoch (0: never claimed).
        current: Epoch,
    },
    /// The transaction took longer than `postgres.commit_timeout_ms` and was abandoned (rolled
    /// back): retry with backoff.
    #[error("PostgreSQL transaction exceeded postgres.commit_timeout_ms; rolled back, will retry")]
    TimedOut,
    /// Migrations failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Retryable(_) | StoreError::TimedOut)
    }
}

/// Whether PostgreSQL refused a value, not the statement: data exceptions (class 22, e.g. a NUL
/// in text, a timestamp out of range), integrity violations (23) and program limits (54, e.g. an
/// index row too large).
fn is_data_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| ["22", "23", "54"].iter().any(|c| code.starts_with(c))),
        _ => false,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        let retryable = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // 08: connection exception, 40: transaction rollback (serialization, deadlock),
                // 53: insufficient resources, 57: operator intervention (shutdown).
                ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c))
            }),
            _ => false,
        };
        if retryable {
            StoreError::Retryable(err)
        } else {
            StoreError::Fatal(err)
        }
    }
}

/// Where batches and checkpoints go.
#[derive(Debug, Clone)]
pub enum Store {
    /// The real thing.
    Postgres(PgStore),
    /// In-process checkpoints only (demo without PostgreSQL, tests of the Kafka side).
    Memory(MemoryStore),
}

impl Store {
    /// The partition's checkpoint, if it has one.
    ///
    /// # Errors
    /// [`StoreError`] when PostgreSQL cannot be read.
    pub async fn load(&self, id: &PartitionId) -> Result<Option<Checkpoint>, StoreError> {
        match self {
            Store::Postgres(pg) => pg.load(id).await,
            Store::Memory(m) => Ok(m.load(id)),
        }
    }

    /// Claims the partition for a new owner (its epoch goes up by one) and reads its checkpoint.
    /// Waits for a batch of the previous owner in flight, so the checkpoint read is the last
    /// one that owner can ever write.
    ///
    /// # Errors
    /// [`StoreError`] when PostgreSQL cannot be written.
    pub async fn claim(&self, id: &PartitionId) -> Result<(Epoch, Option<Checkpoint>), StoreError> {
        match self {
            Store::Postgres(pg) => pg.claim(id).await,
            Store::Memory(m) => Ok(m.claim(id)),
        }
    }

    /// Writes one batch and its checkpoint atomically; returns the output rows written.
    ///
    /// # Errors
    /// [`StoreError`]; nothing of the batch is stored then.
    pub async fn commit(&self, batch: &Batch<'_>) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(pg) => pg.commit(batch).await,
            Store::Memory(m) => m.commit(batch),
        }
    }
}

/// Checkpoints and owner epochs kept in process.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    partitions: Arc<Mutex<HashMap<PartitionId, MemoryPartition>>>,
    rows: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct MemoryPartition {
    epoch: Epoch,
    checkpoint: Option<Checkpoint>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionId, MemoryPartition>> {
        self.partitions
            .lock()
            .expect("checkpoint map lock is never poisoned: no code panics while holding it")
    }

    fn load(&self, id: &PartitionId) -> Option<Checkpoint> {
        self.lock().get(id).and_then(|p| p.checkpoint.clone())
    }

    fn claim(&self, id: &PartitionId) -> (Epoch, Option<Checkpoint>) {
        let mut map = self.lock();
        let p = map.entry(id.clone()).or_default();
        p.epoch += 1;
        (p.epoch, p.checkpoint.clone())
    }

    fn commit(&self, batch: &Batch<'_>) -> Result<u64, StoreError> {
        let mut map = self.lock();
        let p = map.entry(batch.id.clone()).or_default();
        if p.epoch != batch.epoch {
            return Err(StoreError::Fenced {
                mine: batch.epoch,
                current: p.epoch,
            });
        }
        let write = batch.checkpoint;
        match &mut p.checkpoint {
            Some(c) if write.is_delta() => {
                if c.base_offset != write.base_offset {
                    return Err(delta_base_replaced(c.base_offset, write.base_offset));
                }
                if c.next_offset > write.next_offset {
                    return Err(delta_backwards(c.next_offset, write.next_offset));
                }
                c.next_offset = write.next_offset;
                c.deltas.extend(write.deltas.iter().cloned());
            }
            None if write.is_delta() => return Err(delta_without_base()),
            Some(c) if c.next_offset > write.next_offset => {}
            slot => *slot = Some(write.clone()),
        }
        let rows = batch.outputs.len() as u64;
        self.rows.fetch_add(rows, Ordering::Relaxed);
        Ok(rows)
    }

    /// Output rows "written" so far.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
}

/// The PostgreSQL sink and checkpoint store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Commits left before the window fast path is tried again (0: try it).
    fast_path: Arc<AtomicU32>,
    /// The longest a batch's transaction may take, and any statement of a batch or of the
    /// search for refused rows (`postgres.commit_timeout_ms`).
    commit_timeout: Duration,
}

const WINDOW_COLUMNS: &str = "source_topic, partition, window_kind, size_ms, slide_ms, key, \
     window_start, window_end, count, sum, mean, std, min, max, is_final, revision, source_offset";
const CLUSTER_UPDATE_COLUMNS: &str = "source_topic, partition, cluster_id, source_offset, event, \
     centroid, weight, radius, quality, drift_coefficient, created_at, updated_at";
const DRIFT_COLUMNS: &str = "source_topic, partition, source_offset, detector, severity, \
     affected_clusters, statistic, recommendation, detected_at";
const OUTLIER_COLUMNS: &str =
    "source_topic, partition, source_offset, event_id, key, ts, features, outlier_score, reason";

/// COPYs `rows` into a per-connection staging table shaped like `table`, emptied at commit.
async fn stage(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    columns: &str,
    rows: BinaryCopy,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "-- per-connection staging table, emptied at every commit
         CREATE TEMP TABLE IF NOT EXISTS {table}_staging
         (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    ))
    .execute(&mut **tx)
    .await?;
    copy_into(tx, &format!("{table}_staging"), columns, rows).await
}

/// COPYs `rows` (COPY's binary format) into `table`.
async fn copy_into(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    columns: &str,
    rows: BinaryCopy,
) -> Result<(), sqlx::Error> {
    let mut copy = tx
        .copy_in_raw(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;
    Ok(())
}

/// Commits that write every window row through the upsert after a fast-path conflict.
const FAST_PATH_PAUSE: u32 = 64;

/// A unique violation (23505).
fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

impl PgStore {
    /// Connects a pool (lazily: the first batch waits for the database, with retries).
    ///
    /// # Errors
    /// [`StoreError::Fatal`] when the URL cannot be parsed.
    pub fn connect_lazy(url: &str, pool_max: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(StoreError::Fatal)?;
        Ok(Self::connect_lazy_with(options, pool_max))
    }

    /// [`PgStore::connect_lazy`] with options built already (TLS, a separate password).
    pub fn connect_lazy_with(options: PgConnectOptions, pool_max: u32) -> Self {
        // NB: `CREATE TEMP TABLE IF NOT EXISTS` answers every batch with a NOTICE that sqlx
        // logs at INFO; notices carry nothing the service acts on.
        let options = options.options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_max)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Self {
            pool,
            fast_path: Arc::new(AtomicU32::new(0)),
            commit_timeout: Duration::from_secs(60),
        }
    }

    /// The longest a batch's transaction may take before it is abandoned and retried
    /// ([`StoreError::TimedOut`]), and any one statement on the server (60 s unless set).
    #[must_use]
    pub fn with_commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self
    }

    /// The pool, for queries of the caller's own (demo report, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations under `migrations/` (compiled in).
    ///
    /// # Errors
    /// [`StoreError::Migrate`] when a migration fails or the database is unreachable.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    async fn load(&self, id: &PartitionId) -> Result<Option<Checkpoint>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The base and its deltas from one snapshot (a claim reads them under the owner lock).
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let checkpoint = read_checkpoint(&mut tx, id).await?;
        tx.commit().await?;
        Ok(checkpoint)
    }

    async fn claim(&self, id: &PartitionId) -> Result<(Epoch, Option<Checkpoint>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let (epoch,): (Epoch,) = sqlx::query_as(
            "-- claim the partition: the owner epoch goes up by one (waits for a batch in flight)
             INSERT INTO partition_owners (group_id, source_topic, partition, epoch)
             VALUES ($1, $2, $3, 1)
             ON CONFLICT (group_id, source_topic, partition) DO UPDATE
             SET epoch = partition_owners.epoch + 1, claimed_at = now()
             RETURNING epoch",
        )
        .bind(&id.group_id)
        .bind(&id.topic)
        .bind(id.partition)
        .fetch_one(&mut *tx)
        .await?;
        // The checkpoint the previous owner left.
        let checkpoint = read_checkpoint(&mut tx, id).await?;
        tx.commit().await?;
        Ok((epoch, checkpoint))
    }

    async fn commit(&self, batch: &Batch<'_>) -> Result<u64, StoreError> {
        // The fast window path unless a conflict paused it (one commit fewer to wait).
        let mut fast = self
            .fast_path
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err();
        loop {
            match self.try_commit(batch, fast).await? {
                Some(rows) => return Ok(rows),
                None => {
                    // A window's first emission is already stored (a replay after a lost
                    // commit acknowledgement, or a second group over the same topic): the
                    // batch again through the upsert, and the upsert for a while.
                    fast = false;
                    self.fast_path.store(FAST_PATH_PAUSE, Ordering::Relaxed);
                    metrics::counter!(tm::SINK_FAST_PATH_CONFLICTS_TOTAL).increment(1);
                }
            }
        }
    }

    /// One attempt at [`PgStore::commit`]; `None` when the fast window path met a stored row
    /// (only when `fast`), the transaction rolled back.
    async fn try_commit(&self, batch: &Batch<'_>, fast: bool) -> Result<Option<u64>, StoreError> {
        let mut lease = Lease::acquire(&self.pool).await?;
        let attempt = commit_on(lease.conn(), batch, fast, self.commit_timeout);
        let Ok(attempt) = tokio::time::timeout(self.commit_timeout, attempt).await else {
            // The lease goes unreleased: its connection closes, and the server rolls the
            // transaction back once its statement ends (at the latest after the statement
            // timeout set in the transaction).
            return Err(StoreError::TimedOut);
        };
        // Back to the pool before the row search, which takes a connection of its own (with
        // `pool_max = 1` it would wait for this one for ever).
        lease.release();
        match attempt {
            Ok(rows) => Ok(Some(rows)),
            Err(NotCommitted::FastPathConflict) => Ok(None),
            Err(NotCommitted::RowsRefused) => Err(self.find_rejected(batch).await),
            Err(NotCommitted::Failed(err)) => Err(err),
        }
    }

    /// Names the rows PostgreSQL refuses, in a transaction that is rolled back: the batch is
    /// halved under savepoints, and every half that fails is halved again down to single
    /// rows. A batch of n rows with r refused ones takes about 2 r log2(n / r) + 2 r
    /// attempts (2 n - 2 when every row is refused), where trying each row alone took n
    /// attempts of 6 round trips each (minutes for the 10,000-row batches of the
    /// `throughput` profile). The search has no deadline of its own: each of its statements
    /// has the commit timeout, so it ends, and `/health` reports a partition that waits on it.
    async fn find_rejected(&self, batch: &Batch<'_>) -> StoreError {
        let mut lease = match Lease::acquire(&self.pool).await {
            Ok(lease) => lease,
            Err(err) => return err.into(),
        };
        let attempt = bisect_refused(lease.conn(), batch, self.commit_timeout).await;
        lease.release();
        match attempt {
            Ok(rejected) if !rejected.is_empty() => StoreError::Rejected(rejected),
            // Every part passes alone: the checkpoint or a combination of rows is refused.
            Ok(_) => StoreError::Fatal(sqlx::Error::Protocol(
                "the batch is refused as a whole although each of its rows is accepted".into(),
            )),
            Err(err) => err,
        }
    }
}

/// A pooled connection that goes back to the pool only when the work on it ran to its end.
///
/// A future dropped mid-statement (the commit timeout, a caller that gives up) can leave
/// the connection's protocol out of step: sqlx 0.8 does not count the ReadyForQuery of a COPY
/// cut inside its `finish`, its ping on return passes, and every later statement on that
/// connection would read the reply of the one before (a fence check then sees no owner row
/// and stops the worker as fenced). Dropped without [`Lease::release`], the connection is
/// closed instead, and the server rolls its transaction back.
struct Lease(Option<PoolConnection<Postgres>>);

impl Lease {
    async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self(Some(pool.acquire().await?)))
    }

    fn conn(&mut self) -> &mut PgConnection {
        self.0
            .as_deref_mut()
            .expect("a lease holds its connection until it is released or dropped")
    }

    /// The work ran to its end (committed or failed with a reply): back to the pool.
    fn release(mut self) {
        self.0.take();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Out of the pool and closed with its socket.
            drop(conn.detach());
        }
    }
}

/// Why an attempt on one connection committed nothing (its transaction rolled back).
enum NotCommitted {
    /// The fast window path met a stored row.
    FastPathConflict,
    /// PostgreSQL refused a value: the rows to blame are searched for.
    RowsRefused,
    /// Anything else, classified.
    Failed(StoreError),
}

impl From<StoreError> for NotCommitted {
    fn from(err: StoreError) -> Self {
        NotCommitted::Failed(err)
    }
}

impl From<sqlx::Error> for NotCommitted {
    fn from(err: sqlx::Error) -> Self {
        NotCommitted::Failed(err.into())
    }
}

/// The batch's transaction on `conn`: fence, outputs, checkpoint, commit.
async fn commit_on(
    conn: &mut PgConnection,
    batch: &Batch<'_>,
    fast: bool,
    statement_timeout: Duration,
) -> Result<u64, NotCommitted> {
    let mut tx = conn.begin().await?;
    fence(&mut tx, batch, statement_timeout).await?;
    let rows = match write_outputs(&mut tx, &batch.id.topic, batch.outputs, fast).await {
        Ok(rows) => rows,
        Err(err) if fast && is_unique_violation(&err) => {
            return Err(NotCommitted::FastPathConflict)
        }
        Err(err) if is_data_error(&err) => return Err(NotCommitted::RowsRefused),
        Err(err) => return Err(err.into()),
    };
    write_checkpoint(&mut tx, batch).await?;
    tx.commit().await?;
    Ok(rows)
}

/// The refused rows of `batch`, found by halving it under savepoints in a transaction that is
/// rolled back (see [`PgStore::find_rejected`]); in order.
async fn bisect_refused(
    conn: &mut PgConnection,
    batch: &Batch<'_>,
    statement_timeout: Duration,
) -> Result<Vec<RejectedRow>, StoreError> {
    let mut tx = conn.begin().await?;
    fence(&mut tx, batch, statement_timeout).await?;
    let mut rejected = Vec::new();
    // Parts to try, the last pushed first (so in order); the whole batch failed already.
    let mut parts = Vec::new();
    push_halves(&mut parts, 0, batch.outputs.len());
    while let Some((start, end)) = parts.pop() {
        sqlx::query("SAVEPOINT neurostream_part")
            .execute(&mut *tx)
            .await?;
        let written =
            write_outputs(&mut tx, &batch.id.topic, &batch.outputs[start..end], false).await;
        // Every part is rolled back (this transaction only looks): the staging tables stay
        // empty, so each part is tried alone.
        sqlx::query("ROLLBACK TO SAVEPOINT neurostream_part")
            .execute(&mut *tx)
            .await?;
        match written {
            Ok(_) => {}
            Err(err) if is_data_error(&err) => {
                if end - start == 1 {
                    rejected.push(RejectedRow {
                        index: start,
                        reason: err.to_string(),
                    });
                } else {
                    push_halves(&mut parts, start, end);
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    tx.rollback().await?;
    Ok(rejected)
}

/// Pushes the halves of `start..end` to be tried left first (the whole when it is one row).
fn push_halves(parts: &mut Vec<(usize, usize)>, start: usize, end: usize) {
    if end - start > 1 {
        let mid = start + (end - start) / 2;
        parts.push((mid, end));
        parts.push((start, mid));
    } else {
        parts.push((start, end));
    }
}

/// Locks the partition's owner row for the transaction and checks the writer still owns it;
/// the transaction's later statements get `statement_timeout` on the server (in the same
/// round trip), so a transaction whose client gave up and closed the connection does not
/// hold the owner row's lock for longer than that.
async fn fence(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &Batch<'_>,
    statement_timeout: Duration,
) -> Result<(), StoreError> {
    let current: Option<(Epoch, String)> = sqlx::query_as(
        "-- fencing: lock the owner row; only the current owner may commit
         SELECT epoch, set_config('statement_timeout', $4, true) FROM partition_owners
         WHERE group_id = $1 AND source_topic = $2 AND partition = $3
         FOR UPDATE",
    )
    .bind(&batch.id.group_id)
    .bind(&batch.id.topic)
    .bind(batch.id.partition)
    .bind(statement_timeout.as_millis().max(1).to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let current = current.map_or(0, |(e, _)| e);
    if current == batch.epoch {
        Ok(())
    } else {
        Err(StoreError::Fenced {
            mine: batch.epoch,
            current,
        })
    }
}

/// Writes outputs (COPY → staging → upsert); returns the rows inserted or changed. `fast`:
/// the first emission of a window (revision 0: nothing of it was ever committed, as the
/// checkpoint commits with the rows) is COPYed straight into `window_aggregates`, half the
/// cost of staging and upserting it; a row that is there after all fails the statement with
/// a unique violation, and the caller writes the batch again without `fast`.
async fn write_outputs(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    topic: &str,
    outputs: &[Emitted],
    fast: bool,
) -> Result<u64, sqlx::Error> {
    let (mut windows, mut fresh, mut clusters, mut drifts, mut outliers) = (
        BinaryCopy::new(),
        BinaryCopy::new(),
        BinaryCopy::new(),
        BinaryCopy::new(),
        BinaryCopy::new(),
    );
    let latest = latest_window_rows(outputs);
    for (i, e) in outputs.iter().enumerate() {
        match &e.output {
            Output::WindowAggregate(w) if latest[i] => {
                let out = if fast && w.revision == 0 {
                    &mut fresh
                } else {
                    &mut windows
                };
                copy_window_row(out, topic, w, e.source_offset)
            }
            Output::WindowAggregate(_) => {}
            Output::ClusterUpdate(c) => copy_cluster_row(&mut clusters, topic, c, e.source_offset),
            Output::DriftDetection(d) => copy_drift_row(&mut drifts, topic, d, e.source_offset),
            Output::Outlier(o) => copy_outlier_row(&mut outliers, topic, o),
            // Status is a Kafka-only heartbeat.
            Output::AlgorithmStatus(_) => {}
        }
    }
    let mut rows = 0;
    if fresh.rows() > 0 {
        rows += fresh.rows() as u64;
        copy_into(tx, "window_aggregates", WINDOW_COLUMNS, fresh).await?;
    }
    if windows.rows() > 0 {
        stage(tx, "window_aggregates", WINDOW_COLUMNS, windows).await?;
        rows += sqlx::query(&format!(
            "-- upsert: a higher revision, or the final of the same revision, replaces the row;
             -- a replay (same revision and finality) changes nothing; the batch holds one row
             -- per window already (its latest), so no sort here
             INSERT INTO window_aggregates ({WINDOW_COLUMNS})
             SELECT {WINDOW_COLUMNS} FROM window_aggregates_staging
             ON CONFLICT (source_topic, partition, window_kind, size_ms, slide_ms, key, window_start)
             DO UPDATE SET window_end = excluded.window_end, count = excluded.count,
                 sum = excluded.sum, mean = excluded.mean, std = excluded.std,
                 min = excluded.min, max = excluded.max, is_final = excluded.is_final,
                 revision = excluded.revision, source_offset = excluded.source_offset,
                 updated_at = now()
             WHERE (window_aggregates.revision, window_aggregates.is_final)
                 < (excluded.revision, excluded.is_final)"
        ))
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    if clusters.rows() > 0 {
        stage(tx, "cluster_updates", CLUSTER_UPDATE_COLUMNS, clusters).await?;
        rows += sqlx::query(&format!(
            "-- cluster history: one row per (cluster, source offset, event); replays do nothing
             INSERT INTO cluster_updates ({CLUSTER_UPDATE_COLUMNS})
             SELECT {CLUSTER_UPDATE_COLUMNS} FROM cluster_updates_staging
             ON CONFLICT DO NOTHING"
        ))
        .execute(&mut **tx)
        .await?
        .rows_affected();
        sqlx::query(
            "-- latest state per cluster; never replaced by an older source offset
             INSERT INTO clusters (source_topic, partition, cluster_id, centroid, weight, radius,
                                   quality, drift_coefficient, status, created_at, updated_at,
                                   source_offset)
             SELECT DISTINCT ON (source_topic, partition, cluster_id)
                    source_topic, partition, cluster_id, centroid, weight, radius, quality,
                    drift_coefficient,
                    CASE WHEN event = 'evicted' THEN 'evicted' ELSE 'active' END,
                    created_at, updated_at, source_offset
             FROM cluster_updates_staging
             ORDER BY source_topic, partition, cluster_id, source_offset DESC, (event = 'evicted') DESC
             ON CONFLICT (source_topic, partition, cluster_id) DO UPDATE
             SET centroid = excluded.centroid, weight = excluded.weight, radius = excluded.radius,
                 quality = excluded.quality, drift_coefficient = excluded.drift_coefficient,
                 status = excluded.status, updated_at = excluded.updated_at,
                 source_offset = excluded.source_offset
             WHERE clusters.source_offset <= excluded.source_offset",
        )
        .execute(&mut **tx)
        .await?;
    }
    if drifts.rows() > 0 {
        stage(tx, "drift_alerts", DRIFT_COLUMNS, drifts).await?;
        rows += sqlx::query(&format!(
            "-- drift alarms, keyed by source offset and detector; replays do nothing
             INSERT INTO drift_alerts ({DRIFT_COLUMNS})
             SELECT {DRIFT_COLUMNS} FROM drift_alerts_staging ON CONFLICT DO NOTHING"
        ))
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    if outliers.rows() > 0 {
        stage(tx, "outliers", OUTLIER_COLUMNS, outliers).await?;
        rows += sqlx::query(&format!(
            "-- outliers, keyed by source offset; replays do nothing
             INSERT INTO outliers ({OUTLIER_COLUMNS})
             SELECT {OUTLIER_COLUMNS} FROM outliers_staging ON CONFLICT DO NOTHING"
        ))
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    Ok(rows)
}

/// Which outputs are the window rows to write: of the emissions of one window in a batch (its
/// updates, then its final) only the latest (highest revision, final first), as the upsert
/// would keep; one statement cannot update a row twice.
fn latest_window_rows(outputs: &[Emitted]) -> Vec<bool> {
    let mut keep = vec![false; outputs.len()];
    // Per batch and keyed by event keys: foldhash's per-process random seed, at a fraction of
    // SipHash's cost on these short keys.
    let mut by_window: HashMap<(i32, &str, u64, u64, &str, i64), usize, _> =
        HashMap::with_capacity_and_hasher(outputs.len(), foldhash::fast::RandomState::default());
    for (i, e) in outputs.iter().enumerate() {
        let Output::WindowAggregate(w) = &e.output else {
            continue;
        };
        let window = (
            w.partition,
            w.window.as_str(),
            w.size_ms,
            w.slide_ms,
            w.key.as_str(),
            w.window_start,
        );
        let rank = |w: &WindowAggregate| (w.revision, w.is_final);
        match by_window.entry(window) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
                keep[i] = true;
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let Output::WindowAggregate(kept) = &outputs[*o.get()].output else {
                    unreachable!("only window rows are indexed");
                };
                if rank(w) > rank(kept) {
                    keep[*o.get()] = false;
                    keep[i] = true;
                    o.insert(i);
                }
            }
        }
    }
    keep
}

/// The error of a delta written before any base: a bug of the caller, not data.
fn delta_without_base() -> StoreError {
    StoreError::Fatal(sqlx::Error::Protocol(
        "a checkpoint delta was written before any full checkpoint of the partition".into(),
    ))
}

/// The error of a delta whose base is no longer the stored one (another writer replaced it).
fn delta_base_replaced(stored: i64, named: i64) -> StoreError {
    StoreError::Fatal(sqlx::Error::Protocol(format!(
        "a checkpoint delta follows the base at offset {named}, but the stored base is at {stored}"
    )))
}

/// The error of a delta behind the partition's latest checkpoint.
fn delta_backwards(head: i64, next: i64) -> StoreError {
    StoreError::Fatal(sqlx::Error::Protocol(format!(
        "a checkpoint delta at offset {next} would move the checkpoint back from {head}"
    )))
}

/// The partition's base checkpoint and its deltas, oldest first.
async fn read_checkpoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &PartitionId,
) -> Result<Option<Checkpoint>, StoreError> {
    let row: Option<(i64, Vec<u8>)> = sqlx::query_as(
        "-- the partition's base checkpoint
         SELECT next_offset, state FROM partition_checkpoints
         WHERE group_id = $1 AND source_topic = $2 AND partition = $3",
    )
    .bind(&id.group_id)
    .bind(&id.topic)
    .bind(id.partition)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((base_offset, state)) = row else {
        return Ok(None);
    };
    let deltas: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "-- the deltas after this base (not those of a base another binary replaced), in the
         -- order they were written
         SELECT next_offset, delta FROM partition_checkpoint_deltas
         WHERE group_id = $1 AND source_topic = $2 AND partition = $3 AND base_offset = $4
         ORDER BY seq",
    )
    .bind(&id.group_id)
    .bind(&id.topic)
    .bind(id.partition)
    .bind(base_offset)
    .fetch_all(&mut **tx)
    .await?;
    Ok(Some(Checkpoint {
        next_offset: deltas.last().map_or(base_offset, |(next, _)| *next),
        state,
        deltas: deltas.into_iter().map(|(_, d)| d).collect(),
        base_offset,
    }))
}

/// Writes the partition's checkpoint: a new base (dropping the deltas of the old one), or
/// deltas after the current base. It never moves backwards.
async fn write_checkpoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &Batch<'_>,
) -> Result<(), StoreError> {
    let (id, checkpoint) = (batch.id, batch.checkpoint);
    if checkpoint.is_delta() {
        // The owner row is locked (fencing): the chain cannot change under this transaction.
        let base: Option<(i64,)> = sqlx::query_as(
            "SELECT next_offset FROM partition_checkpoints
             WHERE group_id = $1 AND source_topic = $2 AND partition = $3",
        )
        .bind(&id.group_id)
        .bind(&id.topic)
        .bind(id.partition)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((base,)) = base else {
            return Err(delta_without_base());
        };
        if base != checkpoint.base_offset {
            return Err(delta_base_replaced(base, checkpoint.base_offset));
        }
        let (head, seq): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT max(next_offset) FILTER (WHERE base_offset = $4), max(seq)
             FROM partition_checkpoint_deltas
             WHERE group_id = $1 AND source_topic = $2 AND partition = $3",
        )
        .bind(&id.group_id)
        .bind(&id.topic)
        .bind(id.partition)
        .bind(base)
        .fetch_one(&mut **tx)
        .await?;
        let head = head.unwrap_or(base);
        if checkpoint.next_offset < head {
            return Err(delta_backwards(head, checkpoint.next_offset));
        }
        for (i, delta) in checkpoint.deltas.iter().enumerate() {
            sqlx::query(
                "-- one delta after its base and the deltas before it
                 INSERT INTO partition_checkpoint_deltas
                     (group_id, source_topic, partition, seq, base_offset, next_offset, delta)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&id.group_id)
            .bind(&id.topic)
            .bind(id.partition)
            .bind(seq.unwrap_or(0) + 1 + i as i64)
            .bind(base)
            .bind(checkpoint.next_offset)
            .bind(delta)
            .execute(&mut **tx)
            .await?;
        }
        return Ok(());
    }
    let written = sqlx::query(
        "-- the partition's checkpoint, in the same transaction; never moves backwards
         INSERT INTO partition_checkpoints (group_id, source_topic, partition, next_offset, state)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (group_id, source_topic, partition) DO UPDATE
         SET next_offset = excluded.next_offset, state = excluded.state, updated_at = now()
         WHERE partition_checkpoints.next_offset <= excluded.next_offset
           -- nor behind the deltas of the current base
           AND NOT EXISTS (
               SELECT 1 FROM partition_checkpoint_deltas d
               WHERE d.group_id = excluded.group_id AND d.source_topic = excluded.source_topic
                 AND d.partition = excluded.partition
                 AND d.base_offset = partition_checkpoints.next_offset
                 AND d.next_offset > excluded.next_offset)",
    )
    .bind(&batch.id.group_id)
    .bind(&batch.id.topic)
    .bind(batch.id.partition)
    .bind(checkpoint.next_offset)
    .bind(&checkpoint.state)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if written > 0 {
        sqlx::query(
            "-- a new base: the deltas of the old one are folded into it
             DELETE FROM partition_checkpoint_deltas
             WHERE group_id = $1 AND source_topic = $2 AND partition = $3",
        )
        .bind(&id.group_id)
        .bind(&id.topic)
        .bind(id.partition)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn copy_window_row(out: &mut BinaryCopy, topic: &str, w: &WindowAggregate, offset: i64) {
    // WINDOW_COLUMNS, in order.
    out.row(17);
    out.text(topic);
    out.int4(w.partition);
    out.text(w.window.as_str());
    out.int8(w.size_ms);
    out.int8(w.slide_ms);
    out.text(&w.key);
    out.timestamptz(w.window_start);
    out.timestamptz(w.window_end);
    out.int8(w.count);
    out.float8(w.sum);
    for x in [w.mean, w.std, w.min, w.max] {
        out.opt_float8(x);
    }
    out.bool(w.is_final);
    out.int4(w.revision);
    out.int8(offset);
}

fn copy_cluster_row(out: &mut BinaryCopy, topic: &str, c: &ClusterUpdate, offset: i64) {
    // CLUSTER_UPDATE_COLUMNS, in order.
    out.row(12);
    out.text(topic);
    out.int4(c.partition);
    out.int8(c.cluster_id);
    out.int8(offset);
    out.text(&c.event);
    out.float8_array(&c.centroid);
    for x in [c.weight, c.radius, c.quality, c.drift_coefficient] {
        out.float8(x);
    }
    out.timestamptz(c.created_at);
    out.timestamptz(c.updated_at);
}

fn copy_drift_row(out: &mut BinaryCopy, topic: &str, d: &DriftRecord, offset: i64) {
    // DRIFT_COLUMNS, in order.
    out.row(9);
    out.text(topic);
    out.int4(d.partition);
    out.int8(offset);
    out.text(&d.detector);
    out.text(&d.severity);
    out.int8_array(&d.affected_clusters);
    out.float8(d.statistic);
    out.text(&d.recommendation);
    out.timestamptz(d.detected_at);
}

fn copy_outlier_row(out: &mut BinaryCopy, topic: &str, o: &OutlierRecord) {
    // OUTLIER_COLUMNS, in order.
    out.row(9);
    out.text(topic);
    out.int4(o.partition);
    out.int8(o.offset);
    out.opt_text(o.id.as_deref());
    out.text(&o.key);
    out.timestamptz(o.ts);
    out.float8_array(&o.features);
    out.float8(o.outlier_score);
    out.text(&o.reason);
}

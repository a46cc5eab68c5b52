//! State at scale: one partition's processor holding 1,000,000 distinct keys with open windows
//! (a 60 s tumbling window, clustering off, as a per-key aggregation job would run), measured
//! for memory per key, checkpoint (snapshot) bytes and time (the copy the worker waits for, and
//! its encoding beside the worker), and restore time; then for the
//! deltas the worker writes instead while they stay smaller than the base: 100 batches of 1,000
//! events over existing keys, each followed by a delta, and the restore of base + 100 deltas.
//!
//! Last, the base goes through a private PostgreSQL (fsync on) as a worker's does: committed
//! with a batch, then read back by a claim and restored, the whole restore a new owner does.
//!
//! `cargo bench --bench state [-- KEYS]` prints one table row; it is a measurement, not a
//! criterion benchmark (each step runs once on a state far too large to repeat cheaply).

use std::time::Instant;

/// The service's allocator (`src/main.rs`), so the times are the service's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use neurostream::config::{ProcessingConfig, WindowConfig, WindowKind};
use neurostream::event::Event;
use neurostream::pgserver::{Durability, PgServer};
use neurostream::processor::Processor;
use neurostream::store::{Batch, Checkpoint, PartitionId, PgStore, Store};

/// Resident set size of this process, bytes (Linux `/proc/self/statm`).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let keys: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut config = ProcessingConfig::default();
    config.clustering.enabled = false;
    config.windows = vec![WindowConfig {
        kind: WindowKind::Tumbling,
        size_ms: 60_000,
        ..WindowConfig::default()
    }];
    config.max_open_windows = keys.max(config.max_open_windows);
    let mut processor = Processor::new(&config, 1 << 20, 0);
    processor.track_changes();
    let before = rss_bytes();
    let started = Instant::now();
    let mut out = Vec::new();
    for i in 0..keys {
        let event = Event {
            key: format!("device-{i:08}"),
            ts_ms: 1_763_866_800_000 + (i % 1_000) as i64,
            features: vec![],
            value: Some((i % 97) as f64),
            id: None,
            metadata: None,
        };
        processor
            .apply(&event, i as i64, &mut out)
            .expect("every event is valid");
        out.clear();
    }
    let applied = started.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    let (held_keys, open) = processor.state_size();
    // As the worker takes a new base: it copies the state (and waits for that), then a blocking
    // thread sorts and serialises the copy while the worker goes on.
    let started = Instant::now();
    let copy = processor.copy_state();
    processor.forget_changes();
    let copy_time = started.elapsed();
    let started = Instant::now();
    let snapshot = copy.encode();
    let encode_time = started.elapsed();
    assert_eq!(
        snapshot,
        processor.snapshot(),
        "a copy encodes as the snapshot"
    );
    let started = Instant::now();
    let restored = Processor::restore(&config, 1 << 20, 0, &snapshot).expect("own snapshot");
    let restore_time = started.elapsed();
    assert_eq!(restored.state_size(), (held_keys, open));
    println!("| keys | open windows | memory per key | snapshot | copy (the worker pauses) | encode (beside it) | restore time | events/s while filling |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {held_keys} | {open} | {:.0} B | {:.1} MB | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} M |",
        grown as f64 / keys as f64,
        snapshot.len() as f64 / 1e6,
        copy_time.as_secs_f64() * 1e3,
        encode_time.as_secs_f64() * 1e3,
        restore_time.as_secs_f64() * 1e3,
        keys as f64 / applied.as_secs_f64() / 1e6,
    );
    drop(restored);

    let (batches, batch) = (100usize, 1_000usize);
    let mut deltas = Vec::with_capacity(batches);
    let mut delta_time = std::time::Duration::ZERO;
    for b in 0..batches {
        for j in 0..batch {
            let n = b * batch + j;
            let event = Event {
                key: format!("device-{:08}", (n * 7_919) % keys),
                ts_ms: 1_763_866_801_000 + (n % 1_000) as i64,
                features: vec![],
                value: Some((n % 89) as f64),
                id: None,
                metadata: None,
            };
            processor
                .apply(&event, (keys + n) as i64, &mut out)
                .expect("every event is valid");
        }
        processor.end_batch(&mut out);
        out.clear();
        let started = Instant::now();
        deltas.push(processor.take_delta());
        delta_time += started.elapsed();
    }
    let started = Instant::now();
    let restored =
        Processor::restore_chain(&config, 1 << 20, 0, &snapshot, &deltas).expect("own chain");
    let chain_time = started.elapsed();
    assert_eq!(
        restored.snapshot(),
        processor.snapshot(),
        "base + deltas = the state"
    );
    let delta_bytes: usize = deltas.iter().map(Vec::len).sum();
    let snapshot_len = snapshot.len();
    println!();
    println!("| delta after a batch of {batch} events | delta time | restore of base + {batches} deltas |");
    println!("|---|---|---|");
    println!(
        "| {:.1} kB | {:.2} ms | {:.0} ms |",
        delta_bytes as f64 / batches as f64 / 1e3,
        delta_time.as_secs_f64() * 1e3 / batches as f64,
        chain_time.as_secs_f64() * 1e3,
    );
    drop(restored);

    println!();
    println!("| base through PostgreSQL | commit (with the checkpoint) | claim + read + restore |");
    println!("|---|---|---|");
    match PgServer::start(Durability::Default) {
        Ok(server) => {
            let (commit, restore) = through_postgres(&server, &config, snapshot, keys);
            println!(
                "| {:.1} MB | {:.0} ms | {:.0} ms |",
                snapshot_len as f64 / 1e6,
                commit.as_secs_f64() * 1e3,
                restore.as_secs_f64() * 1e3,
            );
        }
        Err(err) => println!("| skipped: {err} | | |"),
    }
}

/// Commits `snapshot` as a partition's base, then claims the partition and restores from what
/// the claim read, as a new owner does; the two durations.
fn through_postgres(
    server: &PgServer,
    config: &ProcessingConfig,
    snapshot: Vec<u8>,
    keys: usize,
) -> (std::time::Duration, std::time::Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let pg = PgStore::connect_lazy(&server.url("postgres"), 2).expect("a valid URL");
        pg.migrate().await.expect("migrations apply");
        let store = Store::Postgres(pg);
        let id = PartitionId {
            group_id: "bench".into(),
            topic: "events".into(),
            partition: 0,
        };
        let (epoch, _) = store.claim(&id).await.expect("first claim");
        let checkpoint = Checkpoint::full(keys as i64, snapshot);
        let started = Instant::now();
        let batch = Batch {
            id: &id,
            epoch,
            outputs: &[],
            checkpoint: &checkpoint,
        };
        store.commit(&batch).await.expect("the base commits");
        let commit = started.elapsed();
        let started = Instant::now();
        let (_, read) = store.claim(&id).await.expect("second claim");
        let read = read.expect("the base just committed");
        let restored = Processor::restore_chain(config, 1 << 20, 0, &read.state, &read.deltas)
            .expect("own snapshot");
        let restore = started.elapsed();
        assert_eq!(restored.state_size().0, keys);
        (commit, restore)
    })
}

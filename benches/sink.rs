//! PostgreSQL sink throughput: one partition batch of window rows per transaction
//! (COPY into staging → INSERT … ON CONFLICT → checkpoint), against a private server.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use neurostream::config::WindowKind;
use neurostream::output::{Emitted, Output, WindowAggregate};
use neurostream::pgserver::{Durability, PgServer};
use neurostream::store::{Batch, Checkpoint, PartitionId, PgStore, Store};

const ROWS: usize = 5_000;

/// `ROWS` new windows; revision 0 takes the direct COPY, a later revision the staged upsert.
fn batch(round: i64, revision: u32) -> Vec<Emitted> {
    (0..ROWS)
        .map(|i| Emitted {
            seq: 0,
            source_offset: round,
            output: Output::WindowAggregate(WindowAggregate {
                partition: 0,
                window: WindowKind::Tumbling,
                size_ms: 10_000,
                slide_ms: 10_000,
                window_start: round * 10_000,
                window_end: round * 10_000 + 10_000,
                key: format!("sensor-{i}"),
                count: 42,
                sum: 4.2e3,
                mean: Some(100.0),
                std: Some(3.5),
                min: Some(90.0),
                max: Some(110.0),
                is_final: true,
                revision,
            }),
        })
        .collect()
}

fn bench_sink(c: &mut Criterion) {
    let Ok(server) = PgServer::start(Durability::Default) else {
        eprintln!("SKIPPED: no PostgreSQL server binaries");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = runtime.block_on(async {
        let pg = PgStore::connect_lazy(&server.url("postgres"), 2).expect("url");
        pg.migrate().await.expect("migrations");
        Store::Postgres(pg)
    });
    let id = PartitionId {
        group_id: "bench".into(),
        topic: "events".into(),
        partition: 0,
    };
    let state = vec![0u8; 4_096];
    let (epoch, _) = runtime.block_on(store.claim(&id)).expect("claim");
    let mut round = 0i64;
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    for (name, revision) in [
        ("first_emissions_copy_checkpoint_5000_rows", 0),
        ("revisions_copy_upsert_checkpoint_5000_rows", 1),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                round += 1;
                let outputs = batch(round, revision);
                let checkpoint = Checkpoint::full(round, state.clone());
                runtime
                    .block_on(store.commit(&Batch {
                        id: &id,
                        epoch,
                        outputs: &outputs,
                        checkpoint: &checkpoint,
                    }))
                    .expect("commit")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sink);
criterion_main!(benches);

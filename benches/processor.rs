//! Processor throughput: JSON decode + `ncs` clustering (d = 8) + two tumbling windows, per core
//! (one partition's processor).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use neurostream::config::{ClusteringConfig, ProcessingConfig, WindowConfig};
use neurostream::generator::{Generator, GeneratorConfig};
use neurostream::processor::{Processor, Record};

fn messages(n: usize) -> Vec<Vec<u8>> {
    let mut g = Generator::new(GeneratorConfig {
        dimension: 8,
        ..GeneratorConfig::default()
    });
    (0..n).map(|_| g.next_message().payload).collect()
}

fn two_windows() -> ProcessingConfig {
    ProcessingConfig {
        dimension: None,
        clustering: ClusteringConfig::default(),
        windows: vec![
            WindowConfig {
                size_ms: 10_000,
                grace_ms: 1_000,
                ..WindowConfig::default()
            },
            WindowConfig {
                size_ms: 60_000,
                grace_ms: 1_000,
                ..WindowConfig::default()
            },
        ],
        ..ProcessingConfig::default()
    }
}

fn bench_processor(c: &mut Criterion) {
    const N: usize = 100_000;
    let input = messages(N);
    let config = two_windows();
    let mut group = c.benchmark_group("processor");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(10);
    group.bench_function("json_decode_ncs_d8_plus_2_tumbling_windows", |b| {
        b.iter_batched(
            || Processor::new(&config, 1 << 20, 0),
            |mut p| {
                let mut out = Vec::with_capacity(1024);
                for (i, m) in input.iter().enumerate() {
                    let record = Record {
                        payload: Some(m),
                        key: None,
                        timestamp_ms: None,
                        offset: i as i64,
                    };
                    let _ = p.process(record, &mut out);
                    out.clear();
                }
                p
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    let mut group = c.benchmark_group("checkpoint");
    group.sample_size(10);
    group.bench_function("snapshot_of_open_windows_after_10k_events", |b| {
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        for (i, m) in input.iter().take(10_000).enumerate() {
            let record = Record {
                payload: Some(m),
                key: None,
                timestamp_ms: None,
                offset: i as i64,
            };
            let _ = p.process(record, &mut out);
        }
        b.iter(|| p.snapshot())
    });
    group.finish();
}

criterion_group!(benches, bench_processor);
criterion_main!(benches);

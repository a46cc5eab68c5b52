//! Processor throughput: JSON decode + `ncs` clustering (d = 8) + two tumbling windows, per core
//! (one partition's processor).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use neurostream::config::{ClusteringConfig, ProcessingConfig, WindowConfig};
use neurostream::generator::{Generator, GeneratorConfig};
use neurostream::processor::{Processor, Record};
use std::sync::Arc;

use neurostream::avro::registry::SchemaCache;
use neurostream::avro::{encode_event, frame_confluent, InputDecoder, EVENT_SCHEMA};
use neurostream::event::{decode, decode_with, Limits};

fn messages(n: usize) -> Vec<Vec<u8>> {
    messages_of(n, 8)
}

fn messages_of(n: usize, dimension: usize) -> Vec<Vec<u8>> {
    let mut g = Generator::new(GeneratorConfig {
        dimension,
        ..GeneratorConfig::default()
    });
    (0..n).map(|_| g.next_message().payload).collect()
}

/// The same events in the Confluent Avro wire format (schema id 1 = the event schema), and a
/// decoder whose registry cache holds that schema.
fn avro_of(json: &[Vec<u8>]) -> (Vec<Vec<u8>>, InputDecoder) {
    let limits = Limits::bytes(1 << 20);
    let avro = json
        .iter()
        .map(|m| {
            let event = decode(Some(m), None, None, &limits).expect("generated events decode");
            frame_confluent(1, &encode_event(&event))
        })
        .collect();
    let cache = Arc::new(SchemaCache::new(16));
    cache.insert_schema(1, EVENT_SCHEMA);
    (avro, InputDecoder::Avro(cache))
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
    let (avro, decoder) = avro_of(&input);
    group.bench_function("avro_decode_ncs_d8_plus_2_tumbling_windows", |b| {
        b.iter_batched(
            || {
                let mut p = Processor::new(&config, 1 << 20, 0);
                p.set_input(decoder.clone());
                p
            },
            |mut p| {
                let mut out = Vec::with_capacity(1024);
                for (i, m) in avro.iter().enumerate() {
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

    // Decoding alone, JSON against Avro, at two dimensions.
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    let limits = Limits::bytes(1 << 20);
    for d in [8, 128] {
        let json = messages_of(20_000, d);
        let (avro, decoder) = avro_of(&json);
        group.throughput(Throughput::Elements(json.len() as u64));
        group.bench_function(format!("json_d{d}"), |b| {
            b.iter(|| {
                json.iter()
                    .filter(|m| decode(Some(m), None, None, &limits).is_ok())
                    .count()
            })
        });
        group.bench_function(format!("avro_d{d}"), |b| {
            b.iter(|| {
                avro.iter()
                    .filter(|m| decode_with(&decoder, Some(m), None, None, &limits).is_ok())
                    .count()
            })
        });
    }
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

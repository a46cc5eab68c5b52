//! Window engine throughput per core: tumbling, hopping (size = 4·slide) and sliding windows
//! (about 100 events per window and key), 100 keys, in-order event time.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use neurostream::config::{WindowConfig, WindowKind};
use neurostream::event::Event;
use neurostream::windows::Windower;

const N: usize = 200_000;

fn events() -> Vec<Event> {
    // 100 keys; each key sees an event every 10 ms, so a 1 s window holds 100 of its events.
    (0..N)
        .map(|i| Event {
            key: format!("sensor-{}", i % 100),
            ts_ms: (i / 10) as i64,
            features: vec![],
            value: Some((i % 37) as f64 * 0.5),
            id: None,
            metadata: None,
        })
        .collect()
}

fn bench_windows(c: &mut Criterion) {
    let input = events();
    let mut group = c.benchmark_group("windows");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(10);
    let specs = [
        ("tumbling_1s", WindowKind::Tumbling, None),
        ("hopping_1s_every_250ms", WindowKind::Hopping, Some(250)),
        (
            "sliding_1s_100_events_per_window",
            WindowKind::Sliding,
            None,
        ),
    ];
    for (name, kind, slide_ms) in specs {
        let spec = WindowConfig {
            kind,
            size_ms: 1_000,
            slide_ms,
            ..WindowConfig::default()
        };
        group.bench_function(name, |b| {
            b.iter_batched(
                || Windower::new(spec.clone()),
                |mut w| {
                    let mut out = Vec::with_capacity(4_096);
                    for (i, e) in input.iter().enumerate() {
                        w.apply(e, i as i64, 0, None, &mut out);
                        out.clear();
                    }
                    w
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_windows);
criterion_main!(benches);

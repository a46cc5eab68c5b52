//! Clustering throughput per core: `ncs` and `ncs-v8` at d ∈ {2, 8, 64}, k ∈ {8, 32, 128}.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use neurostream::ncs::corrected::{Ncs, NcsParams};
use neurostream::ncs::v8::{NcsV8, V8Params};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const N: usize = 50_000;

fn blobs(k: usize, d: usize) -> Vec<Vec<f64>> {
    let mut rng = SmallRng::seed_from_u64(9);
    let centres: Vec<Vec<f64>> = (0..k)
        .map(|_| (0..d).map(|_| rng.random_range(-100.0..100.0)).collect())
        .collect();
    let unit = Normal::new(0.0, 1.0).unwrap();
    (0..N)
        .map(|_| {
            let c = &centres[rng.random_range(0..k)];
            c.iter().map(|m| m + unit.sample(&mut rng)).collect()
        })
        .collect()
}

fn bench_ncs(c: &mut Criterion) {
    let mut group = c.benchmark_group("ncs");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(10);
    for d in [2usize, 8, 64] {
        for k in [8usize, 32, 128] {
            let points = blobs(k, d);
            let id = format!("d{d}_k{k}");
            group.bench_with_input(BenchmarkId::new("ncs", &id), &points, |b, points| {
                b.iter_batched(
                    || {
                        // Steady state: clusters already formed.
                        let mut ncs = Ncs::new(
                            NcsParams {
                                max_clusters: k + 8,
                                ..NcsParams::default()
                            },
                            d,
                        );
                        let (mut out, mut alarms) = (Vec::new(), Vec::new());
                        for p in points.iter().take(5_000) {
                            let _ = ncs.process(p, &mut out, &mut alarms);
                        }
                        ncs.drain_events().for_each(drop);
                        ncs
                    },
                    |mut ncs| {
                        let (mut out, mut alarms) = (Vec::with_capacity(4), Vec::new());
                        for (i, p) in points.iter().enumerate() {
                            let _ = ncs.process(p, &mut out, &mut alarms);
                            out.clear();
                            if i % 1024 == 0 {
                                ncs.drain_events().for_each(drop);
                            }
                        }
                        ncs
                    },
                    BatchSize::LargeInput,
                )
            });
            group.bench_with_input(BenchmarkId::new("ncs-v8", &id), &points, |b, points| {
                b.iter_batched(
                    || {
                        NcsV8::new(V8Params {
                            max_clusters: k,
                            ..V8Params::default()
                        })
                    },
                    |mut v8| {
                        for p in points {
                            v8.process(p);
                        }
                        v8
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_ncs);
criterion_main!(benches);

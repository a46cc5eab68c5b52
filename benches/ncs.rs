//! Clustering throughput per core: `ncs` and `ncs-v8` at d ∈ {2, 8, 64}, k ∈ {8, 32, 128};
//! `ncs` at d ∈ {128, 1024}, k = 32; and beside each `ncs` row at k = 32 the cost floor it is
//! judged against, `scan`: one nearest-centroid pass (squared Euclidean over k contiguous
//! centroids, O(k·d) per point, nothing learned).

use std::hint::black_box;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use neurostream::ncs::corrected::{Ncs, NcsParams};
use neurostream::ncs::v8::{NcsV8, V8Params};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Points per measured pass (fewer at high d: 50,000 × 1,024 doubles would be 400 MB).
fn points_for(d: usize) -> usize {
    50_000.min(4_000_000 / d)
}

fn blobs(k: usize, d: usize) -> Vec<Vec<f64>> {
    let mut rng = SmallRng::seed_from_u64(9);
    let centres: Vec<Vec<f64>> = (0..k)
        .map(|_| (0..d).map(|_| rng.random_range(-100.0..100.0)).collect())
        .collect();
    let unit = Normal::new(0.0, 1.0).unwrap();
    (0..points_for(d))
        .map(|_| {
            let c = &centres[rng.random_range(0..k)];
            c.iter().map(|m| m + unit.sample(&mut rng)).collect()
        })
        .collect()
}

/// `ncs` in its steady state: the clusters formed on a first pass (the first 5,000 points, or
/// all of them when there are fewer), then one measured pass over all points.
fn bench_one_ncs(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    k: usize,
    points: &[Vec<f64>],
) {
    let d = points[0].len();
    group.bench_with_input(BenchmarkId::new("ncs", id), points, |b, points| {
        b.iter_batched(
            || {
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
}

/// The O(k·d) floor: the nearest of k contiguous centroids by squared Euclidean distance.
fn bench_scan(group: &mut BenchmarkGroup<'_, WallTime>, id: &str, k: usize, points: &[Vec<f64>]) {
    let d = points[0].len();
    let centroids: Vec<f64> = points.iter().take(k).flatten().copied().collect();
    group.bench_with_input(BenchmarkId::new("scan", id), points, |b, points| {
        b.iter(|| {
            let mut total = 0usize;
            for p in points {
                let (mut best, mut best_d2) = (0, f64::MAX);
                for (j, c) in centroids.chunks_exact(d).enumerate() {
                    let d2: f64 = c.iter().zip(p).map(|(a, b)| (a - b) * (a - b)).sum();
                    if d2 < best_d2 {
                        (best, best_d2) = (j, d2);
                    }
                }
                total += best;
            }
            black_box(total)
        })
    });
}

fn bench_ncs(c: &mut Criterion) {
    let mut group = c.benchmark_group("ncs");
    group.sample_size(10);
    for d in [2usize, 8, 64] {
        for k in [8usize, 32, 128] {
            let points = blobs(k, d);
            group.throughput(Throughput::Elements(points.len() as u64));
            let id = format!("d{d}_k{k}");
            bench_one_ncs(&mut group, &id, k, &points);
            if k == 32 {
                bench_scan(&mut group, &id, k, &points);
            }
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
    for d in [128usize, 1024] {
        let k = 32;
        let points = blobs(k, d);
        group.throughput(Throughput::Elements(points.len() as u64));
        let id = format!("d{d}_k{k}");
        bench_one_ncs(&mut group, &id, k, &points);
        bench_scan(&mut group, &id, k, &points);
    }
    group.finish();
}

criterion_group!(benches, bench_ncs);
criterion_main!(benches);

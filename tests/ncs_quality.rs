//! `ncs` quality with default parameters on seeded, labelled streams of separated Gaussian blobs:
//! ARI (and NMI, reported) against the true labels, including collinear centres, scaled and
//! shifted features, uniform noise, higher dimensions and concept drift. Plus its contracts:
//! scale/translation invariance, stable ids, a point at a centroid is never an outlier,
//! consistent scores, eviction at the cap, typed dimension errors.

use neurostream::ncs::corrected::{Assignment, Ncs, NcsParams};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

struct Stream {
    points: Vec<Vec<f64>>,
    /// True blob, or None for noise.
    labels: Vec<Option<usize>>,
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    seed: u64,
    k: usize,
    d: usize,
    n: usize,
    collinear: bool,
    scale: f64,
    shift: f64,
    noise: f64,
    /// Over the second half, move every centre by this many units per feature, gradually.
    drift: f64,
    /// Move every centre by this many units per feature at once, halfway through.
    jump: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "",
            seed: 1,
            k: 3,
            d: 2,
            n: 3_000,
            collinear: false,
            scale: 1.0,
            shift: 0.0,
            noise: 0.0,
            drift: 0.0,
            jump: 0.0,
        }
    }
}

fn centres(s: &Scenario, rng: &mut SmallRng) -> Vec<Vec<f64>> {
    if s.collinear {
        return (0..s.k).map(|i| vec![10.0 * (i + 1) as f64; s.d]).collect();
    }
    let mut out: Vec<Vec<f64>> = Vec::new();
    while out.len() < s.k {
        let c: Vec<f64> = (0..s.d).map(|_| rng.random_range(-25.0..25.0)).collect();
        let far = out.iter().all(|o| {
            o.iter()
                .zip(&c)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
                >= 10.0
        });
        if far {
            out.push(c);
        }
    }
    out
}

fn stream(s: &Scenario) -> Stream {
    let mut rng = SmallRng::seed_from_u64(s.seed);
    let mut cs = centres(s, &mut rng);
    let unit = Normal::new(0.0, 1.0).unwrap();
    let (lo, hi) = cs
        .iter()
        .flatten()
        .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
    let mut points = Vec::with_capacity(s.n);
    let mut labels = Vec::with_capacity(s.n);
    for i in 0..s.n {
        let step = if i == s.n / 2 { s.jump } else { 0.0 }
            + if i >= s.n / 2 {
                s.drift / (s.n / 2) as f64
            } else {
                0.0
            };
        if step != 0.0 {
            for c in cs.iter_mut() {
                for v in c.iter_mut() {
                    *v += step;
                }
            }
        }
        if rng.random::<f64>() < s.noise {
            points.push(
                (0..s.d)
                    .map(|_| rng.random_range(lo - 5.0..hi + 5.0) * s.scale + s.shift)
                    .collect(),
            );
            labels.push(None);
            continue;
        }
        let b = rng.random_range(0..s.k);
        points.push(
            cs[b]
                .iter()
                .map(|m| (m + unit.sample(&mut rng)) * s.scale + s.shift)
                .collect(),
        );
        labels.push(Some(b));
    }
    Stream { points, labels }
}

fn run(points: &[Vec<f64>]) -> Vec<Assignment> {
    run_counting(points).0
}

fn run_counting(points: &[Vec<f64>]) -> (Vec<Assignment>, usize, usize) {
    let mut ncs = Ncs::new(NcsParams::default(), points[0].len());
    let mut out = Vec::new();
    let mut alarms = Vec::new();
    for p in points {
        ncs.process(p, &mut out, &mut alarms).unwrap();
    }
    ncs.flush_warmup(&mut out, &mut alarms);
    assert_eq!(out.len(), points.len());
    let created = ncs
        .drain_events()
        .filter(|e| e.0 == neurostream::ncs::corrected::ClusterEvent::Created)
        .count();
    let live = ncs.len();
    (out, live, created)
}

fn comb2(n: u64) -> f64 {
    (n * n.saturating_sub(1)) as f64 / 2.0
}

/// ARI and NMI over the points with a true label; predicted outliers form one group.
fn scores(truth: &[Option<usize>], got: &[Assignment]) -> (f64, f64) {
    use std::collections::HashMap;
    let mut table: HashMap<(usize, i64), u64> = HashMap::new();
    let mut a: HashMap<usize, u64> = HashMap::new();
    let mut b: HashMap<i64, u64> = HashMap::new();
    let mut n = 0u64;
    for (t, g) in truth.iter().zip(got) {
        let Some(t) = t else { continue };
        let p = g.cluster_id.map_or(-1, |c| c as i64);
        *table.entry((*t, p)).or_default() += 1;
        *a.entry(*t).or_default() += 1;
        *b.entry(p).or_default() += 1;
        n += 1;
    }
    let index: f64 = table.values().map(|v| comb2(*v)).sum();
    let sa: f64 = a.values().map(|v| comb2(*v)).sum();
    let sb: f64 = b.values().map(|v| comb2(*v)).sum();
    let expected = sa * sb / comb2(n);
    let ari = (index - expected) / (0.5 * (sa + sb) - expected);
    let nf = n as f64;
    let h = |counts: Vec<u64>| -> f64 {
        counts
            .iter()
            .map(|v| {
                let p = *v as f64 / nf;
                -p * p.ln()
            })
            .sum()
    };
    let (ha, hb) = (
        h(a.values().copied().collect()),
        h(b.values().copied().collect()),
    );
    let mi: f64 = table
        .iter()
        .map(|((t, p), v)| {
            let pv = *v as f64 / nf;
            pv * (pv / ((a[t] as f64 / nf) * (b[p] as f64 / nf))).ln()
        })
        .sum();
    let nmi = if ha + hb > 0.0 {
        2.0 * mi / (ha + hb)
    } else {
        1.0
    };
    (ari, nmi)
}

fn scenarios() -> Vec<Scenario> {
    let base = Scenario::default();
    vec![
        Scenario {
            name: "three separated blobs, d=2",
            ..base.clone()
        },
        Scenario {
            name: "collinear centres, d=3",
            d: 3,
            collinear: true,
            seed: 2,
            ..base.clone()
        },
        Scenario {
            name: "scaled x1000 and shifted",
            scale: 1000.0,
            shift: 5.0e6,
            seed: 3,
            ..base.clone()
        },
        Scenario {
            name: "5% uniform noise, k=5, d=4",
            k: 5,
            d: 4,
            noise: 0.05,
            seed: 4,
            n: 5_000,
            ..base.clone()
        },
        Scenario {
            name: "k=12, d=16",
            k: 12,
            d: 16,
            seed: 5,
            n: 8_000,
            ..base.clone()
        },
        Scenario {
            name: "k=8, d=8",
            k: 8,
            d: 8,
            seed: 6,
            n: 6_000,
            ..base.clone()
        },
        Scenario {
            name: "concept drift: blobs move 8 units mid-stream",
            k: 4,
            d: 3,
            drift: 8.0,
            seed: 7,
            n: 6_000,
            ..base.clone()
        },
    ]
}

/// Reported, not asserted: a sudden jump of every blob by ~7σ founds new clusters (the old
/// ones go stale and are evicted later); the drift detectors alarm.
fn reported_only() -> Vec<Scenario> {
    vec![Scenario {
        name: "sudden jump of 4 units per feature",
        k: 4,
        d: 3,
        jump: 4.0,
        seed: 7,
        n: 6_000,
        ..Scenario::default()
    }]
}

#[test]
fn quality_with_default_parameters() {
    let mut report = String::new();
    let mut worst = f64::MAX;
    for s in scenarios() {
        // Three seeds per scenario; the worst counts.
        for seed in [s.seed, s.seed + 100, s.seed + 200] {
            let st = stream(&Scenario { seed, ..s.clone() });
            let (got, live, created) = run_counting(&st.points);
            let (ari, nmi) = scores(&st.labels, &got);
            let outliers = got.iter().filter(|a| a.is_outlier).count();
            report.push_str(&format!(
                "{:<45} seed {seed:>3}  ARI {ari:.4}  NMI {nmi:.4}  (k={}, live {live}, created {created}, outliers {outliers})\n",
                s.name, s.k
            ));
            worst = worst.min(ari);
        }
    }
    for s in reported_only() {
        let st = stream(&s);
        let (got, live, created) = run_counting(&st.points);
        let (ari, nmi) = scores(&st.labels, &got);
        report.push_str(&format!(
            "(reported) {:<29} ARI {ari:.4}  NMI {nmi:.4}  (clusters live {live}, created {created})\n",
            s.name
        ));
    }
    println!("{report}");
    assert!(worst >= 0.95, "ARI below 0.95:\n{report}");
}

#[test]
fn scale_and_translation_invariant() {
    let s = Scenario {
        k: 4,
        d: 3,
        seed: 11,
        noise: 0.03,
        ..Scenario::default()
    };
    let plain = stream(&s);
    let moved: Vec<Vec<f64>> = plain
        .points
        .iter()
        .map(|p| p.iter().map(|v| v * 1000.0 + 12345.0).collect())
        .collect();
    let a: Vec<_> = run(&plain.points)
        .iter()
        .map(|x| (x.cluster_id, x.is_outlier))
        .collect();
    let b: Vec<_> = run(&moved)
        .iter()
        .map(|x| (x.cluster_id, x.is_outlier))
        .collect();
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        same as f64 >= 0.999 * a.len() as f64,
        "{same} of {} identical",
        a.len()
    );
}

#[test]
fn scores_agree_with_flags_and_centroids_are_never_outliers() {
    let s = Scenario {
        k: 3,
        d: 2,
        noise: 0.05,
        seed: 12,
        ..Scenario::default()
    };
    let st = stream(&s);
    let mut ncs = Ncs::new(NcsParams::default(), 2);
    let (mut out, mut alarms) = (Vec::new(), Vec::new());
    for p in &st.points {
        ncs.process(p, &mut out, &mut alarms).unwrap();
    }
    for a in &out {
        assert!((0.0..1.0).contains(&a.outlier_score));
        assert_eq!(a.is_outlier, a.outlier_score > 0.5, "{a:?}");
        assert_eq!(a.is_outlier, a.reason.is_some());
        assert_eq!(a.is_outlier, a.cluster_id.is_none());
    }
    for c in ncs.clusters() {
        out.clear();
        ncs.process(&c.centroid, &mut out, &mut alarms).unwrap();
        assert!(!out[0].is_outlier);
        assert_eq!(out[0].cluster_id, Some(c.id));
        assert!(out[0].outlier_score < 1e-9);
    }
}

#[test]
fn ids_are_stable_and_never_reused_and_the_cap_evicts() {
    let params = NcsParams {
        max_clusters: 3,
        ..NcsParams::default()
    };
    let s = Scenario {
        k: 6,
        d: 2,
        seed: 13,
        n: 6_000,
        ..Scenario::default()
    };
    let st = stream(&s);
    let mut ncs = Ncs::new(params, 2);
    let (mut out, mut alarms) = (Vec::new(), Vec::new());
    let mut seen = std::collections::BTreeSet::new();
    let mut evicted = std::collections::BTreeSet::new();
    for p in &st.points {
        ncs.process(p, &mut out, &mut alarms).unwrap();
        assert!(ncs.len() <= 3);
        for (event, id) in ncs.drain_events() {
            use neurostream::ncs::corrected::ClusterEvent::*;
            match event {
                Created => assert!(seen.insert(id), "id {id} reused"),
                Evicted => {
                    evicted.insert(id);
                }
                _ => assert!(!evicted.contains(&id)),
            }
        }
    }
    assert!(
        !evicted.is_empty(),
        "six blobs under a cap of three must evict"
    );
}

#[test]
fn a_dimension_change_is_a_typed_error() {
    let mut ncs = Ncs::new(NcsParams::default(), 3);
    let err = ncs
        .process(&[1.0, 2.0], &mut Vec::new(), &mut Vec::new())
        .unwrap_err();
    assert_eq!((err.expected, err.got), (3, 2));
}

/// A wider sweep (`cargo test --release --test ncs_quality -- --ignored`).
#[test]
#[ignore]
fn seed_sweep() {
    for s in scenarios() {
        let mut worst = f64::MAX;
        for seed in 100..110 {
            let st = stream(&Scenario { seed, ..s.clone() });
            let (got, live, created) = run_counting(&st.points);
            let (ari, _) = scores(&st.labels, &got);
            if ari < 0.95 {
                let outliers = got.iter().filter(|a| a.is_outlier).count();
                println!("   seed {seed}: ARI {ari:.4} live {live} created {created} outliers {outliers}");
            }
            worst = worst.min(ari);
        }
        println!("{:<45} worst ARI over 10 seeds {worst:.4}", s.name);
    }
}

#[test]
fn constant_features_form_one_cluster() {
    let points = vec![vec![3.0, -1.0]; 200];
    let got = run(&points);
    let clustered = got.iter().filter(|a| a.cluster_id == Some(0)).count();
    assert!(clustered >= 195, "{clustered} of 200 in cluster 0");
    assert!(got.iter().all(|a| a.outlier_score.is_finite()));
}

#[test]
fn converging_clusters_merge_and_memory_stays_bounded() {
    use neurostream::ncs::corrected::ClusterEvent;
    // Two blobs 12σ apart walk into each other; once they overlap they must become one cluster.
    let mut rng = SmallRng::seed_from_u64(21);
    let unit = Normal::new(0.0, 1.0).unwrap();
    let mut ncs = Ncs::new(NcsParams::default(), 2);
    let (mut out, mut alarms) = (Vec::new(), Vec::new());
    let mut merged = false;
    let n = 20_000;
    for i in 0..n {
        let gap = 12.0 * (1.0 - i as f64 / (n as f64 * 0.8)).max(0.0);
        let centre = if i % 2 == 0 { [0.0, 0.0] } else { [gap, 0.0] };
        let p = [
            centre[0] + unit.sample(&mut rng),
            centre[1] + unit.sample(&mut rng) + 50.0 * (i % 3) as f64 * 0.0,
        ];
        ncs.process(&p, &mut out, &mut alarms).unwrap();
        out.clear();
        merged |= ncs.drain_events().any(|(e, _)| e == ClusterEvent::Merged);
        assert!(ncs.len() <= NcsParams::default().max_clusters);
    }
    assert!(merged, "the converged blobs merged");
    assert_eq!(ncs.len(), 1, "one cluster is left: {:?}", ncs.clusters());
    let snapshot = serde_json::to_vec(&ncs).unwrap();
    assert!(
        snapshot.len() < 64 * 1024,
        "state stays small: {} bytes",
        snapshot.len()
    );
}

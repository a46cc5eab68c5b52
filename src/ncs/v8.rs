//! `ncs-v8`: a faithful port of the public NCS V8 reference (`NeuroClusterStreamer`).
//!
//! It reproduces the reference's decisions exactly, defects included (section A of the
//! algorithm notes): cosine similarity to assign, Euclidean distance for outliers, list-index
//! cluster ids that shift, maintenance skipped when the 50th point is an outlier, the wrong merge
//! bookkeeping. Points and centroids are `f32` like the reference's numpy arrays; statistics are
//! `f64`. It exists so NCS users get the answers they know; `ncs` is the corrected default.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The reference's parameters (same names, same defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct V8Params {
    /// Starting similarity threshold.
    pub base_threshold: f64,
    /// Centroid learning rate.
    pub learning_rate: f64,
    /// Confidence decay per maintenance.
    pub decay_rate: f64,
    /// Clusters below this confidence are dropped at maintenance.
    pub min_confidence: f64,
    /// Merge score at or above which two clusters merge.
    pub merge_threshold: f64,
    /// Outlier score above which a point is an outlier.
    pub outlier_threshold: f64,
    /// Length of the similarity history.
    pub stability_window: usize,
    /// Cluster cap.
    pub max_clusters: usize,
    /// Longest accepted point.
    pub max_point_dimensions: usize,
    /// Memoise the threshold per 10-step bucket.
    pub performance_mode: bool,
}

impl Default for V8Params {
    fn default() -> Self {
        Self {
            base_threshold: 0.71,
            learning_rate: 0.06,
            decay_rate: 0.002,
            min_confidence: 0.2,
            merge_threshold: 0.9,
            outlier_threshold: 0.2,
            stability_window: 100,
            max_clusters: 30,
            max_point_dimensions: 1000,
            performance_mode: true,
        }
    }
}

/// One reference cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V8Cluster {
    /// Centroid (`f32`, like the reference).
    pub centroid: Vec<f32>,
    /// Confidence (unbounded in the reference).
    pub confidence: f64,
    /// Age.
    pub age: f64,
    /// Updates.
    pub updates: u64,
    /// Step of the last update.
    pub last_update: u64,
    /// Health score.
    pub health: f64,
}

/// What the reference returns for a point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct V8Assignment {
    /// List index of the cluster, or -1.
    pub cluster_id: i64,
    /// Outlier flag.
    pub is_outlier: bool,
    /// Outlier score.
    pub outlier_score: f64,
}

/// The reference's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct V8Counters {
    /// Clusters created (including promoted outlier groups).
    pub clusters_created: u64,
    /// Merges.
    pub clusters_merged: u64,
    /// Outlier returns.
    pub outliers_detected: u64,
    /// Rejected points.
    pub error_count: u64,
}

/// A bounded FIFO (Python's `deque(maxlen=n)`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Ring<T> {
    cap: usize,
    items: VecDeque<T>,
}

impl<T> Ring<T> {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            items: VecDeque::with_capacity(cap),
        }
    }

    fn push(&mut self, x: T) {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        self.items.push_back(x);
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

fn mean_std(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = xs.clone().count();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = xs.clone().sum::<f64>() / n as f64;
    let var = xs.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (na, nb) = (norm(a), norm(b));
    if na <= 1e-10 || nb <= 1e-10 {
        return 0.0;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    (dot / (na * nb)).clamp(-1.0, 1.0)
}

/// The NCS V8 reference streamer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NcsV8 {
    params: V8Params,
    clusters: Vec<V8Cluster>,
    t: u64,
    similarities: Ring<f64>,
    distances: Ring<f64>,
    qualities: Ring<f64>,
    outlier_buffer: Ring<Vec<f32>>,
    threshold: f64,
    global_stability: f64,
    clustering_quality: f64,
    memo: BTreeMap<u64, f64>,
    counters: V8Counters,
}

impl NcsV8 {
    /// A fresh streamer.
    pub fn new(params: V8Params) -> Self {
        Self {
            similarities: Ring::new(params.stability_window),
            distances: Ring::new(100),
            qualities: Ring::new(50),
            outlier_buffer: Ring::new(25),
            threshold: params.base_threshold,
            global_stability: 1.0,
            clustering_quality: 1.0,
            memo: BTreeMap::new(),
            counters: V8Counters::default(),
            clusters: Vec::new(),
            t: 0,
            params,
        }
    }

    /// Current clusters, in list order.
    pub fn clusters(&self) -> &[V8Cluster] {
        &self.clusters
    }

    /// Current dynamic threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Counters.
    pub fn counters(&self) -> &V8Counters {
        &self.counters
    }

    /// Clustering quality (the reference's own cohesion proxy).
    pub fn clustering_quality(&self) -> f64 {
        self.clustering_quality
    }

    /// Global stability.
    pub fn global_stability(&self) -> f64 {
        self.global_stability
    }

    /// Steps taken.
    pub fn time_step(&self) -> u64 {
        self.t
    }

    /// Processes one point, exactly as the reference does.
    pub fn process(&mut self, point: &[f64]) -> V8Assignment {
        let x: Vec<f32> = point.iter().map(|v| *v as f32).collect();
        let dimension_ok = self
            .clusters
            .first()
            .is_none_or(|c| c.centroid.len() == x.len());
        if x.is_empty()
            || x.len() > self.params.max_point_dimensions
            || x.iter().any(|v| !v.is_finite())
            || !dimension_ok
        {
            self.counters.error_count += 1;
            return V8Assignment {
                cluster_id: -1,
                is_outlier: true,
                outlier_score: 1.0,
            };
        }
        self.t += 1;
        let score = self.outlier_score(&x);
        if score > self.params.outlier_threshold {
            self.outlier_buffer.push(x);
            self.counters.outliers_detected += 1;
            return V8Assignment {
                cluster_id: -1,
                is_outlier: true,
                outlier_score: score,
            };
        }
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in self.clusters.iter().enumerate() {
            let s = cosine(&x, &c.centroid) as f64;
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        if let Some((_, s)) = best {
            self.similarities.push(s);
        }
        let threshold = self.dynamic_threshold();
        let result = match best {
            Some((b, s)) if s >= threshold => {
                self.update_cluster(b, &x);
                V8Assignment {
                    cluster_id: b as i64,
                    is_outlier: false,
                    outlier_score: score,
                }
            }
            _ if self.clusters.len() < self.params.max_clusters => {
                self.create_cluster(x);
                V8Assignment {
                    cluster_id: self.clusters.len() as i64 - 1,
                    is_outlier: false,
                    outlier_score: 0.0,
                }
            }
            _ => {
                self.outlier_buffer.push(x);
                self.counters.outliers_detected += 1;
                V8Assignment {
                    cluster_id: -1,
                    is_outlier: true,
                    outlier_score: score,
                }
            }
        };
        if self.t % 50 == 0 {
            self.maintenance();
        }
        result
    }

    fn outlier_score(&mut self, x: &[f32]) -> f64 {
        if self.clusters.is_empty() {
            return 0.0;
        }
        let d_min = self
            .clusters
            .iter()
            .map(|c| distance(x, &c.centroid))
            .fold(f32::INFINITY, f32::min) as f64;
        let radius = if self.distances.len() > 10 {
            let (m, s) = mean_std(self.distances.items.iter().copied());
            m + 2.0 * s
        } else {
            2.0
        };
        self.distances.push(d_min);
        let geometric = if radius == 0.0 {
            if d_min > 0.0 {
                1.0
            } else {
                0.0
            }
        } else if d_min > radius {
            (d_min / radius - 1.0).min(1.0)
        } else {
            0.0
        };
        let mut statistical = 0.0;
        if self.distances.len() >= 10 {
            let (m, s) = mean_std(self.distances.items.iter().copied());
            if s > 1e-6 {
                let z = (d_min - m).abs() / s;
                if z > 2.5 {
                    statistical = ((z - 2.5) / 2.5).min(1.0);
                }
            }
        }
        let mut temporal = 0.0;
        let n = self.outlier_buffer.len();
        if n >= 3 {
            let recent: Vec<&Vec<f32>> = self
                .outlier_buffer
                .items
                .iter()
                .skip(n.saturating_sub(5))
                .collect();
            let dims = recent[0].len();
            let mut m = vec![0f32; dims];
            for p in &recent {
                for (a, v) in m.iter_mut().zip(p.iter()) {
                    *a += v;
                }
            }
            for a in m.iter_mut() {
                *a /= recent.len() as f32;
            }
            let radii = recent.iter().map(|p| distance(p, &m) as f64);
            let (_, s) = mean_std(radii);
            let coherence = 1.0 / (1.0 + s);
            if coherence < 0.3 {
                temporal = ((0.3 - coherence) / 0.3).min(1.0);
            }
        }
        (0.4 * geometric + 0.3 * statistical + 0.3 * temporal).clamp(0.0, 1.0)
    }

    fn dynamic_threshold(&mut self) -> f64 {
        let bucket = self.t / 10;
        if self.params.performance_mode {
            if let Some(th) = self.memo.get(&bucket) {
                return *th;
            }
        }
        let th = if self.similarities.len() < 10 {
            self.params.base_threshold
        } else {
            let s: Vec<f64> = self.similarities.items.iter().copied().collect();
            let (_, std) = mean_std(s.iter().copied());
            let raw = percentile(&s, 0.75) * (1.0 - std).max(0.5)
                + 0.10 * self.clustering_quality
                + 0.05 * self.global_stability;
            raw.clamp(0.3, 0.95)
        };
        self.threshold = th;
        if self.params.performance_mode {
            self.memo.insert(bucket, th);
            if self.memo.len() > 10 {
                let floor = bucket.saturating_sub(5);
                self.memo.retain(|b, _| *b >= floor);
            }
        }
        th
    }

    fn health(&self, c: &V8Cluster) -> f64 {
        let staleness = (1.0 - (self.t.saturating_sub(c.last_update)) as f64 / 50.0).max(0.5);
        (c.confidence
            * (1.0 + c.age / 200.0).min(1.2)
            * (0.8 + 0.3 * c.updates as f64 / (c.age + 1.0)).min(1.1)
            * staleness)
            .min(1.0)
    }

    fn update_cluster(&mut self, b: usize, x: &[f32]) {
        let c = &self.clusters[b];
        let eta = self.params.learning_rate
            * (1.0 / (1.0 + 0.01 * c.age))
            * (1.0 + 0.2 * c.confidence).min(1.2);
        let keep = (1.0 - eta) as f32;
        let eta = eta as f32;
        let c = &mut self.clusters[b];
        for (ci, xi) in c.centroid.iter_mut().zip(x) {
            *ci = keep * *ci + eta * (0.7f32 * xi + 0.3f32 * *ci);
        }
        c.confidence += 0.3;
        c.age += 0.1;
        c.updates += 1;
        c.last_update = self.t;
        let health = self.health(&self.clusters[b]);
        self.clusters[b].health = health;
    }

    fn create_cluster(&mut self, centroid: Vec<f32>) {
        self.clusters.push(V8Cluster {
            centroid,
            confidence: 1.0,
            age: 0.0,
            updates: 1,
            last_update: self.t,
            health: 1.0,
        });
        self.counters.clusters_created += 1;
    }

    fn maintenance(&mut self) {
        // (1) drop weak clusters
        let min_confidence = self.params.min_confidence;
        self.clusters
            .retain(|c| c.confidence >= min_confidence && c.health >= 0.3);
        // (2) decay
        for i in 0..self.clusters.len() {
            let c = &mut self.clusters[i];
            c.confidence *= 1.0 - self.params.decay_rate * (1.0 + 0.01 * c.age);
            c.age += 1.0;
            let health = self.health(&self.clusters[i]);
            self.clusters[i].health = health;
        }
        // (3) promote coherent outlier groups
        if self.outlier_buffer.len() >= 3 {
            let points: Vec<Vec<f32>> = self.outlier_buffer.items.iter().cloned().collect();
            let mut used = vec![false; points.len()];
            for i in 0..points.len() {
                if used[i] {
                    continue;
                }
                used[i] = true;
                let mut group = vec![i];
                for j in i + 1..points.len() {
                    if !used[j] && (distance(&points[i], &points[j]) as f64) < 1.5 {
                        used[j] = true;
                        group.push(j);
                    }
                }
                if group.len() >= 3 && self.clusters.len() < self.params.max_clusters {
                    let dims = points[i].len();
                    let mut mean = vec![0f32; dims];
                    for &g in &group {
                        for (m, v) in mean.iter_mut().zip(&points[g]) {
                            *m += v;
                        }
                    }
                    for m in mean.iter_mut() {
                        *m /= group.len() as f32;
                    }
                    self.create_cluster(mean);
                }
            }
            self.outlier_buffer.items.clear();
        }
        // (4) merges, with the reference's deletion bookkeeping
        let mut merged: Vec<(usize, usize)> = Vec::new();
        let k = self.clusters.len();
        for i in 0..k {
            for j in i + 1..k {
                if merged.contains(&(i, j)) {
                    continue;
                }
                let (a, b) = (&self.clusters[i], &self.clusters[j]);
                let q_max = a.confidence.max(b.confidence);
                let score = 0.40 * (cosine(&a.centroid, &b.centroid) as f64).max(0.0)
                    + 0.25 * (1.0 - ((a.confidence - b.confidence).abs() / q_max).min(1.0))
                    + 0.20 * (1.0 - (a.health - b.health).abs().min(1.0))
                    + 0.15 * (1.0 - ((a.age - b.age).abs() / 100.0).min(1.0));
                if score >= self.params.merge_threshold {
                    self.merge_into(i, j);
                    merged.push((i, j));
                }
            }
        }
        for &(_, j) in merged.iter().rev() {
            if j < self.clusters.len() {
                self.clusters.remove(j);
            }
        }
        // (5) global metrics
        if !self.clusters.is_empty() && self.similarities.len() > 10 {
            let (m, s) = mean_std(self.similarities.items.iter().copied());
            self.clustering_quality = (m / (1.0 + s)).min(1.0);
            let k = self.clusters.len() as f64;
            let count_stability = (1.0 / (1.0 + 0.1 * (k - 4.0).abs())).min(1.0);
            let quality_stability = if self.qualities.len() > 10 {
                1.0 / (1.0 + mean_std(self.qualities.items.iter().copied()).1)
            } else {
                1.0
            };
            self.global_stability = count_stability * quality_stability;
            self.qualities.push(self.clustering_quality);
        }
        // (6) periodic cleanup
        if self.t % 200 == 0 {
            self.memo.clear();
        }
    }

    fn merge_into(&mut self, i: usize, j: usize) {
        let b = self.clusters[j].clone();
        let a = &mut self.clusters[i];
        let total = a.confidence + b.confidence;
        let (wa, wb) = ((a.confidence / total) as f32, (b.confidence / total) as f32);
        for (ca, cb) in a.centroid.iter_mut().zip(&b.centroid) {
            *ca = wa * *ca + wb * cb;
        }
        a.confidence = 0.8 * (a.confidence + b.confidence);
        a.age = (a.age + b.age) / 2.0;
        a.updates += b.updates;
        a.last_update = a.last_update.max(b.last_update);
        let health = self.health(&self.clusters[i]);
        self.clusters[i].health = health;
        self.counters.clusters_merged += 1;
    }
}

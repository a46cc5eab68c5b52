//! `ncs`: the NCS idea with the reference's defects fixed (section B of the algorithm notes).
//!
//! - One geometry: Euclidean distance on standardised features, where each cluster standardises
//!   by its own running per-feature spread (a diagonal Mahalanobis distance, `D²`); young
//!   clusters borrow the mature clusters' spread (or, at the start, one estimated from the
//!   warm-up points on online-standardised features). Everything is relative to running
//!   statistics, so results are invariant to scaling and translating the input.
//! - Acceptance from the cluster's own spread: a point joins its nearest cluster when
//!   `D² ≤ A = d + accept_sigmas·√(2d)` (the χ²_d mean plus `accept_sigmas` standard deviations).
//!   No additive bonuses, no clip.
//! - One scoring function: `score = D² / (D² + A)`, so a point at a centroid scores 0 and a
//!   point is an outlier exactly when its score exceeds 0.5.
//! - New clusters are born from `min_cluster_points` mutually close unplaced points, so isolated
//!   noise stays an outlier instead of becoming a cluster; at `max_clusters` the lowest-weight
//!   (stalest) cluster is evicted.
//! - Stable `u64` ids, never reused; exponentially decayed member weight; confidence in [0, 1].
//! - Overlapping clusters (one centroid within the other's acceptance) merge, checked for the
//!   updated cluster only, every `merge_check_every` of its updates.
//! - Per-cluster drift coefficient (centroid displacement per update in units of the cluster's
//!   spread, smoothed); Page-Hinkley and ADWIN on the scale-free stream `D² / A`.
//! - O(k·d) per point in one pass over contiguous centroids; no allocation per point.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::drift::{Adwin, PageHinkley};

/// Parameters of `ncs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NcsParams {
    /// Cluster cap; the stalest cluster is evicted to make room.
    pub max_clusters: usize,
    /// Acceptance: `D² ≤ d + accept_sigmas·√(2d)`.
    pub accept_sigmas: f64,
    /// Unplaced points that, close together, found a new cluster.
    pub min_cluster_points: usize,
    /// Unplaced points remembered while waiting for company.
    pub pending_capacity: usize,
    /// Points used to estimate the feature scales before clustering starts.
    pub warmup_points: usize,
    /// Per-point decay of cluster weights (1 = no decay).
    pub decay: f64,
    /// Smallest centroid learning rate (tracks moving clusters).
    pub min_learning_rate: f64,
    /// Updates of a cluster between two merge checks.
    pub merge_check_every: u64,
    /// Page-Hinkley alarm threshold on the `D² / A` stream.
    pub page_hinkley_threshold: f64,
    /// ADWIN confidence on the `D² / A` stream.
    pub adwin_delta: f64,
}

impl Default for NcsParams {
    fn default() -> Self {
        Self {
            max_clusters: 30,
            accept_sigmas: 4.0,
            min_cluster_points: 3,
            pending_capacity: 64,
            warmup_points: 50,
            decay: 0.9999,
            min_learning_rate: 0.01,
            merge_check_every: 16,
            page_hinkley_threshold: 50.0,
            adwin_delta: 0.002,
        }
    }
}

/// Why a point is an outlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutlierReason {
    /// Too far from every cluster.
    Score,
    /// Would found a cluster, but there is no room (`max_clusters = 0`).
    Capacity,
}

impl OutlierReason {
    /// The name used in messages and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            OutlierReason::Score => "score",
            OutlierReason::Capacity => "capacity",
        }
    }
}

/// A cluster's lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterEvent {
    /// Founded.
    Created,
    /// Moved.
    Updated,
    /// Absorbed another cluster.
    Merged,
    /// Removed to make room, or absorbed.
    Evicted,
}

impl ClusterEvent {
    /// The name used in messages and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterEvent::Created => "created",
            ClusterEvent::Updated => "updated",
            ClusterEvent::Merged => "merged",
            ClusterEvent::Evicted => "evicted",
        }
    }
}

/// What `ncs` decided for one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    /// Stable cluster id, or `None` for an outlier without a cluster.
    pub cluster_id: Option<u64>,
    /// Outlier flag (`outlier_score > 0.5`).
    pub is_outlier: bool,
    /// Outlier score in [0, 1).
    pub outlier_score: f64,
    /// Why it is an outlier.
    pub reason: Option<OutlierReason>,
    /// `D² / A` to the nearest cluster (1 = at the acceptance boundary).
    pub nearest: Option<f64>,
}

/// A global drift alarm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftAlarm {
    /// `page_hinkley` or `adwin`.
    pub detector: &'static str,
    /// The detector's statistic at the alarm.
    pub statistic: f64,
}

/// A cluster's public state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Stable id.
    pub id: u64,
    /// Centroid in input units.
    pub centroid: Vec<f64>,
    /// Decayed member weight.
    pub weight: f64,
    /// Root-mean-square member distance, in online-standardised units.
    pub radius: f64,
    /// Smoothed centroid displacement per update, in units of the cluster's spread.
    pub drift_coefficient: f64,
    /// Confidence in [0, 1]: how established the cluster is (weight / (weight + 10)).
    pub confidence: f64,
    /// Updates so far.
    pub updates: u64,
    /// Step of creation.
    pub created_at: u64,
    /// Step of the last update.
    pub updated_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClusterMeta {
    id: u64,
    weight: f64,
    weighed_at: u64,
    drift: f64,
    updates: u64,
    created_at: u64,
    updated_at: u64,
}

/// The dimension of a point differs from the stream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("point has dimension {got}, the stream has {expected}")]
pub struct DimensionError {
    /// The stream's dimension.
    pub expected: usize,
    /// This point's.
    pub got: usize,
}

/// Updates before a cluster's own spread outweighs the borrowed one.
const PRIOR_WEIGHT: f64 = 5.0;
/// Updates after which a cluster's spread informs the prior of young clusters.
const MATURE: u64 = 20;

/// The corrected online clusterer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ncs {
    params: NcsParams,
    dim: usize,
    /// Points placed.
    t: u64,
    /// Acceptance bound `A` on `D²`.
    accept: f64,
    /// Per-feature running mean and sum of squared deviations (all points).
    mean: Vec<f64>,
    m2: Vec<f64>,
    seen: u64,
    /// Flat k×d centroids, input units.
    centroids: Vec<f64>,
    /// Flat k×d running member variance per feature, input units².
    spread: Vec<f64>,
    /// Flat k×d inverse effective variance (own spread blended with the prior).
    inv_var: Vec<f64>,
    clusters: Vec<ClusterMeta>,
    /// Per-feature variance young clusters borrow.
    prior: Vec<f64>,
    pending: VecDeque<Vec<f64>>,
    warmup: Vec<Vec<f64>>,
    next_id: u64,
    page_hinkley: PageHinkley,
    adwin: Adwin,
    /// Streaming simplified silhouette (cohesion vs separation), smoothed.
    silhouette: f64,
    /// Lifecycle events since the last drain: (event, cluster id).
    events: Vec<(ClusterEvent, u64)>,
}

impl Ncs {
    /// A fresh clusterer for points of dimension `dim`.
    pub fn new(params: NcsParams, dim: usize) -> Self {
        let d = dim.max(1) as f64;
        Self {
            page_hinkley: PageHinkley::new(30, 0.005, params.page_hinkley_threshold, 0.9999),
            adwin: Adwin::new(params.adwin_delta),
            accept: d + params.accept_sigmas * (2.0 * d).sqrt(),
            params,
            dim,
            t: 0,
            mean: vec![0.0; dim],
            m2: vec![0.0; dim],
            seen: 0,
            centroids: Vec::new(),
            spread: Vec::new(),
            inv_var: Vec::new(),
            clusters: Vec::new(),
            prior: vec![1.0; dim],
            pending: VecDeque::new(),
            warmup: Vec::new(),
            next_id: 0,
            silhouette: 0.0,
            events: Vec::new(),
        }
    }

    /// The stream's dimension.
    pub fn dimension(&self) -> usize {
        self.dim
    }

    /// Points placed.
    pub fn points(&self) -> u64 {
        self.t
    }

    /// Live clusters.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether there are no clusters.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// The acceptance bound `A` on `D²`.
    pub fn acceptance(&self) -> f64 {
        self.accept
    }

    /// Streaming simplified silhouette in [-1, 1] (honest internal quality).
    pub fn silhouette(&self) -> f64 {
        self.silhouette
    }

    /// Lifecycle events since the last call, oldest first.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, (ClusterEvent, u64)> {
        self.events.drain(..)
    }

    /// A cluster's state, if it is alive.
    pub fn cluster(&self, id: u64) -> Option<ClusterState> {
        let i = self.clusters.iter().position(|c| c.id == id)?;
        Some(self.state(i))
    }

    fn state(&self, i: usize) -> ClusterState {
        let c = &self.clusters[i];
        let weight = self.weight_now(c);
        let radius = (0..self.dim)
            .map(|f| self.spread[i * self.dim + f] / self.global_var(f))
            .sum::<f64>()
            .sqrt();
        ClusterState {
            id: c.id,
            centroid: self.centroid(i).to_vec(),
            weight,
            radius,
            drift_coefficient: c.drift,
            confidence: weight / (weight + 10.0),
            updates: c.updates,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }

    /// Every live cluster.
    pub fn clusters(&self) -> Vec<ClusterState> {
        (0..self.clusters.len()).map(|i| self.state(i)).collect()
    }

    fn centroid(&self, i: usize) -> &[f64] {
        &self.centroids[i * self.dim..(i + 1) * self.dim]
    }

    fn weight_now(&self, c: &ClusterMeta) -> f64 {
        c.weight * self.params.decay.powf((self.t - c.weighed_at) as f64)
    }

    fn global_var(&self, f: usize) -> f64 {
        let var = self.m2[f] / self.seen.max(1) as f64;
        if var > 0.0 {
            var
        } else {
            1.0
        }
    }

    /// The smallest variance a feature is credited with (a constant feature has none).
    fn floor_var(&self, f: usize) -> f64 {
        1e-12 * self.global_var(f)
    }

    fn learn_scale(&mut self, x: &[f64]) {
        self.seen += 1;
        let n = self.seen as f64;
        for (f, &v) in x.iter().enumerate() {
            let delta = v - self.mean[f];
            self.mean[f] += delta / n;
            self.m2[f] += delta * (v - self.mean[f]);
        }
    }

    /// `D²` of cluster `a`'s centroid to cluster `b`.
    fn d2_rows(&self, a: usize, b: usize) -> f64 {
        let dim = self.dim;
        let (ca, cb) = (
            &self.centroids[a * dim..(a + 1) * dim],
            &self.centroids[b * dim..(b + 1) * dim],
        );
        let w = &self.inv_var[b * dim..(b + 1) * dim];
        ca.iter()
            .zip(cb)
            .zip(w)
            .map(|((x, y), w)| (x - y) * (x - y) * w)
            .sum()
    }

    /// `D²` between two points under the prior spread.
    fn d2_prior(&self, a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .zip(&self.prior)
            .map(|((x, y), v)| (x - y) * (x - y) / v)
            .sum()
    }

    fn refresh_inv_var(&mut self, i: usize) {
        let n = self.clusters[i].updates as f64;
        for f in 0..self.dim {
            let own = self.spread[i * self.dim + f];
            let floor = self.floor_var(f);
            let v = (n * own + PRIOR_WEIGHT * self.prior[f]) / (n + PRIOR_WEIGHT);
            self.inv_var[i * self.dim + f] = 1.0 / v.max(floor).max(f64::MIN_POSITIVE);
        }
    }

    /// The prior: mean spread of mature clusters, if any.
    fn refresh_prior(&mut self) {
        let mature: Vec<usize> = (0..self.clusters.len())
            .filter(|&i| self.clusters[i].updates >= MATURE)
            .collect();
        if mature.is_empty() {
            return;
        }
        for f in 0..self.dim {
            self.prior[f] = mature
                .iter()
                .map(|&i| self.spread[i * self.dim + f])
                .sum::<f64>()
                / mature.len() as f64;
        }
        for i in 0..self.clusters.len() {
            self.refresh_inv_var(i);
        }
    }

    /// Processes one point; its assignment (several, in order, when the warm-up completes) goes
    /// to `assignments`, drift alarms to `alarms`.
    ///
    /// # Errors
    /// [`DimensionError`] when the point's dimension differs; state is unchanged.
    pub fn process(
        &mut self,
        x: &[f64],
        assignments: &mut Vec<Assignment>,
        alarms: &mut Vec<DriftAlarm>,
    ) -> Result<(), DimensionError> {
        if x.len() != self.dim {
            return Err(DimensionError {
                expected: self.dim,
                got: x.len(),
            });
        }
        self.learn_scale(x);
        if self.t == 0 && self.warmup.len() < self.params.warmup_points {
            self.warmup.push(x.to_vec());
            if self.warmup.len() == self.params.warmup_points {
                self.flush_warmup(assignments, alarms);
            }
            return Ok(());
        }
        let a = self.place(x, alarms);
        assignments.push(a);
        Ok(())
    }

    /// Decides every buffered warm-up point (the warm-up completed, or input ended before).
    pub fn flush_warmup(
        &mut self,
        assignments: &mut Vec<Assignment>,
        alarms: &mut Vec<DriftAlarm>,
    ) {
        if self.warmup.is_empty() {
            return;
        }
        self.bootstrap_prior();
        let buffered = std::mem::take(&mut self.warmup);
        // Rehearsals on the warm-up points turn the rough first prior into the spread of the
        // clusters they form; then the points are placed for real with that prior.
        for _ in 0..3 {
            let mut rehearsal = self.clone();
            for p in &buffered {
                rehearsal.place(p, &mut Vec::new());
            }
            let formed: Vec<usize> = (0..rehearsal.clusters.len())
                .filter(|&i| rehearsal.clusters[i].updates >= 5)
                .collect();
            if formed.is_empty() {
                break;
            }
            for f in 0..self.dim {
                let mean = formed
                    .iter()
                    .map(|&i| rehearsal.spread[i * self.dim + f])
                    .sum::<f64>()
                    / formed.len() as f64;
                self.prior[f] = mean.max(self.floor_var(f));
            }
        }
        for p in &buffered {
            let a = self.place(p, alarms);
            assignments.push(a);
        }
    }

    /// The first prior: isotropic in online-standardised units, scaled so that a point's
    /// second-nearest warm-up neighbour (most likely of the same blob) is a typical member pair.
    fn bootstrap_prior(&mut self) {
        let inv: Vec<f64> = (0..self.dim).map(|f| 1.0 / self.global_var(f)).collect();
        let pts = &self.warmup;
        let dist2 = |a: &[f64], b: &[f64]| -> f64 {
            a.iter()
                .zip(b)
                .zip(&inv)
                .map(|((x, y), w)| (x - y) * (x - y) * w)
                .sum()
        };
        let mut kth: Vec<f64> = pts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let mut d: Vec<f64> = pts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, q)| dist2(p, q))
                    .collect();
                d.sort_by(f64::total_cmp);
                d.get(1.min(d.len().saturating_sub(1))).copied()
            })
            .collect();
        kth.sort_by(f64::total_cmp);
        let median = kth.get(kth.len() / 2).copied().unwrap_or(0.0);
        // A member pair differs by twice the per-feature variance in every feature.
        let per_feature = (median / (2.0 * self.dim as f64)).max(1e-12);
        for f in 0..self.dim {
            self.prior[f] = per_feature * self.global_var(f);
        }
    }

    fn place(&mut self, x: &[f64], alarms: &mut Vec<DriftAlarm>) -> Assignment {
        self.t += 1;
        if self.t % 256 == 0 {
            self.refresh_prior();
        }
        let (mut best, mut best_d2, mut second_d2) = (usize::MAX, f64::INFINITY, f64::INFINITY);
        // One fused pass over the contiguous centroids and inverse variances.
        let rows = self
            .centroids
            .chunks_exact(self.dim)
            .zip(self.inv_var.chunks_exact(self.dim));
        for (i, (c, w)) in rows.enumerate() {
            let mut d2 = 0.0;
            for ((xi, ci), wi) in x.iter().zip(c).zip(w) {
                let d = xi - ci;
                d2 += d * d * wi;
            }
            if d2 < best_d2 {
                second_d2 = best_d2;
                best = i;
                best_d2 = d2;
            } else if d2 < second_d2 {
                second_d2 = d2;
            }
        }
        if best == usize::MAX {
            return self.unplaced(x, 1.0 - f64::EPSILON, None);
        }
        let nearest = best_d2 / self.accept;
        let score = best_d2 / (best_d2 + self.accept);
        self.feed_detectors(nearest, alarms);
        if best_d2 <= self.accept {
            if second_d2.is_finite() {
                let (a, b) = (best_d2.sqrt(), second_d2.sqrt());
                let s = (b - a) / a.max(b).max(f64::MIN_POSITIVE);
                self.silhouette += 0.001 * (s - self.silhouette);
            }
            let id = self.update(best, x);
            return Assignment {
                cluster_id: Some(id),
                is_outlier: false,
                outlier_score: score,
                reason: None,
                nearest: Some(nearest),
            };
        }
        self.unplaced(x, score, Some(nearest))
    }

    fn feed_detectors(&mut self, nearest: f64, alarms: &mut Vec<DriftAlarm>) {
        let v = nearest.min(10.0);
        if let Some(statistic) = self.page_hinkley.update(v) {
            alarms.push(DriftAlarm {
                detector: "page_hinkley",
                statistic,
            });
        }
        if let Some(statistic) = self.adwin.update(v) {
            alarms.push(DriftAlarm {
                detector: "adwin",
                statistic,
            });
        }
    }

    fn update(&mut self, i: usize, x: &[f64]) -> u64 {
        let t = self.t;
        let weight = self.weight_now(&self.clusters[i]) + 1.0;
        let rate = (1.0 / weight).max(self.params.min_learning_rate);
        let beta = (1.0 / (self.clusters[i].updates as f64 + 1.0)).max(0.02);
        let rows = i * self.dim..(i + 1) * self.dim;
        let mut moved = 0.0f64;
        let cells = self.centroids[rows.clone()]
            .iter_mut()
            .zip(&mut self.spread[rows.clone()])
            .zip(&self.inv_var[rows]);
        for (xi, ((c, s), w)) in x.iter().zip(cells) {
            let diff = xi - *c;
            let step = rate * diff;
            *c += step;
            *s += beta * (diff * diff * (1.0 - rate) - *s);
            moved += step * step * w;
        }
        let c = &mut self.clusters[i];
        c.weight = weight;
        c.weighed_at = t;
        c.drift += 0.05 * (moved.sqrt() - c.drift);
        c.updates += 1;
        c.updated_at = t;
        let id = c.id;
        let check = c.updates % self.params.merge_check_every == 0;
        self.refresh_inv_var(i);
        self.events.push((ClusterEvent::Updated, id));
        if check {
            self.merge_around(i);
        }
        id
    }

    fn unplaced(&mut self, x: &[f64], score: f64, nearest: Option<f64>) -> Assignment {
        // Two members of one blob differ by twice its variance per feature.
        let reach = 2.0 * self.accept;
        let close: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| self.d2_prior(x, p) <= reach)
            .map(|(j, _)| j)
            .collect();
        // A new cluster must stand apart: fringe points of a cluster stay outliers instead of
        // splitting it.
        let apart = nearest.is_none_or(|r| r > 2.0);
        if apart && close.len() + 1 >= self.params.min_cluster_points {
            if self.clusters.len() >= self.params.max_clusters && !self.evict_stalest() {
                return Assignment {
                    cluster_id: None,
                    is_outlier: true,
                    outlier_score: score.max(0.5 + f64::EPSILON),
                    reason: Some(OutlierReason::Capacity),
                    nearest,
                };
            }
            let mut members = vec![x.to_vec()];
            for &j in close.iter().rev() {
                if let Some(p) = self.pending.remove(j) {
                    members.push(p);
                }
            }
            let id = self.create(&members);
            return Assignment {
                cluster_id: Some(id),
                is_outlier: false,
                outlier_score: 0.0,
                reason: None,
                nearest,
            };
        }
        if self.pending.len() == self.params.pending_capacity {
            self.pending.pop_front();
        }
        self.pending.push_back(x.to_vec());
        Assignment {
            cluster_id: None,
            is_outlier: true,
            outlier_score: score.clamp(0.5 + f64::EPSILON, 1.0 - f64::EPSILON),
            reason: Some(OutlierReason::Score),
            nearest,
        }
    }

    fn create(&mut self, members: &[Vec<f64>]) -> u64 {
        let n = members.len() as f64;
        let mut centre = vec![0.0; self.dim];
        for m in members {
            for (c, v) in centre.iter_mut().zip(m) {
                *c += v / n;
            }
        }
        let mut spread = vec![0.0; self.dim];
        for m in members {
            for ((s, v), c) in spread.iter_mut().zip(m).zip(&centre) {
                *s += (v - c) * (v - c) / n;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.centroids.extend_from_slice(&centre);
        self.spread.extend_from_slice(&spread);
        self.inv_var.extend(std::iter::repeat_n(0.0, self.dim));
        self.clusters.push(ClusterMeta {
            id,
            weight: n,
            weighed_at: self.t,
            drift: 0.0,
            updates: members.len() as u64,
            created_at: self.t,
            updated_at: self.t,
        });
        let i = self.clusters.len() - 1;
        self.refresh_inv_var(i);
        self.events.push((ClusterEvent::Created, id));
        id
    }

    /// Evicts the lowest-weight (stalest) cluster; false when there is none to evict.
    fn evict_stalest(&mut self) -> bool {
        let Some(i) = (0..self.clusters.len()).min_by(|&a, &b| {
            self.weight_now(&self.clusters[a])
                .total_cmp(&self.weight_now(&self.clusters[b]))
        }) else {
            return false;
        };
        self.remove(i, ClusterEvent::Evicted);
        true
    }

    fn remove(&mut self, i: usize, event: ClusterEvent) {
        let id = self.clusters[i].id;
        self.clusters.remove(i);
        let range = i * self.dim..(i + 1) * self.dim;
        self.centroids.drain(range.clone());
        self.spread.drain(range.clone());
        self.inv_var.drain(range);
        self.events.push((event, id));
    }

    /// Merges cluster `i` with every cluster whose centroid lies within its acceptance, or
    /// which accepts its centroid (they describe one blob).
    fn merge_around(&mut self, i: usize) {
        let mut i = i;
        let mut j = 0;
        while j < self.clusters.len() {
            if j == i {
                j += 1;
                continue;
            }
            if self.d2_rows(i, j) > self.accept && self.d2_rows(j, i) > self.accept {
                j += 1;
                continue;
            }
            let (wi, wj) = (
                self.weight_now(&self.clusters[i]),
                self.weight_now(&self.clusters[j]),
            );
            let (keep, gone, wk, wg) = if wi >= wj {
                (i, j, wi, wj)
            } else {
                (j, i, wj, wi)
            };
            let dim = self.dim;
            for f in 0..dim {
                let (k, g) = (keep * dim + f, gone * dim + f);
                let (ck, cg) = (self.centroids[k], self.centroids[g]);
                let merged = (ck * wk + cg * wg) / (wk + wg);
                self.spread[k] = (wk * (self.spread[k] + (ck - merged).powi(2))
                    + wg * (self.spread[g] + (cg - merged).powi(2)))
                    / (wk + wg);
                self.centroids[k] = merged;
            }
            let gone_updates = self.clusters[gone].updates;
            let t = self.t;
            let k = &mut self.clusters[keep];
            k.weight = wk + wg;
            k.weighed_at = t;
            k.updates += gone_updates;
            let keep_id = k.id;
            self.refresh_inv_var(keep);
            self.events.push((ClusterEvent::Merged, keep_id));
            self.remove(gone, ClusterEvent::Evicted);
            i = self
                .clusters
                .iter()
                .position(|c| c.id == keep_id)
                .expect("the surviving cluster is alive");
            j = 0;
        }
    }
}

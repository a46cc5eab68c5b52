//! `ncs`: the NCS idea with the reference's defects fixed (section B of the algorithm notes).
//!
//! - One geometry: Euclidean distance on online-standardised features (running mean and
//!   variance per feature), so results are invariant to scaling and translating the input.
//! - Acceptance from the cluster's own radius: a point joins its nearest cluster when its
//!   standardised distance is within `accept_radii` × the cluster's running member distance
//!   (young clusters borrow the global member-distance scale). No additive bonuses, no clip.
//! - One scoring function: `score = d / (d + accept_radii · r)`, so a point at a centroid scores
//!   0 and a point is an outlier exactly when its score exceeds 0.5.
//! - New clusters are born from `min_cluster_points` mutually close unplaced points, so isolated
//!   noise stays an outlier instead of becoming a cluster; at `max_clusters` the lowest-weight
//!   (stalest) cluster is evicted.
//! - Stable `u64` ids, never reused; exponentially decayed member weight; confidence in [0, 1].
//! - Overlapping clusters (centroid distance within the sum of their radii) merge, checked for
//!   the updated cluster only, every `merge_check_every` of its updates.
//! - Per-cluster drift coefficient (centroid displacement per update relative to the radius,
//!   smoothed); Page-Hinkley and ADWIN on the scale-free nearest-distance stream.
//! - O(k·d) per point in one pass over contiguous centroids; no allocation per point.

use serde::{Deserialize, Serialize};

use super::drift::{Adwin, PageHinkley};

/// Parameters of `ncs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NcsParams {
    /// Cluster cap; the stalest cluster is evicted to make room.
    pub max_clusters: usize,
    /// A point joins a cluster within this many of its radii.
    pub accept_radii: f64,
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
    /// Two clusters merge when their centroid distance is within this many summed radii.
    pub merge_overlap: f64,
    /// Page-Hinkley alarm threshold on the nearest-distance stream.
    pub page_hinkley_threshold: f64,
    /// ADWIN confidence on the nearest-distance stream.
    pub adwin_delta: f64,
}

impl Default for NcsParams {
    fn default() -> Self {
        Self {
            max_clusters: 30,
            accept_radii: 2.5,
            min_cluster_points: 3,
            pending_capacity: 64,
            warmup_points: 50,
            decay: 0.9999,
            min_learning_rate: 0.01,
            merge_check_every: 16,
            merge_overlap: 1.0,
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
    /// Distance to the nearest cluster in units of its radius (drift detectors' input).
    pub nearest_radii: Option<f64>,
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
    /// Mean member distance (standardised units).
    pub radius: f64,
    /// Smoothed centroid displacement per update relative to the radius.
    pub drift_coefficient: f64,
    /// Updates so far.
    pub updates: u64,
    /// Step of creation.
    pub created_at: u64,
    /// Step of the last update.
    pub updated_at: u64,
}

/// The corrected online clusterer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ncs {
    params: NcsParams,
    dim: usize,
    /// Points seen.
    t: u64,
    /// Per-feature running mean and sum of squared deviations.
    mean: Vec<f64>,
    m2: Vec<f64>,
    /// 1/σ per feature (0 for constant features), refreshed every point.
    inv_scale: Vec<f64>,
    /// Flat k×d centroids (input units).
    centroids: Vec<f64>,
    clusters: Vec<ClusterMeta>,
    /// Global mean member distance (standardised units), for young clusters.
    global_radius: f64,
    pending: std::collections::VecDeque<Vec<f64>>,
    warmup: Vec<Vec<f64>>,
    next_id: u64,
    page_hinkley: PageHinkley,
    adwin: Adwin,
    /// Lifecycle events since the last drain: (event, cluster id).
    events: Vec<(ClusterEvent, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClusterMeta {
    id: u64,
    weight: f64,
    weighed_at: u64,
    radius: f64,
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

impl Ncs {
    /// A fresh clusterer for points of dimension `dim`.
    pub fn new(params: NcsParams, dim: usize) -> Self {
        Self {
            page_hinkley: PageHinkley::new(30, 0.005, params.page_hinkley_threshold, 0.9999),
            adwin: Adwin::new(params.adwin_delta),
            params,
            dim,
            t: 0,
            mean: vec![0.0; dim],
            m2: vec![0.0; dim],
            inv_scale: vec![0.0; dim],
            centroids: Vec::new(),
            clusters: Vec::new(),
            global_radius: 0.0,
            pending: std::collections::VecDeque::new(),
            warmup: Vec::new(),
            next_id: 0,
            events: Vec::new(),
        }
    }

    /// The stream's dimension.
    pub fn dimension(&self) -> usize {
        self.dim
    }

    /// Points seen.
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

    /// Lifecycle events since the last call, oldest first.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, (ClusterEvent, u64)> {
        self.events.drain(..)
    }

    /// A cluster's state, if it is alive.
    pub fn cluster(&self, id: u64) -> Option<ClusterState> {
        let i = self.clusters.iter().position(|c| c.id == id)?;
        let c = &self.clusters[i];
        Some(ClusterState {
            id,
            centroid: self.centroid(i).to_vec(),
            weight: self.weight_now(c),
            radius: c.radius,
            drift_coefficient: c.drift,
            updates: c.updates,
            created_at: c.created_at,
            updated_at: c.updated_at,
        })
    }

    /// Every live cluster.
    pub fn clusters(&self) -> Vec<ClusterState> {
        self.clusters
            .iter()
            .filter_map(|c| self.cluster(c.id))
            .collect()
    }

    /// Current decision threshold in radii (for status reports).
    pub fn accept_radii(&self) -> f64 {
        self.params.accept_radii
    }

    fn centroid(&self, i: usize) -> &[f64] {
        &self.centroids[i * self.dim..(i + 1) * self.dim]
    }

    fn weight_now(&self, c: &ClusterMeta) -> f64 {
        c.weight * self.params.decay.powi((self.t - c.weighed_at).min(i32::MAX as u64) as i32)
    }

    fn standardised_distance(&self, x: &[f64], c: &[f64]) -> f64 {
        let mut s = 0.0;
        for ((xi, ci), w) in x.iter().zip(c).zip(&self.inv_scale) {
            let d = (xi - ci) * w;
            s += d * d;
        }
        s.sqrt()
    }

    fn learn_scale(&mut self, x: &[f64]) {
        let n = (self.t + self.warmup.len() as u64).max(1) as f64;
        for i in 0..self.dim {
            let delta = x[i] - self.mean[i];
            self.mean[i] += delta / n;
            self.m2[i] += delta * (x[i] - self.mean[i]);
            let var = self.m2[i] / n;
            // A feature that never varied carries no information: weight 0.
            self.inv_scale[i] = if var > 1e-300 { 1.0 / var.sqrt() } else { 0.0 };
        }
    }

    /// Processes one point. Returns its assignments (more than one when the warm-up completes:
    /// the buffered points are decided then, in order) and any drift alarms, via `out`.
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
        if self.t == 0 && self.warmup.len() < self.params.warmup_points {
            self.warmup.push(x.to_vec());
            self.learn_scale(x);
            if self.warmup.len() < self.params.warmup_points {
                return Ok(());
            }
            self.bootstrap_radius();
            let buffered = std::mem::take(&mut self.warmup);
            for p in &buffered {
                let a = self.place(p, alarms);
                assignments.push(a);
            }
            return Ok(());
        }
        self.learn_scale(x);
        let a = self.place(x, alarms);
        assignments.push(a);
        Ok(())
    }

    /// Decides every buffered warm-up point (end of input before the warm-up completed).
    pub fn flush_warmup(&mut self, assignments: &mut Vec<Assignment>, alarms: &mut Vec<DriftAlarm>) {
        if self.warmup.is_empty() {
            return;
        }
        self.bootstrap_radius();
        let buffered = std::mem::take(&mut self.warmup);
        for p in &buffered {
            let a = self.place(p, alarms);
            assignments.push(a);
        }
    }

    /// Global radius from the warm-up points: the median distance to the 5th nearest neighbour
    /// (a few points of the same blob), a first guess that clusters' own radii soon replace.
    fn bootstrap_radius(&mut self) {
        let pts = &self.warmup;
        let mut nn: Vec<f64> = pts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let mut d: Vec<f64> = pts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, q)| self.standardised_distance(p, q))
                    .collect();
                d.sort_by(f64::total_cmp);
                d.get(4.min(d.len().saturating_sub(1))).copied()
            })
            .collect();
        nn.sort_by(f64::total_cmp);
        let median = nn.get(nn.len() / 2).copied().unwrap_or(0.0);
        self.global_radius = if median > 0.0 { median } else { 1e-9 };
    }

    fn place(&mut self, x: &[f64], alarms: &mut Vec<DriftAlarm>) -> Assignment {
        self.t += 1;
        // Nearest cluster: one pass over contiguous centroids.
        let mut best = (usize::MAX, f64::INFINITY);
        for i in 0..self.clusters.len() {
            let d = self.standardised_distance(x, self.centroid(i));
            if d < best.1 {
                best = (i, d);
            }
        }
        let (i, d) = best;
        if i != usize::MAX {
            let r = self.effective_radius(i);
            let limit = self.params.accept_radii * r;
            let score = d / (d + limit).max(f64::MIN_POSITIVE);
            let nearest_radii = d / r.max(f64::MIN_POSITIVE);
            self.feed_detectors(nearest_radii, alarms);
            if d <= limit {
                let id = self.update(i, x, d);
                return Assignment {
                    cluster_id: Some(id),
                    is_outlier: false,
                    outlier_score: score,
                    reason: None,
                    nearest_radii: Some(nearest_radii),
                };
            }
            return self.unplaced(x, score, Some(nearest_radii));
        }
        self.unplaced(x, 1.0 - f64::EPSILON, None)
    }

    fn effective_radius(&self, i: usize) -> f64 {
        let c = &self.clusters[i];
        // A young cluster's own radius is noise; lean on the global scale until it has members.
        let own_weight = (c.updates as f64 / 10.0).min(1.0);
        own_weight * c.radius + (1.0 - own_weight) * self.global_radius
    }

    fn feed_detectors(&mut self, nearest_radii: f64, alarms: &mut Vec<DriftAlarm>) {
        let v = nearest_radii.min(10.0);
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

    fn update(&mut self, i: usize, x: &[f64], d: f64) -> u64 {
        let t = self.t;
        let weight = self.weight_now(&self.clusters[i]) + 1.0;
        let rate = (1.0 / weight).max(self.params.min_learning_rate);
        let mut moved = 0.0;
        let dim = self.dim;
        for j in 0..dim {
            let c = &mut self.centroids[i * dim + j];
            let step = rate * (x[j] - *c);
            *c += step;
            let s = step * self.inv_scale[j];
            moved += s * s;
        }
        let c = &mut self.clusters[i];
        c.weight = weight;
        c.weighed_at = t;
        let beta = (1.0 / (c.updates as f64 + 1.0)).max(0.02);
        c.radius += beta * (d - c.radius);
        let displacement = moved.sqrt() / c.radius.max(f64::MIN_POSITIVE);
        c.drift += 0.05 * (displacement - c.drift);
        c.updates += 1;
        c.updated_at = t;
        let id = c.id;
        let check = c.updates % self.params.merge_check_every == 0;
        self.global_radius += 0.01 * (d - self.global_radius);
        self.events.push((ClusterEvent::Updated, id));
        if check {
            self.merge_around(i);
        }
        id
    }

    fn unplaced(&mut self, x: &[f64], score: f64, nearest_radii: Option<f64>) -> Assignment {
        // Company among the unplaced points? Found a cluster with it.
        let reach = self.params.accept_radii * self.global_radius;
        let mut close: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| self.standardised_distance(x, p) <= reach)
            .map(|(j, _)| j)
            .collect();
        // A new cluster must stand apart from the existing ones: points between two accept
        // regions, or at the fringe of one, stay outliers rather than splitting a cluster.
        let apart = nearest_radii.is_none_or(|r| r > 2.0 * self.params.accept_radii);
        if apart && close.len() + 1 >= self.params.min_cluster_points {
            if self.clusters.len() >= self.params.max_clusters && !self.evict_stalest() {
                return Assignment {
                    cluster_id: None,
                    is_outlier: true,
                    outlier_score: score.max(0.5 + f64::EPSILON),
                    reason: Some(OutlierReason::Capacity),
                    nearest_radii,
                };
            }
            let mut centre = x.to_vec();
            for &j in &close {
                for (c, v) in centre.iter_mut().zip(&self.pending[j]) {
                    *c += v;
                }
            }
            let n = close.len() as f64 + 1.0;
            for c in centre.iter_mut() {
                *c /= n;
            }
            let radius = {
                let mut s = self.standardised_distance(x, &centre);
                for &j in &close {
                    s += self.standardised_distance(&self.pending[j], &centre);
                }
                s / n
            };
            close.sort_unstable();
            for j in close.into_iter().rev() {
                self.pending.remove(j);
            }
            let id = self.create(centre, n, radius);
            return Assignment {
                cluster_id: Some(id),
                is_outlier: false,
                outlier_score: 0.0,
                reason: None,
                nearest_radii,
            };
        }
        if self.pending.len() == self.params.pending_capacity {
            self.pending.pop_front();
        }
        self.pending.push_back(x.to_vec());
        Assignment {
            cluster_id: None,
            is_outlier: true,
            outlier_score: score.max(0.5 + f64::EPSILON).min(1.0 - f64::EPSILON),
            reason: Some(OutlierReason::Score),
            nearest_radii,
        }
    }

    fn create(&mut self, centre: Vec<f64>, weight: f64, radius: f64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.centroids.extend_from_slice(&centre);
        self.clusters.push(ClusterMeta {
            id,
            weight,
            weighed_at: self.t,
            radius: if radius > 0.0 { radius } else { self.global_radius },
            drift: 0.0,
            updates: weight as u64,
            created_at: self.t,
            updated_at: self.t,
        });
        self.events.push((ClusterEvent::Created, id));
        id
    }

    /// Evicts the lowest-weight (stalest) cluster; false when there is none to evict.
    fn evict_stalest(&mut self) -> bool {
        let Some((i, w)) = self
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (i, self.weight_now(c)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
        else {
            return false;
        };
        let _ = w;
        self.remove(i, ClusterEvent::Evicted);
        true
    }

    fn remove(&mut self, i: usize, event: ClusterEvent) {
        let id = self.clusters[i].id;
        self.clusters.remove(i);
        self.centroids.drain(i * self.dim..(i + 1) * self.dim);
        self.events.push((event, id));
    }

    /// Merges cluster `i` with any cluster whose radius it overlaps.
    fn merge_around(&mut self, i: usize) {
        let mut j = 0;
        let mut i = i;
        while j < self.clusters.len() {
            if j == i {
                j += 1;
                continue;
            }
            let d = self.standardised_distance(self.centroid(i), self.centroid(j));
            let overlap = self.params.merge_overlap * (self.clusters[i].radius + self.clusters[j].radius);
            if d >= overlap {
                j += 1;
                continue;
            }
            // The heavier cluster survives and keeps its id.
            let (wi, wj) = (self.weight_now(&self.clusters[i]), self.weight_now(&self.clusters[j]));
            let (keep, gone) = if wi >= wj { (i, j) } else { (j, i) };
            let (wk, wg) = if wi >= wj { (wi, wj) } else { (wj, wi) };
            let dim = self.dim;
            for f in 0..dim {
                let g = self.centroids[gone * dim + f];
                let k = &mut self.centroids[keep * dim + f];
                *k = (*k * wk + g * wg) / (wk + wg);
            }
            let gone_meta = self.clusters[gone].clone();
            let t = self.t;
            let k = &mut self.clusters[keep];
            k.radius = (k.radius * wk + gone_meta.radius * wg) / (wk + wg) + d * wg / (wk + wg);
            k.weight = wk + wg;
            k.weighed_at = t;
            k.updates += gone_meta.updates;
            let keep_id = k.id;
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

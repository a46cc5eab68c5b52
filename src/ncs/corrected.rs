//! `ncs`: the NCS idea with the reference's defects fixed (section B of the algorithm notes).
//!
//! - One geometry: the Mahalanobis distance `D²` of a point to a cluster under the cluster's own
//!   running covariance: a full d×d matrix up to [`FULL_COVARIANCE_MAX_DIM`] features, so
//!   elongated clusters at any angle are described, and a per-feature (diagonal) variance above,
//!   where a full matrix would cost d² per cluster and need far more points to estimate. Young
//!   clusters blend their estimate with a prior (the pooled spread of mature clusters, or at the
//!   start one estimated from the warm-up points) and widen it for the uncertainty of their
//!   centroid. Everything is relative to running statistics, so results are invariant to scaling
//!   and translating the input.
//! - Acceptance from the cluster's own spread: a point joins its nearest cluster when
//!   `D² ≤ A = d + accept_sigmas·√(2d)` (the χ²_d mean plus `accept_sigmas` standard deviations).
//! - One scoring function: `score = D² / (D² + A)`, so a point at a centroid scores 0 and a
//!   point is an outlier exactly when its score exceeds 0.5.
//! - New clusters are born from `min_cluster_points` mutually close unplaced points that stand
//!   apart from every cluster, so isolated noise stays an outlier; at `max_clusters` the
//!   lowest-weight (stalest) cluster is evicted, and a cluster whose decayed weight falls below
//!   one point is retired.
//! - Stable `u64` ids, never reused; exponentially decayed member weight; confidence in [0, 1].
//! - Overlapping clusters (one centroid within the other's acceptance) merge, checked for the
//!   updated cluster only, every `merge_check_every` of its updates.
//! - Drift: a per-cluster drift coefficient (centroid displacement per update in units of the
//!   cluster's spread, smoothed); Page-Hinkley and ADWIN watching rises of the bounded,
//!   scale-free stream `min(D² / A, 2)` (points fitting the clusters worse); and per-cluster
//!   alarms: `appeared` (a cluster founded after the clusters settled whose members fit it like
//!   a blob's, not like background noise), `moved` (a centroid travelled further than a
//!   stationary one can wander) and `vanished` (an established cluster stopped receiving its
//!   share of points). All start once the clusters have settled after the warm-up, so the
//!   warm-up itself never alarms.
//!
//! Cost per point, with k clusters of dimension d: diagonal model, one fused O(k·d) pass over
//! contiguous centroids and inverse variances. Full model (d ≤ 8), an O(k·d) pass computing
//! a lower bound of every cluster's `D²` (the Euclidean distance in globally standardised units
//! times the cluster's smallest precision eigenvalue bound), then the exact O(d²) `D²` only for
//! the clusters whose bound beats the second-best exact distance (one to three on separated
//! data), an O(d²) covariance update of the winner, and an O(d³) refresh of its precision
//! every `max(1, d/4)` updates. No allocation per point.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::drift::{Adwin, PageHinkley};

/// Dimensions up to which every cluster keeps a full covariance matrix (above: a diagonal).
pub const FULL_COVARIANCE_MAX_DIM: usize = 8;

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
    /// Unplaced points remembered while waiting for company (capped at 65,536 values in all).
    pub pending_capacity: usize,
    /// Points used to estimate the feature scales before clustering starts.
    pub warmup_points: usize,
    /// Per-point decay of cluster weights (1 = no decay).
    pub decay: f64,
    /// Smallest centroid learning rate (tracks moving clusters).
    pub min_learning_rate: f64,
    /// Updates of a cluster between two merge checks.
    pub merge_check_every: u64,
    /// Page-Hinkley alarm threshold on the `min(D² / A, 2)` stream.
    pub page_hinkley_threshold: f64,
    /// Page-Hinkley's tolerated change of the mean of that stream.
    pub page_hinkley_delta: f64,
    /// ADWIN confidence on that stream.
    pub adwin_delta: f64,
}

impl Default for NcsParams {
    fn default() -> Self {
        Self {
            max_clusters: 256,
            accept_sigmas: 4.0,
            min_cluster_points: 3,
            pending_capacity: 256,
            warmup_points: 500,
            decay: 0.9999,
            min_learning_rate: 0.01,
            merge_check_every: 16,
            page_hinkley_threshold: 25.0,
            page_hinkley_delta: 0.1,
            adwin_delta: 1e-5,
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

/// A drift alarm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftAlarm {
    /// `page_hinkley` or `adwin` (points fit the clusters worse), `appeared` (a cluster founded
    /// after the clusters settled became established), `moved` (a cluster's centroid travelled
    /// further than a stationary one's can) or `vanished` (an established cluster stopped
    /// receiving points).
    pub detector: &'static str,
    /// The detector's statistic at the alarm: Page-Hinkley's cumulative sum, ADWIN's jump of
    /// the mean of `min(D²/A, 2)`, the new cluster's members, the moved centroid's distance
    /// in units of the cluster's spread, or the points the vanished cluster was expected to
    /// receive since its last.
    pub statistic: f64,
    /// The statistic in units of its alarm threshold (1 = just past it).
    pub strength: f64,
    /// The cluster concerned (`appeared`, `moved`, `vanished`).
    pub cluster: Option<u64>,
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
    /// Founded after the clusters settled, not yet announced as `appeared`.
    #[serde(default)]
    newcomer: bool,
    /// Announced as `vanished`, and no point since.
    #[serde(default)]
    silent: bool,
    /// A newcomer's points joined since its founding, and the sum of their `D² / A`.
    #[serde(default)]
    joined: u64,
    #[serde(default)]
    fit: f64,
    /// Smoothed `D²/A` of the points that joined (about the last 50): how the cluster's
    /// members fit it, blob-like or spread evenly like background noise.
    #[serde(default)]
    member_fit: f64,
    /// The centroid when the current `moved` span began (empty: not begun), and the cluster's
    /// update count then.
    #[serde(default)]
    anchor: Vec<f64>,
    #[serde(default)]
    anchored_at: u64,
    /// The last span raised `moved`: a cluster that keeps moving alarms once, when it starts,
    /// and again only after a span at rest.
    #[serde(default)]
    moving: bool,
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
/// Points between two refreshes of the prior, the frozen global scales and stale clusters.
const REFRESH_EVERY: u64 = 256;
/// Smallest covariance learning rate: the spread follows about the last 100 members.
const MIN_SPREAD_RATE: f64 = 0.01;
/// Periods of [`REFRESH_EVERY`] points between two full refreshes once the clusters settled.
const FULL_REFRESH_EVERY: u64 = 2;
/// Updates between two refreshes of a mature cluster's precision.
const MATURE_REFRESH_EVERY: u64 = 32;
/// The drift detectors start once no cluster was founded for this many points (or 30 per
/// live cluster, if more: with many clusters the rarer ones take longer to found)...
const SETTLE_QUIET: u64 = 1_000;
/// ...or at the latest after this many points.
const SETTLE_MAX: u64 = 20_000;
/// Points joined that make a cluster founded after the clusters settled an `appeared` alarm,
/// when they join within `APPEARED_WITHIN` points of its founding and fit it like members of a
/// blob rather than like background noise (see [`Ncs::announce_newcomer`]).
const APPEARED_AT: u64 = 20;
const APPEARED_WITHIN: u64 = 1_000;
/// Updates after which a cluster that stops receiving points raises `vanished`.
const ESTABLISHED: u64 = 50;
/// Points a cluster must have been expected to receive, and did not, to count as vanished
/// (the chance that a live cluster misses that many by luck is e^−20).
const VANISHED_AFTER: f64 = 20.0;
/// Weight from which a cluster's centroid is watched for `moved`: below it the centroid still
/// settles from its founders.
const MOVED_MIN_WEIGHT: f64 = 20.0;
/// `ln(1/p)` for the `moved` test's false-alarm probability p per check (e^−20 ≈ 2·10⁻⁹).
const MOVED_LOG_ODDS: f64 = 20.0;
/// Margin of the `moved` threshold over the χ² bound, for a covariance that is an estimate (or
/// a diagonal describing a rotated cluster).
const MOVED_MARGIN: f64 = 4.0;
/// Values kept in the pending buffer at most (`pending_capacity` is reduced to fit).
const PENDING_VALUES: usize = 65_536;

/// The corrected online clusterer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "NcsState")]
pub struct Ncs {
    params: NcsParams,
    dim: usize,
    /// Full covariance per cluster (`dim ≤ FULL_COVARIANCE_MAX_DIM`), else diagonal.
    full: bool,
    /// Points placed.
    t: u64,
    /// Acceptance bound `A` on `D²`.
    accept: f64,
    /// Per-feature running mean and sum of squared deviations (all points).
    mean: Vec<f64>,
    m2: Vec<f64>,
    seen: u64,
    /// Per-feature inverse global variance, frozen between refreshes (full model's bounds).
    scale: Vec<f64>,
    /// Flat k×d centroids, input units.
    centroids: Vec<f64>,
    /// Flat running member covariance, input units²: k×d×d (full) or k×d (diagonal).
    spread: Vec<f64>,
    /// Flat effective precision (inverse of the own spread blended with the prior, widened
    /// for the centroid's uncertainty), same layout as `spread`.
    inv_var: Vec<f64>,
    /// Per cluster (full model): a lower bound of `D²` per unit of squared standardised
    /// Euclidean distance.
    bound: Vec<f64>,
    clusters: Vec<ClusterMeta>,
    /// Per-feature variance young clusters borrow.
    prior: Vec<f64>,
    pending: VecDeque<Vec<f64>>,
    warmup: Vec<Vec<f64>>,
    next_id: u64,
    page_hinkley: PageHinkley,
    adwin: Adwin,
    /// The drift detectors run (the clusters settled after the warm-up).
    settled: bool,
    /// Step of the last cluster founded.
    last_created: u64,
    /// Streaming simplified silhouette (cohesion vs separation), smoothed.
    silhouette: f64,
    /// Lifecycle events since the last drain: (event, cluster id).
    events: Vec<(ClusterEvent, u64)>,
    #[serde(skip)]
    scratch: Scratch,
}

/// Per-point working memory, reused.
#[derive(Debug, Clone, Default)]
struct Scratch {
    /// Lower bounds per cluster.
    bounds: Vec<f64>,
    /// One d×d matrix.
    matrix: Vec<f64>,
    /// One d-vector.
    diff: Vec<f64>,
    /// The centroids feature by feature (`columns[f·k + i]` = centroid i's feature f), so the
    /// full model's bound pass runs over contiguous clusters and vectorises; `columns_for` is
    /// the cluster count they were built for, `None` once clusters were added, removed or
    /// merged (rebuilt on the next point).
    columns: Vec<f64>,
    columns_for: Option<usize>,
}

/// The serialised form, checked before it becomes an [`Ncs`]: a snapshot from another version
/// or a corrupted one must not index out of bounds later.
#[derive(Deserialize)]
struct NcsState {
    params: NcsParams,
    dim: usize,
    #[serde(default)]
    full: bool,
    t: u64,
    accept: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    seen: u64,
    #[serde(default)]
    scale: Vec<f64>,
    centroids: Vec<f64>,
    spread: Vec<f64>,
    inv_var: Vec<f64>,
    #[serde(default)]
    bound: Vec<f64>,
    clusters: Vec<ClusterMeta>,
    prior: Vec<f64>,
    pending: VecDeque<Vec<f64>>,
    warmup: Vec<Vec<f64>>,
    next_id: u64,
    page_hinkley: PageHinkley,
    adwin: Adwin,
    #[serde(default)]
    settled: bool,
    #[serde(default)]
    last_created: u64,
    silhouette: f64,
    events: Vec<(ClusterEvent, u64)>,
}

/// A snapshot whose parts do not fit together.
#[derive(Debug, thiserror::Error)]
#[error("inconsistent ncs state: {0}")]
pub struct StateError(&'static str);

impl TryFrom<NcsState> for Ncs {
    type Error = StateError;

    fn try_from(s: NcsState) -> Result<Self, StateError> {
        let d = s.dim;
        let k = s.clusters.len();
        if d == 0 || d > 1 << 16 {
            return Err(StateError("dimension"));
        }
        let ok = |v: &[f64], n: usize| v.len() == n;
        if !ok(&s.mean, d) || !ok(&s.m2, d) || !ok(&s.prior, d) || !ok(&s.centroids, k * d) {
            return Err(StateError("feature vectors"));
        }
        if s.pending.iter().chain(&s.warmup).any(|p| p.len() != d) {
            return Err(StateError("buffered points"));
        }
        // Snapshots from before the full covariance model have diagonal spreads; they are
        // rebuilt as diagonal matrices when the dimension now gets the full model.
        let full = d <= FULL_COVARIANCE_MAX_DIM;
        let cells = if full { d * d } else { d };
        let spread = if ok(&s.spread, k * cells) && s.full == full {
            s.spread
        } else if ok(&s.spread, k * d) && full {
            let mut m = vec![0.0; k * d * d];
            for i in 0..k {
                for f in 0..d {
                    m[i * d * d + f * d + f] = s.spread[i * d + f];
                }
            }
            m
        } else {
            return Err(StateError("cluster spreads"));
        };
        // Precisions, bounds and the scales they are computed in follow the refresh cadence
        // rather than the rest of the state, so a snapshot carries them; a snapshot without
        // them (or with values that cannot be right) gets them recomputed.
        // No NaN; a precision's diagonal must not be negative (a corrupted one could make D²
        // negative and scores leave [0, 1]); bounds and scales are non-negative. Zeros and
        // infinities stay allowed: extreme or constant features give them legitimately.
        let finite = |v: &[f64]| v.iter().all(|x| !x.is_nan());
        let sound_diagonal = |v: &[f64]| {
            v.chunks_exact(cells.max(1)).all(|p| {
                (0..d).all(|f| {
                    let cell = if full { f * d + f } else { f };
                    p.get(cell).is_some_and(|x| *x >= 0.0)
                })
            })
        };
        let derived = ok(&s.inv_var, k * cells)
            && ok(&s.bound, k)
            && ok(&s.scale, d)
            && finite(&s.inv_var)
            && sound_diagonal(&s.inv_var)
            && s.bound.iter().all(|b| *b >= 0.0)
            && s.scale.iter().all(|x| *x >= 0.0)
            && s.full == full;
        let (inv_var, bound, scale) = if derived {
            (s.inv_var, s.bound, s.scale)
        } else {
            (vec![0.0; k * cells], vec![0.0; k], vec![1.0; d])
        };
        let mut ncs = Ncs {
            params: s.params,
            dim: d,
            full,
            t: s.t,
            accept: s.accept,
            mean: s.mean,
            m2: s.m2,
            seen: s.seen,
            scale,
            centroids: s.centroids,
            spread,
            inv_var,
            bound,
            clusters: s.clusters,
            prior: s.prior,
            pending: s.pending,
            warmup: s.warmup,
            next_id: s.next_id,
            page_hinkley: s.page_hinkley,
            adwin: s.adwin,
            settled: s.settled,
            last_created: s.last_created,
            silhouette: s.silhouette,
            events: s.events,
            scratch: Scratch::default(),
        };
        if !derived {
            ncs.refresh_all();
        }
        Ok(ncs)
    }
}

impl Ncs {
    /// A fresh clusterer for points of dimension `dim`.
    pub fn new(params: NcsParams, dim: usize) -> Self {
        let d = dim.max(1) as f64;
        Self {
            page_hinkley: PageHinkley::new(
                30,
                params.page_hinkley_delta,
                params.page_hinkley_threshold,
                // No forgetting: with a tolerance as wide as ncs's, forgetting turns the
                // cumulative sum into a wandering process that crosses any threshold in time.
                1.0,
            )
            .rising_only(),
            adwin: Adwin::new(params.adwin_delta).rising_only(),
            accept: d + params.accept_sigmas * (2.0 * d).sqrt(),
            params,
            dim,
            full: dim <= FULL_COVARIANCE_MAX_DIM,
            t: 0,
            mean: vec![0.0; dim],
            m2: vec![0.0; dim],
            seen: 0,
            scale: vec![1.0; dim],
            centroids: Vec::new(),
            spread: Vec::new(),
            inv_var: Vec::new(),
            bound: Vec::new(),
            clusters: Vec::new(),
            prior: vec![1.0; dim],
            pending: VecDeque::new(),
            warmup: Vec::new(),
            next_id: 0,
            settled: false,
            last_created: 0,
            silhouette: 0.0,
            events: Vec::new(),
            scratch: Scratch::default(),
        }
    }

    /// The stream's dimension.
    pub fn dimension(&self) -> usize {
        self.dim
    }

    /// Whether clusters keep a full covariance matrix (else a per-feature variance).
    pub fn full_covariance(&self) -> bool {
        self.full
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

    fn cells(&self) -> usize {
        if self.full {
            self.dim * self.dim
        } else {
            self.dim
        }
    }

    /// Variance of feature `f` within cluster `i`.
    fn variance(&self, i: usize, f: usize) -> f64 {
        if self.full {
            self.spread[i * self.dim * self.dim + f * self.dim + f]
        } else {
            self.spread[i * self.dim + f]
        }
    }

    fn state(&self, i: usize) -> ClusterState {
        let c = &self.clusters[i];
        let weight = self.weight_now(c);
        let radius = (0..self.dim)
            .map(|f| self.variance(i, f) / self.global_var(f))
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
        // powi (repeated squaring) is several times cheaper than powf on the hot path.
        let dt = (self.t - c.weighed_at).min(i32::MAX as u64) as i32;
        c.weight * self.params.decay.powi(dt)
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

    /// `D²` of `x` to cluster `i` under its effective precision.
    fn d2(&self, i: usize, x: &[f64]) -> f64 {
        let d = self.dim;
        let c = &self.centroids[i * d..(i + 1) * d];
        if !self.full {
            let w = &self.inv_var[i * d..(i + 1) * d];
            return x
                .iter()
                .zip(c)
                .zip(w)
                .map(|((x, c), w)| (x - c) * (x - c) * w)
                .sum();
        }
        let p = &self.inv_var[i * d * d..(i + 1) * d * d];
        quadratic(p, x, c)
    }

    /// `D²` of cluster `a`'s centroid to cluster `b`.
    fn d2_rows(&self, a: usize, b: usize) -> f64 {
        let d = self.dim;
        self.d2(b, &self.centroids[a * d..(a + 1) * d])
    }

    /// `D²` between two points under the prior spread.
    fn d2_prior(&self, a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .zip(&self.prior)
            .map(|((x, y), v)| (x - y) * (x - y) / v)
            .sum()
    }

    /// Recomputes cluster `i`'s effective precision (and, full model, its distance bound) from
    /// its spread, the prior and its update count.
    fn refresh_inv_var(&mut self, i: usize) {
        let d = self.dim;
        let n = (self.clusters[i].updates as f64).min(1.0 / MIN_SPREAD_RATE);
        // The centroid is a mean of about n points: a new member's offset from it varies by
        // the spread times (1 + 1/n).
        let widen = 1.0 + 1.0 / n.max(1.0);
        // Per-feature variances from n points are noisy, and the noise of their inverses adds
        // up over d features while the acceptance margin shrinks as 1/√d: in high dimensions
        // they need more points before they outweigh the prior's shape.
        let prior_weight = PRIOR_WEIGHT * (d as f64 / 64.0).sqrt().max(1.0);
        let own_share = n / (n + prior_weight);
        // The prior's shape at the cluster's own overall scale: that one number is estimated
        // from all d features at once, so it is sharp even for a young cluster in high
        // dimensions, where per-feature variances from a few points are too noisy to invert
        // (their noise would inflate every D²). It is trusted as it accumulates n·d values.
        let ratio = (0..d)
            .map(|f| self.variance(i, f) / self.prior[f].max(f64::MIN_POSITIVE))
            .sum::<f64>()
            / d as f64;
        let dof = n * d as f64;
        let ratio = (dof * ratio + prior_weight) / (dof + prior_weight);
        if !self.full {
            for f in 0..d {
                let own = self.spread[i * d + f];
                let v = own_share * own + (1.0 - own_share) * ratio * self.prior[f];
                self.inv_var[i * d + f] =
                    1.0 / (widen * v.max(self.floor_var(f))).max(f64::MIN_POSITIVE);
            }
            return;
        }
        let mut m = std::mem::take(&mut self.scratch.matrix);
        m.clear();
        m.resize(d * d, 0.0);
        // Updates maintain the spread's lower triangle: mirror it.
        let spread = &self.spread[i * d * d..(i + 1) * d * d];
        for a in 0..d {
            for b in 0..a {
                let v = own_share * spread[a * d + b] * widen;
                m[a * d + b] = v;
                m[b * d + a] = v;
            }
            let diag = own_share * spread[a * d + a] + (1.0 - own_share) * ratio * self.prior[a];
            m[a * d + a] = diag.max(self.floor_var(a)) * widen;
        }
        // Largest eigenvalue of the standardised covariance, bounded by Gershgorin's circles:
        // D² ≥ |x − c|²_standardised / λ_max.
        let mut lambda = 0.0f64;
        let roots: [f64; FULL_COVARIANCE_MAX_DIM] =
            std::array::from_fn(|f| self.scale.get(f).map_or(0.0, |s| s.sqrt()));
        for a in 0..d {
            let row: f64 = (0..d).map(|b| m[a * d + b].abs() * roots[b]).sum();
            lambda = lambda.max(row * roots[a]);
        }
        self.bound[i] = if lambda > 0.0 { 1.0 / lambda } else { 0.0 };
        let out = &mut self.inv_var[i * d * d..(i + 1) * d * d];
        if !invert_spd(&m, d, out) {
            // Numerically singular: fall back to the diagonal.
            out.fill(0.0);
            for f in 0..d {
                out[f * d + f] = 1.0 / m[f * d + f].max(f64::MIN_POSITIVE);
            }
        }
        self.scratch.matrix = m;
    }

    /// The prior (mean spread of mature clusters, if any), the frozen global scales, every
    /// precision; clusters whose weight decayed below one point are retired.
    fn refresh_all(&mut self) {
        self.refresh_prior();
        for f in 0..self.dim {
            self.scale[f] = 1.0 / self.global_var(f);
        }
        for i in 0..self.clusters.len() {
            self.refresh_inv_var(i);
        }
    }

    /// Every [`REFRESH_EVERY`] points: the prior and retirement, and the precisions of young
    /// clusters (mature ones refresh on their own cadence, see [`Ncs::update`]). The global
    /// scales, which every cluster's distance bound is computed in, change only with a full
    /// refresh of all clusters: until the clusters settled, then every
    /// [`FULL_REFRESH_EVERY`] periods (an O(k·d³) step amortised over thousands of points).
    fn refresh_periodic(&mut self) {
        if !self.settled || (self.t / REFRESH_EVERY) % FULL_REFRESH_EVERY == 0 {
            self.refresh_all();
            return;
        }
        self.refresh_prior();
        for i in 0..self.clusters.len() {
            if (self.clusters[i].updates as f64) * MIN_SPREAD_RATE < 1.0 {
                self.refresh_inv_var(i);
            }
        }
    }

    /// The prior from the clusters with a few updates; clusters whose weight decayed below one
    /// point are retired.
    fn refresh_prior(&mut self) {
        // Pooled over the clusters with a few updates, each weighted by its (capped) count, so
        // young clusters inform the prior early and mature ones dominate it.
        let weights: Vec<(usize, f64)> = (0..self.clusters.len())
            .filter(|&i| self.clusters[i].updates >= 5)
            .map(|i| {
                (
                    i,
                    (self.clusters[i].updates as f64).min(1.0 / MIN_SPREAD_RATE),
                )
            })
            .collect();
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total >= MATURE as f64 {
            for f in 0..self.dim {
                self.prior[f] = weights
                    .iter()
                    .map(|&(i, w)| w * self.variance(i, f))
                    .sum::<f64>()
                    / total;
            }
        }
        let mut i = 0;
        while i < self.clusters.len() {
            if self.t > 0 && self.weight_now(&self.clusters[i]) < 1.0 {
                self.remove(i, ClusterEvent::Evicted);
            } else {
                i += 1;
            }
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
    ///
    /// The points are placed in order, which founds and trains the first clusters; their
    /// assignments are then read against the clusters they formed, so a point that helped
    /// found a cluster is reported in it rather than as the outlier it was while alone.
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
        // Repeated until the prior settles: each round's clusters accept a wider region than
        // the last when the prior was too small (a handful of rounds in two dimensions, one in
        // high ones, where distances concentrate).
        for _ in 0..12 {
            let before = self.prior.clone();
            let mut rehearsal = self.clone();
            for p in &buffered {
                rehearsal.place(p, &mut Vec::new());
            }
            // The clusters the rehearsal founded rescale the prior feature by feature: when it
            // is far too small, only the founders' own spread (unbiased) shows how much wider
            // it must be. Per feature, the members' median cluster, not the mean, so one
            // cluster that ran away (grew over a neighbouring blob) does not widen everyone's
            // prior; at most 8× per round.
            let members: f64 = rehearsal.clusters.iter().map(|c| c.updates as f64).sum();
            if members < 2.0 * self.params.min_cluster_points as f64 {
                // Hardly anything formed: the prior is far too small to call any warm-up
                // points close (nearest neighbours are very close in few dimensions).
                for v in &mut self.prior {
                    *v *= 2.0;
                }
                self.refresh_all();
                continue;
            }
            let mut ratios: Vec<(f64, f64)> = Vec::with_capacity(rehearsal.clusters.len());
            for f in 0..self.dim {
                ratios.clear();
                ratios.extend((0..rehearsal.clusters.len()).map(|i| {
                    (
                        rehearsal.variance(i, f) / self.prior[f],
                        rehearsal.clusters[i].updates as f64,
                    )
                }));
                ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
                let mut seen = 0.0;
                let mut ratio = 1.0;
                for (r, w) in &ratios {
                    seen += w;
                    if seen >= members / 2.0 {
                        ratio = r.clamp(0.125, 8.0);
                        break;
                    }
                }
                if ratio.is_finite() && ratio > 0.0 {
                    self.prior[f] = (self.prior[f] * ratio).max(self.floor_var(f));
                }
            }
            self.refresh_all();
            let settled = self
                .prior
                .iter()
                .zip(&before)
                .all(|(now, was)| (now - was).abs() <= 0.05 * was.abs());
            if settled {
                break;
            }
        }
        for p in &buffered {
            self.place(p, alarms);
        }
        for p in &buffered {
            let a = self.judge(p);
            assignments.push(a);
        }
    }

    /// The assignment of `x` against the current clusters, without learning from it.
    fn judge(&mut self, x: &[f64]) -> Assignment {
        let (best, best_d2, _) = self.nearest(x);
        if best == usize::MAX {
            return outlier(1.0 - f64::EPSILON, None);
        }
        let nearest = best_d2 / self.accept;
        let score = best_d2 / (best_d2 + self.accept);
        if best_d2 <= self.accept {
            return Assignment {
                cluster_id: Some(self.clusters[best].id),
                is_outlier: false,
                outlier_score: score,
                reason: None,
                nearest: Some(nearest),
            };
        }
        outlier(score, Some(nearest))
    }

    /// The first prior: isotropic in online-standardised units, scaled so that a close pair of
    /// warm-up points (a low quantile of nearest-neighbour distances, which stays within one
    /// blob even when there are more blobs than warm-up points) is a typical member pair. An
    /// underestimate only splits blobs at first, which the rehearsals and merges repair; an
    /// overestimate would let one cluster swallow several blobs.
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
        let mut nearest: Vec<f64> = pts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                pts.iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, q)| dist2(p, q))
                    .min_by(f64::total_cmp)
            })
            .collect();
        nearest.sort_by(f64::total_cmp);
        let low = nearest.get(nearest.len() / 4).copied().unwrap_or(0.0);
        // A member pair differs by twice the per-feature variance in every feature.
        let per_feature = (low / (2.0 * self.dim as f64)).max(1e-12);
        for f in 0..self.dim {
            self.prior[f] = per_feature * self.global_var(f);
        }
        self.refresh_all();
    }

    /// The nearest cluster by `D²` (index, `D²`, second-best `D²`); `usize::MAX` when there
    /// is none.
    fn nearest(&mut self, x: &[f64]) -> (usize, f64, f64) {
        let (mut best, mut best_d2, mut second_d2) = (usize::MAX, f64::INFINITY, f64::INFINITY);
        let d = self.dim;
        if !self.full {
            // One fused pass over the contiguous centroids and inverse variances.
            let rows = self
                .centroids
                .chunks_exact(d)
                .zip(self.inv_var.chunks_exact(d));
            for (i, (c, w)) in rows.enumerate() {
                let mut d2 = 0.0;
                for ((xi, ci), wi) in x.iter().zip(c).zip(w) {
                    let diff = xi - ci;
                    d2 += diff * diff * wi;
                }
                if d2 < best_d2 {
                    second_d2 = best_d2;
                    best = i;
                    best_d2 = d2;
                } else if d2 < second_d2 {
                    second_d2 = d2;
                }
            }
            return (best, best_d2, second_d2);
        }
        // Lower bounds for every cluster in one pass, remembering the lowest; its exact
        // distance first, then exact distances in bound order while a bound can still beat
        // the best: that settles the nearest cluster. The second best is only needed for the
        // silhouette: the exact ones computed or the lowest bound left, whichever is smaller.
        let mut bounds = std::mem::take(&mut self.scratch.bounds);
        bounds.clear();
        let k = self.clusters.len();
        if self.scratch.columns_for != Some(k) {
            let columns = &mut self.scratch.columns;
            columns.clear();
            columns.extend((0..d * k).map(|cell| self.centroids[(cell % k) * d + cell / k]));
            self.scratch.columns_for = Some(k);
        }
        let (mut pick, next) = lower_bounds(
            x,
            &self.scratch.columns,
            &self.scale,
            &self.bound,
            &mut bounds,
        );
        if pick != usize::MAX {
            // Usually the lowest bound's cluster is the nearest and no other bound comes
            // below its distance: one exact distance, no second pass.
            let d2 = self.d2(pick, x);
            if next >= d2 {
                self.scratch.bounds = bounds;
                return (pick, d2, next);
            }
        }
        while pick != usize::MAX {
            bounds[pick] = f64::INFINITY;
            let d2 = self.d2(pick, x);
            if d2 < best_d2 {
                second_d2 = best_d2;
                best = pick;
                best_d2 = d2;
            } else if d2 < second_d2 {
                second_d2 = d2;
            }
            pick = usize::MAX;
            let mut lowest = best_d2;
            for (i, &b) in bounds.iter().enumerate() {
                if b < lowest {
                    (pick, lowest) = (i, b);
                }
            }
        }
        let rest = bounds.iter().copied().fold(f64::INFINITY, f64::min);
        second_d2 = second_d2.min(rest);
        self.scratch.bounds = bounds;
        (best, best_d2, second_d2)
    }

    fn place(&mut self, x: &[f64], alarms: &mut Vec<DriftAlarm>) -> Assignment {
        self.t += 1;
        if self.t % REFRESH_EVERY == 0 {
            self.refresh_periodic();
            if self.settled {
                self.find_vanished(alarms);
            }
        }
        let (best, best_d2, second_d2) = self.nearest(x);
        if best == usize::MAX {
            return self.unplaced(x, 1.0 - f64::EPSILON, None);
        }
        // Never negative for a sound precision; a corrupted one restored from a snapshot must
        // not push scores out of [0, 1] (it is replaced at the next refresh).
        let best_d2 = best_d2.max(0.0);
        let nearest = best_d2 / self.accept;
        let score = best_d2 / (best_d2 + self.accept);
        self.feed_detectors(nearest, alarms);
        if best_d2 <= self.accept {
            if second_d2.is_finite() {
                let (a, b) = (best_d2.sqrt(), second_d2.sqrt());
                let s = (b - a) / a.max(b).max(f64::MIN_POSITIVE);
                self.silhouette += 0.001 * (s - self.silhouette);
            }
            let c = &mut self.clusters[best];
            c.member_fit += 0.02 * (nearest - c.member_fit);
            if c.newcomer {
                self.judge_newcomer(best, nearest, alarms);
            }
            let id = self.update(best, x, best_d2, alarms);
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

    /// The mean `D²/A` of a cluster's members below which they fit it like a blob's: the
    /// midpoint of a Gaussian blob's `d/A` and the `d/(d+2)` of points spread evenly over the
    /// acceptance region (see [`Ncs::judge_newcomer`]).
    fn blob_fit_cut(&self) -> f64 {
        let d = self.dim as f64;
        0.5 * (d / self.accept + d / (d + 2.0))
    }

    /// Counts a point joining newcomer `i` at `D²/A` = `fit`, and decides `appeared` once
    /// [`APPEARED_AT`] points joined it within [`APPEARED_WITHIN`] points of its founding, if
    /// they fit it like a blob's members (a newcomer that gathers them later is never
    /// announced).
    ///
    /// Noise points that happen to lie close found clusters too, and in a stream with uniform
    /// background noise such a cluster keeps gathering: the noise points inside its acceptance
    /// region `D² ≤ A` are spread evenly over it, so their mean `D²/A` is `d/(d+2)` (the mean
    /// of a uniform point in a d-ball), while a Gaussian blob's members have a mean `D²` of `d`,
    /// a mean `D²/A` of `d/A`. A newcomer whose joined points average below the midpoint of the
    /// two is announced.
    fn judge_newcomer(&mut self, i: usize, fit: f64, alarms: &mut Vec<DriftAlarm>) {
        let cut = self.blob_fit_cut();
        let t = self.t;
        let c = &mut self.clusters[i];
        if t - c.created_at > APPEARED_WITHIN {
            c.newcomer = false;
            return;
        }
        c.joined += 1;
        c.fit += fit;
        if c.joined < APPEARED_AT {
            return;
        }
        c.newcomer = false;
        if c.fit / c.joined as f64 <= cut {
            alarms.push(DriftAlarm {
                detector: "appeared",
                statistic: c.joined as f64,
                strength: 1.0,
                cluster: Some(c.id),
            });
        }
    }

    /// `vanished` for each established cluster that missed [`VANISHED_AFTER`] of the points
    /// its share of the stream would have brought since its last one. The share is its decayed
    /// weight over the decayed count of points while it lived.
    fn find_vanished(&mut self, alarms: &mut Vec<DriftAlarm>) {
        let decay = self.params.decay;
        let t = self.t;
        let cut = self.blob_fit_cut();
        for c in &mut self.clusters {
            // A cluster gathered from background noise is no source that could stop.
            if c.silent || c.updates < ESTABLISHED || c.member_fit > cut {
                continue;
            }
            let age = (c.updated_at - c.created_at + 1) as f64;
            let lived = if decay < 1.0 {
                (1.0 - decay.powf(age)) / (1.0 - decay)
            } else {
                age
            };
            let share = (c.weight / lived).min(1.0);
            let missed = share * (t - c.updated_at) as f64;
            if missed >= VANISHED_AFTER {
                c.silent = true;
                alarms.push(DriftAlarm {
                    detector: "vanished",
                    statistic: missed,
                    strength: missed / VANISHED_AFTER,
                    cluster: Some(c.id),
                });
            }
        }
    }

    fn feed_detectors(&mut self, nearest: f64, alarms: &mut Vec<DriftAlarm>) {
        if !self.settled {
            // The first clusters form, merge and grow: their distances change by design.
            let quiet = self.t.saturating_sub(self.last_created);
            let needed = SETTLE_QUIET.max(30 * self.clusters.len() as u64);
            if !(quiet >= needed || self.t >= SETTLE_MAX) {
                return;
            }
            self.settled = true;
        }
        // Bounded: an outlier weighs like two acceptance radii however far it is, so a steady
        // share of far outliers is a steady mean, not a stream of spikes.
        let v = nearest.min(2.0);
        if let Some(statistic) = self.page_hinkley.update(v) {
            alarms.push(DriftAlarm {
                detector: "page_hinkley",
                statistic,
                strength: statistic / self.params.page_hinkley_threshold,
                cluster: None,
            });
        }
        if let Some(statistic) = self.adwin.update(v) {
            // A rise of the mean by half an acceptance radius is a clear change.
            alarms.push(DriftAlarm {
                detector: "adwin",
                statistic,
                strength: statistic / 0.5,
                cluster: None,
            });
        }
    }

    /// Moves cluster `i` towards `x`, whose `D²` to it is `d2`.
    fn update(&mut self, i: usize, x: &[f64], d2: f64, alarms: &mut Vec<DriftAlarm>) -> u64 {
        let t = self.t;
        let d = self.dim;
        let weight = self.weight_now(&self.clusters[i]) + 1.0;
        let rate = (1.0 / weight).max(self.params.min_learning_rate);
        let beta = (1.0 / (self.clusters[i].updates as f64 + 1.0)).max(MIN_SPREAD_RATE);
        // The centroid moves by rate·(x − c): under the cluster's precision that is rate²·D².
        let moved = rate * rate * d2;
        let mut diff = std::mem::take(&mut self.scratch.diff);
        diff.clear();
        {
            let c = &mut self.centroids[i * d..(i + 1) * d];
            for (xi, ci) in x.iter().zip(c.iter_mut()) {
                let delta = xi - *ci;
                diff.push(delta);
                *ci += rate * delta;
            }
            let k = self.clusters.len();
            if self.scratch.columns_for == Some(k) {
                for (f, v) in c.iter().enumerate() {
                    self.scratch.columns[f * k + i] = *v;
                }
            }
        }
        if self.full {
            let s = &mut self.spread[i * d * d..(i + 1) * d * d];
            let keep = beta * (1.0 - rate);
            spread_update(s, &diff, keep, beta);
        } else {
            for (delta, s) in diff.iter().zip(&mut self.spread[i * d..(i + 1) * d]) {
                *s += beta * (delta * delta * (1.0 - rate) - *s);
            }
        }
        self.scratch.diff = diff;
        let c = &mut self.clusters[i];
        c.weight = weight;
        c.weighed_at = t;
        c.drift += 0.05 * (moved.sqrt() - c.drift);
        c.updates += 1;
        c.updated_at = t;
        c.silent = false;
        let id = c.id;
        let updates = c.updates;
        let check = updates % self.params.merge_check_every == 0;
        // The precision follows the spread, which moves by β per update: every update while
        // the cluster is young, then every max(1, d/4) updates (full model, O(d³) each), and
        // every `MATURE_REFRESH_EVERY` once β is at its floor (a spread then changes by about
        // 1 % per update).
        let every = if updates as f64 * MIN_SPREAD_RATE >= 1.0 {
            MATURE_REFRESH_EVERY
        } else if self.full {
            (d / 4).max(1) as u64
        } else {
            1
        };
        if updates <= 2 * d as u64 + 8 || updates % every == 0 {
            self.refresh_inv_var(i);
        }
        if self.settled && weight >= MOVED_MIN_WEIGHT {
            self.watch_movement(i, rate, alarms);
        }
        self.events.push((ClusterEvent::Updated, id));
        if check {
            self.merge_around(i);
        }
        id
    }

    /// `moved` when cluster `i`'s centroid travelled further over its last `3/r` updates (r
    /// its learning rate) than a stationary cluster's could.
    ///
    /// A centroid learning at rate r from a stationary blob with covariance Σ wanders with
    /// covariance `r/(2−r)·Σ`, and two of its positions m updates apart differ with covariance
    /// `v·Σ`, v = `2r/(2−r)·(1 − (1−r)^m)`, so the difference's `D²` (under Σ) is about
    /// `v·χ²_d`. The alarm threshold is [`MOVED_MARGIN`]·v times the Laurent–Massart bound
    /// `d + 2√(dL) + 2L` on χ²_d's tail at probability e^−L. A blob moving a tenth of its width
    /// per 100 of its points exceeds it several times over; cost: O(d) (O(d²) for the full
    /// model) per span.
    fn watch_movement(&mut self, i: usize, rate: f64, alarms: &mut Vec<DriftAlarm>) {
        let d = self.dim;
        let centroid = &self.centroids[i * d..(i + 1) * d];
        let c = &mut self.clusters[i];
        if c.anchor.len() != d {
            c.anchor.clear();
            c.anchor.extend_from_slice(centroid);
            c.anchored_at = c.updates;
            return;
        }
        // Over 3/r updates the two positions are nearly independent (correlation e^−3) and
        // a steady move has built up nine times the squared displacement of 1/r updates.
        let span = (3.0 / rate).ceil() as u64;
        if c.updates - c.anchored_at < span {
            return;
        }
        let elapsed = (c.updates - c.anchored_at) as f64;
        let mut diff = std::mem::take(&mut self.scratch.diff);
        diff.clear();
        diff.extend(centroid.iter().zip(&c.anchor).map(|(a, b)| a - b));
        c.anchor.copy_from_slice(centroid);
        c.anchored_at = c.updates;
        let moved = if self.full {
            quadratic_diff(&self.inv_var[i * d * d..(i + 1) * d * d], &diff)
        } else {
            diff.iter()
                .zip(&self.inv_var[i * d..(i + 1) * d])
                .map(|(v, w)| v * v * w)
                .sum()
        };
        self.scratch.diff = diff;
        let df = d as f64;
        let wander = 2.0 * rate / (2.0 - rate) * (1.0 - (1.0 - rate).powf(elapsed));
        let bound = df + 2.0 * (df * MOVED_LOG_ODDS).sqrt() + 2.0 * MOVED_LOG_ODDS;
        let threshold = MOVED_MARGIN * wander * bound;
        let was_moving = std::mem::replace(&mut c.moving, moved > threshold);
        if moved > threshold && !was_moving {
            alarms.push(DriftAlarm {
                detector: "moved",
                statistic: moved.sqrt(),
                strength: moved / threshold,
                cluster: Some(c.id),
            });
        }
    }

    fn unplaced(&mut self, x: &[f64], score: f64, nearest: Option<f64>) -> Assignment {
        // Two members of one blob differ by twice its variance per feature.
        let reach = 2.0 * self.accept;
        let close = self
            .pending
            .iter()
            .filter(|p| self.d2_prior(x, p) <= reach)
            .count();
        // A new cluster must stand apart: fringe points of a cluster stay outliers instead of
        // splitting it.
        let apart = nearest.is_none_or(|r| r > 2.0);
        if apart && close + 1 >= self.params.min_cluster_points {
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
            let mut j = self.pending.len();
            while j > 0 {
                j -= 1;
                if self.d2_prior(x, &self.pending[j]) <= reach {
                    if let Some(p) = self.pending.remove(j) {
                        members.push(p);
                    }
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
        let capacity = self
            .params
            .pending_capacity
            .min(PENDING_VALUES / self.dim.max(1))
            .max(1);
        while self.pending.len() >= capacity {
            self.pending.pop_front();
        }
        self.pending.push_back(x.to_vec());
        outlier(score, nearest)
    }

    fn create(&mut self, members: &[Vec<f64>]) -> u64 {
        let d = self.dim;
        let n = members.len() as f64;
        let mut centre = vec![0.0; d];
        for m in members {
            for (c, v) in centre.iter_mut().zip(m) {
                *c += v / n;
            }
        }
        // Unbiased (n − 1) scatter of the founders.
        let norm = (n - 1.0).max(1.0);
        let cells = self.cells();
        let mut spread = vec![0.0; cells];
        for m in members {
            if self.full {
                for a in 0..d {
                    for b in 0..d {
                        spread[a * d + b] += (m[a] - centre[a]) * (m[b] - centre[b]) / norm;
                    }
                }
            } else {
                for ((s, v), c) in spread.iter_mut().zip(m).zip(&centre) {
                    *s += (v - c) * (v - c) / norm;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.centroids.extend_from_slice(&centre);
        self.scratch.columns_for = None;
        self.spread.extend_from_slice(&spread);
        self.inv_var.extend(std::iter::repeat_n(0.0, cells));
        self.bound.push(0.0);
        self.clusters.push(ClusterMeta {
            id,
            weight: n,
            weighed_at: self.t,
            drift: 0.0,
            updates: members.len() as u64,
            created_at: self.t,
            updated_at: self.t,
            newcomer: self.settled,
            silent: false,
            joined: 0,
            fit: 0.0,
            member_fit: 0.0,
            anchor: Vec::new(),
            anchored_at: 0,
            moving: false,
        });
        self.last_created = self.t;
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
        let cells = self.cells();
        self.clusters.remove(i);
        self.centroids.drain(i * self.dim..(i + 1) * self.dim);
        self.scratch.columns_for = None;
        self.spread.drain(i * cells..(i + 1) * cells);
        self.inv_var.drain(i * cells..(i + 1) * cells);
        self.bound.remove(i);
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
            if self.apart(i, j) {
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
            self.combine(keep, gone, wk, wg);
            let gone_updates = self.clusters[gone].updates;
            let t = self.t;
            let k = &mut self.clusters[keep];
            k.weight = wk + wg;
            k.weighed_at = t;
            k.updates += gone_updates;
            k.anchor.clear();
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

    /// Neither centroid lies within the other's acceptance. The full model first tries the
    /// O(d) lower bounds of both `D²` (most pairs are far apart), then the exact O(d²) ones.
    fn apart(&self, i: usize, j: usize) -> bool {
        if self.full {
            let (a, b) = (self.centroid(i), self.centroid(j));
            let e: f64 = a
                .iter()
                .zip(b)
                .zip(&self.scale)
                .map(|((x, y), s)| (x - y) * (x - y) * s)
                .sum();
            if e * self.bound[i] > self.accept && e * self.bound[j] > self.accept {
                return true;
            }
        }
        self.d2_rows(i, j) > self.accept && self.d2_rows(j, i) > self.accept
    }

    /// Cluster `keep` becomes the weighted union of itself and `gone`: centroid and covariance
    /// (each part's covariance plus its centroid's offset from the merged one).
    fn combine(&mut self, keep: usize, gone: usize, wk: f64, wg: f64) {
        let d = self.dim;
        let total = wk + wg;
        let mut merged = vec![0.0; d];
        for (f, m) in merged.iter_mut().enumerate() {
            *m = (self.centroids[keep * d + f] * wk + self.centroids[gone * d + f] * wg) / total;
        }
        let ok: Vec<f64> = (0..d)
            .map(|f| self.centroids[keep * d + f] - merged[f])
            .collect();
        let og: Vec<f64> = (0..d)
            .map(|f| self.centroids[gone * d + f] - merged[f])
            .collect();
        let cells = self.cells();
        for cell in 0..cells {
            let (a, b) = if self.full {
                (cell / d, cell % d)
            } else {
                (cell, cell)
            };
            if a < b {
                // The upper triangle is not maintained (see `update`).
                continue;
            }
            let (k, g) = (keep * cells + cell, gone * cells + cell);
            self.spread[k] = (wk * (self.spread[k] + ok[a] * ok[b])
                + wg * (self.spread[g] + og[a] * og[b]))
                / total;
        }
        self.centroids[keep * d..(keep + 1) * d].copy_from_slice(&merged);
        self.scratch.columns_for = None;
    }
}

/// An unplaced point's assignment.
fn outlier(score: f64, nearest: Option<f64>) -> Assignment {
    Assignment {
        cluster_id: None,
        is_outlier: true,
        outlier_score: score.clamp(0.5 + f64::EPSILON, 1.0 - f64::EPSILON),
        reason: Some(OutlierReason::Score),
        nearest,
    }
}

/// `(x − c)ᵀ P (x − c)` for a symmetric d×d `P` (d ≤ [`FULL_COVARIANCE_MAX_DIM`]).
fn quadratic(p: &[f64], x: &[f64], c: &[f64]) -> f64 {
    let mut diff = [0.0f64; FULL_COVARIANCE_MAX_DIM];
    for ((v, xf), cf) in diff.iter_mut().zip(x).zip(c) {
        *v = xf - cf;
    }
    quadratic_diff(p, &diff[..x.len()])
}

/// The full model's lower bound of every cluster's `D²` to `x` (its standardised squared
/// distance times the cluster's eigenvalue bound) into `bounds`, from the centroids stored
/// feature by feature; the lowest one's index and the second lowest bound.
fn lower_bounds(
    x: &[f64],
    columns: &[f64],
    scale: &[f64],
    bound: &[f64],
    bounds: &mut Vec<f64>,
) -> (usize, f64) {
    let k = bound.len();
    bounds.clear();
    bounds.resize(k, 0.0);
    if k == 0 {
        return (usize::MAX, f64::INFINITY);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports AVX (checked just above), all `standardised_avx` needs.
        unsafe { standardised_avx(x, columns, scale, bounds) };
    } else {
        standardised(x, columns, scale, bounds);
    }
    #[cfg(not(target_arch = "x86_64"))]
    standardised(x, columns, scale, bounds);
    let (mut pick, mut lowest, mut next) = (usize::MAX, f64::INFINITY, f64::INFINITY);
    for (i, (e, b)) in bounds.iter_mut().zip(bound).enumerate() {
        *e *= b;
        if *e < lowest {
            next = lowest;
            (pick, lowest) = (i, *e);
        } else if *e < next {
            next = *e;
        }
    }
    (pick, next)
}

/// Clusters per block of [`standardised`]: its accumulators stay in registers.
const LANES: usize = 8;

/// The squared standardised distance of `x` to every cluster into `out` (one per cluster),
/// from the centroids stored feature by feature (`columns[f·k + i]`). Blocks of [`LANES`]
/// clusters are summed feature by feature in registers (independent lanes, so they vectorise);
/// each distance is summed in feature order, whatever the instruction set.
#[inline(always)]
fn standardised(x: &[f64], columns: &[f64], scale: &[f64], out: &mut [f64]) {
    let k = out.len();
    let blocks = k / LANES * LANES;
    for base in (0..blocks).step_by(LANES) {
        let mut acc = [0.0f64; LANES];
        for ((&xf, &sf), column) in x.iter().zip(scale).zip(columns.chunks_exact(k)) {
            for (a, &c) in acc.iter_mut().zip(&column[base..base + LANES]) {
                let diff = xf - c;
                *a += diff * diff * sf;
            }
        }
        out[base..base + LANES].copy_from_slice(&acc);
    }
    for (i, e) in out.iter_mut().enumerate().skip(blocks) {
        for ((&xf, &sf), column) in x.iter().zip(scale).zip(columns.chunks_exact(k)) {
            let diff = xf - column[i];
            *e += diff * diff * sf;
        }
    }
}

/// [`standardised`] compiled for AVX: four lanes per instruction instead of two, the same
/// operations in the same order, so the same results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn standardised_avx(x: &[f64], columns: &[f64], scale: &[f64], out: &mut [f64]) {
    standardised(x, columns, scale, out);
}

/// `$f::<N>(args)` with the const N equal to the runtime `$d` (1..=[`FULL_COVARIANCE_MAX_DIM`]):
/// the full model's kernels get one copy per dimension, unrolled and vectorised for it.
const _: () = assert!(FULL_COVARIANCE_MAX_DIM == 8, "per_dimension! lists 1..=8");

macro_rules! per_dimension {
    ($d:expr, $f:ident($($arg:expr),*)) => {
        match $d {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            d => unreachable!("the full model has at most {FULL_COVARIANCE_MAX_DIM} features, not {d}"),
        }
    };
}

/// `δᵀ P δ` for a symmetric d×d `P` (d ≤ [`FULL_COVARIANCE_MAX_DIM`]), both triangles
/// read: one copy per dimension, so each is unrolled and vectorised for its d.
fn quadratic_diff(p: &[f64], diff: &[f64]) -> f64 {
    per_dimension!(diff.len(), quadratic_n(p, diff))
}

/// `δᵀ P δ` for N features: `P·δ` as the sum of P's rows scaled by δ (P is symmetric), then
/// its dot product with δ.
fn quadratic_n<const N: usize>(p: &[f64], diff: &[f64]) -> f64 {
    let mut pd = [0.0f64; N];
    for (row, &db) in p[..N * N].chunks_exact(N).zip(&diff[..N]) {
        for (v, &pv) in pd.iter_mut().zip(row) {
            *v += pv * db;
        }
    }
    pd.iter().zip(&diff[..N]).map(|(v, d)| v * d).sum()
}

/// `S ← S + keep·δδᵀ − β·S` on the lower triangle of the d×d `S` (the matrix is symmetric;
/// readers mirror it), one unrolled copy per dimension d ≤ [`FULL_COVARIANCE_MAX_DIM`].
fn spread_update(s: &mut [f64], diff: &[f64], keep: f64, beta: f64) {
    per_dimension!(diff.len(), spread_update_n(s, diff, keep, beta))
}

fn spread_update_n<const N: usize>(s: &mut [f64], diff: &[f64], keep: f64, beta: f64) {
    let diff = &diff[..N];
    for (a, (row, &da)) in s[..N * N].chunks_exact_mut(N).zip(diff).enumerate() {
        let ka = keep * da;
        for (cell, &db) in row[..=a].iter_mut().zip(diff) {
            *cell += ka * db - beta * *cell;
        }
    }
}

/// Inverts the symmetric positive definite d×d `m` (d ≤ [`FULL_COVARIANCE_MAX_DIM`]) into
/// `out`; false when `m` is not numerically positive definite. Cholesky `m = L·Lᵀ`, then
/// `W = L⁻¹` by forward substitution and `m⁻¹ = Wᵀ·W`: about d³/2 multiply-adds in all.
fn invert_spd(m: &[f64], d: usize, out: &mut [f64]) -> bool {
    per_dimension!(d, invert_spd_n(m, out))
}

/// [`invert_spd`] for N features, unrolled.
fn invert_spd_n<const N: usize>(m: &[f64], out: &mut [f64]) -> bool {
    let d = N;
    let (m, out) = (&m[..N * N], &mut out[..N * N]);
    let mut l = [[0.0f64; N]; N];
    let mut inv_diag = [0.0f64; N];
    for j in 0..d {
        let mut diag = m[j * d + j];
        for &x in &l[j][..j] {
            diag -= x * x;
        }
        if !diag.is_finite() || diag <= 0.0 {
            return false;
        }
        let root = diag.sqrt();
        l[j][j] = root;
        inv_diag[j] = 1.0 / root;
        for i in j + 1..d {
            let mut v = m[i * d + j];
            for (a, b) in l[i][..j].iter().zip(&l[j][..j]) {
                v -= a * b;
            }
            l[i][j] = v * inv_diag[j];
        }
    }
    // W = L⁻¹, lower triangular, column by column.
    let mut w = [[0.0f64; N]; N];
    for c in 0..d {
        w[c][c] = inv_diag[c];
        for i in c + 1..d {
            let mut v = 0.0;
            for k in c..i {
                v -= l[i][k] * w[k][c];
            }
            w[i][c] = v * inv_diag[i];
        }
    }
    // m⁻¹[a][b] = Σ_{k ≥ max(a, b)} W[k][a]·W[k][b], mirrored.
    for a in 0..d {
        for b in 0..=a {
            let mut v = 0.0;
            for row in &w[a..d] {
                v += row[a] * row[b];
            }
            out[a * d + b] = v;
            out[b * d + a] = v;
        }
    }
    true
}

#[cfg(test)]
mod kernel_tests {
    use super::*;
    use proptest::prelude::*;

    /// A random symmetric positive definite d×d matrix: A·Aᵀ + I.
    fn spd(d: usize, a: &[f64]) -> Vec<f64> {
        let mut m = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                m[i * d + j] = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum::<f64>();
            }
            m[i * d + i] += 1.0;
        }
        m
    }

    proptest! {
        #[test]
        fn the_inverse_times_the_matrix_is_the_identity(
            d in 1usize..=FULL_COVARIANCE_MAX_DIM,
            a in proptest::collection::vec(-3.0f64..3.0, 64),
        ) {
            let m = spd(d, &a);
            let mut inv = vec![f64::NAN; d * d];
            prop_assert!(invert_spd(&m, d, &mut inv));
            for i in 0..d {
                for j in 0..d {
                    let product: f64 = (0..d).map(|k| m[i * d + k] * inv[k * d + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    prop_assert!((product - want).abs() < 1e-9, "({i},{j}) = {product}");
                    prop_assert_eq!(inv[i * d + j], inv[j * d + i]);
                }
            }
        }

        #[test]
        fn the_quadratic_form_matches_its_definition(
            d in 1usize..=FULL_COVARIANCE_MAX_DIM,
            a in proptest::collection::vec(-3.0f64..3.0, 64),
            x in proptest::collection::vec(-10.0f64..10.0, 8),
            c in proptest::collection::vec(-10.0f64..10.0, 8),
        ) {
            let p = spd(d, &a);
            let want: f64 = (0..d)
                .flat_map(|i| (0..d).map(move |j| (i, j)))
                .map(|(i, j)| (x[i] - c[i]) * p[i * d + j] * (x[j] - c[j]))
                .sum();
            let got = quadratic(&p, &x[..d], &c[..d]);
            prop_assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{got} vs {want}");
        }

        #[test]
        fn the_bound_pass_is_the_same_sum_on_every_instruction_set(
            k in 1usize..40,
            d in 1usize..12,
            seed in proptest::collection::vec(-100.0f64..100.0, 40 * 12 + 24),
        ) {
            let (x, rest) = seed.split_at(d);
            let (scale, rest) = rest.split_at(d);
            let scale: Vec<f64> = scale.iter().map(|s| s.abs() + 0.1).collect();
            let columns = &rest[..k * d];
            let mut blocked = vec![0.0; k];
            standardised(x, columns, &scale, &mut blocked);
            for (i, &got) in blocked.iter().enumerate() {
                let mut want = 0.0;
                for f in 0..d {
                    let diff = x[f] - columns[f * k + i];
                    want += diff * diff * scale[f];
                }
                prop_assert_eq!(got, want);
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx") {
                let mut avx = vec![0.0; k];
                // SAFETY: AVX is present (checked just above).
                unsafe { standardised_avx(x, columns, &scale, &mut avx) };
                prop_assert_eq!(avx, blocked);
            }
        }
    }

    #[test]
    fn a_matrix_that_is_not_positive_definite_is_refused() {
        // Eigenvalues 3 and −1.
        let m = [1.0, 2.0, 2.0, 1.0];
        let mut out = [0.0; 4];
        assert!(!invert_spd(&m, 2, &mut out));
        assert!(!invert_spd(&[f64::NAN], 1, &mut [0.0]));
    }
}

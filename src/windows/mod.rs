//! Event-time windows: pure, deterministic, checkpointable.
//!
//! Semantics follow Kafka Streams where the configuration is silent:
//! - Per partition, stream time is the largest event time seen; it never goes backwards.
//! - Tumbling windows are `[start, start + size)` aligned to the epoch; hopping windows are
//!   `[n·slide, n·slide + size)` for every `n` whose window contains the event.
//! - A window closes when stream time >= window end + `grace_ms`; an event for a closed window
//!   is late and handled by the window's `late` policy (`drop`, `dlq`, or `update`, which keeps
//!   closed windows for `allowed_lateness_ms` and re-emits a corrected final with a higher
//!   revision).
//! - Emission (`emit`): `final` emits once at close; `update` emits an update (`final: false`)
//!   per processing batch in which the window changed and then the final, skipping an update that
//!   the final of the same batch would immediately supersede; `both` emits every batch's update
//!   and the final. Every emission of a window carries the next `revision` (0, 1, 2, …).
//! - Idle close (`idle_close_ms`): when no event arrived for that long on the (injected) wall
//!   clock, stream time advances with the wall clock from the last event, so windows still close.
//!
//! - Sliding windows follow Kafka Streams' `SlidingWindows`: both ends inclusive, size = the
//!   largest time difference between records of a window; a window exists for each record
//!   (`[t − size, t]`) and right after each record (`[t + 1, t + 1 + size]`) when that window holds
//!   a record. A record is late when stream time > its time + grace.

pub mod fixed;
pub mod sliding;

use serde::{Deserialize, Serialize};

use crate::config::{LatePolicy, WindowConfig, WindowKind};
use crate::event::Event;
use crate::output::Emitted;

pub use fixed::FixedWindower;
pub use sliding::{KeySnapshot, SlidingState, SlidingWindower};

/// The next emission count of a window: saturates at `i32::MAX` (PostgreSQL's `integer`
/// `revision`), so billions of late updates of one window neither wrap nor get refused.
fn next_revision(n: u32) -> u32 {
    n.saturating_add(1).min(i32::MAX as u32)
}

/// Running aggregate of one (window, key): count plus Welford mean/variance, min, max.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Events seen.
    pub count: u64,
    /// Events that carried a `value`.
    pub values: u64,
    /// Sum of values.
    pub sum: f64,
    /// Running mean of values.
    pub mean: f64,
    /// Sum of squared deviations from the mean (Welford).
    pub m2: f64,
    /// Smallest value (meaningful when `values > 0`).
    pub min: f64,
    /// Largest value (meaningful when `values > 0`).
    pub max: f64,
}

impl Aggregate {
    /// Adds one event.
    pub fn add(&mut self, value: Option<f64>) {
        self.count += 1;
        if let Some(x) = value {
            if self.values == 0 {
                self.min = x;
                self.max = x;
            } else {
                self.min = self.min.min(x);
                self.max = self.max.max(x);
            }
            self.values += 1;
            self.sum += x;
            let delta = x - self.mean;
            self.mean += delta / self.values as f64;
            self.m2 += delta * (x - self.mean);
        }
    }

    /// Combines two aggregates of disjoint event sets (Chan et al.'s parallel variance).
    pub fn merge(&self, other: &Aggregate) -> Aggregate {
        if other.count == 0 {
            return self.clone();
        }
        if self.count == 0 {
            return other.clone();
        }
        let mut out = Aggregate {
            count: self.count + other.count,
            values: self.values + other.values,
            sum: self.sum + other.sum,
            ..Aggregate::default()
        };
        match (self.values, other.values) {
            (0, _) => {
                (out.mean, out.m2, out.min, out.max) = (other.mean, other.m2, other.min, other.max)
            }
            (_, 0) => {
                (out.mean, out.m2, out.min, out.max) = (self.mean, self.m2, self.min, self.max)
            }
            (na, nb) => {
                let (na, nb) = (na as f64, nb as f64);
                let n = na + nb;
                let delta = other.mean - self.mean;
                out.mean = self.mean + delta * nb / n;
                out.m2 = self.m2 + other.m2 + delta * delta * na * nb / n;
                out.min = self.min.min(other.min);
                out.max = self.max.max(other.max);
            }
        }
        out
    }

    /// The aggregate of one event.
    pub fn single(value: Option<f64>) -> Aggregate {
        let mut a = Aggregate::default();
        a.add(value);
        a
    }

    pub(crate) fn present(&self, x: f64) -> Option<f64> {
        (self.values > 0).then_some(x)
    }

    /// Population standard deviation of the values, if any.
    pub fn std(&self) -> Option<f64> {
        self.present((self.m2 / self.values.max(1) as f64).max(0.0).sqrt())
    }
}

/// One (window, key)'s state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Slot {
    /// The aggregate so far.
    pub agg: Aggregate,
    /// Emissions so far (the next emission's revision).
    pub emitted: u32,
    /// Changed since its last emission.
    pub changed: bool,
    /// Changed since the last checkpoint (and listed for the next delta); not state.
    #[serde(skip)]
    pub(crate) unsaved: bool,
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        (&self.agg, self.emitted, self.changed) == (&other.agg, other.emitted, other.changed)
    }
}

/// Why an event was late for at least one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late {
    /// How far the event's time is behind stream time, in ms.
    pub behind_ms: i64,
    /// The strictest policy among the windows it was late for.
    pub policy: LatePolicy,
}

/// What changed in a [`Windower`] since its last checkpoint: applied in order after a full
/// [`WindowerState`], deltas rebuild the state exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowerDelta {
    /// The window's shape and scalars, with `open` and `closed` holding only the (start, key)
    /// slots changed since (their current value); a sliding window's whole state.
    pub state: WindowerState,
    /// Starts of open windows that closed since (every key of theirs left the open windows).
    pub open_removed: Vec<i64>,
    /// Starts of closed windows forgotten since (allowed lateness passed).
    pub closed_removed: Vec<i64>,
}

/// Serialisable state of a [`Windower`]; sorted ([`WindowerState::sort`]), equal states
/// serialise equally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowerState {
    /// Window shape, to match state to configuration on restore.
    pub kind: WindowKind,
    /// Window length, likewise.
    pub size_ms: u64,
    /// Hop (tumbling: size), likewise.
    #[serde(default)]
    pub slide_ms: u64,
    /// Stream time.
    pub stream_time: i64,
    /// Late events dropped so far.
    pub late_dropped: u64,
    /// Open windows: (start, key, slot).
    pub open: Vec<(i64, String, Slot)>,
    /// Closed windows kept for late updates.
    #[serde(default)]
    pub closed: Vec<(i64, String, Slot)>,
    /// Wall clock of the last event.
    #[serde(default)]
    pub last_event_wall_ms: Option<i64>,
    /// Stream time at the last event.
    #[serde(default)]
    pub stream_time_at_last_event: i64,
    /// Sliding windows' own state.
    #[serde(default)]
    pub sliding: Option<SlidingState>,
}

impl WindowerState {
    /// Puts the per-key lists in their canonical order, so that equal states serialise equally
    /// (each list holds a window and key at most once: the order is total).
    pub fn sort(&mut self) {
        fn by_window(a: &(i64, String, Slot), b: &(i64, String, Slot)) -> std::cmp::Ordering {
            (a.0, &a.1).cmp(&(b.0, &b.1))
        }
        self.open.sort_unstable_by(by_window);
        self.closed.sort_unstable_by(by_window);
        if let Some(sliding) = &mut self.sliding {
            sliding.keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            sliding.emitted.sort_unstable();
        }
    }

    /// This state, [sorted](WindowerState::sort).
    pub fn sorted(mut self) -> Self {
        self.sort();
        self
    }
}

impl Aggregate {
    /// The output record of this aggregate for one window and key.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn to_output(
        &self,
        spec: &WindowConfig,
        slide_ms: u64,
        partition: i32,
        start: i64,
        key: String,
        is_final: bool,
        revision: u32,
    ) -> crate::output::WindowAggregate {
        crate::output::WindowAggregate {
            partition,
            window: spec.kind,
            size_ms: spec.size_ms,
            slide_ms,
            window_start: start,
            window_end: start.saturating_add(spec.size_ms as i64),
            key,
            count: self.count,
            sum: self.sum,
            mean: self.present(self.mean),
            std: self.std(),
            min: self.present(self.min),
            max: self.present(self.max),
            is_final,
            revision,
        }
    }
}

/// Wall-clock bookkeeping for idle close (the engine is pure: the clock is passed in).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct IdleClock {
    /// Wall clock of the last event.
    pub last_event_wall_ms: Option<i64>,
    /// Stream time right after the last event.
    pub stream_time_at_last_event: i64,
}

impl Default for IdleClock {
    fn default() -> Self {
        Self {
            last_event_wall_ms: None,
            stream_time_at_last_event: i64::MIN,
        }
    }
}

impl IdleClock {
    /// Records an event processed at `wall_ms` (when known).
    pub fn observe(&mut self, wall_ms: Option<i64>, stream_time: i64) {
        if let Some(wall) = wall_ms {
            self.last_event_wall_ms = Some(wall);
            self.stream_time_at_last_event = stream_time;
        }
    }

    /// Restarts the quiet period at `wall_ms`: the input was not watched since the last event
    /// (a restart from a checkpoint, a worker blocked on its sink), so that time says nothing
    /// about the partition being quiet.
    pub fn resume(&mut self, wall_ms: i64) {
        if let Some(last) = &mut self.last_event_wall_ms {
            *last = (*last).max(wall_ms);
        }
    }

    /// The stream time idle close moves to at `wall_ms`, when the partition has been quiet for
    /// `idle_ms` and that is later than `stream_time`.
    pub fn advanced(&self, idle_ms: Option<u64>, wall_ms: i64, stream_time: i64) -> Option<i64> {
        let (idle, last) = (idle_ms?, self.last_event_wall_ms?);
        let quiet = wall_ms - last;
        let advanced = self.stream_time_at_last_event.saturating_add(quiet);
        (quiet >= idle as i64 && advanced > stream_time).then_some(advanced)
    }
}

/// One configured window of any kind.
#[derive(Debug, Clone)]
pub enum Windower {
    /// Tumbling or hopping.
    Fixed(FixedWindower),
    /// Sliding.
    Sliding(SlidingWindower),
}

macro_rules! each {
    ($self:ident, $w:ident => $e:expr) => {
        match $self {
            Windower::Fixed($w) => $e,
            Windower::Sliding($w) => $e,
        }
    };
}

impl Windower {
    /// An empty windower for `spec`.
    pub fn new(spec: WindowConfig) -> Self {
        match spec.kind {
            WindowKind::Sliding => Windower::Sliding(SlidingWindower::new(spec)),
            _ => Windower::Fixed(FixedWindower::new(spec)),
        }
    }

    /// Adds `event` and emits what closes; see [`FixedWindower::apply`].
    pub fn apply(
        &mut self,
        event: &Event,
        offset: i64,
        partition: i32,
        wall_ms: Option<i64>,
        out: &mut Vec<Emitted>,
    ) -> Option<Late> {
        each!(self, w => w.apply(event, offset, partition, wall_ms, out))
    }

    /// Moves stream time to `ts` (if later) without adding an event, emitting what closes.
    pub fn advance(
        &mut self,
        ts: i64,
        offset: i64,
        partition: i32,
        wall_ms: Option<i64>,
        out: &mut Vec<Emitted>,
    ) {
        each!(self, w => w.advance(ts, offset, partition, wall_ms, out))
    }

    /// Idle close on the wall clock.
    pub fn tick(&mut self, wall_ms: i64, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        each!(self, w => w.tick(wall_ms, offset, partition, out))
    }

    /// See [`IdleClock::resume`].
    pub fn resume_idle_clock(&mut self, wall_ms: i64) {
        each!(self, w => w.idle.resume(wall_ms))
    }

    /// End of a processing batch: coalesced updates.
    pub fn end_batch(&mut self, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        each!(self, w => w.end_batch(offset, partition, out))
    }

    /// Emits every open window (end of input).
    pub fn close_all(&mut self, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        each!(self, w => w.close_all(offset, partition, out))
    }

    /// Events late for this window and not admitted.
    pub fn late_dropped(&self) -> u64 {
        each!(self, w => w.late_dropped())
    }

    /// (key, window) pairs held (open, or closed and kept for late updates), cheaply.
    pub fn held_windows(&self) -> usize {
        each!(self, w => w.held_windows())
    }

    /// Whether `event` would add a (key, window) pair to the state (see
    /// `processing.max_open_windows`).
    pub fn would_add(&self, event: &Event) -> bool {
        each!(self, w => w.would_add(event))
    }

    /// Keys with state, and open (key, window) pairs: the state's size.
    pub fn state_size(&self) -> (usize, usize) {
        each!(self, w => w.state_size())
    }

    /// The idle-close interval, when configured.
    pub fn idle_close_ms(&self) -> Option<u64> {
        each!(self, w => w.idle_close_ms())
    }

    /// Whether `state` belongs to this window definition.
    pub fn matches(&self, state: &WindowerState) -> bool {
        each!(self, w => w.matches(state))
    }

    /// The state to checkpoint, in its canonical order.
    pub fn snapshot(&self) -> WindowerState {
        self.copy_state().sorted()
    }

    /// The state to checkpoint, its lists in no particular order: the cheap half of
    /// [`Windower::snapshot`] (copying), leaving [`WindowerState::sort`] to whoever encodes it.
    pub fn copy_state(&self) -> WindowerState {
        each!(self, w => w.copy_state())
    }

    /// Restores checkpointed state.
    pub fn restore(&mut self, state: WindowerState) {
        each!(self, w => w.restore(state))
    }

    /// What changed since the last delta or [`Windower::forget_changes`]; forgets it.
    pub fn take_delta(&mut self) -> WindowerDelta {
        match self {
            Windower::Fixed(w) => w.take_delta(),
            // Sliding windows keep no change log: their whole state goes in every delta.
            Windower::Sliding(w) => WindowerDelta {
                state: w.copy_state().sorted(),
                open_removed: Vec::new(),
                closed_removed: Vec::new(),
            },
        }
    }

    /// Units of state changed since the last delta, and units in all (see
    /// [`FixedWindower::changed_slots`]); a sliding window keeps no change list and counts as
    /// changed whole, one unit per key.
    pub fn changed_units(&self) -> (usize, usize) {
        match self {
            Windower::Fixed(w) => w.changed_slots(),
            Windower::Sliding(w) => {
                let keys = w.state_size().0.max(1);
                (keys, keys)
            }
        }
    }

    /// Lists changes for deltas from now on (a sliding window keeps no list).
    pub fn track_changes(&mut self) {
        if let Windower::Fixed(w) = self {
            w.track_changes();
        }
    }

    /// Forgets the changes since the last delta (a full snapshot was written).
    pub fn forget_changes(&mut self) {
        if let Windower::Fixed(w) = self {
            w.forget_changes();
        }
    }

    /// Applies a delta of this window (which [`Windower::matches`] its state).
    pub fn apply_delta(&mut self, delta: WindowerDelta) {
        match self {
            Windower::Fixed(w) => w.apply_delta(delta),
            Windower::Sliding(w) => w.restore(delta.state),
        }
    }
}

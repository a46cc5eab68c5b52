//! Sliding windows (Kafka Streams `SlidingWindows`): both ends inclusive, `size_ms` is the
//! largest time difference between two records of one window.
//!
//! The windows of a key are `[t − size, t]` for every record time `t`, and `[t + 1, t + 1 + size]`
//! for every record time `t` whose right window holds a record. A record is admitted unless
//! stream time > its time + grace (then every window it would join has closed); a window closes
//! when stream time > its end + grace.
//!
//! Finals are computed incrementally, without rescans: windows close in start order, so per key
//! a two-stack queue aggregator (records enter at the end as windows' ends pass them and leave at
//! the front as starts pass them) yields each window's aggregate in amortised O(1). In-order
//! records create at most two windows in O(log n). Out-of-order records (within grace) and the
//! coalesced updates of `emit = update|both` scan the key's records in the window's range.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{next_revision, Aggregate, IdleClock, Late, WindowerState};
use crate::config::{EmitMode, WindowConfig};
use crate::event::Event;
use crate::output::{Emitted, Output, WindowAggregate};

/// A queue of records with O(1) amortised aggregate of its contents (two stacks).
#[derive(Debug, Clone, Default)]
struct Swag {
    /// Oldest on top; each entry's aggregate covers itself and every entry below it.
    front: Vec<(i64, Aggregate)>,
    back: Vec<(i64, Option<f64>)>,
    back_agg: Aggregate,
}

impl Swag {
    fn push(&mut self, ts: i64, value: Option<f64>) {
        self.back.push((ts, value));
        self.back_agg.add(value);
    }

    fn front_ts(&self) -> Option<i64> {
        self.front
            .last()
            .map(|(ts, _)| *ts)
            .or_else(|| self.back.first().map(|(ts, _)| *ts))
    }

    fn pop_front(&mut self) {
        if self.front.is_empty() {
            let mut acc = Aggregate::default();
            for &(ts, value) in self.back.iter().rev() {
                acc = acc.merge(&Aggregate::single(value));
                self.front.push((ts, acc.clone()));
            }
            self.back.clear();
            self.back_agg = Aggregate::default();
        }
        self.front.pop();
    }

    fn aggregate(&self) -> Aggregate {
        match self.front.last() {
            Some((_, agg)) => agg.merge(&self.back_agg),
            None => self.back_agg.clone(),
        }
    }
}

/// One key's records and closing cursor.
#[derive(Debug, Clone, Default)]
struct KeyState {
    /// Admitted records still needed, sorted by time (stable for equal times).
    records: VecDeque<(i64, Option<f64>)>,
    /// `records[..fed]` have entered `swag`.
    fed: usize,
    swag: Swag,
    /// Largest record time of this key.
    max_ts: i64,
}

impl KeyState {
    /// Aggregate of the records in `[start, end]` by scanning (out-of-order and update paths).
    fn scan(&self, start: i64, end: i64) -> Aggregate {
        let from = self.records.partition_point(|(ts, _)| *ts < start);
        let mut agg = Aggregate::default();
        for &(ts, value) in self.records.range(from..) {
            if ts > end {
                break;
            }
            agg.add(value);
        }
        agg
    }

    /// Aggregate of `[start, end]` through the closing cursor; starts must not decrease.
    fn close(&mut self, start: i64, end: i64) -> Aggregate {
        while self.fed < self.records.len() && self.records[self.fed].0 <= end {
            let (ts, value) = self.records[self.fed];
            self.swag.push(ts, value);
            self.fed += 1;
        }
        while self.swag.front_ts().is_some_and(|ts| ts < start) {
            self.swag.pop_front();
        }
        self.swag.aggregate()
    }

    /// Forgets records older than `keep_from` that the cursor has passed or will never need.
    fn trim(&mut self, keep_from: i64) {
        while self.records.front().is_some_and(|(ts, _)| *ts < keep_from) {
            self.records.pop_front();
            self.fed = self.fed.saturating_sub(1);
        }
    }
}

/// One key's sliding state, serialised exactly (the cursor's partial aggregates included, so a
/// restored run rounds exactly like an uninterrupted one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeySnapshot {
    /// The key.
    pub key: String,
    /// Its records (time, value), sorted.
    pub records: Vec<(i64, Option<f64>)>,
    /// Records that entered the cursor.
    pub fed: usize,
    /// The cursor's front stack.
    pub front: Vec<(i64, Aggregate)>,
    /// The cursor's back stack.
    pub back: Vec<(i64, Option<f64>)>,
    /// Largest record time.
    pub max_ts: i64,
}

/// Serialisable sliding-window state (inside [`WindowerState`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlidingState {
    /// Per key, sorted by key.
    pub keys: Vec<KeySnapshot>,
    /// Open windows: (start, key).
    pub open: Vec<(i64, String)>,
    /// Windows changed since their last emission: (start, key).
    pub dirty: Vec<(i64, String)>,
    /// Emissions so far of open windows that emitted updates: (start, key, count).
    pub emitted: Vec<(i64, String, u32)>,
}

/// A sliding window definition and its state.
#[derive(Debug, Clone)]
pub struct SlidingWindower {
    spec: WindowConfig,
    size: i64,
    grace: i64,
    stream_time: i64,
    keys: HashMap<String, KeyState>,
    /// Open windows by start, then key.
    open: BTreeSet<(i64, String)>,
    /// Open windows changed since their last emission (`emit = update|both`).
    dirty: BTreeSet<(i64, String)>,
    /// Emissions of open windows so far (`emit = update|both`).
    emitted: HashMap<(i64, String), u32>,
    late_dropped: u64,
    pub(super) idle: IdleClock,
    /// The stream-time period (see [`Self::forget_period`]) in which keys were last swept.
    swept: i64,
}

impl SlidingWindower {
    /// An empty sliding windower for `spec`.
    pub fn new(spec: WindowConfig) -> Self {
        Self {
            size: spec.size_ms as i64,
            grace: spec.grace_ms as i64,
            spec,
            stream_time: i64::MIN,
            keys: HashMap::new(),
            open: BTreeSet::new(),
            dirty: BTreeSet::new(),
            emitted: HashMap::new(),
            late_dropped: 0,
            idle: IdleClock::default(),
            swept: i64::MIN,
        }
    }

    /// Keys are swept once per this much stream time: `size + grace + 1`, so a key is gone at
    /// most two periods after its last record (and the sweep costs O(1) per admitted event).
    fn forget_period(&self) -> i64 {
        self.size
            .saturating_add(self.grace)
            .saturating_add(1)
            .max(1)
    }

    /// Forgets the keys no admissible event can reach: an event admitted from now on is at or
    /// after `time − grace`, so its windows start at or after `time − grace − size`; a key whose
    /// records all precede that has no open window (an open window holds one of its records at
    /// or after its start) and would be rebuilt exactly as a fresh key. Without this, every key
    /// ever seen would stay in memory and in every checkpoint.
    fn forget_idle_keys(&mut self, time: i64) {
        let period = time.div_euclid(self.forget_period());
        if period <= self.swept {
            return;
        }
        self.swept = period;
        let admissible = time.saturating_sub(self.grace).saturating_sub(self.size);
        self.keys.retain(|_, state| state.max_ts >= admissible);
    }

    /// Windows held (all open: sliding windows keep none for late updates).
    pub fn held_windows(&self) -> usize {
        self.open.len()
    }

    /// Whether `event` would open a window that is not open yet. In order for its key, it opens
    /// the windows starting at `t − size` and right after the key's previous record (the same
    /// starts [`SlidingWindower::apply`] tracks); out of order it may open windows around
    /// earlier records, and is counted as opening one.
    pub fn would_add(&self, event: &Event) -> bool {
        let t = event.ts_ms;
        if self.stream_time != i64::MIN && t.saturating_add(self.grace) < self.stream_time {
            return false;
        }
        let Some(state) = self.keys.get(event.key.as_str()) else {
            return true;
        };
        if t < state.max_ts {
            return true;
        }
        let absent = |start: i64| !self.open.contains(&(start, event.key.clone()));
        let previous = state.max_ts;
        absent(t - self.size)
            || (previous != i64::MIN
                && previous < t
                && t - previous <= self.size
                && absent(previous + 1))
    }

    /// Keys with records, and open windows.
    pub fn state_size(&self) -> (usize, usize) {
        (self.keys.len(), self.open.len())
    }

    /// Events late for this window and not admitted.
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    /// The idle-close interval, when configured.
    pub fn idle_close_ms(&self) -> Option<u64> {
        self.spec.idle_close_ms
    }

    /// Whether `state` belongs to this window definition.
    pub fn matches(&self, state: &WindowerState) -> bool {
        state.kind == self.spec.kind && state.size_ms == self.spec.size_ms
    }

    /// Stream time at which a window starting at `start` closes.
    fn closes_at(&self, start: i64) -> i64 {
        start
            .saturating_add(self.size)
            .saturating_add(1)
            .saturating_add(self.grace)
    }

    fn track(&mut self, start: i64, key: &str) {
        if self.open.insert((start, key.to_string())) && self.spec.emit != EmitMode::Final {
            self.dirty.insert((start, key.to_string()));
        }
    }

    /// Adds `event`; emits what closes. Returns how it was late, if it was.
    pub fn apply(
        &mut self,
        event: &Event,
        offset: i64,
        partition: i32,
        wall_ms: Option<i64>,
        out: &mut Vec<Emitted>,
    ) -> Option<Late> {
        let t = event.ts_ms;
        if self.stream_time != i64::MIN && t.saturating_add(self.grace) < self.stream_time {
            self.late_dropped += 1;
            return Some(Late {
                behind_ms: self.stream_time - t,
                policy: self.spec.late,
            });
        }
        let size = self.size;
        let key_state = self
            .keys
            .entry(event.key.clone())
            .or_insert_with(|| KeyState {
                max_ts: i64::MIN,
                ..KeyState::default()
            });
        let in_order = t >= key_state.max_ts;
        let previous_max = key_state.max_ts;
        let mut new_starts: Vec<i64> = Vec::with_capacity(2);
        new_starts.push(t - size);
        if in_order {
            key_state.records.push_back((t, event.value));
            key_state.max_ts = t;
            // The previous record's right window now holds this one.
            if previous_max != i64::MIN && previous_max < t && t - previous_max <= size {
                new_starts.push(previous_max + 1);
            }
        } else {
            let at = key_state.records.partition_point(|(ts, _)| *ts <= t);
            key_state.records.insert(at, (t, event.value));
            // Right windows of earlier records within reach now hold this one; this record's own
            // right window holds the later records within reach.
            let lo = key_state.records.partition_point(|(ts, _)| *ts < t - size);
            let mut last = None;
            for &(p, _) in key_state.records.range(lo..at) {
                if p < t && last != Some(p) {
                    new_starts.push(p + 1);
                    last = Some(p);
                }
            }
            if key_state
                .records
                .range(at + 1..)
                .any(|(ts, _)| *ts > t && *ts <= t + size)
            {
                new_starts.push(t + 1);
            }
        }
        if self.spec.emit != EmitMode::Final {
            // Every open window of this key containing t changed.
            let changed: Vec<(i64, String)> = self
                .open
                .range((t - size, String::new())..)
                .take_while(|(s, _)| *s <= t)
                .filter(|(_, k)| *k == event.key)
                .cloned()
                .collect();
            self.dirty.extend(changed);
        }
        for start in new_starts {
            self.track(start, &event.key);
        }
        self.advance(t, offset, partition, wall_ms, out);
        None
    }

    /// See the fixed windows' `advance`.
    pub fn advance(
        &mut self,
        ts: i64,
        offset: i64,
        partition: i32,
        wall_ms: Option<i64>,
        out: &mut Vec<Emitted>,
    ) {
        if ts > self.stream_time {
            self.stream_time = ts;
            self.close_until(ts, offset, partition, out);
        }
        self.idle.observe(wall_ms, self.stream_time);
    }

    /// Idle close; see the fixed windows' `tick`.
    pub fn tick(&mut self, wall_ms: i64, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        if let Some(advanced) =
            self.idle
                .advanced(self.spec.idle_close_ms, wall_ms, self.stream_time)
        {
            self.stream_time = advanced;
            self.close_until(advanced, offset, partition, out);
        }
    }

    /// Coalesced updates of the windows that changed in this batch.
    pub fn end_batch(&mut self, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        for (start, key) in std::mem::take(&mut self.dirty) {
            let Some(state) = self.keys.get(&key) else {
                continue;
            };
            let agg = state.scan(start, start + self.size);
            let revision = self
                .emitted
                .get(&(start, key.clone()))
                .copied()
                .unwrap_or(0);
            self.emitted
                .insert((start, key.clone()), next_revision(revision));
            let output = self.aggregate(partition, start, key, &agg, false, revision);
            out.push(Emitted {
                seq: 0,
                source_offset: offset,
                output: Output::WindowAggregate(output),
            });
        }
    }

    /// Emits the finals of every window closed at stream time `time`.
    pub fn close_until(&mut self, time: i64, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        while let Some((start, _)) = self.open.first() {
            let start = *start;
            if self.closes_at(start) > time {
                break;
            }
            let (start, key) = self.open.pop_first().expect("first() was Some");
            let end = start + self.size;
            let state = self
                .keys
                .get_mut(&key)
                .expect("an open window's key has state");
            let agg = state.close(start, end);
            // Later windows of this key start after `start`; future ones at `admissible` or later.
            let admissible = time.saturating_sub(self.grace).saturating_sub(self.size);
            state.trim(start.saturating_add(1).min(admissible));
            if state.records.is_empty() {
                self.keys.remove(&key);
            }
            let mut revision = self.emitted.remove(&(start, key.clone())).unwrap_or(0);
            if self.dirty.remove(&(start, key.clone())) && self.spec.emit == EmitMode::Both {
                let update = self.aggregate(partition, start, key.clone(), &agg, false, revision);
                revision = next_revision(revision);
                out.push(Emitted {
                    seq: 0,
                    source_offset: offset,
                    output: Output::WindowAggregate(update),
                });
            }
            let output = self.aggregate(partition, start, key, &agg, true, revision);
            out.push(Emitted {
                seq: 0,
                source_offset: offset,
                output: Output::WindowAggregate(output),
            });
        }
        self.forget_idle_keys(time);
    }

    /// Emits every open window (end of input).
    pub fn close_all(&mut self, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        self.close_until(i64::MAX, offset, partition, out);
    }

    fn aggregate(
        &self,
        partition: i32,
        start: i64,
        key: String,
        agg: &Aggregate,
        is_final: bool,
        revision: u32,
    ) -> WindowAggregate {
        agg.to_output(&self.spec, 0, partition, start, key, is_final, revision)
    }

    /// The state to checkpoint, unsorted ([`WindowerState::sort`]).
    pub fn copy_state(&self) -> WindowerState {
        let keys: Vec<KeySnapshot> = self
            .keys
            .iter()
            .map(|(k, s)| KeySnapshot {
                key: k.clone(),
                records: s.records.iter().copied().collect(),
                fed: s.fed,
                front: s.swag.front.clone(),
                back: s.swag.back.clone(),
                max_ts: s.max_ts,
            })
            .collect();
        let emitted: Vec<_> = self
            .emitted
            .iter()
            .map(|((s, k), n)| (*s, k.clone(), *n))
            .collect();
        WindowerState {
            kind: self.spec.kind,
            size_ms: self.spec.size_ms,
            slide_ms: 0,
            stream_time: self.stream_time,
            late_dropped: self.late_dropped,
            open: Vec::new(),
            closed: Vec::new(),
            last_event_wall_ms: self.idle.last_event_wall_ms,
            stream_time_at_last_event: self.idle.stream_time_at_last_event,
            sliding: Some(SlidingState {
                keys,
                open: self.open.iter().cloned().collect(),
                dirty: self.dirty.iter().cloned().collect(),
                emitted,
            }),
        }
    }

    /// Restores checkpointed state.
    pub fn restore(&mut self, state: WindowerState) {
        self.stream_time = state.stream_time;
        // The uninterrupted run swept when stream time entered this period, or left nothing to.
        self.swept = if state.stream_time == i64::MIN {
            i64::MIN
        } else {
            state.stream_time.div_euclid(self.forget_period())
        };
        self.late_dropped = state.late_dropped;
        self.idle = IdleClock {
            last_event_wall_ms: state.last_event_wall_ms,
            stream_time_at_last_event: state.stream_time_at_last_event,
        };
        let sliding = state.sliding.unwrap_or_default();
        self.keys = sliding
            .keys
            .into_iter()
            .map(|k| {
                let mut swag = Swag {
                    front: k.front,
                    ..Swag::default()
                };
                for (ts, value) in k.back {
                    swag.push(ts, value);
                }
                let state = KeyState {
                    records: k.records.into(),
                    fed: k.fed,
                    swag,
                    max_ts: k.max_ts,
                };
                (k.key, state)
            })
            .collect();
        self.open = sliding.open.into_iter().collect();
        self.dirty = sliding.dirty.into_iter().collect();
        self.emitted = sliding
            .emitted
            .into_iter()
            .map(|(s, k, n)| ((s, k), n))
            .collect();
    }
}

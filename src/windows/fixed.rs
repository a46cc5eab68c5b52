//! Tumbling and hopping windows: a fixed grid of `[n·slide, n·slide + size)` windows.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use super::{next_revision, Aggregate, IdleClock, Late, Slot, WindowerDelta, WindowerState};
use crate::config::{EmitMode, LatePolicy, WindowConfig, WindowKind};
use crate::event::Event;
use crate::output::{Emitted, Output, WindowAggregate};

/// A tumbling or hopping window definition and its state.
#[derive(Debug, Clone)]
pub struct FixedWindower {
    spec: WindowConfig,
    size: i64,
    slide: i64,
    /// Largest event time seen (or idle-advanced); `i64::MIN` before the first event.
    stream_time: i64,
    /// Open windows by start, then key.
    open: BTreeMap<i64, HashMap<String, Slot>>,
    /// Closed windows kept for late updates (`late = "update"`), by start, then key.
    closed: BTreeMap<i64, HashMap<String, Slot>>,
    /// Slots in `open` and in `closed`, kept as they change: the cap is checked per event,
    /// and a day of one-second windows kept for late updates is 86,400 starts to count.
    open_slots: usize,
    closed_slots: usize,
    /// Open windows changed in the current batch (may hold stale entries).
    dirty: Vec<(i64, String)>,
    /// Whether changes are listed for deltas (the worker's processors; not offline runs, which
    /// take no checkpoints and would list every slot of the input).
    track: bool,
    /// Slots changed since the last checkpoint, first change only (the slot's `unsaved`
    /// flag), open then closed; entries of windows removed since are stale and skipped.
    unsaved_open: Vec<(i64, String)>,
    unsaved_closed: Vec<(i64, String)>,
    /// Starts removed from `open` / `closed` since the last checkpoint.
    open_removed: Vec<i64>,
    closed_removed: Vec<i64>,
    /// Events that were late for this window and not admitted.
    late_dropped: u64,
    /// Wall clock of the last event, for idle close.
    pub(super) idle: IdleClock,
}

fn flatten_slots(map: &BTreeMap<i64, HashMap<String, Slot>>) -> Vec<(i64, String, Slot)> {
    let mut out = Vec::with_capacity(map.values().map(HashMap::len).sum());
    for (start, keys) in map {
        out.extend(keys.iter().map(|(k, v)| (*start, k.clone(), v.clone())));
    }
    out
}

fn sorted(keys: HashMap<String, Slot>) -> Vec<(String, Slot)> {
    let mut keys: Vec<_> = keys.into_iter().collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    keys
}

impl FixedWindower {
    /// An empty windower for `spec` (tumbling or hopping).
    pub fn new(spec: WindowConfig) -> Self {
        let size = spec.size_ms.max(1) as i64;
        let slide = match spec.kind {
            WindowKind::Hopping => spec
                .slide_ms
                .unwrap_or(spec.size_ms)
                .clamp(1, spec.size_ms.max(1)) as i64,
            _ => size,
        };
        Self {
            spec,
            size,
            slide,
            stream_time: i64::MIN,
            open: BTreeMap::new(),
            closed: BTreeMap::new(),
            open_slots: 0,
            closed_slots: 0,
            dirty: Vec::new(),
            track: false,
            unsaved_open: Vec::new(),
            unsaved_closed: Vec::new(),
            open_removed: Vec::new(),
            closed_removed: Vec::new(),
            late_dropped: 0,
            idle: IdleClock::default(),
        }
    }

    /// Whether `state` belongs to this window definition.
    pub fn matches(&self, state: &WindowerState) -> bool {
        state.kind == self.spec.kind
            && state.size_ms == self.spec.size_ms
            && (state.slide_ms == 0 || state.slide_ms as i64 == self.slide)
    }

    /// (key, window) pairs held: open, and closed ones kept for late updates (`late =
    /// "update"`); a running count.
    pub fn held_windows(&self) -> usize {
        self.open_slots + self.closed_slots
    }

    /// Whether `event` would add a (key, window) pair to the state: open one, or (late, under
    /// `late = "update"`) keep a closed one for its key.
    pub fn would_add(&self, event: &Event) -> bool {
        let has = |map: &BTreeMap<i64, HashMap<String, Slot>>, start: i64| {
            map.get(&start)
                .is_some_and(|keys| keys.contains_key(event.key.as_str()))
        };
        self.starts_of(event.ts_ms).any(|start| {
            if self.closes_at(start) > self.stream_time {
                !has(&self.open, start)
            } else {
                self.spec.late == LatePolicy::Update
                    && self.purges_at(start) > self.stream_time
                    && !has(&self.closed, start)
            }
        })
    }

    /// Keys with an open window, and open (key, window) pairs.
    pub fn state_size(&self) -> (usize, usize) {
        let keys: std::collections::HashSet<&String> =
            self.open.values().flat_map(HashMap::keys).collect();
        (keys.len(), self.open_slots)
    }

    /// Events late for this window and not admitted.
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    /// The idle-close interval, when configured.
    pub fn idle_close_ms(&self) -> Option<u64> {
        self.spec.idle_close_ms
    }

    /// Stream time.
    pub fn stream_time(&self) -> i64 {
        self.stream_time
    }

    fn closes_at(&self, start: i64) -> i64 {
        start
            .saturating_add(self.size)
            .saturating_add(self.spec.grace_ms as i64)
    }

    fn purges_at(&self, start: i64) -> i64 {
        self.closes_at(start)
            .saturating_add(self.spec.allowed_lateness_ms as i64)
    }

    /// Starts of the windows containing `ts`, ascending.
    fn starts_of(&self, ts: i64) -> impl Iterator<Item = i64> {
        let slide = self.slide;
        let first = (ts - self.size).div_euclid(slide) + 1;
        let last = ts.div_euclid(slide);
        (first..=last).map(move |n| n * slide)
    }

    /// Adds `event` (processed at wall clock `wall_ms`, if known) and emits what closes.
    /// Returns how the event was late, if it was late for this window.
    pub fn apply(
        &mut self,
        event: &Event,
        offset: i64,
        partition: i32,
        wall_ms: Option<i64>,
        out: &mut Vec<Emitted>,
    ) -> Option<Late> {
        let mut late = None;
        let ts = event.ts_ms;
        for start in self.starts_of(ts) {
            if self.closes_at(start) > self.stream_time {
                let slot = match self.open.entry(start).or_default().entry(event.key.clone()) {
                    Entry::Occupied(slot) => slot.into_mut(),
                    Entry::Vacant(vacant) => {
                        self.open_slots += 1;
                        vacant.insert(Slot::default())
                    }
                };
                slot.agg.add(event.value);
                if self.track && !slot.unsaved {
                    slot.unsaved = true;
                    self.unsaved_open.push((start, event.key.clone()));
                }
                if !slot.changed {
                    slot.changed = true;
                    if self.spec.emit != EmitMode::Final {
                        self.dirty.push((start, event.key.clone()));
                    }
                }
                continue;
            }
            late = Some(Late {
                behind_ms: self.stream_time - ts,
                policy: self.spec.late,
            });
            let track = self.track;
            let retained = self
                .closed
                .get_mut(&start)
                .and_then(|keys| keys.get_mut(event.key.as_str()))
                .map(|slot| {
                    slot.agg.add(event.value);
                    slot.emitted = next_revision(slot.emitted);
                    let first_change = track && !std::mem::replace(&mut slot.unsaved, true);
                    (
                        slot.agg.clone(),
                        slot.emitted.saturating_sub(1),
                        first_change,
                    )
                });
            let retained = retained.map(|(agg, revision, first_change)| {
                if first_change {
                    self.unsaved_closed.push((start, event.key.clone()));
                }
                (agg, revision)
            });
            match (self.spec.late, retained) {
                (LatePolicy::Update, Some((agg, revision))) => {
                    let agg =
                        self.aggregate(partition, start, event.key.clone(), &agg, true, revision);
                    out.push(Emitted {
                        seq: 0,
                        source_offset: offset,
                        output: Output::WindowAggregate(agg),
                    });
                }
                (LatePolicy::Update, None) if self.purges_at(start) > self.stream_time => {
                    // Closed without this key: a late first event still corrects the result.
                    let mut slot = Slot::default();
                    slot.agg.add(event.value);
                    slot.emitted = 1;
                    if self.track {
                        slot.unsaved = true;
                        self.unsaved_closed.push((start, event.key.clone()));
                    }
                    let agg =
                        self.aggregate(partition, start, event.key.clone(), &slot.agg, true, 0);
                    out.push(Emitted {
                        seq: 0,
                        source_offset: offset,
                        output: Output::WindowAggregate(agg),
                    });
                    if self
                        .closed
                        .entry(start)
                        .or_default()
                        .insert(event.key.clone(), slot)
                        .is_none()
                    {
                        self.closed_slots += 1;
                    }
                }
                _ => self.late_dropped += 1,
            }
        }
        self.advance(ts, offset, partition, wall_ms, out);
        late
    }

    /// Stream time moves to `ts` if that is later, closing what it closes; the wall clock of
    /// the event is observed for idle close.
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
            self.close_until(self.stream_time, offset, partition, out);
        }
        self.idle.observe(wall_ms, self.stream_time);
    }

    /// Idle close: advances stream time with the wall clock when no event arrived for
    /// `idle_close_ms`, and emits what closes.
    pub fn tick(&mut self, wall_ms: i64, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        if let Some(advanced) =
            self.idle
                .advanced(self.spec.idle_close_ms, wall_ms, self.stream_time)
        {
            self.stream_time = advanced;
            self.close_until(advanced, offset, partition, out);
        }
    }

    /// End of a processing batch: emits the coalesced updates (`emit = update|both`).
    pub fn end_batch(&mut self, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for (start, key) in dirty {
            let Some(slot) = self.open.get_mut(&start).and_then(|k| k.get_mut(&key)) else {
                continue;
            };
            if !slot.changed {
                continue;
            }
            slot.changed = false;
            if self.track && !slot.unsaved {
                slot.unsaved = true;
                self.unsaved_open.push((start, key.clone()));
            }
            let revision = slot.emitted;
            slot.emitted = next_revision(slot.emitted);
            let agg = slot.agg.clone();
            let output = self.aggregate(partition, start, key, &agg, false, revision);
            out.push(Emitted {
                seq: 0,
                source_offset: offset,
                output: Output::WindowAggregate(output),
            });
        }
    }

    /// Emits the finals of every window that closes at or before `time`; forgets retained
    /// closed windows whose allowed lateness has passed.
    pub fn close_until(&mut self, time: i64, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        while let Some((&start, _)) = self.open.first_key_value() {
            if self.closes_at(start) > time {
                break;
            }
            let keys = self.open.remove(&start).unwrap_or_default();
            self.open_slots -= keys.len();
            if self.track {
                self.open_removed.push(start);
            }
            let keep = self.spec.late == LatePolicy::Update && self.purges_at(start) > time;
            let mut kept = HashMap::new();
            for (key, mut slot) in sorted(keys) {
                if self.spec.emit == EmitMode::Both && slot.changed {
                    let output = self.aggregate(
                        partition,
                        start,
                        key.clone(),
                        &slot.agg,
                        false,
                        slot.emitted,
                    );
                    slot.emitted = next_revision(slot.emitted);
                    out.push(Emitted {
                        seq: 0,
                        source_offset: offset,
                        output: Output::WindowAggregate(output),
                    });
                }
                let output =
                    self.aggregate(partition, start, key.clone(), &slot.agg, true, slot.emitted);
                slot.emitted = next_revision(slot.emitted);
                slot.changed = false;
                out.push(Emitted {
                    seq: 0,
                    source_offset: offset,
                    output: Output::WindowAggregate(output),
                });
                if keep {
                    if self.track {
                        // Listed again: its entry among the open slots is stale now.
                        slot.unsaved = true;
                        self.unsaved_closed.push((start, key.clone()));
                    }
                    kept.insert(key, slot);
                }
            }
            if keep {
                // Merged: a restore under a shorter grace may hold this start closed already.
                let keys = self.closed.entry(start).or_default();
                let before = keys.len();
                keys.extend(kept);
                self.closed_slots += keys.len() - before;
            }
        }
        while let Some((&start, _)) = self.closed.first_key_value() {
            if self.purges_at(start) > time {
                break;
            }
            if let Some(keys) = self.closed.remove(&start) {
                self.closed_slots -= keys.len();
            }
            if self.track {
                self.closed_removed.push(start);
            }
        }
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
        agg.to_output(
            &self.spec,
            self.slide as u64,
            partition,
            start,
            key,
            is_final,
            revision,
        )
    }

    /// The state to checkpoint, unsorted ([`WindowerState::sort`]).
    pub fn copy_state(&self) -> WindowerState {
        WindowerState {
            open: flatten_slots(&self.open),
            closed: flatten_slots(&self.closed),
            ..self.scalars()
        }
    }

    /// What changed since the last delta or [`FixedWindower::forget_changes`]: the scalars,
    /// the slots changed (their current value) and the windows removed. Forgets it. Costs what
    /// changed, not the state's size.
    pub fn take_delta(&mut self) -> WindowerDelta {
        fn changed(
            map: &mut BTreeMap<i64, HashMap<String, Slot>>,
            listed: Vec<(i64, String)>,
        ) -> Vec<(i64, String, Slot)> {
            let mut out = Vec::new();
            for (start, key) in listed {
                if let Some(slot) = map.get_mut(&start).and_then(|keys| keys.get_mut(&key)) {
                    // Listed twice (closed, then changed late) but taken once.
                    if std::mem::replace(&mut slot.unsaved, false) {
                        out.push((start, key, slot.clone()));
                    }
                }
            }
            out.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            out
        }
        let open = changed(&mut self.open, std::mem::take(&mut self.unsaved_open));
        let closed = changed(&mut self.closed, std::mem::take(&mut self.unsaved_closed));
        WindowerDelta {
            state: WindowerState {
                open,
                closed,
                ..self.scalars()
            },
            open_removed: std::mem::take(&mut self.open_removed),
            closed_removed: std::mem::take(&mut self.closed_removed),
        }
    }

    /// Slots listed as changed since the last delta (a slot listed twice, closed and then
    /// changed late, counts twice; never more than the slots there are) and slots in all, for
    /// an estimate of the next delta's share of the state without taking it.
    pub fn changed_slots(&self) -> (usize, usize) {
        let total = self.open_slots + self.closed_slots;
        let listed = self.unsaved_open.len() + self.unsaved_closed.len();
        (listed.min(total), total)
    }

    /// Forgets the changes listed since the last delta (a full snapshot holds them): one pass
    /// over the slots clearing their flags, which costs far less than taking a delta of every
    /// slot (1 M keys: ~290 ms for that delta's lookups, copies and sort).
    pub fn forget_changes(&mut self) {
        for keys in self.open.values_mut().chain(self.closed.values_mut()) {
            keys.values_mut().for_each(|slot| slot.unsaved = false);
        }
        self.unsaved_open.clear();
        self.unsaved_closed.clear();
        self.open_removed.clear();
        self.closed_removed.clear();
    }

    /// Lists changes for [`FixedWindower::take_delta`] from now on.
    pub fn track_changes(&mut self) {
        self.track = true;
    }

    /// Applies a delta taken by [`FixedWindower::take_delta`] after the state restored so far.
    pub fn apply_delta(&mut self, delta: WindowerDelta) {
        for start in delta.open_removed {
            if let Some(keys) = self.open.remove(&start) {
                self.open_slots -= keys.len();
            }
        }
        for start in delta.closed_removed {
            if let Some(keys) = self.closed.remove(&start) {
                self.closed_slots -= keys.len();
            }
        }
        self.dirty
            .retain(|(start, _)| self.open.contains_key(start));
        self.adopt(delta.state);
    }

    /// Takes the scalars of `state` and adds (or replaces) its slots.
    fn adopt(&mut self, state: WindowerState) {
        self.stream_time = state.stream_time;
        self.late_dropped = state.late_dropped;
        self.idle = IdleClock {
            last_event_wall_ms: state.last_event_wall_ms,
            stream_time_at_last_event: state.stream_time_at_last_event,
        };
        for (start, key, slot) in state.open {
            if slot.changed && self.spec.emit != EmitMode::Final {
                self.dirty.push((start, key.clone()));
            }
            if self
                .open
                .entry(start)
                .or_default()
                .insert(key, slot)
                .is_none()
            {
                self.open_slots += 1;
            }
        }
        for (start, key, slot) in state.closed {
            if self
                .closed
                .entry(start)
                .or_default()
                .insert(key, slot)
                .is_none()
            {
                self.closed_slots += 1;
            }
        }
    }

    /// The scalars of the state, no slots.
    fn scalars(&self) -> WindowerState {
        WindowerState {
            kind: self.spec.kind,
            size_ms: self.spec.size_ms,
            slide_ms: self.slide as u64,
            stream_time: self.stream_time,
            late_dropped: self.late_dropped,
            open: Vec::new(),
            closed: Vec::new(),
            last_event_wall_ms: self.idle.last_event_wall_ms,
            stream_time_at_last_event: self.idle.stream_time_at_last_event,
            sliding: None,
        }
    }

    /// Restores checkpointed state (which [`FixedWindower::matches`] this window).
    pub fn restore(&mut self, state: WindowerState) {
        self.open.clear();
        self.closed.clear();
        self.open_slots = 0;
        self.closed_slots = 0;
        self.dirty.clear();
        self.unsaved_open.clear();
        self.unsaved_closed.clear();
        self.open_removed.clear();
        self.closed_removed.clear();
        self.adopt(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: &str, ts: i64, value: Option<f64>) -> Event {
        Event {
            key: key.into(),
            ts_ms: ts,
            features: vec![],
            value,
            id: None,
            metadata: None,
        }
    }

    fn tumbling(size_ms: u64, grace_ms: u64) -> FixedWindower {
        FixedWindower::new(WindowConfig {
            size_ms,
            grace_ms,
            ..WindowConfig::default()
        })
    }

    fn rows(out: &[Emitted]) -> Vec<(i64, String, u64, f64, bool, u32)> {
        out.iter()
            .map(|e| match &e.output {
                Output::WindowAggregate(w) => (
                    w.window_start,
                    w.key.clone(),
                    w.count,
                    w.sum,
                    w.is_final,
                    w.revision,
                ),
                other => panic!("windows emit window aggregates, not {other:?}"),
            })
            .collect()
    }

    #[test]
    fn tumbling_windows_close_on_stream_time() {
        let mut w = tumbling(10, 0);
        let mut out = Vec::new();
        for (i, (k, ts)) in [("a", 1), ("b", 3), ("a", 9), ("a", 10), ("b", 25)]
            .into_iter()
            .enumerate()
        {
            w.apply(&ev(k, ts, Some(1.0)), i as i64, 0, None, &mut out);
        }
        assert_eq!(
            rows(&out),
            vec![
                (0, "a".into(), 2, 2.0, true, 0),
                (0, "b".into(), 1, 1.0, true, 0),
                (10, "a".into(), 1, 1.0, true, 0)
            ]
        );
    }

    #[test]
    fn hopping_windows_contain_each_event_size_over_slide_times() {
        let mut w = FixedWindower::new(WindowConfig {
            kind: WindowKind::Hopping,
            size_ms: 10,
            slide_ms: Some(5),
            ..WindowConfig::default()
        });
        assert_eq!(w.starts_of(7).collect::<Vec<_>>(), vec![0, 5]);
        assert_eq!(w.starts_of(10).collect::<Vec<_>>(), vec![5, 10]);
        assert_eq!(w.starts_of(-1).collect::<Vec<_>>(), vec![-10, -5]);
        let mut out = Vec::new();
        w.apply(&ev("a", 7, Some(2.0)), 0, 0, None, &mut out);
        w.apply(&ev("a", 12, Some(3.0)), 1, 0, None, &mut out);
        w.apply(&ev("a", 30, None), 2, 0, None, &mut out);
        assert_eq!(
            rows(&out),
            vec![
                (0, "a".into(), 1, 2.0, true, 0),
                (5, "a".into(), 2, 5.0, true, 0),
                (10, "a".into(), 1, 3.0, true, 0),
            ]
        );
    }

    #[test]
    fn grace_admits_out_of_order_then_late_events_drop() {
        let mut w = tumbling(10, 5);
        let mut out = Vec::new();
        w.apply(&ev("a", 2, None), 0, 0, None, &mut out);
        w.apply(&ev("a", 12, None), 1, 0, None, &mut out);
        w.apply(&ev("a", 8, None), 2, 0, None, &mut out); // within grace
        assert!(out.is_empty());
        w.apply(&ev("a", 15, None), 3, 0, None, &mut out); // closes [0,10)
        assert_eq!(rows(&out), vec![(0, "a".into(), 2, 0.0, true, 0)]);
        let late = w.apply(&ev("a", 1, None), 4, 0, None, &mut out);
        assert_eq!(
            late,
            Some(Late {
                behind_ms: 14,
                policy: LatePolicy::Drop
            })
        );
        assert_eq!(w.late_dropped(), 1);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn late_update_policy_re_emits_corrected_finals_within_allowed_lateness() {
        let mut w = FixedWindower::new(WindowConfig {
            size_ms: 10,
            late: LatePolicy::Update,
            allowed_lateness_ms: 20,
            ..WindowConfig::default()
        });
        let mut out = Vec::new();
        w.apply(&ev("a", 1, Some(1.0)), 0, 0, None, &mut out);
        w.apply(&ev("a", 15, Some(1.0)), 1, 0, None, &mut out); // closes [0,10)
        w.apply(&ev("a", 2, Some(5.0)), 2, 0, None, &mut out); // late, corrected
        w.apply(&ev("b", 3, Some(7.0)), 3, 0, None, &mut out); // late, new key
        w.apply(&ev("a", 31, None), 4, 0, None, &mut out); // purges [0,10) (10 + 20 <= 31)
        w.apply(&ev("a", 4, Some(9.0)), 5, 0, None, &mut out); // too late: dropped
        assert_eq!(
            rows(&out)[..4],
            [
                (0, "a".into(), 1, 1.0, true, 0),
                (0, "a".into(), 2, 6.0, true, 1),
                (0, "b".into(), 1, 7.0, true, 0),
                (10, "a".into(), 1, 1.0, true, 0),
            ]
        );
        assert_eq!(w.late_dropped(), 1);
    }

    #[test]
    fn update_mode_coalesces_per_batch_and_ends_with_the_final() {
        let mut w = FixedWindower::new(WindowConfig {
            size_ms: 10,
            emit: EmitMode::Update,
            ..WindowConfig::default()
        });
        let mut out = Vec::new();
        w.apply(&ev("a", 1, Some(1.0)), 0, 0, None, &mut out);
        w.apply(&ev("a", 2, Some(1.0)), 1, 0, None, &mut out);
        w.end_batch(1, 0, &mut out);
        w.end_batch(1, 0, &mut out); // nothing changed
        w.apply(&ev("a", 3, Some(1.0)), 2, 0, None, &mut out);
        w.apply(&ev("a", 12, Some(1.0)), 3, 0, None, &mut out); // closes [0,10) in this batch
        w.end_batch(3, 0, &mut out);
        assert_eq!(
            rows(&out),
            vec![
                (0, "a".into(), 2, 2.0, false, 0),
                (0, "a".into(), 3, 3.0, true, 1),
                (10, "a".into(), 1, 1.0, false, 0),
            ]
        );
    }

    #[test]
    fn both_mode_emits_the_update_before_the_final() {
        let mut w = FixedWindower::new(WindowConfig {
            size_ms: 10,
            emit: EmitMode::Both,
            ..WindowConfig::default()
        });
        let mut out = Vec::new();
        w.apply(&ev("a", 1, Some(1.0)), 0, 0, None, &mut out);
        w.apply(&ev("a", 12, Some(1.0)), 1, 0, None, &mut out);
        assert_eq!(
            rows(&out),
            vec![
                (0, "a".into(), 1, 1.0, false, 0),
                (0, "a".into(), 1, 1.0, true, 1)
            ]
        );
    }

    #[test]
    fn idle_close_advances_stream_time_with_the_wall_clock() {
        let mut w = FixedWindower::new(WindowConfig {
            size_ms: 10,
            idle_close_ms: Some(100),
            ..WindowConfig::default()
        });
        let mut out = Vec::new();
        w.apply(&ev("a", 1, None), 0, 0, Some(5_000), &mut out);
        w.tick(5_050, 0, 0, &mut out);
        assert!(out.is_empty(), "not idle long enough");
        w.tick(5_100, 0, 0, &mut out);
        assert_eq!(w.stream_time(), 101);
        assert_eq!(rows(&out), vec![(0, "a".into(), 1, 0.0, true, 0)]);
        let late = w.apply(&ev("a", 50, None), 1, 0, Some(5_101), &mut out);
        assert!(late.is_some(), "stream time moved past its window");
    }

    #[test]
    fn statistics_are_population_statistics() {
        let mut w = tumbling(100, 0);
        let mut out = Vec::new();
        for (i, v) in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
            .into_iter()
            .enumerate()
        {
            w.apply(&ev("k", i as i64, Some(v)), i as i64, 0, None, &mut out);
        }
        w.apply(&ev("k", 50, None), 9, 0, None, &mut out);
        w.close_all(10, 0, &mut out);
        let Output::WindowAggregate(a) = &out[0].output else {
            panic!("windows emit window aggregates")
        };
        assert_eq!(a.count, 9);
        assert_eq!(a.sum, 40.0);
        assert_eq!(a.mean, Some(5.0));
        assert_eq!(a.std, Some(2.0));
        assert_eq!((a.min, a.max), (Some(2.0), Some(9.0)));
        assert!(a.is_final);
    }
}

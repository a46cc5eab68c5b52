//! Event-time windows: pure, deterministic, checkpointable.
//!
//! Per partition, stream time is the largest event time seen and never goes backwards. A window
//! `[start, end)` closes when stream time >= end + grace; its final aggregate is emitted then.
//! An event for a window that already closed is late and dropped (counted).
//!
//! Today: tumbling windows, `emit = final`, `late = drop`. Hopping and sliding windows, update
//! emission, the other late-event policies and idle close are tracked in issue 4.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::config::{WindowConfig, WindowKind};
use crate::event::Event;
use crate::output::{Emitted, Output, WindowAggregate};

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

    fn present(&self, x: f64) -> Option<f64> {
        (self.values > 0).then_some(x)
    }
}

/// One configured window and its open state.
#[derive(Debug, Clone)]
pub struct Windower {
    spec: WindowConfig,
    /// Largest event time seen; `i64::MIN` before the first event.
    stream_time: i64,
    /// Open windows by start, then key.
    open: BTreeMap<i64, HashMap<String, Aggregate>>,
    /// Events dropped because their window had closed.
    late_dropped: u64,
}

/// Serialisable state of a [`Windower`], sorted so that equal states serialise equally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowerState {
    /// Window shape, to match state to configuration on restore.
    pub kind: WindowKind,
    /// Window length, likewise.
    pub size_ms: u64,
    /// Stream time.
    pub stream_time: i64,
    /// Late events dropped so far.
    pub late_dropped: u64,
    /// Open windows: (start, key, aggregate).
    pub open: Vec<(i64, String, Aggregate)>,
}

impl Windower {
    /// An empty windower for `spec`.
    pub fn new(spec: WindowConfig) -> Self {
        Self {
            spec,
            stream_time: i64::MIN,
            open: BTreeMap::new(),
            late_dropped: 0,
        }
    }

    /// Whether `state` belongs to this window definition.
    pub fn matches(&self, state: &WindowerState) -> bool {
        state.kind == self.spec.kind && state.size_ms == self.spec.size_ms
    }

    /// Late events dropped so far.
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    fn size(&self) -> i64 {
        self.spec.size_ms as i64
    }

    fn start_of(&self, ts: i64) -> i64 {
        ts.div_euclid(self.size()) * self.size()
    }

    fn closes_at(&self, start: i64) -> i64 {
        start
            .saturating_add(self.size())
            .saturating_add(self.spec.grace_ms as i64)
    }

    /// Adds `event` and emits the finals of every window its time closes.
    pub fn apply(&mut self, event: &Event, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        let start = self.start_of(event.ts_ms);
        if self.closes_at(start) <= self.stream_time {
            self.late_dropped += 1;
            return;
        }
        let keys = self.open.entry(start).or_default();
        match keys.get_mut(event.key.as_str()) {
            Some(agg) => agg.add(event.value),
            None => {
                let mut agg = Aggregate::default();
                agg.add(event.value);
                keys.insert(event.key.clone(), agg);
            }
        }
        if event.ts_ms > self.stream_time {
            self.stream_time = event.ts_ms;
            self.close_until(self.stream_time, offset, partition, out);
        }
    }

    /// Emits and forgets every window that closes at or before `time`.
    pub fn close_until(&mut self, time: i64, offset: i64, partition: i32, out: &mut Vec<Emitted>) {
        while let Some((&start, _)) = self.open.first_key_value() {
            if self.closes_at(start) > time {
                break;
            }
            let keys = self.open.remove(&start).unwrap_or_default();
            let mut keys: Vec<_> = keys.into_iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, agg) in keys {
                out.push(Emitted {
                    source_offset: offset,
                    output: Output::WindowAggregate(self.aggregate(partition, start, key, &agg)),
                });
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
    ) -> WindowAggregate {
        let variance = if agg.values > 0 {
            (agg.m2 / agg.values as f64).max(0.0)
        } else {
            0.0
        };
        WindowAggregate {
            partition,
            window: self.spec.kind,
            size_ms: self.spec.size_ms,
            slide_ms: self.spec.slide_ms.unwrap_or(self.spec.size_ms),
            window_start: start,
            window_end: start.saturating_add(self.size()),
            key,
            count: agg.count,
            sum: agg.sum,
            mean: agg.present(agg.mean),
            std: agg.present(variance.sqrt()),
            min: agg.present(agg.min),
            max: agg.present(agg.max),
            is_final: true,
            revision: 0,
        }
    }

    /// The state to checkpoint.
    pub fn snapshot(&self) -> WindowerState {
        let mut open: Vec<_> = self
            .open
            .iter()
            .flat_map(|(start, keys)| keys.iter().map(|(k, a)| (*start, k.clone(), a.clone())))
            .collect();
        open.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        WindowerState {
            kind: self.spec.kind,
            size_ms: self.spec.size_ms,
            stream_time: self.stream_time,
            late_dropped: self.late_dropped,
            open,
        }
    }

    /// Restores checkpointed state (which [`Windower::matches`] this window).
    pub fn restore(&mut self, state: WindowerState) {
        self.stream_time = state.stream_time;
        self.late_dropped = state.late_dropped;
        self.open.clear();
        for (start, key, agg) in state.open {
            self.open.entry(start).or_default().insert(key, agg);
        }
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

    fn tumbling(size_ms: u64, grace_ms: u64) -> Windower {
        Windower::new(WindowConfig {
            size_ms,
            grace_ms,
            ..WindowConfig::default()
        })
    }

    fn finals(out: &[Emitted]) -> Vec<(i64, String, u64, f64)> {
        out.iter()
            .map(|e| match &e.output {
                Output::WindowAggregate(w) => (w.window_start, w.key.clone(), w.count, w.sum),
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
            w.apply(&ev(k, ts, Some(1.0)), i as i64, 0, &mut out);
        }
        assert_eq!(
            finals(&out),
            vec![
                (0, "a".into(), 2, 2.0),
                (0, "b".into(), 1, 1.0),
                (10, "a".into(), 1, 1.0)
            ]
        );
    }

    #[test]
    fn grace_admits_out_of_order_then_late_events_drop() {
        let mut w = tumbling(10, 5);
        let mut out = Vec::new();
        w.apply(&ev("a", 2, None), 0, 0, &mut out);
        w.apply(&ev("a", 12, None), 1, 0, &mut out);
        w.apply(&ev("a", 8, None), 2, 0, &mut out); // within grace
        assert!(out.is_empty());
        w.apply(&ev("a", 15, None), 3, 0, &mut out); // closes [0,10)
        assert_eq!(finals(&out), vec![(0, "a".into(), 2, 0.0)]);
        w.apply(&ev("a", 1, None), 4, 0, &mut out); // late
        assert_eq!(w.late_dropped(), 1);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn statistics_are_population_statistics() {
        let mut w = tumbling(100, 0);
        let mut out = Vec::new();
        for (i, v) in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
            .into_iter()
            .enumerate()
        {
            w.apply(&ev("k", i as i64, Some(v)), i as i64, 0, &mut out);
        }
        w.apply(&ev("k", 50, None), 9, 0, &mut out);
        w.close_all(10, 0, &mut out);
        let Output::WindowAggregate(a) = &out[0].output;
        assert_eq!(a.count, 9);
        assert_eq!(a.sum, 40.0);
        assert_eq!(a.mean, Some(5.0));
        assert_eq!(a.std, Some(2.0));
        assert_eq!((a.min, a.max), (Some(2.0), Some(9.0)));
        assert!(a.is_final);
    }

    #[test]
    fn negative_times_align_to_the_epoch() {
        let w = tumbling(10, 0);
        assert_eq!(w.start_of(-1), -10);
        assert_eq!(w.start_of(-10), -10);
    }
}

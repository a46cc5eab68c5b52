//! Window engine against a naive reference on random out-of-order streams: every kind, grace,
//! emit mode and late policy; emission timing; snapshot → restore → continue.

use std::collections::BTreeMap;

use neurostream::config::{EmitMode, LatePolicy, WindowConfig, WindowKind};
use neurostream::event::Event;
use neurostream::output::{Emitted, Output, WindowAggregate};
use neurostream::windows::Windower;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Ev {
    key: &'static str,
    ts: i64,
    value: Option<f64>,
}

fn event(e: &Ev) -> Event {
    Event {
        key: e.key.into(),
        ts_ms: e.ts,
        features: vec![],
        value: e.value,
        id: None,
        metadata: None,
    }
}

/// A stream that mostly moves forward with bounded disorder.
fn stream() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["a", "b", "c"]),
            0i64..12,
            -30i64..4,
            prop::option::weighted(0.8, -100i32..100),
        ),
        1..120,
    )
    .prop_map(|items| {
        let mut clock = 1_000i64;
        items
            .into_iter()
            .map(|(key, step, jitter, value)| {
                clock += step;
                Ev {
                    key,
                    ts: clock + jitter,
                    value: value.map(|v| v as f64 / 4.0),
                }
            })
            .collect()
    })
}

fn spec() -> impl Strategy<Value = WindowConfig> {
    (
        prop::sample::select(vec![
            WindowKind::Tumbling,
            WindowKind::Hopping,
            WindowKind::Sliding,
        ]),
        1u64..40,
        1u64..5,
        prop::sample::select(vec![0u64, 3, 15]),
        prop::sample::select(vec![EmitMode::Final, EmitMode::Update, EmitMode::Both]),
        prop::sample::select(vec![LatePolicy::Drop, LatePolicy::Dlq, LatePolicy::Update]),
        prop::sample::select(vec![0u64, 10]),
    )
        .prop_map(|(kind, size, hops, grace, emit, late, lateness)| {
            let late = if kind == WindowKind::Sliding && late == LatePolicy::Update {
                LatePolicy::Drop
            } else {
                late
            };
            WindowConfig {
                kind,
                size_ms: size,
                slide_ms: (kind == WindowKind::Hopping).then(|| (size / hops).max(1)),
                grace_ms: grace,
                emit,
                late,
                allowed_lateness_ms: if late == LatePolicy::Update {
                    lateness
                } else {
                    0
                },
                idle_close_ms: None,
            }
        })
}

type WindowId = (i64, String);

/// The reference: which events each window holds at the end, and when each window closes.
fn reference(spec: &WindowConfig, events: &[Ev]) -> BTreeMap<WindowId, Vec<Option<f64>>> {
    let size = spec.size_ms as i64;
    let grace = spec.grace_ms as i64;
    let mut windows: BTreeMap<WindowId, Vec<Option<f64>>> = BTreeMap::new();
    let mut stream_time = i64::MIN;
    match spec.kind {
        WindowKind::Tumbling | WindowKind::Hopping => {
            let slide = spec.slide_ms.unwrap_or(spec.size_ms) as i64;
            for e in events {
                let mut start = e.ts.div_euclid(slide) * slide;
                while start + size > e.ts {
                    let closes = start + size + grace;
                    let purges = closes + spec.allowed_lateness_ms as i64;
                    let open = closes > stream_time;
                    let correctable = spec.late == LatePolicy::Update && purges > stream_time;
                    if open || correctable {
                        windows
                            .entry((start, e.key.into()))
                            .or_default()
                            .push(e.value);
                    }
                    start -= slide;
                }
                stream_time = stream_time.max(e.ts);
            }
        }
        WindowKind::Sliding => {
            let mut admitted: Vec<&Ev> = Vec::new();
            for e in events {
                if stream_time == i64::MIN || e.ts + grace >= stream_time {
                    admitted.push(e);
                }
                stream_time = stream_time.max(e.ts);
            }
            let mut starts: Vec<WindowId> = Vec::new();
            for r in &admitted {
                starts.push((r.ts - size, r.key.into()));
                if admitted
                    .iter()
                    .any(|o| o.key == r.key && o.ts > r.ts && o.ts <= r.ts + size)
                {
                    starts.push((r.ts + 1, r.key.into()));
                }
            }
            for (start, key) in starts {
                let values = admitted
                    .iter()
                    .filter(|o| o.key == key && o.ts >= start && o.ts <= start + size)
                    .map(|o| o.value)
                    .collect();
                windows.insert((start, key), values);
            }
        }
    }
    windows
}

/// First event index at which stream time reached each window's close, if it did.
fn close_index(spec: &WindowConfig, events: &[Ev], start: i64) -> Option<usize> {
    let end = start
        + spec.size_ms as i64
        + if spec.kind == WindowKind::Sliding {
            1
        } else {
            0
        };
    let mut stream_time = i64::MIN;
    events.iter().position(|e| {
        stream_time = stream_time.max(e.ts);
        stream_time >= end + spec.grace_ms as i64
    })
}

fn run(spec: &WindowConfig, events: &[Ev], batch: usize) -> Vec<(usize, WindowAggregate)> {
    let mut w = Windower::new(spec.clone());
    let mut out: Vec<Emitted> = Vec::new();
    let mut tagged = Vec::new();
    for (i, e) in events.iter().enumerate() {
        w.apply(&event(e), i as i64, 0, None, &mut out);
        if i % batch == batch - 1 {
            w.end_batch(i as i64, 0, &mut out);
        }
        // The cap's running count is the state's: open windows, and those kept closed.
        let snapshot = w.snapshot();
        let held = snapshot.open.len()
            + snapshot.closed.len()
            + snapshot.sliding.map_or(0, |s| s.open.len());
        assert_eq!(w.held_windows(), held, "after event {i}");
        tagged.extend(out.drain(..).map(|o| (i, unwrap(o))));
    }
    w.close_all(events.len() as i64, 0, &mut out);
    tagged.extend(out.drain(..).map(|o| (usize::MAX, unwrap(o))));
    tagged
}

fn unwrap(e: Emitted) -> WindowAggregate {
    match e.output {
        Output::WindowAggregate(w) => w,
        other => panic!("windows emit window aggregates, not {other:?}"),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn finals_match_the_reference(spec in spec(), events in stream(), batch in 1usize..7) {
        let expected = reference(&spec, &events);
        let emitted = run(&spec, &events, batch);
        // Per window: revisions 0, 1, 2, … in order; the last emission is a final.
        let mut per_window: BTreeMap<WindowId, Vec<(usize, WindowAggregate)>> = BTreeMap::new();
        for (i, w) in emitted {
            per_window.entry((w.window_start, w.key.clone())).or_default().push((i, w));
        }
        prop_assert_eq!(per_window.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
        for (id, emissions) in &per_window {
            for (n, (_, w)) in emissions.iter().enumerate() {
                prop_assert_eq!(w.revision as usize, n, "revisions of {:?}", id);
            }
            let (at, last) = emissions.last().unwrap();
            prop_assert!(last.is_final, "last emission of {:?} is final", id);
            if spec.emit == EmitMode::Final && spec.late != LatePolicy::Update {
                prop_assert_eq!(emissions.len(), 1);
            }
            // The first final comes exactly when stream time reaches end + grace.
            let first_final = emissions.iter().find(|(_, w)| w.is_final).unwrap().0;
            let due = close_index(&spec, &events, id.0).unwrap_or(usize::MAX);
            if spec.late != LatePolicy::Update {
                prop_assert_eq!(first_final, due, "close time of {:?}", id);
            } else {
                prop_assert!(first_final >= due.min(*at));
            }
            let values = &expected[id];
            let present: Vec<f64> = values.iter().flatten().copied().collect();
            prop_assert_eq!(last.count as usize, values.len(), "count of {:?}", id);
            prop_assert!(close(last.sum, present.iter().sum()));
            if present.is_empty() {
                prop_assert!(last.mean.is_none() && last.min.is_none() && last.max.is_none());
            } else {
                let n = present.len() as f64;
                let mean = present.iter().sum::<f64>() / n;
                let var = present.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                prop_assert!(close(last.mean.unwrap(), mean));
                prop_assert!(close(last.std.unwrap(), var.sqrt()), "std {:?} vs {}", last.std, var.sqrt());
                prop_assert_eq!(last.min.unwrap(), present.iter().copied().fold(f64::INFINITY, f64::min));
                prop_assert_eq!(last.max.unwrap(), present.iter().copied().fold(f64::NEG_INFINITY, f64::max));
            }
            for (_, w) in emissions {
                prop_assert!(w.count <= last.count || spec.late == LatePolicy::Update);
            }
        }
    }

    #[test]
    fn snapshot_restore_continue_equals_an_uninterrupted_run(
        spec in spec(), events in stream(), cut in 0usize..120, batch in 1usize..7
    ) {
        let cut = cut.min(events.len());
        let straight = run(&spec, &events, batch);
        let mut w = Windower::new(spec.clone());
        let mut out = Vec::new();
        let mut tagged = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if i == cut {
                let held = w.held_windows();
                let snap = serde_json::to_vec(&w.snapshot()).unwrap();
                w = Windower::new(spec.clone());
                w.restore(serde_json::from_slice(&snap).unwrap());
                prop_assert_eq!(w.held_windows(), held);
            }
            w.apply(&event(e), i as i64, 0, None, &mut out);
            if i % batch == batch - 1 {
                w.end_batch(i as i64, 0, &mut out);
            }
            tagged.extend(out.drain(..).map(|o| (i, unwrap(o))));
        }
        w.close_all(events.len() as i64, 0, &mut out);
        tagged.extend(out.drain(..).map(|o| (usize::MAX, unwrap(o))));
        prop_assert_eq!(tagged, straight);
    }
}

#[test]
fn kafka_streams_sliding_example() {
    // The SlidingWindows javadoc: time difference 5000 ms, records at 8000, 9200, 12400.
    let spec = WindowConfig {
        kind: WindowKind::Sliding,
        size_ms: 5_000,
        ..WindowConfig::default()
    };
    let events = [(8_000, 1.0), (9_200, 2.0), (12_400, 3.0)].map(|(ts, v)| Ev {
        key: "A",
        ts,
        value: Some(v),
    });
    let got: Vec<(i64, i64, f64)> = run(&spec, &events, 1)
        .into_iter()
        .map(|(_, w)| (w.window_start, w.window_end, w.sum))
        .collect();
    assert_eq!(
        got,
        vec![
            (3_000, 8_000, 1.0),
            (4_200, 9_200, 3.0),
            (7_400, 12_400, 6.0),
            (8_001, 13_001, 5.0),
            (9_201, 14_201, 3.0),
        ]
    );
}

#[test]
fn a_sliding_window_forgets_keys_no_admissible_event_can_reach() {
    // A new key per event (request ids, or a hostile producer): each key's last record must go
    // once stream time is past it by more than size + grace, or state grows with every key ever
    // seen (and every checkpoint with it).
    let spec = WindowConfig {
        kind: WindowKind::Sliding,
        size_ms: 10,
        ..WindowConfig::default()
    };
    let mut w = Windower::new(spec.clone());
    let mut out = Vec::new();
    let keys: Vec<String> = (0..1_000).map(|i| format!("k{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let e = Event {
            key: key.clone(),
            ts_ms: 100 + 20 * i as i64,
            value: Some(1.0),
            features: vec![],
            id: None,
            metadata: None,
        };
        w.apply(&e, i as i64, 0, None, &mut out);
        let (keys_held, open) = w.state_size();
        assert!(
            keys_held <= 3 && open <= 3,
            "{keys_held} keys, {open} open windows"
        );
    }
    w.advance(1_000_000, 1_000, 0, None, &mut out);
    assert_eq!(w.state_size(), (0, 0));
    let snapshot = w.snapshot();
    assert!(snapshot.sliding.unwrap().keys.is_empty());
    // Every key's window was emitted once, forgotten or not.
    assert_eq!(out.len(), 1_000);
    // A forgotten key that comes back is a fresh key: the same outputs as if it had been kept.
    let back = Ev {
        key: "k0",
        ts: 1_000_000,
        value: Some(2.0),
    };
    w.apply(&event(&back), 1_001, 0, None, &mut out);
    w.close_all(1_002, 0, &mut out);
    let last = unwrap(out.pop().expect("the returning key's window"));
    assert_eq!((last.window_start, last.count, last.sum), (999_990, 1, 2.0));
}

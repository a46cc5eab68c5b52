//! The per-partition processor: the pure seam between Kafka and the engines.
//!
//! Synchronous and deterministic: records in, outputs out, no clock, no I/O. The service's
//! partition workers, the offline `neurostream process` command and the benches all drive this
//! same type. Its whole state serialises to a snapshot that is checkpointed with the partition's
//! next offset, so a restored processor continues exactly where the checkpoint left off.

use serde::{Deserialize, Serialize};

use crate::clustering::{AssignmentLine, ClusteringStage};
use crate::config::{LatePolicy, ProcessingConfig};
use crate::event::{self, DecodeError, Event};
use crate::output::Emitted;
use crate::windows::{Late, Windower, WindowerDelta, WindowerState};

/// One input message as the processor sees it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Message payload.
    pub payload: Option<&'a [u8]>,
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Message timestamp (epoch ms), when the broker or producer set one.
    pub timestamp_ms: Option<i64>,
    /// Offset within the partition.
    pub offset: i64,
}

/// Counters a processor keeps (part of its state).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessorCounters {
    /// Events accepted.
    pub events: u64,
    /// Messages rejected as bad input.
    pub rejected: u64,
}

/// Serialised processor state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    dimension: Option<usize>,
    counters: ProcessorCounters,
    #[serde(default)]
    last_offset: i64,
    #[serde(default)]
    clustering: Option<ClusteringStage>,
    windows: Vec<WindowerState>,
    #[serde(default)]
    seq: SeqCounter,
}

/// The processor's state at one moment, copied for a full checkpoint ([`Processor::copy_state`]).
#[derive(Debug)]
pub struct StateCopy(Snapshot);

impl StateCopy {
    /// The checkpoint's bytes, as [`Processor::snapshot`] would have written them then.
    pub fn encode(mut self) -> Vec<u8> {
        self.0.windows.iter_mut().for_each(WindowerState::sort);
        rmp_serde::to_vec(&self.0).expect(
            "MessagePack encodes every value of the processor state (plain data, string map keys or integers)",
        )
    }
}

/// Numbers outputs within their source offset, across batches and checkpoints, so (source
/// offset, seq) identifies an output and a replay numbers it the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct SeqCounter {
    /// The source offset of the last numbered output.
    offset: i64,
    /// The next number for that offset.
    next: u32,
}

impl SeqCounter {
    fn number(&mut self, outputs: &mut [Emitted]) {
        for e in outputs {
            if e.source_offset != self.offset {
                self.offset = e.source_offset;
                self.next = 0;
            }
            e.seq = self.next;
            self.next += 1;
        }
    }
}

const SNAPSHOT_VERSION: u32 = 2;

/// What changed since the previous checkpoint (a full snapshot or a delta): the processor's
/// scalars and clustering whole, the windows' changed slots only.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delta {
    version: u32,
    dimension: Option<usize>,
    counters: ProcessorCounters,
    last_offset: i64,
    clustering: Option<ClusteringStage>,
    windows: Vec<WindowerDelta>,
    seq: SeqCounter,
}

const DELTA_VERSION: u32 = 1;

/// A snapshot that cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("processor snapshot cannot be restored: {0}")]
pub struct SnapshotError(String);

/// The processor of one partition.
#[derive(Debug, Clone)]
pub struct Processor {
    partition: i32,
    /// What the decoder accepts (its clock is the batch's wall clock).
    limits: event::Limits,
    /// `processing.max_open_windows`.
    max_open_windows: usize,
    /// Feature dimension of this partition: configured, or fixed by its first event with features.
    dimension: Option<usize>,
    windows: Vec<Windower>,
    /// Online clustering, when enabled.
    clustering: Option<ClusteringStage>,
    counters: ProcessorCounters,
    /// Wall clock of the current batch (idle close); `None` offline.
    wall_ms: Option<i64>,
    /// Offset of the last record processed (the source offset of tick and batch-end outputs).
    last_offset: i64,
    /// Output numbering within source offsets.
    seq: SeqCounter,
    /// The input format (JSON unless set).
    input: crate::avro::InputDecoder,
}

impl Processor {
    /// A fresh processor for `partition`.
    pub fn new(config: &ProcessingConfig, max_event_bytes: usize, partition: i32) -> Self {
        Self {
            partition,
            limits: event::Limits {
                max_bytes: max_event_bytes,
                max_key_bytes: config.max_key_bytes,
                max_metadata_bytes: config.max_metadata_bytes,
                max_ahead_ms: config.max_event_time_ahead_ms,
                now_ms: None,
            },
            max_open_windows: config.max_open_windows,
            dimension: config.dimension,
            windows: config.windows.iter().cloned().map(Windower::new).collect(),
            clustering: config
                .clustering
                .enabled
                .then(|| ClusteringStage::new(config.clustering.clone())),
            counters: ProcessorCounters::default(),
            wall_ms: None,
            last_offset: -1,
            seq: SeqCounter {
                offset: -1,
                next: 0,
            },
            input: crate::avro::InputDecoder::Json,
        }
    }

    /// Decodes input with `input` (JSON, Avro, either) from now on.
    pub fn set_input(&mut self, input: crate::avro::InputDecoder) {
        self.input = input;
    }

    /// A processor restored from a snapshot taken by [`Processor::snapshot`]. Windows that are no
    /// longer configured are dropped; newly configured ones start empty.
    ///
    /// # Errors
    /// [`SnapshotError`] when the bytes are not a snapshot of a compatible version.
    pub fn restore(
        config: &ProcessingConfig,
        max_event_bytes: usize,
        partition: i32,
        bytes: &[u8],
    ) -> Result<Self, SnapshotError> {
        Self::restore_chain(config, max_event_bytes, partition, bytes, &[])
    }

    /// A processor restored from a full snapshot and the deltas ([`Processor::take_delta`])
    /// written after it, oldest first.
    ///
    /// # Errors
    /// [`SnapshotError`] when a part is not a snapshot or delta of a compatible version.
    pub fn restore_chain(
        config: &ProcessingConfig,
        max_event_bytes: usize,
        partition: i32,
        bytes: &[u8],
        deltas: &[Vec<u8>],
    ) -> Result<Self, SnapshotError> {
        let mut p = Self::restore_base(config, max_event_bytes, partition, bytes)?;
        for (i, bytes) in deltas.iter().enumerate() {
            let delta: Delta = rmp_serde::from_slice(bytes)
                .map_err(|e| SnapshotError(format!("delta {} of {}: {e}", i + 1, deltas.len())))?;
            if delta.version != DELTA_VERSION {
                return Err(SnapshotError(format!(
                    "delta {} of {}: version {} (this build reads {DELTA_VERSION})",
                    i + 1,
                    deltas.len(),
                    delta.version
                )));
            }
            p.adopt(
                config,
                delta.dimension,
                delta.counters,
                delta.last_offset,
                delta.seq,
            );
            p.adopt_clustering(config, delta.clustering);
            for change in delta.windows {
                if let Some(w) = p.windows.iter_mut().find(|w| w.matches(&change.state)) {
                    w.apply_delta(change);
                }
            }
        }
        Ok(p)
    }

    /// Takes the checkpointed scalars (a configured dimension wins over the checkpoint's).
    fn adopt(
        &mut self,
        config: &ProcessingConfig,
        dimension: Option<usize>,
        counters: ProcessorCounters,
        last_offset: i64,
        seq: SeqCounter,
    ) {
        self.dimension = config.dimension.or(dimension);
        self.counters = counters;
        self.last_offset = last_offset;
        self.seq = seq;
    }

    /// Takes the checkpointed clustering, under the configured parameters, when clustering is
    /// enabled.
    fn adopt_clustering(&mut self, config: &ProcessingConfig, stage: Option<ClusteringStage>) {
        if let (true, Some(stage)) = (config.clustering.enabled, stage) {
            self.clustering = Some(stage.with_config(config.clustering.clone()));
        }
    }

    fn restore_base(
        config: &ProcessingConfig,
        max_event_bytes: usize,
        partition: i32,
        bytes: &[u8],
    ) -> Result<Self, SnapshotError> {
        // Version 1 snapshots were JSON; version 2 is MessagePack, which keeps every float
        // bit-exact, non-finite ones included (JSON would write `null` and never read it back).
        // Version 2 structs were maps with field names until 2026-12-04 and are arrays since
        // (41 % fewer bytes); the decoder reads both.
        let snap: Snapshot = if bytes.first() == Some(&b'{') {
            serde_json::from_slice(bytes).map_err(|e| SnapshotError(e.to_string()))?
        } else {
            rmp_serde::from_slice(bytes).map_err(|e| SnapshotError(e.to_string()))?
        };
        if !(1..=SNAPSHOT_VERSION).contains(&snap.version) {
            return Err(SnapshotError(format!(
                "version {} (this build reads 1 to {SNAPSHOT_VERSION})",
                snap.version
            )));
        }
        let mut p = Self::new(config, max_event_bytes, partition);
        p.adopt(
            config,
            snap.dimension,
            snap.counters,
            snap.last_offset,
            snap.seq,
        );
        p.adopt_clustering(config, snap.clustering);
        for state in snap.windows {
            if let Some(w) = p.windows.iter_mut().find(|w| w.matches(&state)) {
                w.restore(state);
            }
        }
        Ok(p)
    }

    /// The state to checkpoint.
    pub fn snapshot(&self) -> Vec<u8> {
        self.copy_state().encode()
    }

    /// A copy of the state to checkpoint: the cheap half of [`Processor::snapshot`], which the
    /// processor must wait for; [`StateCopy::encode`] (sorting and serialising, the larger half,
    /// and freeing the copy) can run elsewhere while it goes on.
    pub fn copy_state(&self) -> StateCopy {
        StateCopy(Snapshot {
            version: SNAPSHOT_VERSION,
            dimension: self.dimension,
            counters: self.counters.clone(),
            last_offset: self.last_offset,
            clustering: self.clustering.clone(),
            windows: self.windows.iter().map(Windower::copy_state).collect(),
            seq: self.seq,
        })
    }

    /// What changed since the last delta or [`Processor::forget_changes`] (with
    /// [`Processor::track_changes`] on), for [`Processor::restore_chain`] after the checkpoint
    /// written then; forgets it. The window
    /// slots cost what changed (a sliding window and the clustering are written whole).
    pub fn take_delta(&mut self) -> Vec<u8> {
        rmp_serde::to_vec(&Delta {
            version: DELTA_VERSION,
            dimension: self.dimension,
            counters: self.counters.clone(),
            last_offset: self.last_offset,
            clustering: self.clustering.clone(),
            windows: self.windows.iter_mut().map(Windower::take_delta).collect(),
            seq: self.seq,
        })
        .expect("MessagePack encodes every value of the processor state (plain data, string map keys or integers)")
    }

    /// Whether the next [`Processor::take_delta`] may come under `room` bytes, judged from a
    /// base of `base_bytes` and the share of window state changed since the last checkpoint,
    /// without taking it. `false` when the delta would hold (nearly) the whole state: no window
    /// keeps a change list (sliding windows, or none: the clustering goes whole into every
    /// delta), or every slot changed. Taking such a delta only to drop it for a new base costs
    /// the worker a whole serialisation.
    pub fn delta_may_fit(&self, base_bytes: usize, room: usize) -> bool {
        let (changed, total) = self
            .windows
            .iter()
            .map(Windower::changed_units)
            .fold((0usize, 0usize), |(c, t), (dc, dt)| (c + dc, t + dt));
        if total == 0 {
            return false;
        }
        let estimate = base_bytes as u128 * changed as u128 / total as u128;
        estimate < room as u128
    }

    /// Lists what changes from now on, for [`Processor::take_delta`] (off by default: a
    /// processor that takes no deltas would list every window slot it ever touched).
    pub fn track_changes(&mut self) {
        self.windows.iter_mut().for_each(Windower::track_changes);
    }

    /// Forgets the changes since the last delta: a full [`Processor::snapshot`] holds them.
    pub fn forget_changes(&mut self) {
        self.windows.iter_mut().for_each(Windower::forget_changes);
    }

    /// Decodes and processes one message; its outputs are appended to `out`. Returns how the
    /// event was late, when it was late for a window whose policy is `dlq` (the caller sends it to
    /// the dead-letter topic with reason `late`).
    ///
    /// # Errors
    /// A [`DecodeError`] when the message is bad input; state is unchanged and the caller sends
    /// the message to the dead-letter topic.
    pub fn process(
        &mut self,
        record: Record<'_>,
        out: &mut Vec<Emitted>,
    ) -> Result<Option<Late>, DecodeError> {
        self.last_offset = record.offset;
        let limits = event::Limits {
            now_ms: self.wall_ms,
            ..self.limits
        };
        let decoded = event::decode_with(
            &self.input,
            record.payload,
            record.key,
            record.timestamp_ms,
            &limits,
        );
        match decoded {
            Ok(event) => self.apply(&event, record.offset, out),
            Err(err) => {
                self.counters.rejected += 1;
                Err(err)
            }
        }
    }

    /// Processes one decoded event; see [`Processor::process`].
    ///
    /// # Errors
    /// [`DecodeError::DimensionMismatch`] when its features do not match the partition's dimension.
    pub fn apply(
        &mut self,
        event: &Event,
        offset: i64,
        out: &mut Vec<Emitted>,
    ) -> Result<Option<Late>, DecodeError> {
        let from = out.len();
        let result = self.apply_unnumbered(event, offset, out);
        self.seq.number(&mut out[from..]);
        result
    }

    fn apply_unnumbered(
        &mut self,
        event: &Event,
        offset: i64,
        out: &mut Vec<Emitted>,
    ) -> Result<Option<Late>, DecodeError> {
        if let Some(d) = self.dimension {
            if !event.features.is_empty() && d != event.features.len() {
                self.counters.rejected += 1;
                return Err(DecodeError::DimensionMismatch {
                    expected: d,
                    got: event.features.len(),
                });
            }
        }
        // An event clustering refuses (no features, or features its engine cannot take) moves
        // nothing: not the dimension, not stream time.
        if let Some(refused) = self.clustering.as_ref().and_then(|c| c.refusal(event)) {
            self.counters.rejected += 1;
            return Err(refused);
        }
        // At the cap, an event that would add one more window (open, or kept closed for late
        // updates) first moves stream time to its own (closing what that closes: a full
        // partition must not stop its windows from ever closing), then is refused if there is
        // still no room, before its clustering or aggregation changes anything.
        let open = self.held_windows();
        if open >= self.max_open_windows && self.windows.iter().any(|w| w.would_add(event)) {
            for w in &mut self.windows {
                w.advance(event.ts_ms, offset, self.partition, self.wall_ms, out);
            }
            let open = self.held_windows();
            if open >= self.max_open_windows && self.windows.iter().any(|w| w.would_add(event)) {
                self.counters.rejected += 1;
                return Err(DecodeError::StateLimit {
                    open,
                    limit: self.max_open_windows,
                });
            }
        }
        if self.dimension.is_none() && !event.features.is_empty() {
            self.dimension = Some(event.features.len());
        }
        if let Some(stage) = &mut self.clustering {
            if let Err(err) = stage.apply(event, offset, self.partition, out) {
                self.counters.rejected += 1;
                return Err(err);
            }
        }
        self.counters.events += 1;
        let mut to_dlq = None;
        for w in &mut self.windows {
            if let Some(late) = w.apply(event, offset, self.partition, self.wall_ms, out) {
                if late.policy == LatePolicy::Dlq {
                    to_dlq = Some(late);
                }
            }
        }
        Ok(to_dlq)
    }

    /// Sets the wall clock for the records that follow (the service does; offline does not).
    pub fn set_wall_clock(&mut self, wall_ms: i64) {
        self.wall_ms = Some(wall_ms);
    }

    /// Restarts idle windows' quiet period at `wall_ms`, after a time the input was not
    /// watched (restored from a checkpoint, or a long flush): idle close must not mistake a
    /// restart or a backlog for a quiet partition.
    pub fn resume_idle_clocks(&mut self, wall_ms: i64) {
        for w in &mut self.windows {
            w.resume_idle_clock(wall_ms);
        }
    }

    /// Idle close: lets windows whose partition was quiet for their `idle_close_ms` advance
    /// stream time with the wall clock.
    pub fn tick(&mut self, wall_ms: i64, out: &mut Vec<Emitted>) {
        let from = out.len();
        for w in &mut self.windows {
            w.tick(wall_ms, self.last_offset, self.partition, out);
        }
        self.seq.number(&mut out[from..]);
    }

    /// End of a processing batch: emits coalesced window updates.
    pub fn end_batch(&mut self, out: &mut Vec<Emitted>) {
        let from = out.len();
        for w in &mut self.windows {
            w.end_batch(self.last_offset, self.partition, out);
        }
        self.seq.number(&mut out[from..]);
    }

    /// End of input: closes every open window with its final (an update the final would
    /// immediately supersede is emitted only in `emit = "both"` mode).
    pub fn close_all(&mut self, out: &mut Vec<Emitted>) {
        let from = out.len();
        self.close_all_unnumbered(out);
        self.seq.number(&mut out[from..]);
    }

    fn close_all_unnumbered(&mut self, out: &mut Vec<Emitted>) {
        if let Some(stage) = &mut self.clustering {
            stage.finish(self.partition, self.last_offset, out);
        }
        for w in &mut self.windows {
            w.close_all(self.last_offset, self.partition, out);
        }
    }

    /// Keep per-event clustering assignments (`neurostream process --assignments`).
    pub fn collect_assignments(&mut self, on: bool) {
        if let Some(stage) = &mut self.clustering {
            stage.collect_assignments(on);
        }
    }

    /// Clustering assignments so far, in input order.
    pub fn drain_assignments(&mut self) -> Vec<AssignmentLine> {
        self.clustering
            .as_mut()
            .map(|s| s.drain_assignments().collect())
            .unwrap_or_default()
    }

    /// Whether any window wants wall-clock ticks (idle close).
    pub fn wants_ticks(&self) -> Option<u64> {
        self.windows
            .iter()
            .filter_map(Windower::idle_close_ms)
            .min()
    }

    /// Counters so far.
    pub fn counters(&self) -> &ProcessorCounters {
        &self.counters
    }

    /// Late events dropped so far, over all windows.
    pub fn late_dropped(&self) -> u64 {
        self.windows.iter().map(Windower::late_dropped).sum()
    }

    /// Keys with window state and open (key, window) pairs, summed over the windows.
    pub fn state_size(&self) -> (usize, usize) {
        self.windows
            .iter()
            .map(Windower::state_size)
            .fold((0, 0), |(k, o), (k2, o2)| (k.max(k2), o + o2))
    }

    /// (key, window) pairs held over all windows (open, or kept closed for late updates): what
    /// `processing.max_open_windows` caps.
    pub fn held_windows(&self) -> usize {
        self.windows.iter().map(Windower::held_windows).sum()
    }

    /// The clustering status now, when clustering is on.
    pub fn status(&self) -> Option<crate::output::StatusRecord> {
        self.clustering
            .as_ref()
            .map(|c| c.current_status(self.partition))
    }

    /// The partition this processor serves.
    pub fn partition(&self) -> i32 {
        self.partition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusteringConfig, WindowConfig};

    /// Processes the JSON event `text` at `offset`, its Kafka timestamp `ts`.
    fn process_json(
        p: &mut Processor,
        out: &mut Vec<Emitted>,
        text: &str,
        ts: i64,
        offset: i64,
    ) -> Result<(), DecodeError> {
        let record = Record {
            payload: Some(text.as_bytes()),
            key: None,
            timestamp_ms: Some(ts),
            offset,
        };
        p.process(record, out).map(|_| ())
    }

    fn config() -> ProcessingConfig {
        ProcessingConfig {
            dimension: None,
            clustering: ClusteringConfig {
                warmup_points: Some(20),
                ..ClusteringConfig::default()
            },
            windows: vec![
                WindowConfig {
                    size_ms: 10,
                    ..WindowConfig::default()
                },
                WindowConfig {
                    kind: crate::config::WindowKind::Hopping,
                    size_ms: 25,
                    slide_ms: Some(5),
                    grace_ms: 5,
                    emit: crate::config::EmitMode::Both,
                    late: LatePolicy::Update,
                    allowed_lateness_ms: 30,
                    ..WindowConfig::default()
                },
            ],
            ..ProcessingConfig::default()
        }
    }

    fn lines(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    r#"{{"key":"k{}","ts":{},"value":{},"features":[1,2]}}"#,
                    i % 3,
                    i * 3 + (i % 4),
                    i as f64 * 0.5
                )
            })
            .collect()
    }

    fn run(p: &mut Processor, input: &[String], from: usize) -> Vec<Emitted> {
        let mut out = Vec::new();
        for (i, line) in input.iter().enumerate().skip(from) {
            let rec = Record {
                payload: Some(line.as_bytes()),
                key: None,
                timestamp_ms: None,
                offset: i as i64,
            };
            p.process(rec, &mut out).unwrap();
            if i % 50 == 49 {
                p.end_batch(&mut out);
            }
        }
        out
    }

    #[test]
    fn snapshot_restore_continues_exactly() {
        let input = lines(400);
        let mut straight = Processor::new(&config(), 1 << 20, 3);
        let all = run(&mut straight, &input, 0);

        let mut first = Processor::new(&config(), 1 << 20, 3);
        let mut out = run(&mut first, &input[..137], 0);
        let snap = first.snapshot();
        let mut second = Processor::restore(&config(), 1 << 20, 3, &snap).unwrap();
        out.extend(run(&mut second, &input, 137));
        assert_eq!(out, all);
        assert_eq!(second.snapshot(), straight.snapshot());
    }

    /// Builds before 2026-12-04 wrote snapshots and deltas with field names (MessagePack maps);
    /// this one writes arrays (77 instead of 130 MB for 1 M keys). Both restore to the same
    /// state, and continue the same.
    #[test]
    fn snapshots_and_deltas_with_field_names_still_restore() {
        let input = lines(400);
        let mut straight = Processor::new(&config(), 1 << 20, 3);
        let all = run(&mut straight, &input, 0);

        let mut first = Processor::new(&config(), 1 << 20, 3);
        first.track_changes();
        let mut out = run(&mut first, &input[..137], 0);
        let compact = first.snapshot();
        let snap: Snapshot = rmp_serde::from_slice(&compact).unwrap();
        let named = rmp_serde::to_vec_named(&snap).unwrap();
        assert!(named.len() > compact.len());
        first.forget_changes();
        run(&mut first, &input[..250], 137);
        let delta: Delta = rmp_serde::from_slice(&first.take_delta()).unwrap();
        let named_delta = rmp_serde::to_vec_named(&delta).unwrap();

        let restored = Processor::restore(&config(), 1 << 20, 3, &named).unwrap();
        assert_eq!(restored.snapshot(), compact);
        let chained =
            Processor::restore_chain(&config(), 1 << 20, 3, &named, &[named_delta]).unwrap();
        assert_eq!(chained.snapshot(), first.snapshot());
        let mut second = Processor::restore(&config(), 1 << 20, 3, &named).unwrap();
        out.extend(run(&mut second, &input, 137));
        assert_eq!(out, all);
    }

    #[test]
    fn outputs_are_numbered_within_their_offset_across_batches_and_checkpoints() {
        let input = lines(400);
        let mut p = Processor::new(&config(), 1 << 20, 3);
        let mut out = run(&mut p, &input[..200], 0);
        p.end_batch(&mut out);
        let snap = p.snapshot();
        let mut q = Processor::restore(&config(), 1 << 20, 3, &snap).unwrap();
        q.end_batch(&mut out);
        out.extend(run(&mut q, &input, 200));
        let mut seen = std::collections::HashSet::new();
        for e in &out {
            assert!(
                seen.insert((e.source_offset, e.seq)),
                "(offset, seq) repeats: {e:?}"
            );
        }
        // Numbers are dense per offset.
        let mut by_offset = std::collections::BTreeMap::<i64, Vec<u32>>::new();
        for e in &out {
            by_offset.entry(e.source_offset).or_default().push(e.seq);
        }
        for (offset, seqs) in by_offset {
            let want: Vec<u32> = (0..seqs.len() as u32).collect();
            assert_eq!(seqs, want, "offset {offset}");
        }
    }

    /// The worker asks [`Processor::delta_may_fit`] before taking a delta: yes when few slots
    /// changed, no when a delta would be the whole state (every slot changed, sliding windows
    /// only, no windows); and the real deltas agree.
    #[test]
    fn a_delta_is_judged_before_it_is_taken() {
        fn feed(p: &mut Processor, keys: std::ops::Range<usize>, ts: i64) {
            let mut out = Vec::new();
            for k in keys {
                let text = format!(r#"{{"key":"key-{k}","ts":{ts},"value":1,"features":[1.0]}}"#);
                let record = Record {
                    payload: Some(text.as_bytes()),
                    key: None,
                    timestamp_ms: Some(ts),
                    offset: k as i64,
                };
                p.process(record, &mut out).unwrap();
            }
        }
        let with_windows = |windows: Vec<WindowConfig>| ProcessingConfig {
            windows,
            ..ProcessingConfig::default()
        };
        let tumbling = WindowConfig {
            size_ms: 1_000,
            ..WindowConfig::default()
        };
        let sliding = WindowConfig {
            kind: crate::config::WindowKind::Sliding,
            size_ms: 1_000,
            ..WindowConfig::default()
        };
        for (windows, few_fit) in [
            (vec![tumbling.clone()], true),
            (vec![sliding], false),
            (vec![], false),
        ] {
            let config = with_windows(windows.clone());
            let mut p = Processor::new(&config, 1 << 20, 0);
            p.track_changes();
            feed(&mut p, 0..200, 10);
            let base = p.snapshot().len();
            p.forget_changes();
            feed(&mut p, 0..4, 20);
            assert_eq!(p.delta_may_fit(base, base), few_fit, "{windows:?}");
            assert_eq!(p.take_delta().len() < base / 2, few_fit, "{windows:?}");
            feed(&mut p, 0..200, 30);
            assert!(
                !p.delta_may_fit(base, base),
                "{windows:?}: every slot changed"
            );
            assert!(p.take_delta().len() * 10 > base * 9, "{windows:?}");
        }
        // A delta that fits the base but not what the deltas before it left of the budget.
        let mut p = Processor::new(&with_windows(vec![tumbling]), 1 << 20, 0);
        p.track_changes();
        feed(&mut p, 0..200, 10);
        let base = p.snapshot().len();
        p.forget_changes();
        feed(&mut p, 0..100, 20);
        assert!(p.delta_may_fit(base, base));
        assert!(!p.delta_may_fit(base, base / 4));
    }

    #[test]
    fn warm_up_events_keep_their_metadata_as_text_through_a_checkpoint() {
        // 19 points of one blob wait for the warm-up (20) with their metadata, held as the
        // text received (a parsed tree took 17 times its size in memory) through a checkpoint;
        // the far point that ends the warm-up is an outlier whose record echoes its metadata.
        let mut p = Processor::new(&config(), 1 << 20, 0);
        let mut out = Vec::new();
        let meta = format!(r#"{{"pad":"{}","n":[1,2,3]}}"#, "x".repeat(4_000));
        for i in 0..19 {
            let x = (i % 5) as f64 * 0.01;
            let text = format!(r#"{{"ts":{i},"features":[{x},0.5],"metadata":{meta}}}"#);
            process_json(&mut p, &mut out, &text, i, i).unwrap();
        }
        let snapshot = p.snapshot();
        assert!(
            snapshot.len() < 19 * 4_100 + 8_192,
            "{} bytes for 19 events of 4 kB metadata",
            snapshot.len()
        );
        let mut restored = Processor::restore(&config(), 1 << 20, 0, &snapshot).unwrap();
        let far = r#"{"ts":19,"features":[900,-900],"metadata":{"far":true}}"#;
        out.clear();
        process_json(&mut restored, &mut out, far, 19, 19).unwrap();
        let outliers: Vec<_> = out
            .iter()
            .filter_map(|e| match &e.output {
                crate::output::Output::Outlier(o) => Some(o),
                _ => None,
            })
            .collect();
        assert!(!outliers.is_empty(), "the far point is an outlier: {out:?}");
        for o in outliers {
            let expected: serde_json::Value = if o.offset == 19 {
                serde_json::json!({"far": true})
            } else {
                serde_json::from_str(&meta).unwrap()
            };
            assert_eq!(o.metadata.as_ref(), Some(&expected), "offset {}", o.offset);
        }
    }

    #[test]
    fn a_merged_cluster_ends_with_its_last_state_and_nothing_after() {
        use rand::SeedableRng as _;
        use rand_distr::Distribution as _;
        // Two blobs 12 sigma apart walk into each other and merge; with every update emitted,
        // the cluster merged away right after its update must not get a stale `updated` row or
        // an empty `evicted` one (the latter would become its final row in `clusters`).
        let config = ProcessingConfig {
            clustering: ClusteringConfig {
                emit_interval_ms: 0,
                ..ClusteringConfig::default()
            },
            windows: vec![],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
        let unit = rand_distr::Normal::new(0.0, 1.0).unwrap();
        let mut out = Vec::new();
        let n = 20_000;
        for i in 0..n {
            let gap = 12.0 * (1.0 - i as f64 / (n as f64 * 0.8)).max(0.0);
            // The moving blob is the lighter one: its own update merges it away.
            let x = if i % 3 != 0 { 0.0 } else { gap } + unit.sample(&mut rng);
            let y: f64 = unit.sample(&mut rng);
            let text = format!(r#"{{"ts":{i},"features":[{x},{y}]}}"#);
            process_json(&mut p, &mut out, &text, i, i).unwrap();
        }
        let mut gone = std::collections::BTreeSet::new();
        let mut evicted = 0;
        for e in &out {
            let crate::output::Output::ClusterUpdate(c) = &e.output else {
                continue;
            };
            assert!(!gone.contains(&c.cluster_id), "a row after eviction: {c:?}");
            assert_eq!(c.centroid.len(), 2, "{c:?}");
            assert!(c.weight > 0.0, "{c:?}");
            if c.event == "evicted" {
                gone.insert(c.cluster_id);
                evicted += 1;
            }
        }
        assert!(evicted > 0, "the blobs merged");
    }

    #[test]
    fn the_v8_engine_refuses_features_its_f32_arithmetic_cannot_square() {
        use crate::config::Algorithm;
        // Accepted, a 1e30 feature squares to infinity in the reference's f32 arithmetic, and
        // the distance statistics it feeds turn NaN: no point is an outlier for a hundred more.
        let config = ProcessingConfig {
            clustering: ClusteringConfig {
                algorithm: Algorithm::NcsV8,
                ..ClusteringConfig::default()
            },
            windows: vec![],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        let feed = |p: &mut Processor, out: &mut Vec<Emitted>, features: &str, o: i64| {
            process_json(
                p,
                out,
                &format!(r#"{{"ts":{o},"features":{features}}}"#),
                o,
                o,
            )
        };
        let near = |o: i64| format!("[{}, 1.0]", (o % 7) as f64 * 0.1);
        for o in 0..50 {
            feed(&mut p, &mut out, &near(o), o).unwrap();
        }
        let err = feed(&mut p, &mut out, "[1e30, 1.0]", 50).unwrap_err();
        assert_eq!(err.kind(), "invalid_field");
        assert!(err.to_string().contains("ncs-v8"), "{err}");
        // Refused before it moved anything: as a partition's first event it fixes no dimension.
        let mut fresh = Processor::new(&config, 1 << 20, 1);
        let mut ignored = Vec::new();
        feed(&mut fresh, &mut ignored, "[1e30, 1.0, 2.0]", 0).unwrap_err();
        feed(&mut fresh, &mut ignored, "[1.0, 2.0]", 1).unwrap();
        out.clear();
        for o in 52..60 {
            feed(&mut p, &mut out, &near(o), o).unwrap();
        }
        // Scoring still works right after: a far point is an outlier with a finite score.
        feed(&mut p, &mut out, "[1e6, 1.0]", 60).unwrap();
        let scores: Vec<f64> = out
            .iter()
            .filter_map(|e| match &e.output {
                crate::output::Output::Outlier(o) => Some(o.outlier_score),
                _ => None,
            })
            .collect();
        assert!(
            !scores.is_empty() && scores.iter().all(|s| s.is_finite()),
            "{scores:?}"
        );
        // The largest magnitude taken.
        feed(&mut p, &mut out, "[1e15, 1.0]", 61).unwrap();
    }

    #[test]
    fn dimension_is_fixed_by_the_first_event() {
        let mut p = Processor::new(&config(), 1 << 20, 0);
        let mut out = Vec::new();
        let rec = |s: &'static str, o| Record {
            payload: Some(s.as_bytes()),
            key: None,
            timestamp_ms: Some(1),
            offset: o,
        };
        p.process(rec(r#"{"features":[1,2,3]}"#, 0), &mut out)
            .unwrap();
        let err = p
            .process(rec(r#"{"features":[1,2]}"#, 1), &mut out)
            .unwrap_err();
        assert_eq!(err.kind(), "dimension_mismatch");
        assert_eq!(p.counters().rejected, 1);
        assert_eq!(p.counters().events, 1);
    }

    #[test]
    fn at_the_open_window_cap_new_windows_are_refused_and_nothing_changes() {
        // One tumbling window of 10 ms, at most 3 open (key, window) pairs per partition.
        let config = ProcessingConfig {
            max_open_windows: 3,
            windows: vec![WindowConfig {
                size_ms: 10,
                ..WindowConfig::default()
            }],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        let feed = |p: &mut Processor, out: &mut Vec<Emitted>, key: &str, ts: i64, o: i64| {
            let text = format!(r#"{{"key":"{key}","ts":{ts},"value":1,"features":[1.0]}}"#);
            p.process(
                Record {
                    payload: Some(text.as_bytes()),
                    key: None,
                    timestamp_ms: Some(ts),
                    offset: o,
                },
                out,
            )
        };
        for (o, key) in ["a", "b", "c"].iter().enumerate() {
            feed(&mut p, &mut out, key, 1, o as i64).unwrap();
        }
        let before = p.snapshot();
        let err = feed(&mut p, &mut out, "d", 1, 3).unwrap_err();
        assert_eq!(err.kind(), "state_limit");
        assert!(err.to_string().contains("max_open_windows = 3"), "{err}");
        // Refused before anything changed, clustering included; only the offset and the
        // rejection count moved.
        assert_eq!(p.counters().rejected, 1);
        assert_eq!(p.state_size(), (3, 3));
        let mut after: Snapshot = rmp_serde::from_slice(&p.snapshot()).unwrap();
        let before: Snapshot = rmp_serde::from_slice(&before).unwrap();
        after.counters.rejected = before.counters.rejected;
        after.last_offset = before.last_offset;
        assert_eq!(
            rmp_serde::to_vec_named(&after).unwrap(),
            rmp_serde::to_vec_named(&before).unwrap()
        );
        // An open key still counts. A refused event still moves stream time; once stream time
        // closes the windows there is room again, also for the event that closes them.
        feed(&mut p, &mut out, "a", 3, 4).unwrap();
        feed(&mut p, &mut out, "e", 5, 5).unwrap_err();
        assert_eq!(p.counters().rejected, 2);
        out.clear();
        feed(&mut p, &mut out, "f", 25, 6).unwrap();
        let finals = out
            .iter()
            .filter(
                |e| matches!(&e.output, crate::output::Output::WindowAggregate(a) if a.is_final),
            )
            .count();
        assert_eq!(finals, 3, "the three full windows closed");
        feed(&mut p, &mut out, "g", 26, 7).unwrap();
        assert_eq!(p.state_size(), (2, 2));
    }

    #[test]
    fn closed_windows_kept_for_late_updates_count_toward_the_cap() {
        use crate::config::LatePolicy;
        // Late events with a new key each would otherwise add a closed slot apiece, unbounded.
        let config = ProcessingConfig {
            max_open_windows: 2,
            clustering: ClusteringConfig {
                enabled: false,
                ..ClusteringConfig::default()
            },
            windows: vec![WindowConfig {
                size_ms: 10,
                late: LatePolicy::Update,
                allowed_lateness_ms: 1_000,
                ..WindowConfig::default()
            }],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        let mut feed = |p: &mut Processor, key: &str, ts: i64, o: i64| {
            let text = format!(r#"{{"key":"{key}","ts":{ts},"value":1}}"#);
            process_json(p, &mut out, &text, ts, o)
        };
        feed(&mut p, "k0", 100, 0).unwrap();
        // [0, 10) closed long ago: the first late key is kept for updates (2 held now).
        feed(&mut p, "k1", 5, 1).unwrap();
        for i in 2..100 {
            let err = feed(&mut p, &format!("k{i}"), 5, i).unwrap_err();
            assert_eq!(err.kind(), "state_limit");
        }
        // A late update of a window already held adds nothing: admitted.
        feed(&mut p, "k1", 6, 100).unwrap();
        // Once allowed lateness passes, the kept windows go and there is room again.
        feed(&mut p, "k0", 2_000, 101).unwrap();
        feed(&mut p, "k2", 2_001, 102).unwrap();
        assert_eq!(p.counters().rejected, 98);
    }

    #[test]
    fn at_the_cap_sliding_windows_admit_events_that_open_nothing() {
        use crate::config::WindowKind;
        let config = ProcessingConfig {
            max_open_windows: 3,
            clustering: ClusteringConfig {
                enabled: false,
                ..ClusteringConfig::default()
            },
            windows: vec![WindowConfig {
                kind: WindowKind::Sliding,
                size_ms: 10_000,
                ..WindowConfig::default()
            }],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        let mut feed = |p: &mut Processor, key: &str, ts: i64, o: i64| {
            let text = format!(r#"{{"key":"{key}","ts":{ts},"value":1}}"#);
            process_json(p, &mut out, &text, ts, o)
        };
        for (o, key) in ["a", "b", "c"].iter().enumerate() {
            feed(&mut p, key, 1, o as i64).unwrap();
        }
        assert_eq!(p.state_size().1, 3);
        // The same key at the same time opens nothing: admitted at the cap.
        feed(&mut p, "a", 1, 3).unwrap();
        // A new key would open a window: refused.
        assert_eq!(feed(&mut p, "d", 1, 4).unwrap_err().kind(), "state_limit");
    }

    #[test]
    fn a_restart_does_not_count_as_quiet_time() {
        let config = ProcessingConfig {
            clustering: ClusteringConfig {
                enabled: false,
                ..ClusteringConfig::default()
            },
            windows: vec![WindowConfig {
                size_ms: 10,
                idle_close_ms: Some(1_000),
                ..WindowConfig::default()
            }],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        p.set_wall_clock(50_000);
        let rec = Record {
            payload: Some(br#"{"key":"a","ts":5}"#),
            key: None,
            timestamp_ms: None,
            offset: 0,
        };
        p.process(rec, &mut out).unwrap();
        let snap = p.snapshot();
        // Restored ten minutes later: the window stays open until the partition is quiet for
        // idle_close_ms after the restart.
        let mut q = Processor::restore(&config, 1 << 20, 0, &snap).unwrap();
        q.resume_idle_clocks(650_000);
        q.tick(650_500, &mut out);
        assert!(out.is_empty(), "{out:?}");
        q.tick(651_000, &mut out);
        assert_eq!(out.len(), 1, "closes after a real quiet second");
    }

    #[test]
    fn late_events_of_dlq_windows_are_handed_back() {
        let config = ProcessingConfig {
            dimension: None,
            clustering: ClusteringConfig {
                enabled: false,
                ..ClusteringConfig::default()
            },
            windows: vec![WindowConfig {
                size_ms: 10,
                late: LatePolicy::Dlq,
                ..WindowConfig::default()
            }],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        let mut out = Vec::new();
        let mut feed = |p: &mut Processor, ts: i64, o: i64| {
            let line = format!(r#"{{"key":"k","ts":{ts}}}"#);
            let rec = Record {
                payload: Some(line.as_bytes()),
                key: None,
                timestamp_ms: None,
                offset: o,
            };
            p.process(rec, &mut out).unwrap()
        };
        assert_eq!(feed(&mut p, 1, 0), None);
        assert_eq!(feed(&mut p, 25, 1), None);
        let late = feed(&mut p, 3, 2).expect("late for the closed [0, 10) window");
        assert_eq!((late.behind_ms, late.policy), (22, LatePolicy::Dlq));
    }

    #[test]
    fn idle_close_through_the_processor_uses_the_injected_clock() {
        let config = ProcessingConfig {
            dimension: None,
            clustering: ClusteringConfig {
                enabled: false,
                ..ClusteringConfig::default()
            },
            windows: vec![WindowConfig {
                size_ms: 10,
                idle_close_ms: Some(1_000),
                ..WindowConfig::default()
            }],
            ..ProcessingConfig::default()
        };
        let mut p = Processor::new(&config, 1 << 20, 0);
        assert_eq!(p.wants_ticks(), Some(1_000));
        let mut out = Vec::new();
        p.set_wall_clock(50_000);
        let rec = Record {
            payload: Some(br#"{"key":"k","ts":5}"#),
            key: None,
            timestamp_ms: None,
            offset: 7,
        };
        p.process(rec, &mut out).unwrap();
        p.tick(50_999, &mut out);
        assert!(out.is_empty());
        p.tick(51_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].source_offset, 7);
    }

    #[test]
    fn bad_snapshots_are_errors() {
        assert!(Processor::restore(&config(), 1, 0, b"garbage").is_err());
    }
}

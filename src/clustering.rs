//! The clustering stage of the processor: runs `ncs` or `ncs-v8` on each event's features and
//! turns its decisions into outputs: `outlier` records, `cluster_update` lifecycle events (and
//! updates at most once per cluster per `emit_interval_ms` of event time), `drift_detection`
//! alarms and periodic `algorithm_status`. Pure and serialisable like the rest of the processor.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, ClusteringConfig};
use crate::event::{DecodeError, Event};
use crate::ncs::corrected::{Assignment, ClusterEvent, DriftAlarm, Ncs};
use crate::ncs::v8::NcsV8;
use crate::output::{ClusterUpdate, DriftRecord, Emitted, OutlierRecord, Output, StatusRecord};

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Engine {
    V8(Box<NcsV8>),
    Ncs(Box<Ncs>),
}

/// The largest feature magnitude the `ncs-v8` engine takes: its f32 arithmetic keeps a sum of
/// 1,024 squared differences of such numbers finite.
const V8_MAX_ABS_FEATURE: f64 = 1e15;

/// An event waiting for its assignment (during `ncs`'s warm-up).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Waiting {
    offset: i64,
    key: String,
    ts: i64,
    id: Option<String>,
    features: Vec<f64>,
    /// Checkpoints before 2026-12-07 held the metadata parsed (17 times its text in memory);
    /// read, never written.
    metadata: Option<serde_json::Value>,
    /// The metadata as received (JSON text), parsed only for an outlier record.
    #[serde(default)]
    metadata_json: Option<String>,
}

/// One event's assignment (`neurostream process --assignments`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssignmentLine {
    /// Always `assignment`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The event's offset (offline: its 0-based line number).
    pub offset: i64,
    /// Cluster id; -1 for an outlier without a cluster (`ncs-v8`: the reference's return value).
    pub cluster_id: i64,
    /// Outlier flag.
    pub is_outlier: bool,
    /// Outlier score.
    pub outlier_score: f64,
    /// `score` or `capacity` for outliers.
    pub reason: Option<&'static str>,
}

/// The clustering stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusteringStage {
    #[serde(skip)]
    config: ClusteringConfig,
    engine: Option<Engine>,
    waiting: VecDeque<Waiting>,
    /// Event time each live cluster was created at.
    created_ts: BTreeMap<u64, i64>,
    /// Event time of each cluster's last emitted update.
    last_emit: BTreeMap<u64, i64>,
    /// Each cluster's last emitted state (evictions report it).
    last_state: BTreeMap<u64, ClusterUpdate>,
    points: u64,
    drift_since_status: bool,
    #[serde(skip)]
    collect: bool,
    #[serde(skip)]
    lines: Vec<AssignmentLine>,
    #[serde(skip)]
    scratch: Vec<Assignment>,
    #[serde(skip)]
    alarms: Vec<DriftAlarm>,
    #[serde(skip)]
    events: Vec<(ClusterEvent, u64)>,
}

impl ClusteringStage {
    /// A fresh stage.
    pub fn new(config: ClusteringConfig) -> Self {
        Self {
            config,
            engine: None,
            waiting: VecDeque::new(),
            created_ts: BTreeMap::new(),
            last_emit: BTreeMap::new(),
            last_state: BTreeMap::new(),
            points: 0,
            drift_since_status: false,
            collect: false,
            lines: Vec::new(),
            scratch: Vec::new(),
            alarms: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Restores the configuration after deserialising a snapshot.
    pub fn with_config(mut self, config: ClusteringConfig) -> Self {
        self.config = config;
        self
    }

    /// Keep per-event assignment lines for [`ClusteringStage::drain_assignments`].
    pub fn collect_assignments(&mut self, on: bool) {
        self.collect = on;
    }

    /// Assignment lines so far, in input order.
    pub fn drain_assignments(&mut self) -> std::vec::Drain<'_, AssignmentLine> {
        self.lines.drain(..)
    }

    /// Why this stage refuses `event`, if it does; checked before anything of the event is
    /// applied (its dimension, stream time, windows).
    pub fn refusal(&self, event: &Event) -> Option<DecodeError> {
        if event.features.is_empty() {
            return Some(DecodeError::InvalidField {
                field: "features",
                problem: "required when clustering is enabled".into(),
            });
        }
        if self.config.algorithm == Algorithm::NcsV8
            && event.features.iter().any(|x| x.abs() > V8_MAX_ABS_FEATURE)
        {
            // The reference computes in f32: a square beyond f32's range is infinite, and the
            // distance statistics it feeds stay NaN for the next hundred points.
            return Some(DecodeError::InvalidField {
                field: "features",
                problem: format!(
                    "beyond ±{V8_MAX_ABS_FEATURE:e}, which the ncs-v8 engine's 32-bit arithmetic cannot square"
                ),
            });
        }
        None
    }

    /// Clusters `event`'s features; outputs go to `out`.
    ///
    /// # Errors
    /// What [`Self::refusal`] says of `event`.
    pub fn apply(
        &mut self,
        event: &Event,
        offset: i64,
        partition: i32,
        out: &mut Vec<Emitted>,
    ) -> Result<(), DecodeError> {
        if let Some(refused) = self.refusal(event) {
            return Err(refused);
        }
        let engine = self
            .engine
            .get_or_insert_with(|| match self.config.algorithm {
                Algorithm::NcsV8 => Engine::V8(Box::new(NcsV8::new(self.config.v8_params()))),
                Algorithm::Ncs => Engine::Ncs(Box::new(Ncs::new(
                    self.config.ncs_params(),
                    event.features.len(),
                ))),
            });
        let warming = match engine {
            Engine::V8(v8) => {
                let r = v8.process(&event.features);
                self.points += 1;
                if self.collect {
                    self.lines.push(AssignmentLine {
                        kind: "assignment",
                        offset,
                        cluster_id: r.cluster_id,
                        is_outlier: r.is_outlier,
                        outlier_score: r.outlier_score,
                        reason: r.is_outlier.then_some("score"),
                    });
                }
                if r.is_outlier {
                    out.push(Emitted {
                        seq: 0,
                        source_offset: offset,
                        output: Output::Outlier(outlier(
                            partition,
                            offset,
                            event,
                            r.outlier_score,
                            "score",
                        )),
                    });
                }
                None
            }
            Engine::Ncs(ncs) => {
                let warming = ncs.points() == 0;
                ncs.process(&event.features, &mut self.scratch, &mut self.alarms)
                    .map_err(|e| DecodeError::DimensionMismatch {
                        expected: e.expected,
                        got: e.got,
                    })?;
                self.events.extend(ncs.drain_events());
                Some(warming)
            }
        };
        if let Some(warming) = warming {
            if warming {
                self.waiting.push_back(Waiting {
                    offset,
                    key: event.key.clone(),
                    ts: event.ts_ms,
                    id: event.id.clone(),
                    features: event.features.clone(),
                    metadata: None,
                    metadata_json: event.metadata.as_ref().map(|m| m.get().to_owned()),
                });
            }
            self.decide(partition, Some((offset, event)), out);
            self.emit_cluster_events(partition, offset, event.ts_ms, out);
            self.emit_alarms(partition, offset, event.ts_ms, out);
        }
        if self.points % self.config.status_every_points.max(1) == 0 && self.points > 0 {
            out.push(self.status(partition, offset));
        }
        Ok(())
    }

    /// Turns the engine's decisions into assignment lines and outlier records. Decisions for
    /// warm-up points pair with the waiting events in order; otherwise with `current`.
    fn decide(&mut self, partition: i32, current: Option<(i64, &Event)>, out: &mut Vec<Emitted>) {
        let decided = std::mem::take(&mut self.scratch);
        for a in &decided {
            let (offset, record) = match self.waiting.pop_front() {
                Some(w) => (
                    w.offset,
                    OutlierRecord {
                        partition,
                        offset: w.offset,
                        id: w.id,
                        key: w.key,
                        ts: w.ts,
                        features: w.features,
                        outlier_score: a.outlier_score,
                        reason: String::new(),
                        metadata: w.metadata.or_else(|| {
                            w.metadata_json
                                .filter(|_| a.is_outlier)
                                .and_then(|text| serde_json::from_str(&text).ok())
                        }),
                    },
                ),
                None => {
                    let Some((offset, event)) = current else {
                        continue;
                    };
                    if !a.is_outlier && !self.collect {
                        self.points += 1;
                        continue;
                    }
                    (
                        offset,
                        outlier(partition, offset, event, a.outlier_score, ""),
                    )
                }
            };
            self.points += 1;
            let reason = a.reason.map(|r| r.as_str());
            if self.collect {
                self.lines.push(AssignmentLine {
                    kind: "assignment",
                    offset,
                    cluster_id: a.cluster_id.map_or(-1, |c| c as i64),
                    is_outlier: a.is_outlier,
                    outlier_score: a.outlier_score,
                    reason,
                });
            }
            if a.is_outlier {
                let mut o = record;
                o.outlier_score = a.outlier_score;
                o.reason = reason.unwrap_or("score").to_string();
                out.push(Emitted {
                    seq: 0,
                    source_offset: offset,
                    output: Output::Outlier(o),
                });
            }
        }
        self.scratch = decided;
        self.scratch.clear();
    }

    fn emit_cluster_events(
        &mut self,
        partition: i32,
        offset: i64,
        ts: i64,
        out: &mut Vec<Emitted>,
    ) {
        let Some(Engine::Ncs(ncs)) = &self.engine else {
            return;
        };
        let interval = self.config.emit_interval_ms as i64;
        let mut events = std::mem::take(&mut self.events);
        for (event, id) in events.drain(..) {
            if event == ClusterEvent::Updated
                && self
                    .last_emit
                    .get(&id)
                    .is_some_and(|last| ts.saturating_sub(*last) < interval)
            {
                continue;
            }
            if event == ClusterEvent::Created {
                self.created_ts.insert(id, ts);
            }
            let update = match ncs.cluster(id) {
                Some(state) => ClusterUpdate {
                    partition,
                    cluster_id: id,
                    event: event.as_str().to_string(),
                    centroid: state.centroid,
                    weight: state.weight,
                    radius: state.radius,
                    quality: state.confidence,
                    drift_coefficient: state.drift_coefficient,
                    created_at: self.created_ts.get(&id).copied().unwrap_or(ts),
                    updated_at: ts,
                },
                // Gone since (merged away or evicted later in the same event): every removal
                // queues an `evicted`, which reports its last emitted state; a cluster that
                // never had a row (created and merged away at once) gets none.
                None if event != ClusterEvent::Evicted => continue,
                None => {
                    self.created_ts.remove(&id);
                    self.last_emit.remove(&id);
                    let Some(mut last) = self.last_state.remove(&id) else {
                        continue;
                    };
                    last.event = event.as_str().to_string();
                    last.updated_at = ts;
                    out.push(Emitted {
                        seq: 0,
                        source_offset: offset,
                        output: Output::ClusterUpdate(last),
                    });
                    continue;
                }
            };
            self.last_emit.insert(id, ts);
            self.last_state.insert(id, update.clone());
            out.push(Emitted {
                seq: 0,
                source_offset: offset,
                output: Output::ClusterUpdate(update),
            });
        }
        self.events = events;
    }

    fn emit_alarms(&mut self, partition: i32, offset: i64, ts: i64, out: &mut Vec<Emitted>) {
        if self.alarms.is_empty() {
            return;
        }
        let Some(Engine::Ncs(ncs)) = &self.engine else {
            self.alarms.clear();
            return;
        };
        let mut clusters = ncs.clusters();
        clusters.sort_by(|a, b| b.drift_coefficient.total_cmp(&a.drift_coefficient));
        let affected: Vec<u64> = clusters.iter().take(3).map(|c| c.id).collect();
        for alarm in self.alarms.drain(..) {
            self.drift_since_status = true;
            let strength = alarm.strength;
            let severity = if strength >= 2.0 {
                "high"
            } else if strength >= 1.0 {
                "medium"
            } else {
                "low"
            };
            let recommendation = match (alarm.detector, severity) {
                ("appeared", _) => "a new cluster formed after the clusters had settled: a new kind of event arrives",
                ("moved", _) => "a cluster's centre is moving steadily: the events it describes change gradually",
                ("vanished", _) => "an established cluster stopped receiving events: a source or behaviour may have stopped",
                (_, "high") => "the data moved away from the learned clusters: expect new clusters; review downstream thresholds",
                (_, "medium") => "cluster positions are shifting: watch the affected clusters",
                _ => "minor change in the distance distribution: no action needed",
            };
            let affected = match alarm.cluster {
                Some(id) => vec![id],
                None => affected.clone(),
            };
            out.push(Emitted {
                seq: 0,
                source_offset: offset,
                output: Output::DriftDetection(DriftRecord {
                    partition,
                    severity: severity.into(),
                    affected_clusters: affected,
                    detector: alarm.detector.into(),
                    statistic: alarm.statistic,
                    recommendation: recommendation.into(),
                    detected_at: ts,
                }),
            });
        }
    }

    fn status(&mut self, partition: i32, offset: i64) -> Emitted {
        let drift = std::mem::take(&mut self.drift_since_status);
        Emitted {
            seq: 0,
            source_offset: offset,
            output: Output::AlgorithmStatus(self.status_record(partition, drift)),
        }
    }

    /// The algorithm's status now (`drift_detected`: since the last `algorithm_status`).
    pub fn current_status(&self, partition: i32) -> StatusRecord {
        self.status_record(partition, self.drift_since_status)
    }

    fn status_record(&self, partition: i32, drift: bool) -> StatusRecord {
        let (algorithm, active, quality, threshold) = match &self.engine {
            Some(Engine::V8(v8)) => (
                "ncs-v8",
                v8.clusters().len() as u64,
                v8.clustering_quality(),
                v8.threshold(),
            ),
            Some(Engine::Ncs(ncs)) => ("ncs", ncs.len() as u64, ncs.silhouette(), ncs.acceptance()),
            None => (self.config.algorithm.as_str(), 0, 0.0, 0.0),
        };
        StatusRecord {
            partition,
            algorithm: algorithm.into(),
            active_clusters: active,
            clustering_quality: quality,
            current_threshold: threshold,
            drift_detected: drift,
            points_processed: self.points,
            points_per_second: None,
        }
    }

    /// End of input: decides the warm-up points and emits every live cluster's final state.
    pub fn finish(&mut self, partition: i32, offset: i64, out: &mut Vec<Emitted>) {
        let Some(Engine::Ncs(ncs)) = &mut self.engine else {
            return;
        };
        ncs.flush_warmup(&mut self.scratch, &mut self.alarms);
        self.events.extend(ncs.drain_events());
        let last_ts = self.waiting.back().map_or(0, |w| w.ts);
        self.decide(partition, None, out);
        let ts = self
            .last_state
            .values()
            .map(|s| s.updated_at)
            .max()
            .unwrap_or(last_ts)
            .max(last_ts);
        self.emit_cluster_events(partition, offset, ts, out);
        // Final states: every live cluster once more, regardless of the emit interval.
        self.last_emit.clear();
        if let Some(Engine::Ncs(ncs)) = &self.engine {
            self.events
                .extend(ncs.clusters().iter().map(|c| (ClusterEvent::Updated, c.id)));
        }
        self.emit_cluster_events(partition, offset, ts, out);
    }
}

fn metadata(event: &Event) -> Option<serde_json::Value> {
    event
        .metadata
        .as_ref()
        .and_then(|m| serde_json::from_str(m.get()).ok())
}

fn outlier(partition: i32, offset: i64, event: &Event, score: f64, reason: &str) -> OutlierRecord {
    OutlierRecord {
        partition,
        offset,
        id: event.id.clone(),
        key: event.key.clone(),
        ts: event.ts_ms,
        features: event.features.clone(),
        outlier_score: score,
        reason: reason.into(),
        metadata: metadata(event),
    }
}

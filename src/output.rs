//! What the processor emits: the output message shapes of DESIGN.md, their topics and keys.

use serde::{Deserialize, Serialize};

use crate::config::{OutputTopics, WindowKind};

/// One output together with the input offset that caused it (the `neurostream.source.offset`
/// header, and part of the PostgreSQL row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Emitted {
    /// Offset of the input message whose processing produced this output.
    pub source_offset: i64,
    /// The output itself.
    pub output: Output,
    /// Position among the outputs of the same source offset (0, 1, …), numbered by the
    /// processor across batches and checkpoints (the `neurostream.source.seq` header).
    #[serde(default)]
    pub seq: u32,
}

impl Emitted {
    /// Memory this output holds: its own size and its heap data (the metadata's parsed tree
    /// estimated from its shape). What bounds the outputs a worker holds for Kafka and for
    /// PostgreSQL besides their count.
    pub fn memory_bytes(&self) -> usize {
        const F64: usize = std::mem::size_of::<f64>();
        std::mem::size_of::<Self>()
            + match &self.output {
                Output::WindowAggregate(w) => w.key.len(),
                Output::ClusterUpdate(c) => c.event.len() + c.centroid.len() * F64,
                Output::DriftDetection(d) => {
                    d.severity.len()
                        + d.detector.len()
                        + d.recommendation.len()
                        + d.affected_clusters.len() * F64
                }
                Output::Outlier(o) => {
                    o.key.len()
                        + o.id.as_ref().map_or(0, String::len)
                        + o.reason.len()
                        + o.features.len() * F64
                        + o.metadata.as_ref().map_or(0, json_bytes)
                }
                Output::AlgorithmStatus(s) => s.algorithm.len(),
            }
    }
}

/// Heap bytes of a parsed JSON value, about (its nesting is bounded by the decoder).
fn json_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    const NODE: usize = std::mem::size_of::<Value>();
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(|v| NODE + json_bytes(v)).sum(),
        // A map entry: the key, the value and about a node's worth of tree.
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| k.len() + 2 * NODE + json_bytes(v))
            .sum(),
    }
}

/// Every output message kind; serialised with its `type` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Output {
    /// An event-time window's aggregate for one key.
    WindowAggregate(WindowAggregate),
    /// A cluster's lifecycle event or (rate-limited) update.
    ClusterUpdate(ClusterUpdate),
    /// An event flagged as an outlier.
    Outlier(OutlierRecord),
    /// A drift alarm.
    DriftDetection(DriftRecord),
    /// The partition's periodic algorithm status.
    AlgorithmStatus(StatusRecord),
}

/// A cluster's state at a lifecycle event or update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterUpdate {
    /// Source partition.
    pub partition: i32,
    /// Stable id within the partition.
    pub cluster_id: u64,
    /// `created`, `updated`, `merged` or `evicted`.
    pub event: String,
    /// Centroid in input units.
    pub centroid: Vec<f64>,
    /// Decayed member weight.
    pub weight: f64,
    /// RMS member distance in standardised units.
    pub radius: f64,
    /// Confidence in [0, 1].
    pub quality: f64,
    /// Smoothed centroid displacement per update relative to the cluster's spread.
    pub drift_coefficient: f64,
    /// Event time of creation (epoch ms).
    pub created_at: i64,
    /// Event time of this state (epoch ms).
    pub updated_at: i64,
}

/// An outlier event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutlierRecord {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The event's id.
    pub id: Option<String>,
    /// The event's key.
    pub key: String,
    /// Event time (epoch ms).
    pub ts: i64,
    /// The event's features.
    pub features: Vec<f64>,
    /// Outlier score in [0, 1).
    pub outlier_score: f64,
    /// `score` or `capacity`.
    pub reason: String,
    /// The event's metadata.
    pub metadata: Option<serde_json::Value>,
}

/// A drift alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftRecord {
    /// Source partition.
    pub partition: i32,
    /// `low`, `medium` or `high`.
    pub severity: String,
    /// Clusters drifting the most.
    pub affected_clusters: Vec<u64>,
    /// `page_hinkley` or `adwin`.
    pub detector: String,
    /// The detector's statistic.
    pub statistic: f64,
    /// What to do about it.
    pub recommendation: String,
    /// Event time of the alarm (epoch ms).
    pub detected_at: i64,
}

/// Periodic per-partition algorithm status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// Source partition.
    pub partition: i32,
    /// `ncs` or `ncs-v8`.
    pub algorithm: String,
    /// Live clusters.
    pub active_clusters: u64,
    /// Internal quality (`ncs`: streaming simplified silhouette; `ncs-v8`: its own score).
    pub clustering_quality: f64,
    /// Acceptance threshold (`ncs`: the D² bound; `ncs-v8`: the similarity threshold).
    pub current_threshold: f64,
    /// Whether a drift alarm was raised since the previous status.
    pub drift_detected: bool,
    /// Points clustered in this partition.
    pub points_processed: u64,
    /// Points per second (the pure processor has no clock: null; services may fill it).
    pub points_per_second: Option<f64>,
}

/// Aggregate of `value` for one (window, key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowAggregate {
    /// Source partition.
    pub partition: i32,
    /// Window shape.
    pub window: WindowKind,
    /// Window length.
    pub size_ms: u64,
    /// Hop between window starts (equal to `size_ms` for tumbling windows).
    pub slide_ms: u64,
    /// Inclusive start, epoch milliseconds.
    pub window_start: i64,
    /// Exclusive end, epoch milliseconds.
    pub window_end: i64,
    /// Grouping key.
    pub key: String,
    /// Events in the window (with or without `value`).
    pub count: u64,
    /// Sum of `value`s (0 when none).
    pub sum: f64,
    /// Mean of `value`s; absent when no event carried a value.
    pub mean: Option<f64>,
    /// Population standard deviation of `value`s.
    pub std: Option<f64>,
    /// Smallest `value`.
    pub min: Option<f64>,
    /// Largest `value`.
    pub max: Option<f64>,
    /// True once the window has closed; this is the last word unless a late update follows.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Increases with every emission of the same window; a higher revision replaces a lower one.
    pub revision: u32,
}

impl Output {
    /// The topic this output goes to.
    pub fn topic<'a>(&self, topics: &'a OutputTopics) -> &'a str {
        match self {
            Output::WindowAggregate(_) => &topics.windows,
            Output::ClusterUpdate(_) => &topics.clusters,
            Output::Outlier(_) => &topics.outliers,
            Output::DriftDetection(_) => &topics.drift,
            Output::AlgorithmStatus(_) => &topics.status,
        }
    }

    /// The Kafka message key: the grouping identity of DESIGN.md.
    pub fn key(&self) -> String {
        let mut key = String::new();
        self.write_key(&mut key);
        key
    }

    /// Writes [`Self::key`] into `out` (cleared first), so a batch reuses one buffer.
    pub fn write_key(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.clear();
        // Writing into a String cannot fail.
        let _ = match self {
            Output::WindowAggregate(w) if w.window == WindowKind::Hopping => write!(
                out,
                "{}:{}:{}:{}:{}",
                w.key,
                w.window.as_str(),
                w.size_ms,
                w.slide_ms,
                w.window_start
            ),
            Output::WindowAggregate(w) => write!(
                out,
                "{}:{}:{}:{}",
                w.key,
                w.window.as_str(),
                w.size_ms,
                w.window_start
            ),
            Output::ClusterUpdate(c) => write!(out, "{}:{}", c.partition, c.cluster_id),
            Output::Outlier(o) => {
                out.push_str(&o.key);
                Ok(())
            }
            Output::DriftDetection(d) => write!(out, "{}", d.partition),
            Output::AlgorithmStatus(s) => write!(out, "{}", s.partition),
        };
    }

    /// The message `type` (`window_aggregate`, `cluster_update`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            Output::WindowAggregate(_) => "window_aggregate",
            Output::ClusterUpdate(_) => "cluster_update",
            Output::Outlier(_) => "outlier",
            Output::DriftDetection(_) => "drift_detection",
            Output::AlgorithmStatus(_) => "algorithm_status",
        }
    }

    /// The JSON message value.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = Vec::new();
        self.write_json(&mut json);
        json
    }

    /// Writes [`Self::to_json`] into `out` (cleared first), so a batch reuses one buffer.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.clear();
        serde_json::to_writer(&mut *out, self)
            .expect("outputs contain only finite numbers and strings");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(kind: WindowKind, size_ms: u64, slide_ms: u64) -> Output {
        Output::WindowAggregate(WindowAggregate {
            partition: 0,
            window: kind,
            size_ms,
            slide_ms,
            window_start: 0,
            window_end: size_ms as i64,
            key: "k".into(),
            count: 1,
            sum: 1.0,
            mean: Some(1.0),
            std: Some(0.0),
            min: Some(1.0),
            max: Some(1.0),
            is_final: true,
            revision: 0,
        })
    }

    #[test]
    fn hopping_windows_of_one_size_and_different_slides_have_different_keys() {
        assert_eq!(
            window(WindowKind::Tumbling, 10, 10).key(),
            "k:tumbling:10:0"
        );
        assert_eq!(window(WindowKind::Sliding, 10, 0).key(), "k:sliding:10:0");
        let (a, b) = (
            window(WindowKind::Hopping, 10, 5).key(),
            window(WindowKind::Hopping, 10, 2).key(),
        );
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("k:hopping:10:5:0", "k:hopping:10:2:0")
        );
        // The batch path writes the same key into a reused buffer.
        let mut buffer = String::from("stale");
        window(WindowKind::Hopping, 10, 5).write_key(&mut buffer);
        assert_eq!(buffer, a);
    }
}

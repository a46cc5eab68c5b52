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
}

/// Every output message kind; serialised with its `type` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Output {
    /// An event-time window's aggregate for one key.
    WindowAggregate(WindowAggregate),
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
        }
    }

    /// The Kafka message key: the grouping identity of DESIGN.md.
    pub fn key(&self) -> String {
        match self {
            Output::WindowAggregate(w) => {
                format!(
                    "{}:{}:{}:{}",
                    w.key,
                    w.window.as_str(),
                    w.size_ms,
                    w.window_start
                )
            }
        }
    }

    /// The JSON message value.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("outputs contain only finite numbers and strings")
    }
}

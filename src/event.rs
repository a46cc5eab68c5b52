//! Input events: the JSON shape of DESIGN.md and its decoding, with a reason for every rejection.
//!
//! Decoding is pure: bytes and the Kafka message's key and timestamp in, an [`Event`] or a
//! [`DecodeError`] out. A rejected event goes to the dead-letter topic with the error's
//! [`DecodeError::kind`] and message; it never stops the partition.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The most features an event may carry.
pub const MAX_FEATURES: usize = 1024;

/// The largest magnitude a feature or value may have. Squares and sums of up to 10^100 events
/// of this size stay finite in every aggregate and in the clustering state, so anything accepted
/// can be checkpointed and restored exactly.
pub const MAX_ABS_NUMBER: f64 = 1e100;

/// The earliest event time accepted: 1900-01-01T00:00:00Z.
pub const MIN_TS_MS: i64 = -2_208_988_800_000;

/// The first event time no longer accepted: 8000-01-01T00:00:00Z. PostgreSQL's `timestamptz`
/// and the ISO 8601 literals the sink writes hold four-digit years; the margin leaves room for
/// window ends (window sizes are capped far below it).
pub const MAX_TS_MS: i64 = 190_288_396_800_000;

/// What the decoder accepts beyond the event's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Larger payloads are rejected as `oversized`.
    pub max_bytes: usize,
    /// Longer keys (in UTF-8 bytes) are rejected as `key_too_long`, longer ids as
    /// `field_too_long`.
    pub max_key_bytes: usize,
    /// Longer `metadata` (its JSON text) is rejected as `field_too_long`: it is echoed in
    /// outlier records and held with the event through the clustering warm-up.
    pub max_metadata_bytes: usize,
    /// An event time further than this ahead of the reference clock (the Kafka timestamp, or
    /// the wall clock when that is earlier) is rejected as `future_timestamp`.
    pub max_ahead_ms: u64,
    /// The wall clock, when there is one (the service; offline there is none).
    pub now_ms: Option<i64>,
}

impl Limits {
    /// Only a size limit (tests, benches and the generator's self-check).
    pub fn bytes(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            max_key_bytes: usize::MAX,
            max_metadata_bytes: usize::MAX,
            max_ahead_ms: u64::MAX,
            now_ms: None,
        }
    }
}

/// A decoded, validated input event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Grouping key: the event's `key`, else the Kafka message key, else `""`.
    pub key: String,
    /// Event time in epoch milliseconds: `ts`, else the Kafka message timestamp.
    pub ts_ms: i64,
    /// Feature vector (finite numbers); empty when the event has none.
    pub features: Vec<f64>,
    /// The measure windows aggregate.
    pub value: Option<f64>,
    /// Caller's event id, echoed in outlier records.
    pub id: Option<String>,
    /// Caller's metadata, echoed in outlier records (raw JSON).
    pub metadata: Option<Box<RawValue>>,
}

/// Why an input message was rejected. Each variant is bad input: it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than `kafka.max_event_bytes`.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Payload size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// No payload at all (a tombstone).
    #[error("message has no payload")]
    Empty,
    /// Not parseable as a JSON event object.
    #[error("not a valid JSON event: {0}")]
    NotJson(String),
    /// A field has the wrong type or an unusable value.
    #[error("field `{field}`: {problem}")]
    InvalidField {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Neither `ts` nor a Kafka timestamp.
    #[error("event has no `ts` and the message has no timestamp")]
    MissingTimestamp,
    /// A text field holds U+0000, which PostgreSQL `text` cannot store.
    #[error(
        "field `{field}` contains a NUL character (U+0000), which PostgreSQL text cannot hold"
    )]
    NulCharacter {
        /// `key` or `id`.
        field: &'static str,
    },
    /// The grouping key is longer than `processing.max_key_bytes`.
    #[error("key of {len} bytes exceeds the limit of {limit} bytes")]
    KeyTooLong {
        /// Key length in bytes.
        len: usize,
        /// Configured limit.
        limit: usize,
    },
    /// `id` longer than `processing.max_key_bytes` or `metadata` longer than
    /// `processing.max_metadata_bytes`.
    #[error("{field} of {len} bytes exceeds the limit of {limit} bytes")]
    FieldTooLong {
        /// `id` or `metadata`.
        field: &'static str,
        /// Its length in bytes (metadata: its JSON text).
        len: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Event time outside 1900-01-01 … 8000-01-01.
    #[error("event time {ts_ms} ms is outside the accepted range (1900-01-01 to 8000-01-01)")]
    TimestampOutOfRange {
        /// The event time.
        ts_ms: i64,
    },
    /// Event time too far ahead of the message's Kafka timestamp or the wall clock.
    #[error(
        "event time is {ahead_ms} ms ahead of the message timestamp or clock (limit {limit_ms} ms)"
    )]
    FutureTimestamp {
        /// How far ahead.
        ahead_ms: i64,
        /// `processing.max_event_time_ahead_ms`.
        limit_ms: u64,
    },
    /// The feature dimension differs from the partition's.
    #[error("features have dimension {got}, expected {expected}")]
    DimensionMismatch {
        /// The fixed dimension.
        expected: usize,
        /// This event's dimension.
        got: usize,
    },
    /// The partition holds `processing.max_open_windows` windows (open, or closed and kept for
    /// late updates) and this event would add another.
    #[error(
        "the partition holds {open} windows (open, or closed and kept for late updates), the limit (processing.max_open_windows = {limit}); this event would add another"
    )]
    StateLimit {
        /// (key, window) pairs held now.
        open: usize,
        /// `processing.max_open_windows`.
        limit: usize,
    },
    /// Avro input without the Confluent header (magic byte 0, schema id).
    #[error("not in the Confluent Avro wire format: {0}")]
    UnknownMagicByte(String),
    /// The registry has no schema with this id.
    #[error("schema id {0} is unknown to the schema registry")]
    UnknownSchema(u32),
    /// The writer schema cannot be read as an event.
    #[error("incompatible writer schema: {0}")]
    SchemaIncompatible(String),
    /// A truncated or corrupt Avro datum.
    #[error("invalid Avro datum: {0}")]
    InvalidAvro(String),
    /// The registry did not answer for longer than `schema_registry.max_outage_ms`.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// `auto` input that is neither Confluent Avro nor JSON.
    #[error("neither Avro nor JSON: {0}")]
    UnknownFormat(String),
}

impl DecodeError {
    /// A short, stable machine-readable reason (the `neurostream.error.kind` header, metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::Empty => "empty",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::MissingTimestamp => "missing_timestamp",
            DecodeError::DimensionMismatch { .. } => "dimension_mismatch",
            DecodeError::StateLimit { .. } => "state_limit",
            DecodeError::NulCharacter { .. } => "nul_character",
            DecodeError::KeyTooLong { .. } => "key_too_long",
            DecodeError::FieldTooLong { .. } => "field_too_long",
            DecodeError::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            DecodeError::FutureTimestamp { .. } => "future_timestamp",
            DecodeError::UnknownMagicByte(_) => "unknown_magic_byte",
            DecodeError::UnknownSchema(_) => "unknown_schema",
            DecodeError::SchemaIncompatible(_) => "schema_incompatible",
            DecodeError::InvalidAvro(_) => "invalid_avro",
            DecodeError::RegistryUnavailable(_) => "registry_unavailable",
            DecodeError::UnknownFormat(_) => "unknown_format",
        }
    }
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(default, borrow)]
    key: Option<&'a RawValue>,
    #[serde(default, borrow)]
    ts: Option<&'a RawValue>,
    #[serde(default, borrow)]
    features: Option<&'a RawValue>,
    #[serde(default, borrow)]
    value: Option<&'a RawValue>,
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError::InvalidField {
        field,
        problem: problem.into(),
    }
}

/// Text of a JSON string or number (keys and ids may be either).
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(
                    serde_json::Number::from_f64(v)
                        .map_or_else(|| v.to_string(), |n| n.to_string()),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// Event time as epoch milliseconds (integer or float) or an RFC 3339 string.
struct Ts(i64);

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("epoch milliseconds or an RFC 3339 string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Ts, E> {
                Ok(Ts(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Ts, E> {
                i64::try_from(v)
                    .map(Ts)
                    .map_err(|_| E::custom("out of range"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Ts, E> {
                if v.is_finite() && v.abs() < 9.0e15 {
                    Ok(Ts(v.floor() as i64))
                } else {
                    Err(E::custom("out of range"))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Ts, E> {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| Ts(t.timestamp_millis()))
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The one-pass shape of a well-formed event; anything it rejects is re-examined by the
/// slower [`RawEvent`] path, which names the problem.
#[derive(Deserialize)]
struct FastEvent<'a> {
    #[serde(default)]
    key: Option<Text>,
    #[serde(default)]
    ts: Option<Ts>,
    #[serde(default)]
    features: Option<Vec<f64>>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(default)]
    id: Option<Text>,
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
}

fn fast_decode(
    bytes: &[u8],
    message_key: Option<&[u8]>,
    message_ts_ms: Option<i64>,
) -> Option<Event> {
    let raw: FastEvent<'_> = serde_json::from_slice(bytes).ok()?;
    if raw.features.as_ref().is_some_and(Vec::is_empty) {
        return None;
    }
    let features = raw.features.unwrap_or_default();
    let ok = features.len() <= MAX_FEATURES
        && features.iter().all(|x| in_range(*x))
        && raw.value.is_none_or(in_range);
    if !ok {
        return None;
    }
    let ts_ms = match raw.ts {
        Some(Ts(ms)) => ms,
        None => message_ts_ms?,
    };
    Some(Event {
        key: match raw.key {
            Some(Text(k)) => k,
            None => message_key
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
        },
        ts_ms,
        features,
        value: raw.value,
        id: raw.id.map(|Text(t)| t),
        metadata: raw
            .metadata
            .filter(|v| v.get() != "null")
            .map(|v| v.to_owned()),
    })
}

/// Decodes one Kafka message payload into an [`Event`].
///
/// `message_key` and `message_ts_ms` are the Kafka message's key and timestamp, used when the
/// event lacks `key` or `ts`.
///
/// # Errors
/// A [`DecodeError`] naming what is wrong; the caller routes the message to the dead-letter topic.
pub fn decode(
    payload: Option<&[u8]>,
    message_key: Option<&[u8]>,
    message_ts_ms: Option<i64>,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    let bytes = payload.ok_or(DecodeError::Empty)?;
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::Oversized {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    // NB: serde reads a struct from a JSON array positionally; an event must be an object.
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(DecodeError::Empty),
        Some(b'{') => {}
        Some(_) => {
            return Err(DecodeError::NotJson(
                match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                    Ok(_) => "an event must be a JSON object".into(),
                    Err(e) => e.to_string(),
                },
            ))
        }
    }
    let event = match fast_decode(bytes, message_key, message_ts_ms) {
        Some(event) => event,
        None => explain(bytes, message_key, message_ts_ms)?,
    };
    check_storable(&event, message_ts_ms, limits)?;
    Ok(event)
}

/// Decodes one Kafka message payload in the input format `decoder` stands for (JSON, Avro or
/// either); see [`decode`].
///
/// # Errors
/// A [`DecodeError`] naming what is wrong.
pub fn decode_with(
    decoder: &crate::avro::InputDecoder,
    payload: Option<&[u8]>,
    message_key: Option<&[u8]>,
    message_ts_ms: Option<i64>,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    if let crate::avro::InputDecoder::Json = decoder {
        return decode(payload, message_key, message_ts_ms, limits);
    }
    let bytes = payload.ok_or(DecodeError::Empty)?;
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::Oversized {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    match decoder.decode(bytes, message_key, message_ts_ms)? {
        Some(event) => {
            check_storable(&event, message_ts_ms, limits)?;
            Ok(event)
        }
        None => decode(payload, message_key, message_ts_ms, limits),
    }
}

fn in_range(x: f64) -> bool {
    x.abs() <= MAX_ABS_NUMBER
}

/// Rejects what the sink or the checkpoint could not hold, and event times that would move
/// stream time where no honest event follows.
fn check_storable(
    event: &Event,
    message_ts_ms: Option<i64>,
    limits: &Limits,
) -> Result<(), DecodeError> {
    if event.key.len() > limits.max_key_bytes {
        return Err(DecodeError::KeyTooLong {
            len: event.key.len(),
            limit: limits.max_key_bytes,
        });
    }
    if let Some(id) = event
        .id
        .as_ref()
        .filter(|id| id.len() > limits.max_key_bytes)
    {
        return Err(DecodeError::FieldTooLong {
            field: "id",
            len: id.len(),
            limit: limits.max_key_bytes,
        });
    }
    if let Some(m) = event
        .metadata
        .as_ref()
        .filter(|m| m.get().len() > limits.max_metadata_bytes)
    {
        return Err(DecodeError::FieldTooLong {
            field: "metadata",
            len: m.get().len(),
            limit: limits.max_metadata_bytes,
        });
    }
    if event.key.contains('\0') {
        return Err(DecodeError::NulCharacter { field: "key" });
    }
    if event.id.as_deref().is_some_and(|id| id.contains('\0')) {
        return Err(DecodeError::NulCharacter { field: "id" });
    }
    if !(MIN_TS_MS..MAX_TS_MS).contains(&event.ts_ms) {
        return Err(DecodeError::TimestampOutOfRange { ts_ms: event.ts_ms });
    }
    let reference = match (message_ts_ms, limits.now_ms) {
        (Some(m), Some(now)) => Some(m.min(now)),
        (m, now) => m.or(now),
    };
    if let Some(reference) = reference {
        let ahead = event.ts_ms.saturating_sub(reference);
        if ahead > 0 && ahead as u64 > limits.max_ahead_ms {
            return Err(DecodeError::FutureTimestamp {
                ahead_ms: ahead,
                limit_ms: limits.max_ahead_ms,
            });
        }
    }
    Ok(())
}

/// The slow path: decodes field by field to name what is wrong.
fn explain(
    bytes: &[u8],
    message_key: Option<&[u8]>,
    message_ts_ms: Option<i64>,
) -> Result<Event, DecodeError> {
    let raw: RawEvent<'_> =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;

    let key = match raw.key.filter(|v| v.get() != "null") {
        Some(v) => match serde_json::from_str::<String>(v.get()) {
            Ok(s) => s,
            Err(_) => scalar_text(v).ok_or_else(|| invalid("key", "must be a string or number"))?,
        },
        None => message_key
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
    };

    let ts_ms = match raw.ts.filter(|v| v.get() != "null") {
        Some(v) => parse_ts(v)?,
        None => message_ts_ms.ok_or(DecodeError::MissingTimestamp)?,
    };

    let features = match raw.features.filter(|v| v.get() != "null") {
        Some(v) => parse_features(v)?,
        None => Vec::new(),
    };

    let value = match raw.value.filter(|v| v.get() != "null") {
        Some(v) => {
            let x: f64 = serde_json::from_str(v.get())
                .map_err(|_| invalid("value", format!("must be a number, got {}", v.get())))?;
            if !x.is_finite() {
                return Err(invalid("value", "must be finite"));
            }
            if !in_range(x) {
                return Err(invalid("value", "magnitude exceeds 1e100"));
            }
            Some(x)
        }
        None => None,
    };

    let id = match raw.id.filter(|v| v.get() != "null") {
        Some(v) => Some(match serde_json::from_str::<String>(v.get()) {
            Ok(s) => s,
            Err(_) => scalar_text(v).ok_or_else(|| invalid("id", "must be a string or number"))?,
        }),
        None => None,
    };

    let metadata = raw
        .metadata
        .filter(|v| v.get() != "null")
        .map(|v| v.to_owned());

    Ok(Event {
        key,
        ts_ms,
        features,
        value,
        id,
        metadata,
    })
}

/// A JSON number's text, used as a key or id.
fn scalar_text(v: &RawValue) -> Option<String> {
    serde_json::from_str::<serde_json::Number>(v.get())
        .ok()
        .map(|n| n.to_string())
}

fn parse_ts(v: &RawValue) -> Result<i64, DecodeError> {
    if let Ok(ms) = serde_json::from_str::<i64>(v.get()) {
        return Ok(ms);
    }
    if let Ok(ms) = serde_json::from_str::<f64>(v.get()) {
        if ms.is_finite() && ms.abs() < 9.0e15 {
            return Ok(ms.floor() as i64);
        }
        return Err(invalid("ts", "epoch milliseconds out of range"));
    }
    if let Ok(text) = serde_json::from_str::<&str>(v.get()) {
        return chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .map_err(|e| invalid("ts", format!("`{text}` is not RFC 3339: {e}")));
    }
    Err(invalid(
        "ts",
        "must be epoch milliseconds or an RFC 3339 string",
    ))
}

fn parse_features(v: &RawValue) -> Result<Vec<f64>, DecodeError> {
    // Fast path: a well-formed array of numbers parses in one pass; the slow path below only
    // runs to explain a rejection.
    if let Ok(xs) = serde_json::from_str::<Vec<f64>>(v.get()) {
        if !xs.is_empty() && xs.len() <= MAX_FEATURES && xs.iter().all(|x| in_range(*x)) {
            return Ok(xs);
        }
    }
    let items: Vec<&RawValue> = serde_json::from_str(v.get())
        .map_err(|_| invalid("features", "must be an array of numbers"))?;
    if items.is_empty() {
        return Err(invalid("features", "must not be empty"));
    }
    if items.len() > MAX_FEATURES {
        return Err(invalid(
            "features",
            format!(
                "has {} entries, at most {MAX_FEATURES} allowed",
                items.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let x: f64 = serde_json::from_str(item.get()).map_err(|_| {
            invalid(
                "features",
                format!("entry {i} is not a number: {}", item.get()),
            )
        })?;
        if !x.is_finite() {
            return Err(invalid("features", format!("entry {i} is not finite")));
        }
        if !in_range(x) {
            return Err(invalid(
                "features",
                format!("entry {i} has a magnitude above 1e100"),
            ));
        }
        out.push(x);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> Event {
        decode(
            Some(json.as_bytes()),
            Some(b"mk"),
            Some(7),
            &Limits::bytes(1 << 20),
        )
        .unwrap()
    }

    fn err(json: &str) -> DecodeError {
        decode(
            Some(json.as_bytes()),
            None,
            Some(7),
            &Limits::bytes(1 << 20),
        )
        .unwrap_err()
    }

    #[test]
    fn full_event_decodes() {
        let e = ok(
            r#"{"key":"sensor-17","ts":1763866800123,"features":[0.12,3.4,5.6],"value":42.0,"id":"evt-123","metadata":{"site":"A"}}"#,
        );
        assert_eq!(e.key, "sensor-17");
        assert_eq!(e.ts_ms, 1763866800123);
        assert_eq!(e.features, vec![0.12, 3.4, 5.6]);
        assert_eq!(e.value, Some(42.0));
        assert_eq!(e.id.as_deref(), Some("evt-123"));
        assert_eq!(e.metadata.unwrap().get(), r#"{"site":"A"}"#);
    }

    #[test]
    fn fallbacks_use_the_kafka_message() {
        let e = ok(r#"{"features":[1]}"#);
        assert_eq!(e.key, "mk");
        assert_eq!(e.ts_ms, 7);
        let e = decode(Some(b"{}"), None, Some(1), &Limits::bytes(100)).unwrap();
        assert_eq!(e.key, "");
    }

    #[test]
    fn rfc3339_timestamps() {
        let e = ok(r#"{"ts":"2025-11-23T03:00:00.123Z"}"#);
        assert_eq!(e.ts_ms, 1763866800123);
    }

    #[test]
    fn rejections_have_reasons() {
        assert_eq!(err("not json").kind(), "not_json");
        assert_eq!(err(r#"{"features":"abc"}"#).kind(), "invalid_field");
        assert_eq!(err(r#"{"features":[1,"x"]}"#).kind(), "invalid_field");
        assert_eq!(err(r#"{"features":[1, NaN]}"#).kind(), "not_json");
        assert_eq!(err(r#"{"features":[1e999]}"#).kind(), "invalid_field");
        assert_eq!(err(r#"{"value":"high"}"#).kind(), "invalid_field");
        assert_eq!(err(r#"{"ts":"yesterday"}"#).kind(), "invalid_field");
        assert_eq!(err(r#"{"features":[]}"#).kind(), "invalid_field");
        let big = format!("{{\"key\":\"{}\"}}", "x".repeat(200));
        let e = decode(Some(big.as_bytes()), None, Some(1), &Limits::bytes(100)).unwrap_err();
        assert_eq!(e.kind(), "oversized");
        assert_eq!(
            decode(None, None, Some(1), &Limits::bytes(100))
                .unwrap_err()
                .kind(),
            "empty"
        );
        assert_eq!(
            decode(Some(b"{}"), None, None, &Limits::bytes(100))
                .unwrap_err()
                .kind(),
            "missing_timestamp"
        );
    }

    fn limited(json: &str, message_key: Option<&[u8]>, message_ts: Option<i64>) -> DecodeError {
        let limits = Limits {
            max_bytes: 1 << 20,
            max_key_bytes: 1024,
            max_metadata_bytes: 16_384,
            max_ahead_ms: 86_400_000,
            now_ms: Some(1_763_866_800_000),
        };
        decode(Some(json.as_bytes()), message_key, message_ts, &limits).unwrap_err()
    }

    #[test]
    fn what_the_sink_cannot_store_is_rejected() {
        let now = Some(1_763_866_800_000);
        assert_eq!(
            limited(r#"{"key":"a\u0000b"}"#, None, now).kind(),
            "nul_character"
        );
        assert_eq!(
            limited(r#"{"id":"\u0000"}"#, None, now).kind(),
            "nul_character"
        );
        assert_eq!(limited("{}", Some(b"k\0"), now).kind(), "nul_character");
        let long = format!(r#"{{"key":"{}"}}"#, "k".repeat(1025));
        assert_eq!(limited(&long, None, now).kind(), "key_too_long");
        let long_message_key = vec![b'k'; 3000];
        assert_eq!(
            limited("{}", Some(&long_message_key), now).kind(),
            "key_too_long"
        );
        for ts in ["-62200000000000", "300000000000000", "9000000000000000"] {
            let json = format!(r#"{{"ts":{ts}}}"#);
            assert_eq!(
                limited(&json, None, now).kind(),
                "timestamp_out_of_range",
                "{ts}"
            );
        }
        assert_eq!(
            limited(r#"{"ts":"9999-12-31T00:00:00Z"}"#, None, now).kind(),
            "timestamp_out_of_range"
        );
        // Two days ahead of the wall clock, or of a message timestamp that is behind it.
        let ahead = format!(r#"{{"ts":{}}}"#, 1_763_866_800_000i64 + 2 * 86_400_000);
        assert_eq!(limited(&ahead, None, now).kind(), "future_timestamp");
        assert_eq!(limited(&ahead, None, None).kind(), "future_timestamp");
        assert_eq!(
            limited(r#"{"value":1e300}"#, None, now).kind(),
            "invalid_field"
        );
        assert_eq!(
            limited(r#"{"features":[1,-1.7e308]}"#, None, now).kind(),
            "invalid_field"
        );
        assert_eq!(limited("[1,2]", None, now).kind(), "not_json");
        assert_eq!(limited(r#"["k", 5]"#, None, now).kind(), "not_json");
        assert_eq!(limited("", None, now).kind(), "empty");
        assert_eq!(limited("  \n", None, now).kind(), "empty");
    }

    #[test]
    fn limits_accept_their_edges() {
        let limits = Limits {
            max_bytes: 1 << 20,
            max_key_bytes: 4,
            max_metadata_bytes: 9,
            max_ahead_ms: 1_000,
            now_ms: Some(10_000),
        };
        let e = decode(
            Some(br#"{"key":"abcd","ts":11000,"value":1e100,"features":[-1e100]}"#),
            None,
            Some(20_000),
            &limits,
        )
        .unwrap();
        assert_eq!((e.key.as_str(), e.ts_ms), ("abcd", 11_000));
        let e = decode(
            Some(br#"{"ts":"1900-01-01T00:00:00Z"}"#),
            None,
            None,
            &limits,
        )
        .unwrap();
        assert_eq!(e.ts_ms, MIN_TS_MS);
        // id up to max_key_bytes, metadata's JSON text up to max_metadata_bytes; one more is
        // refused with the field named.
        let e = decode(
            Some(br#"{"ts":1,"id":"abcd","metadata":{"a":123}}"#),
            None,
            None,
            &limits,
        )
        .unwrap();
        assert_eq!(e.metadata.unwrap().get(), r#"{"a":123}"#);
        for (json, field) in [
            (r#"{"ts":1,"id":"abcde"}"#, "id"),
            (r#"{"ts":1,"metadata":{"a":1234}}"#, "metadata"),
            (r#"{"ts":1,"metadata":"12345678"}"#, "metadata"),
        ] {
            let err = decode(Some(json.as_bytes()), None, None, &limits).unwrap_err();
            assert_eq!(err.kind(), "field_too_long", "{json}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }
}

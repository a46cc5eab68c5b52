//! Avro input: the Confluent wire format (magic byte 0, a 4-byte big-endian schema id, an Avro
//! binary datum) and plain Avro datums with a configured writer schema, resolved against the
//! product's own reader schema (`schemas/event.avsc`).
//!
//! Resolution follows the Avro specification for that reader schema, compiled once per writer
//! schema into a [`WriterPlan`]: writer fields are matched to the reader's by name or alias,
//! fields the reader does not know are skipped, fields the writer lacks are absent (every
//! reader field is optional), `int`, `long`, `float` and `double` promote to the reader's type,
//! unions with `null` are optional fields, and a writer type that cannot resolve (a string where
//! the features go) makes the whole writer schema incompatible: its messages are dead-lettered
//! with the reason. The plan then decodes datums straight into an [`Event`] without building an
//! intermediate value tree (the generic decoder is used only for `metadata`).
//!
//! [`registry`] fetches writer schemas by id from a Schema Registry and caches their plans.

pub mod output;
pub mod registry;

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema::{Name, RecordSchema, Schema};

use crate::event::{DecodeError, Event};

/// The reader schema of input events (`schemas/event.avsc`).
pub const EVENT_SCHEMA: &str = include_str!("../../schemas/event.avsc");

/// An event as an Avro datum of [`EVENT_SCHEMA`] (`produce --format avro`, benches). Metadata
/// values that are not strings are written as their JSON text.
pub fn encode_event(event: &Event) -> Vec<u8> {
    use apache_avro::types::Value;
    static SCHEMA: std::sync::OnceLock<Schema> = std::sync::OnceLock::new();
    let schema =
        SCHEMA.get_or_init(|| Schema::parse_str(EVENT_SCHEMA).expect("the event schema parses"));
    let some = |v: Value| Value::Union(1, Box::new(v));
    let none = || Value::Union(0, Box::new(Value::Null));
    let metadata = event.metadata.as_ref().and_then(|raw| {
        let json: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
        let map = match json {
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, Value::String(s)),
                    other => (k, Value::String(other.to_string())),
                })
                .collect(),
            other => [("value".to_string(), Value::String(other.to_string()))].into(),
        };
        Some(Value::Map(map))
    });
    let record = Value::Record(vec![
        ("key".into(), some(Value::String(event.key.clone()))),
        ("ts".into(), some(Value::TimestampMillis(event.ts_ms))),
        (
            "features".into(),
            if event.features.is_empty() {
                none()
            } else {
                some(Value::Array(
                    event.features.iter().map(|x| Value::Double(*x)).collect(),
                ))
            },
        ),
        (
            "value".into(),
            event.value.map(Value::Double).map_or_else(none, some),
        ),
        (
            "id".into(),
            event.id.clone().map(Value::String).map_or_else(none, some),
        ),
        ("metadata".into(), metadata.map_or_else(none, some)),
    ]);
    apache_avro::to_avro_datum(schema, record).expect("events fit the event schema")
}

/// The Confluent wire format's first byte.
pub const MAGIC_BYTE: u8 = 0;

/// Splits a Confluent-framed message into its schema id and datum.
///
/// # Errors
/// [`DecodeError::UnknownMagicByte`] when the payload is shorter than the 5-byte header or does
/// not start with the magic byte 0.
pub fn split_confluent(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match payload {
        [MAGIC_BYTE, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        [MAGIC_BYTE, ..] => Err(DecodeError::UnknownMagicByte(format!(
            "{} bytes: shorter than the 5-byte Confluent header (magic byte 0, schema id)",
            payload.len()
        ))),
        [first, ..] => Err(DecodeError::UnknownMagicByte(format!(
            "first byte is {first:#04x}, not the Confluent magic byte 0x00"
        ))),
        [] => Err(DecodeError::Empty),
    }
}

/// Prefixes `datum` with the Confluent header for `schema_id`.
pub fn frame_confluent(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(datum.len() + 5);
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// The largest writer schema accepted (as JSON text).
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;

/// Parses an untrusted Avro schema: bounded in size, `fixed` UUIDs refused (apache-avro 0.20
/// reads them as strings), and a panic of the parser (apache-avro 0.20 panics on some invalid
/// names and aliases) turned into an error.
///
/// # Errors
/// Why the text is not a usable schema.
pub fn parse_schema(text: &str) -> Result<Schema, String> {
    if text.len() > MAX_SCHEMA_BYTES {
        return Err(format!(
            "the writer schema has {} bytes, more than {MAX_SCHEMA_BYTES}",
            text.len()
        ));
    }
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the writer schema is not JSON: {e}"))?;
    if has_fixed_uuid(&json, 0) {
        return Err("a `fixed` with logicalType `uuid` is not supported".into());
    }
    let parsed = std::panic::catch_unwind(|| Schema::parse(&json));
    match parsed {
        Ok(Ok(schema)) => Ok(schema),
        Ok(Err(e)) => Err(format!("the writer schema does not parse: {e}")),
        Err(_) => Err("the writer schema does not parse (an invalid name or alias)".into()),
    }
}

fn has_fixed_uuid(json: &serde_json::Value, depth: usize) -> bool {
    match json {
        _ if depth > MAX_DEPTH => false,
        serde_json::Value::Object(map) => {
            (map.get("type").and_then(|t| t.as_str()) == Some("fixed")
                && map.get("logicalType").and_then(|t| t.as_str()) == Some("uuid"))
                || map.values().any(|v| has_fixed_uuid(v, depth + 1))
        }
        serde_json::Value::Array(items) => items.iter().any(|v| has_fixed_uuid(v, depth + 1)),
        _ => false,
    }
}

/// The event field a writer field feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Key,
    Ts,
    Features,
    Value,
    Id,
    Metadata,
}

impl Target {
    const ALL: [Target; 6] = [
        Target::Key,
        Target::Ts,
        Target::Features,
        Target::Value,
        Target::Id,
        Target::Metadata,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Key => "key",
            Target::Ts => "ts",
            Target::Features => "features",
            Target::Value => "value",
            Target::Id => "id",
            Target::Metadata => "metadata",
        }
    }

    /// The reader schema's aliases (`schemas/event.avsc`).
    fn aliases(self) -> &'static [&'static str] {
        match self {
            Target::Key => &["event_key"],
            Target::Ts => &["timestamp", "event_time", "time"],
            Target::Features => &["vector", "embedding"],
            Target::Value => &["measure"],
            Target::Id => &["event_id"],
            Target::Metadata => &["attributes"],
        }
    }

    /// Whether a (non-union, non-null) writer schema resolves to this field.
    fn accepts(self, schema: &Schema) -> bool {
        use Schema as S;
        match self {
            Target::Key | Target::Id => matches!(
                schema,
                S::String | S::Bytes | S::Int | S::Long | S::Enum(_) | S::Uuid
            ),
            Target::Ts => matches!(
                schema,
                S::Long
                    | S::Int
                    | S::Float
                    | S::Double
                    | S::String
                    | S::TimestampMillis
                    | S::TimestampMicros
                    | S::TimestampNanos
                    | S::LocalTimestampMillis
                    | S::LocalTimestampMicros
                    | S::LocalTimestampNanos
            ),
            Target::Features => match schema {
                S::Array(a) => is_number(&a.items),
                _ => false,
            },
            Target::Value => is_number(schema),
            Target::Metadata => matches!(schema, S::Map(_) | S::Record(_)),
        }
    }
}

fn is_number(schema: &Schema) -> bool {
    matches!(
        schema,
        Schema::Int | Schema::Long | Schema::Float | Schema::Double
    )
}

/// One writer field: where it goes (or nothing: skipped) and how it is written.
#[derive(Debug)]
struct Step {
    target: Option<Target>,
    schema: Schema,
}

/// A writer schema compiled against the reader schema.
#[derive(Debug)]
pub struct WriterPlan {
    steps: Vec<Step>,
    /// Named types of the writer schema, for references (`"type": "Address"`).
    names: HashMap<Name, Schema>,
}

/// Why a writer schema cannot be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Incompatible(pub String);

impl WriterPlan {
    /// Compiles the writer schema `text` (Avro JSON).
    ///
    /// # Errors
    /// [`Incompatible`] when it does not parse, is not a record, or a field the reader knows has
    /// a type that does not resolve to the reader's.
    pub fn compile(text: &str) -> Result<WriterPlan, Incompatible> {
        let schema = parse_schema(text).map_err(Incompatible)?;
        Self::from_schema(&schema)
    }

    /// Compiles a parsed writer schema.
    ///
    /// # Errors
    /// See [`WriterPlan::compile`].
    pub fn from_schema(schema: &Schema) -> Result<WriterPlan, Incompatible> {
        let mut names = HashMap::new();
        collect_names(schema, &mut names);
        let Schema::Record(RecordSchema { fields, .. }) = schema else {
            return Err(Incompatible(format!(
                "the writer schema is {}, not a record",
                kind_name(schema)
            )));
        };
        let mut targets: Vec<Option<Target>> = vec![None; fields.len()];
        for target in Target::ALL {
            let by_name = fields.iter().position(|f| f.name == target.name());
            let by_alias = || {
                fields
                    .iter()
                    .position(|f| target.aliases().contains(&f.name.as_str()))
            };
            if let Some(i) = by_name.or_else(by_alias) {
                targets[i] = Some(target);
            }
        }
        let mut steps = Vec::with_capacity(fields.len());
        for (field, target) in fields.iter().zip(targets) {
            // NB: the field's own schema (a reference stays a reference, resolved while
            // decoding): cloning resolved named types per field could multiply a schema's size.
            let schema = field.schema.clone();
            if let Some(target) = target {
                let schema = resolve_ref(&schema, &names);
                let branches: Vec<&Schema> = match schema {
                    Schema::Union(u) => u.variants().iter().collect(),
                    other => vec![other],
                };
                for branch in branches {
                    let branch = resolve_ref(branch, &names);
                    if !matches!(branch, Schema::Null) && !target.accepts(branch) {
                        return Err(Incompatible(format!(
                            "field `{}` ({}) is {}, which does not resolve to the event's `{}`",
                            field.name,
                            target.name(),
                            kind_name(branch),
                            target.name()
                        )));
                    }
                }
            }
            steps.push(Step { target, schema });
        }
        Ok(WriterPlan { steps, names })
    }

    /// Decodes one datum (the whole of `datum`) into an event; `message_key` and
    /// `message_ts_ms` stand in for an absent `key` or `ts`, as for JSON. The result is not yet
    /// checked for storability (the caller does, as for JSON).
    ///
    /// # Errors
    /// [`DecodeError::InvalidAvro`] for a truncated or corrupt datum or trailing bytes,
    /// [`DecodeError::InvalidField`] for values the event cannot hold (non-finite numbers,
    /// invalid UTF-8 in a key), [`DecodeError::MissingTimestamp`].
    pub fn decode(
        &self,
        datum: &[u8],
        message_key: Option<&[u8]>,
        message_ts_ms: Option<i64>,
    ) -> Result<Event, DecodeError> {
        let mut r = Reader {
            buf: datum,
            pos: 0,
            items: 0,
        };
        let mut fields = Fields::default();
        for step in &self.steps {
            match step.target {
                None => r.skip(&step.schema, &self.names, 0)?,
                Some(target) => self.read(&mut r, target, &step.schema, &mut fields)?,
            }
        }
        if r.pos != datum.len() {
            return Err(DecodeError::InvalidAvro(format!(
                "{} bytes left after the datum (not written with this schema?)",
                datum.len() - r.pos
            )));
        }
        let ts_ms = match fields.ts {
            Some(ts) => ts,
            None => message_ts_ms.ok_or(DecodeError::MissingTimestamp)?,
        };
        Ok(Event {
            key: match fields.key {
                Some(k) => k,
                None => message_key
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
            },
            ts_ms,
            features: fields.features.unwrap_or_default(),
            value: fields.value,
            id: fields.id,
            metadata: fields.metadata,
        })
    }

    fn read(
        &self,
        r: &mut Reader<'_>,
        target: Target,
        schema: &Schema,
        out: &mut Fields,
    ) -> Result<(), DecodeError> {
        let schema = resolve_ref(schema, &self.names);
        if let Schema::Union(u) = schema {
            let branch = r.branch(u)?;
            return self.read(r, target, branch, out);
        }
        let field = target.name();
        match (target, schema) {
            (_, Schema::Null) => {}
            (Target::Key | Target::Id, _) => {
                let text = r.text(schema, field)?;
                if target == Target::Key {
                    out.key = Some(text);
                } else {
                    out.id = Some(text);
                }
            }
            (Target::Ts, _) => out.ts = Some(r.timestamp(schema)?),
            (Target::Value, _) => out.value = Some(checked(field, r.number(schema)?)?),
            (Target::Features, Schema::Array(a)) => {
                let items = resolve_ref(&a.items, &self.names);
                let mut xs = Vec::new();
                loop {
                    let count = r.block()?;
                    if count == 0 {
                        break;
                    }
                    if xs.len().saturating_add(count) > crate::event::MAX_FEATURES {
                        return Err(DecodeError::InvalidField {
                            field: "features",
                            problem: format!(
                                "has more than {} entries",
                                crate::event::MAX_FEATURES
                            ),
                        });
                    }
                    xs.reserve(count);
                    for _ in 0..count {
                        xs.push(checked("features", r.number(items)?)?);
                    }
                }
                if xs.is_empty() {
                    return Err(DecodeError::InvalidField {
                        field: "features",
                        problem: "must not be empty".into(),
                    });
                }
                out.features = Some(xs);
            }
            (Target::Metadata, _) => {
                // NB: not apache-avro's decoder: it reserves memory by the counts a datum
                // claims (hundreds of MiB for a few bytes).
                let json = r.json(schema, &self.names, 0)?;
                out.metadata = serde_json::value::to_raw_value(&json).ok();
            }
            (_, other) => {
                // Excluded when the plan was compiled.
                return Err(DecodeError::SchemaIncompatible(format!(
                    "field `{field}` is {}",
                    kind_name(other)
                )));
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Fields {
    key: Option<String>,
    ts: Option<i64>,
    features: Option<Vec<f64>>,
    value: Option<f64>,
    id: Option<String>,
    metadata: Option<Box<serde_json::value::RawValue>>,
}

fn checked(field: &'static str, x: f64) -> Result<f64, DecodeError> {
    if !x.is_finite() {
        return Err(DecodeError::InvalidField {
            field,
            problem: "must be finite".into(),
        });
    }
    if x.abs() > crate::event::MAX_ABS_NUMBER {
        return Err(DecodeError::InvalidField {
            field,
            problem: "magnitude exceeds 1e100".into(),
        });
    }
    Ok(x)
}

fn corrupt() -> DecodeError {
    DecodeError::InvalidAvro("corrupt datum".into())
}

fn truncated() -> DecodeError {
    DecodeError::InvalidAvro("truncated datum".into())
}

/// How deep nested types may go while skipping (a hostile recursive schema).
const MAX_DEPTH: usize = 64;

/// A cursor over a datum.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array and map items read or skipped so far: at most the datum's length + 1024 in all,
    /// so items that take no bytes (`null`, empty records) cannot make a datum cost more than
    /// linear time.
    items: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    /// A zig-zag varint (Avro `int` and `long`).
    fn long(&mut self) -> Result<i64, DecodeError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or_else(truncated)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err(DecodeError::InvalidAvro(
            "varint longer than 10 bytes".into(),
        ))
    }

    fn length(&mut self) -> Result<usize, DecodeError> {
        let n = self.long()?;
        let n = usize::try_from(n)
            .map_err(|_| DecodeError::InvalidAvro(format!("negative length {n}")))?;
        if n > self.buf.len() - self.pos {
            return Err(truncated());
        }
        Ok(n)
    }

    fn number(&mut self, schema: &Schema) -> Result<f64, DecodeError> {
        Ok(match schema {
            Schema::Int | Schema::Long => self.long()? as f64,
            Schema::Float => f32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as f64,
            Schema::Double => f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")),
            other => {
                return Err(DecodeError::SchemaIncompatible(format!(
                    "{} is not a number",
                    kind_name(other)
                )))
            }
        })
    }

    fn text(&mut self, schema: &Schema, field: &'static str) -> Result<String, DecodeError> {
        match schema {
            Schema::String | Schema::Bytes | Schema::Uuid => {
                let n = self.length()?;
                let bytes = self.take(n)?;
                String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidField {
                    field,
                    problem: "is not valid UTF-8".into(),
                })
            }
            Schema::Int | Schema::Long => Ok(self.long()?.to_string()),
            Schema::Enum(e) => {
                let i = self.long()?;
                usize::try_from(i)
                    .ok()
                    .and_then(|i| e.symbols.get(i))
                    .cloned()
                    .ok_or_else(|| DecodeError::InvalidAvro(format!("enum index {i} out of range")))
            }
            other => Err(DecodeError::SchemaIncompatible(format!(
                "field `{field}` is {}",
                kind_name(other)
            ))),
        }
    }

    fn timestamp(&mut self, schema: &Schema) -> Result<i64, DecodeError> {
        let ms = match schema {
            Schema::Long | Schema::Int | Schema::TimestampMillis | Schema::LocalTimestampMillis => {
                self.long()?
            }
            Schema::TimestampMicros | Schema::LocalTimestampMicros => {
                self.long()?.div_euclid(1_000)
            }
            Schema::TimestampNanos | Schema::LocalTimestampNanos => {
                self.long()?.div_euclid(1_000_000)
            }
            Schema::Float | Schema::Double => {
                let x = self.number(schema)?;
                if !(x.is_finite() && x.abs() < 9.0e15) {
                    return Err(DecodeError::InvalidField {
                        field: "ts",
                        problem: "epoch milliseconds out of range".into(),
                    });
                }
                x.floor() as i64
            }
            Schema::String => {
                let text = self.text(schema, "ts")?;
                chrono::DateTime::parse_from_rfc3339(&text)
                    .map(|t| t.timestamp_millis())
                    .map_err(|e| DecodeError::InvalidField {
                        field: "ts",
                        problem: format!("`{text}` is not RFC 3339: {e}"),
                    })?
            }
            other => {
                return Err(DecodeError::SchemaIncompatible(format!(
                    "field `ts` is {}",
                    kind_name(other)
                )))
            }
        };
        Ok(ms)
    }

    /// The branch a union value was written with.
    fn branch<'s>(
        &mut self,
        union: &'s apache_avro::schema::UnionSchema,
    ) -> Result<&'s Schema, DecodeError> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| union.variants().get(i))
            .ok_or_else(|| DecodeError::InvalidAvro(format!("union branch {i} does not exist")))
    }

    /// Skips one value written with `schema`.
    fn skip(
        &mut self,
        schema: &Schema,
        names: &HashMap<Name, Schema>,
        depth: usize,
    ) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::InvalidAvro("values nested too deeply".into()));
        }
        use Schema as S;
        match resolve_ref(schema, names) {
            S::Null => {}
            S::Boolean => {
                self.take(1)?;
            }
            S::Int
            | S::Long
            | S::Date
            | S::TimeMillis
            | S::TimeMicros
            | S::TimestampMillis
            | S::TimestampMicros
            | S::TimestampNanos
            | S::LocalTimestampMillis
            | S::LocalTimestampMicros
            | S::LocalTimestampNanos
            | S::Enum(_) => {
                self.long()?;
            }
            S::Float => {
                self.take(4)?;
            }
            S::Double => {
                self.take(8)?;
            }
            S::Bytes | S::String | S::Uuid | S::BigDecimal => {
                let n = self.length()?;
                self.take(n)?;
            }
            S::Fixed(f) => {
                self.take(f.size)?;
            }
            S::Duration => {
                self.take(12)?;
            }
            S::Decimal(d) => self.skip(&d.inner, names, depth + 1)?,
            S::Array(a) => {
                self.skip_blocks(names, depth, |r, names| r.skip(&a.items, names, depth + 1))?
            }
            S::Map(m) => self.skip_blocks(names, depth, |r, names| {
                let n = r.length()?;
                r.take(n)?;
                r.skip(&m.types, names, depth + 1)
            })?,
            S::Union(u) => {
                let branch = self.branch(u)?;
                self.skip(branch, names, depth + 1)?;
            }
            S::Record(r) => {
                for field in &r.fields {
                    self.skip(&field.schema, names, depth + 1)?;
                }
            }
            S::Ref { name } => {
                return Err(DecodeError::InvalidAvro(format!(
                    "the writer schema references an undefined type {name}"
                )))
            }
        }
        Ok(())
    }

    fn skip_blocks(
        &mut self,
        names: &HashMap<Name, Schema>,
        _depth: usize,
        mut item: impl FnMut(&mut Self, &HashMap<Name, Schema>) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        loop {
            let count = self.block()?;
            if count == 0 {
                return Ok(());
            }
            for _ in 0..count {
                item(self, names)?;
            }
        }
    }

    /// The item count of the next block (0: the end), its byte size read and dropped when
    /// written (a negative count), checked against the datum's item budget.
    fn block(&mut self) -> Result<usize, DecodeError> {
        let count = self.long()?;
        let count = if count < 0 {
            self.length()?; // the block's size in bytes
            count.checked_neg().ok_or_else(corrupt)?
        } else {
            count
        };
        let count = usize::try_from(count).map_err(|_| corrupt())?;
        self.items = self.items.saturating_add(count);
        if self.items > self.buf.len() + 1024 {
            return Err(DecodeError::InvalidAvro(format!(
                "more array or map items than a datum of {} bytes can hold",
                self.buf.len()
            )));
        }
        Ok(count)
    }

    /// A value written with `schema`, as JSON (metadata), bounded like every other read.
    fn json(
        &mut self,
        schema: &Schema,
        names: &HashMap<Name, Schema>,
        depth: usize,
    ) -> Result<serde_json::Value, DecodeError> {
        use serde_json::Value as J;
        use Schema as S;
        if depth > MAX_DEPTH {
            return Err(DecodeError::InvalidAvro("values nested too deeply".into()));
        }
        let number = |x: f64| serde_json::Number::from_f64(x).map_or(J::Null, J::Number);
        Ok(match resolve_ref(schema, names) {
            S::Null => J::Null,
            S::Boolean => match self.take(1)?[0] {
                0 => J::Bool(false),
                1 => J::Bool(true),
                b => return Err(DecodeError::InvalidAvro(format!("boolean byte {b}"))),
            },
            S::Float | S::Double => number(self.number(resolve_ref(schema, names))?),
            S::Int
            | S::Long
            | S::Date
            | S::TimeMillis
            | S::TimeMicros
            | S::TimestampMillis
            | S::TimestampMicros
            | S::TimestampNanos
            | S::LocalTimestampMillis
            | S::LocalTimestampMicros
            | S::LocalTimestampNanos => J::from(self.long()?),
            S::String | S::Uuid | S::Enum(_) => J::String(self.text(schema, "metadata")?),
            S::Bytes | S::BigDecimal => {
                let n = self.length()?;
                J::String(String::from_utf8_lossy(self.take(n)?).into_owned())
            }
            S::Fixed(f) => J::String(String::from_utf8_lossy(self.take(f.size)?).into_owned()),
            S::Duration => J::String(format!("{:?}", self.take(12)?)),
            S::Decimal(d) => self.json(&d.inner, names, depth + 1)?,
            S::Array(a) => {
                let mut items = Vec::new();
                loop {
                    let count = self.block()?;
                    if count == 0 {
                        break J::Array(items);
                    }
                    for _ in 0..count {
                        items.push(self.json(&a.items, names, depth + 1)?);
                    }
                }
            }
            S::Map(m) => {
                let mut map = serde_json::Map::new();
                loop {
                    let count = self.block()?;
                    if count == 0 {
                        break J::Object(map);
                    }
                    for _ in 0..count {
                        let key = self.text(&S::String, "metadata")?;
                        let value = self.json(&m.types, names, depth + 1)?;
                        map.insert(key, value);
                    }
                }
            }
            S::Union(u) => {
                let branch = self.branch(u)?;
                self.json(branch, names, depth + 1)?
            }
            S::Record(r) => {
                let mut map = serde_json::Map::new();
                for field in &r.fields {
                    let value = self.json(&field.schema, names, depth + 1)?;
                    map.insert(field.name.clone(), value);
                }
                J::Object(map)
            }
            S::Ref { name } => {
                return Err(DecodeError::InvalidAvro(format!(
                    "the writer schema references an undefined type {name}"
                )))
            }
        })
    }
}

fn resolve_ref<'a>(schema: &'a Schema, names: &'a HashMap<Name, Schema>) -> &'a Schema {
    match schema {
        Schema::Ref { name } => names.get(name).unwrap_or(schema),
        other => other,
    }
}

fn collect_names(schema: &Schema, names: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Record(r) => {
            names.insert(r.name.clone(), schema.clone());
            for f in &r.fields {
                collect_names(&f.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.clone(), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.clone(), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => {
            for v in u.variants() {
                collect_names(v, names);
            }
        }
        _ => {}
    }
}

fn kind_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {}", r.name),
        Schema::Array(_) => "an array".into(),
        Schema::Map(_) => "a map".into(),
        Schema::Union(_) => "a union".into(),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

/// Where writer schemas come from for one input topic.
#[derive(Debug, Clone)]
pub enum InputDecoder {
    /// JSON events.
    Json,
    /// Confluent-framed Avro; writer schemas from the registry cache.
    Avro(Arc<registry::SchemaCache>),
    /// Plain Avro datums written with one configured schema (or why it cannot be read).
    AvroRaw(Arc<Result<WriterPlan, Incompatible>>),
    /// Magic byte 0: Confluent Avro; `{` or `[`: JSON; anything else: `unknown_format`.
    Auto(Arc<registry::SchemaCache>),
}

impl InputDecoder {
    /// The schema id a message needs from the registry before it can be decoded, if any.
    pub fn schema_id(&self, payload: Option<&[u8]>) -> Option<u32> {
        match self {
            InputDecoder::Avro(_) | InputDecoder::Auto(_) => {
                split_confluent(payload?).ok().map(|(id, _)| id)
            }
            _ => None,
        }
    }

    /// Decodes one message (not yet checked for storability).
    ///
    /// # Errors
    /// A [`DecodeError`] naming what is wrong.
    pub fn decode(
        &self,
        payload: &[u8],
        message_key: Option<&[u8]>,
        message_ts_ms: Option<i64>,
    ) -> Result<Option<Event>, DecodeError> {
        let cache =
            match self {
                InputDecoder::Json => return Ok(None),
                InputDecoder::AvroRaw(plan) => {
                    let plan = plan
                        .as_ref()
                        .as_ref()
                        .map_err(|e| DecodeError::SchemaIncompatible(e.0.clone()))?;
                    return plan.decode(payload, message_key, message_ts_ms).map(Some);
                }
                InputDecoder::Auto(cache) => {
                    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
                    Some(b'{' | b'[') => return Ok(None),
                    _ if payload.first() == Some(&MAGIC_BYTE) => cache,
                    _ => {
                        return Err(DecodeError::UnknownFormat(match payload.first() {
                            Some(b) => format!("first byte {b:#04x} is neither the Confluent magic byte 0x00 nor a JSON object"),
                            None => "empty".into(),
                        }))
                    }
                }
                }
                InputDecoder::Avro(cache) => cache,
            };
        let (id, datum) = split_confluent(payload)?;
        let plan = cache.plan(id)?;
        plan.decode(datum, message_key, message_ts_ms)
            .map_err(|e| match e {
                DecodeError::InvalidAvro(why) => {
                    DecodeError::InvalidAvro(format!("schema id {id}: {why}"))
                }
                other => other,
            })
            .map(Some)
    }
}

/// The formats of one service instance: the registry (when a format needs it), the writer
/// schema of `avro-raw` input, and the Avro output encoder (when outputs are Avro).
#[derive(Debug, Clone, Default)]
pub struct Codecs {
    /// The Schema Registry, shared by every partition.
    pub registry: Option<Arc<registry::Registry>>,
    /// The compiled `kafka.avro_writer_schema_file`.
    pub raw: Option<Arc<Result<WriterPlan, Incompatible>>>,
    /// Avro outputs, their schemas registered.
    pub output: Option<Arc<output::OutputEncoder>>,
}

impl Codecs {
    /// Builds what `config` needs; registers the output schemas under `<topic>-value` when the
    /// outputs are Avro.
    ///
    /// # Errors
    /// A message when the registry client cannot be built, the writer schema file cannot be
    /// read, or the registry refuses an output schema.
    pub async fn start(config: &crate::config::Config) -> Result<Codecs, String> {
        use crate::config::OutputFormat;
        let mut codecs = Codecs::default();
        if config.needs_registry() {
            codecs.registry = Some(Arc::new(registry::Registry::new(&config.schema_registry)?));
        }
        if let Some(path) = &config.kafka.avro_writer_schema_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "kafka.avro_writer_schema_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            codecs.raw = Some(Arc::new(WriterPlan::compile(&text)));
        }
        if config.kafka.output_format == OutputFormat::Avro {
            let registry = codecs
                .registry
                .as_ref()
                .ok_or("avro output needs schema_registry.url")?;
            let topics = &config.kafka.topics;
            let subjects = [
                &topics.windows,
                &topics.clusters,
                &topics.outliers,
                &topics.drift,
                &topics.status,
            ];
            let mut ids = [0u32; 5];
            for (i, ((name, text), topic)) in
                output::OUTPUT_SCHEMAS.iter().zip(subjects).enumerate()
            {
                let subject = format!("{topic}-value");
                ids[i] = registry
                    .client()
                    .register(&subject, text)
                    .await
                    .map_err(|e| format!("registering the {name} schema as `{subject}`: {e}"))?;
            }
            tracing::info!(?ids, "output schemas registered");
            codecs.output = Some(Arc::new(output::OutputEncoder::new(ids)));
        }
        Ok(codecs)
    }

    /// The decoder of an input topic of `format`.
    pub fn input_decoder(&self, format: crate::config::InputFormat) -> InputDecoder {
        use crate::config::InputFormat as F;
        let cache = || {
            self.registry
                .as_ref()
                .map(|r| r.cache())
                .unwrap_or_else(|| Arc::new(registry::SchemaCache::new(1)))
        };
        match format {
            F::Json => InputDecoder::Json,
            F::Avro => InputDecoder::Avro(cache()),
            F::Auto => InputDecoder::Auto(cache()),
            F::AvroRaw => InputDecoder::AvroRaw(self.raw.clone().unwrap_or_else(|| {
                Arc::new(Err(Incompatible(
                    "kafka.avro_writer_schema_file is not set".into(),
                )))
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::{Record, Value};

    fn datum_of(schema: &str, fill: impl FnOnce(&mut Record<'_>)) -> Vec<u8> {
        datum(schema, fill)
    }

    fn datum(schema: &str, fill: impl FnOnce(&mut Record<'_>)) -> Vec<u8> {
        let schema = Schema::parse_str(schema).unwrap();
        let mut record = Record::new(&schema).unwrap();
        fill(&mut record);
        apache_avro::to_avro_datum(&schema, record).unwrap()
    }

    #[test]
    fn the_reader_schema_reads_itself() {
        let bytes = datum(EVENT_SCHEMA, |r| {
            r.put("key", Value::Union(1, Box::new(Value::String("k".into()))));
            r.put(
                "ts",
                Value::Union(1, Box::new(Value::TimestampMillis(1_700))),
            );
            r.put(
                "features",
                Value::Union(
                    1,
                    Box::new(Value::Array(vec![Value::Double(1.5), Value::Double(-2.0)])),
                ),
            );
            r.put("value", Value::Union(1, Box::new(Value::Double(4.25))));
            r.put("id", Value::Union(0, Box::new(Value::Null)));
            r.put(
                "metadata",
                Value::Union(
                    1,
                    Box::new(Value::Map(
                        [("site".to_string(), Value::String("A".into()))].into(),
                    )),
                ),
            );
        });
        let plan = WriterPlan::compile(EVENT_SCHEMA).unwrap();
        let e = plan.decode(&bytes, None, None).unwrap();
        assert_eq!(e.key, "k");
        assert_eq!(e.ts_ms, 1_700);
        assert_eq!(e.features, vec![1.5, -2.0]);
        assert_eq!(e.value, Some(4.25));
        assert_eq!(e.id, None);
        assert_eq!(e.metadata.unwrap().get(), r#"{"site":"A"}"#);
    }

    #[test]
    fn evolved_writers_resolve_and_incompatible_ones_are_named() {
        // Promoted types, an alias, an unknown field of every kind in between, no `key`.
        let writer = r#"{"type":"record","name":"Reading","fields":[
            {"name":"site","type":{"type":"record","name":"Site","fields":[
                {"name":"code","type":"string"},{"name":"tags","type":{"type":"map","values":"long"}}]}},
            {"name":"timestamp","type":"int"},
            {"name":"vector","type":{"type":"array","items":"float"}},
            {"name":"flag","type":["null","boolean","Site"]},
            {"name":"value","type":"long"},
            {"name":"blob","type":{"type":"fixed","name":"F","size":3}}]}"#;
        let bytes = datum(writer, |r| {
            r.put(
                "site",
                Value::Record(vec![
                    ("code".into(), Value::String("x".into())),
                    (
                        "tags".into(),
                        Value::Map([("a".to_string(), Value::Long(1))].into()),
                    ),
                ]),
            );
            r.put("timestamp", Value::Int(77));
            r.put(
                "vector",
                Value::Array(vec![Value::Float(0.5), Value::Float(2.0)]),
            );
            r.put("flag", Value::Union(1, Box::new(Value::Boolean(true))));
            r.put("value", Value::Long(9));
            r.put("blob", Value::Fixed(3, vec![1, 2, 3]));
        });
        let plan = WriterPlan::compile(writer).unwrap();
        let e = plan.decode(&bytes, Some(b"kafka-key"), Some(5)).unwrap();
        assert_eq!(e.key, "kafka-key");
        assert_eq!(e.ts_ms, 77);
        assert_eq!(e.features, vec![0.5, 2.0]);
        assert_eq!(e.value, Some(9.0));
        // Truncated and padded datums are refused.
        let short = plan.decode(&bytes[..bytes.len() - 1], None, Some(5));
        assert_eq!(short.unwrap_err().kind(), "invalid_avro");
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            plan.decode(&long, None, Some(5)).unwrap_err().kind(),
            "invalid_avro"
        );

        let bad = r#"{"type":"record","name":"R","fields":[{"name":"features","type":"string"}]}"#;
        let err = WriterPlan::compile(bad).unwrap_err();
        assert!(err.0.contains("field `features`"), "{err}");
        let not_record = WriterPlan::compile(r#""string""#).unwrap_err();
        assert!(not_record.0.contains("not a record"), "{not_record}");
    }

    #[test]
    fn encoded_events_decode_to_themselves() {
        let json = br#"{"key":"s-1","ts":1700000000123,"features":[0.25,-1e99],"value":3.5,"id":"e1","metadata":{"site":"A","n":2}}"#;
        let event = crate::event::decode(
            Some(json),
            None,
            None,
            &crate::event::Limits::bytes(1 << 20),
        )
        .unwrap();
        let plan = WriterPlan::compile(EVENT_SCHEMA).unwrap();
        let back = plan.decode(&encode_event(&event), None, None).unwrap();
        assert_eq!(back.key, event.key);
        assert_eq!(back.ts_ms, event.ts_ms);
        assert_eq!(back.features, event.features);
        assert_eq!(back.value, event.value);
        assert_eq!(back.id, event.id);
        assert_eq!(back.metadata.unwrap().get(), r#"{"n":"2","site":"A"}"#);
    }

    #[test]
    fn hostile_datums_and_schemas_are_refused_cheaply() {
        // A map claiming 2^29 entries in 18 bytes (apache-avro's decoder would reserve tens
        // of GiB for it).
        let cache = registry::SchemaCache::new(4);
        cache.insert_schema(1, EVENT_SCHEMA);
        let plan = cache.plan(1).unwrap();
        let datum = [0, 0, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff, 0x03, 0, 0];
        let err = plan.decode(&datum, None, Some(1)).unwrap_err();
        assert_eq!(err.kind(), "invalid_avro", "{err}");
        // Blocks of items that take no bytes: bounded by the datum's size in all, not per block.
        let writer = r#"{"type":"record","name":"R","fields":[
            {"name":"pad","type":{"type":"array","items":"null"}},{"name":"ts","type":"long"}]}"#;
        let plan = WriterPlan::compile(writer).unwrap();
        let mut datum = Vec::new();
        for _ in 0..2_000 {
            datum.extend_from_slice(&[0xd0, 0x0f]); // a block of 1000 nulls
        }
        datum.extend_from_slice(&[0, 2]);
        let err = plan.decode(&datum, None, Some(1)).unwrap_err();
        assert_eq!(err.kind(), "invalid_avro", "{err}");
        // Names apache-avro 0.20 panics on, fixed UUIDs, oversized schemas: incompatible.
        for bad in [
            r#"{"type":"record","name":"not valid!","fields":[{"name":"ts","type":"long"}]}"#,
            r#"{"type":"record","name":"E","aliases":["1bad"],"fields":[{"name":"ts","type":"long"}]}"#,
            r#"{"type":"record","name":"U","fields":[{"name":"id","type":{"type":"fixed","name":"X","size":16,"logicalType":"uuid"}}]}"#,
        ] {
            assert!(WriterPlan::compile(bad).is_err(), "{bad}");
        }
        let huge = format!(
            r#"{{"type":"record","name":"H","doc":"{}","fields":[]}}"#,
            "x".repeat(MAX_SCHEMA_BYTES)
        );
        assert!(WriterPlan::compile(&huge).unwrap_err().0.contains("bytes"));
        // Metadata of every kind reads as JSON through the bounded reader.
        let writer = r#"{"type":"record","name":"M","fields":[{"name":"ts","type":"long"},
            {"name":"metadata","type":{"type":"record","name":"Meta","fields":[
                {"name":"n","type":"int"},{"name":"tags","type":{"type":"array","items":"string"}},
                {"name":"on","type":"boolean"},{"name":"x","type":["null","double"]}]}}]}"#;
        let bytes = datum_of(writer, |r| {
            r.put("ts", Value::Long(5));
            r.put(
                "metadata",
                Value::Record(vec![
                    ("n".into(), Value::Int(-3)),
                    ("tags".into(), Value::Array(vec![Value::String("a".into())])),
                    ("on".into(), Value::Boolean(true)),
                    ("x".into(), Value::Union(1, Box::new(Value::Double(0.5)))),
                ]),
            );
        });
        let e = WriterPlan::compile(writer)
            .unwrap()
            .decode(&bytes, None, None)
            .unwrap();
        assert_eq!(
            e.metadata.unwrap().get(),
            r#"{"n":-3,"on":true,"tags":["a"],"x":0.5}"#
        );
    }

    #[test]
    fn every_accepted_writer_type_reads_as_it_should() {
        let plan = |fields: &str| {
            WriterPlan::compile(&format!(
                r#"{{"type":"record","name":"R","fields":[{fields}]}}"#
            ))
        };
        let ts = |field: &str, value: Value| {
            let writer = format!(
                r#"{{"type":"record","name":"R","fields":[{{"name":"ts","type":{field}}}]}}"#
            );
            let bytes = datum_of(&writer, |r| r.put("ts", value));
            WriterPlan::compile(&writer)
                .unwrap()
                .decode(&bytes, None, None)
                .unwrap()
                .ts_ms
        };
        assert_eq!(
            ts(
                r#"{"type":"long","logicalType":"timestamp-micros"}"#,
                Value::TimestampMicros(1_500_999)
            ),
            1_500
        );
        assert_eq!(
            ts(
                r#"{"type":"long","logicalType":"timestamp-micros"}"#,
                Value::TimestampMicros(-1)
            ),
            -1
        );
        assert_eq!(
            ts(
                r#"{"type":"long","logicalType":"timestamp-nanos"}"#,
                Value::TimestampNanos(2_000_000_000)
            ),
            2_000
        );
        assert_eq!(
            ts(
                r#""string""#,
                Value::String("2023-11-14T22:13:20.5Z".into())
            ),
            1_700_000_000_500
        );
        assert_eq!(ts(r#""double""#, Value::Double(12.9)), 12);
        let key = |field: &str, value: Value| {
            let writer = format!(
                r#"{{"type":"record","name":"R","fields":[{{"name":"key","type":{field}}},{{"name":"ts","type":"long"}}]}}"#
            );
            let bytes = datum_of(&writer, |r| {
                r.put("key", value);
                r.put("ts", Value::Long(1));
            });
            WriterPlan::compile(&writer)
                .unwrap()
                .decode(&bytes, None, None)
                .unwrap()
                .key
        };
        assert_eq!(key(r#""bytes""#, Value::Bytes(b"raw".to_vec())), "raw");
        assert_eq!(key(r#""int""#, Value::Int(-7)), "-7");
        assert_eq!(
            key(
                r#"{"type":"enum","name":"K","symbols":["a","b"]}"#,
                Value::Enum(1, "b".into())
            ),
            "b"
        );
        // A union branch that does not resolve makes the schema incompatible; both a name and an
        // alias present: the name wins, the alias field is skipped.
        assert!(plan(r#"{"name":"features","type":["null","string"]}"#).is_err());
        let both = plan(r#"{"name":"ts","type":"long"},{"name":"time","type":"string"}"#).unwrap();
        assert_eq!(both.decode(&[4, 2, b'x'], None, None).unwrap().ts_ms, 2);
        // Indexes that do not exist are invalid datums.
        let union =
            plan(r#"{"name":"key","type":["null","string"]},{"name":"ts","type":"long"}"#).unwrap();
        assert_eq!(
            union.decode(&[10, 2], None, Some(1)).unwrap_err().kind(),
            "invalid_avro"
        );
        let en = plan(r#"{"name":"key","type":{"type":"enum","name":"K","symbols":["a"]}},{"name":"ts","type":"long"}"#).unwrap();
        assert_eq!(
            en.decode(&[18, 2], None, Some(1)).unwrap_err().kind(),
            "invalid_avro"
        );
        // `auto` input that is neither.
        let auto = InputDecoder::Auto(Arc::new(registry::SchemaCache::new(1)));
        assert_eq!(
            auto.decode(b"x", None, None).unwrap_err().kind(),
            "unknown_format"
        );
        assert!(
            auto.decode(b" {}", None, None).unwrap().is_none(),
            "JSON goes to the JSON decoder"
        );
    }

    #[test]
    fn confluent_framing() {
        assert_eq!(
            split_confluent(&[0, 0, 0, 1, 7, 42]).unwrap(),
            (263, &[42][..])
        );
        assert_eq!(
            split_confluent(&[1, 0]).unwrap_err().kind(),
            "unknown_magic_byte"
        );
        assert_eq!(
            split_confluent(&[0, 0]).unwrap_err().kind(),
            "unknown_magic_byte"
        );
        assert_eq!(frame_confluent(263, &[42]), vec![0, 0, 0, 1, 7, 42]);
    }
}

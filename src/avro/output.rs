//! Avro outputs: one schema per output type (`schemas/*.avsc`), registered under the
//! TopicNameStrategy subject `<topic>-value`, each message in the Confluent wire format, so
//! Kafka Connect, ksqlDB or any Confluent deserializer reads them.

use apache_avro::schema::Schema;
use apache_avro::types::Value;

use crate::output::Output;

/// `(type name, schema text)` of every output type.
pub const OUTPUT_SCHEMAS: [(&str, &str); 5] = [
    (
        "window_aggregate",
        include_str!("../../schemas/window_aggregate.avsc"),
    ),
    (
        "cluster_update",
        include_str!("../../schemas/cluster_update.avsc"),
    ),
    ("outlier", include_str!("../../schemas/outlier.avsc")),
    (
        "drift_detection",
        include_str!("../../schemas/drift_detection.avsc"),
    ),
    (
        "algorithm_status",
        include_str!("../../schemas/algorithm_status.avsc"),
    ),
];

/// The parsed output schemas and the ids the registry gave them.
#[derive(Debug, Clone)]
pub struct OutputEncoder {
    /// Per output type (the order of [`OUTPUT_SCHEMAS`]): schema and registry id.
    schemas: Vec<(Schema, u32)>,
}

fn index(output: &Output) -> usize {
    match output {
        Output::WindowAggregate(_) => 0,
        Output::ClusterUpdate(_) => 1,
        Output::Outlier(_) => 2,
        Output::DriftDetection(_) => 3,
        Output::AlgorithmStatus(_) => 4,
    }
}

/// The parsed schema of every output type, in the order of [`OUTPUT_SCHEMAS`].
pub fn parsed_schemas() -> Vec<Schema> {
    OUTPUT_SCHEMAS
        .iter()
        .map(|(_, text)| {
            Schema::parse_str(text).expect("the output schemas in the repository parse")
        })
        .collect()
}

impl OutputEncoder {
    /// An encoder with the registry ids of the schemas (order of [`OUTPUT_SCHEMAS`]).
    pub fn new(ids: [u32; 5]) -> Self {
        Self {
            schemas: parsed_schemas().into_iter().zip(ids).collect(),
        }
    }

    /// One output as a Confluent-framed Avro message.
    pub fn encode(&self, output: &Output) -> Vec<u8> {
        let (schema, id) = &self.schemas[index(output)];
        let datum = apache_avro::to_avro_datum(schema, value(output))
            .expect("output values match their schemas (tests/avro.rs checks every kind)");
        super::frame_confluent(*id, &datum)
    }
}

fn opt(x: Option<f64>) -> Value {
    match x {
        Some(x) => Value::Union(1, Box::new(Value::Double(x))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn opt_text(x: Option<String>) -> Value {
    match x {
        Some(x) => Value::Union(1, Box::new(Value::String(x))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn doubles(xs: &[f64]) -> Value {
    Value::Array(xs.iter().map(|x| Value::Double(*x)).collect())
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// The Avro value of an output (field for field the JSON shape; metadata as JSON text).
fn value(output: &Output) -> Value {
    match output {
        Output::WindowAggregate(w) => record(vec![
            ("partition", Value::Int(w.partition)),
            (
                "window",
                Value::Enum(w.window as u32, w.window.as_str().to_string()),
            ),
            ("size_ms", Value::Long(w.size_ms as i64)),
            ("slide_ms", Value::Long(w.slide_ms as i64)),
            ("window_start", Value::TimestampMillis(w.window_start)),
            ("window_end", Value::TimestampMillis(w.window_end)),
            ("key", Value::String(w.key.clone())),
            ("count", Value::Long(w.count as i64)),
            ("sum", Value::Double(w.sum)),
            ("mean", opt(w.mean)),
            ("std", opt(w.std)),
            ("min", opt(w.min)),
            ("max", opt(w.max)),
            ("final", Value::Boolean(w.is_final)),
            ("revision", Value::Long(i64::from(w.revision))),
        ]),
        Output::ClusterUpdate(c) => record(vec![
            ("partition", Value::Int(c.partition)),
            ("cluster_id", Value::Long(c.cluster_id as i64)),
            ("event", Value::String(c.event.clone())),
            ("centroid", doubles(&c.centroid)),
            ("weight", Value::Double(c.weight)),
            ("radius", Value::Double(c.radius)),
            ("quality", Value::Double(c.quality)),
            ("drift_coefficient", Value::Double(c.drift_coefficient)),
            ("created_at", Value::TimestampMillis(c.created_at)),
            ("updated_at", Value::TimestampMillis(c.updated_at)),
        ]),
        Output::Outlier(o) => record(vec![
            ("partition", Value::Int(o.partition)),
            ("offset", Value::Long(o.offset)),
            ("id", opt_text(o.id.clone())),
            ("key", Value::String(o.key.clone())),
            ("ts", Value::TimestampMillis(o.ts)),
            ("features", doubles(&o.features)),
            ("outlier_score", Value::Double(o.outlier_score)),
            ("reason", Value::String(o.reason.clone())),
            (
                "metadata",
                opt_text(o.metadata.as_ref().map(|m| m.to_string())),
            ),
        ]),
        Output::DriftDetection(d) => record(vec![
            ("partition", Value::Int(d.partition)),
            ("severity", Value::String(d.severity.clone())),
            (
                "affected_clusters",
                Value::Array(
                    d.affected_clusters
                        .iter()
                        .map(|c| Value::Long(*c as i64))
                        .collect(),
                ),
            ),
            ("detector", Value::String(d.detector.clone())),
            ("statistic", Value::Double(d.statistic)),
            ("recommendation", Value::String(d.recommendation.clone())),
            ("detected_at", Value::TimestampMillis(d.detected_at)),
        ]),
        Output::AlgorithmStatus(s) => record(vec![
            ("partition", Value::Int(s.partition)),
            ("algorithm", Value::String(s.algorithm.clone())),
            ("active_clusters", Value::Long(s.active_clusters as i64)),
            ("clustering_quality", Value::Double(s.clustering_quality)),
            ("current_threshold", Value::Double(s.current_threshold)),
            ("drift_detected", Value::Boolean(s.drift_detected)),
            ("points_processed", Value::Long(s.points_processed as i64)),
            ("points_per_second", opt(s.points_per_second)),
        ]),
    }
}

/// A Confluent-framed Avro message as JSON (for `tail`): the writer schema from `schema_of`.
///
/// # Errors
/// A message when the framing, the schema or the datum is unusable.
pub fn to_json(payload: &[u8], schema_text: &str) -> Result<serde_json::Value, String> {
    let (_, mut datum) = super::split_confluent(payload).map_err(|e| e.to_string())?;
    let schema = super::parse_schema(schema_text)?;
    let value =
        apache_avro::from_avro_datum(&schema, &mut datum, None).map_err(|e| e.to_string())?;
    serde_json::Value::try_from(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_schema_parses() {
        assert_eq!(parsed_schemas().len(), 5);
    }
}

//! Input and output formats (`kafka.input_format`, `kafka.input_formats`,
//! `kafka.avro_writer_schema_file`, `kafka.output_format`) and the Schema Registry
//! (`[schema_registry]`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Secret;

/// How an input topic's messages are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    /// JSON events (the default).
    #[default]
    Json,
    /// Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro binary datum;
    /// writer schemas from the Schema Registry.
    Avro,
    /// Avro binary datums written with `kafka.avro_writer_schema_file`.
    AvroRaw,
    /// Magic byte 0: Confluent Avro; `{` or `[`: JSON.
    Auto,
}

impl InputFormat {
    /// Whether messages of this format need the Schema Registry.
    pub fn needs_registry(self) -> bool {
        matches!(self, InputFormat::Avro | InputFormat::Auto)
    }
}

/// How outputs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// JSON (the default).
    #[default]
    Json,
    /// Confluent wire format, schemas registered under `<topic>-value`.
    Avro,
}

/// The Confluent-compatible Schema Registry (`[schema_registry]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// Base URL, e.g. `http://registry:8081` (Apicurio: `http://host:8080/apis/ccompat/v7`).
    pub url: Option<Secret>,
    /// Basic-auth user.
    pub username: Option<String>,
    /// Basic-auth password (secret).
    pub password: Option<Secret>,
    /// A file holding the password; instead of `password`.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the registry's certificate; unset: the system's.
    pub ssl_ca_location: Option<PathBuf>,
    /// PEM file of this client's certificate (mutual TLS).
    pub ssl_certificate_location: Option<PathBuf>,
    /// PEM file (PKCS#8) of this client's key.
    pub ssl_key_location: Option<PathBuf>,
    /// Writer schemas kept compiled in memory (the oldest is dropped beyond this).
    pub cache_capacity: usize,
    /// Timeout of one request.
    pub request_timeout_ms: u64,
    /// Ceiling of the retry backoff while the registry does not answer.
    pub retry_max_backoff_ms: u64,
    /// Unset: a registry outage holds the partitions that need an uncached schema until it
    /// answers (nothing is dead-lettered for it). Set: after this long, such messages are
    /// dead-lettered as `registry_unavailable` until it answers again.
    pub max_outage_ms: Option<u64>,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            password_file: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            cache_capacity: 1_000,
            request_timeout_ms: 5_000,
            retry_max_backoff_ms: 5_000,
            max_outage_ms: None,
        }
    }
}

impl super::Config {
    /// The input format of `topic`.
    pub fn input_format(&self, topic: &str) -> InputFormat {
        let k = &self.kafka;
        k.input_formats
            .get(topic)
            .copied()
            .unwrap_or(k.input_format)
    }

    /// Whether any input or the outputs need the Schema Registry.
    pub fn needs_registry(&self) -> bool {
        self.kafka
            .input_topics
            .iter()
            .any(|t| self.input_format(t).needs_registry())
            || self.kafka.output_format == OutputFormat::Avro
    }

    pub(super) fn check_formats(&self, p: &mut Vec<String>) {
        let f = &self.kafka;
        for topic in f.input_formats.keys() {
            if !self.kafka.input_topics.contains(topic) {
                p.push(format!(
                    "kafka.input_formats names `{topic}`, which is not an input topic"
                ));
            }
        }
        let raw = self
            .kafka
            .input_topics
            .iter()
            .any(|t| self.input_format(t) == InputFormat::AvroRaw);
        match (&f.avro_writer_schema_file, raw) {
            (None, true) => {
                p.push("kafka.avro_writer_schema_file is required for avro-raw input".to_string())
            }
            (Some(path), _) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    if let Err(e) = crate::avro::WriterPlan::compile(&text) {
                        p.push(format!("kafka.avro_writer_schema_file: {e}"));
                    }
                }
                Err(e) => p.push(format!(
                    "kafka.avro_writer_schema_file: cannot read {}: {e}",
                    path.display()
                )),
            },
            (None, false) => {}
        }
        let r = &self.schema_registry;
        match &r.url {
            None if self.needs_registry() => p.push(
                "schema_registry.url is required for avro or auto input and avro output"
                    .to_string(),
            ),
            Some(url)
                if !(url.expose().starts_with("http://")
                    || url.expose().starts_with("https://")) =>
            {
                p.push("schema_registry.url must start with http:// or https://".to_string())
            }
            _ => {}
        }
        if r.password.is_some() && r.username.is_none() {
            p.push("schema_registry.password is set without schema_registry.username".into());
        }
        r.check_tls_files(p);
        if r.ssl_certificate_location.is_some() != r.ssl_key_location.is_some() {
            p.push(
                "schema_registry.ssl_certificate_location and ssl_key_location go together".into(),
            );
        }
        if r.cache_capacity == 0 {
            p.push("schema_registry.cache_capacity must be at least 1".into());
        }
        if r.request_timeout_ms == 0 || r.retry_max_backoff_ms == 0 {
            p.push(
                "schema_registry.request_timeout_ms and retry_max_backoff_ms must be positive"
                    .into(),
            );
        }
    }
}

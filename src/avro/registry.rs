//! A Confluent Schema Registry client (the REST endpoints `GET /schemas/ids/{id}` and
//! `POST /subjects/{subject}/versions`, which Confluent, Apicurio's `ccompat` API, Karapace and
//! Redpanda serve), with basic auth and TLS, and a bounded cache of compiled writer schemas.
//!
//! Lookups happen in the partition worker before a message is processed; the pure processor
//! then reads the cache without waiting. A registry that does not answer holds the partition
//! (retrying with backoff, like a PostgreSQL outage) unless `schema_registry.max_outage_ms` is
//! set, after which messages needing an uncached schema are dead-lettered as
//! `registry_unavailable` until it answers again. An id the registry does not know (after a few
//! retries, for a registry that lags behind a producer) is dead-lettered as `unknown_schema`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Incompatible, WriterPlan};
use crate::config::SchemaRegistryConfig;
use crate::event::DecodeError;

/// What the cache knows of one schema id.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A writer schema the event can be read with.
    Plan(Arc<WriterPlan>),
    /// A writer schema that cannot be read as an event, and why.
    Incompatible(String),
    /// The registry has no such id.
    Unknown,
    /// The registry did not answer for longer than `max_outage_ms`.
    Unavailable(String),
}

/// Negative answers are asked again after this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// An outage verdict holds this long before the registry is tried again.
const UNAVAILABLE_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<u32, (Lookup, Instant)>,
    /// Insertion order, for eviction.
    order: VecDeque<u32>,
}

/// Compiled writer schemas by id, at most `capacity` of them (the oldest evicted first).
#[derive(Debug)]
pub struct SchemaCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl SchemaCache {
    /// An empty cache holding at most `capacity` schemas.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .expect("schema cache lock is never poisoned: nothing panics holding it")
    }

    /// Whether `id` has a current answer.
    pub fn has(&self, id: u32) -> bool {
        let entries = self.lock();
        entries
            .map
            .get(&id)
            .is_some_and(|(lookup, at)| match lookup {
                Lookup::Plan(_) | Lookup::Incompatible(_) => true,
                Lookup::Unknown => at.elapsed() < NEGATIVE_TTL,
                Lookup::Unavailable(_) => at.elapsed() < UNAVAILABLE_TTL,
            })
    }

    /// Records the answer for `id`.
    pub fn insert(&self, id: u32, lookup: Lookup) {
        let mut entries = self.lock();
        if entries.map.insert(id, (lookup, Instant::now())).is_none() {
            entries.order.push_back(id);
            while entries.order.len() > self.capacity {
                if let Some(old) = entries.order.pop_front() {
                    entries.map.remove(&old);
                }
            }
        }
    }

    /// Compiles and records the writer schema `text` for `id`.
    pub fn insert_schema(&self, id: u32, text: &str) {
        let lookup = match WriterPlan::compile(text) {
            Ok(plan) => Lookup::Plan(Arc::new(plan)),
            Err(Incompatible(why)) => Lookup::Incompatible(why),
        };
        self.insert(id, lookup);
    }

    /// The plan for `id`, or the dead-letter reason.
    ///
    /// # Errors
    /// [`DecodeError::UnknownSchema`], [`DecodeError::SchemaIncompatible`] or
    /// [`DecodeError::RegistryUnavailable`].
    pub fn plan(&self, id: u32) -> Result<Arc<WriterPlan>, DecodeError> {
        match self.lock().map.get(&id).map(|(l, _)| l.clone()) {
            Some(Lookup::Plan(plan)) => Ok(plan),
            Some(Lookup::Incompatible(why)) => Err(DecodeError::SchemaIncompatible(format!(
                "writer schema {id}: {why}"
            ))),
            Some(Lookup::Unknown) => Err(DecodeError::UnknownSchema(id)),
            Some(Lookup::Unavailable(why)) => Err(DecodeError::RegistryUnavailable(format!(
                "schema {id}: {why}"
            ))),
            None => Err(DecodeError::RegistryUnavailable(format!(
                "schema {id} was not fetched"
            ))),
        }
    }

    /// Schemas held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a registry request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The registry answered that it has no such schema.
    NotFound,
    /// No answer, a timeout, or a server error: worth retrying.
    Unavailable(String),
    /// An answer no retry changes (a schema that is not Avro, an answer too large).
    Refused(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::NotFound => f.write_str("not found"),
            FetchError::Unavailable(why) | FetchError::Refused(why) => f.write_str(why),
        }
    }
}

/// The registry's HTTP client.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, crate::config::Secret)>,
}

#[derive(serde::Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
}

#[derive(serde::Deserialize)]
struct IdResponse {
    id: u32,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The largest registry answer read (a schema is far smaller; more is refused unread).
const MAX_RESPONSE_BYTES: usize = 4 << 20;

impl RegistryClient {
    /// A client for `config` (its URL, credentials, TLS files and timeout).
    ///
    /// # Errors
    /// A message when the URL is unset or a TLS file cannot be used.
    pub fn new(config: &SchemaRegistryConfig) -> Result<Self, String> {
        let url = config
            .url
            .as_ref()
            .map(crate::config::Secret::expose)
            .ok_or("schema_registry.url is not set")?;
        // Credentials in the URL become basic auth and leave the URL, which request errors
        // (and so logs) quote.
        let mut parsed =
            url::Url::parse(url).map_err(|e| format!("schema_registry.url does not parse: {e}"))?;
        let from_url = (!parsed.username().is_empty()).then(|| {
            let password = parsed.password().unwrap_or_default();
            (
                percent_decoded(parsed.username()),
                crate::config::Secret::new(percent_decoded(password)),
            )
        });
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let base = parsed.as_str().trim_end_matches('/').to_string();
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .connect_timeout(Duration::from_millis(config.request_timeout_ms));
        if let Some(ca) = &config.ssl_ca_location {
            let pem =
                std::fs::read(ca).map_err(|e| format!("schema_registry.ssl_ca_location: {e}"))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("schema_registry.ssl_ca_location: {e}"))?;
            builder = builder.add_root_certificate(cert);
        }
        if let (Some(cert), Some(key)) =
            (&config.ssl_certificate_location, &config.ssl_key_location)
        {
            let cert = std::fs::read(cert)
                .map_err(|e| format!("schema_registry.ssl_certificate_location: {e}"))?;
            let key =
                std::fs::read(key).map_err(|e| format!("schema_registry.ssl_key_location: {e}"))?;
            let identity = reqwest::Identity::from_pkcs8_pem(&cert, &key)
                .map_err(|e| format!("schema_registry client certificate: {e}"))?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| format!("schema registry client: {e}"))?;
        let auth = config
            .username
            .clone()
            .map(|u| (u, config.password.clone().unwrap_or_default()))
            .or(from_url);
        Ok(Self { http, base, auth })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        match &self.auth {
            Some((user, password)) => request.basic_auth(user, Some(password.expose())),
            None => request,
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, FetchError> {
        // NB: reqwest's errors name the URL, never the credentials (sent in a header).
        let response = request
            .send()
            .await
            .map_err(|e| FetchError::Unavailable(format!("schema registry: {}", causes(&e))))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(FetchError::NotFound);
        }
        // Anything but an answer is retried: server errors, throttling, refused credentials or
        // permissions (a configuration problem, not bad input: the data must not be
        // dead-lettered for it), a proxy's error page.
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let reason: String = body.chars().take(300).collect();
            return Err(FetchError::Unavailable(format!(
                "schema registry answered {status}: {reason}"
            )));
        }
        let mut response = response;
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(FetchError::Refused(format!(
                            "the schema registry's answer is larger than {MAX_RESPONSE_BYTES} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(FetchError::Unavailable(format!(
                        "schema registry: {}",
                        causes(&e)
                    )))
                }
            }
        }
        // NB: a 200 that is not the registry's JSON (a proxy's page) is retried, not trusted.
        serde_json::from_slice(&body).map_err(|e| {
            FetchError::Unavailable(format!("schema registry answered 200 with no schema: {e}"))
        })
    }

    /// The writer schema registered under `id`.
    ///
    /// # Errors
    /// [`FetchError`].
    pub async fn schema(&self, id: u32) -> Result<String, FetchError> {
        let response: SchemaResponse = self
            .send(self.request(reqwest::Method::GET, &format!("/schemas/ids/{id}")))
            .await?;
        match response.schema_type.as_deref() {
            None | Some("AVRO") => Ok(response.schema),
            Some(other) => Err(FetchError::Refused(format!(
                "schema {id} is a {other} schema, not Avro"
            ))),
        }
    }

    /// Registers `schema` (Avro JSON) under `subject`; returns its id (the existing one when
    /// the same schema is registered already).
    ///
    /// # Errors
    /// [`FetchError`] (an incompatible schema: the registry's status and the start of its
    /// answer, which says why).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, FetchError> {
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
        let request = self
            .request(
                reqwest::Method::POST,
                &format!("/subjects/{subject}/versions"),
            )
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.to_string());
        let response: IdResponse = self.send(request).await?;
        Ok(response.id)
    }
}

/// An error and its sources on one line (reqwest's own text says only "error sending request";
/// the reason, a refused connection or a certificate that did not verify, is in its sources).
fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// `%XX` escapes of a URL's userinfo decoded (a `+` stays a `+`).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The registry as the workers use it: client, shared cache and outage bookkeeping.
#[derive(Debug)]
pub struct Registry {
    client: RegistryClient,
    cache: Arc<SchemaCache>,
    retry_max_backoff: Duration,
    max_outage: Option<Duration>,
    /// Since when the registry has not answered (shared by every partition).
    outage_since: Mutex<Option<Instant>>,
}

/// A lookup was abandoned because the worker was asked to stop.
#[derive(Debug)]
pub struct Stopped;

impl Registry {
    /// The registry of `config`.
    ///
    /// # Errors
    /// See [`RegistryClient::new`].
    pub fn new(config: &SchemaRegistryConfig) -> Result<Self, String> {
        Ok(Self {
            client: RegistryClient::new(config)?,
            cache: Arc::new(SchemaCache::new(config.cache_capacity)),
            retry_max_backoff: Duration::from_millis(config.retry_max_backoff_ms),
            max_outage: config.max_outage_ms.map(Duration::from_millis),
            outage_since: Mutex::new(None),
        })
    }

    /// The shared cache the processors read.
    pub fn cache(&self) -> Arc<SchemaCache> {
        self.cache.clone()
    }

    /// Whether the cache answers for `id` already (no request needed).
    pub fn has(&self, id: u32) -> bool {
        self.cache.has(id)
    }

    /// The HTTP client (registering output schemas, `produce`, `tail`).
    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.outage_since
            .lock()
            .expect("outage lock is never poisoned: nothing panics holding it")
    }

    /// Makes sure the cache answers for `id`: fetches it, retrying a registry that does not
    /// answer (for ever, or up to `max_outage_ms`), and an unknown id three times. `waiting`
    /// is told what is being retried (for `/health`), and `None` when done.
    ///
    /// # Errors
    /// [`Stopped`] when `stop` is cancelled meanwhile (the message stays unprocessed).
    pub async fn ensure(
        &self,
        id: u32,
        stop: &CancellationToken,
        mut waiting: impl FnMut(Option<String>),
    ) -> Result<(), Stopped> {
        if self.cache.has(id) {
            return Ok(());
        }
        let mut delay = Duration::from_millis(100);
        let mut not_found = 0;
        let result = loop {
            match self.client.schema(id).await {
                Ok(text) => {
                    *self.outage() = None;
                    self.cache.insert_schema(id, &text);
                    break Ok(());
                }
                Err(FetchError::NotFound) if not_found < 3 => not_found += 1,
                Err(FetchError::NotFound) => {
                    *self.outage() = None;
                    self.cache.insert(id, Lookup::Unknown);
                    break Ok(());
                }
                Err(FetchError::Refused(why)) => {
                    *self.outage() = None;
                    self.cache.insert(id, Lookup::Incompatible(why));
                    break Ok(());
                }
                Err(FetchError::Unavailable(why)) => {
                    let since = *self.outage().get_or_insert_with(Instant::now);
                    if self
                        .max_outage
                        .is_some_and(|bound| since.elapsed() >= bound)
                    {
                        self.cache.insert(id, Lookup::Unavailable(why));
                        break Ok(());
                    }
                    tracing::warn!(schema_id = id, error = %why, "schema registry unavailable; retrying (this partition waits)");
                    waiting(Some(format!("fetching schema {id}: {why}")));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    // An outage clock left running would cut the next one short.
                    *self.outage() = None;
                    break Err(Stopped);
                }
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.retry_max_backoff);
        };
        waiting(None);
        result
    }
}

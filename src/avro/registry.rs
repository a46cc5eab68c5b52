//! A Confluent Schema Registry client (the REST endpoints `GET /schemas/ids/{id}` and
//! `POST /subjects/{subject}/versions`, which Confluent, Apicurio's `ccompat` API, Karapace and
//! Redpanda serve), with basic auth and TLS, and a bounded cache of compiled writer schemas.
//!
//! Lookups happen in the partition worker before a message is processed; the pure processor
//! then reads the cache without waiting. A registry that does not answer holds the partition
//! (retrying with backoff, like a PostgreSQL outage) unless `schema_registry.max_outage_ms` is
//! set, after which messages needing an uncached schema are dead-lettered as
//! `registry_unavailable` until it answers again. An id the registry does not know (after a few
//! retries, for a registry that lags behind a producer) is dead-lettered as `unknown_schema`;
//! for a while after such a verdict, further unknown ids are judged at the first answer, so
//! made-up ids cannot each hold a partition through the retries.

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

/// An id the registry still did not know after retries is asked again after this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// An outage verdict, or an unknown id judged without retries, holds this long before the
/// registry is asked again.
const BRIEF_TTL: Duration = Duration::from_secs(1);
/// After an id was judged unknown (its retries spent), further unknown ids are judged at their
/// first answer for this long: made-up schema ids cannot each hold a partition for the retries.
const NOT_FOUND_QUIET: Duration = Duration::from_secs(10);

impl Lookup {
    /// An answer about no schema (an unknown id, an outage).
    fn is_negative(&self) -> bool {
        matches!(self, Lookup::Unknown | Lookup::Unavailable(_))
    }
}

#[derive(Debug, Default)]
struct Entries {
    /// Answer, when it was recorded, and how long a negative answer holds.
    map: HashMap<u32, (Lookup, Instant, Duration)>,
    /// Insertion order of the ids with a writer schema, for eviction.
    order: VecDeque<u32>,
    /// Insertion order of the negative answers, evicted among themselves: a flood of made-up
    /// ids never pushes out the schema real producers use.
    negative: VecDeque<u32>,
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
            .is_some_and(|(lookup, at, ttl)| !lookup.is_negative() || at.elapsed() < *ttl)
    }

    /// Records the answer for `id` (a negative one holds for [`NEGATIVE_TTL`] when it is an
    /// unknown id, [`BRIEF_TTL`] for an outage).
    pub fn insert(&self, id: u32, lookup: Lookup) {
        let ttl = match lookup {
            Lookup::Unknown => NEGATIVE_TTL,
            _ => BRIEF_TTL,
        };
        self.insert_for(id, lookup, ttl);
    }

    /// Records the answer for `id`; a negative one holds for `ttl`.
    fn insert_for(&self, id: u32, lookup: Lookup, ttl: Duration) {
        let mut guard = self.lock();
        let entries = &mut *guard;
        let negative = lookup.is_negative();
        let before = entries.map.insert(id, (lookup, Instant::now(), ttl));
        let was_negative = before.map(|(l, _, _)| l.is_negative());
        if was_negative == Some(negative) {
            return;
        }
        if let Some(was) = was_negative {
            let queue = if was {
                &mut entries.negative
            } else {
                &mut entries.order
            };
            queue.retain(|&q| q != id);
        }
        let queue = if negative {
            &mut entries.negative
        } else {
            &mut entries.order
        };
        queue.push_back(id);
        while queue.len() > self.capacity {
            if let Some(old) = queue.pop_front() {
                entries.map.remove(&old);
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
        match self.lock().map.get(&id).map(|(l, _, _)| l.clone()) {
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
    /// Until when an unknown id is judged at its first answer (see [`NOT_FOUND_QUIET`]).
    not_found_quiet_until: Mutex<Option<Instant>>,
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
            not_found_quiet_until: Mutex::new(None),
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

    /// Whether a 404 is judged at once: an id was judged unknown after its retries less than
    /// [`NOT_FOUND_QUIET`] ago.
    fn not_found_is_final(&self) -> bool {
        self.not_found_quiet_until
            .lock()
            .expect("quiet lock is never poisoned: nothing panics holding it")
            .is_some_and(|until| Instant::now() < until)
    }

    /// Asks the registry for `id` once, without waiting: true when the cache now answers for it
    /// (a schema, a refusal, or an unknown id while unknown ids are judged at once); false when
    /// the answer needs retries ([`Self::ensure`]: an outage, or an id the registry may not know
    /// yet).
    pub async fn try_fetch(&self, id: u32) -> bool {
        if self.cache.has(id) {
            return true;
        }
        match self.client.schema(id).await {
            Ok(text) => {
                *self.outage() = None;
                self.cache.insert_schema(id, &text);
                true
            }
            Err(FetchError::Refused(why)) => {
                *self.outage() = None;
                self.cache.insert(id, Lookup::Incompatible(why));
                true
            }
            Err(FetchError::NotFound) if self.not_found_is_final() => {
                self.cache.insert_for(id, Lookup::Unknown, BRIEF_TTL);
                true
            }
            Err(FetchError::NotFound | FetchError::Unavailable(_)) => false,
        }
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
                Err(FetchError::NotFound) if self.not_found_is_final() => {
                    *self.outage() = None;
                    self.cache.insert_for(id, Lookup::Unknown, BRIEF_TTL);
                    break Ok(());
                }
                Err(FetchError::NotFound) if not_found < 3 => not_found += 1,
                Err(FetchError::NotFound) => {
                    *self.outage() = None;
                    *self
                        .not_found_quiet_until
                        .lock()
                        .expect("quiet lock is never poisoned: nothing panics holding it") =
                        Some(Instant::now() + NOT_FOUND_QUIET);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const SCHEMA: &str = r#"{"type":"record","name":"E","fields":[{"name":"ts","type":"long"}]}"#;

    /// A registry that knows schema 7 only; counts the requests it answers.
    async fn stub_registry() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&request[..end]).to_string();
                            request.drain(..end + 4);
                            count.fetch_add(1, Ordering::SeqCst);
                            let known = head.starts_with("GET /schemas/ids/7 ");
                            let (status, body) = if known {
                                (
                                    "200 OK",
                                    serde_json::json!({ "schema": SCHEMA }).to_string(),
                                )
                            } else {
                                ("404 Not Found", r#"{"error_code":40403}"#.to_string())
                            };
                            let response = format!(
                                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if socket.write_all(response.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, served)
    }

    #[test]
    fn made_up_ids_never_evict_a_real_schema() {
        let cache = SchemaCache::new(4);
        cache.insert_schema(7, SCHEMA);
        for id in 1_000..2_000 {
            cache.insert(id, Lookup::Unknown);
        }
        assert!(cache.has(7));
        assert!(!matches!(cache.lock().map[&7].0, Lookup::Unknown));
        assert_eq!(cache.len(), 5, "4 negative answers and the schema");
        // An id whose answer changes class moves to the other queue.
        cache.insert_schema(1_999, SCHEMA);
        for id in 3_000..3_010 {
            cache.insert(id, Lookup::Unknown);
        }
        assert!(cache.has(7) && cache.has(1_999));
    }

    #[tokio::test]
    async fn made_up_ids_cost_one_request_each_after_the_first_is_judged() {
        let (url, served) = stub_registry().await;
        let config = SchemaRegistryConfig {
            url: Some(url.into()),
            ..SchemaRegistryConfig::default()
        };
        let registry = Registry::new(&config).unwrap();
        let stop = CancellationToken::new();
        let mut waited = 0;
        for id in 100..120 {
            if !registry.try_fetch(id).await {
                waited += 1;
                registry.ensure(id, &stop, |_| {}).await.unwrap();
            }
            assert!(registry.has(id));
            assert!(matches!(
                registry.cache.plan(id),
                Err(DecodeError::UnknownSchema(_))
            ));
        }
        // The first unknown id is retried (a registry may lag behind a producer): one request,
        // then four in `ensure`; the next 19 are judged at their first answer, no wait.
        assert_eq!(waited, 1);
        assert_eq!(served.load(Ordering::SeqCst), 5 + 19);
        // The schema producers use is still fetched and served.
        assert!(registry.try_fetch(7).await);
        assert!(registry.cache.plan(7).is_ok());
    }
}

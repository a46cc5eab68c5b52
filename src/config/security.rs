//! Security settings: Kafka TLS and SASL (`kafka.security`), PostgreSQL TLS (`postgres.ssl_*`),
//! and secrets, which come inline, from the environment or from files (`*_file` keys, as
//! Kubernetes and Docker mount them) and are never shown by `Debug` or `neurostream config`.
//!
//! Everything here is checked before anything connects: protocols and mechanisms by name, SASL
//! credentials by presence, and every certificate, key and CA by parsing it with OpenSSL (the
//! library librdkafka and sqlx use here too), so a wrong file is a start-up error naming the key,
//! not a TLS handshake failure later.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A secret value. It serialises as itself (the configuration layers need the value), but
/// `Debug` never shows it, so a logged or panicking configuration leaks nothing.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

/// `kafka.security.protocol`; written in either case (`SASL_SSL` or `sasl_ssl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KafkaProtocol {
    /// No TLS, no authentication (librdkafka's default).
    Plaintext,
    /// TLS: the broker's certificate is verified; a client certificate is optional (mTLS).
    Ssl,
    /// SASL authentication without TLS (credentials in clear unless the mechanism hides them).
    SaslPlaintext,
    /// SASL authentication over TLS: what managed Kafka services expect.
    SaslSsl,
}

impl KafkaProtocol {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

impl TryFrom<String> for KafkaProtocol {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.to_ascii_lowercase().replace('-', "_").as_str() {
            "plaintext" => Ok(Self::Plaintext),
            "ssl" => Ok(Self::Ssl),
            "sasl_plaintext" => Ok(Self::SaslPlaintext),
            "sasl_ssl" => Ok(Self::SaslSsl),
            _ => Err(format!(
                "unknown security protocol `{value}` (expected plaintext, ssl, sasl_plaintext or sasl_ssl)"
            )),
        }
    }
}

impl From<KafkaProtocol> for String {
    fn from(value: KafkaProtocol) -> Self {
        value.as_str().to_string()
    }
}

/// `kafka.security.sasl_mechanism`; written in either case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SaslMechanism {
    /// User and password sent to the broker (use it over TLS only).
    Plain,
    /// Salted challenge-response, SHA-256.
    ScramSha256,
    /// Salted challenge-response, SHA-512.
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's (and Kafka's) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl TryFrom<String> for SaslMechanism {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            _ => Err(format!(
                "unknown SASL mechanism `{value}` (expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; \
                 GSSAPI and OAUTHBEARER are not built in)"
            )),
        }
    }
}

impl From<SaslMechanism> for String {
    fn from(value: SaslMechanism) -> Self {
        value.as_str().to_string()
    }
}

/// The `[kafka.security]` key standing for librdkafka property `key`, if any.
pub(super) fn typed_equivalent(key: &str) -> Option<&'static str> {
    Some(match key {
        "security.protocol" => "protocol",
        "sasl.mechanism" | "sasl.mechanisms" => "sasl_mechanism",
        "sasl.username" => "sasl_username",
        "sasl.password" => "sasl_password",
        "ssl.ca.location" => "ssl_ca_location",
        "ssl.ca.pem" => "ssl_ca_pem",
        "ssl.certificate.location" => "ssl_certificate_location",
        "ssl.certificate.pem" => "ssl_certificate_pem",
        "ssl.key.location" => "ssl_key_location",
        "ssl.key.pem" => "ssl_key_pem",
        "ssl.key.password" => "ssl_key_password",
        "ssl.endpoint.identification.algorithm" => "ssl_endpoint_identification",
        _ => return None,
    })
}

/// Kafka security (`[kafka.security]`). Every client the binary creates (the service's consumer
/// and producer, topic administration, `produce`, `tail`) uses these settings; raw librdkafka
/// entries in `kafka.consumer` / `kafka.producer` still win over them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`; unset: plaintext.
    pub protocol: Option<KafkaProtocol>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (required with a SASL protocol).
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user.
    pub sasl_username: Option<String>,
    /// SASL password (secret).
    pub sasl_password: Option<Secret>,
    /// A file holding the SASL password (a mounted secret); instead of `sasl_password`.
    pub sasl_password_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) that signed the brokers' certificates; unset: the
    /// system's trust store (enough for managed services with public certificates).
    pub ssl_ca_location: Option<PathBuf>,
    /// The same CA certificate(s) inline, as PEM text.
    pub ssl_ca_pem: Option<String>,
    /// PEM file of this client's certificate (mutual TLS).
    pub ssl_certificate_location: Option<PathBuf>,
    /// This client's certificate inline, as PEM text.
    pub ssl_certificate_pem: Option<String>,
    /// PEM file of this client's private key (mutual TLS).
    pub ssl_key_location: Option<PathBuf>,
    /// This client's private key inline, as PEM text (secret).
    pub ssl_key_pem: Option<Secret>,
    /// Passphrase of an encrypted private key (secret).
    pub ssl_key_password: Option<Secret>,
    /// A file holding the private key's passphrase; instead of `ssl_key_password`.
    pub ssl_key_password_file: Option<PathBuf>,
    /// Check that the broker's certificate names the host connected to (default true; turn off
    /// only for brokers whose certificates lack their addresses).
    pub ssl_endpoint_identification: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_location: None,
            ssl_ca_pem: None,
            ssl_certificate_location: None,
            ssl_certificate_pem: None,
            ssl_key_location: None,
            ssl_key_pem: None,
            ssl_key_password: None,
            ssl_key_password_file: None,
            ssl_endpoint_identification: true,
        }
    }
}

impl SecurityConfig {
    /// The librdkafka properties these settings stand for.
    pub fn client_properties(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let protocol = self.protocol.unwrap_or(KafkaProtocol::Plaintext);
        if let Some(p) = self.protocol {
            out.push(("security.protocol", p.as_str().to_string()));
        }
        if protocol.uses_sasl() {
            if let Some(m) = self.sasl_mechanism {
                out.push(("sasl.mechanism", m.as_str().to_string()));
            }
            if let Some(u) = &self.sasl_username {
                out.push(("sasl.username", u.clone()));
            }
            if let Some(p) = &self.sasl_password {
                out.push(("sasl.password", p.expose().to_string()));
            }
        }
        if protocol.uses_tls() {
            let paths = [
                ("ssl.ca.location", &self.ssl_ca_location),
                ("ssl.certificate.location", &self.ssl_certificate_location),
                ("ssl.key.location", &self.ssl_key_location),
            ];
            for (key, path) in paths {
                if let Some(p) = path {
                    out.push((key, p.display().to_string()));
                }
            }
            if let Some(pem) = &self.ssl_ca_pem {
                out.push(("ssl.ca.pem", pem.clone()));
            }
            if let Some(pem) = &self.ssl_certificate_pem {
                out.push(("ssl.certificate.pem", pem.clone()));
            }
            if let Some(pem) = &self.ssl_key_pem {
                out.push(("ssl.key.pem", pem.expose().to_string()));
            }
            if let Some(p) = &self.ssl_key_password {
                out.push(("ssl.key.password", p.expose().to_string()));
            }
            let identification = if self.ssl_endpoint_identification {
                "https"
            } else {
                "none"
            };
            out.push((
                "ssl.endpoint.identification.algorithm",
                identification.into(),
            ));
        }
        out
    }

    /// Reads the `*_file` secrets into their values.
    pub(super) fn read_secret_files(&mut self, problems: &mut Vec<String>) {
        read_secret(
            &mut self.sasl_password,
            &self.sasl_password_file,
            "kafka.security.sasl_password",
            problems,
        );
        read_secret(
            &mut self.ssl_key_password,
            &self.ssl_key_password_file,
            "kafka.security.ssl_key_password",
            problems,
        );
    }

    /// Every problem with these settings, without connecting.
    pub(super) fn check(&self, p: &mut Vec<String>) {
        let at = "kafka.security";
        let protocol = self.protocol.unwrap_or(KafkaProtocol::Plaintext);
        if protocol.uses_sasl() {
            if self.sasl_mechanism.is_none() {
                p.push(format!(
                    "{at}.sasl_mechanism is required with protocol {} (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                    protocol.as_str()
                ));
            }
            if self.sasl_username.as_deref().is_none_or(|u| u.is_empty()) {
                p.push(format!(
                    "{at}.sasl_username is required with protocol {}",
                    protocol.as_str()
                ));
            }
            if self.sasl_password.is_none() && self.sasl_password_file.is_none() {
                p.push(format!(
                    "{at}.sasl_password (or sasl_password_file) is required with protocol {}",
                    protocol.as_str()
                ));
            }
        } else {
            let set = [
                ("sasl_mechanism", self.sasl_mechanism.is_some()),
                ("sasl_username", self.sasl_username.is_some()),
                ("sasl_password", self.sasl_password.is_some()),
                ("sasl_password_file", self.sasl_password_file.is_some()),
            ];
            for (key, _) in set.iter().filter(|(_, is_set)| *is_set) {
                p.push(format!(
                    "{at}.{key} only applies with protocol sasl_plaintext or sasl_ssl ({at}.protocol is {})",
                    protocol.as_str()
                ));
            }
        }
        let tls_set = [
            ("ssl_ca_location", self.ssl_ca_location.is_some()),
            ("ssl_ca_pem", self.ssl_ca_pem.is_some()),
            (
                "ssl_certificate_location",
                self.ssl_certificate_location.is_some(),
            ),
            ("ssl_certificate_pem", self.ssl_certificate_pem.is_some()),
            ("ssl_key_location", self.ssl_key_location.is_some()),
            ("ssl_key_pem", self.ssl_key_pem.is_some()),
            ("ssl_key_password", self.ssl_key_password.is_some()),
            (
                "ssl_key_password_file",
                self.ssl_key_password_file.is_some(),
            ),
        ];
        if !protocol.uses_tls() {
            for (key, _) in tls_set.iter().filter(|(_, is_set)| *is_set) {
                p.push(format!(
                    "{at}.{key} only applies with protocol ssl or sasl_ssl ({at}.protocol is {})",
                    protocol.as_str()
                ));
            }
            return;
        }
        let ca = pem_source(
            p,
            (&format!("{at}.ssl_ca_location"), &self.ssl_ca_location),
            (
                &format!("{at}.ssl_ca_pem"),
                self.ssl_ca_pem.as_deref().map(str::as_bytes),
            ),
        );
        if let Some((name, pem)) = ca {
            let _ = certificates(p, &name, &pem);
        }
        let cert = pem_source(
            p,
            (
                &format!("{at}.ssl_certificate_location"),
                &self.ssl_certificate_location,
            ),
            (
                &format!("{at}.ssl_certificate_pem"),
                self.ssl_certificate_pem.as_deref().map(str::as_bytes),
            ),
        );
        let key = pem_source(
            p,
            (&format!("{at}.ssl_key_location"), &self.ssl_key_location),
            (
                &format!("{at}.ssl_key_pem"),
                self.ssl_key_pem.as_ref().map(|k| k.expose().as_bytes()),
            ),
        );
        let password = self.ssl_key_password.as_ref().map(Secret::expose);
        client_identity(p, at, cert, key, password, "ssl_certificate", "ssl_key");
    }
}

/// `postgres.ssl_mode`: libpq's `sslmode` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PgSslMode {
    /// Never TLS.
    Disable,
    /// TLS only if the server insists.
    Allow,
    /// TLS when the server offers it, unverified (sqlx's and libpq's default).
    Prefer,
    /// TLS always, the server's certificate not verified.
    Require,
    /// TLS always, the server's certificate verified against the root certificate.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host connected to.
    VerifyFull,
}

impl PgSslMode {
    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn to_sqlx(self) -> sqlx::postgres::PgSslMode {
        use sqlx::postgres::PgSslMode as M;
        match self {
            Self::Disable => M::Disable,
            Self::Allow => M::Allow,
            Self::Prefer => M::Prefer,
            Self::Require => M::Require,
            Self::VerifyCa => M::VerifyCa,
            Self::VerifyFull => M::VerifyFull,
        }
    }
}

impl TryFrom<String> for PgSslMode {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.to_ascii_lowercase().replace('_', "-").as_str() {
            "disable" => Ok(Self::Disable),
            "allow" => Ok(Self::Allow),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            _ => Err(format!(
                "unknown sslmode `{value}` (expected disable, allow, prefer, require, verify-ca or verify-full)"
            )),
        }
    }
}

impl From<PgSslMode> for String {
    fn from(value: PgSslMode) -> Self {
        value.as_str().to_string()
    }
}

impl super::SchemaRegistryConfig {
    /// Checks the registry's TLS files as the Kafka and PostgreSQL ones are checked: readable,
    /// PEM, the client key PKCS#8 and belonging to its certificate.
    pub(super) fn check_tls_files(&self, p: &mut Vec<String>) {
        if let Some(ca) = &self.ssl_ca_location {
            if let Some(pem) = read_file(p, "schema_registry.ssl_ca_location", ca) {
                let _ = certificates(p, "schema_registry.ssl_ca_location", &pem);
            }
        }
        let read = |p: &mut Vec<String>, name: &str, path: &Option<PathBuf>| {
            let path = path.as_ref()?;
            read_file(p, name, path).map(|pem| (name.to_string(), pem))
        };
        let cert = read(
            p,
            "schema_registry.ssl_certificate_location",
            &self.ssl_certificate_location,
        );
        let key = read(
            p,
            "schema_registry.ssl_key_location",
            &self.ssl_key_location,
        );
        if let Some((name, pem)) = &key {
            if !String::from_utf8_lossy(pem).contains("-----BEGIN PRIVATE KEY-----") {
                p.push(format!(
                    "{name} must be an unencrypted PKCS#8 PEM key (BEGIN PRIVATE KEY)"
                ));
            }
        }
        if cert.is_some() && key.is_some() {
            client_identity(
                p,
                "schema_registry",
                cert,
                key,
                None,
                "ssl_certificate",
                "ssl_key",
            );
        }
    }

    /// Reads `password_file` into `password`.
    pub(super) fn read_secret_files(&mut self, problems: &mut Vec<String>) {
        read_secret(
            &mut self.password,
            &self.password_file,
            "schema_registry.password",
            problems,
        );
    }
}

impl super::PostgresConfig {
    /// Reads `url_file` and `password_file` into their values.
    pub(super) fn read_secret_files(&mut self, problems: &mut Vec<String>) {
        read_secret(&mut self.url, &self.url_file, "postgres.url", problems);
        read_secret(
            &mut self.password,
            &self.password_file,
            "postgres.password",
            problems,
        );
    }

    /// Every problem with the connection settings, without connecting.
    pub(super) fn check(&self, p: &mut Vec<String>) {
        let tls = match self.tls() {
            Ok(tls) => tls,
            Err(err) => {
                p.push(err);
                return;
            }
        };
        if let Some((name, root)) = &tls.root_cert {
            if let Some(pem) = read_file(p, name, root) {
                if let Some(count) = certificates(p, name, &pem) {
                    // NB: sqlx (native-tls) trusts only the first certificate of the file.
                    if count > 1 {
                        p.push(format!(
                            "{name} holds {count} certificates, but only the first would be \
                             trusted: give the one CA certificate that signed the server's"
                        ));
                    }
                }
            }
        }
        let cert = tls
            .client_cert
            .as_ref()
            .and_then(|(name, path)| read_file(p, name, path).map(|pem| (name.clone(), pem)));
        let key = tls
            .client_key
            .as_ref()
            .and_then(|(name, path)| read_file(p, name, path).map(|pem| (name.clone(), pem)));
        if let Some((name, pem)) = &key {
            if !String::from_utf8_lossy(pem).contains("-----BEGIN PRIVATE KEY-----") {
                p.push(format!(
                    "{name} must be an unencrypted PKCS#8 PEM key (BEGIN PRIVATE KEY); convert \
                     it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
                ));
            }
        }
        client_identity(p, "postgres", cert, key, None, "ssl_cert", "ssl_key");
        if tls.root_cert.is_some()
            && matches!(
                tls.mode,
                Some(PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer)
            )
        {
            p.push(format!(
                "postgres.ssl_root_cert is set but sslmode {} does not verify the server \
                 (use verify-full, verify-ca, or require)",
                tls.mode.map(PgSslMode::as_str).unwrap_or_default()
            ));
        }
        if tls.mode == Some(PgSslMode::Disable) && tls.client_cert.is_some() {
            p.push("postgres.ssl_cert is set but sslmode is disable".into());
        }
    }

    /// The TLS settings in effect: each typed key, else the URL's parameter of the same meaning.
    ///
    /// # Errors
    /// When the URL does not parse, or names a parameter sqlx does not know (which sqlx would
    /// log with its value: it might be a secret).
    fn tls(&self) -> Result<PgTls, String> {
        let mut tls = PgTls {
            mode: self.ssl_mode,
            root_cert: self
                .ssl_root_cert
                .clone()
                .map(|p| ("postgres.ssl_root_cert".to_string(), p)),
            client_cert: self
                .ssl_cert
                .clone()
                .map(|p| ("postgres.ssl_cert".to_string(), p)),
            client_key: self
                .ssl_key
                .clone()
                .map(|p| ("postgres.ssl_key".to_string(), p)),
        };
        let Some(url) = &self.url else {
            return Ok(tls);
        };
        let text = url.expose();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err("postgres.url must start with postgres:// or postgresql://".into());
        }
        let parsed = url::Url::parse(text)
            .map_err(|e| format!("postgres.url does not parse: {}", without(e, url)))?;
        for (key, value) in parsed.query_pairs() {
            let from_url = |what: &str| (format!("postgres.url's {what}"), PathBuf::from(&*value));
            match key.as_ref() {
                "sslmode" | "ssl-mode" => {
                    let mode = PgSslMode::try_from(value.to_string())
                        .map_err(|e| format!("postgres.url: {e}"))?;
                    tls.mode = tls.mode.or(Some(mode));
                }
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                    tls.root_cert = tls.root_cert.take().or(Some(from_url("sslrootcert")))
                }
                "sslcert" | "ssl-cert" => {
                    tls.client_cert = tls.client_cert.take().or(Some(from_url("sslcert")))
                }
                "sslkey" | "ssl-key" => {
                    tls.client_key = tls.client_key.take().or(Some(from_url("sslkey")))
                }
                "statement-cache-capacity"
                | "host"
                | "hostaddr"
                | "port"
                | "dbname"
                | "user"
                | "password"
                | "application_name"
                | "options" => {}
                k if k.starts_with("options[") => {}
                other => {
                    return Err(format!(
                        "postgres.url: unknown parameter `{other}` (known: sslmode, sslrootcert, \
                         sslcert, sslkey, host, hostaddr, port, dbname, user, password, \
                         application_name, options, statement-cache-capacity)"
                    ))
                }
            }
        }
        Ok(tls)
    }

    /// The sqlx connection options: the URL (its own `sslmode`, `sslrootcert`, `sslcert` and
    /// `sslkey` parameters included), then the typed settings over it. A root certificate
    /// without a mode means `verify-full`, and with `require` means `verify-ca` (as libpq does).
    ///
    /// # Errors
    /// A message naming the problem (never the URL: it holds the password) when the URL is unset
    /// or does not parse.
    pub fn connect_options(&self) -> Result<sqlx::postgres::PgConnectOptions, String> {
        use std::str::FromStr as _;
        let url = self.url.as_ref().ok_or_else(|| {
            "postgres.url is not set (config file [postgres] url = …, postgres.url_file, or NEUROSTREAM__POSTGRES__URL)"
                .to_string()
        })?;
        let tls = self.tls()?;
        let mut options = sqlx::postgres::PgConnectOptions::from_str(url.expose())
            .map_err(|e| format!("postgres.url does not parse: {}", without(e, url)))?;
        if let Some(password) = &self.password {
            options = options.password(password.expose());
        }
        let mode = match (tls.mode, &tls.root_cert) {
            (None, Some(_)) => Some(PgSslMode::VerifyFull),
            (Some(PgSslMode::Require), Some(_)) => Some(PgSslMode::VerifyCa),
            (mode, _) => mode,
        };
        if let Some(mode) = mode {
            options = options.ssl_mode(mode.to_sqlx());
        }
        if let Some(root) = &self.ssl_root_cert {
            options = options.ssl_root_cert(root);
        }
        if let Some(cert) = &self.ssl_cert {
            options = options.ssl_client_cert(cert);
        }
        if let Some(key) = &self.ssl_key {
            options = options.ssl_client_key(key);
        }
        Ok(options)
    }
}

/// PostgreSQL TLS settings in effect, each with the key it came from.
struct PgTls {
    mode: Option<PgSslMode>,
    root_cert: Option<(String, PathBuf)>,
    client_cert: Option<(String, PathBuf)>,
    client_key: Option<(String, PathBuf)>,
}

/// An error's text with a secret cut out, should the error quote it.
fn without(err: impl fmt::Display, secret: &Secret) -> String {
    let text = err.to_string();
    if secret.expose().is_empty() {
        text
    } else {
        text.replace(secret.expose(), "****")
    }
}

/// The most a secret, certificate or key file may hold: more is a mistake (or `/dev/zero`).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads `file` into `value` (trailing line breaks dropped, as `echo` and editors leave them).
fn read_secret(
    value: &mut Option<Secret>,
    file: &Option<PathBuf>,
    name: &str,
    problems: &mut Vec<String>,
) {
    let Some(path) = file else {
        if value.as_ref().is_some_and(|v| v.expose().is_empty()) {
            problems.push(format!("{name} is empty"));
        }
        return;
    };
    if value.is_some() {
        problems.push(format!("{name} and {name}_file are both set; set one"));
        return;
    }
    let Some(bytes) = read_file(problems, &format!("{name}_file"), path) else {
        return;
    };
    match String::from_utf8(bytes) {
        Ok(text) => {
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                problems.push(format!("{name}_file {} is empty", shown_path(path)));
            } else {
                *value = Some(Secret::new(text));
            }
        }
        Err(_) => problems.push(format!(
            "{name}_file {} is not UTF-8 text",
            shown_path(path)
        )),
    }
}

/// A path as messages and `config` show it: a value that does not look like a path (a secret
/// or a PEM block pasted into a path key by mistake) is not repeated. A path has a `/`
/// (`./name` for a file in the working directory).
pub(crate) fn shown_path(path: &Path) -> String {
    let text = path.to_string_lossy();
    let plausible = text.len() <= 512
        && text.contains('/')
        && !text.contains(['\n', '\r'])
        && !text.contains("://")
        && !text.contains("-----BEGIN");
    if plausible {
        text.into_owned()
    } else {
        "(a value that does not look like a path, not shown: it may be a secret)".to_string()
    }
}

/// A regular file of at most [`MAX_FILE_BYTES`], read without blocking on a FIFO or a device.
fn read_file(p: &mut Vec<String>, name: &str, path: &Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let shown = shown_path(path);
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            p.push(format!("{name}: {shown} is not a regular file"));
            return None;
        }
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            p.push(format!(
                "{name}: {shown} is larger than {MAX_FILE_BYTES} bytes"
            ));
            return None;
        }
        Ok(_) => {}
        Err(err) => {
            p.push(format!("{name}: cannot read {shown}: {err}"));
            return None;
        }
    }
    let mut bytes = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes));
    match read {
        Ok(_) if bytes.len() as u64 > MAX_FILE_BYTES => {
            p.push(format!(
                "{name}: {shown} is larger than {MAX_FILE_BYTES} bytes"
            ));
            None
        }
        Ok(_) => Some(bytes),
        Err(err) => {
            p.push(format!("{name}: cannot read {shown}: {err}"));
            None
        }
    }
}

/// PEM text from a file or inline, whichever is set (both: a problem).
fn pem_source(
    p: &mut Vec<String>,
    file: (&str, &Option<PathBuf>),
    inline: (&str, Option<&[u8]>),
) -> Option<(String, Vec<u8>)> {
    match (file.1, inline.1) {
        (Some(_), Some(_)) => {
            p.push(format!("{} and {} are both set; set one", file.0, inline.0));
            None
        }
        (Some(path), None) => read_file(p, file.0, path).map(|pem| (file.0.to_string(), pem)),
        (None, Some(pem)) => Some((inline.0.to_string(), pem.to_vec())),
        (None, None) => None,
    }
}

/// Checks that `pem` holds at least one X.509 certificate; returns how many.
fn certificates(p: &mut Vec<String>, name: &str, pem: &[u8]) -> Option<usize> {
    first_certificate(p, name, pem).map(|(_, count)| count)
}

/// The first X.509 certificate in `pem`, and how many there are.
fn first_certificate(
    p: &mut Vec<String>,
    name: &str,
    pem: &[u8],
) -> Option<(openssl::x509::X509, usize)> {
    match openssl::x509::X509::stack_from_pem(pem) {
        Ok(certs) if !certs.is_empty() => {
            let count = certs.len();
            certs.into_iter().next().map(|c| (c, count))
        }
        Ok(_) => {
            p.push(format!("{name}: not a PEM certificate (none found)"));
            None
        }
        Err(err) => {
            p.push(format!(
                "{name}: not a PEM certificate ({})",
                first_reason(&err)
            ));
            None
        }
    }
}

/// A client certificate and its key: both or neither, the key readable (with its passphrase)
/// and belonging to the certificate.
fn client_identity(
    p: &mut Vec<String>,
    at: &str,
    cert: Option<(String, Vec<u8>)>,
    key: Option<(String, Vec<u8>)>,
    password: Option<&str>,
    cert_name: &str,
    key_name: &str,
) {
    if password.is_some() && key.is_none() {
        p.push(format!(
            "{at}.ssl_key_password is set without a private key ({at}.{key_name}_location or {key_name}_pem)"
        ));
    }
    let (cert, key) = match (cert, key) {
        (None, None) => return,
        (Some((name, _)), None) => {
            p.push(format!(
                "{name} is set without its private key ({at}.{key_name}…)"
            ));
            return;
        }
        (None, Some((name, _))) => {
            p.push(format!(
                "{name} is set without its certificate ({at}.{cert_name}…)"
            ));
            return;
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    let certificate = first_certificate(p, &cert.0, &cert.1).map(|(c, _)| c);
    let parsed = match password {
        Some(pass) => openssl::pkey::PKey::private_key_from_pem_passphrase(&key.1, pass.as_bytes()),
        None => {
            // NB: without a passphrase OpenSSL would ask for one on the terminal; an empty
            // callback makes an encrypted key a plain error instead.
            openssl::pkey::PKey::private_key_from_pem_callback(&key.1, |_| Ok(0))
        }
    };
    let key_parsed = match parsed {
        Ok(k) => k,
        Err(err) => {
            let hint = if password.is_some() {
                " (or the passphrase is wrong)"
            } else {
                " (an encrypted key needs its passphrase)"
            };
            p.push(format!(
                "{}: not a readable PEM private key{hint}: {}",
                key.0,
                first_reason(&err)
            ));
            return;
        }
    };
    if let Some(certificate) = certificate {
        let matches = certificate
            .public_key()
            .map(|public| public.public_eq(&key_parsed))
            .unwrap_or(false);
        if !matches {
            p.push(format!("{} does not belong to {}", key.0, cert.0));
        }
    }
}

/// OpenSSL's first reason, without the library and file noise.
fn first_reason(err: &openssl::error::ErrorStack) -> String {
    err.errors()
        .first()
        .and_then(|e| e.reason().map(str::to_string))
        .unwrap_or_else(|| "unreadable".into())
}

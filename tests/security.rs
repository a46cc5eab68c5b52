//! Security against Apache Kafka itself and a real PostgreSQL: the pipeline end to end through a
//! `SASL_SSL` listener (SCRAM-SHA-512) and a mutual-TLS `SSL` listener, `produce` and `tail`
//! through SCRAM-SHA-256 and PLAIN, PostgreSQL over `verify-full` TLS with a password; the
//! failures a user meets (wrong password, untrusted CA, missing client certificate, a plaintext
//! client on a TLS listener, a wrong PostgreSQL CA) stop quickly with a clear reason; and no
//! secret, however it was given (TOML, environment, `*_file`, raw librdkafka map), appears in
//! anything the binary prints, with librdkafka's own debug logging on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::kafka::KafkaCluster;
use common::tls::{Pki, CLIENT_KEY_PASSPHRASE};
use common::*;
use neurostream::config::{Config, KafkaProtocol, PgSslMode, SaslMechanism, Secret};
use neurostream::pgserver::{Durability, PgServer};
use neurostream::store::PgStore;

const USER: &str = "neurostream";
const KAFKA_PASSWORD: &str = "kafka-Secret-4f9Qz";
const PG_PASSWORD: &str = "pg-Secret-8Kd2w";

/// Every secret the tests hand the binary; none may appear in its output.
const SECRETS: [&str; 3] = [KAFKA_PASSWORD, PG_PASSWORD, CLIENT_KEY_PASSPHRASE];

/// A secured broker, a PostgreSQL that accepts only TLS with a password, and the PKI of both.
struct Secured {
    pki: Pki,
    kafka: KafkaCluster,
    pg: PgServer,
    /// Files the tests write (configs, secrets, logs).
    dir: tempfile::TempDir,
}

impl Secured {
    async fn start() -> Option<Secured> {
        // The plain harness decides whether Apache Kafka is required or skipped.
        common::kafka::kafka_libs().or_else(|| {
            KafkaCluster::start_or_skip(1);
            None
        })?;
        let pki = Pki::new();
        let kafka = KafkaCluster::start_secured(
            &pki.path("broker-keystore.pem"),
            &pki.path("ca.pem"),
            USER,
            KAFKA_PASSWORD,
        );
        let mut pg = PgServer::start(Durability::Fast).expect("private PostgreSQL starts");
        let admin = PgStore::connect_lazy(&pg.url("postgres"), 1).unwrap();
        sqlx::query(&format!("ALTER USER postgres PASSWORD '{PG_PASSWORD}'"))
            .execute(admin.pool())
            .await
            .unwrap();
        sqlx::query("CREATE DATABASE certdb")
            .execute(admin.pool())
            .await
            .unwrap();
        admin.pool().close().await;
        // Database certdb takes a client certificate instead of a password.
        pg.enable_tls(
            &pki.read("server.pem"),
            &pki.read("server.key"),
            Some(&pki.read("ca.pem")),
            "local all all trust\n\
             hostssl certdb all 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 127.0.0.1/32 reject\n",
            Durability::Fast,
        )
        .expect("PostgreSQL restarts with TLS");
        Some(Secured {
            pki,
            kafka,
            pg,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// A service configuration over the SASL_SSL listener (SCRAM-SHA-512, password from a
    /// file) and PostgreSQL over verify-full TLS (password from a file), topics created.
    async fn config(&self) -> Config {
        let mut c = base_config(&self.kafka.sasl_ssl_bootstrap(), "postgres://x@127.0.0.1/x");
        // The harness's admin calls use the PLAINTEXT listener.
        for topic in c.kafka.topics.all() {
            self.kafka.create_topic(topic, 1, 1).await;
        }
        self.kafka
            .create_topic(&c.kafka.input_topics[0], 1, 1)
            .await;
        let s = &mut c.kafka.security;
        s.protocol = Some(KafkaProtocol::SaslSsl);
        s.sasl_mechanism = Some(SaslMechanism::ScramSha512);
        s.sasl_username = Some(USER.into());
        s.sasl_password_file = Some(self.secret_file("kafka-password", KAFKA_PASSWORD));
        s.ssl_ca_location = Some(self.pki.path("ca.pem"));
        let pg = &mut c.postgres;
        pg.url = Some(Secret::from(format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.pg.port()
        )));
        pg.password_file = Some(self.secret_file("pg-password", PG_PASSWORD));
        pg.ssl_mode = Some(PgSslMode::VerifyFull);
        pg.ssl_root_cert = Some(self.pki.path("ca.pem"));
        c
    }

    /// The same configuration over the mutual-TLS listener: client certificate and encrypted
    /// key, the passphrase from the environment (see [`Secured::run`]).
    fn over_mtls(&self, c: &Config) -> Config {
        let mut c = c.clone();
        c.kafka.brokers = self.kafka.ssl_bootstrap();
        let s = &mut c.kafka.security;
        s.protocol = Some(KafkaProtocol::Ssl);
        s.sasl_mechanism = None;
        s.sasl_username = None;
        s.sasl_password_file = None;
        s.ssl_certificate_location = Some(self.pki.path("client.pem"));
        s.ssl_key_location = Some(self.pki.path("client-encrypted.key"));
        c
    }

    fn secret_file(&self, name: &str, value: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        path
    }

    fn write_config(&self, name: &str, c: &Config) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
        path
    }

    /// The PostgreSQL store as the service reaches it: the configuration file through the
    /// loader (which reads `password_file`), then TLS with the password.
    fn store(&self, config_file: &Path) -> PgStore {
        let loaded = neurostream::config::load(Some(config_file)).unwrap();
        PgStore::connect_lazy_with(loaded.config.postgres.connect_options().unwrap(), 2)
    }
}

/// Runs `neurostream --config <config> <args>` to completion within `limit`, with the
/// environment `env`, and returns its output.
fn neurostream(config: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run_binary(&all, env, limit).0
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `neurostream run` in the background, every line it writes kept in `log`.
fn spawn_service(config: &Path, env: &[(&str, &str)], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_neurostream"));
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn stop(mut child: Child) {
    // SIGTERM: a clean drain.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the service did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_no_secret(what: &str, output: &str) {
    for secret in SECRETS {
        assert!(
            !output.contains(secret),
            "{what} printed a secret ({} bytes of output)",
            output.len()
        );
    }
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_through_sasl_ssl_and_mutual_tls_with_postgresql_over_tls() {
    let Some(env) = Secured::start().await else {
        return;
    };
    let mut config = env.config().await;
    // librdkafka's own debug logging, with its configuration dump, and ours at debug.
    config
        .kafka
        .consumer
        .insert("debug".into(), "security,broker,conf,generic".into());
    config.log.level = "debug".into();
    let messages = vec![stream(0, 240)];
    let (first, second) = messages[0].split_at(120);
    let topic = config.kafka.input_topics[0].clone();

    // Phase 1: the service over SASL_SSL + SCRAM-SHA-512; events produced over SCRAM-SHA-256
    // with the password from the environment.
    let sasl_path = env.write_config("sasl.toml", &config);
    let log1 = env.dir.path().join("service-sasl.log");
    let service = spawn_service(&sasl_path, &[("RUST_LOG", "debug")], &log1);
    let mut producer_config = config.clone();
    producer_config.kafka.security.sasl_mechanism = Some(SaslMechanism::ScramSha256);
    producer_config.kafka.security.sasl_password_file = None;
    let produce_path = env.write_config("produce.toml", &producer_config);
    let events = env.dir.path().join("first.jsonl");
    write_lines(&events, first);
    let out = neurostream(
        &produce_path,
        &[
            "produce",
            "--topic",
            &topic,
            "--file",
            events.to_str().unwrap(),
        ],
        &[(
            "NEUROSTREAM__KAFKA__SECURITY__SASL_PASSWORD",
            KAFKA_PASSWORD,
        )],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "produce over SCRAM-SHA-256:\n{}",
        text(&out)
    );
    assert_no_secret("produce", &text(&out));
    let store = env.store(&sasl_path);
    wait_for_checkpoints(
        &store,
        &config.kafka.group_id,
        &[120],
        Duration::from_secs(90),
    )
    .await;
    stop(service);

    // Phase 2: the same group over mutual TLS (client certificate, encrypted key, passphrase
    // from the environment): it resumes at the checkpoint.
    let mtls = env.over_mtls(&config);
    let mtls_path = env.write_config("mtls.toml", &mtls);
    let log2 = env.dir.path().join("service-mtls.log");
    let passphrase = [(
        "NEUROSTREAM__KAFKA__SECURITY__SSL_KEY_PASSWORD",
        CLIENT_KEY_PASSPHRASE,
    )];
    let service = spawn_service(&mtls_path, &[passphrase[0], ("RUST_LOG", "debug")], &log2);
    let events = env.dir.path().join("second.jsonl");
    write_lines(&events, second);
    let out = neurostream(
        &mtls_path,
        &[
            "produce",
            "--topic",
            &topic,
            "--file",
            events.to_str().unwrap(),
        ],
        &passphrase,
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "produce over mTLS:\n{}", text(&out));
    wait_for_checkpoints(
        &store,
        &config.kafka.group_id,
        &[240],
        Duration::from_secs(90),
    )
    .await;
    stop(service);

    // Rows equal a clean replay of all 240 events.
    assert_rows_eq(
        &stored_rows(&store).await,
        &expected_rows(&config, &messages),
    );

    // `tail` reads the outputs through SASL_SSL + PLAIN, the password inline in the file.
    let mut plain = config.clone();
    plain.kafka.security.sasl_password_file = None;
    plain.kafka.security.sasl_password = Some(KAFKA_PASSWORD.into());
    plain.kafka.security.sasl_mechanism = Some(SaslMechanism::Plain);
    plain.kafka.consumer.clear();
    let plain_path = env.write_config("plain.toml", &plain);
    let out = neurostream(
        &plain_path,
        &[
            "tail",
            "--topic",
            &config.kafka.topics.windows,
            "--from-beginning",
            "--limit",
            "5",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "tail over PLAIN:\n{}", text(&out));
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("window_aggregate"))
        .count();
    assert_eq!(lines, 5, "{}", text(&out));

    // Nothing printed a secret: librdkafka's debug logging (its configuration dump included),
    // the service's own debug logs, `config` for every configuration above.
    for log in [&log1, &log2] {
        let output = std::fs::read_to_string(log).unwrap();
        assert!(
            output.contains("librdkafka"),
            "librdkafka's debug lines reached the log"
        );
        assert_no_secret("the service at debug level", &output);
    }
    let password = [(
        "NEUROSTREAM__KAFKA__SECURITY__SASL_PASSWORD",
        KAFKA_PASSWORD,
    )];
    let inline = env.write_config("inline.toml", &{
        // Secrets inline in the file, and in the raw librdkafka map.
        let mut c = plain.clone();
        c.kafka.security.sasl_password = Some(KAFKA_PASSWORD.into());
        c.postgres.password_file = None;
        c.postgres.password = Some(PG_PASSWORD.into());
        c.kafka
            .producer
            .insert("sasl.oauthbearer.config".into(), KAFKA_PASSWORD.into());
        c.kafka
            .consumer
            .insert("ssl.keystore.password".into(), CLIENT_KEY_PASSPHRASE.into());
        c
    });
    for (path, env) in [
        (&sasl_path, &[][..]),
        (&produce_path, &password[..]),
        (&mtls_path, &passphrase[..]),
        (&inline, &[][..]),
    ] {
        let out = neurostream(path, &["config"], env, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "config {}:\n{}",
            path.display(),
            text(&out)
        );
        assert_no_secret("config", &text(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_and_tls_fail_fast_and_clearly() {
    let Some(env) = Secured::start().await else {
        return;
    };
    let good = env.config().await;
    let cases: Vec<(&str, Config, &[&str])> = vec![
        (
            "wrong SCRAM password",
            {
                let mut c = good.clone();
                c.kafka.security.sasl_password_file =
                    Some(env.secret_file("wrong", "not-the-password-x"));
                c
            },
            &[
                "refused the connection",
                "Authentication failed",
                "SCRAM-SHA-512",
            ],
        ),
        (
            "untrusted CA",
            {
                let mut c = good.clone();
                c.kafka.security.ssl_ca_location = Some(env.pki.path("other-ca.pem"));
                c
            },
            &["refused the connection", "certificate verify failed"],
        ),
        (
            "no client certificate on the mutual-TLS listener",
            {
                let mut c = env.over_mtls(&good);
                c.kafka.security.ssl_certificate_location = None;
                c.kafka.security.ssl_key_location = None;
                c
            },
            &["refused the connection"],
        ),
        (
            "a client certificate from another CA",
            {
                let mut c = env.over_mtls(&good);
                c.kafka.security.ssl_certificate_location = Some(env.pki.path("other-client.pem"));
                c.kafka.security.ssl_key_location = Some(env.pki.path("other-client.key"));
                c
            },
            &["refused the connection"],
        ),
        (
            "a plaintext client on the TLS listener",
            {
                let mut c = good.clone();
                c.kafka.security = Default::default();
                c
            },
            &["cannot reach the Kafka brokers", "security.protocol"],
        ),
    ];
    // The service, and `produce` and `tail` with the first two refusals.
    let runs = cases.iter().map(|c| (["run"].as_slice(), c)).chain([
        (
            ["produce", "--topic", "whatever", "--events", "1"].as_slice(),
            &cases[0],
        ),
        (["tail", "--limit", "1"].as_slice(), &cases[1]),
    ]);
    for (args, (name, config, wants)) in runs {
        let name = format!("{} ({})", name, args[0]);
        let name = name.as_str();
        let path = env.write_config(&format!("{}.toml", unique()), config);
        let started = Instant::now();
        let mut vars = vec![("RUST_LOG", "info")];
        if config.kafka.security.ssl_key_location == Some(env.pki.path("client-encrypted.key")) {
            vars.push((
                "NEUROSTREAM__KAFKA__SECURITY__SSL_KEY_PASSWORD",
                CLIENT_KEY_PASSPHRASE,
            ));
        }
        let out = neurostream(&path, args, &vars, Duration::from_secs(60));
        let took = started.elapsed();
        let output = text(&out);
        assert!(
            !out.status.success(),
            "{name}: the service started:\n{output}"
        );
        for want in wants.iter() {
            assert!(output.contains(want), "{name}: no `{want}` in:\n{output}");
        }
        assert_no_secret(name, &output);
        let error = output
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("");
        eprintln!("{name}: stopped after {:.1} s: {error}", took.as_secs_f64());
        // A refusal is final at once; only the plaintext client waits for the 15 s timeout.
        let limit = if wants.contains(&"refused the connection") {
            Duration::from_secs(8)
        } else {
            Duration::from_secs(25)
        };
        assert!(took < limit, "{name}: took {took:?}, more than {limit:?}");
    }

    // PostgreSQL: a CA that did not sign the server's certificate, and TLS turned off against a
    // server that refuses plaintext.
    let mut wrong_ca = good.clone();
    wrong_ca.postgres.ssl_root_cert = Some(env.pki.path("other-ca.pem"));
    let mut no_tls = good.clone();
    no_tls.postgres.ssl_mode = Some(PgSslMode::Disable);
    no_tls.postgres.ssl_root_cert = None;
    let mut cert_db = good.clone();
    cert_db.postgres.url = Some(Secret::from(format!(
        "postgres://postgres@127.0.0.1:{}/certdb",
        env.pg.port()
    )));
    cert_db.postgres.password_file = None;
    let mut with_cert = cert_db.clone();
    with_cert.postgres.ssl_cert = Some(env.pki.path("pg-client.pem"));
    with_cert.postgres.ssl_key = Some(env.pki.path("pg-client.key"));
    let path = env.write_config("pg-cert.toml", &with_cert);
    let out = neurostream(&path, &["migrate"], &[], Duration::from_secs(60));
    assert!(
        out.status.success(),
        "client certificate to PostgreSQL:\n{}",
        text(&out)
    );
    for (name, config, want) in [
        (
            "PostgreSQL with the wrong CA",
            wrong_ca,
            "certificate verify failed",
        ),
        ("PostgreSQL without TLS", no_tls, "no encryption"),
        (
            "PostgreSQL without the client certificate it requires",
            cert_db,
            "certificate",
        ),
    ] {
        let path = env.write_config(&format!("{}.toml", unique()), &config);
        let out = neurostream(&path, &["migrate"], &[], Duration::from_secs(60));
        let output = text(&out);
        assert!(
            !out.status.success(),
            "{name}: migrate succeeded:\n{output}"
        );
        assert!(output.contains(want), "{name}: no `{want}` in:\n{output}");
        assert_no_secret(name, &output);
        let error = output
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("");
        eprintln!("{name}: {error}");
    }
}

#[test]
fn security_problems_are_reported_together_before_connecting() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| pki.path(name).display().to_string();
    let cases = [
        (
            format!(
                r#"
                [kafka]
                brokers = "127.0.0.1:1"
                [kafka.security]
                protocol = "SASL_SSL"
                sasl_username = "u"
                ssl_ca_location = "{key}"
                ssl_certificate_location = "{cert}"
                ssl_key_location = "{other_key}"
                [postgres]
                url = "postgres://u@127.0.0.1:1/db"
                ssl_mode = "verify-full"
                ssl_root_cert = "/nonexistent/root.pem"
                ssl_cert = "{cert}"
                "#,
                key = p("client.key"),
                cert = p("client.pem"),
                other_key = p("other-client.key"),
            ),
            vec![
                "kafka.security.sasl_mechanism is required with protocol sasl_ssl",
                "kafka.security.sasl_password (or sasl_password_file) is required",
                "kafka.security.ssl_ca_location: not a PEM certificate",
                "kafka.security.ssl_key_location does not belong to kafka.security.ssl_certificate_location",
                "postgres.ssl_root_cert: cannot read /nonexistent/root.pem",
                "postgres.ssl_cert is set without its private key",
            ],
        ),
        (
            format!(
                r#"
                [kafka.security]
                protocol = "ssl"
                ssl_certificate_location = "{cert}"
                ssl_key_location = "{encrypted}"
                "#,
                cert = p("client.pem"),
                encrypted = p("client-encrypted.key"),
            ),
            vec!["kafka.security.ssl_key_location: not a readable PEM private key (an encrypted key needs its passphrase)"],
        ),
        (
            format!(
                r#"
                [kafka.security]
                protocol = "ssl"
                ssl_certificate_location = "{cert}"
                ssl_key_location = "{encrypted}"
                ssl_key_password = "not-the-passphrase"
                "#,
                cert = p("client.pem"),
                encrypted = p("client-encrypted.key"),
            ),
            vec!["(or the passphrase is wrong)"],
        ),
    ];
    for (i, (toml, wants)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = neurostream(&path, &["run"], &[], Duration::from_secs(20));
        let output = text(&out);
        assert_eq!(out.status.code(), Some(2), "case {i}:\n{output}");
        for want in wants {
            assert!(output.contains(want), "case {i}: no `{want}` in:\n{output}");
        }
        assert!(!output.contains("not-the-passphrase"), "{output}");
    }
}

//! Start-up fails fast and says why: configuration problems all at once, a taken HTTP port, an
//! unreachable PostgreSQL (with the connection's own error), missing topics; and the commands
//! refuse unusable arguments instead of hanging.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use neurostream::app::{self, AppError};
use neurostream::kafka::TopicError;
use neurostream::store::{MemoryStore, Store};
use neurostream::telemetry::Progress;
use tokio_util::sync::CancellationToken;

/// Runs the binary with `args` and environment `env` (logging errors only), killing it after
/// `limit`.
fn neurostream(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    let mut all = vec![("RUST_LOG", "error")];
    all.extend_from_slice(env);
    run_binary(args, &all, limit)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_taken_http_port_stops_start_up_with_its_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (out, _) = neurostream(
        &["run"],
        &[
            ("NEUROSTREAM__HTTP__ADDRESS", &addr),
            ("NEUROSTREAM__POSTGRES__URL", "postgres://x@127.0.0.1:1/db"),
        ],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains(&format!("cannot listen on http.address {addr}")),
        "{text}"
    );
}

#[test]
fn migrate_says_why_postgresql_is_unreachable() {
    // Nothing listens on port 1.
    let (out, took) = neurostream(
        &["migrate"],
        &[("NEUROSTREAM__POSTGRES__URL", "postgres://x@127.0.0.1:1/db")],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let text = stderr(&out).to_lowercase();
    assert!(text.contains("connection refused"), "{text}");
    assert!(took < Duration::from_secs(45), "took {took:?}");
}

#[test]
fn configuration_problems_are_reported_together_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neurostream.toml");
    std::fs::write(
        &path,
        "[processing]\nmax_key_bytes = 99999\n[kafka.consumer]\n\"fetch.bogus\" = \"1\"\n",
    )
    .unwrap();
    let (out, _) = neurostream(
        &["--config", path.to_str().unwrap(), "config"],
        &[
            ("NEUROSTREAM__KAFKA__MAX_EVENT_BYTES", "big"),
            ("NEUROSTREAM__POSTGRES__POOL_MAX", "0"),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    for expected in [
        "kafka.max_event_bytes: invalid type",
        "env NEUROSTREAM__KAFKA__MAX_EVENT_BYTES",
        "postgres.pool_max must be at least 1",
        "processing.max_key_bytes must be within",
        "librdkafka refuses `fetch.bogus`",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[test]
fn demo_refuses_zero_partitions() {
    let (out, took) = neurostream(&["demo", "--partitions", "0"], &[], Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--partitions"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_topic_stops_the_service_naming_it() {
    let broker = Broker::mock();
    let (url, _store) = fresh_db().await;
    let mut config = base_config(&broker.brokers(), &url);
    for topic in config.kafka.topics.all() {
        broker.create_topic(topic, 1).await;
    }
    config.kafka.input_topics = vec!["nowhere".into()];
    let result = app::run(
        arc(&config),
        Store::Memory(MemoryStore::default()),
        std::sync::Arc::new(Progress::default()),
        CancellationToken::new(),
    )
    .await;
    match result {
        Err(AppError::Topics(TopicError::MissingInput(topics))) => {
            assert_eq!(topics, vec!["nowhere".to_string()])
        }
        other => panic!("expected a missing input topic, got {other:?}"),
    }
    // With create_topics off, missing outputs are named too.
    let mut config = base_config(&broker.brokers(), &url);
    broker.create_topic(&config.kafka.input_topics[0], 1).await;
    config.kafka.create_topics = false;
    let err = neurostream::kafka::prepare_topics(&config)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TopicError::MissingOutput(t) if t.len() == 6),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_refuses_a_missing_topic_instead_of_hanging() {
    // NB: the mock cluster creates topics on demand; Apache Kafka (as the harness runs it, and
    // as production clusters usually are) does not.
    let Some(broker) = Broker::kafka() else {
        return;
    };
    let (url, _store) = fresh_db().await;
    let config = base_config(&broker.brokers(), &url);
    let started = Instant::now();
    let err = neurostream::tools::produce(
        &config,
        neurostream::tools::ProduceOptions {
            topic: "nowhere".into(),
            events: 10,
            rate: 0,
            file: None,
            malformed_every: 0,
            synthetic: Default::default(),
            partitions: None,
            avro: false,
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("`nowhere` does not exist"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn produce_makes_benchmark_data_with_its_shape_and_never_repeats_itself() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let Some(broker) = Broker::kafka() else {
        return;
    };
    let config = base_config(&broker.brokers(), "postgres://unused@127.0.0.1/x");
    let topic = config.kafka.input_topics[0].clone();
    broker.create_topic(&topic, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let produce = |extra: &[&str]| {
        let mut args = vec![
            "--config",
            path.to_str().unwrap(),
            "produce",
            "--topic",
            &topic,
        ];
        args.extend_from_slice(extra);
        let (out, _) = neurostream(&args, &[], Duration::from_secs(60));
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let shaped = [
        "--events",
        "30",
        "--partitions",
        "3",
        "--dimension",
        "16",
        "--keys",
        "3",
        "--clusters",
        "2",
        "--seed",
        "7",
        "--start-ts",
        "1700000000000",
    ];
    produce(&shaped);
    produce(&["--events", "3"]);
    std::thread::sleep(Duration::from_millis(10));
    produce(&["--events", "3"]);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", format!("check_{}", unique()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut events = Vec::new();
    let started = Instant::now();
    while events.len() < 36 && started.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            events.push((m.partition(), v));
        }
    }
    assert_eq!(events.len(), 36);
    let shaped: Vec<_> = events
        .iter()
        .filter(|(_, v)| v["features"].as_array().unwrap().len() == 16)
        .collect();
    assert_eq!(shaped.len(), 30, "--dimension 16");
    for p in 0..3 {
        assert_eq!(
            shaped.iter().filter(|(q, _)| *q == p).count(),
            10,
            "--partitions 3"
        );
    }
    let keys: std::collections::BTreeSet<&str> = shaped
        .iter()
        .map(|(_, v)| v["key"].as_str().unwrap())
        .collect();
    assert!(keys.len() <= 3, "--keys 3: {keys:?}");
    assert!(shaped
        .iter()
        .all(|(_, v)| (1_699_999_999_000..1_700_000_001_000).contains(&v["ts"].as_i64().unwrap())));
    // The two default runs start at the wall clock: ids never repeat, time never goes back.
    let ids: std::collections::BTreeSet<&str> = events
        .iter()
        .map(|(_, v)| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 36, "{ids:?}");
    let now = chrono::Utc::now().timestamp_millis();
    let recent = events
        .iter()
        .filter(|(_, v)| v["ts"].as_i64().unwrap() > now - 120_000)
        .count();
    assert_eq!(recent, 6);
}

//! What an operator sees: `/metrics` scraped during a pipeline run lists every catalogued metric
//! with its documented labels, consumer lag falls to 0, the end-to-end latency histogram counts
//! every processed event; `/status` carries the algorithm status and the profile; the README's
//! metrics table names every metric.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use neurostream::telemetry::{MetricKind, Progress, CATALOGUE};
use tokio_util::sync::CancellationToken;

fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Sample lines of the exposition: (name, labels) → value.
fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels: BTreeMap<String, String> = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.insert(
            (name.to_string(), labels),
            value.parse().unwrap_or(f64::NAN),
        );
    }
    out
}

fn sum(samples: &BTreeMap<(String, BTreeMap<String, String>), f64>, name: &str) -> f64 {
    samples
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

/// The process-wide Prometheus recorder (one per test binary).
fn recorder() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| neurostream::http::install_recorder().unwrap())
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_and_lag_during_a_pipeline_run() {
    let handle = recorder();
    let shutdown = CancellationToken::new();
    neurostream::http::spawn_upkeep(handle.clone(), shutdown.clone());
    let progress = Arc::new(Progress::default());
    let listener = neurostream::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let limits = neurostream::http::Limits {
        stall_timeout: Duration::from_secs(60),
        ready_max_lag: 0,
    };
    tokio::spawn(neurostream::http::serve(
        listener,
        handle,
        progress.clone(),
        limits,
        shutdown.clone(),
    ));
    // Zero-valued from start-up, before any event.
    let early = samples(&get(port, "/metrics"));
    assert!(early.keys().any(|(n, _)| n == "neurostream_build_info"));
    assert!(early.keys().any(|(n, _)| n == "neurostream_retries_total"));

    let broker = Broker::mock();
    let (url, store) = fresh_db().await;
    let config = config_for(&broker, 2, &url).await;
    let mut messages: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 600)).collect();
    messages[0].insert(5, b"not json".to_vec());
    produce(
        &config.kafka.brokers,
        &config.kafka.input_topics[0],
        &messages,
    )
    .await;
    let run = tokio::spawn(neurostream::app::run(
        arc(&config),
        service_store(&store),
        progress.clone(),
        shutdown.clone(),
    ));
    wait_for_checkpoints(
        &store,
        &config.kafka.group_id,
        &[601, 600],
        Duration::from_secs(90),
    )
    .await;

    // Lag (from librdkafka's statistics every 5 s) falls to 0, and /ready says so.
    let started = Instant::now();
    loop {
        let s = samples(&get(port, "/metrics"));
        let lags: Vec<f64> = s
            .iter()
            .filter(|((n, _), _)| n == "neurostream_consumer_lag_messages")
            .map(|(_, v)| *v)
            .collect();
        if lags.len() == 2 && lags.iter().all(|l| *l == 0.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "lag never reached 0: {lags:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(get(port, "/ready"), "ready");

    let text = get(port, "/metrics");
    let s = samples(&text);
    // Every catalogued metric is there, with exactly its documented labels.
    for m in CATALOGUE {
        let series: Vec<&BTreeMap<String, String>> = s
            .keys()
            .filter(|(n, _)| match m.kind {
                MetricKind::Histogram => n == &format!("{}_count", m.name),
                _ => n == m.name,
            })
            .map(|(_, l)| l)
            .collect();
        assert!(!series.is_empty(), "{} missing from /metrics", m.name);
        let want: BTreeSet<&str> = m.labels.iter().copied().collect();
        for labels in series {
            let got: BTreeSet<&str> = labels.keys().map(String::as_str).collect();
            assert_eq!(got, want, "labels of {}", m.name);
        }
        if m.kind == MetricKind::Histogram {
            assert!(
                text.contains(&format!("{}_bucket{{", m.name)),
                "{} has explicit buckets",
                m.name
            );
        }
    }
    // The end-to-end latency histogram counts every processed event.
    let events = sum(&s, "neurostream_events_total");
    assert_eq!(events, 1_200.0);
    assert_eq!(
        sum(&s, "neurostream_end_to_end_latency_seconds_count"),
        events
    );
    assert_eq!(sum(&s, "neurostream_messages_consumed_total"), 1_201.0);
    let not_json = s
        .iter()
        .find(|((n, l), _)| {
            n == "neurostream_dead_letters_total"
                && l.get("reason").map(String::as_str) == Some("not_json")
        })
        .map(|(_, v)| *v);
    assert_eq!(not_json, Some(1.0));
    assert!(sum(&s, "neurostream_state_keys") > 0.0);
    assert!(sum(&s, "neurostream_checkpoint_bytes") > 0.0);
    // Every flush delivered to Kafka is timed, whatever the sink did after it.
    assert!(sum(&s, "neurostream_delivery_seconds_count") > 0.0);
    assert!(sum(&s, "neurostream_delivery_seconds_sum") > 0.0);
    // Worker time: every state is exported per partition; processing 1,200 events took some.
    let time_in = |state: &str| -> Vec<f64> {
        s.iter()
            .filter(|((n, l), _)| {
                n == "neurostream_worker_time_microseconds_total"
                    && l.get("state").map(String::as_str) == Some(state)
            })
            .map(|(_, v)| *v)
            .collect()
    };
    for state in [
        "idle",
        "busy",
        "waiting_kafka",
        "waiting_postgres",
        "waiting_registry",
    ] {
        assert_eq!(
            time_in(state).len(),
            2,
            "worker time {state} for both partitions"
        );
    }
    assert!(
        time_in("busy").iter().all(|&us| us > 0.0),
        "{:?}",
        time_in("busy")
    );

    // /status: the effective profile, and per partition the algorithm status and latencies.
    let status: serde_json::Value = serde_json::from_str(&get(port, "/status")).unwrap();
    assert_eq!(status["profile"], "latency");
    for p in 0..2 {
        let part = &status["partitions"][format!("{}/{p}", config.kafka.input_topics[0])];
        assert_eq!(part["algorithm_status"]["algorithm"], "ncs", "{part}");
        assert!(
            part["algorithm_status"]["points_processed"]
                .as_u64()
                .unwrap()
                >= 600
        );
        assert_eq!(part["processing_latency_ms"].as_array().unwrap().len(), 3);
    }

    shutdown.cancel();
    run.await.unwrap().unwrap();

    // The README's metrics table names every metric.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for m in CATALOGUE {
        assert!(
            readme.contains(&format!("`{}`", m.name)),
            "README does not list {}",
            m.name
        );
    }
}

/// Not a check: records `/metrics` once a second during a 60-second run at 800 events/s (four
/// partitions, one message in 200 malformed) into `$NS_SCRAPE_DIR`, for
/// `docs/operating/render_dashboard.py` to draw the dashboard's panels from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn record_scrapes_for_the_dashboard_picture() {
    let dir = std::path::PathBuf::from(std::env::var("NS_SCRAPE_DIR").expect("NS_SCRAPE_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let handle = recorder();
    let shutdown = CancellationToken::new();
    neurostream::http::spawn_upkeep(handle.clone(), shutdown.clone());
    let progress = Arc::new(Progress::default());
    let broker = Broker::mock();
    let (url, store) = fresh_db().await;
    let mut config = config_for(&broker, 4, &url).await;
    config.profile = neurostream::config::Profile::Balanced;
    config.postgres.batch_rows = None;
    config.postgres.linger_ms = None;
    let run = tokio::spawn(neurostream::app::run(
        arc(&config),
        service_store(&store),
        progress.clone(),
        shutdown.clone(),
    ));
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", config.kafka.brokers.as_str())
        .create()
        .unwrap();
    let topic = config.kafka.input_topics[0].clone();
    let produce = tokio::spawn(async move {
        let started = Instant::now();
        for i in 0..48_000u64 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let payload = if i % 200 == 199 {
                "malformed".to_string()
            } else {
                format!(
                    r#"{{"key":"k{}","ts":{now},"value":{},"features":[{}.0,{}.5]}}"#,
                    i % 20,
                    i % 17,
                    (i % 3) * 10,
                    i % 2
                )
            };
            let record = rdkafka::producer::FutureRecord::<str, str>::to(&topic)
                .partition((i % 4) as i32)
                .payload(&payload);
            let _ = producer.send_result(record);
            let due = Duration::from_secs_f64(i as f64 / 800.0);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    });
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(66) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = handle.render();
        std::fs::write(dir.join(format!("{n:04}.prom")), text).unwrap();
        n += 1;
    }
    produce.await.unwrap();
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

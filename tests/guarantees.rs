//! The Guarantees section under attack, through `neurostream run` processes against Apache
//! Kafka itself and a real PostgreSQL:
//!
//! - the gauntlet: every poison message the decoder must refuse or the sink could not hold,
//!   interleaved with valid events on two partitions, a SIGKILL, a restart and more of both: the
//!   service never exits on its own, every valid event is counted in the windows, every other
//!   message is dead-lettered with its reason (oversized dead letters truncated), and the
//!   offsets Kafka's own tool reports equal the checkpoints;
//! - a leader of an input partition killed mid-stream in a three-broker cluster: the service
//!   keeps going and the rows are exact.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::kafka::KafkaCluster;
use common::*;
use neurostream::config::{Config, WindowConfig};
use neurostream::output::Output;
use neurostream::processor::{Processor, Record};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(120);

/// One input message as produced: payload, Kafka key, broker timestamp.
#[derive(Debug, Clone)]
struct Msg {
    payload: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    ts: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn valid(p: i32, i: usize, ts: i64) -> Msg {
    Msg {
        payload: Some(
            format!(
                r#"{{"key":"k{}","ts":{ts},"value":{}.25,"features":[{}.0,{}.5]}}"#,
                (i + p as usize) % 4,
                i % 13,
                (i % 3) * 10,
                p
            )
            .into_bytes(),
        ),
        key: Some(format!("mk{p}").into_bytes()),
        ts,
    }
}

/// Every poison of the guarantees issue, each with the dead-letter kind it must get.
fn poisons(ts: i64) -> Vec<(Msg, &'static str)> {
    let json = |s: String| Msg {
        payload: Some(s.into_bytes()),
        key: None,
        ts,
    };
    let out = vec![
        (
            json(format!(
                r#"{{"key":"a\u0000b","ts":{ts},"features":[1,2]}}"#
            )),
            "nul_character",
        ),
        (
            json(format!(r#"{{"id":"\u0000","ts":{ts},"features":[1,2]}}"#)),
            "nul_character",
        ),
        (
            Msg {
                payload: Some(format!(r#"{{"ts":{ts},"features":[1,2]}}"#).into_bytes()),
                key: Some(b"bad\0key".to_vec()),
                ts,
            },
            "nul_character",
        ),
        (
            json(r#"{"ts":-62200000000000,"features":[1,2]}"#.into()),
            "timestamp_out_of_range",
        ),
        (
            json(r#"{"ts":300000000000000,"features":[1,2]}"#.into()),
            "timestamp_out_of_range",
        ),
        (
            json(r#"{"ts":9000000000000000,"features":[1,2]}"#.into()),
            "timestamp_out_of_range",
        ),
        (
            json(format!(r#"{{"ts":{},"features":[1,2]}}"#, i64::MAX)),
            "timestamp_out_of_range",
        ),
        (
            json(format!(
                r#"{{"ts":{},"features":[1,2]}}"#,
                ts + 3 * 86_400_000
            )),
            "future_timestamp",
        ),
        (
            json(format!(
                r#"{{"key":"{}","ts":{ts},"features":[1,2]}}"#,
                "K".repeat(3_000)
            )),
            "key_too_long",
        ),
        (
            json(format!(
                r#"{{"key":"{}","ts":{ts},"features":[1,2]}}"#,
                "K".repeat(100_000)
            )),
            "key_too_long",
        ),
        (
            json(format!(r#"{{"ts":{ts},"value":1e300,"features":[1,2]}}"#)),
            "invalid_field",
        ),
        (
            json(format!(
                r#"{{"ts":{ts},"value":-1.7e308,"features":[1,2]}}"#
            )),
            "invalid_field",
        ),
        (
            json(format!(r#"{{"ts":{ts},"features":[1e300,2]}}"#)),
            "invalid_field",
        ),
        (json(format!(r#"["k",{ts},[1,2],5]"#)), "not_json"),
        (json(String::new()), "empty"),
        (
            Msg {
                payload: None,
                key: Some(b"tombstone".to_vec()),
                ts,
            },
            "empty",
        ),
        (
            json(format!(r#"{{"ts":{ts},"features":[1,2,3]}}"#)),
            "dimension_mismatch",
        ),
        // Dead letters too large for the dead-letter topic (max.message.bytes 500,000 below):
        // sent truncated, with a header giving the original size.
        (json("x".repeat(999_950)), "not_json"),
        (json("y".repeat(1_048_577)), "oversized"),
    ];
    out
}

/// A partition's messages: valid events with poisons spread between them.
fn partition_stream(
    p: i32,
    valid_count: usize,
    first_ts: i64,
    poison_ts: i64,
) -> Vec<(Msg, Option<&'static str>)> {
    let mut poisons = poisons(poison_ts).into_iter();
    let mut out = Vec::new();
    for i in 0..valid_count {
        out.push((valid(p, i, first_ts + i as i64 * 20), None));
        if i % 7 == 3 {
            if let Some((m, kind)) = poisons.next() {
                out.push((m, Some(kind)));
            }
        }
    }
    out.extend(poisons.map(|(m, k)| (m, Some(k))));
    out
}

async fn create_topic_with(brokers: &str, name: &str, partitions: i32, max_message_bytes: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1))
        .set("max.message.bytes", max_message_bytes);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics([&topic], &opts).await.unwrap() {
        r.unwrap();
    }
}

async fn send(brokers: &str, topic: &str, partitions: &[Vec<(Msg, Option<&'static str>)>]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "2000000")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for (p, msgs) in partitions.iter().enumerate() {
        for (m, _) in msgs {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .partition(p as i32)
                .timestamp(m.ts)
                .headers(OwnedHeaders::new());
            if let Some(k) = &m.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &m.payload {
                record = record.payload(v.as_slice());
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
}

fn service_config(brokers: &str, db_url: &str) -> (Config, u16) {
    let mut c = base_config(brokers, db_url);
    c.kafka.topic_partitions = Some(1);
    c.postgres.batch_rows = Some(40);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.http.address = Some(([127, 0, 0, 1], port).into());
    c.processing.windows = vec![WindowConfig {
        size_ms: 1_000,
        grace_ms: 100,
        ..WindowConfig::default()
    }];
    c.validate().unwrap();
    (c, port)
}

/// `config` written as the service's TOML file, in a directory that lives as long as the guard.
fn config_file(config: &Config) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neurostream.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    (dir, path)
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// What the pure processor makes of each partition's messages: per offset, accepted or the
/// rejection kind; and the final window counts per partition.
struct Replay {
    kinds: Vec<BTreeMap<i64, &'static str>>,
    accepted: Vec<usize>,
    window_rows: Vec<WindowRow>,
    /// Events the windows still held open at the end of input.
    open_events: i64,
}

fn replay(config: &Config, partitions: &[Vec<(Msg, Option<&'static str>)>]) -> Replay {
    let mut kinds = Vec::new();
    let mut accepted = Vec::new();
    let mut window_rows = Vec::new();
    let mut open_events = 0;
    let topic = &config.kafka.input_topics[0];
    for (p, msgs) in partitions.iter().enumerate() {
        let mut processor =
            Processor::new(&config.processing, config.kafka.max_event_bytes, p as i32);
        processor.set_wall_clock(now_ms());
        let mut out = Vec::new();
        let mut rejected = BTreeMap::new();
        let mut ok = 0;
        for (offset, (m, _)) in msgs.iter().enumerate() {
            let record = Record {
                payload: m.payload.as_deref(),
                key: m.key.as_deref(),
                timestamp_ms: Some(m.ts),
                offset: offset as i64,
            };
            match processor.process(record, &mut out) {
                Ok(_) => ok += 1,
                Err(e) => {
                    rejected.insert(offset as i64, e.kind());
                }
            }
        }
        let mut closing = Vec::new();
        processor.close_all(&mut closing);
        open_events += closing
            .iter()
            .filter_map(|e| match &e.output {
                Output::WindowAggregate(w) => Some(w.count as i64),
                _ => None,
            })
            .sum::<i64>();
        window_rows.extend(out.iter().filter_map(|e| WindowRow::from_output(topic, e)));
        kinds.push(rejected);
        accepted.push(ok);
    }
    Replay {
        kinds,
        accepted,
        window_rows,
        open_events,
    }
}

/// Every dead letter of `topic`: (source partition, source offset) → (kind, payload bytes,
/// truncated-from header).
fn dead_letters(
    brokers: &str,
    topic: &str,
) -> BTreeMap<(i32, i64), (String, usize, Option<String>)> {
    let mut out = BTreeMap::new();
    for m in read_topic(brokers, topic, None) {
        let p: i32 = header(&m, "neurostream.source.partition")
            .unwrap()
            .parse()
            .unwrap();
        let o: i64 = header(&m, "neurostream.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        let kind = header(&m, "neurostream.error.kind").unwrap().to_string();
        assert!(header(&m, "neurostream.error").is_some_and(|r| !r.is_empty()));
        let size = m.payload().map_or(0, <[u8]>::len);
        let truncated = header(&m, "neurostream.payload.truncated_from").map(String::from);
        out.insert((p, o), (kind, size, truncated));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauntlet_every_poison_is_dead_lettered_and_nothing_stops_the_service() {
    let Some(kafka) = KafkaCluster::start_or_skip(1) else {
        return;
    };
    let brokers = kafka.bootstrap();
    let (url, store) = fresh_db().await;
    let (config, port) = service_config(&brokers, &url);
    let input = config.kafka.input_topics[0].clone();
    create_topic_with(&brokers, &input, 2, "2000000").await;
    // The dead-letter topic refuses messages over 500,000 bytes: the service must truncate.
    create_topic_with(&brokers, &config.kafka.topics.dlq, 1, "500000").await;
    let (_dir, path) = config_file(&config);

    let base = now_ms() - 3_600_000;
    let first: Vec<_> = (0..2)
        .map(|p| partition_stream(p, 150, base, base + 5_000))
        .collect();
    send(&brokers, &input, &first).await;

    let mut service = spawn_run(&path, "warn,librdkafka=off");
    let ends: Vec<i64> = first.iter().map(|m| m.len() as i64).collect();
    wait_for_checkpoints(&store, &config.kafka.group_id, &ends, WAIT).await;
    assert!(
        service.try_wait().unwrap().is_none(),
        "the service exited on its own"
    );
    let (status, text) = http_get(port, "/health");
    assert_eq!(status, 200, "{text}");
    let (status, text) = http_get(port, "/ready");
    assert_eq!(status, 200, "{text}");
    service.kill().unwrap(); // SIGKILL
    service.wait().unwrap();

    // More valid events and every poison again while the service is down, then a restart.
    let second: Vec<_> = (0..2)
        .map(|p| partition_stream(p, 150, base + 3_000 + 150 * 20, base + 20_000))
        .collect();
    send(&brokers, &input, &second).await;
    let all: Vec<Vec<_>> = first
        .iter()
        .zip(&second)
        .map(|(a, b)| a.iter().chain(b).cloned().collect())
        .collect();
    let mut service = spawn_run(&path, "warn,librdkafka=off");
    let ends: Vec<i64> = all.iter().map(|m| m.len() as i64).collect();
    wait_for_checkpoints(&store, &config.kafka.group_id, &ends, WAIT).await;
    assert!(
        service.try_wait().unwrap().is_none(),
        "the service exited on its own"
    );
    // SIGTERM: drain, checkpoint, commit, exit 0.
    Command::new("kill")
        .arg(service.id().to_string())
        .status()
        .unwrap();
    let status = service.wait().unwrap();
    assert!(status.success(), "a clean stop exits 0, got {status}");

    // Every message is counted or dead-lettered with the kind the pure processor gives it...
    let replay = replay(&config, &all);
    for (p, msgs) in all.iter().enumerate() {
        for (offset, (_, expected)) in msgs.iter().enumerate() {
            assert_eq!(
                replay.kinds[p].get(&(offset as i64)).copied(),
                *expected,
                "partition {p} offset {offset}: the decoder's verdict"
            );
        }
    }
    let dead = dead_letters(&brokers, &config.kafka.topics.dlq);
    let expected_dead: BTreeSet<(i32, i64)> = replay
        .kinds
        .iter()
        .enumerate()
        .flat_map(|(p, k)| k.keys().map(move |o| (p as i32, *o)))
        .collect();
    assert_eq!(dead.keys().copied().collect::<BTreeSet<_>>(), expected_dead);
    for ((p, o), (kind, size, truncated)) in &dead {
        assert_eq!(kind, replay.kinds[*p as usize][o], "dead letter {p}/{o}");
        if *size > 500_000 || truncated.is_some() {
            assert_eq!(*size, 65_536, "dead letter {p}/{o} is truncated to 64 KiB");
            let original: usize = truncated.as_deref().unwrap().parse().unwrap();
            assert!(original >= 999_950, "{p}/{o}: {original}");
        }
    }
    assert_eq!(
        dead.values().filter(|d| d.2.is_some()).count(),
        8,
        "two oversized dead letters per partition and round"
    );
    // ...every valid event is counted in the windows, row by row as the pure processor...
    let mut expected = replay.window_rows.clone();
    expected.retain(|r| r.is_final);
    let mut stored = stored_rows(&store).await;
    stored.retain(|r| r.is_final);
    // Every accepted event is in a stored final window or in a window still open at the end.
    let counted: i64 = stored.iter().map(|r| r.count).sum();
    assert_eq!(
        counted + replay.open_events,
        replay.accepted.iter().sum::<usize>() as i64
    );
    assert_eq!(
        replay.accepted.iter().sum::<usize>(),
        600,
        "every valid event accepted"
    );
    let key = |r: &WindowRow| {
        (
            r.partition,
            r.window_start_ms,
            r.key.clone(),
            r.count,
            r.sum.to_bits(),
        )
    };
    let mut got: Vec<_> = stored.iter().map(key).collect();
    let mut want: Vec<_> = expected.iter().map(key).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "final window rows");
    // ...and the committed offsets Kafka's own tool reports are the checkpoints, which are the
    // log ends.
    let checkpoints = checkpoint_map(&store, &config.kafka.group_id).await;
    let described = kafka.committed_offsets(&config.kafka.group_id);
    assert_eq!(described.len(), 2, "{described:?}");
    for (topic, p, committed, log_end, lag) in described {
        assert_eq!(topic, input);
        assert_eq!(committed, Some(checkpoints[&p]), "partition {p}");
        assert_eq!(committed, Some(log_end), "partition {p}");
        assert_eq!(lag, Some(0));
    }
}

/// The broker refuses a whole batch for the topic's `max.message.bytes` (here the dead-letter
/// topic's, lowered to 500,000 bytes after start-up, under the `latency` profile's
/// 1,000,000-byte `batch.size`; at start-up the service lowers its `batch.size` to the
/// smallest limit it sees), and librdkafka fails every message in it with "too large". Each
/// is judged alone: 10 kB dead letters arrive whole, none cut or reduced to a stub for the
/// company it was sent in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_that_fit_alone_are_not_cut_for_their_batch() {
    let Some(kafka) = KafkaCluster::start_or_skip(1) else {
        return;
    };
    let brokers = kafka.bootstrap();
    let (url, store) = fresh_db().await;
    let (mut config, port) = service_config(&brokers, &url);
    // Whole flushes of 200 dead letters: about 2 MB for the dead-letter topic at once.
    config.kafka.partition_queue_capacity = 4_096;
    config.kafka.partition_queue_bytes = 8 << 20;
    config.postgres.batch_rows = Some(200);
    config.postgres.linger_ms = Some(500);
    config.validate().unwrap();
    let input = config.kafka.input_topics[0].clone();
    create_topic_with(&brokers, &input, 1, "2000000").await;
    create_topic_with(&brokers, &config.kafka.topics.dlq, 1, "2000000").await;
    let (_dir, path) = config_file(&config);

    let ts = now_ms() - 60_000;
    // Started with every topic taking 2,000,000-byte batches (the output topics are created
    // with the broker's default, 1,048,588), then the dead-letter topic's limit goes down.
    let mut service = spawn_run(&path, "warn,librdkafka=off");
    send(&brokers, &input, &[vec![(valid(0, 0, ts), None)]]).await;
    wait_for_checkpoints(&store, &config.kafka.group_id, &[1], WAIT).await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let lower = AlterConfig::new(ResourceSpecifier::Topic(&config.kafka.topics.dlq))
        .set("max.message.bytes", "500000");
    for r in admin
        .alter_configs([&lower], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    assert_eq!(
        neurostream::kafka::smallest_message_limit(&config).await,
        Some((config.kafka.topics.dlq.clone(), 500_000)),
        "what a start-up now would cap batch.size at"
    );

    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let messages: Vec<(Msg, Option<&'static str>)> = (0..400)
        .map(|_| {
            // Not JSON, and incompressible.
            let payload: Vec<u8> = (0..10_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b'!' + (x % 90) as u8
                })
                .collect();
            let msg = Msg {
                payload: Some(payload),
                key: Some(b"k".to_vec()),
                ts,
            };
            (msg, Some("not_json"))
        })
        .collect();
    send(&brokers, &input, std::slice::from_ref(&messages)).await;
    wait_for_checkpoints(&store, &config.kafka.group_id, &[401], WAIT).await;
    let (_, metrics) = http_get(port, "/metrics");
    let resent: u64 = metrics
        .lines()
        .find(|l| l.starts_with("neurostream_produce_resent_in_halves_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no re-send counter in {metrics}"));
    // Whatever went in batches under the limit was not refused; the rest was re-sent.
    assert!(resent > 0, "the halving ran");
    service.kill().unwrap();
    service.wait().unwrap();
    let dead = dead_letters(&brokers, &config.kafka.topics.dlq);
    assert_eq!(dead.len(), 400);
    assert_eq!(
        dead.keys().next(),
        Some(&(0, 1)),
        "the valid event is not dead-lettered"
    );
    for ((_, offset), (kind, size, truncated)) in &dead {
        assert_eq!(kind, "not_json");
        assert_eq!(
            (*size, truncated),
            (10_000, &None),
            "dead letter at offset {offset}"
        );
    }
}

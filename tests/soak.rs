//! Faults under sustained load, against a three-broker Apache Kafka cluster (replication factor
//! 3) and a real PostgreSQL, through `neurostream run` processes:
//!
//! - failover: the leader of an input partition is killed mid-stream; the service keeps going
//!   and the rows are exact;
//! - soak (bounded, about two minutes): sustained production while the service is SIGKILLed and
//!   restarted twice, a second instance joins and leaves, PostgreSQL is killed and restarted, and
//!   an input partition's leader broker is killed and restarted. At the end every PostgreSQL row
//!   equals a clean replay, every expected Kafka output is present, duplicates are only exact
//!   replays, and the committed offsets (Kafka's own tool) equal the checkpoints.
//!
//! The two tests run one after the other (three JVMs each on a 2-core machine).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::kafka::KafkaCluster;
use common::*;
use neurostream::config::Config;
use neurostream::output::Output;
use neurostream::pgserver::Durability;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(240);

/// One three-broker cluster at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Output payloads by (source partition, source offset, seq).
type BySource = BTreeMap<(i32, i64, u32), Vec<Vec<u8>>>;

fn run_service(config_path: &Path) -> Child {
    let log = std::env::var("NS_SOAK_LOG").unwrap_or("error,librdkafka=off".into());
    spawn_run(config_path, &log)
}

fn sigterm(child: &mut Child) {
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "a SIGTERMed instance exits 0, got {status}"
    );
}

fn sigkill(child: &mut Child) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "the service exited on its own"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Produces `messages[p][i]` to partition `p`, interleaving partitions, at about `rate`
/// messages per second (acks=all, idempotent: no loss, no duplicates, through leader changes).
async fn produce_paced(brokers: String, topic: String, messages: Vec<Vec<Vec<u8>>>, rate: u64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let started = Instant::now();
    let longest = messages.iter().map(Vec::len).max().unwrap_or(0);
    let mut sent = 0u64;
    let mut pending = Vec::new();
    for i in 0..longest {
        for (p, msgs) in messages.iter().enumerate() {
            let Some(m) = msgs.get(i) else { continue };
            let record = FutureRecord::<str, [u8]>::to(&topic)
                .partition(p as i32)
                .payload(m.as_slice())
                .timestamp(1);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            sent += 1;
        }
        if i % 50 == 49 {
            for d in pending.drain(..) {
                d.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Every message of `topic`: (source partition, source offset, seq) → payloads seen, and the
/// total read.
fn outputs_by_source(brokers: &str, topic: &str) -> (BySource, usize) {
    let messages = read_topic(brokers, topic, None);
    let mut out = BySource::new();
    for m in &messages {
        let number = |k: &str| {
            header(m, k)
                .unwrap_or_else(|| panic!("output without header {k}"))
                .to_string()
        };
        let key = (
            number("neurostream.source.partition").parse().unwrap(),
            number("neurostream.source.offset").parse().unwrap(),
            number("neurostream.source.seq").parse().unwrap(),
        );
        out.entry(key)
            .or_default()
            .push(m.payload().unwrap_or_default().to_vec());
    }
    (out, messages.len())
}

/// Waits until the leader of `topic`/`partition` is a live node other than `dead`.
fn wait_new_leader(kafka: &KafkaCluster, topic: &str, partition: i32, dead: i32) -> i32 {
    let started = Instant::now();
    loop {
        let leader = kafka.leader_of(topic, partition);
        if leader >= 0 && leader != dead {
            return leader;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no new leader for {topic}/{partition}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A three-broker cluster with the input topic (replication 3) and a service configuration for
/// it, or `None` (test skipped) when the Kafka jars are not installed and not required.
async fn cluster_and_config(partitions: i32, db_url: &str) -> Option<(KafkaCluster, Config)> {
    let kafka = KafkaCluster::start_or_skip(3)?;
    let mut config = base_config(&kafka.bootstrap(), db_url);
    kafka
        .create_topic(&config.kafka.input_topics[0], partitions, 3)
        .await;
    // The service creates its output topics with replication 3 (min.insync.replicas 2).
    config.kafka.topic_replication_factor = Some(3);
    config.kafka.topic_partitions = Some(1);
    config.postgres.retry_max_backoff_ms = 500;
    Some((kafka, config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_an_input_leader_killed_mid_stream_keeps_rows_exact() {
    let _serial = SERIAL.lock().await;
    let (url, store) = fresh_db().await;
    let Some((mut kafka, config)) = cluster_and_config(2, &url).await else {
        return;
    };
    let topic = config.kafka.input_topics[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neurostream.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();

    let all: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 4_000)).collect();
    let producing = tokio::spawn(produce_paced(
        kafka.bootstrap(),
        topic.clone(),
        all.clone(),
        1_000,
    ));
    let mut service = run_service(&path);
    let started = Instant::now();
    while checkpoint_map(&store, &config.kafka.group_id)
        .await
        .values()
        .sum::<i64>()
        < 1_500
    {
        assert!(started.elapsed() < WAIT, "no progress before the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = kafka.leader_of(&topic, 0);
    kafka.kill(leader);
    let new_leader = wait_new_leader(&kafka, &topic, 0, leader);
    println!("failover: killed broker {leader}, partition 0 now led by {new_leader}");
    producing.await.unwrap();
    wait_for_checkpoints(&store, &config.kafka.group_id, &[4_000, 4_000], WAIT).await;
    sigterm(&mut service);

    assert_rows_eq(&stored_rows(&store).await, &expected_rows(&config, &all));
    assert_eq!(
        stored_cluster_rows(&store).await,
        expected_cluster_rows(&config, &all)
    );
    kafka.restart(leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_kills_rebalances_outages_and_failover_leave_every_row_exact() {
    let _serial = SERIAL.lock().await;
    let (mut pg, url, store) = own_postgres().await;
    let Some((mut kafka, config)) = cluster_and_config(4, &url).await else {
        return;
    };
    let topic = config.kafka.input_topics[0].clone();
    let group = config.kafka.group_id.clone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neurostream.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();

    const PER_PARTITION: usize = 12_000;
    let all: Vec<Vec<Vec<u8>>> = (0..4).map(|p| stream(p, PER_PARTITION)).collect();
    // 48,000 events at 600/s: production lasts about 80 s, the faults happen meanwhile.
    let producing = tokio::spawn(produce_paced(
        kafka.bootstrap(),
        topic.clone(),
        all.clone(),
        600,
    ));
    let started = Instant::now();
    let at = |s: u64| async move {
        if let Some(wait) = Duration::from_secs(s).checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    };
    let mut log = Vec::new();
    let mut a = run_service(&path);

    at(10).await;
    sigkill(&mut a);
    a = run_service(&path);
    log.push(format!(
        "{:>5.1} s SIGKILL instance A, restarted",
        started.elapsed().as_secs_f64()
    ));

    at(20).await;
    let mut b = run_service(&path);
    log.push(format!(
        "{:>5.1} s instance B joins",
        started.elapsed().as_secs_f64()
    ));

    at(32).await;
    sigterm(&mut b);
    log.push(format!(
        "{:>5.1} s instance B leaves (SIGTERM)",
        started.elapsed().as_secs_f64()
    ));

    at(40).await;
    pg.kill();
    log.push(format!(
        "{:>5.1} s PostgreSQL killed",
        started.elapsed().as_secs_f64()
    ));
    at(46).await;
    pg.restart(Durability::Default).unwrap();
    log.push(format!(
        "{:>5.1} s PostgreSQL restarted",
        started.elapsed().as_secs_f64()
    ));

    at(54).await;
    let leader = kafka.leader_of(&topic, 1);
    kafka.kill(leader);
    let new_leader = wait_new_leader(&kafka, &topic, 1, leader);
    log.push(format!(
        "{:>5.1} s broker {leader} (leader of partition 1) killed; new leader {new_leader}",
        started.elapsed().as_secs_f64()
    ));
    at(66).await;
    kafka.restart(leader);
    log.push(format!(
        "{:>5.1} s broker {leader} restarted",
        started.elapsed().as_secs_f64()
    ));

    at(72).await;
    sigkill(&mut a);
    a = run_service(&path);
    log.push(format!(
        "{:>5.1} s SIGKILL instance A, restarted",
        started.elapsed().as_secs_f64()
    ));

    producing.await.unwrap();
    log.push(format!(
        "{:>5.1} s production done",
        started.elapsed().as_secs_f64()
    ));
    let ends = vec![PER_PARTITION as i64; 4];
    wait_for_checkpoints(&store, &group, &ends, WAIT).await;
    log.push(format!(
        "{:>5.1} s every checkpoint at the log end",
        started.elapsed().as_secs_f64()
    ));
    sigterm(&mut a);

    // PostgreSQL: every row equals the clean replay.
    let expected = expected_rows(&config, &all);
    assert_rows_eq(&stored_rows(&store).await, &expected);
    let clusters = expected_cluster_rows(&config, &all);
    assert_eq!(stored_cluster_rows(&store).await, clusters);
    // Kafka: every expected final window is there; a (source, seq) seen twice is an exact replay.
    let (windows, read) = outputs_by_source(&kafka.bootstrap(), &config.kafka.topics.windows);
    let mut replayed = 0;
    for (source, payloads) in &windows {
        assert!(
            payloads.iter().all(|p| p == &payloads[0]),
            "outputs of {source:?} differ: not a replay"
        );
        replayed += payloads.len() - 1;
    }
    let mut expected_finals = BTreeSet::new();
    for (p, e) in common::replay(&config, &all) {
        if let Output::WindowAggregate(w) = e.output {
            expected_finals.insert((p, w.key, w.size_ms, w.window_start));
        }
    }
    let mut seen_finals = BTreeSet::new();
    for payloads in windows.values() {
        let v: serde_json::Value = serde_json::from_slice(&payloads[0]).unwrap();
        seen_finals.insert((
            v["partition"].as_i64().unwrap() as i32,
            v["key"].as_str().unwrap().to_string(),
            v["size_ms"].as_u64().unwrap(),
            v["window_start"].as_i64().unwrap(),
        ));
    }
    let missing: Vec<_> = expected_finals.difference(&seen_finals).take(5).collect();
    assert!(
        missing.is_empty(),
        "window outputs missing on Kafka: {missing:?}"
    );
    // Committed offsets, as Kafka's own tool reports them, are the checkpoints.
    let described = kafka.committed_offsets(&group);
    let checkpoints = checkpoint_map(&store, &group).await;
    assert_eq!(described.len(), 4, "{described:?}");
    for (_, p, committed, log_end, _) in &described {
        assert_eq!(*committed, Some(checkpoints[p]), "partition {p}");
        assert_eq!(*committed, Some(*log_end), "partition {p}");
    }
    println!("soak timeline:\n  {}", log.join("\n  "));
    println!(
        "soak counts: {} events on 4 partitions; {} window rows and {} cluster-history rows exact in PostgreSQL; {} window messages on Kafka ({} exact replays, 0 missing); committed offsets {:?}",
        4 * PER_PARTITION,
        expected.len(),
        clusters.updates.len(),
        read,
        replayed,
        described.iter().map(|d| d.2).collect::<Vec<_>>()
    );
}

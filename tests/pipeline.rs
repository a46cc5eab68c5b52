//! The pipeline end to end against real brokers (the in-process mock cluster and Apache Kafka)
//! and a real PostgreSQL server: exactness, dead letters, crash recovery, rebalancing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use neurostream::telemetry::Progress;
use rdkafka::message::{Message, OwnedMessage};

const WAIT: Duration = Duration::from_secs(90);

fn with_malformed(mut msgs: Vec<Vec<Vec<u8>>>, max_bytes: usize) -> Vec<Vec<Vec<u8>>> {
    let bad: Vec<Vec<u8>> = vec![
        b"this is not json".to_vec(),
        br#"{"key":"k1","ts":1000100,"features":[1.0,"x"]}"#.to_vec(),
        br#"{"key":"k1","ts":1000100,"value":NaN}"#.to_vec(),
        format!(r#"{{"key":"{}","ts":1000100}}"#, "x".repeat(max_bytes)).into_bytes(),
        br#"{"key":"k1","ts":1000100,"features":[1.0,2.0,3.0]}"#.to_vec(),
    ];
    let p = &mut msgs[1];
    for (i, b) in bad.into_iter().enumerate() {
        p.insert(10 + i * 37, b);
    }
    msgs
}

async fn end_to_end(broker: Broker) {
    let (url, store) = fresh_db().await;
    let mut config = config_for(&broker, 3, &url).await;
    config.kafka.max_event_bytes = 4_096;
    let messages = with_malformed((0..3).map(|p| stream(p, 400)).collect(), 4_096);
    produce(
        &config.kafka.brokers,
        &config.kafka.input_topics[0],
        &messages,
    )
    .await;

    let (shutdown, progress, handle) = spawn_service(&config, &store);
    let ends: Vec<i64> = messages.iter().map(|m| m.len() as i64).collect();
    wait_for_checkpoints(&store, &config.kafka.group_id, &ends, WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();

    let expected = expected_rows(&config, &messages);
    assert!(expected.len() > 100, "the stream closes many windows");
    assert_rows_eq(&stored_rows(&store).await, &expected);
    let snap = progress.snapshot();
    assert_eq!(snap.dead_letters, 5);
    assert_eq!(snap.events, 3 * 400);

    // Dead letters: original bytes, reason and source coordinates in headers.
    let dlq = read_topic(&config.kafka.brokers, &config.kafka.topics.dlq, Some(5));
    let mut kinds: Vec<&str> = dlq
        .iter()
        .map(|m| header(m, "neurostream.error.kind").unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "dimension_mismatch",
            "invalid_field",
            "not_json",
            "not_json",
            "oversized"
        ]
    );
    for m in &dlq {
        assert_eq!(header(m, "neurostream.source.partition"), Some("1"));
        assert_eq!(
            header(m, "neurostream.source.topic"),
            Some(config.kafka.input_topics[0].as_str())
        );
        let offset: usize = header(m, "neurostream.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(m.payload().unwrap(), messages[1][offset].as_slice());
        assert!(!header(m, "neurostream.error").unwrap().is_empty());
    }

    // Window outputs reached Kafka too, each with its source offset.
    let windows = read_topic(
        &config.kafka.brokers,
        &config.kafka.topics.windows,
        Some(expected.len()),
    );
    assert_eq!(windows.len(), expected.len());
    // In source order per source partition (one output partition here): a flush's delivery
    // overlaps the next batch's processing, never the next delivery.
    let mut last = std::collections::BTreeMap::new();
    for m in &windows {
        let source: i64 = header(m, "neurostream.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        let partition = header(m, "neurostream.source.partition")
            .unwrap()
            .to_string();
        let before = last.insert(partition, source).unwrap_or(-1);
        assert!(before <= source, "source offset {source} after {before}");
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(v["type"], "window_aggregate");
    }
    assert_eq!(last.len(), 3, "every source partition closed windows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_exact_with_dead_letters_mock() {
    end_to_end(Broker::mock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_exact_with_dead_letters_kafka() {
    if let Some(broker) = Broker::kafka() {
        end_to_end(broker).await;
    }
}

/// SIGKILLs a `neurostream run` process mid-stream, restarts it, and compares row by row.
/// The crash test's input: `stream`, or with `wide` 1,500 keys, whose 20 s windows stay open
/// across the crash and close after the restart (their finals show the state came back whole):
/// the state is large beside what one batch changes, so the checkpoints are mostly deltas.
fn crash_stream(wide: bool, partition: i32, n: usize) -> Vec<Vec<u8>> {
    if !wide {
        return stream(partition, n);
    }
    (0..n)
        .map(|i| {
            let ts = 1_000_000 + (i as i64) * 7 - ((i as i64 * 13) % 40);
            format!(
                r#"{{"key":"w{}","ts":{ts},"value":{}.25,"features":[{}.0,1.0]}}"#,
                (i * 7 + partition as usize) % 1_500,
                i % 23,
                partition
            )
            .into_bytes()
        })
        .collect()
}

async fn crash_and_restart(broker: Broker, wide: bool) {
    let (url, store) = fresh_db().await;
    let mut config = config_for(&broker, 2, &url).await;
    if wide {
        config
            .processing
            .windows
            .push(neurostream::config::WindowConfig {
                size_ms: 20_000,
                ..Default::default()
            });
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neurostream.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_neurostream"))
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let first: Vec<Vec<Vec<u8>>> = (0..2).map(|p| crash_stream(wide, p, 3_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &first).await;

    let mut child = spawn();
    let started = Instant::now();
    loop {
        let done = checkpointed(&store, &config.kafka.group_id).await;
        let deltas: (i64,) = sqlx::query_as("SELECT count(*) FROM partition_checkpoint_deltas")
            .fetch_one(store.pool())
            .await
            .unwrap();
        if done > 200 && (!wide || deltas.0 > 0) {
            assert!(
                done < 6_000,
                "the crash must come mid-stream, got {done} of 6000 done"
            );
            break;
        }
        assert!(started.elapsed() < WAIT, "no progress before the crash");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL: no drain, no flush, no commit
    child.wait().unwrap();

    // More data arrives while the service is down.
    let more: Vec<Vec<Vec<u8>>> = (0..2)
        .map(|p| crash_stream(wide, p, 4_000).split_off(3_000))
        .collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &more).await;
    let all: Vec<Vec<Vec<u8>>> = (0..2).map(|p| crash_stream(wide, p, 4_000)).collect();

    let mut child = spawn();
    wait_for_checkpoints(&store, &config.kafka.group_id, &[4_000, 4_000], WAIT).await;
    // SIGTERM-free stop is fine here: everything is durable already.
    child.kill().unwrap();
    child.wait().unwrap();

    let expected = expected_rows(&config, &all);
    assert_rows_eq(&stored_rows(&store).await, &expected);
    let clusters = expected_cluster_rows(&config, &all);
    assert!(!clusters.updates.is_empty(), "the stream forms clusters");
    assert_eq!(stored_cluster_rows(&store).await, clusters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_restart_is_exact_mock() {
    crash_and_restart(Broker::mock(), false).await;
}

/// The same through checkpoint deltas: the crash comes after deltas were written, the restart
/// restores base + deltas, and every row is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_delta_checkpoints_then_restart_is_exact_mock() {
    crash_and_restart(Broker::mock(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_restart_is_exact_kafka() {
    if let Some(broker) = Broker::kafka() {
        crash_and_restart(broker, false).await;
    }
}

/// Two instances share the partitions; one leaves; the other takes over from the checkpoints.
async fn rebalance(broker: Broker) {
    let (url, store) = fresh_db().await;
    let config = config_for(&broker, 4, &url).await;
    let first: Vec<Vec<Vec<u8>>> = (0..4).map(|p| stream(p, 1_500)).collect();

    let (stop_a, progress_a, a) = spawn_service(&config, &store);
    wait_assigned(&progress_a, 4).await;
    // Stagger the second join (a Tansu limitation with simultaneous joins).
    let (stop_b, progress_b, b) = spawn_service(&config, &store);
    let started = Instant::now();
    while assigned(&progress_a) + assigned(&progress_b) != 4
        || assigned(&progress_b) == 0
        || assigned(&progress_a) == 0
    {
        assert!(
            started.elapsed() < WAIT,
            "the two instances never shared the partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &first).await;
    let started = Instant::now();
    while checkpointed(&store, &config.kafka.group_id).await < 1_000 {
        assert!(started.elapsed() < WAIT, "no progress with two instances");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_had: Vec<String> = owned(&progress_a);
    // A leaves cleanly mid-stream; B must take A's partitions from their checkpoints.
    stop_a.cancel();
    a.await.unwrap().unwrap();
    let more: Vec<Vec<Vec<u8>>> = (0..4).map(|p| stream(p, 2_500).split_off(1_500)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &more).await;
    wait_for_checkpoints(&store, &config.kafka.group_id, &[2_500; 4], WAIT).await;
    let b_has = owned(&progress_b);
    for tp in &a_had {
        assert!(b_has.contains(tp), "B did not take over {tp}: {b_has:?}");
    }
    stop_b.cancel();
    b.await.unwrap().unwrap();

    let all: Vec<Vec<Vec<u8>>> = (0..4).map(|p| stream(p, 2_500)).collect();
    let expected = expected_rows(&config, &all);
    assert_rows_eq(&stored_rows(&store).await, &expected);
    assert_eq!(
        stored_cluster_rows(&store).await,
        expected_cluster_rows(&config, &all)
    );
}

fn assigned(progress: &Progress) -> usize {
    owned(progress).len()
}

fn owned(progress: &Progress) -> Vec<String> {
    progress
        .snapshot()
        .partitions
        .into_iter()
        .filter(|(_, s)| s.assigned)
        .map(|(tp, _)| tp)
        .collect()
}

async fn wait_assigned(progress: &Progress, n: usize) {
    let started = Instant::now();
    while assigned(progress) != n {
        assert!(started.elapsed() < WAIT, "partitions never assigned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_hands_partitions_over_exactly_mock() {
    rebalance(Broker::mock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_hands_partitions_over_exactly_kafka() {
    if let Some(broker) = Broker::kafka() {
        rebalance(broker).await;
    }
}

/// PostgreSQL goes away mid-stream: consumption pauses and retries; after it returns, the
/// stored rows are exactly a clean run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_pauses_then_resumes_exactly_mock() {
    use neurostream::pgserver::Durability;
    let broker = Broker::mock();
    let (mut server, url, store) = own_postgres().await;
    let mut config = config_for(&broker, 2, &url).await;
    config.postgres.retry_max_backoff_ms = 200;
    let first: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 1_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &first).await;
    let (shutdown, _progress, handle) = spawn_service(&config, &store);
    wait_for_checkpoints(&store, &config.kafka.group_id, &[1_000, 1_000], WAIT).await;

    server.kill();
    let more: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 3_000).split_off(1_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &more).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // workers fail, back off, partitions pause
    server.restart(Durability::Default).unwrap();

    wait_for_checkpoints(&store, &config.kafka.group_id, &[3_000, 3_000], WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    let all: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 3_000)).collect();
    assert_rows_eq(&stored_rows(&store).await, &expected_rows(&config, &all));
}

/// Another owner claims partition 0 behind the service's back (a newer epoch in
/// `partition_owners`): its worker is fenced at its next commit, writes nothing, and the
/// partition is reported as waiting for the group (so `/health` fails if no rebalance comes);
/// partition 1 goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_partition_writes_nothing_and_is_reported() {
    let broker = Broker::mock();
    let (url, store) = fresh_db().await;
    let config = config_for(&broker, 2, &url).await;
    let first: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 1_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &first).await;
    let (shutdown, progress, handle) = spawn_service(&config, &store);
    wait_for_checkpoints(&store, &config.kafka.group_id, &[1_000, 1_000], WAIT).await;

    sqlx::query("UPDATE partition_owners SET epoch = epoch + 1000 WHERE partition = 0")
        .execute(store.pool())
        .await
        .unwrap();
    let more: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 2_000).split_off(1_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &more).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let reported = loop {
        let snapshot = progress.snapshot();
        let fenced = snapshot.partitions.iter().find_map(|(name, p)| {
            p.retrying
                .as_deref()
                .filter(|why| why.starts_with("fenced"))
                .map(|why| format!("{name}: {why}"))
        });
        if let Some(fenced) = fenced {
            break fenced;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no partition reported fenced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reported.contains("/0: fenced"), "{reported}");
    let checkpoints = checkpoint_map(&store, &config.kafka.group_id).await;
    assert_eq!(
        checkpoints.get(&0),
        Some(&1_000),
        "the fenced worker wrote nothing"
    );
    wait_for_checkpoints(&store, &config.kafka.group_id, &[1_000, 2_000], WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
}

/// PostgreSQL is down while the partitions are assigned: they are assigned paused, their workers
/// claim them once PostgreSQL is back and have them positioned at the checkpoints (here far
/// ahead of where the consumer group would start); nothing is processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_assigned_while_postgres_is_down_start_at_their_checkpoints() {
    use neurostream::pgserver::Durability;
    let broker = Broker::mock();
    let (mut server, url, store) = own_postgres().await;
    let mut config = config_for(&broker, 2, &url).await;
    config.postgres.retry_max_backoff_ms = 200;
    let first: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 1_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &first).await;
    let (shutdown, _progress, handle) = spawn_service(&config, &store);
    wait_for_checkpoints(&store, &config.kafka.group_id, &[1_000, 1_000], WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();

    // A new group that has committed nothing (so it would start at 0) inherits the
    // checkpoints: only they know where the partitions stand.
    let group = format!("{}_moved", config.kafka.group_id);
    for table in [
        "partition_checkpoints",
        "partition_checkpoint_deltas",
        "partition_owners",
    ] {
        sqlx::query(&format!(
            "UPDATE {table} SET group_id = $1 WHERE group_id = $2"
        ))
        .bind(&group)
        .bind(&config.kafka.group_id)
        .execute(store.pool())
        .await
        .unwrap();
    }
    config.kafka.group_id = group;

    let more: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 2_000).split_off(1_000)).collect();
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &more).await;
    server.kill();
    let (shutdown, progress, handle) = spawn_service(&config, &store);
    wait_assigned(&progress, 2).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // claims fail at assignment; workers retry
    server.restart(Durability::Default).unwrap();
    wait_for_checkpoints(&store, &config.kafka.group_id, &[2_000, 2_000], WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    let all: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 2_000)).collect();
    assert_rows_eq(&stored_rows(&store).await, &expected_rows(&config, &all));
    assert_eq!(
        stored_cluster_rows(&store).await,
        expected_cluster_rows(&config, &all)
    );
}

/// Polls partition 0 of `topic` from the beginning for the first message that came from input
/// offset `offset` (30 s at most).
async fn output_of_offset(brokers: &str, topic: &str, offset: i64) -> Option<OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader_{}", unique()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let m = m.detach();
                let from = header(&m, "neurostream.source.offset").and_then(|o| o.parse().ok());
                if from == Some(offset) {
                    return Some(m);
                }
            }
        }
        None
    })
    .await
    .unwrap()
}

/// `postgres.commit_interval_ms` spaces a partition's transactions, not its outputs: an event
/// processed right after a commit reaches Kafka within the linger, and PostgreSQL only when the
/// interval since that commit began is over. A stop commits what waits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_interval_spaces_transactions_not_outputs_mock() {
    const INTERVAL: Duration = Duration::from_secs(10);
    let broker = Broker::mock();
    let (url, store) = fresh_db().await;
    let mut config = config_for(&broker, 1, &url).await;
    config.postgres.commit_interval_ms = Some(INTERVAL.as_millis() as u64);
    for w in &mut config.processing.windows {
        w.emit = neurostream::config::EmitMode::Update;
    }
    let (brokers, input) = (
        config.kafka.brokers.clone(),
        config.kafka.input_topics[0].clone(),
    );
    let (group, windows) = (
        config.kafka.group_id.clone(),
        config.kafka.topics.windows.clone(),
    );
    let events = stream(0, 3);
    let one = |i: usize| vec![vec![events[i].clone()]];

    // The first transaction starts at the first flush.
    let started = Instant::now();
    produce(&brokers, &input, &one(0)).await;
    let (shutdown, _progress, handle) = spawn_service(&config, &store);
    wait_for_checkpoints(&store, &group, &[1], WAIT).await;

    // The next event's output is on Kafka; its checkpoint waits for the interval.
    produce(&brokers, &input, &one(1)).await;
    let out = output_of_offset(&brokers, &windows, 1).await;
    assert!(
        out.is_some(),
        "the window update of offset 1 never reached Kafka"
    );
    let seen = started.elapsed();
    let checkpoint = checkpoint_map(&store, &group).await[&0];
    if seen < INTERVAL {
        // The second transaction cannot have started: the first began after `started`.
        assert_eq!(
            checkpoint, 1,
            "committed {seen:?} after the first transaction began"
        );
    }
    wait_for_checkpoints(&store, &group, &[2], WAIT).await;
    assert!(started.elapsed() >= INTERVAL);

    // A stop does not wait for the interval: offset 2 is committed when `run` returns, sooner
    // than the third transaction could start by the interval (2 × INTERVAL after `started`).
    produce(&brokers, &input, &one(2)).await;
    assert!(output_of_offset(&brokers, &windows, 2).await.is_some());
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert!(
        started.elapsed() < 2 * INTERVAL,
        "the stop waited for the interval"
    );
    assert_eq!(checkpoint_map(&store, &group).await[&0], 3);
}

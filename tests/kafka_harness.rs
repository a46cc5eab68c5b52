//! The Apache Kafka harness itself (tests/common/kafka.rs) against real KRaft brokers: committed
//! offsets as Kafka's own consumer-groups tool reports them, and a three-node cluster losing the
//! leader of a partition while a producer and a consumer group keep going.
//!
//! Skipped with a note when the jars are not installed (`.ci/install-kafka.sh`), unless
//! `NEUROSTREAM_REQUIRE_KAFKA` is set.

#[path = "common/kafka.rs"]
mod kafka;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka::KafkaCluster;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// An idempotent, acks=all producer: retries through a leader change without duplicates.
fn producer(cluster: &KafkaCluster) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // Long enough to ride out a leader's death (fencing after the 3 s session timeout,
        // then an election), short enough to fail inside the test's bound.
        .set("message.timeout.ms", "60000")
        .create()
        .expect("rdkafka producer config is valid")
}

fn consumer(cluster: &KafkaCluster, group: &str, auto_commit: bool) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set(
            "enable.auto.commit",
            if auto_commit { "true" } else { "false" },
        )
        .set("auto.commit.interval.ms", "500")
        .set("session.timeout.ms", "10000")
        .create()
        .expect("rdkafka consumer config is valid")
}

/// Enqueues `payloads` (to `partition`, or by key when `None`) and returns their delivery
/// futures, so a whole batch is in flight at once.
fn send_all(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    payloads: impl IntoIterator<Item = String>,
) -> Vec<DeliveryFuture> {
    payloads
        .into_iter()
        .map(|p| {
            let mut record = FutureRecord::to(topic).key(&p).payload(&p);
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            producer
                .send_result(record)
                .unwrap_or_else(|(e, _)| panic!("enqueue {p}: {e}"))
        })
        .collect()
}

async fn await_all(deliveries: Vec<DeliveryFuture>) {
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, m))) => panic!("delivery failed: {e} ({:?})", m.payload_view::<str>()),
            Err(_) => panic!("the producer was dropped before a delivery report"),
        }
    }
}

#[test]
fn cluster_ids_are_22_url_safe_base64_chars() {
    for _ in 0..100 {
        let id = kafka::random_cluster_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(!id.starts_with('-'), "{id}");
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        // 128 bits in 22 characters: the last carries 2 bits, its low 4 bits are zero.
        assert!(b"AQgw".contains(&id.as_bytes()[21]), "{id}");
    }
}

#[test]
fn parses_the_consumer_groups_table() {
    let out = "\nConsumer group 'g1' has no active members.\n\n\
GROUP           TOPIC           PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG             CONSUMER-ID     HOST            CLIENT-ID\n\
g1              t1              1          -               0               -               -               -               -\n\
g1              t1              0          7               20              13              -               -               -\n";
    assert_eq!(
        kafka::parse_group_table(out, "g1"),
        vec![
            ("t1".to_string(), 0, Some(7), 20, Some(13)),
            ("t1".to_string(), 1, None, 0, None),
        ]
    );
    assert!(kafka::parse_group_table("Consumer group 'g' is rebalancing.\n", "g").is_empty());
}

/// Offsets committed by hand through rdkafka are exactly what Kafka's own tool reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_match_kafkas_consumer_groups_tool() {
    let Some(cluster) = KafkaCluster::start_or_skip(1) else {
        return;
    };
    let topic = "harness-offsets";
    let group = "harness-offsets-group";
    cluster.create_topic(topic, 2, 1).await;

    // 100 messages, 50 to each partition.
    let producer = producer(&cluster);
    for p in 0..2 {
        await_all(send_all(
            &producer,
            topic,
            Some(p),
            (0..50).map(|i| format!("p{p}-{i}")),
        ))
        .await;
    }

    let consumer = consumer(&cluster, group, false);
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 100 {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 100 messages within 30 s", seen.len()))
            .expect("consume");
        seen.insert((m.partition(), m.offset()));
    }
    assert_eq!(seen.len(), 100);

    // Commit a position inside partition 0 and the end of partition 1.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(37))
        .expect("tpl");
    tpl.add_partition_offset(topic, 1, Offset::Offset(50))
        .expect("tpl");
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");

    let expected = vec![
        (topic.to_string(), 0, Some(37), 50, Some(13)),
        (topic.to_string(), 1, Some(50), 50, Some(0)),
    ];
    // While the consumer is a member (the table then names it) ...
    assert_eq!(cluster.committed_offsets(group), expected);
    // ... and once it has left the group: the offsets stay.
    drop(consumer);
    assert_eq!(cluster.committed_offsets(group), expected);
    assert!(cluster
        .committed_offsets("harness-no-such-group")
        .is_empty());
}

/// Three nodes, replication 3, min.insync.replicas 2: SIGKILL the leader of partition 0 while an
/// idempotent acks=all producer and a consumer group keep going. Every message arrives, another
/// node takes over the partition, and the killed node rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_the_death_of_a_partition_leader() {
    let Some(mut cluster) = KafkaCluster::start_or_skip(3) else {
        return;
    };
    let test_started = Instant::now();
    let topic = "harness-failover";
    let group = "harness-failover-group";
    cluster.create_topic(topic, 2, 3).await;

    let producer = producer(&cluster);
    let consumer = consumer(&cluster, group, true);
    consumer.subscribe(&[topic]).expect("subscribe");
    let received = Arc::new(Mutex::new(HashSet::<String>::new()));
    let sink = received.clone();
    let consuming = tokio::spawn(async move {
        loop {
            // Errors during the failover (a broker gone, coordinator moving) are transient:
            // librdkafka reconnects on its own.
            if let Ok(m) = consumer.recv().await {
                if let Some(Ok(p)) = m.payload_view::<str>() {
                    sink.lock().expect("lock").insert(p.to_string());
                }
            }
        }
    });
    let wait_received = |n: usize, within: Duration| {
        let received = received.clone();
        async move {
            let deadline = Instant::now() + within;
            loop {
                let got = received.lock().expect("lock").len();
                if got >= n {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "consumed {got} of {n} within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    await_all(send_all(
        &producer,
        topic,
        None,
        (0..100).map(|i| format!("m{i}")),
    ))
    .await;
    wait_received(100, Duration::from_secs(30)).await;

    let old = cluster.leader_of(topic, 0);
    assert!(
        cluster.node_ids().contains(&old),
        "leader of partition 0 is {old}"
    );
    let killed_at = Instant::now();
    cluster.kill(old);

    // Keep producing through the failover: the batch is in flight while the partition has no
    // leader, and every message must be acknowledged by the new one.
    let batch = send_all(&producer, topic, None, (100..200).map(|i| format!("m{i}")));
    let new = loop {
        let l = cluster.leader_of(topic, 0);
        if l >= 0 && l != old {
            break l;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no new leader within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elected = killed_at.elapsed();
    await_all(batch).await;
    wait_received(200, Duration::from_secs(60)).await;
    eprintln!(
        "failover: node {old} killed, node {new} leads partition 0 after {:.1} s; all 200 \
         messages consumed after {:.1} s",
        elected.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );

    // The killed node comes back on its ports and log dir and serves again.
    cluster.restart(old);
    await_all(send_all(
        &producer,
        topic,
        None,
        (200..220).map(|i| format!("m{i}")),
    ))
    .await;
    wait_received(220, Duration::from_secs(30)).await;
    let got = received.lock().expect("lock").clone();
    let missing: Vec<_> = (0..220)
        .map(|i| format!("m{i}"))
        .filter(|m| !got.contains(m))
        .collect();
    assert!(missing.is_empty(), "never consumed: {missing:?}");

    // The consumer group's auto-commits reach the end of both partitions, by Kafka's tool.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = cluster.committed_offsets(group);
        let committed: i64 = rows.iter().filter_map(|r| r.2).sum();
        if rows.len() == 2 && committed == 220 && rows.iter().all(|r| r.4 == Some(0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets never reached 220: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The consumer must close while its brokers still run: dropped after the cluster, its
    // close waits for a coordinator that is gone, and the runtime's shutdown with it, for ever.
    consuming.abort();
    let _ = consuming.await;
    eprintln!(
        "failover test body took {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}

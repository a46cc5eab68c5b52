//! The ceiling of the end-to-end benchmark (`benches/e2e/run.py`): a bare rdkafka consumer in
//! its own consumer group that reads `--expected` messages of a topic and does nothing with them
//! (it touches each payload's length, nothing more), with the same client library and the same
//! fetch settings as the service.
//!
//! Offsets are auto-committed every `--commit-interval-ms` (100 ms) so the harness can measure
//! it from the group's committed offsets the way it measures every other system, and after the
//! last message they are committed synchronously. It prints JSON lines:
//! `{"event":"running",...}` at start, then `{"event":"consumed","n":N,"first_ms":..,
//! "last_ms":..,"bytes":..}` (wall-clock epoch milliseconds of the first and the N-th message)
//! and exits 0; exit 1 with `{"event":"error",...}` when the topic does not deliver `--expected`
//! messages within `--timeout-s`.
//!
//! ```sh
//! cargo run --release --example bare_consumer -- --brokers 127.0.0.1:9092 --topic events \
//!     --group bare-1 --expected 500000
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;

#[derive(Parser, Debug)]
#[command(about = "A bare rdkafka consumer: the benchmark's ceiling")]
struct Args {
    /// Bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// The topic to read (all partitions, from the earliest offset).
    #[arg(long)]
    topic: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// Messages to read before reporting and exiting.
    #[arg(long)]
    expected: u64,
    /// librdkafka `fetch.wait.max.ms`.
    #[arg(long, default_value_t = 100)]
    fetch_wait_max_ms: u64,
    /// librdkafka `fetch.min.bytes`.
    #[arg(long, default_value_t = 1)]
    fetch_min_bytes: u64,
    /// librdkafka `auto.commit.interval.ms`.
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    /// Give up after this many seconds without reaching `--expected`.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "true")
        .set(
            "auto.commit.interval.ms",
            args.commit_interval_ms.to_string(),
        )
        .set("fetch.wait.max.ms", args.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", args.fetch_min_bytes.to_string())
        .set("enable.partition.eof", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"event": "error", "error": format!("creating the consumer: {e}")})
            );
            std::process::exit(1);
        }
    };
    if let Err(e) = consumer.subscribe(&[args.topic.as_str()]) {
        println!(
            "{}",
            serde_json::json!({"event": "error", "error": format!("subscribing: {e}")})
        );
        std::process::exit(1);
    }
    println!(
        "{}",
        serde_json::json!({"event": "running", "topic": args.topic, "group": args.group, "expected": args.expected})
    );
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let (mut n, mut bytes) = (0u64, 0u64);
    let (mut first_ms, mut last_ms) = (0u128, 0u128);
    while n < args.expected {
        if Instant::now() > deadline {
            println!(
                "{}",
                serde_json::json!({"event": "error", "error": format!("only {n} of {} messages within {} s", args.expected, args.timeout_s), "n": n})
            );
            std::process::exit(1);
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => eprintln!("bare_consumer: {e}"),
            Some(Ok(m)) => {
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                n += 1;
                if n == 1 {
                    first_ms = now_ms();
                }
                if n == args.expected {
                    last_ms = now_ms();
                }
            }
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        eprintln!("bare_consumer: final commit: {e}");
    }
    println!(
        "{}",
        serde_json::json!({"event": "consumed", "n": n, "first_ms": first_ms as u64, "last_ms": last_ms as u64, "bytes": bytes})
    );
}

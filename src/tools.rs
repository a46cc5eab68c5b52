//! `neurostream produce` and `neurostream tail`: publish events, read the outputs.

use std::io::BufRead;
use std::time::{Duration, Instant};

use crate::config::{ClientSetting, Config};
use crate::generator::{Generator, GeneratorConfig};
use crate::kafka::producer::InFlight;
use crate::kafka::{fetch_metadata, CheckContext, TopicError};
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};

/// What `produce` sends.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Target topic.
    pub topic: String,
    /// Events to send (synthetic), or the most lines to send from `file`.
    pub events: u64,
    /// Events per second; 0: as fast as possible.
    pub rate: u64,
    /// JSON-lines file to send instead of synthetic events.
    pub file: Option<std::path::PathBuf>,
    /// One synthetic message in this many is malformed (0: none).
    pub malformed_every: u64,
    /// The synthetic stream: seed, first event time (`None`: now, so a second run neither goes
    /// back in time nor repeats ids), dimension, keys and blobs.
    pub synthetic: SyntheticOptions,
    /// Send event n to partition n mod this (`None`: by key).
    pub partitions: Option<i32>,
    /// Send events in the Confluent Avro wire format (the event schema registered under
    /// `<topic>-value`); lines that are not events are sent as they are.
    pub avro: bool,
}

/// The synthetic events `produce` makes.
#[derive(Debug, Clone)]
pub struct SyntheticOptions {
    /// RNG seed.
    pub seed: u64,
    /// Event time of the first event (epoch ms); `None`: now.
    pub start_ms: Option<i64>,
    /// Feature dimension.
    pub dimension: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Gaussian blobs.
    pub clusters: usize,
    /// Event-time step between consecutive events, microseconds.
    pub step_us: i64,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        let g = GeneratorConfig::default();
        Self {
            seed: g.seed,
            start_ms: None,
            dimension: g.dimension,
            keys: g.keys,
            clusters: g.clusters,
            step_us: g.step_us,
        }
    }
}

/// Publishes synthetic clustered events, or a JSON-lines file, at a given rate.
///
/// # Errors
/// When the producer cannot be created, the file cannot be read, or a message is not delivered.
pub async fn produce(config: &Config, opts: ProduceOptions) -> anyhow::Result<u64> {
    // NB: librdkafka queues messages for a missing topic until they time out; say so up front
    // (and fail at once on refused credentials or TLS).
    let exists = {
        let (settings, topic) = (config.producer_settings(), opts.topic.clone());
        let brokers = config.kafka.brokers.clone();
        tokio::task::spawn_blocking(move || {
            let probe: BaseProducer<CheckContext> = ClientSetting::to_client_config(&settings)
                .create_with_context(CheckContext::default())
                .map_err(TopicError::Client)?;
            let drain = || probe.poll(Duration::ZERO);
            fetch_metadata(probe.client(), drain, Some(&topic), &brokers).map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none())
            })
        })
        .await??
    };
    let producer: FutureProducer = ClientSetting::to_client_config(&config.producer_settings())
        .create()
        .context("creating the producer")?;
    if !exists {
        anyhow::bail!("topic `{}` does not exist; create it first", opts.topic);
    }
    let mut lines: Box<dyn Iterator<Item = std::io::Result<String>>> = match &opts.file {
        Some(path) => Box::new(
            std::io::BufReader::new(
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            )
            .lines(),
        ),
        None => {
            let synthetic = &opts.synthetic;
            let start_ms = synthetic
                .start_ms
                .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
            let mut g = Generator::new(GeneratorConfig {
                seed: synthetic.seed,
                dimension: synthetic.dimension,
                keys: synthetic.keys,
                clusters: synthetic.clusters,
                step_us: synthetic.step_us,
                start_ms,
                id_prefix: format!("evt-{start_ms}"),
                malformed_every: opts.malformed_every,
                ..GeneratorConfig::default()
            });
            Box::new(std::iter::repeat_with(move || {
                Ok(String::from_utf8_lossy(&g.next_message().payload).into_owned())
            }))
        }
    };
    let avro_id = if opts.avro {
        let client = crate::avro::registry::RegistryClient::new(&config.schema_registry)
            .map_err(|e| anyhow::anyhow!(e))?;
        let subject = format!("{}-value", opts.topic);
        let id = client
            .register(&subject, crate::avro::EVENT_SCHEMA)
            .await
            .map_err(|e| anyhow::anyhow!("registering the event schema as `{subject}`: {e}"))?;
        eprintln!("event schema registered as `{subject}`, id {id}");
        Some(id)
    } else {
        None
    };
    let limits = crate::event::Limits::bytes(config.kafka.max_event_bytes);
    let started = Instant::now();
    let mut in_flight = InFlight::new(10_000);
    let mut sent = 0u64;
    while sent < opts.events {
        let Some(line) = lines.next() else { break };
        let line = line?;
        if opts.rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / opts.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let key = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("key").and_then(|k| k.as_str()).map(String::from));
        let payload = match avro_id {
            Some(id) => match crate::event::decode(Some(line.as_bytes()), None, None, &limits) {
                Ok(event) => crate::avro::frame_confluent(id, &crate::avro::encode_event(&event)),
                Err(_) => line.clone().into_bytes(),
            },
            None => line.clone().into_bytes(),
        };
        let mut record = FutureRecord::<str, [u8]>::to(&opts.topic).payload(&payload);
        if let Some(k) = &key {
            record = record.key(k);
        }
        if let Some(partitions) = opts.partitions {
            record = record.partition((sent % partitions as u64) as i32);
        }
        in_flight.send(&producer, record).await?;
        sent += 1;
    }
    in_flight.finish().await?;
    producer.flush(Duration::from_secs(10))?;
    eprintln!(
        "produced {sent} events to `{}` in {:.2} s",
        opts.topic,
        started.elapsed().as_secs_f64()
    );
    Ok(sent)
}

/// Prints the messages of `topics` as JSON lines (with their source offset) until `limit`
/// messages or Ctrl-C; from the beginning when `from_beginning`.
///
/// # Errors
/// When the consumer cannot be created or subscribed.
pub fn tail(
    config: &Config,
    topics: &[String],
    from_beginning: bool,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    // The service's consumer settings (brokers, security, raw map), as a throwaway group.
    let consumer: BaseConsumer<CheckContext> =
        ClientSetting::to_client_config(&config.consumer_settings())
            .set(
                "group.id",
                format!("neurostream-tail-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "0")
            .set(
                "auto.offset.reset",
                if from_beginning { "earliest" } else { "latest" },
            )
            .create_with_context(CheckContext::default())
            .context("creating the consumer")?;
    // Credentials and TLS are checked before subscribing: a refusal is an error, not a stream
    // of "consumer error" lines.
    let drain = || {
        let _ = consumer.poll(Duration::ZERO);
    };
    fetch_metadata(consumer.client(), drain, None, &config.kafka.brokers)?;
    // Avro outputs are decoded with their writer schemas from the registry, when one is set.
    let registry = match &config.schema_registry.url {
        Some(_) => Some(
            crate::avro::registry::RegistryClient::new(&config.schema_registry)
                .map_err(|e| anyhow::anyhow!(e))?,
        ),
        None => None,
    };
    let handle = tokio::runtime::Handle::current();
    let mut schemas: std::collections::HashMap<u32, Result<String, String>> = Default::default();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let mut seen = 0u64;
    while limit.is_none_or(|l| seen < l) {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let source = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "neurostream.source.offset"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                let value = match (m.payload(), &registry) {
                    (Some(p @ [0, a, b, c, d, ..]), Some(client)) => {
                        let id = u32::from_be_bytes([*a, *b, *c, *d]);
                        let text = schemas.entry(id).or_insert_with(|| {
                            handle
                                .block_on(client.schema(id))
                                .map_err(|e| e.to_string())
                        });
                        // One message whose schema cannot be had is reported, not fatal.
                        let json = match text {
                            Ok(text) => crate::avro::output::to_json(p, text),
                            Err(e) => Err(format!("schema {id}: {e}")),
                        };
                        match json {
                            Ok(json) => json.to_string(),
                            Err(e) => serde_json::json!({ "avro_error": e }).to_string(),
                        }
                        .into()
                    }
                    (p, _) => p.map(String::from_utf8_lossy).unwrap_or_default(),
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "topic": m.topic(),
                        "partition": m.partition(),
                        "offset": m.offset(),
                        "source_offset": source,
                        "value": serde_json::from_str::<serde_json::Value>(&value)
                            .unwrap_or(serde_json::Value::String(value.into_owned())),
                    })
                );
                seen += 1;
            }
            Some(Err(err)) => eprintln!("consumer error: {err}"),
            None => {}
        }
    }
    Ok(())
}

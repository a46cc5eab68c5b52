//! Avro through the whole service, against Apache Kafka, Apicurio Registry (a real Schema
//! Registry serving the Confluent API) and PostgreSQL. Datums are written by fastavro (Python),
//! an implementation independent of the product's: writer schemas v1 (the reader's own), v2 (an
//! added field with a default, metadata), v3 (promoted int/float types, aliases, removed optional
//! fields) decode; v4 (features as a string) and broken framing are dead-lettered with their
//! kinds; rows in PostgreSQL equal the JSON run of the same events; Avro outputs read back with
//! fastavro through the schemas registered under `<topic>-value`; `auto` input mixes JSON and
//! Avro; a registry outage holds the partition (nothing dead-lettered) and, with
//! `max_outage_ms`, dead-letters as `registry_unavailable`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::registry::Registry;
use common::*;
use neurostream::avro::frame_confluent;
use neurostream::config::{Config, InputFormat, OutputFormat};
use neurostream::output::Output;
use rdkafka::message::Message;

const WAIT: Duration = Duration::from_secs(90);
const ENCODER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/avro/encode.py");
const EVENT_SCHEMA: &str = include_str!("../schemas/event.avsc");

/// v2: v1 plus a field the reader does not know (with a default) and metadata.
const V2: &str = r#"{"type":"record","name":"Event","namespace":"io.neurostream","fields":[
  {"name":"key","type":["null","string"],"default":null},
  {"name":"site","type":"string","default":"A"},
  {"name":"ts","type":["null",{"type":"long","logicalType":"timestamp-millis"}],"default":null},
  {"name":"features","type":["null",{"type":"array","items":"double"}],"default":null},
  {"name":"value","type":["null","double"],"default":null},
  {"name":"metadata","type":["null",{"type":"map","values":"string"}],"default":null}]}"#;

/// v3: promoted types (int time, float features and value) under aliases, no id or metadata.
const V3: &str = r#"{"type":"record","name":"Reading","namespace":"com.example","fields":[
  {"name":"key","type":"string"},
  {"name":"timestamp","type":"int"},
  {"name":"vector","type":{"type":"array","items":"float"}},
  {"name":"value","type":"float"}]}"#;

/// v4: features as a string; cannot be read as an event.
const V4: &str = r#"{"type":"record","name":"Broken","fields":[
  {"name":"key","type":"string"},{"name":"features","type":"string"}]}"#;

/// Runs `encode.py SCHEMA [extra]` with `input` on its standard input; its standard output.
fn encoder(schema: &str, extra: &[&str], input: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.avsc");
    std::fs::write(&path, schema).unwrap();
    let mut child = Command::new("python3")
        .arg(ENCODER)
        .arg(&path)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fastavro (pip install fastavro): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// fastavro's datums of `records` (JSON) written with `schema`.
fn fastavro(schema: &str, records: &[serde_json::Value]) -> Vec<Vec<u8>> {
    let input: String = records.iter().map(|r| format!("{r}\n")).collect();
    encoder(schema, &[], &input)
        .lines()
        .map(|hex| {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

/// fastavro's reading of `datums` written with `schema`, as JSON.
fn fastavro_decode(schema: &str, datums: &[&[u8]]) -> Vec<serde_json::Value> {
    let input: String = datums
        .iter()
        .map(|d| d.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
        .collect();
    encoder(schema, &["--decode"], &input)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The record of a JSON test event (`common::stream`) for writer schema `version`.
fn record(event: &[u8], version: usize) -> serde_json::Value {
    let e: serde_json::Value = serde_json::from_slice(event).unwrap();
    let (key, ts, features, value) = (&e["key"], &e["ts"], &e["features"], &e["value"]);
    match version {
        1 => serde_json::json!({"key": key, "ts": ts, "features": features, "value": value,
                                "id": null, "metadata": null}),
        2 => serde_json::json!({"key": key, "site": "B", "ts": ts, "features": features,
                                "value": value, "metadata": {"site": "B"}}),
        3 => serde_json::json!({"key": key, "timestamp": ts, "vector": features, "value": value}),
        _ => serde_json::json!({"key": key, "features": "1,2"}),
    }
}

/// The Avro form of `json` (each partition's events): versions 1, 2, 3 in turn.
fn to_avro(json: &[Vec<Vec<u8>>], ids: &[u32; 4]) -> Vec<Vec<Vec<u8>>> {
    let schemas = [EVENT_SCHEMA, V2, V3];
    json.iter()
        .map(|events| {
            let mut out = vec![Vec::new(); events.len()];
            for (v, schema) in schemas.iter().enumerate() {
                let picked: Vec<usize> = (0..events.len()).filter(|i| i % 3 == v).collect();
                let records: Vec<_> = picked.iter().map(|&i| record(&events[i], v + 1)).collect();
                for (i, datum) in picked.into_iter().zip(fastavro(schema, &records)) {
                    out[i] = frame_confluent(ids[v], &datum);
                }
            }
            out
        })
        .collect()
}

fn window_tuples(outputs: impl Iterator<Item = Output>) -> Vec<String> {
    let mut v: Vec<String> = outputs
        .filter_map(|o| match o {
            Output::WindowAggregate(w) => Some(format!(
                "{}|{}|{}|{}|{}|{}",
                w.key, w.size_ms, w.window_start, w.count, w.sum, w.is_final
            )),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_in_and_out_through_apicurio_and_apache_kafka() {
    let Some(broker) = Broker::kafka() else {
        return;
    };
    let Some(registry) = Registry::start_or_skip() else {
        return;
    };
    let (url, store) = fresh_db().await;
    let mut config = config_for(&broker, 2, &url).await;
    config.kafka.input_format = InputFormat::Avro;
    config.kafka.output_format = OutputFormat::Avro;
    config.schema_registry.url = Some(registry.url().into());
    config.validate().unwrap();
    let subject = format!("{}-value", config.kafka.input_topics[0]);
    let ids = [EVENT_SCHEMA, V2, V3, V4].map(|s| registry.register(&subject, s));

    let json: Vec<Vec<Vec<u8>>> = (0..2).map(|p| stream(p, 300)).collect();
    let clean = to_avro(&json, &ids);
    let mut avro = clean.clone();
    // Bad input in partition 1, with a JSON stand-in (also rejected) at the same offsets.
    let good_v1 = avro[1][0][5..].to_vec();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (
            frame_confluent(ids[3], &fastavro(V4, &[record(&json[1][0], 4)])[0]),
            "schema_incompatible",
        ),
        (b"\x01\x02\x03 not avro".to_vec(), "unknown_magic_byte"),
        (frame_confluent(999_999, &good_v1), "unknown_schema"),
        (
            frame_confluent(ids[0], &good_v1[..good_v1.len() - 3]),
            "invalid_avro",
        ),
    ];
    let mut json_equivalent = json.clone();
    for (i, (bytes, _)) in bad.iter().enumerate() {
        avro[1].insert(20 + i * 41, bytes.clone());
        json_equivalent[1].insert(20 + i * 41, b"not json".to_vec());
    }
    produce(&config.kafka.brokers, &config.kafka.input_topics[0], &avro).await;

    let (shutdown, progress, handle) = spawn_service(&config, &store);
    let ends: Vec<i64> = avro.iter().map(|m| m.len() as i64).collect();
    wait_for_checkpoints(&store, &config.kafka.group_id, &ends, WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();

    // PostgreSQL holds exactly what the JSON run of the same events stores.
    let expected = expected_rows(&config, &json_equivalent);
    assert!(expected.len() > 100);
    assert_rows_eq(&stored_rows(&store).await, &expected);
    assert_eq!(progress.snapshot().events, 600);

    // Each bad message is dead-lettered with its kind, original bytes kept.
    let dlq = read_topic(&config.kafka.brokers, &config.kafka.topics.dlq, Some(4));
    let mut kinds: Vec<&str> = dlq
        .iter()
        .map(|m| header(m, "neurostream.error.kind").unwrap())
        .collect();
    kinds.sort();
    let mut want: Vec<&str> = bad.iter().map(|(_, k)| *k).collect();
    want.sort();
    assert_eq!(kinds, want);
    for m in &dlq {
        assert!(bad.iter().any(|(b, _)| m.payload() == Some(b.as_slice())));
    }

    // The window outputs are Avro under the schema registered as `<topic>-value`, and fastavro
    // reads them as the same windows the JSON run emits.
    let topic = &config.kafka.topics.windows;
    let latest = registry
        .get(&format!(
            "/apis/ccompat/v7/subjects/{topic}-value/versions/latest"
        ))
        .unwrap();
    assert_eq!(latest.0, 200, "{}", latest.1);
    let schema: serde_json::Value = serde_json::from_str(&latest.1).unwrap();
    let schema = schema["schema"].as_str().unwrap().to_string();
    let want = window_tuples(
        replay(&config, &json_equivalent)
            .into_iter()
            .map(|(_, e)| e.output),
    );
    let messages = read_topic(&config.kafka.brokers, topic, Some(want.len()));
    let datums: Vec<&[u8]> = messages
        .iter()
        .map(|m| {
            let p = m.payload().unwrap();
            assert_eq!(p[0], 0, "Confluent magic byte");
            &p[5..]
        })
        .collect();
    let got: Vec<String> = {
        let mut v: Vec<String> = fastavro_decode(&schema, &datums)
            .into_iter()
            .map(|w| {
                format!(
                    "{}|{}|{}|{}|{}|{}",
                    w["key"].as_str().unwrap(),
                    w["size_ms"],
                    w["window_start"],
                    w["count"],
                    w["sum"].as_f64().unwrap(),
                    w["final"]
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(got, want);

    // `auto`: JSON and Avro mixed on one topic, JSON outputs; the same rows again.
    let (url2, store2) = fresh_db().await;
    let mut auto = config_for(&broker, 2, &url2).await;
    auto.kafka.input_format = InputFormat::Auto;
    auto.schema_registry.url = Some(registry.url().into());
    let mixed: Vec<Vec<Vec<u8>>> = json
        .iter()
        .zip(&clean)
        .map(|(j, a)| {
            j.iter()
                .zip(a)
                .enumerate()
                .map(|(i, (j, a))| if i % 2 == 0 { j.clone() } else { a.clone() })
                .collect()
        })
        .collect();
    produce(&auto.kafka.brokers, &auto.kafka.input_topics[0], &mixed).await;
    let (shutdown, _, handle) = spawn_service(&auto, &store2);
    let ends: Vec<i64> = mixed.iter().map(|m| m.len() as i64).collect();
    wait_for_checkpoints(&store2, &auto.kafka.group_id, &ends, WAIT).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_rows_eq(&stored_rows(&store2).await, &expected_rows(&auto, &json));
}

#[tokio::test(flavor = "multi_thread")]
async fn produce_writes_avro_and_tail_reads_it() {
    let Some(broker) = Broker::kafka() else {
        return;
    };
    let Some(registry) = Registry::start_or_skip() else {
        return;
    };
    let mut config = base_config(&broker.brokers(), "postgres://unused@127.0.0.1/x");
    let topic = config.kafka.input_topics[0].clone();
    broker.create_topic(&topic, 1).await;
    config.schema_registry.url = Some(registry.url().into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_neurostream"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    run(&[
        "produce", "--topic", &topic, "--events", "20", "--format", "avro",
    ]);
    // The schema is registered under TopicNameStrategy, and the messages are Confluent Avro.
    let (status, _) = registry
        .get(&format!(
            "/apis/ccompat/v7/subjects/{topic}-value/versions/latest"
        ))
        .unwrap();
    assert_eq!(status, 200);
    let raw = read_topic(&broker.brokers(), &topic, Some(20));
    assert!(raw.iter().all(|m| m.payload().unwrap()[0] == 0));
    let lines = run(&[
        "tail",
        "--topic",
        &topic,
        "--from-beginning",
        "--limit",
        "20",
    ]);
    let values: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].clone())
        .collect();
    assert_eq!(values.len(), 20);
    for v in &values {
        assert!(
            v["features"].as_array().is_some_and(|f| !f.is_empty()),
            "{v}"
        );
        assert!(v["key"].is_string(), "{v}");
    }
}

#[test]
fn process_reads_avro_container_files_like_json_lines() {
    // fastavro writes the container (v3: promoted types and aliases); the offline processor's
    // outputs equal those of the same events as JSON lines. Every 97th event lies far from the
    // others, each somewhere else, so there are outliers to compare too.
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<Vec<u8>> = stream(0, 400)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if i % 97 != 50 {
                return e;
            }
            let mut v: serde_json::Value = serde_json::from_slice(&e).unwrap();
            v["features"] = serde_json::json!([40.0 + i as f64, -25.0 - 3.0 * i as f64]);
            serde_json::to_vec(&v).unwrap()
        })
        .collect();
    let jsonl = dir.path().join("events.jsonl");
    let mut text = Vec::new();
    for e in &events {
        text.extend_from_slice(e);
        text.push(b'\n');
    }
    std::fs::write(&jsonl, text).unwrap();
    let schema = dir.path().join("v3.avsc");
    std::fs::write(&schema, V3).unwrap();
    let container = dir.path().join("events.avro");
    let mut child = Command::new("python3")
        .arg(ENCODER)
        .arg(&schema)
        .arg("--container")
        .arg(&container)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let records: String = events
        .iter()
        .map(|e| format!("{}\n", record(e, 3)))
        .collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(records.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let process = |input: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_neurostream"))
            .args(["process", "--input"])
            .arg(input)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let from_json = process(&jsonl);
    for kind in ["window_aggregate", "cluster_update", "outlier"] {
        assert!(from_json.contains(kind), "{from_json}");
    }
    assert_eq!(process(&container), from_json);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registry_client_speaks_tls_and_basic_auth() {
    let Some(broker) = Broker::kafka() else {
        return;
    };
    let Some(registry) = Registry::start_or_skip() else {
        return;
    };
    // Apicurio behind a TLS proxy that demands basic auth (a certificate for 127.0.0.1 signed
    // by the test CA).
    let pki = common::tls::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let secret = "registry-Secret-31x";
    let password_file = dir.path().join("registry-password");
    std::fs::write(&password_file, format!("{secret}\n")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy_script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/avro/tls_auth_proxy.py"
    );
    let mut proxy = Command::new("python3")
        .arg(proxy_script)
        .arg(port.to_string())
        .arg(pki.path("server.pem"))
        .arg(pki.path("server.key"))
        .arg(format!("http://127.0.0.1:{}", registry.port()))
        .arg("neurostream")
        .arg(&password_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 5];
    let read = proxy.stdout.as_mut().unwrap().read_exact(&mut ready);
    // Killed when the test ends, passing or not.
    let _proxy = KillOnDrop(proxy);
    read.unwrap();
    assert_eq!(&ready, b"READY");

    let mut config = base_config(&broker.brokers(), "postgres://unused@127.0.0.1/x");
    let topic = config.kafka.input_topics[0].clone();
    broker.create_topic(&topic, 1).await;
    config.schema_registry.url = Some(format!("https://127.0.0.1:{port}/apis/ccompat/v7").into());
    config.schema_registry.username = Some("neurostream".into());
    config.schema_registry.password_file = Some(password_file.clone());
    config.schema_registry.ssl_ca_location = Some(pki.path("ca.pem"));
    let run = |config: &Config, args: &[&str]| {
        let path = dir.path().join(format!("{}.toml", unique()));
        std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_neurostream"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(secret), "{args:?} printed the password");
        (out.status.success(), text)
    };
    let produce = [
        "produce", "--topic", &topic, "--events", "5", "--format", "avro",
    ];
    let (ok, text) = run(&config, &produce);
    assert!(ok, "{text}");
    let (ok, text) = run(
        &config,
        &[
            "tail",
            "--topic",
            &topic,
            "--from-beginning",
            "--limit",
            "5",
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("\"features\"")).count(),
        5,
        "{text}"
    );

    // A wrong password and an untrusted CA fail with the reason.
    let mut wrong = config.clone();
    wrong.schema_registry.password_file = None;
    wrong.schema_registry.password = Some("not-it".into());
    let (ok, text) = run(&wrong, &produce);
    assert!(!ok && text.contains("401"), "{text}");
    let mut untrusted = config.clone();
    untrusted.schema_registry.ssl_ca_location = Some(pki.path("other-ca.pem"));
    let (ok, text) = run(&untrusted, &produce);
    assert!(!ok && text.contains("certificate"), "{text}");
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP relay to the registry that can be cut (connections closed at once) and restored.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        return;
                    };
                    let pipe = |mut from: TcpStream, mut to: TcpStream| {
                        let mut buf = [0u8; 8192];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    };
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let t = std::thread::spawn(move || pipe(c2, s2));
                    pipe(server, client);
                    let _ = t.join();
                });
            }
        });
        Relay { port, up }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_holds_the_partition_or_dead_letters_after_the_bound() {
    let Some(broker) = Broker::kafka() else {
        return;
    };
    let Some(registry) = Registry::start_or_skip() else {
        return;
    };
    let relay = Relay::start(registry.port());

    for bounded in [false, true] {
        let (url, store) = fresh_db().await;
        let mut config = config_for(&broker, 1, &url).await;
        config.kafka.input_format = InputFormat::Avro;
        config.schema_registry.url = Some(relay.url().into());
        config.schema_registry.retry_max_backoff_ms = 200;
        config.schema_registry.request_timeout_ms = 500;
        if bounded {
            config.schema_registry.max_outage_ms = Some(1_000);
        }
        let subject = format!("{}-value", config.kafka.input_topics[0]);
        let ids = [EVENT_SCHEMA, V2, V3, V4].map(|s| registry.register(&subject, s));
        let json = vec![stream(0, 60)];
        let avro = to_avro(&json, &ids);
        // Cut before the service has ever seen the schema.
        relay.up.store(false, Ordering::SeqCst);
        produce(&config.kafka.brokers, &config.kafka.input_topics[0], &avro).await;
        let (shutdown, progress, handle) = spawn_service(&config, &store);
        tokio::time::sleep(Duration::from_secs(4)).await;
        if bounded {
            // Past the bound every message is dead-lettered, none processed.
            wait_for_checkpoints(&store, &config.kafka.group_id, &[60], WAIT).await;
            let snap = progress.snapshot();
            assert_eq!(snap.dead_letters, 60);
            assert_eq!(snap.events, 0);
            let dlq = read_topic(&config.kafka.brokers, &config.kafka.topics.dlq, Some(1));
            assert_eq!(
                header(&dlq[0], "neurostream.error.kind"),
                Some("registry_unavailable")
            );
        } else {
            // Held: nothing processed, nothing dead-lettered, the partition says why.
            assert_eq!(checkpointed(&store, &config.kafka.group_id).await, 0);
            let snap = progress.snapshot();
            assert_eq!(snap.dead_letters, 0);
            let status = serde_json::to_string(&snap).unwrap();
            assert!(status.contains("fetching schema"), "{status}");
            relay.up.store(true, Ordering::SeqCst);
            wait_for_checkpoints(&store, &config.kafka.group_id, &[60], WAIT).await;
            assert_rows_eq(&stored_rows(&store).await, &expected_rows(&config, &json));
            assert_eq!(progress.snapshot().dead_letters, 0);
        }
        relay.up.store(true, Ordering::SeqCst);
        shutdown.cancel();
        handle.await.unwrap().unwrap();
    }
}

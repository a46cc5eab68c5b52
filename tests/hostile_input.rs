//! Hostile input, property-tested: arbitrary bytes never panic the decoder and every rejection
//! has a reason; every state the processor can reach from accepted events (extreme magnitudes
//! included) round-trips through its checkpoint exactly; arbitrary TOML never panics the
//! configuration loader and every rejection names its problems.

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use neurostream::config::{Algorithm, ClusteringConfig, Config, ProcessingConfig, WindowConfig};
use neurostream::config::{EmitMode, LatePolicy, WindowKind};
use neurostream::event::{self, Limits};
use neurostream::processor::{Processor, Record};
use proptest::prelude::*;

fn limits() -> Limits {
    Limits {
        max_bytes: 4_096,
        max_key_bytes: 64,
        max_metadata_bytes: 512,
        max_ahead_ms: 86_400_000,
        now_ms: Some(1_763_866_800_000),
    }
}

/// Bytes that are often nearly an event: JSON fragments glued together, or raw noise.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"key\"",
        "\"ts\"",
        "\"features\"",
        "\"value\"",
        "\"id\"",
        "\"metadata\"",
        "null",
        "true",
        "1e308",
        "-1e309",
        "1e100",
        "NaN",
        "0",
        "-0.0",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551616",
        "\"\\u0000\"",
        "\"2025-11-23T03:00:00Z\"",
        "\"9999-12-31T23:59:59Z\"",
        "[1,2,3]",
        "[]",
        "\"\\ud800\"",
        " ",
        "\n",
        "\u{0}",
        "\u{feff}",
    ]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(fragment, 0..30).prop_map(|f| f.concat().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn decoder_never_panics_and_every_rejection_has_a_reason(
        payload in hostile_bytes(),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..80)),
        ts in prop::option::of(any::<i64>()),
    ) {
        match event::decode(Some(&payload), key.as_deref(), ts, &limits()) {
            Ok(e) => {
                // Whatever is accepted is storable.
                prop_assert!(!e.key.contains('\0') && e.key.len() <= 64);
                prop_assert!(e.id.as_ref().is_none_or(|id| id.len() <= 64));
                prop_assert!(e.metadata.as_ref().is_none_or(|m| m.get().len() <= 512));
                prop_assert!((event::MIN_TS_MS..event::MAX_TS_MS).contains(&e.ts_ms));
                prop_assert!(e.features.iter().chain(&e.value).all(|x| x.abs() <= 1e100));
            }
            Err(err) => {
                prop_assert!(!err.kind().is_empty());
                prop_assert!(!err.to_string().is_empty());
            }
        }
    }
}

/// A finite number of any magnitude the decoder accepts, extremes favoured.
fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        -10.0f64..10.0,
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e100,
            -1e100,
            1e-300,
            -1e-300,
            5e-324,
            f64::MIN_POSITIVE,
            9.999999999999999e99,
            1e50,
            -3e-10,
        ]),
        (-100.0f64..100.0, -99i32..100).prop_map(|(m, e)| m * 10f64.powi(e)),
    ]
    .prop_map(|x| x.clamp(-1e100, 1e100))
}

#[derive(Debug, Clone)]
struct Ev {
    key: u8,
    ts: i64,
    features: [f64; 3],
    value: Option<f64>,
}

fn events() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (
            0u8..4,
            -50i64..200,
            [number(), number(), number()],
            prop::option::of(number()),
        )
            .prop_map(|(key, dt, features, value)| Ev {
                key,
                ts: dt,
                features,
                value,
            }),
        1..160,
    )
}

fn payloads(events: &[Ev]) -> Vec<Vec<u8>> {
    let mut ts = 1_700_000_000_000i64;
    events
        .iter()
        .map(|e| {
            ts += e.ts;
            serde_json::to_vec(&serde_json::json!({
                "key": format!("k{}", e.key),
                "ts": ts,
                "features": e.features,
                "value": e.value,
            }))
            .unwrap()
        })
        .collect()
}

fn processing(algorithm: Algorithm) -> ProcessingConfig {
    ProcessingConfig {
        clustering: ClusteringConfig {
            algorithm,
            warmup_points: Some(10),
            ..ClusteringConfig::default()
        },
        windows: vec![
            WindowConfig {
                size_ms: 100,
                grace_ms: 10,
                emit: EmitMode::Both,
                ..WindowConfig::default()
            },
            WindowConfig {
                kind: WindowKind::Sliding,
                size_ms: 50,
                ..WindowConfig::default()
            },
        ],
        ..ProcessingConfig::default()
    }
}

/// Outputs and rejections, as text: every generated event is accepted, except by `ncs-v8` a
/// feature beyond its f32 range (`invalid_field`).
fn feed(p: &mut Processor, payloads: &[Vec<u8>], from: usize, to: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for (offset, payload) in payloads.iter().enumerate().take(to).skip(from) {
        let record = Record {
            payload: Some(payload),
            key: None,
            timestamp_ms: None,
            offset: offset as i64,
        };
        let result = p.process(record, &mut out);
        if offset % 17 == 16 {
            p.end_batch(&mut out);
        }
        lines.extend(out.drain(..).map(|e| format!("{e:?}")));
        if let Err(err) = result {
            assert!(err.to_string().contains("ncs-v8"), "refused: {err}");
            lines.push(format!("{offset}: {err}"));
        }
    }
    lines
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_reachable_state_round_trips_through_its_checkpoint(
        evs in events(),
        cut in any::<prop::sample::Index>(),
        v8 in any::<bool>(),
    ) {
        let config = processing(if v8 { Algorithm::NcsV8 } else { Algorithm::Ncs });
        let payloads = payloads(&evs);
        let cut = cut.index(payloads.len());

        let mut straight = Processor::new(&config, 1 << 20, 0);
        let all = feed(&mut straight, &payloads, 0, payloads.len());

        let mut first = Processor::new(&config, 1 << 20, 0);
        let mut out = feed(&mut first, &payloads, 0, cut);
        let snapshot = first.snapshot();
        let mut second = Processor::restore(&config, 1 << 20, 0, &snapshot)
            .map_err(|e| TestCaseError::fail(format!("restore failed: {e}")))?;
        prop_assert_eq!(second.snapshot(), snapshot, "restore → snapshot is not the identity");
        out.extend(feed(&mut second, &payloads, cut, payloads.len()));
        prop_assert_eq!(out, all);
        prop_assert_eq!(second.snapshot(), straight.snapshot());
    }
}

/// Every window shape with state a delta must carry: open slots with updates, hopping windows,
/// closed windows kept for late updates, sliding windows.
fn processing_for_deltas() -> ProcessingConfig {
    let mut config = processing(Algorithm::Ncs);
    config.windows.extend([
        WindowConfig {
            size_ms: 40,
            late: LatePolicy::Update,
            allowed_lateness_ms: 60,
            emit: EmitMode::Update,
            ..WindowConfig::default()
        },
        WindowConfig {
            kind: WindowKind::Hopping,
            size_ms: 60,
            slide_ms: Some(20),
            ..WindowConfig::default()
        },
    ]);
    config
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_full_snapshot_and_the_deltas_after_it_rebuild_the_state_exactly(
        evs in events(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 1..6),
    ) {
        let config = processing_for_deltas();
        let payloads = payloads(&evs);
        let mut cuts: Vec<(usize, bool)> =
            cuts.iter().map(|(c, full)| (c.index(payloads.len() + 1), *full)).collect();
        cuts.sort_unstable();

        let mut live = Processor::new(&config, 1 << 20, 0);
        live.track_changes();
        let (mut base, mut deltas, mut from) = (None, Vec::new(), 0);
        let mut copy: Option<neurostream::processor::StateCopy> = None;
        for (i, &(cut, full)) in cuts.iter().enumerate() {
            feed(&mut live, &payloads, from, cut);
            live.end_batch(&mut Vec::new());
            from = cut;
            // A base copied at the last cut is encoded only now, after later events changed the
            // live state, as the worker's transaction task encodes it beside the worker.
            if let Some(taken) = copy.take() {
                base = Some(taken.encode());
            }
            // The first checkpoint is full, later ones deltas or (when the deltas outgrow the
            // base) a new base, taken as the worker takes it: a copy, encoded later; sometimes
            // after a delta taken and dropped because it did not fit.
            if copy.is_none() && base.is_none() || full {
                if i % 2 == 1 {
                    drop(live.take_delta());
                }
                copy = Some(live.copy_state());
                live.forget_changes();
                deltas.clear();
            } else {
                deltas.push(live.take_delta());
            }
        }
        if let Some(taken) = copy.take() {
            base = Some(taken.encode());
        }
        let base = base.expect("at least one cut");
        let mut restored = Processor::restore_chain(&config, 1 << 20, 0, &base, &deltas)
            .map_err(|e| TestCaseError::fail(format!("restore failed: {e}")))?;
        prop_assert_eq!(restored.snapshot(), live.snapshot(), "base + deltas is not the live state");
        prop_assert_eq!(restored.held_windows(), live.held_windows());
        let rest_live = feed(&mut live, &payloads, from, payloads.len());
        let rest_restored = feed(&mut restored, &payloads, from, payloads.len());
        prop_assert_eq!(rest_restored, rest_live);
        prop_assert_eq!(restored.snapshot(), live.snapshot());
    }
}

/// TOML documents mixing known and unknown keys with values of every type.
fn toml_documents() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "kafka.brokers",
        "kafka.group_id",
        "kafka.input_topics",
        "kafka.max_event_bytes",
        "kafka.revoke_deadline_ms",
        "kafka.session_timeout_ms",
        "kafka.consumer.\"fetch.max.bytes\"",
        "kafka.producer.acks",
        "kafka.topics.dlq",
        "kafka.security.protocol",
        "kafka.security.sasl_mechanism",
        "kafka.security.sasl_password_file",
        "kafka.security.ssl_ca_location",
        "kafka.security.ssl_key_pem",
        "postgres.ssl_mode",
        "postgres.password_file",
        "postgres.ssl_root_cert",
        "profile",
        "processing.dimension",
        "processing.max_key_bytes",
        "processing.clustering.algorithm",
        "processing.clustering.max_clusters",
        "processing.clustering.accept_sigmas",
        "postgres.url",
        "postgres.pool_max",
        "postgres.batch_rows",
        "http.address",
        "log.level",
        "log.format",
        "bogus",
        "kafka.bogus",
        "processing.windows",
    ]);
    let value = prop::sample::select(vec![
        "1",
        "0",
        "-1",
        "18446744073709551615",
        "1e400",
        "\"\"",
        "\"latency\"",
        "\"SASL_SSL\"",
        "\"verify-full\"",
        "\"/dev/null\"",
        "\"/nonexistent\"",
        "\"earliest\"",
        "\"postgres://u:p@h/db\"",
        "true",
        "[]",
        "[\"a\", 1]",
        "{}",
        "{ kind = \"hopping\", size_ms = 0 }",
        "[{ kind = \"sliding\", size_ms = 5, late = \"update\" }]",
        "\"0.0.0.0:99999\"",
        "nan",
        "inf",
    ]);
    prop::collection::vec((key, value), 0..8).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn configuration_never_panics_and_every_rejection_names_problems(doc in toml_documents()) {
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(&doc));
        match neurostream::config::load_figment(figment) {
            Ok(loaded) => prop_assert!(loaded.config.validate().is_ok()),
            Err(errors) => {
                prop_assert!(!errors.0.is_empty(), "rejected without a reason: {doc}");
                for e in &errors.0 {
                    prop_assert!(!e.trim().is_empty());
                }
            }
        }
    }
}

/// Writer schemas the Avro property test decodes with: the reader's own, one with every kind of
/// field to skip (nested records, maps, unions, fixed, enums, logical types), one with promoted
/// types under aliases.
const AVRO_WRITERS: [&str; 3] = [
    include_str!("../schemas/event.avsc"),
    r#"{"type":"record","name":"W","fields":[
        {"name":"n","type":{"type":"record","name":"N","fields":[
            {"name":"m","type":{"type":"map","values":["null","long",{"type":"array","items":"N"}]}},
            {"name":"f","type":{"type":"fixed","name":"F","size":4}}]}},
        {"name":"e","type":{"type":"enum","name":"E","symbols":["a","b"]}},
        {"name":"key","type":["null","string","long"]},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"features","type":["null",{"type":"array","items":"float"}]},
        {"name":"metadata","type":["null","N"]},
        {"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":4,"scale":2}}]}"#,
    r#"{"type":"record","name":"P","fields":[
        {"name":"event_key","type":"bytes"},{"name":"time","type":"string"},
        {"name":"vector","type":{"type":"array","items":"int"}},{"name":"measure","type":"float"}]}"#,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    /// Arbitrary bytes, framed or not, through every Avro input decoder: no panic, and every
    /// rejection has a kind and a reason; what is accepted passes the same checks as JSON.
    #[test]
    fn avro_decoder_never_panics_and_accepts_only_storable_events(
        writer in 0..AVRO_WRITERS.len(),
        framed in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        use std::sync::Arc;
        use neurostream::avro::registry::SchemaCache;
        use neurostream::avro::{frame_confluent, InputDecoder, WriterPlan};
        let cache = Arc::new(SchemaCache::new(4));
        cache.insert_schema(7, AVRO_WRITERS[writer]);
        let payload = if framed { frame_confluent(7, &body) } else { body.clone() };
        let decoders = [
            InputDecoder::Avro(cache.clone()),
            InputDecoder::Auto(cache),
            InputDecoder::AvroRaw(Arc::new(WriterPlan::compile(AVRO_WRITERS[writer]))),
        ];
        for decoder in &decoders {
            match event::decode_with(decoder, Some(&payload), Some(b"k"), Some(1_763_866_800_000), &limits()) {
                Ok(e) => {
                    prop_assert!(e.key.len() <= 64 && !e.key.contains('\0'));
                    prop_assert!(e.features.len() <= 1024);
                    prop_assert!(e.features.iter().all(|x| x.is_finite() && x.abs() <= 1e100));
                    prop_assert!(e.value.is_none_or(|v| v.is_finite() && v.abs() <= 1e100));
                }
                Err(err) => {
                    prop_assert!(!err.kind().is_empty());
                    prop_assert!(!err.to_string().is_empty());
                }
            }
        }
    }
}

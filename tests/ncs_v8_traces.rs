//! `ncs-v8` reproduces the NCS V8 reference's per-point traces (tests/fixtures/ncs): cluster id,
//! outlier flag and cluster count exactly; score and threshold within 1e-4.

use neurostream::ncs::v8::{NcsV8, V8Params};
use serde_json::Value;

fn traces() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ncs/v8_reference_traces.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn params(v: &Value) -> V8Params {
    match v {
        Value::Object(_) => serde_json::from_value(v.clone()).unwrap(),
        _ => V8Params::default(),
    }
}

#[test]
fn every_reference_trace_is_reproduced() {
    let all = traces();
    for trace in all["traces"].as_array().unwrap() {
        let name = trace["name"].as_str().unwrap();
        let mut ncs = NcsV8::new(params(&trace["params"]));
        let inputs = trace["inputs"].as_array().unwrap();
        let steps = trace["steps"].as_array().unwrap();
        for (i, (input, step)) in inputs.iter().zip(steps).enumerate() {
            let x: Vec<f64> = input
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let got = ncs.process(&x);
            let at = format!("{name} step {} (t = {})", i, i + 1);
            assert_eq!(
                got.cluster_id,
                step["cluster_id"].as_i64().unwrap(),
                "cluster_id at {at}"
            );
            assert_eq!(
                got.is_outlier,
                step["is_outlier"].as_bool().unwrap(),
                "is_outlier at {at}"
            );
            assert_eq!(
                ncs.clusters().len() as u64,
                step["n_clusters_after"].as_u64().unwrap(),
                "n_clusters_after at {at}"
            );
            let score = step["outlier_score"].as_f64().unwrap();
            assert!(
                (got.outlier_score - score).abs() <= 1e-4,
                "score at {at}: {} vs {score}",
                got.outlier_score
            );
            let th = step["threshold_after"].as_f64().unwrap();
            assert!(
                (ncs.threshold() - th).abs() <= 1e-4,
                "threshold at {at}: {} vs {th}",
                ncs.threshold()
            );
        }
        let stats = &trace["final_stats"];
        let c = ncs.counters();
        assert_eq!(
            c.clusters_created,
            stats["clusters_created"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            c.clusters_merged,
            stats["clusters_merged"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            c.outliers_detected,
            stats["outliers_detected"].as_u64().unwrap(),
            "{name}"
        );
        assert!(
            (ncs.clustering_quality() - stats["clustering_quality"].as_f64().unwrap()).abs() < 1e-4,
            "{name}"
        );
        assert!(
            (ncs.global_stability() - stats["global_stability"].as_f64().unwrap()).abs() < 1e-4,
            "{name}"
        );
        for (got, want) in ncs
            .clusters()
            .iter()
            .zip(trace["final_clusters"].as_array().unwrap())
        {
            for (a, b) in got
                .centroid
                .iter()
                .zip(want["centroid"].as_array().unwrap())
            {
                assert!(
                    (*a as f64 - b.as_f64().unwrap()).abs() < 1e-4,
                    "{name} centroid"
                );
            }
            assert!(
                (got.confidence - want["confidence"].as_f64().unwrap()).abs() < 1e-4,
                "{name} confidence"
            );
            assert_eq!(
                got.updates,
                want["updates"].as_u64().unwrap(),
                "{name} updates"
            );
        }
    }
}

/// The same traces through `neurostream process --algorithm ncs-v8 --assignments`.
#[test]
fn the_offline_command_reports_the_reference_assignments() {
    use neurostream::config::{Algorithm, Config};
    use neurostream::offline::{process_lines, OfflineOptions};
    let all = traces();
    for trace in all["traces"].as_array().unwrap() {
        let mut config = Config::default();
        config.processing.clustering.algorithm = Algorithm::NcsV8;
        let input: String = trace["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, x)| format!("{{\"key\":\"k\",\"ts\":{},\"features\":{x}}}\n", 1_000 + i))
            .collect();
        let mut out = Vec::new();
        let options = OfflineOptions {
            assignments: true,
            ..OfflineOptions::default()
        };
        process_lines(
            &config,
            options,
            input.as_bytes(),
            &mut out,
            std::io::sink(),
        )
        .unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &Value| v["type"] == "assignment")
            .collect();
        let steps = trace["steps"].as_array().unwrap();
        assert_eq!(lines.len(), steps.len());
        for (i, (line, step)) in lines.iter().zip(steps).enumerate() {
            assert_eq!(line["offset"], i as u64);
            assert_eq!(line["cluster_id"], step["cluster_id"], "step {i}");
            assert_eq!(line["is_outlier"], step["is_outlier"], "step {i}");
        }
    }
}

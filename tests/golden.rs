//! Golden files: readable window cases under `tests/golden/`, each an input, a config and the
//! exact expected output of `neurostream process` (updates coalesced every 2 lines).

use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use neurostream::config::{self, Config};

fn golden(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let figment = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::file_exact(dir.join(format!("{name}.toml"))));
    let config = config::load_figment(figment).unwrap().config;
    let input = std::fs::read(dir.join(format!("{name}.input.jsonl"))).unwrap();
    let mut out = Vec::new();
    let options = neurostream::offline::OfflineOptions {
        update_every: 2,
        assignments: false,
    };
    neurostream::offline::process_lines(
        &config,
        options,
        input.as_slice(),
        &mut out,
        std::io::sink(),
    )
    .unwrap();
    let expected = std::fs::read_to_string(dir.join(format!("{name}.expected.jsonl"))).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), expected, "golden {name}");
}

#[test]
fn tumbling_with_grace_and_a_late_drop() {
    golden("tumbling_grace");
}

#[test]
fn hopping_with_updates_then_finals() {
    golden("hopping_update");
}

#[test]
fn sliding_as_in_the_kafka_streams_javadoc() {
    golden("sliding_kstreams");
}

#[test]
fn late_updates_correct_a_closed_window_until_allowed_lateness() {
    golden("late_update");
}

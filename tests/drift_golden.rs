//! The change detectors alarm exactly where River's do on the public golden stream
//! (tests/fixtures/ncs/drift_golden_stream.json).

use neurostream::ncs::drift::{Adwin, PageHinkley};

fn golden() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ncs/drift_golden_stream.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn expected(g: &serde_json::Value, name: &str) -> Vec<usize> {
    g["expected_alarms"][name]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

fn values(g: &serde_json::Value) -> Vec<f64> {
    g["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn adwin_alarms_where_river_does() {
    let g = golden();
    let mut adwin = Adwin::new(0.002);
    let alarms: Vec<usize> = values(&g)
        .into_iter()
        .enumerate()
        .filter_map(|(i, x)| adwin.update(x).map(|_| i))
        .collect();
    assert_eq!(alarms, expected(&g, "adwin_delta_0.002"));
}

#[test]
fn page_hinkley_alarms_where_river_does() {
    let g = golden();
    let mut ph = PageHinkley::new(30, 0.005, 50.0, 0.9999);
    let alarms: Vec<usize> = values(&g)
        .into_iter()
        .enumerate()
        .filter_map(|(i, x)| ph.update(x).map(|_| i))
        .collect();
    assert_eq!(alarms, expected(&g, "page_hinkley_default"));
}

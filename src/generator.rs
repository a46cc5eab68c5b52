//! Synthetic events: Gaussian blobs in feature space whose centres drift slowly, keyed sensors,
//! increasing event time, and (optionally) a sprinkling of malformed messages. Seeded and
//! deterministic, so the demo, benches and tests can reproduce a stream.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Generator settings.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// RNG seed.
    pub seed: u64,
    /// Feature dimension.
    pub dimension: usize,
    /// Number of blobs.
    pub clusters: usize,
    /// Number of distinct keys (`sensor-0` …).
    pub keys: usize,
    /// Event time of the first event (epoch ms).
    pub start_ms: i64,
    /// Event-time step between consecutive events, in microseconds (event times stay whole
    /// milliseconds: a step under 1,000 puts several events in one millisecond).
    pub step_us: i64,
    /// Largest backwards jitter of event time (out-of-order events).
    pub jitter_ms: i64,
    /// One message in this many is malformed (0: none).
    pub malformed_every: u64,
    /// Event ids are `<id_prefix>-<n>`.
    pub id_prefix: String,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            dimension: 4,
            clusters: 5,
            keys: 50,
            // 2025-11-23T00:00:00Z
            start_ms: 1_763_856_000_000,
            step_us: 5_000,
            jitter_ms: 200,
            malformed_every: 0,
            id_prefix: "evt".into(),
        }
    }
}

/// One generated message.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Kafka key (the sensor).
    pub key: String,
    /// JSON payload (or deliberately malformed bytes).
    pub payload: Vec<u8>,
    /// Whether this one is malformed.
    pub malformed: bool,
}

/// An endless, deterministic event stream.
#[derive(Debug)]
pub struct Generator {
    config: GeneratorConfig,
    rng: SmallRng,
    centres: Vec<Vec<f64>>,
    velocity: Vec<Vec<f64>>,
    n: u64,
}

impl Generator {
    /// A generator for `config`.
    pub fn new(config: GeneratorConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let centres = (0..config.clusters)
            .map(|_| {
                (0..config.dimension)
                    .map(|_| rng.random_range(-50.0..50.0))
                    .collect()
            })
            .collect();
        let velocity = (0..config.clusters)
            .map(|_| {
                (0..config.dimension)
                    .map(|_| rng.random_range(-1e-4..1e-4))
                    .collect()
            })
            .collect();
        Self {
            config,
            rng,
            centres,
            velocity,
            n: 0,
        }
    }

    /// The next message.
    pub fn next_message(&mut self) -> Generated {
        let i = self.n;
        self.n += 1;
        let key = format!(
            "sensor-{}",
            self.rng.random_range(0..self.config.keys.max(1))
        );
        if self.config.malformed_every > 0
            && i % self.config.malformed_every == self.config.malformed_every - 1
        {
            let payload = match (i / self.config.malformed_every) % 4 {
                0 => b"this is not json".to_vec(),
                1 => format!(r#"{{"key":"{key}","ts":"later","value":1}}"#).into_bytes(),
                2 => format!(r#"{{"key":"{key}","features":[1,"NaN"],"value":1}}"#).into_bytes(),
                _ => format!(r#"{{"key":"{key}","value":"high"}}"#).into_bytes(),
            };
            return Generated {
                key,
                payload,
                malformed: true,
            };
        }
        let c = self.rng.random_range(0..self.centres.len().max(1));
        let noise = Normal::new(0.0, 1.0).expect("unit normal is valid");
        for (x, v) in self.centres[c].iter_mut().zip(&self.velocity[c]) {
            *x += v * 100.0;
        }
        let features: Vec<f64> = self.centres[c]
            .iter()
            .map(|m| round3(m + noise.sample(&mut self.rng)))
            .collect();
        let jitter = if self.config.jitter_ms > 0 {
            self.rng.random_range(0..=self.config.jitter_ms)
        } else {
            0
        };
        let ts = self
            .config
            .start_ms
            .saturating_add((i as i64).saturating_mul(self.config.step_us) / 1_000)
            - jitter;
        let value = round3(10.0 * c as f64 + noise.sample(&mut self.rng));
        let payload = format!(
            r#"{{"key":"{key}","ts":{ts},"features":{},"value":{value},"id":"{}-{i}"}}"#,
            serde_json::to_string(&features).expect("finite floats serialise"),
            self.config.id_prefix
        )
        .into_bytes();
        Generated {
            key,
            payload,
            malformed: false,
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_under_a_millisecond_puts_several_events_in_one() {
        let mut g = Generator::new(GeneratorConfig {
            step_us: 250,
            jitter_ms: 0,
            start_ms: 1_000,
            ..GeneratorConfig::default()
        });
        let ts: Vec<i64> = (0..9)
            .map(|_| {
                let m = g.next_message();
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                v["ts"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(
            ts,
            [1_000, 1_000, 1_000, 1_000, 1_001, 1_001, 1_001, 1_001, 1_002]
        );
    }

    #[test]
    fn deterministic_and_decodable() {
        let cfg = GeneratorConfig {
            malformed_every: 10,
            ..GeneratorConfig::default()
        };
        let a: Vec<_> = {
            let mut g = Generator::new(cfg.clone());
            (0..100).map(|_| g.next_message()).collect()
        };
        let mut g = Generator::new(cfg);
        let b: Vec<_> = (0..100).map(|_| g.next_message()).collect();
        assert_eq!(a, b);
        let bad = a.iter().filter(|m| m.malformed).count();
        assert_eq!(bad, 10);
        for m in &a {
            let decoded = crate::event::decode(
                Some(&m.payload),
                None,
                Some(0),
                &crate::event::Limits::bytes(1 << 20),
            );
            assert_eq!(
                decoded.is_err(),
                m.malformed,
                "{}",
                String::from_utf8_lossy(&m.payload)
            );
        }
    }
}

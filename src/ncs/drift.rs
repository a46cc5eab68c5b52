//! Global change detectors over a stream of numbers (the clustering engine feeds them each
//! point's distance to its nearest centroid): Page-Hinkley and ADWIN. Pure and deterministic;
//! parameter names and behaviour follow River's detectors, and the golden stream in
//! `tests/fixtures/ncs` checks the alarm positions.

use serde::{Deserialize, Serialize};

/// Page-Hinkley test for a change in the mean, both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageHinkley {
    /// Observations before alarms are allowed.
    pub min_instances: u64,
    /// Magnitude of changes tolerated.
    pub delta: f64,
    /// Alarm threshold (lambda).
    pub threshold: f64,
    /// Forgetting factor of the cumulative sums.
    pub alpha: f64,
    /// Alarm only when the mean rises (River's detector watches both directions).
    #[serde(default)]
    pub increase_only: bool,
    n: u64,
    mean: f64,
    sum_increase: f64,
    sum_decrease: f64,
    min_increase: f64,
    max_decrease: f64,
    detected: bool,
}

impl Default for PageHinkley {
    fn default() -> Self {
        Self::new(30, 0.005, 50.0, 1.0 - 0.0001)
    }
}

impl PageHinkley {
    /// A detector with River's parameter names.
    pub fn new(min_instances: u64, delta: f64, threshold: f64, alpha: f64) -> Self {
        Self {
            min_instances,
            delta,
            threshold,
            alpha,
            increase_only: false,
            n: 0,
            mean: 0.0,
            sum_increase: 0.0,
            sum_decrease: 0.0,
            // Finite sentinels: checkpoints are JSON, which has no infinities.
            min_increase: f64::MAX,
            max_decrease: f64::MIN,
            detected: false,
        }
    }

    /// The same detector, alarming only when the mean rises.
    pub fn rising_only(mut self) -> Self {
        self.increase_only = true;
        self
    }

    fn reset(&mut self) {
        *self = Self {
            increase_only: self.increase_only,
            ..Self::new(self.min_instances, self.delta, self.threshold, self.alpha)
        };
    }

    /// Adds `x`; returns the test statistic when it raises an alarm (the detector then restarts).
    pub fn update(&mut self, x: f64) -> Option<f64> {
        if self.detected {
            self.reset();
        }
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        let dev = x - self.mean;
        self.sum_increase = self.alpha * self.sum_increase + dev - self.delta;
        self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta;
        self.min_increase = self.min_increase.min(self.sum_increase);
        self.max_decrease = self.max_decrease.max(self.sum_decrease);
        if self.n < self.min_instances {
            return None;
        }
        let up = self.sum_increase - self.min_increase;
        let down = self.max_decrease - self.sum_decrease;
        let statistic = if self.increase_only { up } else { up.max(down) };
        if statistic > self.threshold {
            self.detected = true;
            Some(statistic)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Bucket {
    count: u64,
    sum: f64,
    sum_sq: f64,
}

/// ADWIN (adaptive windowing): keeps the longest recent window whose halves' means do not
/// differ significantly; an alarm drops the older part. An exponential histogram (at most
/// `max_buckets` buckets per size) bounds memory and work to O(log n).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adwin {
    /// Confidence parameter.
    pub delta: f64,
    /// Cuts are checked every `clock` observations.
    pub clock: u64,
    /// Buckets of one size before two merge.
    pub max_buckets: usize,
    /// Smallest sub-window on either side of a cut.
    pub min_window_length: u64,
    /// Alarm only when the newer part's mean is the higher (the window still drops the older
    /// part at any significant cut).
    #[serde(default)]
    pub increase_only: bool,
    /// Oldest first; sizes never increase from oldest to newest.
    buckets: Vec<Bucket>,
    seen: u64,
}

impl Default for Adwin {
    fn default() -> Self {
        Self::new(0.002)
    }
}

impl Adwin {
    /// A detector with confidence `delta` and River's other defaults.
    pub fn new(delta: f64) -> Self {
        Self {
            delta,
            clock: 32,
            max_buckets: 5,
            min_window_length: 5,
            increase_only: false,
            buckets: Vec::new(),
            seen: 0,
        }
    }

    /// Observations in the current window.
    pub fn width(&self) -> u64 {
        self.buckets.iter().map(|b| b.count).sum()
    }

    /// Mean of the current window.
    pub fn mean(&self) -> f64 {
        let n = self.width();
        if n == 0 {
            0.0
        } else {
            self.buckets.iter().map(|b| b.sum).sum::<f64>() / n as f64
        }
    }

    /// Adds `x`; returns the mean difference across the cut when it raises an alarm.
    pub fn update(&mut self, x: f64) -> Option<f64> {
        self.buckets.push(Bucket {
            count: 1,
            sum: x,
            sum_sq: x * x,
        });
        self.compress();
        self.seen += 1;
        if self.seen % self.clock != 0 {
            return None;
        }
        let mut alarm = None;
        while let Some((cut, diff, rose)) = self.find_cut() {
            self.buckets.drain(..=cut);
            if rose || !self.increase_only {
                alarm = Some(diff);
            }
        }
        alarm
    }

    fn compress(&mut self) {
        let mut end = self.buckets.len();
        while end > 0 {
            let size = self.buckets[end - 1].count;
            let mut start = end;
            while start > 0 && self.buckets[start - 1].count == size {
                start -= 1;
            }
            if end - start <= self.max_buckets {
                break;
            }
            let merged = self.buckets.remove(start + 1);
            let b = &mut self.buckets[start];
            b.count += merged.count;
            b.sum += merged.sum;
            b.sum_sq += merged.sum_sq;
            end = start + 1;
        }
    }

    /// The same detector, alarming only when the mean rises.
    pub fn rising_only(mut self) -> Self {
        self.increase_only = true;
        self
    }

    /// The newest bucket boundary where the two sides' means differ beyond the bound: its
    /// index, the difference, and whether the newer side's mean is the higher.
    fn find_cut(&self) -> Option<(usize, f64, bool)> {
        let n: u64 = self.width();
        if n <= 10 {
            return None;
        }
        let total: f64 = self.buckets.iter().map(|b| b.sum).sum();
        let total_sq: f64 = self.buckets.iter().map(|b| b.sum_sq).sum();
        let mean = total / n as f64;
        let variance = (total_sq / n as f64 - mean * mean).max(0.0);
        let dd = (2.0 * (n as f64).ln() / self.delta).ln();
        let (mut n0, mut s0) = (0u64, 0.0f64);
        let mut best = None;
        for (k, b) in self.buckets[..self.buckets.len() - 1].iter().enumerate() {
            n0 += b.count;
            s0 += b.sum;
            let n1 = n - n0;
            if n0 < self.min_window_length || n1 < self.min_window_length {
                continue;
            }
            let m = 1.0 / (1.0 / n0 as f64 + 1.0 / n1 as f64);
            let epsilon = (2.0 / m * variance * dd).sqrt() + 2.0 / (3.0 * m) * dd;
            let signed = (total - s0) / n1 as f64 - s0 / n0 as f64;
            let diff = signed.abs();
            if diff > epsilon {
                best = Some((k, diff, signed > 0.0));
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stationary_noise_raises_no_alarm() {
        let mut ph = PageHinkley::default();
        let mut adwin = Adwin::default();
        for i in 0..20_000u64 {
            let x = ((i * 7919) % 13) as f64 / 13.0;
            assert!(ph.update(x).is_none(), "page-hinkley at {i}");
            assert!(adwin.update(x).is_none(), "adwin at {i}");
        }
        assert!(
            adwin.width() > 10_000,
            "the window keeps growing while nothing changes"
        );
    }

    #[test]
    fn adwin_memory_is_logarithmic() {
        let mut adwin = Adwin::default();
        for i in 0..100_000 {
            adwin.update((i % 2) as f64);
        }
        assert!(adwin.buckets.len() < 100, "{} buckets", adwin.buckets.len());
    }
}

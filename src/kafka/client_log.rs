//! librdkafka's log lines and client errors, rate-limited.
//!
//! During a broker outage librdkafka repeats the same line for every connection attempt of every
//! broker thread (hundreds of lines a minute). [`ClientLog`] lets through the first line of each
//! kind, then at most one every [`ClientLog::EVERY`], saying how many it held back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// A rate limiter for repeated client log lines, keyed by their kind.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// Per kind: when one was last let through, and how many were held back since.
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ClientLog {
    /// The shortest interval between two lines of one kind.
    pub const EVERY: Duration = Duration::from_secs(10);

    /// `Some(held back)` when a line of `kind` may be written now.
    pub fn admit(&self, kind: &str) -> Option<u64> {
        let mut seen = self
            .seen
            .lock()
            .expect("client-log lock is never poisoned: no code panics while holding it");
        let now = Instant::now();
        match seen.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                seen.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// Writes a librdkafka log line, rate-limited per facility and level.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let Some(held) = self.admit(&format!("{fac}:{}", level as i32)) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", fac, held_back = held, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", fac, held_back = held, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, held_back = held, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", fac, held_back = held, "{message}")
            }
        }
    }

    /// Writes a client error, rate-limited per error.
    pub fn error(&self, error: &KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(code) => format!("error:{code:?}"),
            None => "error".to_string(),
        };
        if let Some(held) = self.admit(&kind) {
            tracing::error!(target: "librdkafka", %error, held_back = held, "{reason}");
        }
    }
}

/// The context of the service's producer (and admin client): rate-limited logs.
#[derive(Debug, Default)]
pub struct QuietContext {
    log: ClientLog,
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.log.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_lines_are_held_back_and_counted() {
        let log = ClientLog::default();
        assert_eq!(log.admit("FAIL"), Some(0));
        assert_eq!(log.admit("FAIL"), None);
        assert_eq!(log.admit("FAIL"), None);
        assert_eq!(log.admit("OTHER"), Some(0));
        // Pretend the interval passed.
        log.seen.lock().unwrap().get_mut("FAIL").unwrap().0 -= ClientLog::EVERY;
        assert_eq!(log.admit("FAIL"), Some(2));
    }
}

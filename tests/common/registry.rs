//! A real Schema Registry for the tests: Apicurio Registry 3.0.9 (Confluent REST API under
//! `/apis/ccompat/v7`, in-memory storage), started from the jar `.ci/install-apicurio.sh`
//! fetches from Maven Central, on a free loopback port; killed on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VERSION: &str = "3.0.9";

/// Where the install script puts Apicurio: `NEUROSTREAM_APICURIO_HOME`, else
/// `~/.cache/neurostream/apicurio/3.0.9`; `None` when its jar is not there.
pub fn apicurio_home() -> Option<PathBuf> {
    let dir = match std::env::var_os("NEUROSTREAM_APICURIO_HOME") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/neurostream/apicurio")
            .join(VERSION),
    };
    dir.join(format!("apicurio-registry-app-{VERSION}-runner.jar"))
        .exists()
        .then_some(dir)
}

/// A running registry.
pub struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    /// Starts Apicurio, or skips (`None`, with a note) when it is not installed, unless
    /// `NEUROSTREAM_REQUIRE_KAFKA` is set (CI), which makes a missing registry a failure.
    pub fn start_or_skip() -> Option<Registry> {
        let Some(home) = apicurio_home() else {
            if std::env::var_os("NEUROSTREAM_REQUIRE_KAFKA").is_some() {
                panic!("Apicurio Registry not installed: run .ci/install-apicurio.sh");
            }
            println!("SKIPPED: Apicurio Registry not installed (run .ci/install-apicurio.sh)");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("neurostream-apicurio-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        // Small heap, serial GC and C1 only: a test registry holds a handful of schemas.
        let child = Command::new("java")
            .args([
                "-Xms64m",
                "-Xmx384m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xss512k",
                &format!("-Dquarkus.http.port={port}"),
                "-Dquarkus.http.host=127.0.0.1",
                "-Dapicurio.datasource.jdbc.initial-size=2",
                "-Dapicurio.datasource.jdbc.min-size=2",
                // The same schema text with other whitespace is the same schema (as Confluent).
                "-Dapicurio.ccompat.use-canonical-hash=true",
                "-Dquarkus.log.level=WARN",
                "-jar",
            ])
            .arg(home.join(format!("apicurio-registry-app-{VERSION}-runner.jar")))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run java: {e}"));
        let mut registry = Registry { child, port, log };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!(
                    "Apicurio exited during start-up ({status}); log {}",
                    registry.log.display()
                );
            }
            if registry.get("/health/ready").map(|(s, _)| s) == Some(200) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "Apicurio not ready after 120 s; log {}",
                registry.log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "registry: Apicurio {VERSION} ready in {:.1} s at {}",
            started.elapsed().as_secs_f64(),
            registry.url()
        );
        Some(registry)
    }

    /// The registry's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Confluent-compatible base URL (`schema_registry.url`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    /// A plain HTTP/1.0 GET on the registry's port: `(status, body)`.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        self.http("GET", path, None)
    }

    /// Registers `schema` under `subject`; returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let path = format!("/apis/ccompat/v7/subjects/{subject}/versions");
        let (status, text) = self
            .http("POST", &path, Some(&body))
            .expect("the registry answers");
        assert_eq!(status, 200, "registering under {subject}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["id"].as_u64().expect("an id") as u32
    }

    fn http(&self, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/vnd.schemaregistry.v1+json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

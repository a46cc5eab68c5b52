//! HTTP endpoints: `/metrics` (Prometheus), `/health`, `/ready`, `/status`.
//!
//! - `/health` (liveness): 503 while the service shuts down or when a partition has been
//!   retrying one batch for longer than `http.stall_timeout_ms` (a stuck worker), naming it.
//! - `/ready`: 200 once consuming with partitions assigned, every assigned partition restored
//!   from its checkpoint and none stalled.
//! - `/status`: per-partition progress as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{Progress, ProgressSnapshot};

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    progress: Arc<Progress>,
    limits: Limits,
    shutdown: CancellationToken,
}

/// When the service stops being healthy or ready.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A partition retrying one batch longer than this is stuck (`/health` fails).
    pub stall_timeout: Duration,
    /// A partition further behind its high watermark is not caught up (`/ready` fails).
    pub ready_max_lag: i64,
}

/// Installs the Prometheus recorder and returns its handle.
///
/// # Errors
/// When a recorder is already installed.
pub fn install_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::Matcher;
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    for m in crate::telemetry::CATALOGUE {
        if m.kind == crate::telemetry::MetricKind::Histogram {
            builder =
                builder.set_buckets_for_metric(Matcher::Full(m.name.to_string()), m.buckets)?;
        }
    }
    let handle = builder.install_recorder()?;
    crate::telemetry::describe_metrics();
    Ok(handle)
}

/// Drains recorded histogram samples into their buckets every second, so memory stays bounded
/// between scrapes (the exporter keeps raw samples until its upkeep runs).
pub fn spawn_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => handle.run_upkeep(),
            }
        }
    });
}

/// Binds the HTTP address (at start-up, so a taken port stops the service with a clear error).
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Liveness: `None` when healthy, else why not.
fn unhealthy(progress: &Progress, stall_timeout: Duration, shutting_down: bool) -> Option<String> {
    if shutting_down {
        return Some("shutting down".into());
    }
    let stalled = progress.stalled(stall_timeout);
    (!stalled.is_empty()).then(|| format!("stalled partitions: {}", stalled.join("; ")))
}

/// Readiness: `None` when ready, else why not.
fn not_ready(progress: &Progress, limits: Limits) -> Option<String> {
    let snap = progress.snapshot();
    let assigned: Vec<_> = snap.partitions.iter().filter(|(_, p)| p.assigned).collect();
    if !progress.running() || assigned.is_empty() {
        return Some("no partitions assigned yet".into());
    }
    let restoring: Vec<&str> = assigned
        .iter()
        .filter(|(_, p)| !p.restored)
        .map(|(name, _)| name.as_str())
        .collect();
    if !restoring.is_empty() {
        return Some(format!("restoring checkpoints of {}", restoring.join(", ")));
    }
    let lagging = progress.lagging(limits.ready_max_lag);
    if !lagging.is_empty() {
        return Some(format!("catching up: {}", lagging.join(", ")));
    }
    unhealthy(progress, limits.stall_timeout, false)
}

/// Serves the endpoints on `listener` until `shutdown`.
///
/// # Errors
/// When serving fails.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    progress: Arc<Progress>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        metrics,
        progress,
        limits,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route(
            "/health",
            get(|State(s): State<AppState>| async move {
                match unhealthy(
                    &s.progress,
                    s.limits.stall_timeout,
                    s.shutdown.is_cancelled(),
                ) {
                    None => (StatusCode::OK, "ok".to_string()),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        )
        .route(
            "/ready",
            get(|State(s): State<AppState>| async move {
                match not_ready(&s.progress, s.limits) {
                    None => (StatusCode::OK, "ready".to_string()),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
                }
            }),
        )
        .route(
            "/status",
            get(|State(s): State<AppState>| async move {
                Json::<ProgressSnapshot>(s.progress.snapshot())
            }),
        )
        .with_state(state);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP endpoints listening");
    serve_bounded(listener, app, shutdown).await;
    Ok(())
}

/// Connections served at once; more are closed at accept. Prometheus, probes and an operator's
/// curl need a handful.
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this (a client trickling them holds a connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection, keep-alive included, lives at most this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until `shutdown`, with bounded connections: a slow or idle client
/// cannot hold file descriptors and memory the Kafka and PostgreSQL clients need (axum's own
/// `serve` sets no header timeout and no connection limit).
async fn serve_bounded(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, mostly: back off rather than spin.
                    tracing::warn!(error = %err, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                _ = shutdown.cancelled() => {
                    // The request in flight is answered; then the connection closes.
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn bounded_server() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/health", get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_bounded(listener, app, shutdown.clone()));
        (addr, shutdown)
    }

    async fn get_health(addr: SocketAddr) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn idle_and_excess_connections_cannot_hold_the_endpoints() {
        let (addr, shutdown) = bounded_server().await;
        assert!(get_health(addr).await.ends_with("ok"));
        // Fill every slot with clients that send nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One more is closed at once, unanswered.
        let answer = get_health(addr).await;
        assert!(answer.is_empty(), "{answer}");
        // The silent clients are cut off after the header timeout, and room comes back.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(
            HEADER_READ_TIMEOUT + Duration::from_secs(10),
            idle[0].read(&mut buf),
        )
        .await
        .expect("the server closes a silent connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(get_health(addr).await.ends_with("ok"));
        shutdown.cancel();
    }

    #[test]
    fn health_and_readiness_follow_the_partitions() {
        let progress = Progress::default();
        let limit = Duration::from_millis(20);
        let limits = Limits {
            stall_timeout: limit,
            ready_max_lag: 100,
        };
        assert_eq!(unhealthy(&progress, limit, false), None);
        assert!(unhealthy(&progress, limit, true).is_some());
        assert!(not_ready(&progress, limits).is_some(), "not consuming yet");
        progress.set_running(true);
        progress.set_assigned("t", 0, true);
        progress.set_high_watermark("t", 0, 1_000);
        assert!(not_ready(&progress, limits).unwrap().contains("restoring"));
        progress.set_restored("t", 0, Some(850));
        let why = not_ready(&progress, limits).unwrap();
        assert!(why.contains("catching up: t/0 (150 behind)"), "{why}");
        progress.record_batch(
            "t",
            0,
            &crate::telemetry::BatchCounts {
                next_offset: 950,
                ..Default::default()
            },
        );
        assert_eq!(not_ready(&progress, limits), None);
        progress.set_retrying("t", 0, Some("PostgreSQL: down".into()));
        assert_eq!(unhealthy(&progress, limit, false), None, "not stalled yet");
        std::thread::sleep(Duration::from_millis(30));
        let why = unhealthy(&progress, limit, false).unwrap();
        assert!(why.contains("t/0: PostgreSQL: down"), "{why}");
        assert!(not_ready(&progress, limits).is_some());
        progress.set_retrying("t", 0, None);
        assert_eq!(unhealthy(&progress, limit, false), None);
    }
}

//! HTTP endpoints: `/metrics` (Prometheus), `/health`, `/ready`, `/status`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{Progress, ProgressSnapshot};

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    progress: Arc<Progress>,
}

/// Installs the Prometheus recorder and returns its handle.
///
/// # Errors
/// When a recorder is already installed.
pub fn install_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    crate::telemetry::describe_metrics();
    Ok(handle)
}

/// Serves the endpoints on `addr` until `shutdown`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(|State(s): State<AppState>| async move {
                let snap = s.progress.snapshot();
                let assigned = snap.partitions.values().any(|p| p.assigned);
                if s.progress.running() && assigned {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no partitions assigned yet",
                    )
                }
            }),
        )
        .route(
            "/status",
            get(|State(s): State<AppState>| async move {
                Json::<ProgressSnapshot>(s.progress.snapshot())
            }),
        )
        .with_state(AppState { metrics, progress });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "HTTP endpoints listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

//! The public, read-only API on loopback TCP: JWKS, OIDC discovery, health
//! and the Prometheus metrics (`/metrics`, `docs/metrics.md`).

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::any,
    Router,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{credentials::Minter, metrics::Metrics};

/// Path of the JWKS document.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Path of the OIDC discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Clone)]
struct Documents {
    minter: Arc<Minter>,
    jwks_uri: Arc<str>,
}

/// Serves the public API on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, minter: Arc<Minter>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let jwks_uri = match listener.local_addr() {
        Ok(addr) => format!("http://{addr}{JWKS_PATH}"),
        Err(_) => JWKS_PATH.to_owned(),
    };
    let app = router(minter, jwks_uri, metrics);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "public API stopped");
    }
}

fn router(minter: Arc<Minter>, jwks_uri: String, metrics: Arc<Metrics>) -> Router {
    documents(minter, jwks_uri).merge(Router::new().route(METRICS_PATH, axum::routing::get(scrape)).with_state(metrics))
}

/// The documents backends need to verify minted tokens (JWKS, discovery)
/// and a health check, with `jwks_uri` advertised by discovery: the public
/// API's and the JWKS listener's ([`super::jwks`]) common part.
pub(super) fn documents(minter: Arc<Minter>, jwks_uri: String) -> Router {
    // `any`: the documents answer every method as before; the JWKS handler
    // itself refuses what it does not serve.
    Router::new()
        .route(JWKS_PATH, any(jwks))
        .route(DISCOVERY_PATH, any(discovery))
        .route("/healthz", any(|| async { json(StatusCode::OK, "{\"status\":\"ok\"}".to_owned()) }))
        .fallback(|| async { json(StatusCode::NOT_FOUND, "{\"error\":\"not_found\"}".to_owned()) })
        .with_state(Documents { minter, jwks_uri: jwks_uri.into() })
}

async fn jwks(State(state): State<Documents>, request: Request) -> Response {
    state.minter.handle_jwks_request(&request).map(Body::new)
}

async fn discovery(State(state): State<Documents>) -> Response {
    json(StatusCode::OK, state.minter.discovery_document(&state.jwks_uri).to_string())
}

/// The metrics, encoded on a blocking thread: a scrape reads the eBPF maps.
async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(text)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE))], text)
                .into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "encoding the metrics failed");
            json(StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":\"metrics\"}".to_owned())
        }
        Err(e) => {
            tracing::error!(error = %e, "the metrics task failed");
            json(StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":\"metrics\"}".to_owned())
        }
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

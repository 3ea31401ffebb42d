//! The admin HTTP API, on a loopback address: what internal backends need to
//! verify the gateway's tokens (the JWKS document and OIDC discovery) and a
//! health check.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credentials::Minter;

/// Path of the JWKS document.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Path of the OIDC discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// `api:` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address; `null` disables the API.
    pub listen: Option<SocketAddr>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { listen: Some(SocketAddr::from(([127, 0, 0, 1], 15080))) }
    }
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, minter: Arc<Minter>, shutdown: CancellationToken) {
    let jwks_uri = match listener.local_addr() {
        Ok(addr) => format!("http://{addr}{JWKS_PATH}"),
        Err(_) => JWKS_PATH.to_owned(),
    };
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin API accept failed");
                    continue;
                }
            },
        };
        let minter = minter.clone();
        let jwks_uri = jwks_uri.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = route(&req, &minter, &jwks_uri);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "admin API connection ended");
            }
        });
    }
}

fn route<B>(req: &Request<B>, minter: &Minter, jwks_uri: &str) -> Response<Full<Bytes>> {
    match req.uri().path() {
        JWKS_PATH => minter.handle_jwks_request(req),
        DISCOVERY_PATH => json(StatusCode::OK, minter.discovery_document(jwks_uri).to_string()),
        "/healthz" => json(StatusCode::OK, "{\"status\":\"ok\"}".to_owned()),
        _ => json(StatusCode::NOT_FOUND, "{\"error\":\"not_found\"}".to_owned()),
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

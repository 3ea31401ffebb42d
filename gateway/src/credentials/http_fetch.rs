//! A minimal HTTP GET for JWKS documents: one request per connection, a
//! deadline for the whole exchange and a cap on the body, so a slow or
//! hostile issuer endpoint cannot hold the validator or exhaust memory.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::tls::UpstreamTls;

/// JWKS documents are a few kilobytes; a megabyte leaves room for big key sets.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

/// Fetches `url` (http or https) and returns the status and body.
pub(crate) async fn get(
    url: &str,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    tokio::time::timeout(timeout, get_inner(url, tls)).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn get_inner(url: &str, tls: Option<&UpstreamTls>) -> Result<(StatusCode, Bytes), String> {
    let uri: Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let host = uri.host().ok_or("URL without host")?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http and https URLs are supported".into()),
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_else(|| host.to_owned());
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/jwk-set+json, application/json")
        .header(header::USER_AGENT, concat!("ci-gateway/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect((bare_host, port)).await.map_err(|e| format!("connect: {e}"))?;
    if https {
        let tls = tls.ok_or("no TLS configuration for https")?;
        let stream = tls.connect(tcp, bare_host, Vec::new()).await.map_err(|e| e.to_string())?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

/// One request on a fresh HTTP/1.1 connection over `io`, the body capped at
/// [`MAX_BODY`] (also used for container runtimes' unix sockets). The
/// caller bounds the time.
pub(crate) async fn send<I>(io: I, request: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    // The connection task ends when the response is read and `sender` dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

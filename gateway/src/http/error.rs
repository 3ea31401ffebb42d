//! Errors of the HTTP engine.

use std::{io, time::Duration};

/// Boxed error as hyper and http-body use them.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why serving a connection, or one exchange on it, failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The client spoke malformed HTTP, timed out, or the connection broke.
    #[error("client connection: {0}")]
    Client(#[source] BoxError),
    /// Reading the client's request body failed.
    #[error("client request body: {0}")]
    ClientBody(#[source] hyper::Error),
    /// The connector failed (refused, unreachable, TLS verification...).
    #[error("upstream connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The connector (or the HTTP handshake) took too long.
    #[error("upstream connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// Upstream sent no response head in time.
    #[error("upstream response timed out: no response head within {0:?}")]
    ResponseTimeout(Duration),
    /// The HTTP handshake with upstream failed.
    #[error("upstream handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    /// The upstream exchange failed (reset, protocol error, closed early).
    #[error("upstream request failed: {0}")]
    Upstream(#[source] hyper::Error),
    /// The request could not be rewritten for upstream (bad authority).
    #[error("invalid upstream request: {0}")]
    Request(#[source] http::Error),
    /// An HTTP/1.1 upgrade could not be forwarded.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// The request body was aborted (blocked by the inspector, or the
    /// client's body failed); hyper resets the upstream request with it.
    #[error("request body aborted")]
    BodyAborted,
    /// The upstream connection slots of the client connection were closed
    /// (never happens while the connection is served).
    #[error("upstream connection slots closed")]
    SlotsClosed,
    /// The response inspector could not process the response body (for
    /// example undecodable compressed data while masking): the client's
    /// response is cut off rather than passed on unprocessed.
    #[error("response refused by the inspector: {0}")]
    ResponseFilter(String),
}

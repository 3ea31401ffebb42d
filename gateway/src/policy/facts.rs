//! What the proxy knows about a connection or request when it asks the
//! policy: all borrowed, so building facts and evaluating them allocates
//! nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::path::NormalizedPath;
use crate::postgres::sql::Statement;

/// An empty label or claim map, for facts without labels or claims.
pub static NO_ATTRIBUTES: BTreeMap<String, String> = BTreeMap::new();

/// `match.destination.protocol` values.
///
/// A request can be several at once: a gRPC request over TLS is both
/// `https` and `grpc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// An HTTP request on a plaintext connection (h2c gRPC included).
    Http,
    /// An HTTP request on a TLS connection the gateway terminated (gRPC included).
    Https,
    /// A gRPC request (`content-type: application/grpc*`), either transport.
    Grpc,
    /// A connection the gateway does not parse as HTTP: non-HTTP protocols,
    /// or TLS it does not terminate. Judged once per connection.
    Tcp,
    /// A PostgreSQL session the gateway speaks the wire protocol of: judged
    /// for the session at startup and then statement by statement
    /// ([`PostgresFacts`], [`super::Policy::evaluate_postgres`]).
    Postgres,
}

impl Protocol {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
        }
    }

    pub(super) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The connection (and, for HTTP, the request) being judged.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The client's identity URI.
    pub identity_uri: &'a str,
    /// The identity's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Verified OIDC claims, stringified.
    pub claims: &'a BTreeMap<String, String>,
    /// Whether the identity is the built-in `unmapped` one.
    pub unmapped: bool,
    /// Destination host name or IP address, without port: the TLS SNI, else
    /// the request's authority or `Host`, else the address, as
    /// [`super::judged_host`] extracts it. (Any letter case, a trailing dot
    /// and IPv6 brackets are tolerated.)
    pub host: &'a str,
    /// Destination IP address (the connection's original destination), for
    /// `destination.cidr`.
    pub addr: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// The HTTP request; `None` for a `tcp` connection, which no rule with
    /// request selectors matches.
    pub request: Option<HttpRequestFacts<'a>>,
}

/// An HTTP request's facts.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestFacts<'a> {
    /// The method as sent (methods are case-sensitive).
    pub method: &'a str,
    /// The request target, normalised by [`super::path::normalize`]: path
    /// and rpc selectors match its canonical path; a request whose path
    /// cannot be normalised is refused before it is judged.
    pub path: &'a NormalizedPath<'a>,
    /// The request headers (`content-type` decides gRPC/Connect).
    pub headers: &'a HeaderMap,
}

impl RequestFacts<'_> {
    /// The most specific protocol of these facts: `grpc` over `http`/`https`.
    pub fn protocol(&self) -> Protocol {
        match &self.request {
            None => Protocol::Tcp,
            Some(r) if is_grpc(content_type(r.headers)) => Protocol::Grpc,
            Some(_) if self.tls => Protocol::Https,
            Some(_) => Protocol::Http,
        }
    }
}

/// A PostgreSQL session's facts and, when judging one, a statement's. With
/// the connection's [`RequestFacts`] (whose `request` is `None`) they are
/// judged by [`super::Policy::evaluate_postgres`] as protocol `postgres`.
#[derive(Debug, Clone, Copy)]
pub struct PostgresFacts<'a> {
    /// The database the client asked for in its startup message.
    pub database: &'a str,
    /// The database user the client asked for in its startup message.
    pub user: &'a str,
    /// The statement judged (itself only: the caller judges each of its
    /// [`Statement::inner`] statements too); `None` judges the session at
    /// startup, which no rule with statement selectors matches.
    pub statement: Option<&'a Statement>,
}

/// Facts derived once per evaluation, shared by every rule.
pub(super) struct Derived<'a> {
    /// Bits of every [`Protocol`] the facts are.
    pub(super) protocols: u8,
    pub(super) host: &'a str,
    /// The address, IPv4-mapped IPv6 addresses as IPv4.
    pub(super) addr: IpAddr,
    pub(super) path: &'a str,
    pub(super) rpc: Option<&'a str>,
}

impl<'a> Derived<'a> {
    pub(super) fn new(f: &RequestFacts<'a>) -> Derived<'a> {
        let host = f.host.strip_suffix('.').unwrap_or(f.host);
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let (protocols, path, rpc) = match &f.request {
            None => (Protocol::Tcp.bit(), "", None),
            Some(r) => {
                let ct = content_type(r.headers);
                let transport = if f.tls { Protocol::Https } else { Protocol::Http };
                let grpc = if is_grpc(ct) { Protocol::Grpc.bit() } else { 0 };
                (transport.bit() | grpc, r.path.as_str(), r.path.rpc(r.method, ct))
            }
        };
        Derived { protocols, host, addr: f.addr.to_canonical(), path, rpc }
    }

    /// [`Derived::new`] for a PostgreSQL session or statement.
    pub(super) fn postgres(f: &RequestFacts<'a>) -> Derived<'a> {
        Derived { protocols: Protocol::Postgres.bit(), ..Derived::new(f) }
    }
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

/// The media type of a `content-type` value, without parameters.
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn has_prefix_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn is_grpc(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| has_prefix_ignore_case(media_type(ct), "application/grpc"))
}

/// The `package.Service/Method` of a gRPC or Connect request, if it is one,
/// from the raw `path?query` (for display; the policy judges
/// [`NormalizedPath::rpc`], the same on the normalised path).
///
/// gRPC (and gRPC-Web) is recognised by `content-type: application/grpc*`,
/// Connect streaming by `application/connect+*`; Connect unary calls are
/// `POST`s of `application/proto` or `application/json` (or `GET`s with a
/// `connect=v1` query) whose service is a dotted name (`/acme.v1.Svc/Get`),
/// which keeps ordinary JSON APIs (`/api/users`) out. The path must be
/// exactly `/<service>/<method>`; a `?query` is ignored.
pub fn rpc_method<'p>(method: &str, path: &'p str, content_type: Option<&str>) -> Option<&'p str> {
    let (path, query) = path.split_once('?').map_or((path, ""), |(p, q)| (p, q));
    rpc_of(method, path, query, content_type)
}

/// [`rpc_method`] of a path and query already split.
pub(super) fn rpc_of<'p>(method: &str, path: &'p str, query: &str, content_type: Option<&str>) -> Option<&'p str> {
    let rpc = path.strip_prefix('/')?;
    let (service, name) = rpc.split_once('/')?;
    if service.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    let media = media_type(content_type.unwrap_or(""));
    let framed =
        has_prefix_ignore_case(media, "application/grpc") || has_prefix_ignore_case(media, "application/connect+");
    let unary_body = method == "POST"
        && (media.eq_ignore_ascii_case("application/proto") || media.eq_ignore_ascii_case("application/json"));
    let unary_get = method == "GET" && query.split('&').any(|kv| kv == "connect=v1");
    let qualified = service.contains('.')
        && service.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (framed || ((unary_body || unary_get) && qualified)).then_some(rpc)
}

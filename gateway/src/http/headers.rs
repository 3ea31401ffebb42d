//! Header fix-ups between the client's and upstream's HTTP versions.

use std::net::IpAddr;

use http::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    uri::{Authority, PathAndQuery, Scheme, Uri},
    Method, Request, Version,
};

use super::HttpContext;

/// Headers that describe one hop, never the message (RFC 9110 7.6.1), plus
/// `Expect`: we answer `100-continue` ourselves, by reading the body.
/// Typed names: a `&str` would be parsed and hashed again for every
/// removal, twice per request.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::EXPECT,
];

/// Whether `headers`' `Connection` lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether an HTTP/1.x request asks to switch protocols (e.g. WebSocket).
pub(crate) fn is_upgrade_request(version: Version, headers: &HeaderMap) -> bool {
    version <= Version::HTTP_11 && headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Removes hop-by-hop headers, including those `Connection` names. With
/// `upgrade`, `Connection: upgrade` and `Upgrade` survive, because an
/// upgrade handshake is exactly what must reach the other side.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over their few names instead of a
    // lookup per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // Restored here; `prepare` drops it again for HTTP/1 upstreams.
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let (true, Some(value)) = (upgrade, upgrade_value) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

/// The authority upstream requests carry: the server name the inspector
/// judged by, with the original port when it is not the scheme's default.
pub(crate) fn authority(ctx: &HttpContext, req_host: Option<&str>) -> String {
    let default_port = if ctx.tls { 443 } else { 80 };
    let port = ctx.orig_dst.port();
    let name = ctx.server_name.trim();
    if name.is_empty() {
        return match req_host {
            Some(h) if !h.is_empty() => h.to_string(),
            _ if port == default_port => match ctx.orig_dst.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            },
            _ => ctx.orig_dst.to_string(),
        };
    }
    let host = match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => name.to_string(),
    };
    if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The Host the client addressed: `:authority` (HTTP/2, absolute-form) or
/// the `Host` header.
pub(crate) fn request_host(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
}

/// Rewrites a request (already stripped of hop-by-hop headers) for the
/// upstream protocol: origin-form URI plus `Host` for HTTP/1.1, absolute
/// URI (which hyper turns into `:scheme`/`:authority`) for HTTP/2.
pub(crate) fn prepare<B>(req: &mut Request<B>, h2: bool, authority: &str, tls: bool) -> Result<(), http::Error> {
    let path = match req.uri().path_and_query() {
        Some(pq) => pq.clone(),
        // OPTIONS * has no path; everything else without one means "/".
        None if req.method() == Method::OPTIONS && req.uri() == "*" => PathAndQuery::from_static("*"),
        None => PathAndQuery::from_static("/"),
    };
    let authority: Authority = authority.parse()?;
    if h2 {
        req.headers_mut().remove(header::HOST);
        // `te: trailers` is the only TE value HTTP/2 allows.
        *req.uri_mut() = Uri::builder()
            .scheme(if tls { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(authority)
            .path_and_query(path)
            .build()?;
        *req.version_mut() = Version::HTTP_2;
    } else {
        req.headers_mut().remove(header::TE);
        req.headers_mut().insert(header::HOST, HeaderValue::from_str(authority.as_str())?);
        *req.uri_mut() = Uri::from(path);
        *req.version_mut() = Version::HTTP_11;
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    fn ctx(name: &str, dst: &str, tls: bool) -> HttpContext {
        HttpContext { conn_id: 1, server_name: name.into(), orig_dst: dst.parse().unwrap(), tls }
    }

    #[test]
    fn authority_default_ports_are_omitted() {
        assert_eq!(authority(&ctx("api.example", "1.2.3.4:443", true), None), "api.example");
        assert_eq!(authority(&ctx("api.example", "1.2.3.4:80", false), None), "api.example");
        assert_eq!(authority(&ctx("api.example", "1.2.3.4:8443", true), None), "api.example:8443");
        assert_eq!(authority(&ctx("::1", "[::1]:443", true), None), "[::1]");
        assert_eq!(authority(&ctx("", "[::1]:8080", false), None), "[::1]:8080");
        assert_eq!(authority(&ctx("", "1.2.3.4:80", false), Some("h:80")), "h:80");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("authorization", HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-hop").is_none() && h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none() && h.get("transfer-encoding").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(h.get("authorization").is_some());
    }

    #[test]
    fn upgrade_headers_survive_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
    }

    #[test]
    fn prepare_for_each_protocol() {
        let mut req = Request::builder()
            .uri("https://client.example/a/b?k=v")
            .header("host", "client.example")
            .header("te", "trailers")
            .body(())
            .unwrap();
        prepare(&mut req, false, "api.example:8443", true).unwrap();
        assert_eq!(req.uri(), "/a/b?k=v");
        assert_eq!(req.headers()["host"], "api.example:8443");
        assert!(req.headers().get("te").is_none());
        let mut req = Request::builder().uri("/x?y").header("te", "trailers").body(()).unwrap();
        prepare(&mut req, true, "api.example", true).unwrap();
        assert_eq!(req.uri(), "https://api.example/x?y");
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.headers()["te"], "trailers");
    }
}

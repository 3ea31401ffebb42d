//! The destination host as the policy judges it, from an authority, a
//! `Host` header, a TLS SNI or an address: one function, so every caller
//! reads `[::1]:8443`, `Example.COM.:443` and `10.0.0.1` the same way.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Why an authority or `Host` value has no judged host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HostError {
    /// Nothing before the port.
    #[error("empty host")]
    Empty,
    /// `user@host`: a `Host` header has no userinfo, and which part a server
    /// takes for the host differs.
    #[error("userinfo (`@`) in the host")]
    UserInfo,
    /// `[...]` that is not an IPv6 address (or is not closed).
    #[error("invalid IPv6 literal")]
    BadIpv6,
    /// A port that is not 0-65535 digits.
    #[error("invalid port")]
    BadPort,
    /// A character no host name has (spaces, `%`, `/`, non-ASCII, ...), or
    /// an empty label (`a..b`, a second trailing dot).
    #[error("invalid character in the host name")]
    InvalidName,
}

/// The host an authority names, as policy `destination.host` globs match
/// it: without port, userinfo-free, lowercase, without the trailing dot of
/// a fully qualified name, and IPv6 addresses without brackets in their
/// canonical text form (RFC 5952: `[0:0::1]` is `::1`).
///
/// Accepts `host`, `host:port`, `[v6]`, `[v6]:port`, a bare IPv6 address
/// (as `IpAddr`'s `Display` writes one) and an empty port (`host:`).
/// Borrows when the input is already in that form.
pub fn judged_host(authority: &str) -> Result<Cow<'_, str>, HostError> {
    if authority.contains('@') {
        return Err(HostError::UserInfo);
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(HostError::BadIpv6)?;
        let p = if after.is_empty() { "" } else { after.strip_prefix(':').ok_or(HostError::BadIpv6)? };
        port(p)?;
        return ipv6(inside);
    }
    // More than one colon and no brackets: only a bare IPv6 address.
    if authority.bytes().filter(|&b| b == b':').count() > 1 {
        return ipv6(authority);
    }
    let host = match authority.split_once(':') {
        Some((host, p)) => {
            port(p)?;
            host
        }
        None => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    let valid = host
        .split('.')
        .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    if !valid {
        return Err(HostError::InvalidName);
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(host))
    }
}

/// Checks the port after `:` (empty is allowed, RFC 3986 §3.2.3).
fn port(p: &str) -> Result<(), HostError> {
    if p.is_empty() || (p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()) {
        Ok(())
    } else {
        Err(HostError::BadPort)
    }
}

fn ipv6(text: &str) -> Result<Cow<'_, str>, HostError> {
    let ip: Ipv6Addr = text.parse().map_err(|_| HostError::BadIpv6)?;
    let canonical = ip.to_string();
    Ok(if canonical == text { Cow::Borrowed(text) } else { Cow::Owned(canonical) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_form() {
        let cases = [
            ("example.com", "example.com", true),
            ("example.com:443", "example.com", true),
            ("Example.COM.:443", "example.com", false),
            ("example.com.", "example.com", true),
            ("example.com:", "example.com", true),
            ("api_v2.internal", "api_v2.internal", true),
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1:8080", "10.0.0.1", true),
            ("[::1]", "::1", true),
            ("[::1]:8443", "::1", true),
            ("[0:0::1]", "::1", false),
            ("[FD00::A]:80", "fd00::a", false),
            ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1", true),
            ("::1", "::1", true),
            ("fd00:0::1", "fd00::1", false),
            ("localhost", "localhost", true),
        ];
        for (input, want, borrowed) in cases {
            let got = judged_host(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), borrowed, "{input}");
        }
    }

    #[test]
    fn malformed_hosts_are_errors() {
        use HostError::*;
        let cases = [
            ("", Empty),
            (":443", Empty),
            (".", Empty),
            ("user@example.com", UserInfo),
            ("a@b:1", UserInfo),
            ("[::1", BadIpv6),
            ("[::1]x", BadIpv6),
            ("[nope]", BadIpv6),
            ("[v1.x]", BadIpv6),
            ("::g", BadIpv6),
            ("example.com:http", BadPort),
            ("example.com:65536", BadPort),
            ("example.com:-1", BadPort),
            ("[::1]:99999", BadPort),
            ("exa mple.com", InvalidName),
            ("example..com", InvalidName),
            ("example.com..", InvalidName),
            ("ex%61mple.com", InvalidName),
            ("exämple.com", InvalidName),
            ("a/b", InvalidName),
        ];
        for (input, want) in cases {
            assert_eq!(judged_host(input), Err(want), "{input}");
        }
    }
}

//! Why a policy decides what it decides: the deciding rule, and for every
//! earlier rule the first selector that did not match. Uses the very check
//! [`Policy::evaluate`] uses, so the two cannot disagree.

use serde::Serialize;

use super::compiled::{Policy, Selectors};
use super::decision::Decision;
use super::eval::{check, Miss};
use super::facts::{Derived, Protocol, RequestFacts};
use super::glob::GlobList;

/// The decision for some facts, with the reasons earlier rules lost.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation<'p> {
    /// Where the policy came from.
    pub policy: String,
    /// The policy's digest.
    pub digest: &'p str,
    /// The most specific protocol of the facts.
    pub protocol: Protocol,
    /// The gRPC/Connect method detected, if any.
    pub rpc: Option<String>,
    /// The decision ([`Policy::evaluate`]'s).
    pub decision: Decision<'p>,
    /// Every rule before the deciding one, in order.
    pub skipped: Vec<RuleMiss<'p>>,
}

/// A rule that did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMiss<'p> {
    /// Index in `rules`.
    pub index: usize,
    /// Name (`#<index>` when unnamed).
    pub rule: &'p str,
    /// The first selector that failed, e.g. `destination.host`.
    pub selector: String,
    /// Why, e.g. "`api.example.com` matches none of `*.cursor.sh`".
    pub detail: String,
}

impl Policy {
    /// Explains [`Policy::evaluate`]'s decision for `facts`.
    pub fn explain<'p>(&'p self, facts: &RequestFacts<'_>) -> Explanation<'p> {
        let derived = Derived::new(facts);
        let mut skipped = Vec::new();
        let mut decision = self.default_decision();
        for (index, rule) in self.rules.iter().enumerate() {
            match check(&rule.selectors, facts, &derived) {
                Ok(()) => {
                    decision = self.rule_decision(index, rule);
                    break;
                }
                Err(miss) => {
                    let (selector, detail) = describe(&rule.selectors, miss, facts, &derived);
                    skipped.push(RuleMiss { index, rule: &rule.name, selector, detail });
                }
            }
        }
        Explanation {
            policy: self.source.to_string(),
            digest: &self.digest,
            protocol: facts.protocol(),
            rpc: derived.rpc.map(str::to_owned),
            decision,
            skipped,
        }
    }
}

fn quoted(items: impl IntoIterator<Item = impl std::fmt::Display>) -> String {
    items.into_iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
}

fn none_of(value: &str, globs: &GlobList) -> String {
    format!("`{value}` matches none of {}", quoted(globs.sources()))
}

fn attribute(kind: &str, key: &str, value: Option<&String>, globs: &GlobList) -> String {
    match value {
        Some(v) => format!("{kind} `{key}` is `{v}`, which matches none of {}", quoted(globs.sources())),
        None => format!("{kind} `{key}` is not set"),
    }
}

fn describe(s: &Selectors, miss: Miss, f: &RequestFacts<'_>, d: &Derived<'_>) -> (String, String) {
    let protocols = [Protocol::Http, Protocol::Https, Protocol::Grpc, Protocol::Tcp];
    let names = |bits: u8, sep: &str| {
        let names: Vec<String> =
            protocols.iter().filter(|p| bits & p.bit() != 0).map(|p| format!("`{}`", p.as_str())).collect();
        names.join(sep)
    };
    let (selector, detail) = match miss {
        Miss::Protocol => (
            "destination.protocol".to_owned(),
            format!("{} is not {}", names(d.protocols, " + "), names(s.protocols, " or ")),
        ),
        Miss::Port => ("destination.port".to_owned(), format!("port {} is not any of {}", f.port, quoted(&s.ports))),
        Miss::Cidr => ("destination.cidr".to_owned(), format!("address {} is in none of {}", d.addr, quoted(&s.cidrs))),
        Miss::Unmapped => (
            "identity.unmapped".to_owned(),
            if f.unmapped { "the identity is unmapped".to_owned() } else { "the identity is mapped".to_owned() },
        ),
        Miss::NoRequest => {
            ("request".to_owned(), "a tcp connection has no HTTP request; request selectors never match it".to_owned())
        }
        Miss::Method => {
            let method = f.request.as_ref().map_or("", |r| r.method);
            ("request.method".to_owned(), format!("`{method}` is not any of {}", quoted(&s.methods)))
        }
        Miss::Host => ("destination.host".to_owned(), s.host.as_ref().map_or_else(String::new, |g| none_of(d.host, g))),
        Miss::Uri => {
            ("identity.uri".to_owned(), s.uri.as_ref().map_or_else(String::new, |g| none_of(f.identity_uri, g)))
        }
        Miss::Label(i) => match s.labels.get(i) {
            Some((k, g)) => (format!("identity.labels.{k}"), attribute("label", k, f.labels.get(k), g)),
            None => ("identity.labels".to_owned(), String::new()),
        },
        Miss::Claim(i) => match s.claims.get(i) {
            Some((k, g)) => (format!("identity.claims.{k}"), attribute("claim", k, f.claims.get(k), g)),
            None => ("identity.claims".to_owned(), String::new()),
        },
        Miss::Path => ("request.path".to_owned(), s.path.as_ref().map_or_else(String::new, |g| none_of(d.path, g))),
        Miss::Rpc => (
            "request.rpc".to_owned(),
            match (d.rpc, &s.rpc) {
                (Some(rpc), Some(g)) => none_of(rpc, g),
                _ => "not a gRPC or Connect request".to_owned(),
            },
        ),
        Miss::HeaderPresent(i) => (
            "request.headers.present".to_owned(),
            format!("header `{}` is absent", s.present.get(i).map_or("", |h| h.as_str())),
        ),
        Miss::HeaderAbsent(i) => (
            "request.headers.absent".to_owned(),
            format!("header `{}` is present", s.absent.get(i).map_or("", |h| h.as_str())),
        ),
    };
    (selector, detail)
}

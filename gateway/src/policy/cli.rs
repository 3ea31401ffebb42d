//! `gateway policy check|explain`: validating a policy file (in CI of the
//! file itself) and asking what it decides for a request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::compiled::Policy;
use super::decision::{Action, MaskRules};
use super::error::PolicyError;
use super::explain::Explanation;
use super::facts::{HttpRequestFacts, RequestFacts};
use super::PolicyContext;

/// `gateway policy ...`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// Subcommands of `gateway policy`.
#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; prints every error as file:line:column.
    Check {
        /// The policy file (default: `policy.file` of the configuration).
        file: Option<PathBuf>,
    },
    /// Show which rule decides a request, and why each earlier rule does not.
    Explain(ExplainArgs),
}

/// `gateway policy explain` options.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The policy file (default: `policy.file` of the configuration, else
    /// the built-in policy).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The client's identity URI.
    #[arg(long)]
    pub identity: String,
    /// An identity label, `key=value` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// A verified OIDC claim, `key=value` (repeatable).
    #[arg(long = "claim", value_name = "KEY=VALUE")]
    pub claims: Vec<String>,
    /// The identity is the built-in `unmapped` one.
    #[arg(long)]
    pub unmapped: bool,
    /// The destination: `https://host[:port]/path`, `http://...`, or
    /// `tcp://host:port` / `tls://host:port` for a connection not parsed as
    /// HTTP.
    #[arg(long)]
    pub url: String,
    /// The HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header, `name` or `name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME[: VALUE]")]
    pub headers: Vec<String>,
    /// The request's content type (decides gRPC and Connect).
    #[arg(long)]
    pub content_type: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `gateway policy` subcommand; `config_file` is `policy.file` of the
/// gateway configuration, if any, and `context` what `check` also checks the
/// file against (the configuration's approver groups). Exit 1 when the
/// policy file is invalid.
pub fn run(args: &PolicyArgs, config_file: Option<&Path>, context: &PolicyContext) -> anyhow::Result<ExitCode> {
    match &args.command {
        PolicyCommand::Check { file } => match file.as_deref().or(config_file) {
            Some(f) => Ok(check(f, context)),
            None => bail!("no policy file given, and `policy.file` is not set in the configuration"),
        },
        PolicyCommand::Explain(e) => explain(e, e.file.as_deref().or(config_file)),
    }
}

fn print_errors(file: &Path, errors: &[PolicyError]) {
    for e in errors {
        eprintln!("{e}");
    }
    eprintln!("{}: {} error(s)", file.display(), errors.len());
}

fn check(file: &Path, context: &PolicyContext) -> ExitCode {
    match Policy::load_in(file, context) {
        Ok(p) => {
            for w in p.warnings() {
                eprintln!("warning: {w}");
            }
            let approvals = p.rules.iter().filter(|r| matches!(r.outcome.action, Action::RequireApproval(_))).count();
            let denies = p.rules.iter().filter(|r| matches!(r.outcome.action, Action::Deny { .. })).count();
            println!(
                "{}: OK: {} rules ({} deny, {} require approval), default {}, {} mask spec(s), sha256 {}",
                file.display(),
                p.len(),
                denies,
                approvals,
                p.default.action.name(),
                p.masks().len(),
                p.short_digest()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(file, &errors);
            ExitCode::FAILURE
        }
    }
}

fn pairs(what: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("--{what} `{kv}`: expected KEY=VALUE"),
        })
        .collect()
}

/// The parts of `--url` that facts need.
struct Target {
    tls: bool,
    http: bool,
    host: String,
    port: u16,
    path: String,
}

fn target(url: &str) -> anyhow::Result<Target> {
    let uri: http::Uri = url.parse().with_context(|| format!("--url `{url}`"))?;
    let (tls, http, default_port) = match uri.scheme_str() {
        Some("https") => (true, true, Some(443)),
        Some("http") => (false, true, Some(80)),
        Some("tls") => (true, false, None),
        Some("tcp") => (false, false, None),
        _ => bail!("--url `{url}`: the scheme must be https, http, tls or tcp"),
    };
    let Some(host) = uri.host() else { bail!("--url `{url}` has no host") };
    let Some(port) = uri.port_u16().or(default_port) else { bail!("--url `{url}`: tcp and tls URLs need a port") };
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok(Target { tls, http, host: host.to_ascii_lowercase(), port, path })
}

fn headers(args: &ExplainArgs) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').map_or((h.as_str(), ""), |(n, v)| (n.trim(), v.trim()));
        let name = HeaderName::from_bytes(name.as_bytes()).with_context(|| format!("--header `{h}`"))?;
        let value = HeaderValue::from_str(value).with_context(|| format!("--header `{h}`"))?;
        map.append(name, value);
    }
    if let Some(ct) = &args.content_type {
        map.insert(http::header::CONTENT_TYPE, HeaderValue::from_str(ct).context("--content-type")?);
    }
    Ok(map)
}

fn explain(args: &ExplainArgs, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let policy = match file {
        Some(f) => match Policy::load(f) {
            Ok(p) => p,
            Err(errors) => {
                print_errors(f, &errors);
                return Ok(ExitCode::FAILURE);
            }
        },
        None => Policy::builtin(),
    };
    let labels = pairs("label", &args.labels)?;
    let claims = pairs("claim", &args.claims)?;
    let t = target(&args.url)?;
    let headers = headers(args)?;
    let request = t.http.then_some(HttpRequestFacts { method: &args.method, path: &t.path, headers: &headers });
    let facts = RequestFacts {
        identity_uri: &args.identity,
        labels: &labels,
        claims: &claims,
        unmapped: args.unmapped,
        host: &t.host,
        port: t.port,
        tls: t.tls,
        request,
    };
    let e = policy.explain(&facts);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e).context("serialising the explanation")?);
    } else {
        print_explanation(&e, &facts);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_explanation(e: &Explanation<'_>, f: &RequestFacts<'_>) {
    println!("policy       {} (sha256 {})", e.policy, e.digest.get(..12).unwrap_or(e.digest));
    let request = f.request.as_ref().map_or(String::new(), |r| format!(" {} {}", r.method, r.path));
    println!("request      {} {}:{}{request}", e.protocol.as_str(), f.host, f.port);
    if let Some(rpc) = &e.rpc {
        println!("  rpc        {rpc}");
    }
    for m in &e.skipped {
        println!("  rule {:<5} {:<28} no: {}: {}", m.index, m.rule, m.selector, m.detail);
    }
    let d = &e.decision;
    match d.index {
        Some(i) => println!("  rule {i:<5} {:<28} MATCH", d.rule),
        None => println!("  default    no rule matched"),
    }
    println!("decision     {}", d.action.name());
    match d.action {
        Action::Allow => {}
        Action::Deny { reason } => println!("  reason     {reason}"),
        Action::RequireApproval(a) => {
            println!("  reason     {}", a.reason);
            println!(
                "  approval   {} approval(s) from `{}` within {}",
                a.min_approvals,
                a.group,
                humantime_serde::re::humantime::format_duration(a.timeout)
            );
        }
    }
    match d.static_keys {
        Some(s) => println!("static_keys  {s}"),
        None => println!("static_keys  (findings.actions decide)"),
    }
    match (d.mask, d.mask_id) {
        (Some(m), Some(id)) => {
            let rules = match &m.rules {
                MaskRules::All => "all".to_owned(),
                MaskRules::Only(ids) if ids.is_empty() => "none".to_owned(),
                MaskRules::Only(ids) => ids.join(", "),
            };
            let patterns: Vec<&str> = m.patterns.iter().map(|p| p.name.as_str()).collect();
            println!("mask         #{id}: detector rules {rules}");
            if !patterns.is_empty() {
                println!("  patterns   {}", patterns.join(", "));
            }
            if !m.json_fields.is_empty() {
                println!("  json       {}", m.json_fields.join(", "));
            }
        }
        _ => println!("mask         none"),
    }
    println!("record       {}", d.record.as_str());
}

//! `gateway policy check|explain`: validating a policy file (in CI of the
//! file itself) and asking what it decides for a request.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Config;
use crate::policy::{
    judged_host, normalize, Action, CredentialUse, Explanation, HttpRequestFacts, MaskRules, PathRejection, Policy,
    PolicyContext, PolicyError, RequestFacts, StaticKeyAction,
};

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
    Explain(Box<ExplainArgs>),
}

/// `gateway policy explain` options: a request (`--url`) or a connection
/// the gateway does not parse as HTTP (`--host` and `--port`).
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("destination").required(true).args(["url", "host"])))]
pub struct ExplainArgs {
    /// The policy file (default: `policy.file` of the configuration, else
    /// the built-in policy).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The client's identity URI (default: none, which identity selectors
    /// other than `unmapped: false` do not match).
    #[arg(long, default_value = "")]
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
    pub url: Option<String>,
    /// The destination host (name or IP address) of a connection judged
    /// without a request: what applies when the gateway cannot understand
    /// the connection, `uninspectable` included.
    #[arg(long, requires = "port", conflicts_with = "url")]
    pub host: Option<String>,
    /// The destination port, with `--host`.
    #[arg(long, requires = "host")]
    pub port: Option<u16>,
    /// The connection's protocol, with `--host`: `tcp`, or `tls` the gateway
    /// does not terminate.
    #[arg(long, value_enum, default_value = "tcp", requires = "host")]
    pub protocol: ConnectionProtocol,
    /// The destination IP address, for `destination.cidr` (default: the host
    /// when it is an address, else 0.0.0.0).
    #[arg(long)]
    pub addr: Option<IpAddr>,
    /// The HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header, `name` or `name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME[: VALUE]")]
    pub headers: Vec<String>,
    /// The request's content type (decides gRPC and Connect).
    #[arg(long)]
    pub content_type: Option<String>,
    /// A SQL query judged as PostgreSQL statements, one by one (with
    /// `--host`, `--port` and `--database`).
    #[arg(long, requires_all = ["host", "database"])]
    pub sql: Option<String>,
    /// The PostgreSQL database, with `--sql`.
    #[arg(long, requires = "sql")]
    pub database: Option<String>,
    /// The PostgreSQL user, with `--sql`.
    #[arg(long = "db-user", requires = "sql", default_value = "")]
    pub db_user: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `gateway policy explain --protocol` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnectionProtocol {
    /// A connection not parsed as HTTP.
    Tcp,
    /// A TLS connection the gateway does not terminate.
    Tls,
}

/// Runs a `gateway policy` subcommand with the configuration's policy file
/// and approver groups. Exit 1 when the policy file is invalid.
pub fn run(config: &Config, args: &PolicyArgs) -> anyhow::Result<ExitCode> {
    run_with(args, config.policy.file.as_deref(), &config.policy_context())
}

/// [`run`] with `config_file` as `policy.file` of the gateway configuration,
/// if any, and `context` what `check` also checks the file against (the
/// configuration's approver groups).
pub fn run_with(args: &PolicyArgs, config_file: Option<&Path>, context: &PolicyContext) -> anyhow::Result<ExitCode> {
    match &args.command {
        PolicyCommand::Check { file } => match file.as_deref().or(config_file) {
            Some(f) => Ok(check(f, context)),
            None => bail!("no policy file given, and `policy.file` is not set in the configuration"),
        },
        PolicyCommand::Explain(e) => explain(e, e.file.as_deref().or(config_file), context),
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
            let approvals = p.rule_actions().filter(|a| matches!(a, Action::RequireApproval(_))).count();
            let denies = p.rule_actions().filter(|a| matches!(a, Action::Deny { .. })).count();
            println!(
                "{}: OK: {} rules ({} deny, {} require approval), default {}, {} mask spec(s), sha256 {}",
                file.display(),
                p.len(),
                denies,
                approvals,
                p.default_decision().action.name(),
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
    let host = judged_host(host).with_context(|| format!("--url `{url}`: host"))?.into_owned();
    Ok(Target { tls, http, host, port, path })
}

/// The `--host`/`--port`/`--protocol` connection, or the `--url` target.
fn destination(args: &ExplainArgs) -> anyhow::Result<Target> {
    match (&args.url, &args.host, args.port) {
        (Some(url), _, _) => target(url),
        (None, Some(host), Some(port)) => Ok(Target {
            tls: args.protocol == ConnectionProtocol::Tls,
            http: false,
            host: judged_host(host).with_context(|| format!("--host `{host}`"))?.into_owned(),
            port,
            path: String::new(),
        }),
        _ => bail!("give --url, or --host and --port"),
    }
}

/// `--addr`, else the host when it is an address, else `0.0.0.0`, which
/// only `0.0.0.0/0`-like networks contain (with a note when the policy has
/// `cidr` selectors, whose outcome then says little).
fn address(args: &ExplainArgs, host: &str, policy: &Policy) -> IpAddr {
    if let Some(addr) = args.addr.or_else(|| host.parse().ok()) {
        return addr;
    }
    if policy.uses_cidr() {
        eprintln!(
            "note: the policy has `cidr` selectors and no address was given: they are judged against 0.0.0.0; \
             give the address `{host}` resolves to with --addr"
        );
    }
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
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

fn explain(args: &ExplainArgs, file: Option<&Path>, context: &PolicyContext) -> anyhow::Result<ExitCode> {
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
    let t = destination(args)?;
    let addr = address(args, &t.host, &policy);
    let headers = headers(args)?;
    let path = if t.http {
        match normalize(&t.path) {
            Ok(p) => Some(p),
            Err(rejection) => {
                print_refusal(args.json, &t.path, rejection)?;
                return Ok(ExitCode::SUCCESS);
            }
        }
    } else {
        None
    };
    let request = path.as_ref().map(|path| HttpRequestFacts { method: &args.method, path, headers: &headers });
    let facts = RequestFacts {
        identity_uri: &args.identity,
        labels: &labels,
        claims: &claims,
        unmapped: args.unmapped,
        host: &t.host,
        addr,
        port: t.port,
        tls: t.tls,
        request,
    };
    if let Some(sql) = &args.sql {
        let database = args.database.as_deref().unwrap_or("");
        return explain_sql(&policy, &facts, database, &args.db_user, sql, args.json);
    }
    let e = policy.explain(&facts);
    let held = held_credential(&e, &facts, context);
    if args.json {
        let mut body = serde_json::to_value(&e).context("serialising the explanation")?;
        if let Some(held) = &held {
            body["credential"] = held.json();
        }
        println!("{}", serde_json::to_string_pretty(&body).context("serialising the explanation")?);
    } else {
        print_explanation(&e, &facts);
        if let Some(held) = &held {
            println!("{}", held.text());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Which held credential a swap or an injection would use.
enum Held {
    /// `credentials.credentials[index]`.
    Entry { index: usize, identity: String, host: String, why: &'static str },
    /// None: such requests are refused.
    Missing { why: &'static str },
    /// The configuration was not given (explain without a configuration's credentials).
    Unknown { why: &'static str },
}

impl Held {
    fn json(&self) -> serde_json::Value {
        match self {
            Held::Entry { index, identity, host, why } => serde_json::json!({
                "for": why, "entry": index, "identity": identity, "host": host,
            }),
            Held::Missing { why } => serde_json::json!({
                "for": why, "entry": null,
                "warning": "no credential held for this identity and destination: such requests are refused",
            }),
            Held::Unknown { why } => {
                serde_json::json!({ "for": why, "entry": null, "warning": "credentials not known" })
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Held::Entry { index, identity, host, why } => {
                format!("  held       {why}: credentials.credentials[{index}] (identity `{identity}`, host `{host}`)")
            }
            Held::Missing { why } => format!(
                "  held       {why}: WARNING no credential held for this identity and destination \
                 (no credentials.credentials entry matches): such requests are refused"
            ),
            Held::Unknown { why } => format!("  held       {why}: the configuration's credentials are not known here"),
        }
    }
}

/// The credential entry a decision that swaps or injects would use for the
/// facts' identity and host; `None` when the decision does neither.
fn held_credential(e: &Explanation<'_>, facts: &RequestFacts<'_>, context: &PolicyContext) -> Option<Held> {
    let d = &e.decision;
    if matches!(d.action, Action::Deny { .. }) {
        return None;
    }
    let why = match (d.credential, d.static_keys) {
        (CredentialUse::Inject, _) => "inject",
        (_, Some(StaticKeyAction::Swap)) => "swap",
        _ => return None,
    };
    let Some(entries) = &context.credentials else { return Some(Held::Unknown { why }) };
    Some(match crate::credentials::store::entry_for(entries, facts.identity_uri, facts.host) {
        Some(index) => {
            let entry = &entries[index];
            Held::Entry { index, identity: entry.identity.clone(), host: entry.host.clone(), why }
        }
        None => Held::Missing { why },
    })
}

/// A path the gateway refuses before any rule is consulted.
fn print_refusal(json: bool, raw: &str, rejection: PathRejection) -> anyhow::Result<()> {
    if json {
        let body = serde_json::json!({ "refused": { "path": raw, "code": rejection.code(), "reason": rejection.to_string() } });
        println!("{}", serde_json::to_string_pretty(&body).context("serialising the refusal")?);
    } else {
        println!("request      {raw}");
        println!("decision     refused before the policy (400): {rejection}");
    }
    Ok(())
}

fn print_explanation(e: &Explanation<'_>, f: &RequestFacts<'_>) {
    println!("policy       {} (sha256 {})", e.policy, e.digest.get(..12).unwrap_or(e.digest));
    let request = f.request.as_ref().map_or(String::new(), |r| format!(" {} {}", r.method, r.path));
    let tls = if f.request.is_none() && f.tls { " (tls, not terminated)" } else { "" };
    println!("request      {} {}:{}{request}{tls}", e.protocol.as_str(), f.host, f.port);
    if !f.addr.is_unspecified() {
        println!("  addr       {}", f.addr);
    }
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
    println!("credential   {}", d.credential.as_str());
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
    println!("uninspectable {}", d.uninspectable.as_str());
}

/// `gateway policy explain --sql`: why the policy decides what it decides
/// for each statement of `query` (text, or JSON with `json`).
fn explain_sql(
    policy: &Policy,
    facts: &RequestFacts<'_>,
    database: &str,
    user: &str,
    query: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match policy.explain_sql(facts, database, user, query) {
        Ok(e) if json => println!("{}", serde_json::to_string_pretty(&e).context("serialising the explanation")?),
        Ok(e) => print!("{}", e.render()),
        Err(err) => {
            let e = policy.explain_unclassified(facts, database, user, query);
            if json {
                let body = serde_json::json!({ "syntax_error": err.to_string(), "explanation": e });
                println!("{}", serde_json::to_string_pretty(&body).context("serialising the explanation")?);
            } else {
                println!("syntax error {err}: judged as one statement of kind `unknown`");
                print!("{}", e.render());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

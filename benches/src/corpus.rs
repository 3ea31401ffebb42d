//! A detection corpus built from other scanners' published examples: Nosey
//! Parker's rule `examples` / `negative_examples`, gitleaks' rule tests
//! (`tps` / `fps` in `cmd/generate/config/rules/*.go`) and trufflehog's
//! detector pattern tests (`input` with an empty or non-empty `want` in
//! `pkg/detectors/*/*_test.go`). It reads local source trees (never this
//! repository: the samples are not checked in) and labels every sample
//! positive or negative, unambiguous or ambiguous (see [`ambiguity`]).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::gosrc::{tokenize, Eval, Tok, Value};

/// Which project a sample comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// praetorian-inc/noseyparker
    NoseyParker,
    /// gitleaks/gitleaks
    Gitleaks,
    /// trufflesecurity/trufflehog
    Trufflehog,
}

impl Source {
    /// Short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::NoseyParker => "noseyparker",
            Source::Gitleaks => "gitleaks",
            Source::Trufflehog => "trufflehog",
        }
    }
}

/// Why a sample does not count towards recall or the false-positive rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ambiguity {
    /// Contains a documentation stand-in (`EXAMPLE`, `xxxx`, `<your…>`, `${…}`, `fake`…).
    Placeholder,
    /// Its longest token is shorter than 12 characters or is filler (one character dominates).
    Truncated,
    /// The same text is a positive in one place and a negative in another.
    Conflict,
    /// A negative that is a complete, working-format key which the project
    /// lists only because it was published (gitleaks' Firebase SDK sample
    /// Google API keys): blocking it is right for a gateway.
    PublishedKey,
    /// A trufflehog negative whose test case calls its text a valid pattern
    /// (`valid pattern - key out of prefix range`, `… - no keyword`): by
    /// trufflehog's own label the key is well formed, and the case tests only
    /// that its detector wants the provider's name nearby.
    ValidOutOfContext,
    /// A negative holding a token that passes a format's published structure
    /// check (see [`WellFormed`]): a key of another kind than the one
    /// the test is about, which a gateway should block.
    WellFormedKey,
    /// The project itself labels it an identifier, not a secret (Nosey
    /// Parker's `AWS S3 Bucket`, `Amazon Resource Name`, `Google Client ID`…:
    /// rules whose `categories` have `identifier` and not `secret`).
    Identifier,
}

/// One sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Its project.
    pub source: Source,
    /// Provider, from the rule file or detector directory name (`aws`, `stripe`).
    pub provider: String,
    /// `path:line` inside the project, to look it up there (the text is never printed).
    pub origin: String,
    /// The sample text, as the project has it.
    pub text: String,
    /// Whether the project says it holds a secret.
    pub positive: bool,
    /// Set when it does not count.
    pub ambiguous: Option<Ambiguity>,
    /// The test case's `name:` (trufflehog), else empty.
    pub case: String,
    /// The project labels what the sample holds an identifier, not a secret
    /// (a Nosey Parker rule whose `categories` have `identifier` but not `secret`).
    pub identifier_only: bool,
}

/// Samples of one project, and how many elements could not be evaluated.
#[derive(Debug, Default)]
pub struct Extracted {
    /// The samples.
    pub samples: Vec<Sample>,
    /// Sample expressions the extractor did not understand (skipped).
    pub unextracted: usize,
}

#[derive(Deserialize)]
struct NpFile {
    rules: Vec<NpRule>,
}

#[derive(Deserialize)]
struct NpRule {
    id: String,
    #[serde(default)]
    examples: Vec<String>,
    #[serde(default)]
    negative_examples: Vec<String>,
    #[serde(default)]
    categories: Vec<String>,
}

fn provider_of(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default()
}

fn sorted_files(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    Ok(files)
}

/// Nosey Parker: `crates/noseyparker/data/default/builtin/rules/*.yml`.
pub fn noseyparker(root: &Path) -> anyhow::Result<Extracted> {
    let dir = root.join("crates/noseyparker/data/default/builtin/rules");
    let mut out = Extracted::default();
    for path in sorted_files(&dir, ".yml")? {
        let text = std::fs::read_to_string(&path)?;
        let file: NpFile = serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let provider = provider_of(&path);
        let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        for rule in file.rules {
            let identifier_only =
                rule.categories.iter().any(|c| c == "identifier") && !rule.categories.iter().any(|c| c == "secret");
            for (list, positive) in [(&rule.examples, true), (&rule.negative_examples, false)] {
                for (k, s) in list.iter().enumerate() {
                    out.samples.push(Sample {
                        source: Source::NoseyParker,
                        provider: provider.clone(),
                        origin: format!(
                            "{rel}:{}:{}[{k}]",
                            rule.id,
                            if positive { "examples" } else { "negative_examples" }
                        ),
                        text: s.clone(),
                        positive,
                        ambiguous: None,
                        case: String::new(),
                        identifier_only,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// gitleaks: `tps`/`fps` assignments in `cmd/generate/config/rules/*.go`.
pub fn gitleaks(root: &Path) -> anyhow::Result<Extracted> {
    let dir = root.join("cmd/generate/config/rules");
    let mut out = Extracted::default();
    for (n, path) in sorted_files(&dir, ".go")?.into_iter().enumerate() {
        if path.to_string_lossy().ends_with("_test.go") {
            continue;
        }
        let src = std::fs::read_to_string(&path)?;
        let toks = tokenize(&src);
        let mut ev = Eval::new(&toks, 0x6c65616b ^ n as u64);
        let provider = provider_of(&path);
        let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        let mut i = 0;
        while i < toks.len() {
            // Any `name := expr` / `name = expr` at statement level: string
            // helpers (`secret := …`) feed later expressions; `tps` / `fps` are the samples.
            let Tok::Ident(name) = &toks[i].tok else {
                i += 1;
                continue;
            };
            let assign = match (toks.get(i + 1).map(|t| &t.tok), toks.get(i + 2).map(|t| &t.tok)) {
                (Some(Tok::Punct(':')), Some(Tok::Punct('='))) => Some(i + 3),
                (Some(Tok::Punct('=')), Some(t)) if *t != Tok::Punct('=') => Some(i + 2),
                _ => None,
            };
            let prev_dot = i > 0 && toks[i - 1].tok == Tok::Punct('.');
            let Some(rhs) = assign.filter(|_| !prev_dot) else {
                i += 1;
                continue;
            };
            let name = name.clone();
            let line = toks[i].line;
            let (value, end) = ev.expr(rhs);
            let positive = match name.as_str() {
                "tps" | "truePositives" => Some(true),
                "fps" | "falsePositives" => Some(false),
                _ => None,
            };
            match (positive, value) {
                (Some(positive), Some(v)) => {
                    let items = match &v {
                        Value::Str(s) => vec![s.clone()],
                        Value::List(l) => l.clone(),
                    };
                    // `tps = append(tps, …)` re-lists earlier samples: keep only the new ones.
                    let seen = match ev.env.get(&name) {
                        Some(Value::List(l)) if toks.get(rhs).map(|t| &t.tok) == Some(&Tok::Ident("append".into())) => {
                            l.len()
                        }
                        _ => 0,
                    };
                    for (k, s) in items.iter().enumerate().skip(seen) {
                        out.samples.push(Sample {
                            source: Source::Gitleaks,
                            provider: provider.clone(),
                            origin: format!("{rel}:{line}[{k}]"),
                            text: s.clone(),
                            positive,
                            ambiguous: None,
                            case: String::new(),
                            identifier_only: false,
                        });
                    }
                    ev.env.insert(name, v);
                }
                (Some(_), None) => {
                    out.unextracted += 1;
                    ev.env.remove(&name);
                }
                (None, Some(v)) => {
                    ev.env.insert(name, v);
                }
                (None, None) => {
                    ev.env.remove(&name);
                }
            }
            i = end.max(i + 1);
        }
    }
    Ok(out)
}

/// trufflehog: in `pkg/detectors/*/*_test.go` (integration tests excluded),
/// each `input:` of a test case with `want` as a `[]string`: empty or `nil`
/// is a negative, non-empty a positive. Package-level strings are the environment.
pub fn trufflehog(root: &Path) -> anyhow::Result<Extracted> {
    let base = root.join("pkg/detectors");
    let mut out = Extracted::default();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&base)
        .map_err(|e| anyhow::anyhow!("{}: {e}", base.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut files = Vec::new();
    for d in &dirs {
        for f in sorted_files(d, "_test.go")? {
            if !f.to_string_lossy().ends_with("integration_test.go") {
                files.push(f);
            }
        }
    }
    for (n, path) in files.into_iter().enumerate() {
        let src = std::fs::read_to_string(&path)?;
        let toks = tokenize(&src);
        let mut ev = Eval::new(&toks, 0x7468 ^ n as u64);
        let provider = path.parent().map(provider_of).unwrap_or_default();
        let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        // Pass 1: `name = expr` / `name := expr` strings anywhere (package-level
        // `var`/`const` blocks and locals), in order.
        let mut i = 0;
        while i + 2 < toks.len() {
            if let Tok::Ident(name) = &toks[i].tok {
                let rhs = match (&toks[i + 1].tok, &toks[i + 2].tok) {
                    (Tok::Punct(':'), Tok::Punct('=')) => Some(i + 3),
                    (Tok::Punct('='), t) if *t != Tok::Punct('=') => Some(i + 2),
                    _ => None,
                };
                if let Some(rhs) = rhs.filter(|_| i == 0 || toks[i - 1].tok != Tok::Punct('.')) {
                    let name = name.clone();
                    if let (Some(v @ Value::Str(_)), end) = ev.expr(rhs) {
                        ev.env.insert(name, v);
                        i = end;
                        continue;
                    }
                }
            }
            i += 1;
        }
        // Pass 2: `input: expr` … `want: …` pairs, with the case's `name:`.
        let mut i = 0;
        let mut case = String::new();
        while i + 1 < toks.len() {
            if toks[i].tok == Tok::Ident("name".into()) && toks[i + 1].tok == Tok::Punct(':') {
                if let Some(Tok::Str(n)) = toks.get(i + 2).map(|t| &t.tok) {
                    case = n.clone();
                }
            }
            let is_input = toks[i].tok == Tok::Ident("input".into()) && toks[i + 1].tok == Tok::Punct(':');
            if !is_input {
                i += 1;
                continue;
            }
            let line = toks[i].line;
            let (value, end) = ev.expr(i + 2);
            // The matching `want:` before the next `input:`.
            let mut j = end;
            let mut want = None;
            while j + 2 < toks.len() {
                if toks[j].tok == Tok::Ident("input".into()) && toks[j + 1].tok == Tok::Punct(':') {
                    break;
                }
                if toks[j].tok == Tok::Ident("want".into()) && toks[j + 1].tok == Tok::Punct(':') {
                    want = Some(j + 2);
                    break;
                }
                j += 1;
            }
            let positive = want.and_then(|w| match &toks[w].tok {
                Tok::Ident(n) if n == "nil" => Some(false),
                Tok::Punct('[') => {
                    // []string{ … }: empty means negative; []detectors.Result is not a pattern test.
                    let is_string = toks.get(w + 2).map(|t| &t.tok) == Some(&Tok::Ident("string".into()));
                    let empty = toks.get(w + 4).map(|t| &t.tok) == Some(&Tok::Punct('}'));
                    is_string.then_some(!empty)
                }
                _ => None,
            });
            match (positive, value) {
                (Some(positive), Some(Value::Str(text))) => out.samples.push(Sample {
                    source: Source::Trufflehog,
                    provider: provider.clone(),
                    origin: format!("{rel}:{line}"),
                    text,
                    positive,
                    ambiguous: None,
                    case: std::mem::take(&mut case),
                    identifier_only: false,
                }),
                (Some(_), _) => out.unextracted += 1,
                (None, _) => {}
            }
            i = end.max(i + 1);
        }
    }
    Ok(out)
}

/// Stand-ins that make a sample documentation rather than a credential.
const PLACEHOLDERS: &[&str] = &[
    "example",
    "xxxx",
    "****",
    "<your",
    "your_",
    "your-",
    "${",
    "{{",
    "redacted",
    "dummy",
    "placeholder",
    "fake",
    "changeme",
    "replace_me",
    "1234567890",
    "abcdefghij",
    // Documentation's passwords (`P@ssw0rd`, MongoDB's `D1fficultP%40ssw0rd`).
    "passw0rd",
    "p@ssw0rd",
    "p%40ssw0rd",
];

/// Typed rather than generated, by the same test as the detector's
/// placeholder filter: six letters in sequence up or down (`abcdef`,
/// `klmnop`), seven digits (`1234567`), or letters and digits interleaved
/// in sequence (`a1b2c3d4`).
fn typed_sequence(lower: &[u8]) -> bool {
    let class = |b: u8| {
        if b.is_ascii_digit() {
            1
        } else if b.is_ascii_lowercase() {
            2
        } else {
            0
        }
    };
    let seq = |i: usize, stride: usize, n: usize, step: i16| {
        (1..n).all(|k| {
            let (a, b) = (lower[i + (k - 1) * stride], lower[i + k * stride]);
            class(a) != 0 && class(a) == class(b) && i16::from(b) - i16::from(a) == step
        })
    };
    (0..lower.len()).any(|i| {
        [1i16, -1].iter().any(|&step| {
            (i + 6 <= lower.len() && class(lower[i]) == 2 && seq(i, 1, 6, step))
                || (i + 7 <= lower.len() && class(lower[i]) == 1 && seq(i, 1, 7, step))
                || (i + 8 <= lower.len() && seq(i, 2, 4, step) && seq(i + 1, 2, 4, step))
        })
    })
}

/// Tokens passing a published format's structure: GitHub's `gh?_` tokens
/// with their CRC32 check digits; OpenAI keys with the `T3BlbkFJ` marker
/// (base64 of `OpenAI`) between two 20-character halves, or a
/// project/service/admin key around it; GitLab OAuth application secrets
/// (`gloas-` and exactly 64 hex digits); Azure SAS signatures that are an
/// HMAC-SHA256 (43 base64 characters and `=`, `+` and `/` possibly
/// percent-encoded).
pub struct WellFormed(Vec<regex::Regex>);

impl WellFormed {
    /// Compiles the structure patterns.
    pub fn new() -> anyhow::Result<WellFormed> {
        let patterns = [
            r"(?:^|[^A-Za-z0-9_])gh[pousr]_([A-Za-z0-9]{36})(?:[^A-Za-z0-9_]|$)",
            r"(?:^|[^A-Za-z0-9_-])sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}(?:[^A-Za-z0-9_-]|$)",
            r"(?:^|[^A-Za-z0-9_-])sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}",
            r"(?:^|[^A-Za-z0-9_-])gloas-[0-9a-f]{64}(?:[^A-Za-z0-9_-]|$)",
            r"[?&]sig=(?:[A-Za-z0-9+/]|%2[BbFf]){43}(?:%3D|=)(?:[^A-Za-z0-9%+/=]|$)",
        ];
        let res = patterns.iter().map(|p| regex::Regex::new(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(WellFormed(res))
    }

    /// Whether `text` holds such a token.
    pub fn matches(&self, text: &str) -> bool {
        self.0.iter().enumerate().any(|(k, re)| {
            re.captures_iter(text).any(|c| match (k, c.get(1)) {
                // GitHub: 30 random characters, then their CRC32 in base62.
                (0, Some(body)) => {
                    let (random, check) = body.as_str().split_at(30);
                    gateway::detect::confirm::base62_crc32(random.as_bytes()) == check.as_bytes()
                }
                _ => true,
            })
        })
    }
}

/// Labels samples that cannot fairly count: a placeholder marker anywhere
/// in the text; no token (run of `[A-Za-z0-9+/=_.-]`) of 12 characters or
/// more, or a longest token one character makes up 60% of (truncated or
/// filler); or text that is a positive in one place and a negative in
/// another (`Conflict`); a sample the project labels an identifier
/// ([`Ambiguity::Identifier`]); and, for negatives only, [`Ambiguity::PublishedKey`],
/// [`Ambiguity::ValidOutOfContext`] and [`Ambiguity::WellFormedKey`]. The
/// placeholder, truncation and conflict rules apply to positives and negatives alike.
pub fn ambiguity(samples: &mut [Sample]) -> anyhow::Result<()> {
    let well_formed = WellFormed::new()?;
    let positives: HashSet<String> = samples.iter().filter(|s| s.positive).map(|s| s.text.clone()).collect();
    let negatives: HashSet<String> = samples.iter().filter(|s| !s.positive).map(|s| s.text.clone()).collect();
    for s in samples.iter_mut() {
        let lower = s.text.to_ascii_lowercase();
        s.ambiguous = if positives.contains(&s.text) && negatives.contains(&s.text) {
            Some(Ambiguity::Conflict)
        } else if s.identifier_only {
            Some(Ambiguity::Identifier)
        } else if !s.positive && is_published_key(s) {
            Some(Ambiguity::PublishedKey)
        } else if !s.positive
            && s.source == Source::Trufflehog
            && s.case.to_ascii_lowercase().starts_with("valid pattern")
        {
            Some(Ambiguity::ValidOutOfContext)
        } else if !s.positive && well_formed.matches(&s.text) {
            Some(Ambiguity::WellFormedKey)
        } else if PLACEHOLDERS.iter().any(|p| lower.contains(p)) || typed_sequence(lower.as_bytes()) {
            Some(Ambiguity::Placeholder)
        } else if is_truncated(&s.text) {
            Some(Ambiguity::Truncated)
        } else {
            None
        };
    }
    Ok(())
}

/// gitleaks' `gcp.go` negatives that are whole 39-character `AIza…` keys (sample keys
/// of Google's published SDKs, allowlisted there by value).
fn is_published_key(s: &Sample) -> bool {
    let t = s.text.as_bytes();
    s.source == Source::Gitleaks
        && s.origin.contains("/gcp.go:")
        && t.len() == 39
        && t.starts_with(b"AIza")
        && t.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

fn is_truncated(text: &str) -> bool {
    let longest = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_.-".contains(c)))
        .max_by_key(|t| t.len())
        .unwrap_or("");
    if longest.len() < 12 {
        return true;
    }
    let mut counts: HashMap<u8, usize> = HashMap::new();
    for b in longest.bytes() {
        *counts.entry(b).or_default() += 1;
    }
    counts.values().copied().max().unwrap_or(0) * 10 >= longest.len() * 6
}

/// Provider families for the report.
pub const FAMILIES: &[(&str, &[&str])] = &[
    (
        "ai",
        &[
            "openai",
            "anthropic",
            "huggingface",
            "cohere",
            "groq",
            "perplexity",
            "replicate",
            "mistral",
            "xai",
            "langsmith",
            "langchain",
            "deepseek",
            "gemini",
            "clarifai",
            "assemblyai",
            "elevenlabs",
            "cursor",
        ],
    ),
    (
        "cloud",
        &[
            "aws",
            "amazon",
            "azure",
            "gcp",
            "google",
            "alibaba",
            "digitalocean",
            "cloudflare",
            "heroku",
            "linode",
            "ibm",
            "oracle",
            "scaleway",
            "vultr",
            "fly",
            "netlify",
            "vercel",
            "tencent",
            "yandex",
            "hetzner",
            "openstack",
            "firebase",
            "okta",
            "auth0",
            "databricks",
            "snowflake",
            "supabase",
            "planetscale",
            "render",
            "railway",
        ],
    ),
    (
        "ci-vcs-registry",
        &[
            "github",
            "gitlab",
            "bitbucket",
            "circleci",
            "travis",
            "npm",
            "pypi",
            "nuget",
            "rubygems",
            "docker",
            "jfrog",
            "artifactory",
            "atlassian",
            "jira",
            "confluence",
            "buildkite",
            "terraform",
            "vault",
            "hashicorp",
            "pulumi",
            "doppler",
            "sonar",
            "snyk",
            "codecov",
            "gitter",
            "drone",
            "jenkins",
            "harness",
            "octopus",
            "azuredevops",
            "clojars",
            "crates",
            "pub",
            "gradle",
            "maven",
            "infracost",
            "scalingo",
            "teamcity",
            "bitrise",
            "codeclimate",
            "sourcegraph",
            "gitea",
            "gitee",
            "launchdarkly",
            "postman",
            "prefect",
        ],
    ),
    (
        "payments-messaging-email",
        &[
            "stripe",
            "twilio",
            "sendgrid",
            "mailgun",
            "mailchimp",
            "slack",
            "discord",
            "telegram",
            "square",
            "paypal",
            "braintree",
            "shopify",
            "postmark",
            "mandrill",
            "sendinblue",
            "brevo",
            "teams",
            "mattermost",
            "messagebird",
            "plaid",
            "adyen",
            "coinbase",
            "flutterwave",
            "razorpay",
            "sendbird",
            "pusher",
            "nexmo",
            "vonage",
            "mailjet",
            "sparkpost",
            "zendesk",
            "intercom",
            "hubspot",
            "twitter",
            "facebook",
            "linkedin",
            "dropbox",
            "microsoft",
            "line",
            "kraken",
            "gocardless",
            "easypost",
            "duffel",
            "finicity",
            "checkout",
        ],
    ),
    (
        "observability",
        &[
            "datadog",
            "newrelic",
            "new_relic",
            "sentry",
            "grafana",
            "dynatrace",
            "splunk",
            "honeycomb",
            "pagerduty",
            "opsgenie",
            "logz",
            "loggly",
            "sumologic",
            "lightstep",
            "bugsnag",
            "rollbar",
            "raygun",
            "elastic",
            "signalfx",
            "appoptics",
            "instana",
            "statuspage",
            "uptimerobot",
            "beamer",
            "mixpanel",
            "segment",
            "amplitude",
            "heap",
        ],
    ),
    (
        "keys-jwt",
        &["jwt", "privatekey", "private_key", "pem", "ssh", "pgp", "putty", "pkcs", "age", "jks", "kubernetes"],
    ),
    (
        "database-urls",
        &[
            "postgres",
            "mysql",
            "mongo",
            "redis",
            "jdbc",
            "odbc",
            "connection",
            "database",
            "sql",
            "uri",
            "url",
            "ldap",
            "rabbitmq",
            "amqp",
            "couchbase",
            "neo4j",
            "clickhouse",
            "cassandra",
            "ftp",
            "smtp",
        ],
    ),
    ("generic", &["generic", "password", "secret", "credential", "token", "key", "http", "netrc", "htpasswd"]),
];

/// The family of a provider name.
pub fn family(provider: &str) -> &'static str {
    let p = provider.to_ascii_lowercase().replace(['-', ' '], "");
    // Short names (`age`, `pub`, `line`) only as a prefix, or they match inside longer names.
    let matches = |n: &&str| if n.len() <= 4 { p.starts_with(n) } else { p.contains(n) };
    FAMILIES.iter().find(|(_, names)| names.iter().any(matches)).map_or("other", |(f, _)| f)
}

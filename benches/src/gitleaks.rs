//! gitleaks' default rules (`config/gitleaks.toml` in its source tree)
//! applied the way gitleaks' detector applies them, so that the corpus
//! harness can report gitleaks' figures beside ours without building
//! gitleaks (a Go binary). What is reproduced, from gitleaks'
//! `detect/detect.go`: a rule runs only when one of its keywords occurs
//! (case-insensitively) in the sample; each regex match is a finding whose
//! secret is the `secretGroup` or else the first non-empty group; findings
//! at or under the rule's entropy are dropped, then those the global or
//! the rule's allowlists allow (regexes against the secret, the match or
//! the line as `regexTarget` says; stopwords in the secret; `AND` / `OR`
//! conditions). What is approximated: the regexes run on Rust's `regex`
//! crate (RE2 semantics, as Go's `regexp`; any that do not compile are
//! counted and skipped); there are no file paths, so path-only rules and
//! path allowlists never apply; gitleaks' decoding of base64 / hex /
//! percent-encoded segments and its `requiredRules` are not reproduced.

use std::path::Path;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    allowlist: Option<AllowlistSpec>,
    #[serde(default)]
    allowlists: Vec<AllowlistSpec>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleSpec {
    id: String,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    secret_group: usize,
    #[serde(default)]
    entropy: f64,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    allowlists: Vec<AllowlistSpec>,
    #[serde(default)]
    allowlist: Option<AllowlistSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AllowlistSpec {
    #[serde(default)]
    regexes: Vec<String>,
    #[serde(default)]
    stopwords: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    commits: Vec<String>,
    #[serde(default)]
    regex_target: Option<String>,
    #[serde(default)]
    condition: Option<String>,
}

/// What an allowlist regex is matched against.
#[derive(Clone, Copy)]
enum Target {
    Secret,
    Match,
    Line,
}

struct Allowlist {
    regexes: Vec<Regex>,
    stopwords: Vec<String>,
    target: Target,
    /// `AND`: every kind of check listed must allow; paths and commits (which
    /// samples do not have) then never do.
    all: bool,
    has_paths_or_commits: bool,
}

struct Rule {
    id: String,
    regex: Regex,
    secret_group: usize,
    entropy: f64,
    keywords: Vec<String>,
    allowlists: Vec<Allowlist>,
}

/// The loaded rules and what could not be loaded.
pub struct GitleaksRules {
    rules: Vec<Rule>,
    global: Vec<Allowlist>,
    /// Rules without a content regex (path-only rules): never apply here.
    pub path_only: usize,
    /// Rules or allowlist regexes the `regex` crate could not compile, with the reason.
    pub skipped: Vec<String>,
}

/// Go's `regexp` is byte-oriented with ASCII classes unless told otherwise;
/// compile without Unicode classes first and fall back if a pattern needs
/// them. Go also reads a `{` that does not start a repetition (`{{`, `{a}`)
/// as a literal where Rust's parser refuses it: such braces are escaped.
fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    let build = |p: &str| {
        RegexBuilder::new(p)
            .unicode(false)
            .size_limit(64 << 20)
            .build()
            .or_else(|_| RegexBuilder::new(p).size_limit(64 << 20).build())
    };
    build(pattern).or_else(|e| {
        let escaped = escape_literal_braces(pattern);
        if escaped == pattern {
            Err(e)
        } else {
            build(&escaped)
        }
    })
}

/// Escapes each `{` that is not a repetition `{n}`, `{n,}` or `{n,m}`, and
/// each `}` that does not close one.
fn escape_literal_braces(pattern: &str) -> String {
    let b = pattern.as_bytes();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    let mut open_rep = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            // Keep an escape and the character it escapes together.
            let end = (i + 2).min(b.len());
            out.push_str(&pattern[i..end]);
            i = end;
            continue;
        }
        if c == b'{' {
            let rest = &b[i + 1..];
            let digits = rest.iter().take_while(|d| d.is_ascii_digit()).count();
            let after = &rest[digits..];
            let tail = after.iter().position(|&x| x == b'}');
            let is_rep = digits > 0
                && tail.is_some_and(|t| {
                    after[..t].iter().all(|x| x.is_ascii_digit() || *x == b',')
                        && after[..t].iter().filter(|x| **x == b',').count() <= 1
                });
            if is_rep {
                open_rep = true;
                out.push('{');
            } else {
                out.push_str("\\{");
            }
        } else if c == b'}' {
            if open_rep {
                open_rep = false;
                out.push('}');
            } else {
                out.push_str("\\}");
            }
        } else {
            let ch_len = pattern[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&pattern[i..i + ch_len]);
            i += ch_len;
            continue;
        }
        i += 1;
    }
    out
}

fn allowlist(spec: &AllowlistSpec, skipped: &mut Vec<String>, owner: &str) -> Allowlist {
    let mut regexes = Vec::new();
    for r in &spec.regexes {
        match compile(r) {
            Ok(re) => regexes.push(re),
            Err(e) => skipped.push(format!("{owner} allowlist regex: {}", e.to_string().lines().last().unwrap_or(""))),
        }
    }
    Allowlist {
        regexes,
        stopwords: spec.stopwords.iter().map(|w| w.to_lowercase()).collect(),
        target: match spec.regex_target.as_deref() {
            Some("match") => Target::Match,
            Some("line") => Target::Line,
            _ => Target::Secret,
        },
        all: spec.condition.as_deref().is_some_and(|c| c.eq_ignore_ascii_case("AND")),
        has_paths_or_commits: !spec.paths.is_empty() || !spec.commits.is_empty(),
    }
}

impl Allowlist {
    fn allows(&self, secret: &str, whole: &str, line: &str) -> bool {
        let target = match self.target {
            Target::Secret => secret,
            Target::Match => whole,
            Target::Line => line,
        };
        let regex = (!self.regexes.is_empty()).then(|| self.regexes.iter().any(|r| r.is_match(target)));
        let lower = secret.to_lowercase();
        let stop = (!self.stopwords.is_empty()).then(|| self.stopwords.iter().any(|w| lower.contains(w.as_str())));
        let checks: Vec<bool> = [regex, stop].into_iter().flatten().collect();
        if self.all {
            // A path or commit condition cannot hold for a sample.
            !self.has_paths_or_commits && !checks.is_empty() && checks.iter().all(|c| *c)
        } else {
            checks.iter().any(|c| *c)
        }
    }
}

fn shannon(s: &str) -> f64 {
    gateway::detect::confirm::shannon_entropy(s.as_bytes())
}

impl GitleaksRules {
    /// Reads a gitleaks configuration file.
    pub fn load(path: &Path) -> anyhow::Result<GitleaksRules> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut skipped = Vec::new();
        let global: Vec<Allowlist> =
            file.allowlist.iter().chain(&file.allowlists).map(|a| allowlist(a, &mut skipped, "global")).collect();
        let mut rules = Vec::new();
        let mut path_only = 0;
        for spec in file.rules {
            let Some(pattern) = &spec.regex else {
                path_only += 1;
                continue;
            };
            let regex = match compile(pattern) {
                Ok(r) => r,
                Err(e) => {
                    skipped.push(format!("{}: {}", spec.id, e.to_string().lines().last().unwrap_or("")));
                    continue;
                }
            };
            let allowlists =
                spec.allowlists.iter().chain(&spec.allowlist).map(|a| allowlist(a, &mut skipped, &spec.id)).collect();
            rules.push(Rule {
                id: spec.id,
                regex,
                secret_group: spec.secret_group,
                entropy: spec.entropy,
                keywords: spec.keywords.iter().map(|k| k.to_lowercase()).collect(),
                allowlists,
            });
        }
        if rules.is_empty() {
            anyhow::bail!("{}: no rules with a regex", path.display());
        }
        Ok(GitleaksRules { rules, global, path_only, skipped })
    }

    /// Rules loaded.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule loaded.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The ids of the rules with a finding in `text`.
    pub fn scan(&self, text: &str) -> Vec<&str> {
        let lower = text.to_lowercase();
        let mut out = Vec::new();
        for rule in &self.rules {
            if !rule.keywords.is_empty() && !rule.keywords.iter().any(|k| lower.contains(k.as_str())) {
                continue;
            }
            let found = rule.regex.find_iter(text).any(|m| {
                let whole = m.as_str().trim_matches('\n');
                let line_start = text[..m.start()].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[m.end()..].find('\n').map_or(text.len(), |i| m.end() + i);
                let line = &text[line_start..line_end];
                let secret = match rule.regex.captures(whole) {
                    Some(c) if c.len() >= 2 => {
                        if rule.secret_group > 0 {
                            match c.get(rule.secret_group) {
                                Some(g) => g.as_str(),
                                None if rule.secret_group < c.len() => "",
                                None => return false,
                            }
                        } else {
                            c.iter().skip(1).flatten().map(|g| g.as_str()).find(|g| !g.is_empty()).unwrap_or(whole)
                        }
                    }
                    _ => whole,
                };
                if rule.entropy != 0.0 && shannon(secret) <= rule.entropy {
                    return false;
                }
                !self.global.iter().any(|a| a.allows(secret, whole, line))
                    && !rule.allowlists.iter().any(|a| a.allows(secret, whole, line))
            });
            if found {
                out.push(rule.id.as_str());
            }
        }
        out
    }
}

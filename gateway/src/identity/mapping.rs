//! The operator's mapping file: ordered rules from process attributes to
//! identities, validated and compiled once per (re)load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::matchset::{Field, Pattern, Sets, SetsBuilder};
use super::template::{Escape, Placeholder, Template};
use super::IdentityConfig;

/// One problem in a mapping file, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}: {message}", self.location())]
pub struct MappingError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line; 0 when the error concerns the whole file (I/O).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// Index of the rule concerned, if any.
    pub rule: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl MappingError {
    fn location(&self) -> String {
        match (self.line, self.column) {
            (0, _) => self.file.display().to_string(),
            (l, 0) => format!("{}:{l}", self.file.display()),
            (l, c) => format!("{}:{l}:{c}", self.file.display()),
        }
    }
}

/// A scalar or a list of scalars; a list matches when any element does.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    require_trusted: Option<bool>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    require_trusted: Option<bool>,
    #[serde(default, rename = "match")]
    selectors: SelectorSpec,
    identity: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorSpec {
    exe: Option<OneOrMany<String>>,
    exe_sha256: Option<OneOrMany<String>>,
    uid: Option<OneOrMany<u32>>,
    user: Option<OneOrMany<String>>,
    cgroup: Option<OneOrMany<String>>,
    container: Option<OneOrMany<String>>,
    container_name: Option<OneOrMany<String>>,
    container_image: Option<OneOrMany<String>>,
    #[serde(default)]
    env: BTreeMap<String, OneOrMany<String>>,
    parent_exe: Option<OneOrMany<String>>,
    ancestor_exe: Option<OneOrMany<String>>,
    comm: Option<OneOrMany<String>>,
}

/// A compiled rule. Selectors are `None`/empty when absent; a present
/// selector with several values matches when any value does.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) index: usize,
    pub(crate) label: String,
    pub(crate) require_trusted: bool,
    pub(crate) uid: Option<Vec<u32>>,
    pub(crate) exe_sha256: Option<Vec<String>>,
    pub(crate) exe: Option<Vec<Pattern>>,
    pub(crate) cgroup: Option<Vec<Pattern>>,
    pub(crate) container: Option<Vec<Pattern>>,
    /// Job-controlled (whoever starts the container names it): never
    /// trusted evidence.
    pub(crate) container_name: Option<Vec<Pattern>>,
    /// Job-controlled (a CI job's configuration picks its image): never
    /// trusted evidence.
    pub(crate) container_image: Option<Vec<Pattern>>,
    pub(crate) parent_exe: Option<Vec<Pattern>>,
    pub(crate) ancestor_exe: Option<Vec<Pattern>>,
    pub(crate) comm: Option<Vec<Pattern>>,
    /// Variable name, index of its set in [`Sets`], patterns.
    pub(crate) env: Vec<(String, Option<usize>, Vec<Pattern>)>,
    pub(crate) uri: Template,
    pub(crate) labels: Vec<(String, Template)>,
}

/// A validated, compiled mapping file.
#[derive(Debug, Clone)]
pub struct MappingFile {
    pub(crate) path: PathBuf,
    pub(crate) rules: Vec<Rule>,
    pub(crate) sets: Sets,
}

impl MappingFile {
    /// Whether any rule looks at ancestors (`parent_exe`, `ancestor_exe`):
    /// attestation skips the parent chain otherwise.
    pub fn uses_ancestors(&self) -> bool {
        self.rules.iter().any(|r| r.parent_exe.is_some() || r.ancestor_exe.is_some())
    }

    /// Reads and compiles `path` with the default configuration
    /// (default trust domain and env allowlist).
    pub fn load(path: &Path) -> Result<MappingFile, Vec<MappingError>> {
        MappingFile::load_with(path, &IdentityConfig::default())
    }

    /// Reads and compiles `path` against `config` (trust domain, allowlist).
    pub fn load_with(path: &Path, config: &IdentityConfig) -> Result<MappingFile, Vec<MappingError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![MappingError { file: path.to_owned(), line: 0, column: 0, rule: None, message: e.to_string() }]
        })?;
        MappingFile::parse_with(path, &text, config)
    }

    /// Compiles `text` (named `path` in errors) with the default configuration.
    pub fn parse(path: &Path, text: &str) -> Result<MappingFile, Vec<MappingError>> {
        MappingFile::parse_with(path, text, &IdentityConfig::default())
    }

    /// Compiles `text` against `config`, returning every error found.
    pub fn parse_with(path: &Path, text: &str, config: &IdentityConfig) -> Result<MappingFile, Vec<MappingError>> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let spec: FileSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let (line, column) = e.inner().location().map_or((0, 0), |l| (l.line(), l.column()));
            let at = e.path().to_string();
            let message = if at == "." { e.inner().to_string() } else { format!("{at}: {}", e.inner()) };
            vec![MappingError { file: path.to_owned(), line, column, rule: None, message: strip_location(&message) }]
        })?;
        let mut errors = Vec::new();
        if let Some(v) = spec.version.filter(|v| *v != 1) {
            errors.push(locate(path, text, None, &["version"], format!("unsupported version {v} (expected 1)")));
        }
        let allow = config.effective_env_allowlist();
        let default_trusted = spec.require_trusted.unwrap_or(true);
        let mut rules = Vec::with_capacity(spec.rules.len());
        let mut names = BTreeMap::new();
        let mut sets = SetsBuilder::default();
        for (index, r) in spec.rules.into_iter().enumerate() {
            if let Some(name) = &r.name {
                if let Some(first) = names.insert(name.clone(), index) {
                    errors.push(locate(
                        path,
                        text,
                        Some(index),
                        &["name"],
                        format!("duplicate rule name `{name}` (first at rule {first})"),
                    ));
                }
            }
            let mut c = Compiler { path, text, index, errors: &mut errors, allow: &allow, sets: &mut sets };
            if let Some(rule) = c.rule(r, default_trusted, &config.trust_domain) {
                rules.push(rule);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let sets = sets
            .build()
            .map_err(|message| vec![MappingError { file: path.to_owned(), line: 1, column: 1, rule: None, message }])?;
        for rule in &mut rules {
            for (name, set, _) in &mut rule.env {
                *set = sets.env_index(name);
            }
        }
        if errors.is_empty() {
            Ok(MappingFile { path: path.to_owned(), rules, sets })
        } else {
            Err(errors)
        }
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the file has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Compiler<'a> {
    path: &'a Path,
    text: &'a str,
    index: usize,
    errors: &'a mut Vec<MappingError>,
    allow: &'a [String],
    sets: &'a mut SetsBuilder,
}

impl Compiler<'_> {
    fn err(&mut self, keys: &[&str], message: String) {
        self.errors.push(locate(self.path, self.text, Some(self.index), keys, message));
    }

    fn patterns(
        &mut self,
        key: &str,
        field: Result<Field, &str>,
        spec: Option<OneOrMany<String>>,
    ) -> Option<Vec<Pattern>> {
        let values = spec?.into_vec();
        if values.is_empty() {
            self.err(&["match", key], format!("`{key}` has no values"));
        }
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let added = match field {
                Ok(f) => self.sets.add(f, v),
                Err(env) => self.sets.add_env(env, v),
            };
            match added {
                Ok(p) => out.push(p),
                Err(m) => self.err(&["match", key], m),
            }
        }
        Some(out)
    }

    fn template(&mut self, keys: &[&str], src: &str, escape: Escape, td: &str) -> Option<Template> {
        match Template::compile(src, escape, td) {
            Ok(t) => {
                for p in t.placeholders() {
                    if let Placeholder::Env(name) = p {
                        if self.allow.binary_search(name).is_err() {
                            self.err(
                                keys,
                                format!("`{{env.{name}}}` is not collected: add {name} to identity.env_allowlist"),
                            );
                        }
                    }
                }
                Some(t)
            }
            Err(e) => {
                let err = locate_at(self.path, self.text, Some(self.index), keys, Some(e.offset), e.message);
                self.errors.push(err);
                None
            }
        }
    }

    fn rule(&mut self, r: RuleSpec, default_trusted: bool, td: &str) -> Option<Rule> {
        let s = r.selectors;
        let before = self.errors.len();
        let mut uid = s.uid.map(OneOrMany::into_vec);
        let user_given = s.user.is_some();
        if let Some(users) = s.user {
            for name in users.into_vec() {
                match nix::unistd::User::from_name(&name) {
                    Ok(Some(u)) => uid.get_or_insert_with(Vec::new).push(u.uid.as_raw()),
                    Ok(None) => self.err(&["match", "user"], format!("unknown user `{name}`")),
                    Err(e) => self.err(&["match", "user"], format!("looking up user `{name}`: {e}")),
                }
            }
        }
        let exe_sha256 = s.exe_sha256.map(|v| {
            let v = v.into_vec();
            for h in &v {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    self.err(&["match", "exe_sha256"], format!("`{h}` is not a SHA-256 (64 hex digits)"));
                }
            }
            v.into_iter().map(|h| h.to_ascii_lowercase()).collect()
        });
        let exe = self.patterns("exe", Ok(Field::Exe), s.exe);
        let cgroup = self.patterns("cgroup", Ok(Field::Cgroup), s.cgroup);
        let container = self.patterns("container", Ok(Field::Container), s.container);
        let container_name = self.patterns("container_name", Ok(Field::ContainerName), s.container_name);
        let container_image = self.patterns("container_image", Ok(Field::ContainerImage), s.container_image);
        let parent_exe = self.patterns("parent_exe", Ok(Field::Ancestor), s.parent_exe);
        let ancestor_exe = self.patterns("ancestor_exe", Ok(Field::Ancestor), s.ancestor_exe);
        let comm = self.patterns("comm", Ok(Field::Comm), s.comm);
        let mut env = Vec::new();
        for (name, values) in s.env {
            if self.allow.binary_search(&name).is_err() {
                self.err(
                    &["match", "env", &name],
                    format!("`{name}` is not collected: add it to identity.env_allowlist"),
                );
            }
            let pats = self.patterns("env", Err(&name), Some(values)).unwrap_or_default();
            env.push((name, None, pats));
        }
        let require_trusted = r.require_trusted.unwrap_or(default_trusted);
        let has_trusted = uid.is_some()
            || user_given
            || exe_sha256.is_some()
            || exe.is_some()
            || cgroup.is_some()
            || container.is_some()
            || parent_exe.is_some()
            || ancestor_exe.is_some();
        if require_trusted && !has_trusted {
            self.err(
                &["match"],
                "rule requires trusted evidence (require_trusted) but has only job-controlled selectors (env, comm, container_name, container_image): add exe_sha256, exe, uid/user, cgroup, container or parent_exe/ancestor_exe, or set require_trusted: false".into(),
            );
        }
        let uri = self.template(&["identity"], &r.identity, Escape::UriSegment, td);
        let mut labels = Vec::with_capacity(r.labels.len());
        for (k, v) in &r.labels {
            if k.is_empty() || k.chars().any(|c| c.is_control() || c.is_whitespace()) {
                self.err(&["labels", k], format!("bad label name `{k}`"));
            }
            if let Some(t) = self.template(&["labels", k], v, Escape::Label, td) {
                labels.push((k.clone(), t));
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(Rule {
            index: self.index,
            label: r.name.unwrap_or_else(|| format!("#{}", self.index)),
            require_trusted,
            uid,
            exe_sha256,
            exe,
            cgroup,
            container,
            container_name,
            container_image,
            parent_exe,
            ancestor_exe,
            comm,
            env,
            uri: uri?,
            labels,
        })
    }
}

/// serde_yaml_ng appends "at line L column C" to messages; we print the
/// location in front instead.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Locates a semantic error: serde gives no spans for valid YAML, so scan
/// the text. Rules are the `- ` items of the top-level `rules:` list; inside
/// a rule's lines, the last key of `keys` found gives line and the column of
/// its value. Falls back to the rule's `- ` line, then to line 1.
fn locate(path: &Path, text: &str, rule: Option<usize>, keys: &[&str], message: String) -> MappingError {
    locate_at(path, text, rule, keys, None, message)
}

/// [`locate`], moved `offset` bytes into the value when it is a plain or
/// quoted scalar on the key's line (template errors carry such offsets).
fn locate_at(
    path: &Path,
    text: &str,
    rule: Option<usize>,
    keys: &[&str],
    offset: Option<usize>,
    message: String,
) -> MappingError {
    let lines: Vec<&str> = text.lines().collect();
    let (start, end) = match rule {
        Some(i) => rule_span(&lines, i).unwrap_or((0, 0)),
        None => (0, lines.len()),
    };
    let mut line = start + 1;
    let mut column = 1;
    if let Some(l) = lines.get(start) {
        column = l.len() - l.trim_start().len() + 1;
    }
    let mut from = start;
    for key in keys {
        let found =
            (from..end.max(start + 1).min(lines.len())).find_map(|n| key_in_line(lines[n], key).map(|c| (n, c)));
        if let Some((n, c)) = found {
            line = n + 1;
            column = c + 1;
            from = n;
        }
    }
    if let (Some(off), Some(l)) = (offset, lines.get(line - 1)) {
        match l.as_bytes().get(column - 1) {
            Some(b'"' | b'\'') => column += off + 1,
            Some(b'|' | b'>' | b'[' | b'{') | None => {}
            Some(_) => column += off,
        }
    }
    MappingError { file: path.to_owned(), line, column, rule, message }
}

/// Byte column of the value of `key:` in `line` (or of the key when the
/// value is on later lines). Accepts `key:`, `- key:`, quoted keys and keys
/// inside a flow mapping (`{ a: 1, key: 2 }`).
fn key_in_line(line: &str, key: &str) -> Option<usize> {
    let candidates = [format!("{key}:"), format!("\"{key}\":"), format!("'{key}':")];
    for pat in &candidates {
        let mut from = 0;
        while let Some(pos) = line[from..].find(pat.as_str()).map(|p| p + from) {
            let before = line[..pos].trim_end_matches(' ');
            let at_key = before.is_empty() || before.ends_with('-') || before.ends_with('{') || before.ends_with(',');
            if at_key {
                let after = &line[pos + pat.len()..];
                let value = after.trim_start();
                if value.is_empty() || value.starts_with('#') {
                    return Some(pos);
                }
                return Some(pos + pat.len() + (after.len() - value.len()));
            }
            from = pos + 1;
        }
    }
    None
}

/// Line range `[start, end)` of rule `index` in a block-style `rules:` list.
fn rule_span(lines: &[&str], index: usize) -> Option<(usize, usize)> {
    let rules_at = lines.iter().position(|l| l.trim_end().starts_with("rules:"))?;
    let mut item_indent = None;
    let mut starts = Vec::new();
    let mut end = lines.len();
    for (n, l) in lines.iter().enumerate().skip(rules_at + 1) {
        let body = l.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = l.len() - body.len();
        if indent == 0 && !body.starts_with('-') {
            end = n;
            break;
        }
        if body.starts_with("- ") || body == "-" {
            match item_indent {
                None => {
                    item_indent = Some(indent);
                    starts.push(n);
                }
                Some(i) if i == indent => starts.push(n),
                _ => {}
            }
        }
    }
    let start = *starts.get(index)?;
    Some((start, starts.get(index + 1).copied().unwrap_or(end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<MappingError> {
        match MappingFile::parse(Path::new("m.yaml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e,
        }
    }

    #[test]
    fn syntax_error_has_location() {
        let e = errs("rules:\n  - name: a\n    identity: [unclosed\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].line >= 3, "{e:?}");
        assert!(e[0].to_string().starts_with("m.yaml:"), "{}", e[0]);
    }

    #[test]
    fn unknown_field_has_location() {
        let e = errs("rules:\n  - name: a\n    identity: spiffe://td/a\n    match:\n      uid: 1\n      colour: red\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].column), (6, 7), "{e:?}");
        assert!(e[0].message.contains("colour"), "{}", e[0].message);
    }

    #[test]
    fn semantic_errors_all_reported_with_positions() {
        let text = "\
require_trusted: true
rules:
  - name: ok
    match: { uid: 0 }
    identity: spiffe://td/root
  - name: bad-glob
    match:
      exe: \"/usr/[bin\"
    identity: spiffe://td/x
  - name: bad-placeholder
    match:
      uid: 0
    identity: spiffe://td/{nope}
  - name: env-only
    match:
      env:
        GITHUB_REPOSITORY: org/*
    identity: spiffe://td/e
";
        let e = errs(text);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert_eq!((e[0].rule, e[0].line, e[0].column), (Some(1), 8, 12), "{}", e[0]);
        assert!(e[0].message.contains("bad glob"));
        assert_eq!((e[1].rule, e[1].line, e[1].column), (Some(2), 13, 27), "{}", e[1]);
        assert!(e[1].message.contains("unknown placeholder"));
        assert_eq!((e[2].rule, e[2].line, e[2].column), (Some(3), 15, 5), "{}", e[2]);
        assert!(e[2].message.contains("require_trusted"));
    }

    #[test]
    fn env_outside_allowlist_is_an_error() {
        let e = errs("rules:\n  - match: { uid: 0 }\n    identity: spiffe://td/{env.AWS_SECRET_ACCESS_KEY}\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.contains("env_allowlist"));
        assert_eq!(e[0].line, 3);
    }

    #[test]
    fn unknown_user_is_an_error() {
        let e = errs("rules:\n  - match: { user: no-such-user-xyz }\n    identity: spiffe://td/x\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].column), (2, 20));
    }
}

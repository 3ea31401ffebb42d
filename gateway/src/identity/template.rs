//! Identity templates: `spiffe://td/repo/{env.GITHUB_REPOSITORY}`.
//!
//! Substituted values are often job-controlled, so each one is confined to
//! a single URI path segment: everything outside RFC 3986 "unreserved" is
//! percent-encoded (`/` included), and `.`/`..`/empty values are refused,
//! so a job cannot add, climb or blank out path segments.

use std::fmt::Write as _;

use super::attest::Attested;

/// A value a template can refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// `{env.NAME}`: an allowlisted environment variable (job-controlled).
    Env(String),
    /// `{uid}`.
    Uid,
    /// `{user}`: host user name of the uid.
    User,
    /// `{comm}` (job-controlled).
    Comm,
    /// `{exe}`: executable path.
    Exe,
    /// `{container}`: container id.
    Container,
    /// `{container.name}`: container name, from the runtime.
    ContainerName,
    /// `{container.image}`: container image, from the runtime.
    ContainerImage,
    /// `{pod}`: Kubernetes pod uid.
    Pod,
    /// `{cgroup}`: cgroup v2 path.
    Cgroup,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Placeholder> {
        Some(match name {
            "uid" => Placeholder::Uid,
            "user" => Placeholder::User,
            "comm" => Placeholder::Comm,
            "exe" => Placeholder::Exe,
            "container" => Placeholder::Container,
            "container.name" => Placeholder::ContainerName,
            "container.image" => Placeholder::ContainerImage,
            "pod" => Placeholder::Pod,
            "cgroup" => Placeholder::Cgroup,
            _ => {
                let var = name.strip_prefix("env.")?;
                let mut chars = var.chars();
                let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
                if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return None;
                }
                Placeholder::Env(var.to_owned())
            }
        })
    }

    /// How the placeholder is written in a template.
    pub fn name(&self) -> String {
        match self {
            Placeholder::Env(v) => format!("env.{v}"),
            Placeholder::Uid => "uid".into(),
            Placeholder::User => "user".into(),
            Placeholder::Comm => "comm".into(),
            Placeholder::Exe => "exe".into(),
            Placeholder::Container => "container".into(),
            Placeholder::ContainerName => "container.name".into(),
            Placeholder::ContainerImage => "container.image".into(),
            Placeholder::Pod => "pod".into(),
            Placeholder::Cgroup => "cgroup".into(),
        }
    }
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(Placeholder),
}

/// How substituted values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// One URI path segment (identity URIs).
    UriSegment,
    /// Free text without control characters (label values).
    Label,
}

/// A compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    escape: Escape,
}

/// A template that does not compile; `offset` is a byte offset into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Byte offset of the problem in the template text.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// Why a template could not be rendered for a process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The value is absent (unset variable, no container, ...).
    #[error("{{{0}}} has no value for this process")]
    Missing(String),
    /// The value could escape its path segment or carries control characters.
    #[error("{{{0}}} has an unsafe value ({1})")]
    Unsafe(String, &'static str),
}

impl Template {
    /// Compiles `text`. `{trust_domain}` is replaced by `trust_domain` now.
    /// For [`Escape::UriSegment`] the text must be `scheme://authority/...`
    /// with placeholders only after the authority, so a value can never
    /// choose the trust domain.
    pub fn compile(text: &str, escape: Escape, trust_domain: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(TemplateError { offset: offset + open, message: "unmatched `}`".into() });
            }
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| TemplateError { offset: offset + open, message: "unclosed `{`".into() })?;
            let name = &after[..close];
            if name == "trust_domain" {
                lit.push_str(trust_domain);
            } else {
                let ph = Placeholder::parse(name).ok_or_else(|| TemplateError {
                    offset: offset + open,
                    message: format!(
                        "unknown placeholder `{{{name}}}` (known: env.NAME, uid, user, comm, exe, container, container.name, container.image, pod, cgroup, trust_domain)"
                    ),
                })?;
                if escape == Escape::UriSegment && !lit_is_in_path(&parts, &lit) {
                    return Err(TemplateError {
                        offset: offset + open,
                        message: "placeholders may only appear in the URI path, after `scheme://authority/`".into(),
                    });
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Var(ph));
            }
            offset += open + 1 + close + 1;
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        let t = Template { parts, escape };
        if escape == Escape::UriSegment {
            t.check_uri_literals(text)?;
        }
        Ok(t)
    }

    fn check_uri_literals(&self, text: &str) -> Result<(), TemplateError> {
        let prefix = match self.parts.first() {
            Some(Part::Lit(l)) => l.as_str(),
            _ => "",
        };
        if !lit_is_in_path(&[], prefix) {
            return Err(TemplateError { offset: 0, message: "identity must start with `scheme://authority/`".into() });
        }
        if let Some(pos) = text.find(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
            return Err(TemplateError {
                offset: pos,
                message: "identity URIs may not contain whitespace, control characters, `?` or `#`".into(),
            });
        }
        Ok(())
    }

    /// Placeholders used, for validation against the env allowlist.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Lit(_) => None,
        })
    }

    /// Renders for one process, appending to `out`.
    pub fn render(&self, a: &Attested, out: &mut String) -> Result<(), RenderError> {
        for part in &self.parts {
            match part {
                Part::Lit(l) => out.push_str(l),
                Part::Var(p) => {
                    let missing = || RenderError::Missing(p.name());
                    match p {
                        Placeholder::Uid => {
                            let _ = write!(out, "{}", a.uid);
                        }
                        Placeholder::Env(name) => self.push(out, p, a.env.get(name).ok_or_else(missing)?)?,
                        Placeholder::User => self.push(out, p, a.user.as_deref().ok_or_else(missing)?)?,
                        Placeholder::Comm => self.push(out, p, &a.comm)?,
                        Placeholder::Exe => self.push(out, p, &a.exe.path)?,
                        Placeholder::Container => {
                            self.push(out, p, a.container.as_ref().map(|c| c.id.as_str()).ok_or_else(missing)?)?
                        }
                        Placeholder::ContainerName => self.push(
                            out,
                            p,
                            a.container.as_ref().and_then(|c| c.name.as_deref()).ok_or_else(missing)?,
                        )?,
                        Placeholder::ContainerImage => self.push(
                            out,
                            p,
                            a.container.as_ref().and_then(|c| c.image.as_deref()).ok_or_else(missing)?,
                        )?,
                        Placeholder::Pod => self.push(
                            out,
                            p,
                            a.container.as_ref().and_then(|c| c.pod_uid.as_deref()).ok_or_else(missing)?,
                        )?,
                        Placeholder::Cgroup => self.push(out, p, a.cgroup.as_deref().ok_or_else(missing)?)?,
                    }
                }
            }
        }
        Ok(())
    }

    fn push(&self, out: &mut String, p: &Placeholder, value: &str) -> Result<(), RenderError> {
        match self.escape {
            Escape::UriSegment => push_segment(out, value).map_err(|why| RenderError::Unsafe(p.name(), why)),
            Escape::Label => {
                if value.chars().any(char::is_control) {
                    return Err(RenderError::Unsafe(p.name(), "control character"));
                }
                out.push_str(value);
                Ok(())
            }
        }
    }
}

/// Whether text ending in `lit` (after `parts`) is already past
/// `scheme://authority/`.
fn lit_is_in_path(parts: &[Part], lit: &str) -> bool {
    if !parts.is_empty() {
        // The first placeholder was only admitted once the path had begun.
        return true;
    }
    let Some(scheme_end) = lit.find("://") else { return false };
    let scheme = &lit[..scheme_end];
    let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let after = &lit[scheme_end + 3..];
    scheme_ok && after.find('/').is_some_and(|slash| slash > 0)
}

/// Appends `value` as exactly one path segment.
pub fn push_segment(out: &mut String, value: &str) -> Result<(), &'static str> {
    match value {
        "" => return Err("empty"),
        "." | ".." => return Err("dot segment"),
        _ => {}
    }
    if value.chars().any(char::is_control) {
        return Err("control character");
    }
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attested() -> Attested {
        let mut a = Attested { uid: 1001, comm: "curl".into(), ..Default::default() };
        a.env.insert("GITHUB_REPOSITORY".into(), "org/repo".into());
        a.env.insert("EVIL".into(), "..".into());
        a.env.insert("NL".into(), "a\nb".into());
        a
    }

    fn render(t: &str) -> Result<String, RenderError> {
        let t = Template::compile(t, Escape::UriSegment, "td").map_err(|e| RenderError::Missing(e.message))?;
        let mut s = String::new();
        t.render(&attested(), &mut s).map(|()| s)
    }

    #[test]
    fn renders_and_encodes() {
        assert_eq!(
            render("spiffe://{trust_domain}/r/{env.GITHUB_REPOSITORY}/u/{uid}").as_deref(),
            Ok("spiffe://td/r/org%2Frepo/u/1001")
        );
    }

    #[test]
    fn refuses_dot_segments_and_controls() {
        assert!(matches!(render("spiffe://td/{env.EVIL}"), Err(RenderError::Unsafe(..))));
        assert!(matches!(render("spiffe://td/{env.NL}"), Err(RenderError::Unsafe(..))));
        assert_eq!(render("spiffe://td/{env.GITHUB_REF}"), Err(RenderError::Missing("env.GITHUB_REF".into())));
    }

    #[test]
    fn container_name_and_image_come_from_the_runtime_answer() {
        let t = Template::compile("spiffe://td/c/{container.name}/{container.image}", Escape::UriSegment, "td")
            .expect("compiles");
        let mut a = attested();
        let mut out = String::new();
        assert_eq!(t.render(&a, &mut out), Err(RenderError::Missing("container.name".into())));
        let mut c = crate::identity::parse_container(&format!("/ci/{}", "a".repeat(64))).expect("container");
        a.container = Some(c.clone());
        out.clear();
        assert_eq!(t.render(&a, &mut out), Err(RenderError::Missing("container.name".into())), "not confirmed yet");
        c.name = Some("build-1".into());
        c.image = Some("registry/ci:1.2".into());
        a.container = Some(c);
        out.clear();
        assert_eq!(t.render(&a, &mut out), Ok(()));
        assert_eq!(out, "spiffe://td/c/build-1/registry%2Fci%3A1.2");
    }

    #[test]
    fn compile_errors_have_offsets() {
        let e = Template::compile("spiffe://td/{nope}", Escape::UriSegment, "td").unwrap_err();
        assert_eq!(e.offset, 12);
        let e = Template::compile("spiffe://{env.X}/a", Escape::UriSegment, "td").unwrap_err();
        assert!(e.message.contains("URI path"), "{}", e.message);
        assert!(Template::compile("just-a-name", Escape::UriSegment, "td").is_err());
        assert!(Template::compile("spiffe://td/a b", Escape::UriSegment, "td").is_err());
        assert!(Template::compile("spiffe://td/{uid", Escape::UriSegment, "td").is_err());
        assert!(Template::compile("{env.GITHUB_REPOSITORY}", Escape::Label, "td").is_ok());
    }
}

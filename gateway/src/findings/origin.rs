//! Where a key came from on the host: the sender's command line, with
//! secrets masked, and for interpreters the script being run.
//!
//! `python3.11` alone does not tell a reviewer which of a repository's
//! scripts holds the key; `python3.11 tools/deploy.py --env prod` and the
//! script's absolute path do. The command line is job-controlled and may
//! itself carry the key (`curl -H "Authorization: Bearer sk-..."`), so it
//! is masked before it is kept: every key the request was flagged for is
//! replaced by its preview, the recording masker runs over the rest, values
//! of credential-named options and headers are redacted, and `user:pass@`
//! is cut out of URLs.

use std::path::Path;

use crate::{
    detect::Secret,
    redact::{is_sensitive_header, is_sensitive_variable, strip_userinfo, REDACTED},
};

/// The most arguments kept; the rest are summarised.
const MAX_ARGS: usize = 64;

/// The process origin of a sighting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Masked command line, arguments separated by spaces (quoted when they
    /// contain whitespace).
    pub command: Option<String>,
    /// The script an interpreter runs: an absolute path (resolved against
    /// the working directory), `-m <module>`, or `-c` / `-e` for inline code.
    pub script: Option<String>,
}

impl Origin {
    /// Reads `pid`'s command line and working directory from /proc. A
    /// process that has exited (or whose /proc is unreadable) yields
    /// nothing rather than a guess. `secrets` are the keys found in the
    /// request with their previews; `mask` is the recording masker.
    pub fn read(pid: u32, exe: Option<&Path>, secrets: &[(Secret, String)], mask: impl Fn(&str) -> String) -> Origin {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return Origin::default() };
        let args: Vec<String> =
            raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        Origin::from_parts(&args, exe, cwd.as_deref(), secrets, mask)
    }

    /// [`Origin::read`] on what /proc showed.
    pub fn from_parts(
        args: &[String],
        exe: Option<&Path>,
        cwd: Option<&Path>,
        secrets: &[(Secret, String)],
        mask: impl Fn(&str) -> String,
    ) -> Origin {
        if args.is_empty() {
            return Origin::default();
        }
        let masked = mask_args(args, secrets, &mask);
        let mut command: Vec<String> = masked.iter().take(MAX_ARGS).map(|a| quote(a)).collect();
        if masked.len() > MAX_ARGS {
            command.push(format!("[{} more arguments]", masked.len() - MAX_ARGS));
        }
        let script = script_of(&masked, exe, cwd);
        Origin { command: Some(command.join(" ")), script }
    }
}

/// Masks each argument; an option named like a credential masks its value,
/// whether written `--token=v` or `--token v`.
fn mask_args(args: &[String], secrets: &[(Secret, String)], mask: &impl Fn(&str) -> String) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut value_is_secret = false;
    let mut value_is_userinfo = false;
    for arg in args {
        let mut a = arg.clone();
        for (secret, preview) in secrets {
            if let Ok(text) = std::str::from_utf8(secret.as_bytes()) {
                if !text.is_empty() {
                    a = a.replace(text, preview);
                }
            }
        }
        a = strip_userinfo(&mask(&a));
        if value_is_secret && !a.starts_with('-') {
            a = REDACTED.to_owned();
        }
        // curl's `-u user:password`; python's `-u` takes no value.
        if value_is_userinfo {
            if let Some((user, _)) = a.split_once(':') {
                a = format!("{user}:{REDACTED}");
            }
        }
        (value_is_secret, value_is_userinfo) = (false, false);
        if let Some(option) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) {
            match option.split_once('=') {
                Some((name, value)) if !value.is_empty() && is_sensitive_variable(name) => {
                    a = format!("{}={REDACTED}", &a[..a.len() - value.len() - 1]);
                }
                Some(_) => {}
                None => {
                    value_is_secret = is_sensitive_variable(option) || option == "password";
                    value_is_userinfo = matches!(option, "u" | "user");
                }
            }
        } else if let Some((name, value)) = a.split_once(':') {
            // A header given as an argument: `Authorization: Bearer ...`.
            let name = name.trim();
            if !value.trim().is_empty() && !name.contains(char::is_whitespace) && is_sensitive_header(name) {
                let redacted = crate::redact::redact_header_pairs(&[(name.to_owned(), value.trim().to_owned())]);
                if let Some((_, v)) = redacted.first() {
                    a = format!("{name}: {v}");
                }
            }
        }
        out.push(a);
    }
    out
}

fn quote(arg: &str) -> String {
    if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("'{}'", arg.replace('\'', "'\\''"))
    } else {
        arg.to_owned()
    }
}

/// Interpreters whose first operand is a script.
fn is_interpreter(name: &str) -> bool {
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    matches!(
        base,
        "python"
            | "pypy"
            | "node"
            | "nodejs"
            | "deno"
            | "bun"
            | "ruby"
            | "perl"
            | "php"
            | "bash"
            | "sh"
            | "dash"
            | "zsh"
    )
}

fn script_of(args: &[String], exe: Option<&Path>, cwd: Option<&Path>) -> Option<String> {
    let name = exe
        .and_then(|e| e.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| Path::new(&args[0]).file_name().map(|n| n.to_string_lossy().into_owned()))?;
    if !is_interpreter(&name) {
        return None;
    }
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-m" => return rest.next().map(|m| format!("-m {m}")),
            "-c" | "-e" | "--eval" | "-p" | "--print" => return Some(arg.clone()),
            // Options with a separate value.
            "-W" | "-X" | "-r" | "--require" | "-I" => {
                rest.next();
            }
            "--" => return rest.next().map(|s| resolve(s, cwd)),
            a if a.starts_with('-') => {}
            a => return Some(resolve(a, cwd)),
        }
    }
    None
}

fn resolve(script: &str, cwd: Option<&Path>) -> String {
    match cwd {
        Some(cwd) if !script.starts_with('/') => cwd.join(script).to_string_lossy().into_owned(),
        _ => script.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(args: &[&str], exe: &str, cwd: &str, secrets: &[(Secret, String)]) -> Origin {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Origin::from_parts(&args, Some(Path::new(exe)), Some(Path::new(cwd)), secrets, |t| t.to_owned())
    }

    #[test]
    fn command_lines_are_masked() {
        let key = "sk-test-0123456789abcdefghijklmnop";
        let secrets = [(Secret::new(key.as_bytes()), "sk-te…mnop".to_owned())];
        let o = origin(
            &[
                "curl",
                "-H",
                &format!("Authorization: Bearer {key}"),
                "-H",
                "X-Api-Key: opaque-value-123",
                "-u",
                "bob:hunter2",
                "--token=abc",
                "--password",
                "pw1",
                "https://u:p@example.com/x",
                key,
            ],
            "/usr/bin/curl",
            "/w",
            &secrets,
        );
        let command = o.command.unwrap();
        for leaked in [key, "opaque-value-123", "hunter2", "abc", "pw1", "u:p@"] {
            assert!(!command.contains(leaked), "{leaked} in {command}");
        }
        assert!(command.contains("sk-te…mnop"), "{command}");
        assert!(command.contains("'Authorization: Bearer [REDACTED]'"), "{command}");
        assert!(command.contains("--token=[REDACTED]"), "{command}");
        assert_eq!(o.script, None, "curl is not an interpreter");
    }

    #[test]
    fn scripts_of_interpreters_resolve_against_cwd() {
        let s = |args: &[&str], exe: &str| origin(args, exe, "/builds/p", &[]).script;
        assert_eq!(
            s(&["python3", "-u", "tools/deploy.py", "--x"], "/usr/bin/python3.11"),
            Some("/builds/p/tools/deploy.py".into())
        );
        assert_eq!(s(&["python3", "-m", "openai.cli"], "/usr/bin/python3.11"), Some("-m openai.cli".into()));
        assert_eq!(s(&["node", "/abs/app.js"], "/usr/local/bin/node"), Some("/abs/app.js".into()));
        assert_eq!(s(&["bash", "-c", "curl ..."], "/usr/bin/bash"), Some("-c".into()));
        assert_eq!(s(&["python3"], "/usr/bin/python3"), None);
        assert_eq!(s(&["git", "push"], "/usr/bin/git"), None);
    }
}

//! Upstream credentials per (identity, destination host), loaded from files,
//! the environment or commands, and swapped atomically on reload.
//!
//! Loading blocks (file reads, child processes): from async code call
//! [`CredentialStore::load`] and [`CredentialStore::reload`] through
//! `tokio::task::spawn_blocking`. Lookups never block on a reload: they read
//! an immutable snapshot that a reload replaces in one step.
//!
//! A source may say when its value expires (a command with `output: json`):
//! [`CredentialStore::refresh_due`] reads such entries again
//! `refresh_before` their expiry, and a lookup reports the expiry so that
//! the gate never sends an expired value (it refuses instead).
//!
//! An entry with `revoke` is per session: nothing is read at load, and a
//! lookup hands out its [`SessionIssue`], which each session runs on its
//! own (`super::lease`).

use std::{
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, RwLock},
    thread,
    time::{Duration, Instant, SystemTime},
};

use zeroize::Zeroizing;

use super::{
    config::{CommandOutput, CredentialEntry, Injection, RevokeCommand, Source},
    glob,
    secret::SecretString,
};

/// A credential source that could not be read; names the entry and the reason.
/// Never contains the credential itself.
#[derive(Debug, thiserror::Error)]
#[error("credentials[{index}].source: {reason}")]
pub struct StoreError {
    /// Index of the entry in the configuration.
    pub index: usize,
    /// What went wrong.
    pub reason: String,
}

/// A credential that applies to a request.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The value, absent for entries that inject only `{jwt}`.
    pub value: Option<SecretString>,
    /// How to write it into the request.
    pub inject: Injection,
    /// Index of the matching entry in the configuration (for logs and findings).
    pub entry: usize,
    /// When the value expires, if its source says.
    pub expires_at: Option<SystemTime>,
    /// For a per-session entry (`revoke` set): how a session gets its own
    /// value; `value` is then `None` until the session has issued one.
    pub per_session: Option<Arc<SessionIssue>>,
}

/// How a per-session credential is issued and revoked.
#[derive(Debug)]
pub struct SessionIssue {
    /// Index of the entry in the configuration.
    pub entry: usize,
    source: Source,
    /// The command that revokes an issued value.
    pub revoke: RevokeCommand,
}

/// A value issued for one session.
pub struct Issued {
    /// The credential.
    pub value: SecretString,
    /// When it expires, if the source says.
    pub expires_at: Option<SystemTime>,
    /// The source's handle on it (a Vault lease id), for the revoke command.
    pub lease_id: Option<String>,
}

impl SessionIssue {
    /// Runs the source once for a new value. Blocks (a child process): call
    /// it through `spawn_blocking`.
    pub fn issue(&self) -> Result<Issued, String> {
        let now = SystemTime::now();
        let read = read_source(&self.source, LoadOptions { file_owner: ROOT_UID }, now)?;
        if read.expires_at.is_some_and(|at| at <= now) {
            return Err(format!("{}: the issued value has already expired", describe(&self.source)));
        }
        Ok(Issued { value: read.value, expires_at: read.expires_at, lease_id: read.lease_id })
    }
}

impl Credential {
    /// Whether the value has expired at `now` (then it must not be sent).
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// One loaded entry.
#[derive(Debug)]
struct Loaded {
    identity: String,
    host: String,
    value: Option<SecretString>,
    inject: Injection,
    /// When the value expires, if its source says.
    expires_at: Option<SystemTime>,
    /// When to read the source again (before `expires_at`, or a retry).
    refresh_at: Option<SystemTime>,
    /// Set for a per-session entry, which holds no value of its own.
    per_session: Option<Arc<SessionIssue>>,
}

impl Loaded {
    /// A copy with `refresh_at` replaced (the value is shared, not re-read).
    fn with_refresh_at(&self, refresh_at: Option<SystemTime>) -> Loaded {
        Loaded {
            identity: self.identity.clone(),
            host: self.host.clone(),
            value: self.value.clone(),
            inject: self.inject.clone(),
            expires_at: self.expires_at,
            refresh_at,
            per_session: self.per_session.clone(),
        }
    }
}

/// Pause between attempts when refreshing an expiring credential fails.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// The credential set, replaced as a whole on reload.
#[derive(Debug)]
pub struct CredentialStore {
    entries: RwLock<Arc<Vec<CredentialEntry>>>,
    loaded: RwLock<Arc<Vec<Loaded>>>,
    options: LoadOptions,
}

/// What a credential file must look like.
#[derive(Debug, Clone, Copy)]
struct LoadOptions {
    /// Required owner of credential files: root, so that only the gateway's
    /// own privilege level could have written the value it injects.
    file_owner: u32,
}

const ROOT_UID: u32 = 0;
/// Credentials are short strings; anything larger is a misconfigured path.
const MAX_VALUE_LEN: u64 = 64 * 1024;

impl CredentialStore {
    /// Loads every entry; fails on the first source that cannot be read.
    pub fn load(entries: Vec<CredentialEntry>) -> Result<Self, StoreError> {
        Self::load_with(entries, LoadOptions { file_owner: ROOT_UID })
    }

    fn load_with(entries: Vec<CredentialEntry>, options: LoadOptions) -> Result<Self, StoreError> {
        let loaded = load_all(&entries, options)?;
        Ok(Self { entries: RwLock::new(Arc::new(entries)), loaded: RwLock::new(Arc::new(loaded)), options })
    }

    /// Reads every source again (rotated files, new environment, commands).
    /// On failure the previous set stays in force and the error is returned.
    pub fn reload(&self) -> Result<(), StoreError> {
        let entries = Arc::clone(&read(&self.entries));
        self.install(entries)
    }

    /// Replaces the configuration (e.g. after the configuration file changed)
    /// and loads it. On failure the previous configuration and values stay.
    pub fn replace(&self, entries: Vec<CredentialEntry>) -> Result<(), StoreError> {
        self.install(Arc::new(entries))
    }

    fn install(&self, entries: Arc<Vec<CredentialEntry>>) -> Result<(), StoreError> {
        match load_all(&entries, self.options) {
            Ok(loaded) => {
                let count = loaded.len();
                *write(&self.loaded) = Arc::new(loaded);
                *write(&self.entries) = entries;
                tracing::info!(entries = count, "credentials reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "credential reload failed; keeping the previous credentials");
                Err(e)
            }
        }
    }

    /// The credential of the first entry (in configuration order) whose
    /// identity glob matches `identity` and whose host glob matches `host`
    /// (a bare host name, no port).
    pub fn lookup(&self, identity: &str, host: &str) -> Option<Credential> {
        let loaded = Arc::clone(&read(&self.loaded));
        loaded
            .iter()
            .enumerate()
            .find(|(_, e)| glob::matches(&e.identity, identity, b'/') && glob::host_matches(&e.host, host))
            .map(|(entry, e)| Credential {
                value: e.value.clone(),
                inject: e.inject.clone(),
                entry,
                expires_at: e.expires_at,
                per_session: e.per_session.clone(),
            })
    }

    /// Reads again every source whose value expires within its entry's
    /// `refresh_before` (or whose last refresh failed, every 5 s), and
    /// installs the new values. Blocks (commands): call it through
    /// `spawn_blocking`. A failure keeps the old value, which stops being
    /// used at its expiry, and is logged. Returns how many were refreshed.
    pub fn refresh_due(&self, now: SystemTime) -> usize {
        let entries = Arc::clone(&read(&self.entries));
        let loaded = Arc::clone(&read(&self.loaded));
        let due: Vec<usize> = loaded
            .iter()
            .enumerate()
            .filter(|(_, l)| l.refresh_at.is_some_and(|at| at <= now))
            .map(|(i, _)| i)
            .collect();
        if due.is_empty() {
            return 0;
        }
        let mut updated: Vec<(usize, Loaded)> = Vec::new();
        let mut refreshed = 0;
        for index in due {
            let (Some(entry), Some(old)) = (entries.get(index), loaded.get(index)) else { continue };
            match load_entry(index, entry, self.options, now) {
                Ok(fresh) => {
                    tracing::info!(
                        entry = index,
                        expires_at = fresh.expires_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        "credential refreshed ahead of its expiry"
                    );
                    refreshed += 1;
                    updated.push((index, fresh));
                }
                Err(e) => {
                    tracing::error!(
                        entry = index,
                        error = %e,
                        expires_at = old.expires_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        "refreshing an expiring credential failed; it will not be sent once expired"
                    );
                    updated.push((index, old.with_refresh_at(Some(now + REFRESH_RETRY))));
                }
            }
        }
        let mut guard = write(&self.loaded);
        // Only if no reload replaced the set meanwhile.
        if Arc::ptr_eq(&guard, &loaded) {
            let mut next: Vec<Loaded> = Vec::with_capacity(loaded.len());
            for (i, l) in loaded.iter().enumerate() {
                match updated.iter().position(|(u, _)| *u == i) {
                    Some(p) => next.push(updated.swap_remove(p).1),
                    None => next.push(l.with_refresh_at(l.refresh_at)),
                }
            }
            *guard = Arc::new(next);
        }
        refreshed
    }

    /// Whether some value expires (then [`refresh_due`](Self::refresh_due)
    /// must run periodically).
    pub fn has_expiring(&self) -> bool {
        let entries = read(&self.entries);
        // Per-session values are issued by each session, not refreshed here.
        entries.iter().any(|e| {
            e.revoke.is_none() && matches!(&e.source, Some(Source::Command(c)) if c.output == CommandOutput::Json)
        })
    }

    /// Number of loaded entries.
    pub fn len(&self) -> usize {
        read(&self.loaded).len()
    }

    /// Whether no credential is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The index of the entry that [`CredentialStore::lookup`] would use for
/// `identity` and `host`, judged on the configuration alone (nothing is
/// read): for `policy check` and `policy explain`.
pub fn entry_for(entries: &[CredentialEntry], identity: &str, host: &str) -> Option<usize> {
    entries.iter().position(|e| glob::matches(&e.identity, identity, b'/') && glob::host_matches(&e.host, host))
}

/// Whether some entry could apply to `host` for some identity.
pub fn any_entry_for_host(entries: &[CredentialEntry], host: &str) -> bool {
    entries.iter().any(|e| glob::host_matches(&e.host, host))
}

/// Locks are only held to clone an `Arc`, so a poisoned lock still holds a
/// consistent value; recovering beats taking the proxy down.
fn read<T>(lock: &RwLock<Arc<T>>) -> Arc<T> {
    Arc::clone(&lock.read().unwrap_or_else(|e| e.into_inner()))
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn load_all(entries: &[CredentialEntry], options: LoadOptions) -> Result<Vec<Loaded>, StoreError> {
    let now = SystemTime::now();
    entries.iter().enumerate().map(|(index, entry)| load_entry(index, entry, options, now)).collect()
}

fn load_entry(
    index: usize,
    entry: &CredentialEntry,
    options: LoadOptions,
    now: SystemTime,
) -> Result<Loaded, StoreError> {
    if let (Some(revoke), Some(source)) = (&entry.revoke, &entry.source) {
        // Per session: each session runs the source for a value of its own.
        return Ok(Loaded {
            identity: entry.identity.clone(),
            host: entry.host.clone(),
            value: None,
            inject: entry.inject.clone(),
            expires_at: None,
            refresh_at: None,
            per_session: Some(Arc::new(SessionIssue { entry: index, source: source.clone(), revoke: revoke.clone() })),
        });
    }
    let (value, expires_at) = match &entry.source {
        None => (None, None),
        Some(source) => {
            let read = read_source(source, options, now).map_err(|reason| StoreError { index, reason })?;
            (Some(read.value), read.expires_at)
        }
    };
    if expires_at.is_some_and(|at| at <= now) {
        return Err(StoreError { index, reason: format!("{}: the value has already expired", describe_entry(entry)) });
    }
    let refresh_at = expires_at.map(|at| at.checked_sub(entry.refresh_before).unwrap_or(now).max(now));
    Ok(Loaded {
        identity: entry.identity.clone(),
        host: entry.host.clone(),
        value,
        inject: entry.inject.clone(),
        expires_at,
        refresh_at,
        per_session: None,
    })
}

/// Reads one credential source now, with the same checks as the store's
/// entries (root-owned 0600/0400 files, trimmed, non-empty): for the
/// gateway's own credentials, such as its login to the fleet's central
/// store. An expiry a JSON command reports is ignored: the caller reads the
/// source again at every use (every connection).
pub fn read_gateway_secret(source: &Source) -> Result<SecretString, String> {
    read_source(source, LoadOptions { file_owner: ROOT_UID }, SystemTime::now()).map(|read| read.value)
}

fn describe_entry(entry: &CredentialEntry) -> String {
    entry.source.as_ref().map_or_else(|| "jwt".to_owned(), describe)
}

/// What a JSON credential command prints.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOutput {
    credential: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<time::OffsetDateTime>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    lease_id: Option<String>,
}

/// What a source gave.
struct SourceRead {
    value: SecretString,
    expires_at: Option<SystemTime>,
    lease_id: Option<String>,
}

fn read_source(source: &Source, options: LoadOptions, now: SystemTime) -> Result<SourceRead, String> {
    let (mut expires_at, mut lease_id) = (None, None);
    let raw = match source {
        Source::File(path) => read_file(path, options)?,
        Source::Env(name) => match std::env::var(name) {
            Ok(v) => Zeroizing::new(v),
            Err(std::env::VarError::NotPresent) => return Err(format!("env: `{name}` is not set")),
            Err(std::env::VarError::NotUnicode(_)) => return Err(format!("env: `{name}` is not valid UTF-8")),
        },
        Source::Command(cmd) => {
            let out = run_command(&cmd.argv, cmd.timeout, None)?;
            match cmd.output {
                CommandOutput::Text => out,
                CommandOutput::Json => {
                    // The error never quotes the output: it holds the credential.
                    let parsed: JsonOutput = serde_json::from_str(&out).map_err(|e| {
                        format!(
                            "{}: output is not the expected JSON ({{\"credential\", \"expires_at\" | \"expires_in\"}}): \
                             line {} column {}",
                            describe(source),
                            e.line(),
                            e.column()
                        )
                    })?;
                    expires_at = match (parsed.expires_at, parsed.expires_in) {
                        (Some(at), None) => Some(SystemTime::from(at)),
                        (None, Some(secs)) => Some(now + Duration::from_secs(secs)),
                        _ => {
                            return Err(format!(
                                "{}: the JSON output must give exactly one of `expires_at` and `expires_in`",
                                describe(source)
                            ))
                        }
                    };
                    lease_id = parsed.lease_id;
                    Zeroizing::new(parsed.credential)
                }
            }
        }
    };
    let value = raw.trim();
    if value.is_empty() {
        return Err(format!("{}: the value is empty", describe(source)));
    }
    Ok(SourceRead { value: SecretString::new(value.to_owned()), expires_at, lease_id })
}

fn describe(source: &Source) -> String {
    match source {
        Source::File(path) => format!("file: {}", path.display()),
        Source::Env(name) => format!("env: {name}"),
        Source::Command(cmd) => format!("command: {}", cmd.argv.first().map(String::as_str).unwrap_or("")),
    }
}

/// Checks the opened file rather than the path, so a file swapped between
/// check and read cannot slip through.
fn read_file(path: &Path, options: LoadOptions) -> Result<Zeroizing<String>, String> {
    let at = || format!("file: {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", at()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", at()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", at()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o600 && mode != 0o400 {
        return Err(format!("{}: mode is {mode:04o}; credential files must be 0600 or 0400", at()));
    }
    if meta.uid() != options.file_owner {
        return Err(format!(
            "{}: owned by uid {}; credential files must be owned by uid {}",
            at(),
            meta.uid(),
            options.file_owner
        ));
    }
    if meta.len() > MAX_VALUE_LEN {
        return Err(format!("{}: larger than {MAX_VALUE_LEN} bytes", at()));
    }
    let mut buf = Zeroizing::new(Vec::new());
    file.by_ref().take(MAX_VALUE_LEN).read_to_end(&mut buf).map_err(|e| format!("{}: {e}", at()))?;
    let text = std::str::from_utf8(&buf).map_err(|_| format!("{}: not valid UTF-8", at()))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// Runs the command without a shell and with a deadline. Its stderr goes into
/// the error (commands print diagnostics there), its stdout never does.
/// `input`, when given, is written to its standard input (which is closed
/// after it), from a thread of its own like the pipes it reads.
pub(crate) fn run_command(
    argv: &[String],
    timeout: Duration,
    input: Option<Zeroizing<Vec<u8>>>,
) -> Result<Zeroizing<String>, String> {
    let program = argv.first().ok_or_else(|| "command: empty argv".to_string())?;
    let at = || format!("command: {program}");
    let mut child = Command::new(program)
        .args(&argv[1..])
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: cannot start: {e}", at()))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // A command that never reads must not block us: the deadline below
        // still applies, and a write error (it exited) is its own business.
        thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut stdin, &input);
        });
    }
    // Pipes are drained on their own threads so a chatty command cannot block
    // on a full pipe while we wait for it to exit.
    let stdout = child.stdout.take().map(|mut out| {
        thread::spawn(move || {
            let mut buf = Zeroizing::new(Vec::new());
            let _ = out.by_ref().take(MAX_VALUE_LEN).read_to_end(&mut buf);
            buf
        })
    });
    let stderr = child.stderr.take().map(|mut err| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.by_ref().take(4096).read_to_end(&mut buf);
            buf
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{}: timed out after {timeout:?}", at()));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{}: {e}", at())),
        }
    };
    let out = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let err: String = err.trim().chars().take(512).collect();
        return Err(format!("{}: exited with {status}: {err}", at()));
    }
    let text = std::str::from_utf8(&out).map_err(|_| format!("{}: output is not valid UTF-8", at()))?;
    Ok(Zeroizing::new(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::fs::PermissionsExt, path::PathBuf};

    use super::*;
    use crate::credentials::config::CommandSource;

    fn entry(identity: &str, host: &str, source: Source) -> CredentialEntry {
        CredentialEntry {
            identity: identity.into(),
            host: host.into(),
            source: Some(source),
            inject: Injection::default(),
            ..CredentialEntry::default()
        }
    }

    fn secret_file(dir: &Path, name: &str, value: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(value.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn current_uid() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    /// Tests may run unprivileged: require the file to be owned by whoever runs them.
    fn load(entries: Vec<CredentialEntry>) -> Result<CredentialStore, StoreError> {
        CredentialStore::load_with(entries, LoadOptions { file_owner: current_uid() })
    }

    fn value(store: &CredentialStore, id: &str, host: &str) -> Option<String> {
        store.lookup(id, host).and_then(|c| c.value).map(|v| v.expose().to_owned())
    }

    #[test]
    fn file_env_and_command_sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = secret_file(dir.path(), "openai", "  sk-file-value\n", 0o600);
        // Set by cargo for the test process; setting a variable here would race
        // with other tests reading the environment.
        let env_value = std::env::var("CARGO_PKG_NAME").expect("run through cargo test");
        let store = load(vec![
            entry("spiffe://ci.example/repo/acme/*", "api.openai.com", Source::File(file)),
            entry("**", "*.cursor.sh", Source::Env("CARGO_PKG_NAME".into())),
            entry(
                "spiffe://ci.example/**",
                "**",
                Source::Command(CommandSource {
                    argv: vec!["/bin/sh".into(), "-c".into(), "echo ' cmd-value '".into()],
                    timeout: Duration::from_secs(5),
                    output: CommandOutput::Text,
                }),
            ),
        ])
        .unwrap();
        assert_eq!(
            value(&store, "spiffe://ci.example/repo/acme/api", "api.openai.com").as_deref(),
            Some("sk-file-value")
        );
        assert_eq!(value(&store, "spiffe://other/x", "api2.cursor.sh"), Some(env_value));
        // First match in configuration order: the file entry does not match this identity.
        assert_eq!(value(&store, "spiffe://ci.example/repo/other/api", "api.openai.com").as_deref(), Some("cmd-value"));
        assert_eq!(store.lookup("spiffe://ci.example/repo/acme/api", "api.openai.com").unwrap().entry, 0);
        assert!(store.lookup("spiffe://elsewhere/x", "api.openai.com").is_none());
    }

    #[test]
    fn bad_file_permissions_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let loose = secret_file(dir.path(), "loose", "v", 0o644);
        let e = load(vec![entry("*", "*", Source::File(loose))]).unwrap_err().to_string();
        assert!(e.contains("credentials[0].source") && e.contains("mode is 0644") && e.contains("0600 or 0400"), "{e}");

        let readonly = secret_file(dir.path(), "ro", "v", 0o400);
        load(vec![entry("*", "*", Source::File(readonly.clone()))]).unwrap();

        // Owned by someone other than the required owner (root in production).
        let e = CredentialStore::load_with(
            vec![entry("*", "*", Source::File(readonly))],
            LoadOptions { file_owner: current_uid() + 1 },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("owned by uid"), "{e}");

        let e = load(vec![entry("*", "*", Source::File(dir.path().join("missing")))]).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn empty_missing_failing_and_slow_sources_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = secret_file(dir.path(), "empty", " \n", 0o600);
        assert!(load(vec![entry("*", "*", Source::File(empty))]).unwrap_err().to_string().contains("empty"));
        let e = load(vec![entry("*", "*", Source::Env("GATEWAY_TEST_CRED_UNSET_VAR".into()))]).unwrap_err();
        assert!(e.to_string().contains("is not set"), "{e}");
        let sh = |script: &str, timeout: u64| {
            Source::Command(CommandSource {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                timeout: Duration::from_millis(timeout),
                output: CommandOutput::Text,
            })
        };
        let e = load(vec![entry("*", "*", sh("echo leaked-stdout; echo nope >&2; exit 3", 5000))]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("exited") && text.contains("nope") && !text.contains("leaked-stdout"), "{text}");
        // Killed at the timeout: far sooner than the command would end.
        let started = Instant::now();
        let e = load(vec![entry("*", "*", sh("sleep 120", 200))]).unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    }

    #[test]
    fn failed_reload_keeps_old_values_and_successful_reload_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "k", "first", 0o600);
        let store = load(vec![entry("*", "h", Source::File(path.clone()))]).unwrap();
        assert_eq!(value(&store, "id", "h").as_deref(), Some("first"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "second").unwrap();
        store.reload().unwrap();
        assert_eq!(value(&store, "id", "h").as_deref(), Some("second"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::write(&path, "third").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(value(&store, "id", "h").as_deref(), Some("second"));

        // A new configuration whose second entry fails keeps the whole old set.
        let good = secret_file(dir.path(), "good", "good", 0o600);
        let err = store
            .replace(vec![
                entry("*", "other", Source::File(good.clone())),
                entry("*", "h", Source::Env("GATEWAY_TEST_CRED_UNSET_VAR_2".into())),
            ])
            .unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(value(&store, "id", "h").as_deref(), Some("second"));
        assert!(store.lookup("id", "other").is_none());

        store.replace(vec![entry("*", "other", Source::File(good))]).unwrap();
        assert_eq!(value(&store, "id", "other").as_deref(), Some("good"));
        assert!(store.lookup("id", "h").is_none());
    }

    #[test]
    fn debug_output_never_shows_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "k", "sk-super-secret-123", 0o600);
        let store = load(vec![entry("*", "*", Source::File(path))]).unwrap();
        let cred = store.lookup("a", "b").unwrap();
        for text in [format!("{store:?}"), format!("{cred:?}"), format!("{cred:#?}")] {
            assert!(!text.contains("sk-super-secret-123"), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    /// A command printing JSON: `v<n>` (n counts its runs) expiring in an
    /// hour, failing while `fail` exists.
    fn counting_command(dir: &Path) -> Source {
        let script = format!(
            "d={}; [ -e $d/fail ] && exit 3; n=$(cat $d/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > $d/n; \
             printf '{{\"credential\": \"v%s\", \"expires_in\": 3600}}' $n",
            dir.display()
        );
        Source::Command(CommandSource {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
            output: CommandOutput::Json,
            ..CommandSource::default()
        })
    }

    #[test]
    fn expiring_sources_refresh_ahead_of_expiry_and_report_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = load(vec![entry("*", "*", counting_command(dir.path()))]).unwrap();
        assert!(store.has_expiring());
        let first = store.lookup("a", "b").unwrap();
        let expires = first.expires_at.expect("an expiry");
        let now = SystemTime::now();
        assert!(expires > now + Duration::from_secs(3590) && expires <= now + Duration::from_secs(3601));
        assert!(!first.expired(now) && first.expired(expires));
        assert_eq!(value(&store, "a", "b").as_deref(), Some("v1"));
        // Not yet due: nothing is read.
        assert_eq!(store.refresh_due(now), 0);
        assert_eq!(value(&store, "a", "b").as_deref(), Some("v1"));
        // Within refresh_before (60 s) of the expiry: read again.
        let due = expires - Duration::from_secs(59);
        assert_eq!(store.refresh_due(due), 1);
        assert_eq!(value(&store, "a", "b").as_deref(), Some("v2"));
        // A failing refresh keeps the old value (with its expiry, after which
        // the gate does not send it) and retries.
        let second = store.lookup("a", "b").unwrap().expires_at.unwrap();
        std::fs::write(dir.path().join("fail"), "").unwrap();
        let due = second - Duration::from_secs(30);
        assert_eq!(store.refresh_due(due), 0);
        let kept = store.lookup("a", "b").unwrap();
        assert_eq!(kept.expires_at, Some(second));
        assert!(kept.expired(second));
        assert_eq!(store.refresh_due(due + Duration::from_secs(1)), 0, "the retry waits 5 s");
        std::fs::remove_file(dir.path().join("fail")).unwrap();
        assert_eq!(store.refresh_due(due + REFRESH_RETRY), 1);
        assert_eq!(value(&store, "a", "b").as_deref(), Some("v3"));
    }

    #[test]
    fn json_output_errors_never_quote_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("printf 'sk-not-json-123'", "not the expected JSON"),
            ("printf '{\"credential\": \"sk-secret-123\"}'", "exactly one of"),
            (
                "printf '{\"credential\": \"sk-secret-123\", \"expires_at\": \"2001-01-01T00:00:00Z\"}'",
                "already expired",
            ),
        ];
        for (script, want) in cases {
            let source = Source::Command(CommandSource {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                output: CommandOutput::Json,
                ..CommandSource::default()
            });
            let err = load(vec![entry("*", "*", source)]).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("sk-"), "{err}");
        }
        let _ = dir;
    }
}

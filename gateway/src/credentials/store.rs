//! Upstream credentials per (identity, destination host), loaded from files,
//! the environment or commands, and swapped atomically on reload.
//!
//! Loading blocks (file reads, child processes): from async code call
//! [`CredentialStore::load`] and [`CredentialStore::reload`] through
//! `tokio::task::spawn_blocking`. Lookups never block on a reload: they read
//! an immutable snapshot that a reload replaces in one step.

use std::{
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, RwLock},
    thread,
    time::{Duration, Instant},
};

use zeroize::Zeroizing;

use super::{
    config::{CommandSource, CredentialEntry, Injection, Source},
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
}

/// One loaded entry.
#[derive(Debug)]
struct Loaded {
    identity: String,
    host: String,
    value: Option<SecretString>,
    inject: Injection,
}

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
            .map(|(entry, e)| Credential { value: e.value.clone(), inject: e.inject.clone(), entry })
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

/// Locks are only held to clone an `Arc`, so a poisoned lock still holds a
/// consistent value; recovering beats taking the proxy down.
fn read<T>(lock: &RwLock<Arc<T>>) -> Arc<T> {
    Arc::clone(&lock.read().unwrap_or_else(|e| e.into_inner()))
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn load_all(entries: &[CredentialEntry], options: LoadOptions) -> Result<Vec<Loaded>, StoreError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let value = match &entry.source {
                None => None,
                Some(source) => Some(read_source(source, options).map_err(|reason| StoreError { index, reason })?),
            };
            Ok(Loaded {
                identity: entry.identity.clone(),
                host: entry.host.clone(),
                value,
                inject: entry.inject.clone(),
            })
        })
        .collect()
}

fn read_source(source: &Source, options: LoadOptions) -> Result<SecretString, String> {
    let raw = match source {
        Source::File(path) => read_file(path, options)?,
        Source::Env(name) => match std::env::var(name) {
            Ok(v) => Zeroizing::new(v),
            Err(std::env::VarError::NotPresent) => return Err(format!("env: `{name}` is not set")),
            Err(std::env::VarError::NotUnicode(_)) => return Err(format!("env: `{name}` is not valid UTF-8")),
        },
        Source::Command(cmd) => run_command(cmd)?,
    };
    let value = raw.trim();
    if value.is_empty() {
        return Err(format!("{}: the value is empty", describe(source)));
    }
    Ok(SecretString::new(value.to_owned()))
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
fn run_command(cmd: &CommandSource) -> Result<Zeroizing<String>, String> {
    let program = cmd.argv.first().ok_or_else(|| "command: empty argv".to_string())?;
    let at = || format!("command: {program}");
    let mut child = Command::new(program)
        .args(&cmd.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: cannot start: {e}", at()))?;
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
    let deadline = Instant::now() + cmd.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{}: timed out after {:?}", at(), cmd.timeout));
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

    fn entry(identity: &str, host: &str, source: Source) -> CredentialEntry {
        CredentialEntry {
            identity: identity.into(),
            host: host.into(),
            source: Some(source),
            inject: Injection::default(),
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
}

//! Asking the container runtime about a container: its name and image.
//!
//! The cgroup path names a container by id only ([`super::container`]). A
//! reviewer reading a finding wants to know *which* container held the key:
//! its name (GitLab names job containers after runner, project and job) and
//! its image. Runtimes that speak the Docker Engine API (dockerd, podman's
//! compatibility socket) answer `GET /containers/<id>/json` on a unix
//! socket; the sockets to ask are `identity.container_runtimes`.
//!
//! Three rules keep this off the critical path and honest:
//!
//! * **Bounded.** A connection waits at most `identity.container_lookup_timeout`
//!   for an answer; the lookup itself goes on in the background (so the next
//!   connection finds it), and one lookup per container is in flight however
//!   many connections ask. Answers are kept per container id (ids are never
//!   reused); "not known" and failures are kept for a short while, so a dead
//!   socket costs one attempt per container per few seconds.
//! * **Optional.** Attribution never depends on it: without an answer the
//!   container keeps its id (from the kernel) and has no name or image.
//! * **Verified.** A runtime answers for any id it knows. The answer is used
//!   only if the container's own init process (`State.Pid`) lives in the
//!   cgroup of the connecting process (or above it): a job that can create a
//!   cgroup named like another container's id (cgroup delegation) does not
//!   get that container's name and image.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use super::attest::Attested;
use super::container::Runtime;

/// How long a lookup may take in the background before it is abandoned.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(10);
/// How long "no configured runtime knows this id" is remembered.
const UNKNOWN_TTL: Duration = Duration::from_secs(30);
/// How long a failed lookup (socket refused, timed out, bad answer) is
/// remembered before the next connection of that container tries again.
const FAILED_TTL: Duration = Duration::from_secs(5);
/// Bound on remembered containers; a full table forgets everything settled.
const CAPACITY: usize = 4096;
/// Caps on what a runtime returns (names and images are chosen by whoever
/// starts a container: in CI, often the job's own configuration).
const MAX_NAME: usize = 256;
const MAX_IMAGE: usize = 1024;

/// Why a runtime could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket exists but does not accept connections (runtime stopped?).
    #[error("{socket}: cannot connect: {source}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{socket}: {reason}")]
    Http {
        /// The socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The runtime answered with an unexpected status.
    #[error("{socket}: {path} answered {status}")]
    Status {
        /// The socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// What it answered.
        status: StatusCode,
    },
    /// The answer is not what the Docker Engine API documents.
    #[error("{socket}: {path}: undecodable answer: {source}")]
    Decode {
        /// The socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// What a runtime says about one container, plus the cgroup its init
/// process lives in (read from /proc when the answer came).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeContainer {
    /// Full id.
    pub id: String,
    /// Name, without docker's leading `/`.
    pub name: String,
    /// Image as started (`Config.Image`).
    pub image: String,
    /// Image content id (`Image`, `sha256:...`).
    pub image_id: String,
    /// Whether it is running.
    pub running: bool,
    /// Host pid of its init process (0 when not running).
    pub pid: u32,
    /// cgroup v2 path of that process, `None` when it could not be read.
    pub cgroup: Option<String>,
    /// The socket that answered.
    pub socket: PathBuf,
}

impl RuntimeContainer {
    /// Whether a process in cgroup `cgroup` runs in this container: in the
    /// container's own cgroup or below it.
    pub fn holds(&self, cgroup: &str) -> bool {
        self.cgroup.as_deref().is_some_and(|own| {
            own != "/" && (cgroup == own || cgroup.strip_prefix(own).is_some_and(|rest| rest.starts_with('/')))
        })
    }
}

/// Whether a process in cgroup `cgroup` is intercepted by a program
/// attached to one of `intercepted` (cgroup paths as /proc shows them):
/// attachments apply to a cgroup and everything below it.
pub fn under_any(cgroup: &str, intercepted: &[String]) -> bool {
    intercepted.iter().any(|c| {
        let c = c.trim_end_matches('/');
        !c.is_empty() && (cgroup == c || cgroup.strip_prefix(c).is_some_and(|rest| rest.starts_with('/')))
    })
}

/// One socket's answer to "which containers are running".
#[derive(Debug)]
pub struct SocketListing {
    /// The socket.
    pub socket: PathBuf,
    /// Its running containers, or why it could not say.
    pub containers: Result<Vec<RuntimeContainer>, RuntimeError>,
}

/// A settled or pending lookup.
#[derive(Clone)]
enum Slot {
    /// In flight; the sender flips to `true` when it settles.
    Pending(tokio::sync::watch::Receiver<bool>),
    /// A runtime vouched for it.
    Known(Arc<RuntimeContainer>),
    /// Nothing to apply until `until` (not known, or the lookup failed).
    Nothing { until: Instant },
}

/// The configured container runtimes, with their answers kept per id.
pub struct ContainerRuntimes {
    sockets: Vec<PathBuf>,
    wait: Duration,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl ContainerRuntimes {
    /// Asks `sockets` (Docker Engine API) in order; a connection waits at
    /// most `wait` for an answer.
    pub fn new(sockets: Vec<PathBuf>, wait: Duration) -> ContainerRuntimes {
        ContainerRuntimes { sockets, wait, slots: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The configured sockets.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// Adds the runtime's name and image to `a.container`, when a runtime
    /// answers within the configured wait and its container's init process
    /// shares the connecting process's cgroup. A confirmed
    /// [`Runtime::Unknown`] becomes [`Runtime::Docker`]. Never fails: without
    /// an answer the container keeps what the cgroup path said.
    pub async fn enrich(&self, a: &mut Attested) {
        let (Some(container), Some(cgroup)) = (a.container.as_mut(), a.cgroup.as_deref()) else { return };
        // Kubernetes' runtimes do not speak the Docker Engine API.
        if self.sockets.is_empty() || matches!(container.runtime, Runtime::Containerd | Runtime::Crio) {
            return;
        }
        let Some(described) = self.describe(&container.id).await else { return };
        if !described.holds(cgroup) {
            // Debug only: a job able to create such cgroups could otherwise
            // fill the log, one line per connection.
            tracing::debug!(
                container = container.id,
                cgroup,
                runtime_cgroup = described.cgroup.as_deref(),
                socket = %described.socket.display(),
                "a process runs in a cgroup named after a container whose init process lives elsewhere; the runtime's name and image are not applied"
            );
            return;
        }
        container.name = Some(described.name.clone());
        container.image = Some(described.image.clone());
        container.image_id = Some(described.image_id.clone());
        if container.runtime == Runtime::Unknown {
            container.runtime = Runtime::Docker;
        }
    }

    /// What a runtime says about container `id`, waiting at most the
    /// configured time. `None`: no runtime knows it, none answered (yet), or
    /// the wait ran out (the lookup then completes in the background).
    pub async fn describe(&self, id: &str) -> Option<Arc<RuntimeContainer>> {
        let mut pending = match self.slot(id) {
            Slot::Known(known) => return Some(known),
            Slot::Nothing { .. } => return None,
            Slot::Pending(rx) => rx,
        };
        if tokio::time::timeout(self.wait, pending.wait_for(|settled| *settled)).await.is_err() {
            tracing::debug!(container = id, wait = ?self.wait, "no runtime answer in time; attributed without name and image");
            return None;
        }
        match self.slots.lock().ok()?.get(id) {
            Some(Slot::Known(known)) => Some(known.clone()),
            _ => None,
        }
    }

    /// The slot of `id`, starting a lookup when there is none (or it expired).
    fn slot(&self, id: &str) -> Slot {
        let Ok(mut slots) = self.slots.lock() else {
            return Slot::Nothing { until: Instant::now() };
        };
        match slots.get(id) {
            Some(Slot::Nothing { until }) if Instant::now() >= *until => {}
            Some(slot) => return slot.clone(),
            None => {}
        }
        if slots.len() >= CAPACITY {
            slots.retain(|_, s| matches!(s, Slot::Pending(_)));
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        slots.insert(id.to_owned(), Slot::Pending(rx.clone()));
        let (sockets, table, id) = (self.sockets.clone(), self.slots.clone(), id.to_owned());
        tokio::spawn(async move {
            let settled = match tokio::time::timeout(LOOKUP_DEADLINE, inspect_any(&sockets, &id)).await {
                Ok(Ok(Some(found))) => Slot::Known(Arc::new(found)),
                Ok(Ok(None)) => Slot::Nothing { until: Instant::now() + UNKNOWN_TTL },
                Ok(Err(e)) => {
                    tracing::warn!(container = id, error = %e, "asking the container runtime failed; attributed without name and image");
                    Slot::Nothing { until: Instant::now() + FAILED_TTL }
                }
                Err(_) => {
                    tracing::warn!(container = id, deadline = ?LOOKUP_DEADLINE, "the container runtime did not answer; attributed without name and image");
                    Slot::Nothing { until: Instant::now() + FAILED_TTL }
                }
            };
            if let Ok(mut slots) = table.lock() {
                slots.insert(id, settled);
            }
            let _ = tx.send(true);
        });
        Slot::Pending(rx)
    }

    /// Every running container each configured socket knows (for `gateway
    /// status`). A socket that does not exist is left out: that runtime is
    /// not installed.
    pub async fn running(&self) -> Vec<SocketListing> {
        let mut out = Vec::with_capacity(self.sockets.len());
        for socket in &self.sockets {
            if !socket.exists() {
                continue;
            }
            let containers = tokio::time::timeout(LOOKUP_DEADLINE, list_running(socket)).await.unwrap_or_else(|_| {
                Err(RuntimeError::Http {
                    socket: socket.clone(),
                    reason: format!("no answer within {LOOKUP_DEADLINE:?}"),
                })
            });
            out.push(SocketListing { socket: socket.clone(), containers });
        }
        out
    }
}

/// The first socket that knows `id`. A socket that does not exist is no
/// error (that runtime is not installed); one that refuses is, unless a
/// later socket knows the container.
async fn inspect_any(sockets: &[PathBuf], id: &str) -> Result<Option<RuntimeContainer>, RuntimeError> {
    let mut failure = None;
    for socket in sockets {
        match inspect(socket, id).await {
            Ok(Some(found)) => return Ok(Some(found)),
            Ok(None) => {}
            Err(e) => failure = Some(e),
        }
    }
    failure.map_or(Ok(None), Err)
}

/// `GET /containers/<id>/json` on one socket.
async fn inspect(socket: &Path, id: &str) -> Result<Option<RuntimeContainer>, RuntimeError> {
    // Ids reach the URL path: only ever a full hex id.
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let path = format!("/containers/{id}/json");
    let Some((status, body)) = get(socket, &path).await? else { return Ok(None) };
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(None),
        status => return Err(RuntimeError::Status { socket: socket.to_owned(), path, status }),
    }
    let inspected: Inspect = serde_json::from_slice(&body).map_err(|source| RuntimeError::Decode {
        socket: socket.to_owned(),
        path: path.clone(),
        source,
    })?;
    // Docker also accepts names and id prefixes: only an exact id counts.
    if !inspected.id.eq_ignore_ascii_case(id) {
        return Ok(None);
    }
    Ok(Some(inspected.into_container(socket)))
}

/// Running containers of one socket, each inspected for its init pid.
async fn list_running(socket: &Path) -> Result<Vec<RuntimeContainer>, RuntimeError> {
    let path = "/containers/json".to_owned();
    let Some((status, body)) = get(socket, &path).await? else { return Ok(Vec::new()) };
    if status != StatusCode::OK {
        return Err(RuntimeError::Status { socket: socket.to_owned(), path, status });
    }
    let listed: Vec<Listed> = serde_json::from_slice(&body).map_err(|source| RuntimeError::Decode {
        socket: socket.to_owned(),
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::with_capacity(listed.len());
    for c in listed {
        // Gone between the list and the inspect: not running any more.
        if let Some(found) = inspect(socket, &c.id).await? {
            out.push(found);
        }
    }
    Ok(out)
}

/// One GET over a unix socket; `None` when the socket does not exist.
async fn get(socket: &Path, path: &str) -> Result<Option<(StatusCode, Bytes)>, RuntimeError> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RuntimeError::Connect { socket: socket.to_owned(), source }),
    };
    let request = Request::get(path)
        // The Docker Engine API ignores the host; HTTP/1.1 requires one.
        .header(header::HOST, "docker")
        .header(header::USER_AGENT, concat!("ci-gateway/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| RuntimeError::Http { socket: socket.to_owned(), reason: e.to_string() })?;
    crate::credentials::http_fetch::send(TokioIo::new(stream), request)
        .await
        .map(Some)
        .map_err(|reason| RuntimeError::Http { socket: socket.to_owned(), reason })
}

/// The fields of `GET /containers/<id>/json` the gateway reads.
#[derive(Debug, Deserialize)]
struct Inspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Image", default)]
    image_id: String,
    #[serde(rename = "Config", default)]
    config: Option<InspectConfig>,
    #[serde(rename = "State", default)]
    state: Option<InspectState>,
}

#[derive(Debug, Deserialize)]
struct InspectConfig {
    #[serde(rename = "Image", default)]
    image: String,
}

#[derive(Debug, Deserialize)]
struct InspectState {
    #[serde(rename = "Running", default)]
    running: bool,
    #[serde(rename = "Pid", default)]
    pid: i64,
}

/// The fields of `GET /containers/json` the gateway reads.
#[derive(Debug, Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
}

impl Inspect {
    fn into_container(self, socket: &Path) -> RuntimeContainer {
        let (running, pid) = self.state.map_or((false, 0), |s| (s.running, u32::try_from(s.pid).unwrap_or(0)));
        // Read now: the pid names this container's init only while it runs.
        let cgroup = (running && pid != 0).then(|| crate::intercept::cgroup::cgroup_of(pid)).flatten();
        RuntimeContainer {
            id: self.id.to_ascii_lowercase(),
            name: clean(self.name.strip_prefix('/').unwrap_or(&self.name), MAX_NAME),
            image: clean(&self.config.map(|c| c.image).unwrap_or_default(), MAX_IMAGE),
            image_id: clean(&self.image_id, MAX_IMAGE),
            running,
            pid,
            cgroup,
            socket: socket.to_owned(),
        }
    }
}

/// Capped, without control characters or bidirectional overrides: names
/// and images reach terminals, logs, findings and recordings.
fn clean(s: &str, max: usize) -> String {
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    s.chars().filter(|&c| !c.is_control() && !bidi(c)).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4a3f1c9b2d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";

    fn described(cgroup: Option<&str>) -> RuntimeContainer {
        RuntimeContainer {
            id: ID.into(),
            name: "job".into(),
            image: "alpine".into(),
            image_id: "sha256:00".into(),
            running: true,
            pid: 1,
            cgroup: cgroup.map(str::to_owned),
            socket: PathBuf::from("/x.sock"),
        }
    }

    #[test]
    fn holds_its_cgroup_and_below_only() {
        let c = described(Some(&format!("/ci/{ID}")));
        assert!(c.holds(&format!("/ci/{ID}")));
        assert!(c.holds(&format!("/ci/{ID}/sub")));
        assert!(!c.holds(&format!("/ci/{ID}x")));
        assert!(!c.holds(&format!("/elsewhere/{ID}")));
        assert!(!c.holds("/ci"));
        assert!(!described(None).holds(&format!("/ci/{ID}")));
        // A container whose init sits in the root cgroup vouches for nothing.
        assert!(!described(Some("/")).holds("/anything"));
    }

    #[test]
    fn coverage_is_by_cgroup_subtree() {
        let intercepted = vec!["/ci/jobs".to_owned(), "/docker".to_owned()];
        assert!(under_any(&format!("/ci/jobs/{ID}"), &intercepted));
        assert!(under_any("/ci/jobs", &intercepted));
        assert!(under_any(&format!("/docker/{ID}"), &intercepted));
        assert!(!under_any(&format!("/ci/jobs2/{ID}"), &intercepted));
        assert!(!under_any(&format!("/system.slice/docker-{ID}.scope"), &intercepted));
        assert!(!under_any("/anything", &["/".to_owned()]), "the root is never intercepted");
    }

    #[test]
    fn inspect_answers_decode_and_are_cleaned() {
        let body = format!(
            r#"{{"Id":"{ID}","Name":"/job\u001b[31m\u202e","Image":"sha256:abc","Config":{{"Image":"alpine:3.20","Env":["SECRET=x"]}},"State":{{"Running":false,"Pid":0}}}}"#
        );
        let inspected: Inspect = serde_json::from_str(&body).expect("decodes");
        let c = inspected.into_container(Path::new("/x.sock"));
        assert_eq!((c.name.as_str(), c.image.as_str(), c.image_id.as_str()), ("job[31m", "alpine:3.20", "sha256:abc"));
        assert_eq!((c.running, c.pid, c.cgroup), (false, 0, None));
    }

    #[tokio::test]
    async fn a_missing_socket_is_no_runtime_and_an_answer_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtimes = ContainerRuntimes::new(vec![dir.path().join("absent.sock")], Duration::from_secs(5));
        assert!(runtimes.describe(ID).await.is_none());
        assert!(runtimes.running().await.is_empty(), "an absent socket is not listed");

        // A socket that accepts and never answers: the caller waits only
        // the configured time, and the lookup stays in flight once.
        let path = dir.path().join("mute.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                keep.lock().expect("held").push(s);
            }
        });
        let runtimes = ContainerRuntimes::new(vec![path], Duration::from_millis(50));
        let started = Instant::now();
        assert!(runtimes.describe(ID).await.is_none());
        assert!(runtimes.describe(ID).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(held.lock().expect("held").len(), 1, "one lookup in flight per container");
    }
}

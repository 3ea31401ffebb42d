//! Container identity implied by a cgroup v2 path.
//!
//! Runtimes name the cgroup of a container after its id, so the path the
//! kernel reports (which a job cannot forge without cgroup delegation) tells
//! which container, and for Kubernetes which pod, a process runs in. The
//! name and image are not in the path: [`super::runtime`] asks the runtime
//! for them and fills them in once it has checked that the container it
//! describes really lives in that cgroup.

use serde::{Deserialize, Serialize};

/// The runtime a container belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// `/docker/<id>` or `docker-<id>.scope`, or a container a Docker Engine
    /// API socket confirmed.
    Docker,
    /// `cri-containerd-<id>.scope` (or a bare id under a Kubernetes pod).
    Containerd,
    /// `crio-<id>.scope`.
    Crio,
    /// `libpod-<id>.scope`.
    Podman,
    /// A bare `<64 hex>` cgroup under a parent no runtime convention names:
    /// where `docker run --cgroup-parent=/X` (cgroupfs driver) and GitLab
    /// runner's `cgroup_parent` put containers (`/X/<id>`). Becomes
    /// [`Runtime::Docker`] once a configured runtime socket confirms it.
    Unknown,
}

impl Runtime {
    /// The name used in events, recordings and findings.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Podman => "podman",
            Runtime::Unknown => "unknown",
        }
    }
}

/// A container a process runs in. Fields are declared in sorted order: the
/// session recorder serializes it as canonical JSON directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// Full container id (64 lowercase hex digits), from the cgroup path.
    pub id: String,
    /// Image as the container was started with (`alpine:3.20`), from the
    /// runtime; chosen by whoever started the container (in CI, usually the
    /// job's own configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Content id of that image (`sha256:...`), from the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Container name (without docker's leading `/`), from the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Kubernetes pod uid (dashed form), when under `kubepods`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Runtime convention that matched (or the runtime that confirmed it).
    pub runtime: Runtime,
}

impl ContainerRef {
    /// The first 12 digits of the id, as `docker ps` shows it.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// Finds the innermost container in a cgroup path, if any.
///
/// Recognised: Docker `/docker/<64hex>` and `docker-<64hex>.scope`,
/// containerd `cri-containerd-<64hex>.scope`, CRI-O `crio-<64hex>.scope`,
/// podman `libpod-<64hex>.scope` (not `libpod-conmon-*`: that is the
/// monitor, outside the container), Kubernetes
/// `kubepods.../pod<uid>/<id>` (cgroupfs driver) or
/// `kubepods-...-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`
/// (systemd driver), and a bare `<64hex>` segment under any other parent
/// ([`Runtime::Unknown`]: `--cgroup-parent`).
pub fn parse_container(cgroup: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    let container = |i: usize, runtime: Runtime, id: &str| {
        let pod_uid = if segments[..i].iter().any(|s| s.starts_with("kubepods")) {
            segments[..i].iter().rev().find_map(|s| pod_uid(s))
        } else {
            None
        };
        ContainerRef { runtime, id: id.to_ascii_lowercase(), pod_uid, name: None, image: None, image_id: None }
    };
    // Innermost wins: nested runtimes (podman in docker) report their own id.
    for (i, seg) in segments.iter().enumerate().rev() {
        let found = scope_id(seg).or_else(|| {
            let prev = segments.get(i.checked_sub(1)?)?;
            if is_hex64(seg) && (*prev == "docker" || pod_uid(prev).is_some()) {
                let runtime = if *prev == "docker" { Runtime::Docker } else { Runtime::Containerd };
                Some((runtime, *seg))
            } else {
                None
            }
        });
        if let Some((runtime, id)) = found {
            return Some(container(i, runtime, id));
        }
    }
    // No convention: a bare id, the OUTERMOST one. A process that may write
    // its own cgroup tree (a privileged container) can create children
    // named like ids, but cannot rename the cgroups above it.
    let i = segments.iter().position(|s| is_hex64(s))?;
    Some(container(i, Runtime::Unknown, segments[i]))
}

fn scope_id(seg: &str) -> Option<(Runtime, &str)> {
    let body = seg.strip_suffix(".scope")?;
    const PREFIXES: [(&str, Runtime); 4] = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("libpod-", Runtime::Podman),
    ];
    PREFIXES.iter().find_map(|(p, rt)| {
        let id = body.strip_prefix(p)?;
        is_hex64(id).then_some((*rt, id))
    })
}

/// Pod uid from `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_>.slice` (systemd).
fn pod_uid(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let idx = seg.rfind("pod")?;
    if idx > 0 && !seg[..idx].ends_with('-') {
        return None;
    }
    let uid = seg[idx + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    ok.then(|| uid.to_ascii_lowercase())
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4a3f1c9b2d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
    const POD: &str = "0d5c3e52-3f4b-4c1e-9a37-5a0c2b1d9e8f";

    fn parse(p: &str) -> Option<(Runtime, String, Option<String>)> {
        parse_container(p).map(|c| (c.runtime, c.id, c.pod_uid))
    }

    #[test]
    fn docker_cgroupfs_and_systemd() {
        assert_eq!(parse(&format!("/docker/{ID}")), Some((Runtime::Docker, ID.into(), None)));
        assert_eq!(parse(&format!("/system.slice/docker-{ID}.scope")), Some((Runtime::Docker, ID.into(), None)));
    }

    #[test]
    fn containerd_crio_podman() {
        assert_eq!(
            parse(&format!("/system.slice/cri-containerd-{ID}.scope")),
            Some((Runtime::Containerd, ID.into(), None))
        );
        assert_eq!(parse(&format!("/crio-{ID}.scope")), Some((Runtime::Crio, ID.into(), None)));
        assert_eq!(
            parse(&format!("/machine.slice/libpod-{ID}.scope/container")),
            Some((Runtime::Podman, ID.into(), None))
        );
        assert_eq!(parse(&format!("/machine.slice/libpod-conmon-{ID}.scope")), None);
    }

    #[test]
    fn kubernetes_systemd_and_cgroupfs() {
        let pod_ = POD.replace('-', "_");
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{ID}.scope"
            )),
            Some((Runtime::Containerd, ID.into(), Some(POD.into())))
        );
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod{POD}/{ID}")),
            Some((Runtime::Containerd, ID.into(), Some(POD.into())))
        );
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-pod{pod_}.slice/docker-{ID}.scope")),
            Some((Runtime::Docker, ID.into(), Some(POD.into())))
        );
    }

    #[test]
    fn bare_ids_under_a_cgroup_parent() {
        // `docker run --cgroup-parent=/ci/jobs` (cgroupfs driver).
        assert_eq!(parse(&format!("/ci/jobs/{ID}")), Some((Runtime::Unknown, ID.into(), None)));
        assert_eq!(parse(&format!("/{ID}")), Some((Runtime::Unknown, ID.into(), None)));
        // A child named like an id below it cannot replace the real one...
        let other = "f".repeat(64);
        assert_eq!(parse(&format!("/ci/{ID}/{other}")), Some((Runtime::Unknown, ID.into(), None)));
        // ...but a runtime convention nested inside (docker in docker) names its own.
        assert_eq!(parse(&format!("/ci/{ID}/docker/{other}")), Some((Runtime::Docker, other.clone(), None)));
        assert_eq!(parse(&format!("/ci/{}", ID.to_ascii_uppercase())), Some((Runtime::Unknown, ID.into(), None)));
    }

    #[test]
    fn not_containers() {
        assert_eq!(parse("/user.slice/user-0.slice/session-3.scope"), None);
        assert_eq!(parse("/docker/notanid"), None);
        assert_eq!(parse(&format!("/system.slice/docker-{}.scope", &ID[..63])), None);
        assert_eq!(parse("/"), None);
    }
}

//! Container identity implied by a cgroup v2 path.
//!
//! Runtimes name the cgroup of a container after its id, so the path the
//! kernel reports (which a job cannot forge without cgroup delegation) tells
//! which container, and for Kubernetes which pod, a process runs in.

use serde::Serialize;

/// The runtime whose naming convention matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// `/docker/<id>` or `docker-<id>.scope`.
    Docker,
    /// `cri-containerd-<id>.scope` (or a bare id under a Kubernetes pod).
    Containerd,
    /// `crio-<id>.scope`.
    Crio,
    /// `libpod-<id>.scope`.
    Podman,
}

/// A container found in a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    /// Runtime convention that matched.
    pub runtime: Runtime,
    /// Full container id (64 lowercase hex digits).
    pub id: String,
    /// Kubernetes pod uid (dashed form), when under `kubepods`.
    pub pod_uid: Option<String>,
}

/// Finds the innermost container in a cgroup path, if any.
///
/// Recognised: Docker `/docker/<64hex>` and `docker-<64hex>.scope`,
/// containerd `cri-containerd-<64hex>.scope`, CRI-O `crio-<64hex>.scope`,
/// podman `libpod-<64hex>.scope` (not `libpod-conmon-*`: that is the
/// monitor, outside the container), and Kubernetes
/// `kubepods.../pod<uid>/<id>` (cgroupfs driver) or
/// `kubepods-...-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`
/// (systemd driver).
pub fn parse_container(cgroup: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
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
            let pod_uid = if segments[..i].iter().any(|s| s.starts_with("kubepods")) {
                segments[..i].iter().rev().find_map(|s| pod_uid(s))
            } else {
                None
            };
            return Some(ContainerRef { runtime, id: id.to_ascii_lowercase(), pod_uid });
        }
    }
    None
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
    fn not_containers() {
        assert_eq!(parse("/user.slice/user-0.slice/session-3.scope"), None);
        assert_eq!(parse("/docker/notanid"), None);
        assert_eq!(parse(&format!("/system.slice/docker-{}.scope", &ID[..63])), None);
        assert_eq!(parse(&format!("/elsewhere/{ID}")), None);
        assert_eq!(parse("/"), None);
    }
}

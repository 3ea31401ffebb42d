//! Keeps the programs on every configured cgroup when its directory is
//! removed and created again.
//!
//! Programs are attached to a cgroup, not to a path: when an (empty)
//! intercepted cgroup is removed, its programs go with it, and a cgroup
//! created again at the same path (by a runner, by systemd for a slice, by an
//! operator's script) starts with none. Jobs started there would connect
//! uninspected. This watcher sees the parent directories through inotify and
//! checks every cgroup at least every [`CHECK_EVERY`]: a removed cgroup is
//! reported (and created again when the configuration lets the gateway
//! create it), a new cgroup at a configured path gets the programs at once.
//! The window left is between the directory's creation and the attachment
//! (the inotify wake-up plus six attach calls, about a millisecond), which
//! the threat model names.

use std::{
    fs,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};
use tokio_util::sync::CancellationToken;

use super::{Cgroup, Interceptor, PinRepair};
use crate::config::CgroupSpec;

/// Longest time between two checks when inotify says nothing.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Log target of the watcher's events.
const TARGET: &str = "gateway::intercept";

/// One configured cgroup and the cgroup its programs are attached to.
struct Watched {
    spec: CgroupSpec,
    dir: PathBuf,
    id: u64,
    /// Reported missing, not yet back.
    missing: bool,
}

/// Starts the watcher thread; it stops when `shutdown` is cancelled.
pub fn spawn(
    interceptor: Arc<Interceptor>,
    mount: PathBuf,
    cgroups: Vec<(CgroupSpec, Cgroup)>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let watched: Vec<Watched> =
        cgroups.into_iter().map(|(spec, cg)| Watched { spec, dir: cg.dir, id: cg.id, missing: false }).collect();
    std::thread::Builder::new().name("cgroup-watch".into()).spawn(move || run(&interceptor, &mount, watched, &shutdown))
}

fn run(interceptor: &Interceptor, mount: &Path, mut watched: Vec<Watched>, shutdown: &CancellationToken) {
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(target: TARGET, error = %e, "cannot watch the intercepted cgroups' parents with inotify; checking every 250ms");
            None
        }
    };
    if let Some(inotify) = &inotify {
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_ONLYDIR;
        for w in &watched {
            if let Some(parent) = w.dir.parent() {
                if let Err(e) = inotify.add_watch(parent, flags) {
                    tracing::warn!(target: TARGET, dir = %parent.display(), error = %e, "cannot watch a cgroup's parent; it is checked every 250ms");
                }
            }
        }
    }
    let timeout = PollTimeout::try_from(CHECK_EVERY).unwrap_or(PollTimeout::NONE);
    let mut pins = PinState::Held;
    while !shutdown.is_cancelled() {
        match &inotify {
            Some(inotify) => {
                let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
                // An error (EINTR) only means checking now.
                let _ = poll(&mut fds, timeout);
                // Drain: what changed does not matter, every cgroup is checked.
                while matches!(inotify.read_events(), Ok(events) if !events.is_empty()) {}
            }
            None => std::thread::sleep(CHECK_EVERY),
        }
        for w in &mut watched {
            check(interceptor, mount, w);
        }
        pins = check_pins(interceptor, pins);
    }
}

/// Where this gateway's pins stand, as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinState {
    /// Every pin in place.
    Held,
    /// Pins gone and reported (`pins_lost`).
    Lost,
    /// Pins gone, and pinning them again failed (reported once).
    RepinFailed,
}

/// Keeps the pins in place: when some are gone (bpffs unmounted, or the
/// files removed), reports it once (`pins_lost`: the programs stay attached
/// while this process holds their links, but not after it exits), and as
/// soon as a bpf file system is mounted at the pin directory again, pins the
/// links and maps there again (`pins_restored`).
fn check_pins(interceptor: &Interceptor, was: PinState) -> PinState {
    let repair = interceptor.restore_pins();
    let lost_links = match &repair {
        Ok(PinRepair::Intact) => 0,
        Ok(PinRepair::NoBpffs { links, .. } | PinRepair::Restored { links, .. }) => *links,
        Err(_) => interceptor.missing_pins(),
    };
    if was == PinState::Held && !matches!(repair, Ok(PinRepair::Intact)) {
        tracing::error!(
            target: TARGET,
            event = "pins_lost",
            missing = lost_links,
            "link pins are gone (bpffs unmounted or the pin files removed): jobs are still captured while this \
             gateway runs, but not after it stops; the gateway pins them again as soon as a bpf file system is \
             mounted at intercept.bpffs_dir"
        );
    }
    match repair {
        Ok(PinRepair::Intact) => {
            if was != PinState::Held {
                tracing::info!(target: TARGET, event = "pins_restored", "link pins are back");
            }
            PinState::Held
        }
        Ok(PinRepair::NoBpffs { .. }) => PinState::Lost,
        Ok(PinRepair::Restored { links, maps }) => {
            tracing::warn!(
                target: TARGET,
                event = "pins_restored",
                links,
                maps,
                "pinned the links and maps again on the bpf file system mounted at intercept.bpffs_dir: \
                 enforcement outlives this gateway again"
            );
            PinState::Held
        }
        Err(e) => {
            if was != PinState::RepinFailed {
                tracing::error!(
                    target: TARGET,
                    event = "pins_restore_failed",
                    error = %format!("{:#}", anyhow::Error::new(e)),
                    "cannot pin the links again; retrying every 250ms"
                );
            }
            PinState::RepinFailed
        }
    }
}

/// Compares the cgroup at `w`'s path with the one its programs are on.
fn check(interceptor: &Interceptor, mount: &Path, w: &mut Watched) {
    let found = match fs::metadata(&w.dir) {
        Ok(meta) => Some(meta.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::debug!(target: TARGET, cgroup = %w.dir.display(), error = %e, "cannot check an intercepted cgroup");
            return;
        }
    };
    if found == Some(w.id) {
        return;
    }
    if found.is_none() && !w.missing {
        w.missing = true;
        tracing::error!(
            target: TARGET,
            event = "intercepted_cgroup_removed",
            cgroup = %w.dir.display(),
            cgroup_id = w.id,
            recreate = w.spec.create,
            "an intercepted cgroup was removed; a cgroup created again at its path gets the programs as soon as it appears"
        );
    }
    // With `create: true` the gateway owns the path: it puts the cgroup back.
    let cg = match Cgroup::resolve(mount, &w.spec, w.spec.create) {
        Ok(cg) => cg,
        Err(_) if found.is_none() && !w.spec.create => return,
        Err(e) => {
            tracing::error!(target: TARGET, cgroup = %w.dir.display(), error = %e, "cannot open an intercepted cgroup created again");
            return;
        }
    };
    match interceptor.reattach(&cg, w.id) {
        Ok(()) => {
            tracing::warn!(
                target: TARGET,
                event = "intercepted_cgroup_reattached",
                cgroup = %cg.dir.display(),
                old_cgroup_id = w.id,
                cgroup_id = cg.id,
                created_by_gateway = cg.created,
                "a new cgroup at an intercepted path: the programs are attached to it"
            );
            w.id = cg.id;
            w.missing = false;
        }
        Err(e) => tracing::error!(
            target: TARGET,
            cgroup = %cg.dir.display(),
            error = %format!("{:#}", anyhow::Error::new(e)),
            "cannot attach the programs to a cgroup created again at an intercepted path; jobs in it are not intercepted"
        ),
    }
}

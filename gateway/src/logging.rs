//! Where the daemon's log lines go: masked (see [`crate::mask::log`]) and
//! written to stderr without ever waiting for its reader.
//!
//! Every intercepted connection ends with a log line, and stderr is usually
//! a pipe or a socket to journald or a container runtime. Written with
//! plain blocking writes from the proxy's workers, a reader that stalls
//! (journald rotating or vacuuming, a runtime not draining a container's
//! log) fills the pipe and blocks the workers on their next line: every
//! job's connections stop behind the log.
//!
//! So each line is written at once without blocking (a second,
//! non-blocking open of the pipe; `MSG_DONTWAIT` on a socket), in the
//! worker, as before: lines reach the log in order and before the work
//! that follows them, as readers of the log (and the tests) expect. Only
//! when the reader is behind does a line (or the rest of one) go to a
//! queue that a `log-writer` thread writes with blocking writes; while
//! anything is queued, later lines queue behind it, so the order holds.
//! A full queue drops lines rather than waiting: they are counted
//! (`gateway_log_lines_dropped_total`) and a `log_lines_dropped` warning
//! reports them once lines get through again. The log is operational; what
//! must not be lost (sessions, findings, approvals) goes to the stores,
//! which never wait on the log. Regular files and terminals are written in
//! place, as before.

use std::{
    fs::File,
    io::{self, Write},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tracing_subscriber::fmt::MakeWriter;

use crate::mask::log::MaskedWriter;

/// Lines the queue holds before it drops: at ~1 KiB a line, about 64 MiB
/// at worst, which the writer catches up with once its reader drains.
const QUEUE_LINES: usize = 64 * 1024;

/// How long the daemon's exit waits for queued lines to be written.
const DRAIN_AT_EXIT: Duration = Duration::from_secs(2);

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();

/// How lines reach stderr without blocking.
enum Out {
    /// A pipe, opened a second time with `O_NONBLOCK` (its own open file
    /// description: stderr itself, shared with the parent, stays blocking).
    Pipe(File),
    /// A stream socket (journald's stdout stream): `send` with `MSG_DONTWAIT`.
    Socket(OwnedFd),
    /// Anything else (a file, a terminal): written in place.
    Plain,
}

impl Out {
    fn of_stderr() -> Out {
        let Ok(st) = nix::sys::stat::fstat(io::stderr().as_fd()) else { return Out::Plain };
        let kind = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT;
        if kind == nix::sys::stat::SFlag::S_IFIFO {
            let reopened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(format!("/proc/self/fd/{}", io::stderr().as_raw_fd()));
            return reopened.map_or(Out::Plain, Out::Pipe);
        }
        if kind == nix::sys::stat::SFlag::S_IFSOCK {
            return io::stderr().as_fd().try_clone_to_owned().map_or(Out::Plain, Out::Socket);
        }
        Out::Plain
    }

    /// Writes what it can of `line` now; the bytes written.
    fn try_write(&self, line: &[u8]) -> io::Result<usize> {
        let written = match self {
            Out::Pipe(f) => (&*f).write(line),
            Out::Socket(fd) => {
                let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
                nix::sys::socket::send(fd.as_raw_fd(), line, flags).map_err(io::Error::from)
            }
            Out::Plain => io::stderr().write_all(line).map(|()| line.len()),
        };
        match written {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }
}

/// The daemon's log output (see the module doc).
struct Sink {
    out: Out,
    /// Lines (or rests of lines) queued for the writer thread; taken with
    /// every direct write too, so that lines never overtake each other.
    queued: Mutex<usize>,
    tx: mpsc::Sender<Vec<u8>>,
    dropped: AtomicU64,
}

impl Sink {
    fn emit(&self, line: &[u8]) {
        let Ok(mut queued) = self.queued.lock() else { return };
        let mut rest = line;
        if *queued == 0 {
            match self.out.try_write(line) {
                Ok(n) if n >= line.len() => return,
                Ok(n) => rest = &line[n..],
                // A closed stderr (a dead journald): nothing to wait for.
                Err(_) => return,
            }
        }
        // Half a line already out must be finished, whatever the bound.
        if rest.len() == line.len() && *queued >= QUEUE_LINES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(rest.to_vec()).is_ok() {
            *queued += 1;
        } else {
            // The writer thread is gone: nothing will write it.
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The writer thread: writes queued lines with blocking writes.
    fn drain(self: Arc<Self>, rx: mpsc::Receiver<Vec<u8>>) {
        let mut stderr = io::stderr();
        for line in rx {
            // Best effort: a closed stderr has no one to tell.
            let _ = stderr.write_all(&line);
            if let Ok(mut queued) = self.queued.lock() {
                *queued = queued.saturating_sub(1);
            }
        }
    }
}

/// A [`MakeWriter`] for the daemon's log: each event masked, then written
/// without blocking (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct DaemonLog;

/// One event's writer.
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(sink) = SINK.get() {
            sink.emit(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for DaemonLog {
    type Writer = MaskedWriter<LineWriter>;

    fn make_writer(&'a self) -> Self::Writer {
        MaskedWriter::new(LineWriter)
    }
}

/// Waits (a bounded time) at drop for the queued lines to be written.
#[derive(Debug)]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(sink) = SINK.get() else { return };
        let deadline = Instant::now() + DRAIN_AT_EXIT;
        while sink.queued.lock().map(|q| *q > 0).unwrap_or(false) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sets up the daemon's log output and its writer thread; hold the guard
/// until the daemon has logged its last line.
pub fn daemon() -> io::Result<(DaemonLog, LogGuard)> {
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(Sink { out: Out::of_stderr(), queued: Mutex::new(0), tx, dropped: AtomicU64::new(0) });
    let writer = sink.clone();
    std::thread::Builder::new().name("log-writer".into()).spawn(move || writer.drain(rx))?;
    let _ = SINK.set(sink);
    Ok((DaemonLog, LogGuard(())))
}

/// Lines dropped so far because the queue was full; `None` when the log is
/// written in place (the CLI's commands).
pub fn dropped_lines() -> Option<u64> {
    SINK.get().map(|s| s.dropped.load(Ordering::Relaxed))
}

/// Warns about lines dropped since the last call (`reported` of them were
/// reported before); returns the new count reported. Called periodically
/// by the daemon.
pub fn report_dropped(reported: u64) -> u64 {
    let Some(now) = dropped_lines() else { return reported };
    if now == reported {
        return now;
    }
    tracing::warn!(
        event = "log_lines_dropped",
        dropped = now - reported,
        total = now,
        "log lines were dropped: the log's reader (journald, a pipe) did not keep up; connections were not held back"
    );
    // Still full: this warning was dropped too. Say it all next time.
    if dropped_lines().is_some_and(|after| after > now) {
        return reported;
    }
    now
}

/// Reports dropped lines every second until `stop` fires (the daemon).
pub async fn watch_dropped(stop: tokio_util::sync::CancellationToken) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => reported = report_dropped(reported),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe's reader that stops reading: direct writes stop at the pipe's
    /// capacity, the rest queues in order, and everything arrives in order
    /// once the reader reads again.
    #[test]
    fn a_stalled_pipe_queues_in_order_and_never_blocks() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let w = File::from(w);
        let reopened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
            .expect("reopen the pipe");
        let (tx, rx) = mpsc::channel();
        let sink = Arc::new(Sink { out: Out::Pipe(reopened), queued: Mutex::new(0), tx, dropped: AtomicU64::new(0) });
        let started = Instant::now();
        let lines: Vec<String> = (0..2000).map(|i| format!("{i:05} {}\n", "x".repeat(100))).collect();
        for line in &lines {
            sink.emit(line.as_bytes());
        }
        assert!(started.elapsed() < Duration::from_secs(2), "emitting blocked");
        assert!(*sink.queued.lock().unwrap() > 0, "2000 lines of 107 bytes cannot fit a pipe");
        // The writer thread's job, to `w` (the same pipe), then the reader reads.
        let drainer = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut w = w;
                for line in rx {
                    w.write_all(&line).unwrap();
                    *sink.queued.lock().unwrap() -= 1;
                }
            })
        };
        let mut got = Vec::new();
        let mut r = File::from(r);
        let want: usize = lines.iter().map(String::len).sum();
        let mut buf = [0u8; 65536];
        while got.len() < want {
            let n = std::io::Read::read(&mut r, &mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(String::from_utf8(got).unwrap(), lines.concat(), "every line, in order");
        drop(sink);
        drop(drainer);
    }
}

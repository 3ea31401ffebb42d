//! Where the daemon's log lines go: masked (see [`crate::mask::log`]) and
//! written to stderr by a thread of their own.
//!
//! Every intercepted connection ends with a log line, and stderr is usually
//! a pipe to journald or a container runtime. Written from the proxy's
//! workers, a reader that stalls (journald rotating or vacuuming, a runtime
//! not draining a container's log) would fill the pipe and block the
//! workers on their next line: every job's connections would stop behind
//! the log. So the daemon hands lines to a bounded queue that a
//! `log-writer` thread masks and writes; when the queue is full, lines are
//! dropped rather than waited for, counted, and reported
//! (`gateway_log_lines_dropped_total`, and a `log_lines_dropped` warning
//! once lines get through again). The log is operational; what must not be
//! lost (sessions, findings, approvals) goes to the stores, which never
//! wait on the log.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before it drops: at ~700 bytes a line, about
/// 60 MiB at worst, which a writer catches up with once its reader drains.
const QUEUE_LINES: usize = 64 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// A writer for the daemon's log and the guard that flushes its queue when
/// dropped (hold it until the daemon has logged its last line).
pub fn background() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("log-writer")
        .finish(crate::mask::log::MaskedWriter::new(std::io::stderr()));
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Lines dropped so far because the queue was full; `None` when the log is
/// written in place (the CLI's commands).
pub fn dropped_lines() -> Option<u64> {
    DROPPED.get().map(|c| c.dropped_lines() as u64)
}

/// Warns about lines dropped since the last call, once they can be written
/// again: called periodically by the daemon. Returns the new total.
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
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => reported = report_dropped(reported),
        }
    }
}

//! Notices what happens to the gateway's own time: stalls (its cgroup
//! frozen, the host suspended, the process starved of CPU) and wall-clock
//! jumps (an NTP step, an operator's `date -s`).
//!
//! Neither opens a way around the gateway: while it is stalled, redirected
//! connects wait in its listeners' queues and reach nothing; a jumped clock
//! moves only timestamps and wall-clock expiries (credential and allowlist
//! expiry, token lifetimes), while every timeout runs on the monotonic
//! clock. But both change what a reviewer reads (a hole in a recording's
//! timing, timestamps out of order, an accepted risk expiring early or
//! late), so each is a clear event (`gateway_stalled`, `clock_jumped`) and a
//! metric.
//!
//! The method: a tick every [`TICK`] compares how far the monotonic clock
//! and the wall clock moved since the last one. A monotonic gap far beyond
//! the tick is a stall; a wall-clock move that differs from the monotonic
//! one by more than [`JUMP`] is a jump.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the clocks are compared.
pub const TICK: Duration = Duration::from_millis(500);
/// A monotonic gap this much longer than [`TICK`] is a stall.
pub const STALL: Duration = Duration::from_secs(2);
/// A wall-clock move differing this much from the monotonic one is a jump.
pub const JUMP: Duration = Duration::from_secs(2);

/// tracing target of the watchdog's events.
pub const TARGET: &str = "gateway::watchdog";

/// What one tick saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// Nothing unusual.
    Steady,
    /// The gateway did not run for `stalled` (beyond the tick).
    Stalled {
        /// How long it did not run.
        stalled: Duration,
    },
    /// The wall clock moved `by_seconds` more (or, negative, less) than the
    /// monotonic clock.
    Jumped {
        /// Signed difference, in seconds.
        by_seconds: f64,
    },
}

/// Compares two consecutive readings of both clocks. A stall and a jump in
/// the same interval report the jump (a suspended host's clock catching up
/// is a jump of the monotonic clock's gap too, which this does not count).
pub fn observe(mono_gap: Duration, wall_gap: Result<Duration, Duration>) -> Observation {
    let wall = match wall_gap {
        Ok(forward) => forward.as_secs_f64(),
        Err(backward) => -backward.as_secs_f64(),
    };
    let drift = wall - mono_gap.as_secs_f64();
    if drift.abs() > JUMP.as_secs_f64() {
        return Observation::Jumped { by_seconds: drift };
    }
    match mono_gap.checked_sub(TICK) {
        Some(stalled) if stalled > STALL => Observation::Stalled { stalled },
        _ => Observation::Steady,
    }
}

/// Runs until `shutdown`, logging events and counting metrics.
pub async fn run(metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut last = (Instant::now(), SystemTime::now());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let now = (Instant::now(), SystemTime::now());
        let wall_gap = now.1.duration_since(last.1).map_err(|e| e.duration());
        match observe(now.0 - last.0, wall_gap) {
            Observation::Steady => {}
            Observation::Stalled { stalled } => {
                metrics.stall();
                tracing::warn!(
                    target: TARGET,
                    event = "gateway_stalled",
                    stalled_s = stalled.as_secs_f64(),
                    "the gateway did not run for {:.1} s (its cgroup frozen, the host suspended or starved of CPU): \
                     redirected connections waited, none went around it",
                    stalled.as_secs_f64()
                );
            }
            Observation::Jumped { by_seconds } => {
                metrics.clock_jump(by_seconds > 0.0);
                tracing::warn!(
                    target: TARGET,
                    event = "clock_jumped",
                    by_s = by_seconds,
                    "the wall clock jumped {} by {:.1} s: recorded timestamps and wall-clock expiries \
                     (credentials, allowlist entries, tokens) move with it; timeouts do not",
                    if by_seconds > 0.0 { "forward" } else { "backward" },
                    by_seconds.abs()
                );
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_and_jumps_are_told_apart() {
        let s = Duration::from_secs_f64;
        assert_eq!(observe(s(0.5), Ok(s(0.5))), Observation::Steady);
        // A loaded machine's late tick is not a stall.
        assert_eq!(observe(s(2.0), Ok(s(2.0))), Observation::Steady);
        // Frozen for 5 s: both clocks moved alike.
        assert!(matches!(observe(s(5.5), Ok(s(5.5))), Observation::Stalled { stalled } if stalled == s(5.0)));
        assert!(matches!(observe(s(0.5), Ok(s(3600.5))), Observation::Jumped { by_seconds } if by_seconds == 3600.0));
        assert!(matches!(observe(s(0.5), Err(s(59.5))), Observation::Jumped { by_seconds } if by_seconds == -60.0));
        // NTP slewing (milliseconds) is no jump.
        assert_eq!(observe(s(0.5), Ok(s(0.51))), Observation::Steady);
    }
}

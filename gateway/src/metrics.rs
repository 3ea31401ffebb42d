//! Prometheus metrics, served as OpenMetrics text at `/metrics` on the
//! public listener (`docs/metrics.md` lists every metric).
//!
//! One [`Metrics`] is created by the daemon and shared (`Arc`) with the
//! gate and the proxy. Counters are derived where events are emitted: the
//! connection event ([`crate::event::ConnectionEvent::emit`]), the gate's
//! request decisions, refusals, findings and approvals. Values read from
//! elsewhere (the eBPF programs' counters, the recorder's queue, the
//! outbox's backlog) are read at scrape time by a collector, never copied
//! periodically.
//!
//! Hot path: every series with bounded labels (protocol x outcome, decision,
//! approval outcome...) is created at start-up and kept as a handle, so
//! counting a connection or a request is one atomic add: no label is
//! formatted, no map is looked up, nothing is allocated. Only findings (rule
//! ids, bounded by the detector's rules) and refusals (a fixed set of codes)
//! go through a label map, and neither is on the clean path.
//!
//! No label carries a host, a path, an identity, a fingerprint or a secret:
//! label values come from enums and from rule ids.

use std::{
    borrow::Cow,
    fmt,
    sync::{Arc, OnceLock, Weak},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        MetricType,
    },
    registry::{Registry, Unit},
};

use crate::{
    event::{Outcome, Protocol},
    record::Health,
};

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label value for a connection that ended before its protocol was known
/// (unattributed, refused by a limit).
const NO_PROTOCOL: &str = "none";

/// Buckets (seconds) of the policy evaluation histogram: microseconds to
/// milliseconds.
const POLICY_BUCKETS: [f64; 12] =
    [0.000_002, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01];
/// Buckets (seconds) of the attestation histogram: /proc reads and an
/// executable's hash.
const ATTESTATION_BUCKETS: [f64; 12] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];
/// Buckets (seconds) of the upstream histograms: network round trips.
const UPSTREAM_BUCKETS: [f64; 14] =
    [0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What a request (an HTTP request or a PostgreSQL query) was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// An HTTP request (plaintext or terminated TLS).
    Http,
    /// A PostgreSQL query (simple or extended protocol).
    Postgres,
}

impl RequestKind {
    const ALL: [RequestKind; 2] = [RequestKind::Http, RequestKind::Postgres];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Http => "http",
            RequestKind::Postgres => "postgres",
        }
    }
}

/// The policy's decision for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed (the keys in it may still block it: see the refusals).
    Allow,
    /// Denied by a rule.
    Deny,
    /// Held for approval.
    RequireApproval,
    /// Refused before any rule could decide (an ambiguous path, a statement
    /// that cannot be classified).
    Refused,
}

impl Decision {
    const ALL: [Decision; 4] = [Decision::Allow, Decision::Deny, Decision::RequireApproval, Decision::Refused];

    /// The label value (the policy's action names, and `refused`).
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::RequireApproval => "require_approval",
            Decision::Refused => "refused",
        }
    }

    /// The decision for a policy action.
    pub fn of(action: &crate::policy::Action) -> Decision {
        match action {
            crate::policy::Action::Allow => Decision::Allow,
            crate::policy::Action::Deny { .. } => Decision::Deny,
            crate::policy::Action::RequireApproval(_) => Decision::RequireApproval,
        }
    }
}

/// How a held request's approval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Approved: the request went on.
    Approved,
    /// An approver denied it.
    Denied,
    /// Nobody decided in time.
    TimedOut,
    /// The caller had as many requests waiting as it may.
    Limited,
    /// Approval could not be requested.
    Failed,
}

impl ApprovalOutcome {
    const ALL: [ApprovalOutcome; 5] = [
        ApprovalOutcome::Approved,
        ApprovalOutcome::Denied,
        ApprovalOutcome::TimedOut,
        ApprovalOutcome::Limited,
        ApprovalOutcome::Failed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalOutcome::Approved => "approved",
            ApprovalOutcome::Denied => "denied",
            ApprovalOutcome::TimedOut => "timed_out",
            ApprovalOutcome::Limited => "limited",
            ApprovalOutcome::Failed => "failed",
        }
    }
}

/// Reads the eBPF programs' counters at scrape time (the interceptor; a
/// fake in tests).
pub trait EbpfCounters: Send + Sync {
    /// Every counter by name, or why they could not be read.
    fn read(&self) -> Result<Vec<(&'static str, u64)>, String>;
}

impl EbpfCounters for crate::intercept::Interceptor {
    fn read(&self) -> Result<Vec<(&'static str, u64)>, String> {
        self.stats().map_err(|e| e.to_string())
    }
}

/// The outbox's backlog as the shipping code reports it (see
/// [`Metrics::observe_outbox`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxBacklog {
    /// Records written locally and not yet shipped to the central store.
    pub records: u64,
    /// Age of the oldest of them (zero when there is none); `None` when the
    /// shipper does not know it (the gauge is left out).
    pub oldest: Option<Duration>,
}

type OutboxSource = Box<dyn Fn() -> OutboxBacklog + Send + Sync>;

/// Two labels, both from enums.
type Labels2 = [(&'static str, &'static str); 2];
/// One label from an enum.
type Labels1 = [(&'static str, &'static str); 1];
/// A finding's rule id and action.
type FindingLabels = [(&'static str, Cow<'static, str>); 2];

/// The gateway's metrics: handles for the hot path and the registry that
/// encodes them.
pub struct Metrics {
    registry: Registry,
    /// `[protocol or none][outcome]`; `Protocol::ALL.len()` is "none".
    connections: Vec<[Counter; Outcome::ALL.len()]>,
    /// `[kind][decision]`.
    requests: [[Counter; Decision::ALL.len()]; RequestKind::ALL.len()],
    refusals: Family<Labels1, Counter>,
    limit_refusals: Counter,
    findings: Family<FindingLabels, Counter>,
    approvals_pending: Gauge,
    approvals_decided: [Counter; ApprovalOutcome::ALL.len()],
    attestation_hits: Counter,
    attestation_misses: Counter,
    attestation_seconds: Histogram,
    policy_seconds: [Histogram; RequestKind::ALL.len()],
    upstream_connect_seconds: Histogram,
    upstream_response_seconds: Histogram,
    stalls: Counter,
    /// `[backward, forward]`.
    clock_jumps: [Counter; 2],
    live: Arc<Live>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric; the bounded series start at zero, so a rate
    /// is defined from the first scrape.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();

        let connections_family = Family::<Labels2, Counter>::default();
        registry.register(
            "gateway_connections",
            "Intercepted connections by how the proxy handled them (protocol) and how they ended (outcome)",
            connections_family.clone(),
        );
        let protocol_names = Protocol::ALL.iter().map(|p| p.as_str()).chain([NO_PROTOCOL]);
        let connections = protocol_names
            .map(|protocol| {
                Outcome::ALL.map(|o| {
                    connections_family.get_or_create(&[("protocol", protocol), ("outcome", o.as_str())]).clone()
                })
            })
            .collect();

        let requests_family = Family::<Labels2, Counter>::default();
        registry.register(
            "gateway_requests",
            "Requests (HTTP requests, PostgreSQL queries) by the policy's decision",
            requests_family.clone(),
        );
        let requests = RequestKind::ALL.map(|k| {
            Decision::ALL
                .map(|d| requests_family.get_or_create(&[("kind", k.as_str()), ("decision", d.as_str())]).clone())
        });

        let refusals = Family::<Labels1, Counter>::default();
        registry.register(
            "gateway_refusals",
            "Refusals by reason (the error code clients see; `limit` for connections refused by a resource limit)",
            refusals.clone(),
        );
        let limit_refusals = refusals.get_or_create(&[("reason", "limit")]).clone();

        let findings = Family::<FindingLabels, Counter>::default();
        registry.register(
            "gateway_findings",
            "Hard-coded keys found in requests, by detector rule and the action taken (block, flag, swap)",
            findings.clone(),
        );

        let approvals_pending = Gauge::default();
        registry.register(
            "gateway_approvals_pending",
            "Requests held waiting for approval now",
            approvals_pending.clone(),
        );
        let decided_family = Family::<Labels1, Counter>::default();
        registry.register(
            "gateway_approvals_decided",
            "Approvals asked for, by how they ended",
            decided_family.clone(),
        );
        let approvals_decided =
            ApprovalOutcome::ALL.map(|o| decided_family.get_or_create(&[("outcome", o.as_str())]).clone());

        let cache_family = Family::<Labels1, Counter>::default();
        registry.register(
            "gateway_attestation_cache_lookups",
            "Attestation cache lookups: `hit` reused an earlier attestation of the unchanged process, `miss` attested in full",
            cache_family.clone(),
        );
        let attestation_hits = cache_family.get_or_create(&[("result", "hit")]).clone();
        let attestation_misses = cache_family.get_or_create(&[("result", "miss")]).clone();
        let attestation_seconds = Histogram::new(ATTESTATION_BUCKETS);
        registry.register_with_unit(
            "gateway_attestation_duration",
            "Time to attest a connecting process in full (/proc, executable hash), queueing included",
            Unit::Seconds,
            attestation_seconds.clone(),
        );

        let policy_family = Family::<Labels1, Histogram>::new_with_constructor(policy_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "gateway_policy_evaluation_duration",
            "Time to decide a request (HTTP) or a query (PostgreSQL, every statement in it) by the policy",
            Unit::Seconds,
            policy_family.clone(),
        );
        let policy_seconds = RequestKind::ALL.map(|k| policy_family.get_or_create(&[("kind", k.as_str())]).clone());

        let upstream_connect_seconds = Histogram::new(UPSTREAM_BUCKETS);
        registry.register_with_unit(
            "gateway_upstream_connect_duration",
            "Time to open the TCP connection to the original destination",
            Unit::Seconds,
            upstream_connect_seconds.clone(),
        );
        let upstream_response_seconds = Histogram::new(UPSTREAM_BUCKETS);
        registry.register_with_unit(
            "gateway_upstream_response_duration",
            "Time from a forwarded HTTP request's head to the upstream response's head",
            Unit::Seconds,
            upstream_response_seconds.clone(),
        );

        let stalls = Counter::default();
        registry.register(
            "gateway_stalls",
            "Times the gateway itself stopped running for seconds (its cgroup frozen, the host suspended, starved of CPU)",
            stalls.clone(),
        );
        let jumps_family = Family::<Labels1, Counter>::default();
        registry.register(
            "gateway_clock_jumps",
            "Wall-clock jumps the gateway noticed, by direction",
            jumps_family.clone(),
        );
        let clock_jumps = ["backward", "forward"].map(|d| jumps_family.get_or_create(&[("direction", d)]).clone());

        let live = Arc::new(Live::default());
        registry.register_collector(Box::new(live.clone()));

        Metrics {
            registry,
            connections,
            requests,
            refusals,
            limit_refusals,
            findings,
            approvals_pending,
            approvals_decided,
            attestation_hits,
            attestation_misses,
            attestation_seconds,
            policy_seconds,
            upstream_connect_seconds,
            upstream_response_seconds,
            stalls,
            clock_jumps,
            live,
        }
    }

    /// Counts a stall of the gateway ([`crate::watchdog`]).
    pub fn stall(&self) {
        self.stalls.inc();
    }

    /// Counts a wall-clock jump ([`crate::watchdog`]).
    pub fn clock_jump(&self, forward: bool) {
        self.clock_jumps[usize::from(forward)].inc();
    }

    /// The metrics as OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Counts a finished connection (from its event); `limited` when a
    /// resource limit refused it.
    pub fn connection(&self, protocol: Option<Protocol>, outcome: Outcome, limited: bool) {
        let row = protocol.map_or(Protocol::ALL.len(), |p| p as usize);
        self.connections[row][outcome as usize].inc();
        if limited {
            self.limit_refusals.inc();
        }
    }

    /// Counts the policy's decision for a request and how long it took.
    pub fn request(&self, kind: RequestKind, decision: Decision, took: Duration) {
        self.requests[kind as usize][decision as usize].inc();
        self.policy_seconds[kind as usize].observe(took.as_secs_f64());
    }

    /// Counts a refusal by its code ([`crate::enforce::Reason::code`]).
    pub fn refusal(&self, code: &'static str) {
        self.refusals.get_or_create(&[("reason", code)]).inc();
    }

    /// Counts a finding by rule id and action.
    pub fn finding(&self, rule: &str, action: crate::findings::Action) {
        let labels = [("rule", Cow::Owned(rule.to_owned())), ("action", Cow::Borrowed(action.as_str()))];
        self.findings.get_or_create(&labels).inc();
    }

    /// A request is held for approval until the returned guard is dropped.
    pub fn approval_pending(&self) -> PendingApproval {
        self.approvals_pending.inc();
        PendingApproval(self.approvals_pending.clone())
    }

    /// Counts how an approval ended.
    pub fn approval_decided(&self, outcome: ApprovalOutcome) {
        self.approvals_decided[outcome as usize].inc();
    }

    /// Counts an attestation cache lookup.
    pub fn attestation_cache(&self, hit: bool) {
        if hit { &self.attestation_hits } else { &self.attestation_misses }.inc();
    }

    /// Observes a full attestation's duration.
    pub fn attestation(&self, took: Duration) {
        self.attestation_seconds.observe(took.as_secs_f64());
    }

    /// Observes an upstream TCP connect's duration.
    pub fn upstream_connect(&self, took: Duration) {
        self.upstream_connect_seconds.observe(took.as_secs_f64());
    }

    /// Observes the time to an upstream response head.
    pub fn upstream_response(&self, took: Duration) {
        self.upstream_response_seconds.observe(took.as_secs_f64());
    }

    /// Exports the eBPF programs' counters (`gateway_ebpf_events_total`),
    /// read at each scrape. Set once; later calls are ignored. Weak: the
    /// metrics must not keep the interceptor alive (the daemon takes it back
    /// at shutdown to detach or leave the programs in deny mode).
    pub fn observe_ebpf(&self, counters: Weak<dyn EbpfCounters>) {
        let _ = self.live.ebpf.set(counters);
    }

    /// Exports the session recorder's queue (`gateway_recorder_queue_*`),
    /// read at each scrape. Set once.
    pub fn observe_recorder(&self, recorder: crate::record::Recorder) {
        let _ = self.live.recorder.set(recorder);
    }

    /// Exports the async runtime's live task count
    /// (`gateway_runtime_alive_tasks`), read at each scrape: a count that
    /// only grows under steady traffic is a task leak. Set once.
    pub fn observe_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.live.runtime.set(runtime);
    }

    /// Hook for the outbox that ships local records to the central store:
    /// `backlog` is called at each scrape and exported as
    /// `gateway_outbox_backlog_records` and
    /// `gateway_outbox_oldest_age_seconds` (absent until this is called). It
    /// runs on the scrape's task, so it must be cheap and must not block
    /// (read counters the shipping code keeps, not the database). Set once.
    pub fn observe_outbox(&self, backlog: impl Fn() -> OutboxBacklog + Send + Sync + 'static) {
        let _ = self.live.outbox.set(Box::new(backlog));
    }
}

fn policy_histogram() -> Histogram {
    Histogram::new(POLICY_BUCKETS)
}

/// The process's heap as its allocator reports it: exported at each scrape
/// as `gateway_heap_allocated_bytes` and `gateway_heap_resident_bytes`.
/// Beside the process's RSS it tells a leak (`allocated` grows under steady
/// load) from the allocator keeping freed memory (RSS grows, `allocated`
/// does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes allocated and not yet freed: the live heap.
    pub allocated: u64,
    /// Bytes the allocator holds in memory, in use or free (jemalloc: its
    /// resident pages, metadata included; glibc: its arenas and mmapped
    /// chunks).
    pub resident: u64,
}

/// Reads the heap figures; `None` when the allocator cannot say.
pub type HeapSource = fn() -> Option<HeapStats>;

/// Where `gateway_heap_*` come from: process-wide, like the allocator. The
/// library does not know which allocator the binary links, so the binary
/// says ([`observe_heap`]).
static HEAP: OnceLock<HeapSource> = OnceLock::new();

/// Exports the heap figures (`gateway_heap_*`, absent until this is
/// called), read at each scrape by `source`, which must be cheap and must
/// not block. Called by the binary, which chose the allocator. Set once;
/// later calls are ignored.
pub fn observe_heap(source: HeapSource) {
    let _ = HEAP.set(source);
}

/// glibc malloc's figures (`mallinfo2`), for a binary that keeps the system
/// allocator. It walks every arena's free lists under its lock: a scrape's
/// cost, not a hot path's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn glibc_heap() -> Option<HeapStats> {
    // SAFETY: mallinfo2 takes no arguments and returns a struct by value.
    let info = unsafe { libc::mallinfo2() };
    // Chunks served by mmap (`hblkhd`) are in use and held until freed.
    let allocated = info.uordblks.saturating_add(info.hblkhd);
    let resident = info.arena.saturating_add(info.hblkhd);
    Some(HeapStats { allocated: u64::try_from(allocated).ok()?, resident: u64::try_from(resident).ok()? })
}

/// Keeps one request counted in `gateway_approvals_pending` while it waits
/// (also when the waiting future is dropped: the client went away).
#[derive(Debug)]
pub struct PendingApproval(Gauge);

impl Drop for PendingApproval {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Values read at scrape time from their owners.
#[derive(Default)]
struct Live {
    ebpf: OnceLock<Weak<dyn EbpfCounters>>,
    recorder: OnceLock<crate::record::Recorder>,
    outbox: OnceLock<OutboxSource>,
    runtime: OnceLock<tokio::runtime::Handle>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("ebpf", &self.ebpf.get().is_some())
            .field("recorder", &self.recorder.get().is_some())
            .field("outbox", &self.outbox.get().is_some())
            .field("runtime", &self.runtime.get().is_some())
            .finish()
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        if let Some(ebpf) = self.ebpf.get().and_then(Weak::upgrade) {
            match ebpf.read() {
                Ok(stats) => {
                    let mut family = encoder.encode_descriptor(
                        "gateway_ebpf_events",
                        "The eBPF programs' counters (as in `gateway status`): redirected, denied_netns, denied_stopped...",
                        None,
                        MetricType::Counter,
                    )?;
                    for (name, value) in stats {
                        ConstCounter::new(value).encode(family.encode_family(&[("event", name)])?)?;
                    }
                }
                // Left out of this scrape (an alert on absent() sees it).
                Err(e) => tracing::warn!(error = %e, "metrics: cannot read the eBPF counters"),
            }
        }
        if let Some(status) = self.recorder.get().and_then(crate::record::Recorder::status) {
            let (records, bytes) = (
                i64::try_from(status.queued).unwrap_or(i64::MAX),
                i64::try_from(status.queued_bytes).unwrap_or(i64::MAX),
            );
            let mut family = encoder.encode_descriptor(
                "gateway_recorder_health",
                "1 for the recorder's current state: recording, failing (commits fail; see record.on_failure) or backlogged (records are dropped)",
                None,
                MetricType::Gauge,
            )?;
            for health in [Health::Recording, Health::Failing, Health::Backlogged] {
                ConstGauge::new(i64::from(status.health == health))
                    .encode(family.encode_family(&[("state", health.as_str())])?)?;
            }
            let family = encoder.encode_descriptor(
                "gateway_recorder_dropped_records",
                "Session records dropped because the recorder's queue was at its bound",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(status.dropped).encode(family)?;
            gauge(
                &mut encoder,
                "gateway_recorder_queue_records",
                "Session records waiting for the recorder's writer",
                None,
                records,
            )?;
            gauge(
                &mut encoder,
                "gateway_recorder_queue_body",
                "Body bytes of the session records waiting for the recorder's writer",
                Some(&Unit::Bytes),
                bytes,
            )?;
        }
        if let Some(dropped) = crate::logging::dropped_lines() {
            let family = encoder.encode_descriptor(
                "gateway_log_lines_dropped",
                "Log lines dropped because the log's reader (journald, a pipe) did not keep up; connections are never held back for the log",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(dropped).encode(family)?;
        }
        if let Some(runtime) = self.runtime.get() {
            gauge(
                &mut encoder,
                "gateway_runtime_alive_tasks",
                "Tasks alive on the gateway's async runtime (spawned and not yet finished): connections, relays, timers, background work",
                None,
                i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(heap) = HEAP.get().and_then(|read| read()) {
            gauge(
                &mut encoder,
                "gateway_heap_allocated",
                "Heap bytes allocated and not freed (the live heap), as the allocator counts them",
                Some(&Unit::Bytes),
                i64::try_from(heap.allocated).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut encoder,
                "gateway_heap_resident",
                "Bytes the allocator holds in memory, in use or free (RSS minus code, stacks and other mappings)",
                Some(&Unit::Bytes),
                i64::try_from(heap.resident).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(outbox) = self.outbox.get() {
            let backlog = outbox();
            let records = i64::try_from(backlog.records).unwrap_or(i64::MAX);
            gauge(
                &mut encoder,
                "gateway_outbox_backlog_records",
                "Records not yet shipped to the central store",
                None,
                records,
            )?;
            if let Some(oldest) = backlog.oldest {
                gauge(
                    &mut encoder,
                    "gateway_outbox_oldest_age",
                    "Age of the oldest record not yet shipped to the central store",
                    Some(&Unit::Seconds),
                    oldest.as_secs_f64(),
                )?;
            }
        }
        Ok(())
    }
}

/// Encodes one label-less gauge read now.
fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

#[cfg(test)]
mod tests;

//! The registry: series exist from the start, the hot-path handles count
//! the series their labels name, scrape-time sources are read per scrape.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use super::*;

/// The value of the sample `series` (name and labels exactly as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().unwrap_or_else(|e| panic!("sample {series}: {value}: {e}")))
    })
}

fn encoded(m: &Metrics) -> String {
    let text = m.encode().expect("encode");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF:\n{text}");
    text
}

#[test]
fn bounded_series_exist_at_zero_from_the_start() {
    let text = encoded(&Metrics::new());
    for p in Protocol::ALL.iter().map(|p| p.as_str()).chain(["none"]) {
        for o in Outcome::ALL {
            let series = format!("gateway_connections_total{{protocol=\"{p}\",outcome=\"{}\"}}", o.as_str());
            assert_eq!(sample(&text, &series), Some(0.0), "{series} in\n{text}");
        }
    }
    for k in ["http", "postgres"] {
        for d in ["allow", "deny", "require_approval", "refused"] {
            let series = format!("gateway_requests_total{{kind=\"{k}\",decision=\"{d}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        let count = format!("gateway_policy_evaluation_duration_seconds_count{{kind=\"{k}\"}}");
        assert_eq!(sample(&text, &count), Some(0.0), "{count}");
    }
    for o in ["approved", "denied", "timed_out", "limited", "failed"] {
        assert_eq!(sample(&text, &format!("gateway_approvals_decided_total{{outcome=\"{o}\"}}")), Some(0.0));
    }
    assert_eq!(sample(&text, "gateway_refusals_total{reason=\"limit\"}"), Some(0.0));
    assert_eq!(sample(&text, "gateway_approvals_pending"), Some(0.0));
    assert_eq!(sample(&text, "gateway_attestation_cache_lookups_total{result=\"hit\"}"), Some(0.0));
    assert_eq!(sample(&text, "gateway_upstream_connect_duration_seconds_count"), Some(0.0));
    assert_eq!(sample(&text, "gateway_upstream_response_duration_seconds_count"), Some(0.0));
    assert_eq!(sample(&text, "gateway_attestation_duration_seconds_count"), Some(0.0));
    // Sources not attached: their metrics are absent, not zero.
    for absent in ["gateway_ebpf_events", "gateway_recorder_queue", "gateway_outbox"] {
        assert!(!text.contains(absent), "{absent} without a source:\n{text}");
    }
    assert!(text.contains("# TYPE gateway_connections counter"), "{text}");
    assert!(text.contains("# UNIT gateway_policy_evaluation_duration_seconds seconds"), "{text}");
}

#[test]
fn handles_count_the_series_their_labels_name() {
    let m = Metrics::new();
    m.connection(Some(Protocol::Https), Outcome::Blocked, false);
    m.connection(Some(Protocol::Https), Outcome::Blocked, false);
    m.connection(Some(Protocol::Postgres), Outcome::Closed, false);
    m.connection(None, Outcome::Refused, true);
    m.request(RequestKind::Http, Decision::Deny, Duration::from_micros(3));
    m.request(RequestKind::Postgres, Decision::RequireApproval, Duration::from_micros(30));
    m.refusal("static_credential_blocked");
    m.finding("aws-access-key-id", crate::findings::Action::Block);
    m.finding("aws-access-key-id", crate::findings::Action::Block);
    m.finding("github-pat", crate::findings::Action::Flag);
    m.approval_decided(ApprovalOutcome::TimedOut);
    m.attestation_cache(true);
    m.attestation_cache(false);
    m.attestation_cache(false);
    m.attestation(Duration::from_millis(2));
    m.upstream_connect(Duration::from_millis(1));
    m.upstream_response(Duration::from_millis(20));
    let text = encoded(&m);
    let expect = [
        ("gateway_connections_total{protocol=\"https\",outcome=\"blocked\"}", 2.0),
        ("gateway_connections_total{protocol=\"https\",outcome=\"closed\"}", 0.0),
        ("gateway_connections_total{protocol=\"postgres\",outcome=\"closed\"}", 1.0),
        ("gateway_connections_total{protocol=\"none\",outcome=\"refused\"}", 1.0),
        ("gateway_refusals_total{reason=\"limit\"}", 1.0),
        ("gateway_refusals_total{reason=\"static_credential_blocked\"}", 1.0),
        ("gateway_requests_total{kind=\"http\",decision=\"deny\"}", 1.0),
        ("gateway_requests_total{kind=\"http\",decision=\"allow\"}", 0.0),
        ("gateway_requests_total{kind=\"postgres\",decision=\"require_approval\"}", 1.0),
        ("gateway_policy_evaluation_duration_seconds_count{kind=\"http\"}", 1.0),
        ("gateway_policy_evaluation_duration_seconds_bucket{le=\"0.000005\",kind=\"http\"}", 1.0),
        ("gateway_policy_evaluation_duration_seconds_bucket{le=\"0.000025\",kind=\"postgres\"}", 0.0),
        ("gateway_policy_evaluation_duration_seconds_bucket{le=\"0.00005\",kind=\"postgres\"}", 1.0),
        ("gateway_findings_total{rule=\"aws-access-key-id\",action=\"block\"}", 2.0),
        ("gateway_findings_total{rule=\"github-pat\",action=\"flag\"}", 1.0),
        ("gateway_approvals_decided_total{outcome=\"timed_out\"}", 1.0),
        ("gateway_attestation_cache_lookups_total{result=\"hit\"}", 1.0),
        ("gateway_attestation_cache_lookups_total{result=\"miss\"}", 2.0),
        ("gateway_attestation_duration_seconds_count", 1.0),
        ("gateway_upstream_connect_duration_seconds_count", 1.0),
        ("gateway_upstream_response_duration_seconds_count", 1.0),
        ("gateway_upstream_response_duration_seconds_bucket{le=\"0.01\"}", 0.0),
        ("gateway_upstream_response_duration_seconds_bucket{le=\"0.025\"}", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
}

#[test]
fn pending_approvals_follow_the_guards() {
    let m = Metrics::new();
    let first = m.approval_pending();
    let second = m.approval_pending();
    assert_eq!(sample(&encoded(&m), "gateway_approvals_pending"), Some(2.0));
    drop(first);
    assert_eq!(sample(&encoded(&m), "gateway_approvals_pending"), Some(1.0));
    drop(second);
    assert_eq!(sample(&encoded(&m), "gateway_approvals_pending"), Some(0.0));
}

/// eBPF counters that change between scrapes, or fail.
struct FakeEbpf {
    redirected: AtomicU64,
    broken: bool,
}

impl EbpfCounters for FakeEbpf {
    fn read(&self) -> Result<Vec<(&'static str, u64)>, String> {
        if self.broken {
            return Err("map gone".into());
        }
        Ok(vec![("redirected", self.redirected.load(Ordering::Relaxed)), ("denied_netns", 3)])
    }
}

#[test]
fn ebpf_counters_are_read_at_each_scrape() {
    let m = Metrics::new();
    let ebpf = Arc::new(FakeEbpf { redirected: AtomicU64::new(5), broken: false });
    let counters: Arc<dyn EbpfCounters> = ebpf.clone();
    m.observe_ebpf(Arc::downgrade(&counters));
    let text = encoded(&m);
    assert!(text.contains("# TYPE gateway_ebpf_events counter"), "{text}");
    assert_eq!(sample(&text, "gateway_ebpf_events_total{event=\"redirected\"}"), Some(5.0));
    assert_eq!(sample(&text, "gateway_ebpf_events_total{event=\"denied_netns\"}"), Some(3.0));
    ebpf.redirected.store(9, Ordering::Relaxed);
    assert_eq!(sample(&encoded(&m), "gateway_ebpf_events_total{event=\"redirected\"}"), Some(9.0));
    // Not kept alive by the metrics (the daemon takes the interceptor back
    // at shutdown): once it is gone, the counters are left out.
    drop((ebpf, counters));
    assert!(!encoded(&m).contains("gateway_ebpf_events"));

    // Unreadable: left out of the scrape, the rest still encodes.
    let m = Metrics::new();
    let broken: Arc<dyn EbpfCounters> = Arc::new(FakeEbpf { redirected: AtomicU64::new(0), broken: true });
    m.observe_ebpf(Arc::downgrade(&broken));
    let text = encoded(&m);
    assert!(!text.contains("gateway_ebpf_events"), "{text}");
    assert!(text.contains("gateway_connections_total"), "{text}");
}

#[test]
fn the_outbox_hook_is_read_at_each_scrape() {
    let m = Metrics::new();
    let backlog = Arc::new(AtomicU64::new(12));
    let source = backlog.clone();
    m.observe_outbox(move || OutboxBacklog {
        records: source.load(Ordering::Relaxed),
        oldest: Some(Duration::from_millis(1500)),
    });
    let text = encoded(&m);
    assert_eq!(sample(&text, "gateway_outbox_backlog_records"), Some(12.0), "{text}");
    assert_eq!(sample(&text, "gateway_outbox_oldest_age_seconds"), Some(1.5), "{text}");
    backlog.store(0, Ordering::Relaxed);
    assert_eq!(sample(&encoded(&m), "gateway_outbox_backlog_records"), Some(0.0));
}

#[test]
fn the_recorder_queue_is_exported_while_recording() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::record::RecordConfig::default();
    let recorder = crate::record::Recorder::open(&config, dir.path()).expect("recorder");
    let m = Metrics::new();
    m.observe_recorder(recorder.clone());
    let text = encoded(&m);
    assert_eq!(sample(&text, "gateway_recorder_queue_records"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "gateway_recorder_queue_body_bytes"), Some(0.0), "{text}");
    recorder.shutdown();

    let m = Metrics::new();
    m.observe_recorder(crate::record::Recorder::disabled());
    assert!(!encoded(&m).contains("gateway_recorder_queue"));
}

#[test]
fn label_enums_index_their_handles() {
    // `connection` and `request` index arrays by discriminant: the ALL
    // arrays must list every variant in declaration order. The matches are
    // exhaustive, so a new variant does not compile here until it is listed.
    let protocol = |p: Protocol| match p {
        Protocol::Tcp => 0,
        Protocol::TlsPassthrough => 1,
        Protocol::Https => 2,
        Protocol::Http => 3,
        Protocol::Tls => 4,
        Protocol::Postgres => 5,
    };
    let outcome = |o: Outcome| match o {
        Outcome::Closed => 0,
        Outcome::Unattributed => 1,
        Outcome::UpstreamFailed => 2,
        Outcome::Error => 3,
        Outcome::Blocked => 4,
        Outcome::Refused => 5,
    };
    assert_eq!(Protocol::ALL.len(), 6);
    assert_eq!(Outcome::ALL.len(), 6);
    for (i, p) in Protocol::ALL.iter().enumerate() {
        assert_eq!((*p as usize, protocol(*p)), (i, i), "{p:?}");
    }
    for (i, o) in Outcome::ALL.iter().enumerate() {
        assert_eq!((*o as usize, outcome(*o)), (i, i), "{o:?}");
    }
    for (i, k) in RequestKind::ALL.iter().enumerate() {
        assert_eq!(*k as usize, i, "{k:?}");
    }
    for (i, d) in Decision::ALL.iter().enumerate() {
        assert_eq!(*d as usize, i, "{d:?}");
    }
    for (i, o) in ApprovalOutcome::ALL.iter().enumerate() {
        assert_eq!(*o as usize, i, "{o:?}");
    }
}

#[test]
fn the_runtime_task_count_is_exported() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let m = Metrics::new();
    assert!(!encoded(&m).contains("gateway_runtime_alive_tasks"), "absent until observed");
    m.observe_runtime(runtime.handle().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = runtime.spawn(async move {
        let _ = stopped.await;
    });
    let text = encoded(&m);
    assert_eq!(sample(&text, "gateway_runtime_alive_tasks"), Some(1.0), "{text}");
    let _ = stop.send(());
    runtime.block_on(task).expect("the task ends");
    assert_eq!(sample(&encoded(&m), "gateway_runtime_alive_tasks"), Some(0.0));
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_heap_is_exported_once_its_source_is_known() {
    // The only test that sets the process-wide source.
    let m = Metrics::new();
    assert!(!encoded(&m).contains("gateway_heap_allocated"), "absent until observed");
    observe_heap(glibc_heap);
    let before = sample(&encoded(&m), "gateway_heap_allocated_bytes").expect("allocated");
    // 256 MiB, so that what other tests allocate or free meanwhile cannot hide it.
    let block = std::hint::black_box(vec![1u8; 256 << 20]);
    let text = encoded(&m);
    let (during, resident) = (
        sample(&text, "gateway_heap_allocated_bytes").expect("allocated"),
        sample(&text, "gateway_heap_resident_bytes").expect("resident"),
    );
    assert!(during - before > 200.0 * 1048576.0, "{before} -> {during}");
    assert!(resident >= during, "resident {resident} < allocated {during}");
    drop(block);
    let after = sample(&encoded(&m), "gateway_heap_allocated_bytes").expect("allocated");
    assert!(during - after > 200.0 * 1048576.0, "{during} -> {after}");
}

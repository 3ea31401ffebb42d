//! Transparent interception, end to end: real eBPF programs attached to
//! cgroups these tests create, a real gateway process, real clients.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use gateway_tests::{python_named, run_client, unique_port, EchoServer, GatewayOptions, TestGateway};
use nix::sys::signal::Signal;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn event_for(events: &[serde_json::Value], pid: u32) -> Vec<&serde_json::Value> {
    events.iter().filter(|e| e["pid"].as_u64() == Some(u64::from(pid))).collect()
}

#[test]
fn redirects_ipv4_and_attributes_the_process() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let gw = TestGateway::start(GatewayOptions::opaque("ipv4", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));

    let client = python_named(gw.dir.path(), "gwclient-v4");
    let mut cmd = gw.command_in_cgroup(&client);
    // A distinct uid proves the uid comes from the connecting process.
    gateway_tests::run_as(&mut cmd, 65534, 65534);
    let (pid, results) = run_client(cmd, &[server.addr], 1).expect("client");
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert!(r.errno.is_none(), "connect failed: {r:?}");
    assert!(r.proxied(), "the server saw the client's own socket: not redirected ({r:?})");

    let events = gw.wait_events(1);
    let mine = event_for(&events, pid);
    assert_eq!(mine.len(), 1, "one event for the client, got {events:#?}");
    let e = mine[0];
    assert_eq!(e["orig_dst"], server.addr.to_string());
    assert_eq!(e["uid"], 65534);
    assert_eq!(e["comm"], "gwclient-v4");
    assert_eq!(e["outcome"], "closed");
    assert_eq!(e["bytes_up"], 5, "the client sent 5 bytes");
    assert!(e["bytes_down"].as_u64().unwrap_or(0) > 0);
    assert!(e["cgroup"].as_str().unwrap_or_default().ends_with(&format!("ipv4-{}", std::process::id())), "{e}");
    assert!(e["exe"].as_str().unwrap_or_default().contains("python"), "{e}");
    // The proxy consumed the record.
    assert_eq!(gw.status()["original"], 0);
}

#[test]
fn leaves_other_destinations_and_processes_alone_and_refuses_udp_to_captured_ones() {
    let port = unique_port();
    let intercepted = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let other_port = EchoServer::start(addr(&format!("127.0.0.2:{}", unique_port()))).expect("server");
    let other_addr = EchoServer::start(addr(&format!("127.0.0.3:{port}"))).expect("server");
    let gw =
        TestGateway::start(GatewayOptions::opaque("others", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));

    // Same cgroup, destinations outside the set: direct.
    let (_, results) =
        run_client(gw.command_in_cgroup("python3"), &[other_port.addr, other_addr.addr], 1).expect("client");
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.errno.is_none() && !r.proxied(), "must not be redirected: {r:?}");
    }
    // A process outside the cgroup, to the intercepted destination: direct.
    let (_, results) = run_client(Command::new("python3"), &[intercepted.addr], 1).expect("client");
    assert!(results[0].errno.is_none() && !results[0].proxied(), "{:?}", results[0]);

    // UDP: to the intercepted address and port it is refused (it cannot be
    // inspected: QUIC would get around the gateway), to another port of the
    // same address it goes straight through.
    let udp_other = UdpSocket::bind(other_port.addr).expect("udp bind");
    udp_other.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let out = gw
        .command_in_cgroup("python3")
        .arg("-c")
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             try: s.sendto(b'quic?', ('127.0.0.2', {port})); print('sent')\nexcept OSError as e: print(e.errno)\n\
             s.sendto(b'other', ('127.0.0.2', {other}))",
            other = other_port.addr.port()
        ))
        .output()
        .expect("udp client");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), libc::EPERM.to_string(), "UDP to a captured destination");
    let mut buf = [0u8; 16];
    let (n, _) = udp_other.recv_from(&mut buf).expect("the other UDP datagram must arrive directly");
    assert_eq!(&buf[..n], b"other");
    assert_eq!(gw.status()["stats"]["denied_udp"], 1);

    assert!(gw.connection_events().is_empty(), "no connection may reach the proxy: {:#?}", gw.connection_events());
}

#[test]
fn redirects_ipv6_and_ipv4_mapped() {
    let port = unique_port();
    let v6 = EchoServer::start(addr(&format!("[::1]:{port}"))).expect("server");
    let v4 = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let gw = TestGateway::start(GatewayOptions::opaque(
        "ipv6",
        &[&format!("{{cidr: '::1/128', ports: [{port}]}}"), &format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")],
    ));
    let mapped = addr(&format!("[::ffff:127.0.0.2]:{port}"));
    let (pid, results) = run_client(gw.command_in_cgroup("python3"), &[v6.addr, mapped], 1).expect("client");
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.errno.is_none() && r.proxied(), "must be redirected: {r:?}");
    }
    let events = gw.wait_events(2);
    let mut dsts: Vec<String> =
        event_for(&events, pid).iter().map(|e| e["orig_dst"].as_str().unwrap_or("").to_owned()).collect();
    dsts.sort();
    let mut want = vec![v6.addr.to_string(), v4.addr.to_string()];
    want.sort();
    assert_eq!(dsts, want);
}

#[test]
fn host_destinations_are_resolved() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.1:{port}"))).expect("server");
    let gw = TestGateway::start(GatewayOptions::opaque("dns", &[&format!("{{host: localhost, ports: [{port}]}}")]));
    let (pid, results) = run_client(gw.command_in_cgroup("python3"), &[server.addr], 1).expect("client");
    assert!(results[0].proxied(), "{:?}", results[0]);
    let events = gw.wait_events(1);
    assert_eq!(event_for(&events, pid)[0]["orig_dst"], server.addr.to_string());
}

#[test]
fn gateway_inside_the_cgroup_is_not_looped_back() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let mut opts = GatewayOptions::opaque("self", &[&format!("{{cidr: 127.0.0.0/8, ports: [{port}]}}")]);
    opts.gateway_in_cgroup = true;
    let gw = TestGateway::start(opts);
    let (_, results) = run_client(gw.command_in_cgroup("python3"), &[server.addr], 1).expect("client");
    assert!(results[0].errno.is_none() && results[0].proxied(), "{:?}", results[0]);
    // The event is logged when the connection closes, which may be after the
    // client exited; a looped connection would be one more event, so give
    // that one a moment too before counting.
    gw.wait_events(1);
    std::thread::sleep(Duration::from_millis(200));
    let events = gw.connection_events();
    assert_eq!(events.len(), 1, "exactly one proxied connection, no loop: {events:#?}");
    assert_eq!(server.peers.lock().expect("peers").len(), 1);
    let status = gw.status();
    assert!(status["stats"]["skipped_self"].as_u64().unwrap_or(0) >= 1, "{status}");
}

#[test]
fn burst_of_200_connections_is_attributed_without_leaks() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let gw =
        TestGateway::start(GatewayOptions::opaque("burst", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));
    let before = gw.status();

    // Four processes, fifty concurrent connections each.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let cmd = gw.command_in_cgroup("python3");
            let target = server.addr;
            std::thread::spawn(move || run_client(cmd, &[target], 50).expect("client"))
        })
        .collect();
    let mut pids = Vec::new();
    for h in handles {
        let (pid, results) = h.join().expect("client thread");
        assert_eq!(results.len(), 50);
        // Whether each went through the gateway is shown below by its
        // connection event and the redirect counter, not by `proxied()`:
        // among 200 connections the gateway's upstream socket may well get
        // the same ephemeral port number as the client's own (another
        // destination, so the kernel may hand it out again).
        for r in &results {
            assert!(r.errno.is_none() && r.server_saw.is_some(), "pid {pid}: {r:?}");
        }
        pids.push(pid);
    }
    let events = gw.wait_events(200);
    assert_eq!(events.len(), 200, "every connection has an event");
    let mut per_pid: HashMap<u64, usize> = HashMap::new();
    for e in &events {
        assert_eq!(e["outcome"], "closed", "{e}");
        assert_eq!(e["orig_dst"], server.addr.to_string());
        *per_pid.entry(e["pid"].as_u64().expect("pid")).or_default() += 1;
    }
    for pid in pids {
        assert_eq!(per_pid.get(&u64::from(pid)), Some(&50), "pid {pid}: {per_pid:?}");
    }
    let after = gw.status();
    assert_eq!(after["pending"], before["pending"], "{after}");
    assert_eq!(after["original"], before["original"], "{after}");
    assert_eq!(after["stats"]["redirected"].as_u64(), Some(200));
}

#[test]
fn fails_closed_when_stopped_or_crashed_and_recovers() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let mut gw =
        TestGateway::start(GatewayOptions::opaque("closed", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));

    // Clean stop: the programs stay and refuse (EPERM).
    gw.stop(Signal::SIGTERM);
    assert_eq!(gw.status()["mode"], "deny");
    let (_, results) = run_client(gw.command_in_cgroup("python3"), &[server.addr], 1).expect("client");
    assert_eq!(results[0].errno, Some(i64::from(libc::EPERM)), "{:?}", results[0]);

    // A new gateway takes over the pins: no duplicate links, traffic flows.
    gw.spawn(false);
    let status = gw.status();
    assert_eq!(status["mode"], "redirect");
    assert_eq!(status["links"], 6, "one link per program, the old ones replaced: {status}");
    let (_, results) = run_client(gw.command_in_cgroup("python3"), &[server.addr], 1).expect("client");
    assert!(results[0].proxied(), "{:?}", results[0]);

    // Crash: the redirect stays and hits a dead listener (ECONNREFUSED).
    gw.stop(Signal::SIGKILL);
    let (_, results) = run_client(gw.command_in_cgroup("python3"), &[server.addr], 1).expect("client");
    assert_eq!(results[0].errno, Some(i64::from(libc::ECONNREFUSED)), "{:?}", results[0]);
    assert_eq!(server.peers.lock().expect("peers").len(), 1, "only the proxied connection ever reached the server");

    // And the next start after a crash works.
    gw.spawn(false);
    let (_, results) = run_client(gw.command_in_cgroup("python3"), &[server.addr], 1).expect("client");
    assert!(results[0].proxied(), "{:?}", results[0]);
}

#[test]
fn exec_runs_a_command_in_the_intercepted_cgroup() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let gw = TestGateway::start(GatewayOptions::opaque("exec", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));
    let mut cmd = Command::new(gateway_tests::gateway_bin());
    cmd.arg("--config").arg(&gw.config_path).arg("exec").arg("--").arg("python3");
    let (_, results) = run_client(cmd, &[server.addr], 1).expect("client");
    assert!(results[0].proxied(), "{:?}", results[0]);
    let events = gw.wait_events(1);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["comm"], "python3");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "intercept:\n  destinations:\n    - cidr: 10.0.0.0/40\n").expect("write");
    let out = Command::new(gateway_tests::gateway_bin()).arg("--config").arg(&path).arg("run").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path.display().to_string()), "names the file: {err}");
    assert!(err.contains("intercept.destinations[0]"), "names the field: {err}");
    assert!(err.contains("not an IP network"), "gives the reason: {err}");

    std::fs::write(&path, "proxy: [1, 2\n").expect("write");
    let out = Command::new(gateway_tests::gateway_bin()).arg("--config").arg(&path).arg("run").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line"), "YAML errors carry a position");
}

#[test]
fn missing_cgroup_without_create_is_a_clear_error() {
    gateway_tests::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    let yaml = format!(
        "state_dir: {}\nintercept:\n  cgroups: [{{path: gateway-tests/does-not-exist-{}, create: false}}]\n  bpffs_dir: /sys/fs/bpf/gateway-tests/none\n",
        dir.path().join("state").display(),
        std::process::id()
    );
    std::fs::write(&path, yaml).expect("write");
    let out = Command::new(gateway_tests::gateway_bin()).arg("--config").arg(&path).arg("run").output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist") && err.contains("create: true"), "{err}");
}

/// Protocols where the server speaks first (SMTP, MySQL, SSH...): the proxy
/// cannot sniff a first client byte, so after `proxy.client_first_timeout`
/// it splices anyway and the greeting must arrive.
#[test]
fn server_speaks_first_protocols_are_passed_through() {
    let port = unique_port();
    let server_addr = addr(&format!("127.0.0.2:{port}"));
    let listener = std::net::TcpListener::bind(server_addr).expect("bind");
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut s, _) = listener.accept().expect("accept");
        s.write_all(b"220 greetings\r\n").expect("greet");
        let mut got = [0u8; 6];
        s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        s.read_exact(&mut got).expect("client reply");
        s.write_all(b"221 bye\r\n").expect("bye");
        got
    });
    let gw =
        TestGateway::start(GatewayOptions::opaque("srvfirst", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));
    let out = gw
        .command_in_cgroup("python3")
        .arg("-c")
        .arg(format!(
            "import socket,time; s=socket.create_connection(('127.0.0.2',{port})); s.settimeout(60); t=time.time(); g=s.recv(100); \
             s.sendall(b'QUIT\\r\\n'); b=s.recv(100); print(repr(g), repr(b), round(time.time()-t, 3))"
        ))
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("b'220 greetings\\r\\n' b'221 bye\\r\\n'"), "{stdout}");
    assert_eq!(&server.join().expect("server thread"), b"QUIT\r\n");
    let events = gw.wait_events(1);
    assert!(
        events.iter().any(|e| e["orig_dst"] == server_addr.to_string() && e["bytes_down"].as_u64() == Some(24)),
        "{events:#?}"
    );
}

#[test]
fn a_process_keeps_its_attestation_until_it_execs() {
    let port = unique_port();
    let server = EchoServer::start(addr(&format!("127.0.0.2:{port}"))).expect("server");
    let mut opts = GatewayOptions::opaque("attcache", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mappings = dir.path().join("mappings.yaml");
    std::fs::write(
        &mappings,
        "rules:\n  - name: shell\n    match: { exe: /usr/bin/bash }\n    identity: spiffe://ci.test/shell\n  \
         - name: python\n    match: { exe: '/usr/bin/python3*' }\n    identity: spiffe://ci.test/python\n",
    )
    .expect("write mappings");
    opts.extra_yaml = format!("identity:\n  mappings: {}\n", mappings.display());
    let gw = TestGateway::start(opts);
    let python = python_named(gw.dir.path(), "gwafterexec");

    // Three connections from one shell, then the same process becomes
    // python (same pid) and connects again.
    let script = format!(
        "for i in 1 2 3; do exec 3<>/dev/tcp/127.0.0.2/{port} || exit 1; echo hi-$i >&3; read -r line <&3 || exit 2; \
         exec 3<&-; done; exec {py} -c \"import socket; s=socket.create_connection(('127.0.0.2',{port})); \
         s.sendall(b'py'); s.settimeout(10); s.recv(100)\"",
        py = python.display()
    );
    let out = gw.command_in_cgroup("/usr/bin/bash").arg("-c").arg(&script).output().expect("bash");
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.peers.lock().expect("peers").len(), 4, "every connection reached the server");

    let events = gw.wait_events(4);
    let mut mine: Vec<_> = events.iter().filter(|e| e["orig_dst"] == server.addr.to_string()).collect();
    mine.sort_by_key(|e| e["conn_id"].as_u64());
    let seen: Vec<(&str, &str)> = mine
        .iter()
        .map(|e| (e["identity"].as_str().unwrap_or("?"), e["attestation"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(
        seen,
        [
            ("spiffe://ci.test/shell", "fresh"),
            ("spiffe://ci.test/shell", "cached"),
            ("spiffe://ci.test/shell", "cached"),
            // exec ended the epoch: attested afresh, never the shell's identity.
            ("spiffe://ci.test/python", "fresh"),
        ],
        "{mine:#?}"
    );
    let pids: std::collections::BTreeSet<_> = mine.iter().map(|e| e["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 1, "one process throughout: {mine:#?}");
}

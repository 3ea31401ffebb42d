//! The real tracepoint programs behind the attestation cache: an epoch the
//! gateway begins for a process ends when the kernel runs exec or the exit
//! of its leader, and survives everything else (threads coming and going).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::identity::ProcessEpochs;
use gateway::intercept::ExecWatch;

/// A python process driven line by line over its stdin.
struct Driven {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const SCRIPT: &str = r#"
import os, sys, threading
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "thread":
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
    elif cmd == "exec":
        sys.stdout.write("execing\n"); sys.stdout.flush()
        os.execv("/bin/sleep", ["sleep", "60"])
    sys.stdout.write("done\n"); sys.stdout.flush()
"#;

impl Driven {
    fn start() -> Driven {
        let python = std::fs::canonicalize("/usr/bin/python3").expect("Debian's python3 is needed by this test");
        let mut child = Command::new(python)
            .args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut d = Driven { child, stdin, stdout };
        // Running the script (not the interpreter start-up): later execs are ours.
        d.send("nop", "done");
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, cmd: &str, expect: &str) {
        writeln!(self.stdin, "{cmd}").expect("write command");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read reply");
        assert_eq!(line.trim(), expect, "reply to {cmd}");
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn watch() -> ExecWatch {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and must run as root (cargo xtask test does)"
    );
    ExecWatch::load().unwrap_or_else(|e| panic!("loading the exec/exit tracepoints: {e:#?}"))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn exec_ends_an_epoch_and_threads_do_not() {
    let watch = watch();
    let mut p = Driven::start();
    let pid = p.pid();
    assert_eq!(watch.current(pid), None, "untracked until the gateway begins an epoch");
    assert_eq!(watch.begin(pid, 7), Some(7));
    assert_eq!(watch.begin(pid, 9), Some(7), "a running epoch is joined, not replaced");
    assert_eq!(watch.current(pid), Some(7));

    p.send("thread", "done");
    assert_eq!(watch.current(pid), Some(7), "a thread's exit is not the process's");

    p.send("exec", "execing");
    wait_until("the process runs sleep", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    assert_eq!(watch.current(pid), None, "exec ended the epoch");
    assert_eq!(watch.begin(pid, 11), Some(11), "the new image gets a new epoch");
}

#[test]
fn exit_ends_an_epoch() {
    let watch = watch();
    let mut p = Driven::start();
    let pid = p.pid();
    assert_eq!(watch.begin(pid, 5), Some(5));
    p.child.kill().expect("kill");
    p.child.wait().expect("wait");
    assert_eq!(watch.current(pid), None, "exit ended the epoch");
}

#[test]
fn two_watches_do_not_share_epochs() {
    // Each gateway (and each test) has its own map: nothing it wrote
    // survives it or leaks into another.
    let (a, b) = (watch(), watch());
    let me = std::process::id();
    assert_eq!(a.begin(me, 1), Some(1));
    assert_eq!(b.current(me), None);
    drop(a);
    let a = watch();
    assert_eq!(a.current(me), None);
}

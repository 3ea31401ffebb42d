//! Byte relay between two TCP sockets for connections the gate decided to
//! pass through uninspected. This module is the mechanism, never the
//! decision: it moves whatever it is given.
//!
//! Data moves socket -> pipe -> socket with splice(2), so a passthrough
//! connection costs the proxy page references instead of two copies through
//! user space. Each direction keeps reading while its pipe has room and
//! writing while it holds data, so the two sockets work concurrently.
//!
//! What splice alone gets wrong, and this module handles:
//! * splice can report "try again" while the socket holds data (the pipe
//!   has no free slot, the kernel could not allocate a page, or the next
//!   byte is TCP urgent data, which splice never reads past). Treating that
//!   as "no data" cleared the socket's readiness and waited for an edge
//!   that never came: the relay stalled for good. Such bytes are now read
//!   with recv(2) (urgent bytes inline, as the sender wrote them).
//! * splice returns 0 at end of stream but also when a read shutdown
//!   leaves bytes behind an urgent byte: end of stream is only believed
//!   when the socket has nothing queued.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::fcntl::{splice, SpliceFFlags};
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity per direction: larger pipes mean fewer wake-ups on bulk
/// transfers. Falls back to the default size if the kernel refuses.
const PIPE_SIZE: usize = 1 << 20;

/// Buffer for the bytes splice cannot move (see the module doc).
const COPY_BUF: usize = 64 * 1024;

/// Bytes moved so far, readable when the relay fails half-way.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client -> upstream.
    pub up: AtomicU64,
    /// Upstream -> client.
    pub down: AtomicU64,
}

/// Relays both directions until both have reached end of stream; each
/// direction's end is passed on as a write shutdown (half-close). An error
/// on either side (a reset, say) ends both. Dropping the future stops the
/// relay at once and releases everything it holds.
pub async fn relay(client: &TcpStream, upstream: &TcpStream, counters: &Counters) -> io::Result<()> {
    // Urgent bytes are part of what the sender wrote: read them inline.
    for s in [client, upstream] {
        socket2::SockRef::from(s).set_out_of_band_inline(true)?;
    }
    tokio::try_join!(half(client, upstream, &counters.up), half(upstream, client, &counters.down))?;
    Ok(())
}

/// One direction's pipe.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes the pipe can hold.
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        // Best effort: a smaller pipe only costs more wake-ups.
        let capacity = match nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
            Ok(n) => usize::try_from(n).unwrap_or(PIPE_SIZE),
            Err(_) => nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(64 * 1024),
        };
        Ok(Pipe { r, w, capacity })
    }
}

/// What one attempt to fill the pipe from the source did.
enum Filled {
    /// This many bytes went into the pipe.
    Bytes(usize),
    /// The source has bytes queued that splice would not take.
    Stuck,
    /// End of stream, nothing left queued.
    Eof,
}

/// Bytes queued for reading on `sock` (the end of stream not counted).
fn inq(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer it is given.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

fn fill(src: &TcpStream, pipe: &Pipe, room: usize) -> io::Result<Filled> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    match splice(src.as_fd(), None, pipe.w.as_fd(), None, room, flags) {
        Ok(0) if inq(src)? == 0 => Ok(Filled::Eof),
        Ok(0) => Ok(Filled::Stuck),
        Ok(n) => Ok(Filled::Bytes(n)),
        // Only "nothing queued" may clear the socket's readiness (and so
        // wait for new data); anything else would wait forever.
        Err(nix::errno::Errno::EAGAIN) if inq(src)? > 0 => Ok(Filled::Stuck),
        Err(e) => Err(e.into()),
    }
}

async fn half(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let pipe = Pipe::new()?;
    let mut in_pipe = 0usize;
    let mut eof = false;
    // Set when the source has data splice did not take: fill again only
    // after the pipe drained, and copy if it is still stuck when empty.
    let mut stuck = false;
    let mut copy_buf: Vec<u8> = Vec::new();
    loop {
        let mut progressed = false;
        if !eof && (!stuck || in_pipe == 0) && in_pipe < pipe.capacity {
            match src.try_io(Interest::READABLE, || fill(src, &pipe, pipe.capacity - in_pipe)) {
                Ok(Filled::Bytes(n)) => {
                    in_pipe += n;
                    stuck = false;
                    progressed = true;
                }
                Ok(Filled::Eof) => {
                    eof = true;
                    progressed = true;
                }
                Ok(Filled::Stuck) if in_pipe == 0 => {
                    let n = copy_once(src, dst, &mut copy_buf).await?;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    progressed = true;
                }
                Ok(Filled::Stuck) => stuck = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if in_pipe > 0 {
            let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_fd(), None, dst.as_fd(), None, in_pipe, flags).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if eof && in_pipe == 0 {
            // End of stream from src: pass the half-close on; the other
            // direction keeps running until it ends too.
            return match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(()),
            };
        }
        if progressed {
            continue;
        }
        let can_fill = !eof && !stuck && in_pipe < pipe.capacity;
        tokio::select! {
            r = src.readable(), if can_fill => r?,
            r = dst.writable(), if in_pipe > 0 => r?,
        }
    }
}

/// Moves what splice would not (see the module doc) with one recv(2) and
/// a write of what it read; returns the bytes moved.
async fn copy_once(src: &TcpStream, dst: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.resize(COPY_BUF, 0);
    let n = loop {
        src.readable().await?;
        match src.try_read(buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    write_all(dst, &buf[..n]).await?;
    Ok(n)
}

/// `write_all` through a shared reference (the other direction reads the
/// same socket concurrently).
async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::Duration};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// Generous: the suite runs on a loaded 2-core machine.
    const PATIENCE: Duration = Duration::from_secs(30);

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    struct Scene {
        client_app: TcpStream,
        upstream_app: TcpStream,
        counters: Arc<Counters>,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    /// client_app <-> proxy_client ... proxy_upstream <-> upstream_app,
    /// with `client_first` and `upstream_first` already queued on the
    /// proxy's sockets when the relay starts.
    async fn scene(client_first: &[u8], upstream_first: &[u8]) -> Scene {
        let (mut client_app, proxy_client) = pair().await;
        let (proxy_upstream, mut upstream_app) = pair().await;
        client_app.write_all(client_first).await.unwrap();
        upstream_app.write_all(upstream_first).await.unwrap();
        // Like dispatch's peek: the bytes are there before the relay starts.
        if !client_first.is_empty() {
            let mut b = [0u8; 1];
            proxy_client.peek(&mut b).await.unwrap();
        }
        if !upstream_first.is_empty() {
            let mut b = [0u8; 1];
            proxy_upstream.peek(&mut b).await.unwrap();
        }
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move { relay(&proxy_client, &proxy_upstream, &c).await });
        Scene { client_app, upstream_app, counters, task }
    }

    async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await.expect("end of stream in time").unwrap();
        got
    }

    #[tokio::test]
    async fn relays_both_directions_with_half_close() {
        let mut sc = scene(b"", b"").await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut client_app = sc.client_app;
        let p = payload.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&p).await.unwrap();
            client_app.shutdown().await.unwrap();
            client_app
        });
        let got = read_to_end(&mut sc.upstream_app).await;
        assert!(got == payload, "upstream sees every byte in order, then end of stream");
        let mut client_app = writer.await.unwrap();

        // The other direction still works after the client's half-close.
        sc.upstream_app.write_all(b"response after half-close").await.unwrap();
        sc.upstream_app.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut client_app).await, b"response after half-close");

        tokio::time::timeout(PATIENCE, sc.task).await.expect("relay ends").unwrap().unwrap();
        assert_eq!(sc.counters.up.load(Ordering::Relaxed), payload.len() as u64);
        assert_eq!(sc.counters.down.load(Ordering::Relaxed), 25);
    }

    /// Both directions at full speed at once: neither waits for the other
    /// (each direction fills and drains its own pipe concurrently).
    #[tokio::test]
    async fn relays_both_directions_at_once() {
        let sc = scene(b"", b"").await;
        let up: Vec<u8> = (0..4_000_000u32).map(|i| (i % 241) as u8).collect();
        let down: Vec<u8> = (0..4_000_000u32).map(|i| (i % 239) as u8).collect();
        let (mut c_read, mut c_write) = sc.client_app.into_split();
        let (mut u_read, mut u_write) = sc.upstream_app.into_split();
        let (up2, down2) = (up.clone(), down.clone());
        let w1 = tokio::spawn(async move {
            c_write.write_all(&up2).await.unwrap();
            c_write.shutdown().await.unwrap();
        });
        let w2 = tokio::spawn(async move {
            u_write.write_all(&down2).await.unwrap();
            u_write.shutdown().await.unwrap();
        });
        let r1 = tokio::spawn(async move {
            let mut got = Vec::new();
            u_read.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got_down = Vec::new();
        tokio::time::timeout(PATIENCE, c_read.read_to_end(&mut got_down)).await.expect("in time").unwrap();
        let got_up = tokio::time::timeout(PATIENCE, r1).await.expect("in time").unwrap();
        w1.await.unwrap();
        w2.await.unwrap();
        assert!(got_up == up, "upstream got every byte in order");
        assert!(got_down == down, "client got every byte in order");
        tokio::time::timeout(PATIENCE, sc.task).await.expect("relay ends").unwrap().unwrap();
    }

    /// Bytes queued before the relay starts (a peeked TLS hello, a server
    /// greeting) go first, in order, and nothing waits for more traffic
    /// to push them.
    #[tokio::test]
    async fn bytes_queued_before_the_relay_go_first() {
        let mut sc = scene(b"client hello;", b"server greeting;").await;
        let mut buf = [0u8; 16];
        tokio::time::timeout(PATIENCE, sc.upstream_app.read_exact(&mut buf[..13]))
            .await
            .expect("hello in time")
            .unwrap();
        assert_eq!(&buf[..13], b"client hello;");
        tokio::time::timeout(PATIENCE, sc.client_app.read_exact(&mut buf[..16]))
            .await
            .expect("greeting in time")
            .unwrap();
        assert_eq!(&buf[..16], b"server greeting;");
        sc.client_app.write_all(b"more").await.unwrap();
        sc.client_app.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut sc.upstream_app).await, b"more");
        sc.upstream_app.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut sc.client_app).await, b"");
        tokio::time::timeout(PATIENCE, sc.task).await.expect("relay ends").unwrap().unwrap();
        assert_eq!(sc.counters.up.load(Ordering::Relaxed), 17);
        assert_eq!(sc.counters.down.load(Ordering::Relaxed), 16);
    }

    /// A TCP urgent byte used to stall the splice loop for good (splice
    /// never reads past one), even after the sender closed: the connection,
    /// its task and four descriptors were never released. It is relayed
    /// inline, like the rest of the stream.
    #[tokio::test]
    async fn an_urgent_byte_does_not_stall_the_relay() {
        let mut sc = scene(b"", b"").await;
        sc.client_app.write_all(b"before").await.unwrap();
        socket2::SockRef::from(&sc.client_app).send_out_of_band(b"!").unwrap();
        sc.client_app.write_all(b"after").await.unwrap();
        sc.client_app.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut sc.upstream_app).await, b"before!after");
        sc.upstream_app.shutdown().await.unwrap();
        tokio::time::timeout(PATIENCE, sc.task).await.expect("relay ends").unwrap().unwrap();
        assert_eq!(sc.counters.up.load(Ordering::Relaxed), 12);
    }

    /// A reset on one side ends the relay with an error; the other side
    /// is closed when the caller drops its sockets.
    #[tokio::test]
    async fn a_reset_ends_the_relay() {
        let mut sc = scene(b"", b"").await;
        sc.client_app.write_all(b"request").await.unwrap();
        let mut buf = [0u8; 7];
        tokio::time::timeout(PATIENCE, sc.upstream_app.read_exact(&mut buf)).await.expect("in time").unwrap();
        socket2::SockRef::from(&sc.upstream_app).set_linger(Some(Duration::ZERO)).unwrap();
        drop(sc.upstream_app);
        let result = tokio::time::timeout(PATIENCE, sc.task).await.expect("relay ends").unwrap();
        assert!(result.is_err(), "a reset is an error, got {result:?}");
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(PATIENCE, sc.client_app.read_to_end(&mut rest)).await.expect("closed in time");
        assert!(closed.is_err() || rest.is_empty(), "nothing arrives after the reset");
    }

    /// Dropping the relay (the proxy stopping) releases what it holds: the
    /// task owned the proxy's sockets, so both applications see the end.
    #[tokio::test]
    async fn stopping_the_relay_leaves_nothing_behind() {
        let mut sc = scene(b"", b"").await;
        sc.client_app.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(PATIENCE, sc.upstream_app.read_exact(&mut one)).await.expect("in time").unwrap();
        sc.task.abort();
        assert!(sc.task.await.unwrap_err().is_cancelled());
        assert_eq!(read_to_end(&mut sc.upstream_app).await, b"");
        assert_eq!(read_to_end(&mut sc.client_app).await, b"");
    }
}

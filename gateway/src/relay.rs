//! Byte relay between two TCP sockets with splice(2): data moves socket ->
//! pipe -> socket inside the kernel, so a passthrough connection costs the
//! proxy page references instead of two copies through user space.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::fcntl::{splice, SpliceFFlags};
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity per direction: larger pipes mean fewer wake-ups on bulk
/// transfers. Falls back to the default size if the kernel refuses.
const PIPE_SIZE: usize = 1 << 20;

/// Bytes moved so far, readable when the relay fails half-way.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client -> upstream.
    pub up: AtomicU64,
    /// Upstream -> client.
    pub down: AtomicU64,
}

/// Relays both directions until both have reached end of stream; each
/// direction's end is passed on as a write shutdown (half-close).
pub async fn relay(client: &TcpStream, upstream: &TcpStream, counters: &Counters) -> io::Result<()> {
    tokio::try_join!(half(client, upstream, &counters.up), half(upstream, client, &counters.down))?;
    Ok(())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
    // Best effort: a smaller pipe only costs more wake-ups.
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
    Ok((r, w))
}

async fn half(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let (pipe_r, pipe_w) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let mut in_pipe = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pipe_w.as_fd(), None, PIPE_SIZE, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if in_pipe == 0 {
            // End of stream from src: pass the half-close on; the other
            // direction keeps running until it ends too.
            match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        while in_pipe > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, dst.as_fd(), None, in_pipe, flags).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn relays_both_directions_with_half_close() {
        // client_app <-> proxy_client ... proxy_upstream <-> upstream_app
        let (mut client_app, proxy_client) = pair().await;
        let (proxy_upstream, mut upstream_app) = pair().await;
        let counters = std::sync::Arc::new(Counters::default());
        let c = counters.clone();
        let relay_task = tokio::spawn(async move { relay(&proxy_client, &proxy_upstream, &c).await });

        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        client_app.write_all(&payload).await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "upstream sees every byte, then end of stream");

        // The other direction still works after the client's half-close.
        upstream_app.write_all(b"response after half-close").await.unwrap();
        upstream_app.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after half-close");

        relay_task.await.unwrap().unwrap();
        assert_eq!(counters.up.load(Ordering::Relaxed), payload.len() as u64);
        assert_eq!(counters.down.load(Ordering::Relaxed), 25);
    }
}

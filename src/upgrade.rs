//! Zero-downtime binary upgrade: the running process hands its listening sockets to a new one
//! over a Unix socket, then stops accepting and drains.
//!
//! # Protocol
//! The running process listens on `[server] upgrade_socket` (a `SOCK_SEQPACKET` Unix socket,
//! mode 0600, and only a peer of the same user is served). A new process started with
//! `--takeover PATH` (or `ringway upgrade`) connects, and the running one sends:
//! - one message per batch of at most [`MAX_FDS_PER_MESSAGE`] sockets: `fds\n` then one bound
//!   address per line, with the sockets attached (`SCM_RIGHTS`) in the same order. Every
//!   per-worker `SO_REUSEPORT` socket of every listener is sent, so that connections already in
//!   their accept queues are accepted by the new process, and the admin API's listening
//!   socket (the new process serves it; the old one stops accepting on it after `ready`);
//! - `end`.
//!
//! The new process checks every descriptor (a listening TCP socket bound where the message
//! says), adopts them by address ([`Inherited`], binding any listener it lacks), starts its
//! workers and answers `ready`. Only then does the old process stop accepting, finish its
//! requests within `shutdown_timeout` and exit; before `ready` it keeps serving, so a new
//! process that fails to start changes nothing. Both accept from the same sockets in between,
//! so no connection is refused. Each step of the running process's side is bounded
//! ([`HANDOVER_STEP_TIMEOUT`] per message, [`READY_TIMEOUT`] for `ready`, and a stop of the
//! gateway), so a peer that says nothing cannot hold it.
//!
//! # Why libc
//! `SCM_RIGHTS` needs `sendmsg`/`recvmsg` with ancillary data. std's API for it
//! (`UnixStream::send_vectored_with_ancillary`, feature `unix_socket_ancillary_data`) is not
//! stable, and socket2 has no ancillary data; so two small `unsafe` functions below build the
//! `cmsghdr` with libc's `CMSG_*` functions, over a socket2 `SOCK_SEQPACKET` socket (message
//! boundaries kept, so a batch of descriptors always arrives with its list of addresses).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::server::Gateway;
use crate::{info, warn};

/// Most descriptors attached to one message (the kernel's own cap, SCM_MAX_FD, is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 64;
/// Largest hand-over message: `fds\n` and 64 addresses of at most 47 bytes and a newline.
pub const MAX_MESSAGE: usize = 4096;
/// Most sockets a new process adopts (a hostile or broken peer cannot make it hold more).
pub const MAX_SOCKETS: usize = 16 * 1024;
/// How long the new process waits for each message of the running one during a hand-over.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the running process waits for the new one to take each message it sends (a new
/// process reads them as they come; a peer that does not is given up on).
pub const HANDOVER_STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the running process waits for `ready`: the new process's start-up (certificates,
/// binds, workers) after it received the sockets. Below [`HANDOVER_TIMEOUT`], so that a real
/// upgrade whose connection waits behind a peer that says nothing is still served within its
/// own wait. The wait ends at once when the gateway stops.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The slices the wait for `ready` is cut into, to look at the stop flag.
const READY_SLICE: Duration = Duration::from_millis(100);
/// How often the upgrade listener looks at its stop flag while no one connects.
const POLL: Duration = Duration::from_millis(50);

/// Listening sockets handed over by the process being replaced, by bound address.
#[derive(Default)]
pub struct Inherited {
    by_addr: HashMap<SocketAddr, Vec<TcpListener>>,
}

impl Inherited {
    /// The sockets for a configured address (none for port 0: such a listener binds anew).
    pub fn take(&mut self, addr: SocketAddr) -> Vec<TcpListener> {
        if addr.port() == 0 {
            return Vec::new();
        }
        self.by_addr.remove(&addr).unwrap_or_default()
    }

    /// Sockets not adopted yet.
    pub fn len(&self) -> usize {
        self.by_addr.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses not adopted yet.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.by_addr.keys().copied().collect()
    }
}

/// Sends `data` with `fds` attached.
fn send_msg(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so CMSG_FIRSTHDR is
        // non-null and its data area holds `fds.len()` descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != data.len() {
            return Err(io::Error::other("hand-over message sent in part"));
        }
        return Ok(());
    }
}

/// Receives one message into `buf` with at most `max_fds` descriptors (close-on-exec). A
/// truncated message or control block is an error (its descriptors are closed).
fn recv_msg(fd: RawFd, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: arithmetic.
    let space = unsafe { libc::CMSG_SPACE((max_fds.max(1) * std::mem::size_of::<RawFd>()) as u32) }
        as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr, filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer with well-formed
    // headers; CMSG_NXTHDR stops at its end. Each SCM_RIGHTS payload is an array of ints,
    // read unaligned; every descriptor received is ours to own (and close).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "hand-over message truncated",
        ));
    }
    Ok((n, fds))
}

/// The peer runs as our user (only it may take our sockets).
fn same_user(s: &Socket) -> io::Result<()> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer runs as uid {}, not {me}", cred.uid),
        ));
    }
    Ok(())
}

fn seqpacket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET, None)
}

/// Sends every listening socket of `gw`, then waits for `ready`: each message at most
/// [`HANDOVER_STEP_TIMEOUT`], `ready` at most [`READY_TIMEOUT`] and no longer than `stop`
/// stays clear, so a peer that connects and says nothing holds this thread (and the gateway's
/// stop) for no longer than that.
fn hand_over(
    conn: &Socket,
    gw: &crate::reload::ReloadState,
    stop: &AtomicBool,
) -> io::Result<usize> {
    same_user(conn)?;
    conn.set_write_timeout(Some(HANDOVER_STEP_TIMEOUT))?;
    let socks = gw.listening_sockets()?;
    for batch in socks.chunks(MAX_FDS_PER_MESSAGE) {
        let mut text = String::from("fds\n");
        for (addr, _) in batch {
            text.push_str(&addr.to_string());
            text.push('\n');
        }
        let fds: Vec<RawFd> = batch.iter().map(|(_, s)| s.as_raw_fd()).collect();
        send_msg(conn.as_raw_fd(), text.as_bytes(), &fds)?;
    }
    send_msg(conn.as_raw_fd(), b"end", &[])?;
    let mut buf = [0u8; 16];
    let deadline = Instant::now() + READY_TIMEOUT;
    let n = loop {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("the gateway is stopping"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the new process did not confirm within {READY_TIMEOUT:?}"),
            ));
        }
        conn.set_read_timeout(Some(left.min(READY_SLICE)))?;
        match recv_msg(conn.as_raw_fd(), &mut buf, 1) {
            Ok((n, _)) => break n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    };
    if &buf[..n] != b"ready" {
        return Err(io::Error::other(
            "the new process did not confirm it started",
        ));
    }
    Ok(socks.len())
}

/// Binds a SEQPACKET socket at `path` (mode 0600). A stale socket file is replaced; a path
/// where a process still listens, or that is not a socket (a typo must not delete a file), is
/// refused.
fn bind_at(path: &Path) -> io::Result<(Socket, (u64, u64))> {
    let addr = SockAddr::unix(path)?;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ));
        }
        let probe = seqpacket()?;
        if probe.connect(&addr).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another process listens there", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let s = seqpacket()?;
    s.bind(&addr)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    s.listen(4)?;
    s.set_nonblocking(true)?;
    let m = std::fs::metadata(path)?;
    Ok((s, (m.dev(), m.ino())))
}

/// Removes `path` if it is still the socket file this process made (after a hand-over it is
/// the new process's).
fn unlink_if_mine(path: &Path, id: (u64, u64)) {
    if let Ok(m) = std::fs::metadata(path) {
        if (m.dev(), m.ino()) == id {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves hand-overs on `path` from a thread that stops with the gateway. After a successful
/// one it calls `handed` (which should begin the graceful shutdown) and stops listening.
pub fn listen(gw: &Gateway, path: &Path, handed: Box<dyn FnOnce() + Send>) -> io::Result<()> {
    let (sock, id) = bind_at(path)?;
    let state = gw.reload.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let path: PathBuf = path.to_path_buf();
    let t = std::thread::Builder::new()
        .name("ringway-upgrade".into())
        .spawn(move || {
            let mut handed = Some(handed);
            while !flag.load(Ordering::Relaxed) {
                match sock.accept() {
                    Ok((conn, _)) => match hand_over(&conn, &state, &flag) {
                        Ok(n) => {
                            info!(
                                "upgrade: {n} listening sockets handed over to the new process; draining"
                            );
                            unlink_if_mine(&path, id);
                            drop(sock);
                            drop(conn);
                            state.handed_over();
                            if let Some(h) = handed.take() {
                                h();
                            }
                            return;
                        }
                        Err(e) => warn!("upgrade: hand-over failed ({e}); still serving"),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) => {
                        warn!("upgrade: accept on {} failed: {e}", path.display());
                        std::thread::sleep(POLL);
                    }
                }
            }
            unlink_if_mine(&path, id);
        })?;
    gw.reload.adopt_thread(stop, t);
    Ok(())
}

/// The new process's side of a hand-over, once the sockets are received: confirm with
/// [`Takeover::ready`] after the gateway started, or drop it to abort (the old process goes
/// on serving).
pub struct Takeover {
    conn: Socket,
}

impl Takeover {
    /// Tells the old process to stop accepting, and waits (bounded) until it released the
    /// upgrade socket's path, so that this process can bind it.
    pub fn ready(self) -> io::Result<()> {
        send_msg(self.conn.as_raw_fd(), b"ready", &[])?;
        let mut buf = [0u8; 16];
        // The old process closes the connection once its listener is gone.
        let _ = recv_msg(self.conn.as_raw_fd(), &mut buf, 1);
        Ok(())
    }
}

/// Checks a received descriptor: a listening TCP socket bound at `addr`.
fn adopt(fd: OwnedFd, addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::from(fd);
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `on`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut on as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || on == 0 || s.r#type()? != Type::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the socket handed over for {addr} is not a listening TCP socket"),
        ));
    }
    let local = s.local_addr()?.as_socket();
    if local != Some(addr) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the socket handed over for {addr} is bound to {local:?}"),
        ));
    }
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Connects to a running process's upgrade socket and receives its listening sockets.
pub fn take_over(path: &Path) -> io::Result<(Inherited, Takeover)> {
    receive(connect_to(path)?)
}

/// The first half of [`take_over`]: a connection to the running process's upgrade socket,
/// queued until it serves it (one hand-over at a time).
pub fn connect_to(path: &Path) -> io::Result<Socket> {
    let conn = seqpacket()?;
    conn.connect(&SockAddr::unix(path)?).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the running process at {}: {e}",
                path.display()
            ),
        )
    })?;
    conn.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    conn.set_write_timeout(Some(HANDOVER_TIMEOUT))?;
    Ok(conn)
}

/// The second half of [`take_over`]: the running process's listening sockets, received on
/// `conn` ([`connect_to`]).
pub fn receive(conn: Socket) -> io::Result<(Inherited, Takeover)> {
    same_user(&conn)?;
    let mut got = Inherited::default();
    let mut total = 0usize;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut first = true;
    loop {
        let got_msg = recv_msg(conn.as_raw_fd(), &mut buf, MAX_FDS_PER_MESSAGE);
        // Closed before its first message: the running process served another upgrade
        // while this one waited in its queue (and closed the queue with its upgrade socket),
        // or it stopped. Said so, rather than an OS error out of context.
        let closed = match &got_msg {
            Ok((0, _)) => true,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            Ok(_) => false,
        };
        if closed && first {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the running process closed this connection before sending any socket: it \
                 handed its sockets to another upgrade, or it is stopping",
            ));
        }
        first = false;
        let (n, fds) = got_msg?;
        let msg = &buf[..n];
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the running process closed the hand-over",
            ));
        }
        if msg == b"end" {
            break;
        }
        let text = std::str::from_utf8(msg)
            .ok()
            .and_then(|t| t.strip_prefix("fds\n"))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad hand-over message"))?;
        let addrs: Vec<&str> = text.lines().collect();
        if addrs.len() != fds.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "hand-over message lists {} sockets but carries {}",
                    addrs.len(),
                    fds.len()
                ),
            ));
        }
        total = total.saturating_add(fds.len());
        if total > MAX_SOCKETS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_SOCKETS} sockets handed over"),
            ));
        }
        for (a, fd) in addrs.into_iter().zip(fds) {
            let addr: SocketAddr = a.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad address {a:?}"))
            })?;
            got.by_addr.entry(addr).or_default().push(adopt(fd, addr)?);
        }
    }
    Ok((got, Takeover { conn }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_their_addresses_cross_a_seqpacket_pair() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let text = format!("fds\n{addr}\n");
        send_msg(a.as_raw_fd(), text.as_bytes(), &[l.as_raw_fd()]).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fds) = recv_msg(b.as_raw_fd(), &mut buf, MAX_FDS_PER_MESSAGE).unwrap();
        assert_eq!(&buf[..n], text.as_bytes());
        assert_eq!(fds.len(), 1);
        let got = adopt(fds.into_iter().next().unwrap(), addr).unwrap();
        // The received socket is the same listening socket: a connection to it is accepted
        // through the received descriptor.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        got.set_nonblocking(false).unwrap();
        assert!(got.accept().is_ok());
    }

    #[test]
    fn a_descriptor_that_is_not_a_listener_is_refused() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        send_msg(a.as_raw_fd(), b"fds\nx\n", &[c.as_raw_fd()]).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (_, fds) = recv_msg(b.as_raw_fd(), &mut buf, MAX_FDS_PER_MESSAGE).unwrap();
        let e = adopt(fds.into_iter().next().unwrap(), addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Bound elsewhere than claimed.
        send_msg(a.as_raw_fd(), b"fds\nx\n", &[l.as_raw_fd()]).unwrap();
        let (_, fds) = recv_msg(b.as_raw_fd(), &mut buf, MAX_FDS_PER_MESSAGE).unwrap();
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(adopt(fds.into_iter().next().unwrap(), other).is_err());
    }

    #[test]
    fn only_a_stale_socket_is_replaced_never_another_file() {
        let dir = std::env::temp_dir().join(format!("ringway-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A regular file at the configured path (a typo in `upgrade_socket`) is left alone.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let e = bind_at(&file).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        // A socket file nobody listens on any more is replaced.
        let stale = dir.join("stale.sock");
        let s = seqpacket().unwrap();
        s.bind(&SockAddr::unix(&stale).unwrap()).unwrap();
        drop(s);
        assert!(stale.exists());
        let (fresh, _) = bind_at(&stale).unwrap();
        assert!(seqpacket()
            .unwrap()
            .connect(&SockAddr::unix(&stale).unwrap())
            .is_ok());
        drop(fresh);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn more_descriptors_than_room_is_a_truncation_error() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let ls: Vec<TcpListener> = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<RawFd> = ls.iter().map(|l| l.as_raw_fd()).collect();
        send_msg(a.as_raw_fd(), b"fds\n", &fds).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let e = recv_msg(b.as_raw_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}

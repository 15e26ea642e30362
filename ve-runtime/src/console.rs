//! Terminals: a pty created inside the container, its master passed over a
//! unix socket (SCM_RIGHTS, as runc's --console-socket), and the relay that
//! `exec -t` runs between the caller's terminal and the pty.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot connect to console socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {0}: {1}")]
    Sys(&'static str, Errno),
    #[error("no file descriptor received on the console channel")]
    NoFd,
}

/// Connects to the --console-socket before anything else changes, so a bad
/// socket is an error with nothing to undo.
pub fn connect_console_socket(path: &Path) -> Result<OwnedFd, ConsoleError> {
    let stream = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(OwnedFd::from(stream))
}

/// A new pty from the current mount namespace's /dev/ptmx: (master, slave, slave path).
pub fn open_pty() -> Result<(OwnedFd, OwnedFd, PathBuf), ConsoleError> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| ConsoleError::Sys("open /dev/ptmx", e))?;
    nix::pty::grantpt(&master).map_err(|e| ConsoleError::Sys("grant the pty", e))?;
    nix::pty::unlockpt(&master).map_err(|e| ConsoleError::Sys("unlock the pty", e))?;
    let name = nix::pty::ptsname_r(&master).map_err(|e| ConsoleError::Sys("name the pty", e))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| ConsoleError::Sys("open the pty slave", e))?;
    // SAFETY: PtyMaster owns its descriptor; into_raw_fd would need a newer nix, so
    // dup it and let PtyMaster close the original.
    let master_fd = nix::unistd::dup(master.as_raw_fd())
        .map_err(|e| ConsoleError::Sys("dup the pty master", e))?;
    // SAFETY: both descriptors are new and owned by nobody else.
    let (master_fd, slave) =
        unsafe { (OwnedFd::from_raw_fd(master_fd), OwnedFd::from_raw_fd(slave)) };
    Ok((master_fd, slave, PathBuf::from(name)))
}

/// Makes `slave` the controlling terminal and stdin/stdout/stderr of this process.
pub fn become_terminal_owner(slave: &OwnedFd) -> Result<(), ConsoleError> {
    let _ = nix::unistd::setsid(); // already a session leader is fine
                                   // SAFETY: TIOCSCTTY takes an integer argument; the fd is valid.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(ConsoleError::Sys(
            "make the pty the controlling terminal",
            Errno::last(),
        ));
    }
    for target in 0..3 {
        nix::unistd::dup2(slave.as_raw_fd(), target)
            .map_err(|e| ConsoleError::Sys("attach stdio to the pty", e))?;
    }
    Ok(())
}

/// Sends one descriptor (and a short text) over a unix socket.
pub fn send_fd(socket: RawFd, fd: RawFd, text: &str) -> Result<(), ConsoleError> {
    let fds = [fd];
    let control = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(text.as_bytes())];
    socket::sendmsg::<()>(socket, &iov, &control, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| ConsoleError::Sys("send the pty master", e))?;
    Ok(())
}

/// Receives one descriptor sent with [`send_fd`]. Ok(None) on EOF.
pub fn recv_fd(socket: RawFd) -> Result<Option<OwnedFd>, ConsoleError> {
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = socket::recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| ConsoleError::Sys("receive the pty master", e))?;
    if msg.bytes == 0 {
        return Ok(None);
    }
    for cmsg in msg
        .cmsgs()
        .map_err(|e| ConsoleError::Sys("read control messages", e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Err(ConsoleError::NoFd)
}

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> RawMode<'a> {
    /// None when `fd` is not a terminal (then there is nothing to change).
    pub fn enter(fd: BorrowedFd<'a>) -> Option<Self> {
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Copies the window size of `from` (the caller's terminal) to the pty.
pub fn copy_window_size(from: BorrowedFd<'_>, pty_master: BorrowedFd<'_>) {
    let mut size: libc::winsize = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ/TIOCSWINSZ read/write a winsize we own.
    unsafe {
        if libc::ioctl(from.as_raw_fd(), libc::TIOCGWINSZ, &mut size) == 0 {
            libc::ioctl(pty_master.as_raw_fd(), libc::TIOCSWINSZ, &size);
        }
    }
}

/// Sets the pty's window size (process.consoleSize).
pub fn set_window_size(pty_master: BorrowedFd<'_>, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own.
    unsafe { libc::ioctl(pty_master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// Relays stdin -> pty and pty -> stdout until the pty closes (the process
/// and everything holding the slave exited). Window size changes of the
/// caller's terminal (SIGWINCH) are copied to the pty.
pub fn relay(master: &OwnedFd) {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    // SIGWINCH is read from a signalfd: block it in this thread for the relay.
    let mut winch = SigSet::empty();
    winch.add(Signal::SIGWINCH);
    let mut old_mask = SigSet::empty();
    let _ =
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&winch), Some(&mut old_mask));
    let resize = SignalFd::with_flags(&winch, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).ok();
    let mut stdin_open = true;
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = vec![nix::poll::PollFd::new(
            master.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if let Some(resize) = &resize {
            fds.push(nix::poll::PollFd::new(
                resize.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        if stdin_open {
            fds.push(nix::poll::PollFd::new(
                stdin.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
        let events = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .unwrap_or(nix::poll::PollFlags::empty())
        };
        let master_events = events(0);
        let (resize_events, stdin_events) = if resize.is_some() {
            (events(1), events(2))
        } else {
            (nix::poll::PollFlags::empty(), events(1))
        };
        if !resize_events.is_empty() {
            if let Some(resize) = &resize {
                while let Ok(Some(_)) = resize.read_signal() {}
            }
            copy_window_size(stdin.as_fd(), master.as_fd());
        }
        if !master_events.is_empty() {
            match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                Ok(0) | Err(Errno::EIO) => break,
                Ok(n) => {
                    if write_all(stdout.as_fd(), &buf[..n]).is_err() {
                        break;
                    }
                }
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
                Err(_) => break,
            }
        }
        if !stdin_events.is_empty() {
            match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                Ok(0) => stdin_open = false,
                Ok(n) => {
                    if write_all(master.as_fd(), &buf[..n]).is_err() {
                        break;
                    }
                }
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
                Err(_) => stdin_open = false,
            }
        }
    }
    drop(resize);
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_passing_over_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_fd(a.as_raw_fd(), file.as_raw_fd(), "x").unwrap();
        let received = recv_fd(b.as_raw_fd()).unwrap().unwrap();
        let st = nix::sys::stat::fstat(received.as_raw_fd()).unwrap();
        let orig = nix::sys::stat::fstat(file.as_raw_fd()).unwrap();
        assert_eq!(st.st_rdev, orig.st_rdev);
    }

    #[test]
    fn pty_opens_on_the_host() {
        let (master, slave, path) = open_pty().unwrap();
        assert!(path.starts_with("/dev/pts"));
        assert!(master.as_raw_fd() > 2 && slave.as_raw_fd() > 2);
    }
}

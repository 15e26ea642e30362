//! Messages between the runtime and the processes it forks, over a
//! SOCK_SEQPACKET socketpair (one message per packet, EOF when the peer dies).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot create the setup channel: {0}")]
    Create(nix::errno::Errno),
    #[error("setup channel: {0}")]
    Io(nix::errno::Errno),
    #[error("the container process exited during setup")]
    PeerGone,
    #[error("setup channel: unexpected message {0:?}")]
    Unexpected(Message),
}

/// What the runtime and its children tell each other during setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The child has unshared its user namespace: write the maps now.
    UserNamespaceReady,
    /// The parent has done its part: go on.
    Continue,
    /// The host pid of the container's init.
    InitPid(i32),
    /// Setup finished; the process waits for `start` (or is about to exec).
    Ready,
    /// Setup failed; the text says why.
    Error(String),
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        match self {
            Message::UserNamespaceReady => vec![1],
            Message::Continue => vec![2],
            Message::InitPid(pid) => {
                let mut v = vec![3];
                v.extend_from_slice(&pid.to_le_bytes());
                v
            }
            Message::Ready => vec![4],
            Message::Error(text) => {
                let mut v = vec![5];
                v.extend_from_slice(text.as_bytes());
                v
            }
        }
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&tag, rest) = bytes.split_first()?;
        Some(match tag {
            1 => Message::UserNamespaceReady,
            2 => Message::Continue,
            3 => Message::InitPid(i32::from_le_bytes(rest.try_into().ok()?)),
            4 => Message::Ready,
            5 => Message::Error(String::from_utf8_lossy(rest).into_owned()),
            _ => return None,
        })
    }
}

/// One end of the setup channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A connected pair: (parent end, child end). Both are close-on-exec.
pub fn channel() -> Result<(Channel, Channel), SyncError> {
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(SyncError::Create)?;
    Ok((Channel { fd: a }, Channel { fd: b }))
}

impl Channel {
    pub fn send(&self, message: &Message) -> Result<(), SyncError> {
        let bytes = message.encode();
        socket::send(self.fd.as_raw_fd(), &bytes, socket::MsgFlags::MSG_NOSIGNAL)
            .map_err(SyncError::Io)?;
        Ok(())
    }

    pub fn recv(&self) -> Result<Message, SyncError> {
        let mut buf = vec![0u8; 4096];
        loop {
            match socket::recv(self.fd.as_raw_fd(), &mut buf, socket::MsgFlags::empty()) {
                Ok(0) => return Err(SyncError::PeerGone),
                Ok(n) => return Message::decode(&buf[..n]).ok_or(SyncError::PeerGone),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(SyncError::Io(e)),
            }
        }
    }

    /// Waits for a specific message; an Error message becomes Err(text).
    pub fn expect(&self, wanted: Message) -> Result<Result<(), String>, SyncError> {
        match self.recv()? {
            m if m == wanted => Ok(Ok(())),
            Message::Error(text) => Ok(Err(text)),
            other => Err(SyncError::Unexpected(other)),
        }
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let (a, b) = channel().unwrap();
        for m in [
            Message::UserNamespaceReady,
            Message::Continue,
            Message::InitPid(4242),
            Message::Ready,
            Message::Error("boom".into()),
        ] {
            a.send(&m).unwrap();
            assert_eq!(b.recv().unwrap(), m);
        }
        drop(a);
        assert!(matches!(b.recv(), Err(SyncError::PeerGone)));
    }
}

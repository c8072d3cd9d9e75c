//! Who may use the plugin's Unix sockets, and how many at once (security review L6).
//!
//! The registration and DRA sockets are the kubelet's: it dials them as root. Every
//! accepted connection's `SO_PEERCRED` uid is checked against the allowed uids (root
//! by default, plus the plugin's own uid, which probes its sockets for `/healthz`),
//! and at most [`PeerPolicy::max_connections`] connections per socket are open at a
//! time; a refused connection is closed at once, before a byte is read from it. A
//! kubelet holds one or two connections per socket, so the cap only bites a flood.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default cap on open connections per socket.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// Which peers a socket accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Peer uids accepted besides the plugin's own (`SO_PEERCRED`); default `[0]`,
    /// the kubelet.
    pub allowed_uids: Vec<u32>,
    /// Most connections open at once on one socket; more are closed when accepted.
    pub max_connections: usize,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self {
            allowed_uids: vec![0],
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why a connection was closed unserved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's uid is not allowed.
    #[error(
        "peer uid {uid} (pid {pid:?}) is not allowed (allowed: {allowed:?} and the plugin's own {own})"
    )]
    Uid {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid, when the kernel knows it.
        pid: Option<i32>,
        /// The configured uids.
        allowed: Vec<u32>,
        /// The plugin's own uid.
        own: u32,
    },
    /// The socket already has its maximum of open connections.
    #[error("{max} connections already open")]
    Full {
        /// The cap.
        max: usize,
    },
    /// The peer's credentials could not be read.
    #[error("reading the peer's credentials: {0}")]
    NoCredentials(String),
}

/// The decision for one connection (pure): `uid` is the peer's, `own` the
/// plugin's, `open` how many connections the socket holds already.
pub fn admit(
    policy: &PeerPolicy,
    uid: u32,
    pid: Option<i32>,
    own: u32,
    open: usize,
) -> Result<(), Refusal> {
    if uid != own && !policy.allowed_uids.contains(&uid) {
        return Err(Refusal::Uid {
            uid,
            pid,
            allowed: policy.allowed_uids.clone(),
            own,
        });
    }
    if open >= policy.max_connections {
        return Err(Refusal::Full {
            max: policy.max_connections,
        });
    }
    Ok(())
}

/// One socket's gate: the policy and the open-connection slots.
#[derive(Debug, Clone)]
pub struct PeerGate {
    policy: PeerPolicy,
    slots: Arc<Semaphore>,
    own_uid: u32,
}

impl PeerGate {
    /// A gate with `policy`'s cap, for a process running as `geteuid()`.
    pub fn new(policy: PeerPolicy) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        Self {
            slots: Arc::new(Semaphore::new(policy.max_connections)),
            policy,
            own_uid,
        }
    }

    /// Admits an accepted connection (it then holds a slot until dropped) or
    /// refuses it (the caller drops it, which closes it).
    pub fn admit(&self, conn: UnixStream) -> Result<PeerStream, Refusal> {
        let cred = conn
            .peer_cred()
            .map_err(|e| Refusal::NoCredentials(e.to_string()))?;
        let open = self
            .policy
            .max_connections
            .saturating_sub(self.slots.available_permits());
        admit(&self.policy, cred.uid(), cred.pid(), self.own_uid, open)?;
        // A slot freed or taken meanwhile: the semaphore has the last word.
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Refusal::Full {
                max: self.policy.max_connections,
            })?;
        Ok(PeerStream {
            inner: conn,
            _slot: permit,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.policy
            .max_connections
            .saturating_sub(self.slots.available_permits())
    }
}

/// An admitted connection; its slot is freed when it is dropped (closed).
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = <UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L6: every (peer uid, own uid, open count) combination over a small
    /// universe: admitted exactly when the uid is allowed or the plugin's own,
    /// and the socket is below its cap; a refusal names the reason.
    #[test]
    fn admit_is_exactly_uid_allowed_and_below_the_cap() {
        let policy = PeerPolicy {
            allowed_uids: vec![0, 7],
            max_connections: 3,
        };
        for uid in [0u32, 1, 7, 1000, 65534] {
            for own in [0u32, 1000] {
                for open in 0..6 {
                    let allowed = uid == own || uid == 0 || uid == 7;
                    let r = admit(&policy, uid, Some(42), own, open);
                    match r {
                        Ok(()) => assert!(allowed && open < 3, "{uid} {own} {open}"),
                        Err(Refusal::Uid { uid: u, .. }) => {
                            assert!(!allowed && u == uid, "{uid} {own} {open}")
                        }
                        Err(Refusal::Full { max }) => {
                            assert!(allowed && open >= 3 && max == 3, "{uid} {own} {open}")
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
    }

    /// L6: the slots are held by open connections and given back when they
    /// close; a connection past the cap is refused (the caller closes it).
    #[tokio::test]
    async fn connections_past_the_cap_are_refused_until_one_closes() {
        let gate = PeerGate::new(PeerPolicy {
            allowed_uids: vec![],
            max_connections: 2,
        });
        let mut held = Vec::new();
        for _ in 0..2 {
            let (a, _b) = UnixStream::pair().unwrap();
            held.push((gate.admit(a).unwrap(), _b));
        }
        assert_eq!(gate.open(), 2);
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Refusal::Full { max: 2 });
        held.pop();
        assert_eq!(gate.open(), 1);
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(gate.admit(a).is_ok());
    }
}

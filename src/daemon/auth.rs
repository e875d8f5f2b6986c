//! Who may call the API: the kernel's peer credentials of the connecting
//! process (SO_PEERCRED, taken once when the connection is accepted), held
//! against the configured uids and gids. Root is always allowed. Socket
//! file permissions are a first gate; this is the one that decides.

use crate::config::ServerConfig;

/// The process at the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id (absent when the kernel does not say).
    pub pid: Option<i32>,
}

impl Peer {
    /// The credentials of `stream`'s peer.
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let c = stream.peer_cred()?;
        Ok(Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        })
    }
}

/// The configured callers.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Policy {
    /// The policy of the `[server]` section.
    pub fn from_config(cfg: &ServerConfig) -> Self {
        Policy {
            uids: cfg.allowed_uids.clone(),
            gids: cfg.allowed_gids.clone(),
        }
    }

    /// Whether `peer` may call. Only the peer's primary gid counts: the
    /// kernel reports no supplementary groups for a socket peer.
    pub fn allows(&self, peer: &Peer) -> bool {
        peer.uid == 0 || self.uids.contains(&peer.uid) || self.gids.contains(&peer.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_always_then_only_listed_uids_and_gids() {
        let p = Policy {
            uids: vec![107],
            gids: vec![64055],
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
        };
        assert!(p.allows(&peer(0, 0)));
        assert!(p.allows(&peer(107, 1000)));
        assert!(p.allows(&peer(1000, 64055)));
        assert!(!p.allows(&peer(65534, 65534)));
        assert!(!Policy::default().allows(&peer(1000, 1000)));
        assert!(Policy::default().allows(&peer(0, 1000)));
    }
}

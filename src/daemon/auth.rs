//! Who may call the API: the kernel's peer credentials of the connecting
//! process (SO_PEERCRED and SO_PEERGROUPS, both taken by the kernel at
//! connect() time, read once when the connection is accepted), held
//! against the configured uids and groups. Root is always allowed. Socket
//! file permissions are a first gate; this is the one that decides.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::config::ServerConfig;

/// The process at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id (absent when the kernel does not say).
    pub pid: Option<i32>,
    /// Supplementary groups at connect() time.
    pub groups: Arc<[u32]>,
}

impl Peer {
    /// The credentials of `stream`'s peer.
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let c = stream.peer_cred()?;
        Ok(Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            groups: peer_groups(stream.as_raw_fd())?.into(),
        })
    }
}

/// SO_PEERGROUPS: the supplementary groups the peer had when it connected.
/// Reading them from /proc/<pid> instead would race with the pid being
/// reused by another process.
fn peer_groups(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `fd` is an open socket owned by the caller for the whole
        // call; the buffer is valid for `len` bytes, and the kernel writes
        // at most `len` bytes and stores the size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// The configured callers.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Policy {
    /// The policy of the `[server]` section, with `allowed_groups` already
    /// resolved to gids by the caller.
    pub fn new(cfg: &ServerConfig, group_ids: &[u32]) -> Self {
        let mut gids = cfg.allowed_gids.clone();
        gids.extend_from_slice(group_ids);
        Policy {
            uids: cfg.allowed_uids.clone(),
            gids,
        }
    }

    /// Whether `peer` may call: root, a listed uid, or a listed gid as the
    /// peer's primary or one of its supplementary groups.
    pub fn allows(&self, peer: &Peer) -> bool {
        peer.uid == 0
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.gids.contains(g))
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
        let peer = |uid, gid, groups: &[u32]| Peer {
            uid,
            gid,
            pid: None,
            groups: groups.into(),
        };
        assert!(p.allows(&peer(0, 0, &[])));
        assert!(p.allows(&peer(107, 1000, &[])));
        assert!(p.allows(&peer(1000, 64055, &[])));
        assert!(p.allows(&peer(1000, 1000, &[27, 64055])));
        assert!(!p.allows(&peer(65534, 65534, &[27])));
        assert!(!Policy::default().allows(&peer(1000, 1000, &[1000])));
        assert!(Policy::default().allows(&peer(0, 1000, &[])));
    }

    #[test]
    fn peer_groups_are_the_connecting_process_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = peer_groups(a.as_raw_fd()).unwrap();
        mine.sort_unstable();
        got.sort_unstable();
        mine.dedup();
        got.dedup();
        assert_eq!(got, mine);
    }
}

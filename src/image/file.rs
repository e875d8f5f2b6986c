//! The image file: opened with the permissions of whoever asked (the
//! agent runs as root, its callers do not), only if it is a regular file,
//! then hashed in one pass with a fixed buffer, so memory stays flat in
//! the image size. A file that changes while it is read is refused: the
//! verdict would be about bytes nobody will use.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::signature::HashMethod;

/// Bytes read at a time: large enough that the hash, not the system
/// calls, sets the pace.
const CHUNK: usize = 4 << 20;
/// Buffers in flight between the reading and the hashing thread.
const BUFFERS: usize = 2;

/// Whose permissions open the file.
#[derive(Clone, Debug)]
pub struct Caller {
    /// File-system uid.
    pub uid: u32,
    /// File-system gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Why the image file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Missing, not a regular file, not readable by the caller, or changed
    /// while it was read.
    #[error("image file {path}: {reason}")]
    Unusable {
        /// The path as given.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading failed.
    #[error("image file {path}: {op}")]
    Io {
        /// The path as given.
        path: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn unusable(path: &Path, reason: impl Into<String>) -> FileError {
    FileError::Unusable {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Opens `path` for reading as `caller` (`None`: as this process). The
/// kernel makes the permission checks (modes, ACLs, search permission on
/// every directory on the way), so the caller can read through the agent
/// exactly what it could read itself. FIFOs and devices are refused
/// without blocking.
pub fn open(path: &Path, caller: Option<&Caller>) -> Result<File, FileError> {
    let file = match caller {
        None => open_here(path),
        Some(c) => {
            let (path_buf, c) = (path.to_path_buf(), c.clone());
            // File-system credentials are per thread: a thread of its own
            // takes the caller's, opens, and ends with them.
            std::thread::spawn(move || {
                set_fs_credentials(&c)?;
                open_here(&path_buf)
            })
            .join()
            .map_err(|_| std::io::Error::other("the opening thread panicked"))
            .and_then(|r| r)
        }
    };
    let file = file.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => unusable(path, "does not exist"),
        std::io::ErrorKind::PermissionDenied => unusable(path, "the caller may not read it"),
        _ => FileError::Io {
            path: path.display().to_string(),
            op: "opening",
            source: e,
        },
    })?;
    let meta = file.metadata().map_err(|e| FileError::Io {
        path: path.display().to_string(),
        op: "reading the metadata of",
        source: e,
    })?;
    if !meta.file_type().is_file() {
        return Err(unusable(path, "is not a regular file"));
    }
    Ok(file)
}

fn open_here(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
}

/// Takes `c`'s groups, gid and uid for file-system checks, in this thread
/// only.
fn set_fs_credentials(c: &Caller) -> std::io::Result<()> {
    // SAFETY: the raw system call (not glibc's wrapper, which would change
    // every thread of the process) reads `len` gids from a live slice and
    // changes only the calling thread's supplementary groups.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            c.groups.len() as libc::size_t,
            c.groups.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // setfsgid/setfsuid never fail visibly: they return the previous id.
    // Setting twice and reading back is the documented way to check.
    // SAFETY: plain system calls on integers, affecting this thread only.
    let gid_ok = unsafe {
        libc::setfsgid(c.gid);
        libc::setfsgid(c.gid) == c.gid as libc::c_int
    };
    // SAFETY: as above.
    let uid_ok = unsafe {
        libc::setfsuid(c.uid);
        libc::setfsuid(c.uid) == c.uid as libc::c_int
    };
    if gid_ok && uid_ok {
        Ok(())
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
}

/// What one pass over the file gave.
pub struct Digested {
    /// The digest.
    pub digest: Vec<u8>,
    /// Bytes read.
    pub bytes: u64,
}

/// Hashes the whole of `file` with `hash`. The file must not change
/// while it is read: its size, modification and change times after the
/// last read must be those of before the first.
pub fn digest(mut file: File, path: &Path, hash: HashMethod) -> Result<Digested, FileError> {
    let io = |op: &'static str| {
        move |source| FileError::Io {
            path: path.display().to_string(),
            op,
            source,
        }
    };
    let before = file.metadata().map_err(io("reading the metadata of"))?;
    // SAFETY: advice on an open descriptor; no memory is involved.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            libc::POSIX_FADV_SEQUENTIAL,
        );
    }
    // One thread reads while this one hashes: the copy out of the page
    // cache (or the wait for the disk) overlaps the hash instead of adding
    // to it. Two buffers go round between them.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        empty_tx
            .send(vec![0u8; CHUNK])
            .expect("the receiver is alive");
    }
    let mut hasher = hash.hasher();
    let mut bytes = 0u64;
    let read_result = std::thread::scope(|scope| {
        let file = &mut file;
        let reader = scope.spawn(move || -> std::io::Result<()> {
            while let Ok(mut buf) = empty_rx.recv() {
                let n = loop {
                    match file.read(&mut buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                };
                if n == 0 || full_tx.send((buf, n)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        while let Ok((buf, n)) = full_rx.recv() {
            hasher.update(&buf[..n]);
            bytes += n as u64;
            // The reader may have stopped; a buffer it no longer wants is
            // simply dropped.
            let _ = empty_tx.send(buf);
        }
        drop(empty_tx);
        reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the reading thread panicked")))
    });
    read_result.map_err(io("reading"))?;
    let after = file.metadata().map_err(io("reading the metadata of"))?;
    let stamp = |m: &std::fs::Metadata| {
        (
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    };
    if stamp(&before) != stamp(&after) || bytes != after.size() {
        return Err(unusable(path, "changed while it was read"));
    }
    Ok(Digested {
        digest: hasher.finish(),
        bytes,
    })
}

//! The image file: opened with the credentials of whoever asked (the
//! agent runs as root, its callers do not), only if it is a regular file,
//! then hashed in one pass with a fixed buffer, so memory stays flat in
//! the image size. A file that changes while it is read is refused: the
//! verdict would be about bytes nobody will use.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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
/// without blocking. A caller's path must be absolute (the agent's working
/// directory means nothing to it) and may not pass through a magic link
/// such as `/proc/self/fd/N`, which would name the agent's own files.
pub fn open(path: &Path, caller: Option<&Caller>) -> Result<File, FileError> {
    let file = match caller {
        None => open_here(path),
        Some(_) if !path.is_absolute() => {
            return Err(unusable(path, "is not an absolute path"));
        }
        Some(c) => {
            let (path_buf, c) = (path.to_path_buf(), c.clone());
            // Credentials are per thread in the kernel: a thread of its own
            // takes the caller's, opens, and ends with them.
            std::thread::spawn(move || {
                become_caller(&c)?;
                open_as_caller(&path_buf)
            })
            .join()
            .map_err(|_| std::io::Error::other("the opening thread panicked"))
            .and_then(|r| r)
        }
    };
    let file = file.map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => unusable(path, "does not exist"),
        Some(libc::EACCES | libc::EPERM) => unusable(path, "the caller may not read it"),
        Some(libc::ENOTDIR) => unusable(path, "a component of the path is not a directory"),
        Some(libc::ELOOP) => unusable(path, "too many symbolic links, or a magic link"),
        Some(libc::EXDEV) => unusable(path, "passes through a magic link"),
        Some(libc::ENAMETOOLONG) => unusable(path, "the path is too long"),
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

const OPEN_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

fn open_here(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS)
        .open(path)
}

/// `openat2` without magic links (`/proc/<pid>/fd/N` and the like).
fn open_as_caller(path: &Path) -> std::io::Result<File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::from_bits_truncate(OPEN_FLAGS))
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how)
        .map(File::from)
        .map_err(std::io::Error::from)
}

/// Takes `c`'s groups, gid and uid (real, effective and saved) in this
/// thread only. With every uid not 0 the kernel also clears the thread's
/// capabilities, so nothing of the agent's privilege is left for the open.
/// A failure here is the agent's (missing CAP_SETUID/CAP_SETGID), not the
/// caller's, and says so.
fn become_caller(c: &Caller) -> std::io::Result<()> {
    let failed = |what: &str| {
        let e = std::io::Error::last_os_error();
        std::io::Error::other(format!(
            "cannot take the caller's {what} (uid {}, gid {}): {e}; the agent needs CAP_SETUID and CAP_SETGID",
            c.uid, c.gid
        ))
    };
    // The raw system calls, not glibc's wrappers: those change every
    // thread of the process.
    // SAFETY: setgroups reads `len` gids from a live slice; it changes
    // only the calling thread's supplementary groups.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            c.groups.len() as libc::size_t,
            c.groups.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(failed("groups"));
    }
    // SAFETY: a system call on integers, affecting this thread only.
    if unsafe { libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) } != 0 {
        return Err(failed("gid"));
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) } != 0 {
        return Err(failed("uid"));
    }
    Ok(())
}

/// The name of the thread that reads a file while another hashes it (one
/// per pass over a file, for the process's thread list).
pub const READER_THREAD: &str = "image-read";

/// What one pass over the file gave.
pub struct Digested {
    /// The digest.
    pub digest: Vec<u8>,
    /// Bytes read.
    pub bytes: u64,
}

/// Hashes the whole of `file` with `hash`. The file must not change
/// while it is read: its size, modification and change times after the
/// last read must be those of before the first. Setting `abandon` stops
/// the pass within one chunk (the caller went away, or the agent stops).
pub fn digest(
    mut file: File,
    path: &Path,
    hash: HashMethod,
    abandon: &AtomicBool,
) -> Result<Digested, FileError> {
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
    let mut abandoned = false;
    let read_result = std::thread::scope(|scope| {
        let file = &mut file;
        let reader = std::thread::Builder::new()
            .name(READER_THREAD.into())
            .spawn_scoped(scope, move || -> std::io::Result<()> {
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
            })?;
        while let Ok((buf, n)) = full_rx.recv() {
            if abandon.load(Ordering::Relaxed) {
                // The buffer is dropped and empty_tx below: the reader's
                // next wait for an empty buffer ends it.
                abandoned = true;
                break;
            }
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
    if abandoned {
        return Err(io("reading")(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "abandoned: nobody waits for the verdict any more",
        )));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_over_the_file_stops_once_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![7u8; 3 * CHUNK]).unwrap();
        let digest = |abandon: bool| {
            let f = File::open(&path).unwrap();
            super::digest(f, &path, HashMethod::Sha256, &AtomicBool::new(abandon))
        };
        let whole = digest(false).unwrap();
        assert_eq!(whole.bytes, 3 * CHUNK as u64);
        match digest(true) {
            Err(FileError::Io { op, source, .. }) => {
                assert_eq!(op, "reading");
                assert_eq!(source.kind(), std::io::ErrorKind::Interrupted);
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("an abandoned pass gave a digest"),
        }
    }
}

//! What a caller-given path may be, and opening it without hanging: only
//! block devices (and, where the caller allows them, regular image files)
//! are devices. Character devices, FIFOs, sockets and directories are
//! refused from `stat` alone, before anything opens them: opening a FIFO
//! blocks, opening a tape or terminal has side effects, and `/dev/zero`
//! reads as a blank device of size 0. Every open is non-blocking, runs on
//! a helper thread with a deadline (a device stuck in its driver cannot
//! hold the caller forever), and proves from the open descriptor that it
//! got the file the check saw (a symlink swapped in between is refused).

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// What a path turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A block device.
    Block,
    /// A regular file (an image).
    File,
}

/// Which kinds of file a caller accepts as a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Block devices only (a dm-crypt mapping needs one).
    BlockOnly,
    /// Block devices and regular image files.
    BlockOrFile,
}

/// Why a path cannot be used as a device. Paths are shown with control
/// characters escaped.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Nothing at the path (or a dangling symlink).
    #[error("{path} does not exist")]
    NotFound {
        /// The path.
        path: String,
    },
    /// The path names something that is not a device.
    #[error("{path} is {what}, not a block device{}", if *.files_allowed { " or an image file" } else { "" })]
    NotADevice {
        /// The path.
        path: String,
        /// What it is ("a FIFO", "a character device", ...).
        what: &'static str,
        /// Whether image files would have been accepted.
        files_allowed: bool,
    },
    /// The path itself is not usable (a NUL byte, empty).
    #[error("device path {path} {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The open did not finish in time.
    #[error("opening {path} did not finish within {} ms", .after.as_millis())]
    TimedOut {
        /// The path.
        path: String,
        /// The deadline.
        after: Duration,
    },
    /// What was opened is not what was checked.
    #[error("{path} changed while it was being opened")]
    Changed {
        /// The path.
        path: String,
    },
    /// The OS refused.
    #[error("{op} {path}")]
    Io {
        /// What we did.
        op: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl DeviceError {
    /// Whether the caller named something that cannot be a device (as
    /// opposed to a device that failed).
    pub fn is_unusable(&self) -> bool {
        matches!(
            self,
            DeviceError::NotADevice { .. }
                | DeviceError::InvalidPath { .. }
                | DeviceError::Changed { .. }
        )
    }
}

/// `path` for messages and logs: control characters escaped, so that a
/// hostile name cannot forge lines or terminal sequences.
pub fn shown(path: &Path) -> String {
    crate::text::escape_controls(&path.to_string_lossy())
}

fn what_is(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    Some(if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_block_device() || t.is_file() {
        return None;
    } else {
        "not a regular file"
    })
}

fn kind_of(path: &Path, meta: &Metadata, accept: Accept) -> Result<DeviceKind, DeviceError> {
    let files_allowed = accept == Accept::BlockOrFile;
    let not = |what| DeviceError::NotADevice {
        path: shown(path),
        what,
        files_allowed,
    };
    if let Some(what) = what_is(meta) {
        return Err(not(what));
    }
    if meta.file_type().is_block_device() {
        Ok(DeviceKind::Block)
    } else if files_allowed {
        Ok(DeviceKind::File)
    } else {
        Err(not("a regular file"))
    }
}

/// Checks from `stat` alone (nothing is opened) that `path` names a device
/// the caller accepts; symlinks are followed.
pub fn check_device(path: &Path, accept: Accept) -> Result<(DeviceKind, Metadata), DeviceError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(DeviceError::InvalidPath {
            path: "''".into(),
            reason: "is empty",
        });
    }
    if bytes.contains(&0) {
        return Err(DeviceError::InvalidPath {
            path: shown(path).replace('\0', "\\0"),
            reason: "contains a NUL byte",
        });
    }
    let meta = std::fs::metadata(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            DeviceError::NotFound { path: shown(path) }
        } else {
            DeviceError::Io {
                op: "inspecting",
                path: shown(path),
                source,
            }
        }
    })?;
    Ok((kind_of(path, &meta, accept)?, meta))
}

/// Opens a device the caller accepts, for reading or for reading and
/// writing. Writable block devices are opened `O_EXCL`, so that a mounted
/// or mapped device is refused by the kernel instead of being written
/// under its user. The open runs on a helper thread and gives up after
/// `timeout`; that thread closes whatever it opens late.
pub fn open_device(
    path: &Path,
    writable: bool,
    accept: Accept,
    timeout: Duration,
) -> Result<File, DeviceError> {
    let (kind, checked) = check_device(path, accept)?;
    open_as_checked(path, writable, accept, kind, &checked, timeout)
}

/// Opens `path`, which [`check_device`] found to be `kind` with metadata
/// `checked`, and refuses what the open got unless it is that very file.
fn open_as_checked(
    path: &Path,
    writable: bool,
    accept: Accept,
    kind: DeviceKind,
    checked: &Metadata,
    timeout: Duration,
) -> Result<File, DeviceError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(writable);
    let excl = if writable && kind == DeviceKind::Block {
        libc::O_EXCL
    } else {
        0
    };
    opts.custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY | excl);
    let owned: PathBuf = path.to_path_buf();
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("open-device".into())
        .spawn(move || {
            // A late result has no receiver; the file is then dropped here.
            let _ = tx.send(opts.open(&owned));
        })
        .map_err(|source| DeviceError::Io {
            op: "starting a thread to open",
            path: shown(path),
            source,
        })?;
    let file = match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|source| DeviceError::Io {
            op: "opening",
            path: shown(path),
            source,
        })?,
        Err(_) => {
            return Err(DeviceError::TimedOut {
                path: shown(path),
                after: timeout,
            });
        }
    };
    let opened = file.metadata().map_err(|source| DeviceError::Io {
        op: "inspecting",
        path: shown(path),
        source,
    })?;
    if kind_of(path, &opened, accept)? != kind
        || (opened.dev(), opened.ino(), opened.rdev())
            != (checked.dev(), checked.ino(), checked.rdev())
    {
        return Err(DeviceError::Changed { path: shown(path) });
    }
    set_blocking(&file).map_err(|source| DeviceError::Io {
        op: "configuring",
        path: shown(path),
        source,
    })?;
    Ok(file)
}

/// Clears `O_NONBLOCK`, which only served the open: I/O on the device is
/// ordinary blocking I/O.
fn set_blocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of `fd`,
    // which `file` keeps open for the duration of both calls.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The size of the device at `path` in bytes without opening it: a
/// regular file's length, or a block device's size from sysfs (the kernel
/// counts it in 512-byte sectors whatever the logical block size).
pub fn size_without_opening(path: &Path, accept: Accept) -> Result<u64, DeviceError> {
    let (kind, meta) = check_device(path, accept)?;
    if kind == DeviceKind::File {
        return Ok(meta.len());
    }
    let rdev = meta.rdev();
    let sys = format!(
        "/sys/dev/block/{}:{}/size",
        libc::major(rdev),
        libc::minor(rdev)
    );
    let io = |source| DeviceError::Io {
        op: "reading the size of",
        path: shown(path),
        source,
    };
    let text = std::fs::read_to_string(&sys).map_err(io)?;
    let sectors: u64 = text.trim().parse().map_err(|_| {
        io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{sys}: {text:?}"),
        ))
    })?;
    Ok(sectors.saturating_mul(512))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;
    use std::time::Instant;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn char_devices_fifos_sockets_and_directories_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (path, what) in [
            (PathBuf::from("/dev/null"), "a character device"),
            (PathBuf::from("/dev/zero"), "a character device"),
            (fifo, "a FIFO"),
            (sock, "a socket"),
            (dir.path().to_path_buf(), "a directory"),
        ] {
            let started = Instant::now();
            for writable in [false, true] {
                let e = open_device(&path, writable, Accept::BlockOrFile, T).unwrap_err();
                let text = e.to_string();
                assert!(
                    matches!(e, DeviceError::NotADevice { .. }) && text.contains(what),
                    "{}: {text}",
                    path.display()
                );
                assert!(text.contains(&path.display().to_string()), "{text}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn image_files_only_where_accepted() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        open_device(f.path(), true, Accept::BlockOrFile, T).unwrap();
        let e = open_device(f.path(), true, Accept::BlockOnly, T).unwrap_err();
        assert!(
            e.to_string()
                .contains("is a regular file, not a block device"),
            "{e}"
        );
        assert_eq!(
            size_without_opening(f.path(), Accept::BlockOrFile).unwrap(),
            4096
        );
    }

    #[test]
    fn nul_bytes_and_control_characters_in_paths() {
        let p = PathBuf::from(std::ffi::OsString::from_vec(b"/dev/a\0b".to_vec()));
        let e = check_device(&p, Accept::BlockOrFile).unwrap_err();
        assert!(matches!(e, DeviceError::InvalidPath { .. }), "{e}");
        assert!(e.to_string().contains("NUL"), "{e}");
        let p = PathBuf::from("/nonexistent/x\n2026-01-01 INFO outcome=ok\x1b[2J");
        let e = check_device(&p, Accept::BlockOrFile).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, DeviceError::NotFound { .. }), "{text}");
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.contains("x\\n2026"), "{text}");
    }

    #[test]
    fn a_path_swapped_after_the_check_is_refused() {
        // The check saw one file; by the time of the open the link leads
        // to another (a symlink repointed in between).
        let dir = tempfile::tempdir().unwrap();
        let (a, b, link) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("link"),
        );
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let (kind, checked) = check_device(&link, Accept::BlockOrFile).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&b, &link).unwrap();
        let e = open_as_checked(&link, true, Accept::BlockOrFile, kind, &checked, T).unwrap_err();
        assert!(matches!(e, DeviceError::Changed { .. }), "{e}");
        // Unchanged, the same call opens it.
        let (kind, checked) = check_device(&link, Accept::BlockOrFile).unwrap();
        open_as_checked(&link, true, Accept::BlockOrFile, kind, &checked, T).unwrap();
    }
}

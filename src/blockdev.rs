//! Opening block devices and image files, and finding their size.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens a device or image for reading, or reading and writing. Block
/// devices are opened with `O_EXCL` when writable so that a mounted or
/// mapped device is refused by the kernel instead of being written under
/// its user.
pub fn open(path: &Path, writable: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(writable);
    let is_block = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    opts.custom_flags(
        libc::O_CLOEXEC
            | if writable && is_block {
                libc::O_EXCL
            } else {
                0
            },
    );
    opts.open(path)
}

/// Size in bytes of a regular file or block device.
pub fn size_of(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // Seeking to the end is how the kernel reports a block device's size
        // without an ioctl; `&File` implements `Seek` and the engine only
        // uses positioned I/O, so moving the cursor is harmless.
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

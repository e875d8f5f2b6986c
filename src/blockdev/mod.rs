//! Block devices and image files: what a path may be and opening it
//! (`device`), sizes, zeroing, signature probing, loop devices.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;

pub mod device;
pub mod disk;
pub mod loopdev;
pub mod probe;

pub use device::{
    Accept, DeviceError, DeviceKind, check_device, open_device, size_without_opening,
};

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

/// `BLKZEROOUT` from `<linux/fs.h>`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Asks the kernel to make `len` bytes at `offset` read as zeros cheaply:
/// `BLKZEROOUT` on a block device (write-zeroes or unmap on the device,
/// else the kernel writes zeros itself), `FALLOC_FL_ZERO_RANGE` on a file.
/// `Ok(false)` when neither is available; the caller writes zeros then.
pub fn try_zero_range(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(true);
    }
    let fd = file.as_raw_fd();
    let is_block = file.metadata()?.file_type().is_block_device();
    let done = if is_block {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads a `[u64; 2]` (start, length) from the
        // pointer, which points to a live local array of that type.
        unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) == 0 }
    } else {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: fallocate only takes integers; `fd` is open for the
        // lifetime of `file`.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            ) == 0
        }
    };
    Ok(done)
}

/// `BLKPBSZGET` from `<linux/fs.h>`: `_IO(0x12, 123)`.
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// The LUKS2 encryption sector size cryptsetup picks for a new volume when
/// none is given: 4096 for an image file; for a block device its physical
/// block size when that is a power of two from 512 to 4096, else 512.
pub fn default_encryption_sector_size(file: &File) -> u32 {
    use std::os::fd::AsRawFd;
    let Ok(meta) = file.metadata() else {
        return 512;
    };
    if meta.file_type().is_file() {
        return 4096;
    }
    if !meta.file_type().is_block_device() {
        return 512;
    }
    let mut size: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one `unsigned int` through the pointer,
    // which points to a live local of that type.
    let ok =
        unsafe { libc::ioctl(file.as_raw_fd(), BLKPBSZGET, &mut size as *mut libc::c_uint) == 0 };
    match size {
        512 | 1024 | 2048 | 4096 if ok => size,
        _ => 512,
    }
}

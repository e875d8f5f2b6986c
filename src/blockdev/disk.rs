//! What the LUKS engine needs from a device: positioned reads and writes,
//! its size and a flush. Implemented for files and block devices, and for
//! memory (fuzzing and crash-injection tests).

use std::cell::{OnceCell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};

use zeroize::Zeroize;

/// A device holding (or about to hold) a LUKS volume.
pub trait Disk {
    /// Name used in error messages (the device path).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; a short device is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` as few large device writes rather
    /// than page by page (keyslot areas: hundreds of kilobytes). What is
    /// durable after a crash is then a few large writes in any order, not
    /// hundreds of pages. The default is [`write_at`](Self::write_at).
    fn write_bulk_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Makes written data durable.
    fn sync(&self) -> io::Result<()>;
    /// Makes a range read as zeros. The default writes zeros; devices that
    /// can do it cheaper (files, block devices with write-zeroes) override.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
}

/// Writes `len` zero bytes at `offset`, a megabyte at a time.
fn write_zeros(disk: &(impl Disk + ?Sized), offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        disk.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A file or block device.
pub struct FileDisk {
    file: File,
    name: String,
    /// For block devices: the same device opened again with `O_DIRECT`,
    /// and its logical block size (opened at the first bulk write; `None`
    /// when it is not a block device or cannot be opened so).
    direct: OnceCell<Option<(File, usize)>>,
}

/// `BLKSSZGET` from `<linux/fs.h>`: `_IO(0x12, 104)`, the logical block
/// size, the alignment `O_DIRECT` needs.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Largest single direct write: the kernel splits bios at 1 MiB anyway.
const DIRECT_CHUNK: usize = 1 << 20;

/// Buffer alignment for direct I/O (covers every logical block size).
const DIRECT_ALIGN: usize = 4096;

impl FileDisk {
    /// Wraps an open file; `name` is what errors will call it.
    pub fn new(file: File, name: impl Into<String>) -> Self {
        FileDisk {
            file,
            name: name.into(),
            direct: OnceCell::new(),
        }
    }

    /// The `O_DIRECT` handle of a block device. Reopened through
    /// `/proc/self/fd`, which names this open file, never a path that
    /// could lead elsewhere by now.
    fn direct(&self) -> Option<&(File, usize)> {
        self.direct
            .get_or_init(|| {
                let meta = self.file.metadata().ok()?;
                if !meta.file_type().is_block_device() {
                    return None;
                }
                let mut lbs: libc::c_int = 0;
                // SAFETY: BLKSSZGET writes one `int` through the pointer,
                // which points to a live local of that type; the fd is open
                // for the lifetime of `self.file`.
                let ok = unsafe {
                    libc::ioctl(
                        self.file.as_raw_fd(),
                        BLKSSZGET,
                        &mut lbs as *mut libc::c_int,
                    )
                } == 0;
                let lbs = usize::try_from(lbs)
                    .ok()
                    .filter(|b| ok && (512..=DIRECT_ALIGN).contains(b) && b.is_power_of_two())?;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                    .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                    .ok()?;
                Some((file, lbs))
            })
            .as_ref()
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Disk for FileDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> io::Result<u64> {
        super::size_of(&self.file)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn write_bulk_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some((direct, lbs)) = self.direct() else {
            return self.write_at(buf, offset);
        };
        if buf.is_empty() || !offset.is_multiple_of(*lbs as u64) || !buf.len().is_multiple_of(*lbs)
        {
            return self.write_at(buf, offset);
        }
        // An aligned bounce buffer (the caller's may be anywhere), wiped
        // after use: keyslot material passes through it.
        let mut bounce = vec![0u8; DIRECT_CHUNK.min(buf.len()) + DIRECT_ALIGN];
        let start = bounce.as_ptr().align_offset(DIRECT_ALIGN);
        let mut result = Ok(());
        for (i, chunk) in buf.chunks(DIRECT_CHUNK).enumerate() {
            let aligned = &mut bounce[start..start + chunk.len()];
            aligned.copy_from_slice(chunk);
            let at = offset + (i * DIRECT_CHUNK) as u64;
            result = direct.write_all_at(aligned, at).or_else(|e| {
                // A device that takes no direct I/O after all: the same
                // bytes through the page cache.
                if e.raw_os_error() == Some(libc::EINVAL) {
                    self.write_at(chunk, at)
                } else {
                    Err(e)
                }
            });
            if result.is_err() {
                break;
            }
        }
        bounce.zeroize();
        result
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if super::try_zero_range(&self.file, offset, len)? {
            return Ok(());
        }
        write_zeros(self, offset, len)
    }
}

/// A device in memory. Writes past the end fail, as on a block device.
pub struct MemDisk {
    name: String,
    bytes: RefCell<Vec<u8>>,
}

impl MemDisk {
    /// A device holding `bytes`.
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        MemDisk {
            name: name.into(),
            bytes: RefCell::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.borrow().clone()
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "access beyond the end of the device",
    )
}

fn range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(len).ok_or_else(out_of_range)?;
    if end > size {
        return Err(out_of_range());
    }
    Ok(start..end)
}

impl Disk for MemDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.borrow().len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.borrow();
        let r = range(offset, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.borrow_mut();
        let r = range(offset, buf.len(), bytes.len())?;
        bytes[r].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

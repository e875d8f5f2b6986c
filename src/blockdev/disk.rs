//! What the LUKS engine needs from a device: positioned reads and writes,
//! its size and a flush. Implemented for files and block devices, and for
//! memory (fuzzing and crash-injection tests).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
}

impl FileDisk {
    /// Wraps an open file; `name` is what errors will call it.
    pub fn new(file: File, name: impl Into<String>) -> Self {
        FileDisk {
            file,
            name: name.into(),
        }
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

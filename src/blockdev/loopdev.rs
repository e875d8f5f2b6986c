//! Loop devices over image files, for tests and the demo: real block
//! devices (with `O_EXCL`, sizes through seeking, `BLKZEROOUT`) without
//! real disks. Needs root and the loop driver.
//!
//! A [`LoopDevice`] is attached with `LO_FLAGS_AUTOCLEAR` and keeps the
//! device open while it lives; it is detached when dropped, including when
//! a test panics and unwinds, and the autoclear flag makes the kernel
//! detach it even if the process dies without unwinding (as soon as the
//! last user closes the device).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;

/// `LO_FLAGS_READ_ONLY` from `<linux/loop.h>`.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR` from `<linux/loop.h>`: detach on last close.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (Linux 5.8 and later).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// The loop ioctls predate `_IOC` numbering, hence the `_bad` variants.
mod ioctls {
    nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
    nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
    nix::ioctl_write_ptr_bad!(loop_set_status64, 0x4C04, super::LoopInfo64);
    nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, super::LoopConfig);
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
}

/// How many times a free device is looked for before giving up; each
/// failure means another process (or test thread) bound the device that
/// `LOOP_CTL_GET_FREE` had just offered.
const ATTEMPTS: u32 = 64;

/// How long [`LoopDevice::detach`] waits for the kernel to let go.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// Which ioctls bind the backing file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `LOOP_CONFIGURE`, falling back to the legacy pair on kernels that
    /// do not know it.
    Configure,
    /// `LOOP_SET_FD` then `LOOP_SET_STATUS64`.
    Legacy,
}

/// An attached loop device. Detached on drop.
pub struct LoopDevice {
    /// The open device; `None` once detached.
    dev: Option<File>,
    number: u32,
    path: PathBuf,
    backing: PathBuf,
    /// The backing file was created by [`LoopDevice::with_sparse_file`]
    /// and is removed on drop.
    owns_backing: bool,
}

impl std::fmt::Debug for LoopDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopDevice")
            .field("path", &self.path)
            .field("backing", &self.backing)
            .field("attached", &self.dev.is_some())
            .finish()
    }
}

impl LoopDevice {
    /// Attaches `backing` (opened read-write) to a free loop device.
    pub fn attach(backing: &Path) -> io::Result<LoopDevice> {
        Self::attach_with(backing, false, Method::Configure)
    }

    /// Attaches `backing` read-only.
    pub fn attach_read_only(backing: &Path) -> io::Result<LoopDevice> {
        Self::attach_with(backing, true, Method::Configure)
    }

    /// Attaches with the pre-5.8 ioctls (`LOOP_SET_FD` and
    /// `LOOP_SET_STATUS64`) even where `LOOP_CONFIGURE` exists, so that
    /// tests can exercise the fallback.
    #[doc(hidden)]
    pub fn attach_legacy(backing: &Path) -> io::Result<LoopDevice> {
        Self::attach_with(backing, false, Method::Legacy)
    }

    /// Creates a sparse file of `size` bytes in `dir` and attaches it. The
    /// file is removed when the device is dropped.
    pub fn with_sparse_file(dir: &Path, size: u64) -> io::Result<LoopDevice> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("loop-{}-{seq}.img", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        let attached = file.set_len(size).and_then(|()| {
            drop(file);
            Self::attach(&path)
        });
        match attached {
            Ok(mut dev) => {
                dev.owns_backing = true;
                Ok(dev)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn attach_with(backing: &Path, read_only: bool, method: Method) -> io::Result<LoopDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(backing)?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(|e| with_context(e, "cannot open /dev/loop-control"))?;
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        };
        // Informational only (sysfs shows the real path); truncated like
        // losetup does, keeping the terminating NUL.
        let name = backing.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);

        let mut last_err = None;
        for attempt in 0..ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; `ctl` is an open
            // descriptor of /dev/loop-control for the whole call.
            let number = unsafe { ioctls::loop_ctl_get_free(ctl.as_raw_fd()) }
                .map_err(|e| with_context(e.into(), "LOOP_CTL_GET_FREE failed"))?;
            let number = u32::try_from(number).map_err(|_| io::Error::other("bad loop number"))?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let dev = match OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(dev) => dev,
                // The node may not be there yet, or the device was removed
                // again by someone else: ask for another.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => {
                    last_err = Some(e);
                    backoff(attempt);
                    continue;
                }
                Err(e) => return Err(with_context(e, &format!("cannot open {}", path.display()))),
            };
            match bind(&dev, &file, &info, method) {
                Ok(()) => {
                    return Ok(LoopDevice {
                        dev: Some(dev),
                        number,
                        path,
                        backing: backing.to_path_buf(),
                        owns_backing: false,
                    });
                }
                // Someone else bound it between GET_FREE and our ioctl.
                Err(Errno::EBUSY) => {
                    last_err = Some(Errno::EBUSY.into());
                    backoff(attempt);
                }
                Err(e) => {
                    return Err(with_context(
                        e.into(),
                        &format!("cannot attach {} to {}", backing.display(), path.display()),
                    ));
                }
            }
        }
        Err(with_context(
            last_err.unwrap_or_else(|| Errno::EBUSY.into()),
            &format!("no free loop device after {ATTEMPTS} attempts"),
        ))
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The file the device was attached to, as given.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// The device's sysfs directory, `/sys/block/loopN`; its
    /// `loop/backing_file` exists only while the device is attached.
    pub fn sys_dir(&self) -> PathBuf {
        sys_dir(self.number)
    }

    /// Detaches the device and waits (up to 10 s) until the kernel has let
    /// go of the backing file. An error means another process still holds
    /// the device open; thanks to autoclear it is detached when that
    /// process closes it.
    pub fn detach(mut self) -> io::Result<()> {
        self.release()?;
        let backing = sys_dir(self.number).join("loop/backing_file");
        let deadline = Instant::now() + DETACH_WAIT;
        while backing.exists() {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{} is still attached: another process holds it open",
                        self.path.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Clears the device and closes it: with autoclear, closing the last
    /// descriptor is what detaches it.
    fn release(&mut self) -> io::Result<()> {
        let Some(dev) = self.dev.take() else {
            return Ok(());
        };
        // SAFETY: LOOP_CLR_FD takes no argument; `dev` is open for the
        // whole call.
        let cleared = unsafe { ioctls::loop_clr_fd(dev.as_raw_fd()) };
        drop(dev);
        match cleared {
            // ENXIO: no longer bound, which is the goal.
            Ok(_) | Err(Errno::ENXIO) => Ok(()),
            Err(e) => Err(with_context(
                e.into(),
                &format!("LOOP_CLR_FD on {} failed", self.path.display()),
            )),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.release();
        if self.owns_backing {
            let _ = std::fs::remove_file(&self.backing);
        }
    }
}

fn sys_dir(number: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{number}"))
}

/// Binds `file` to the open loop device `dev`.
fn bind(dev: &File, file: &File, info: &LoopInfo64, method: Method) -> Result<(), Errno> {
    let fd = file.as_raw_fd();
    if method == Method::Configure {
        let config = LoopConfig {
            fd: u32::try_from(fd).map_err(|_| Errno::EBADF)?,
            block_size: 0,
            info: *info,
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which
        // `LoopConfig` mirrors (size checked above); the pointer is to a
        // live local, and both descriptors are open for the whole call.
        match unsafe { ioctls::loop_configure(dev.as_raw_fd(), &config) } {
            Ok(_) => return Ok(()),
            // Kernels before 5.8 do not know LOOP_CONFIGURE.
            Err(Errno::EINVAL | Errno::ENOTTY) => {}
            Err(e) => return Err(e),
        }
    }
    // SAFETY: LOOP_SET_FD takes the backing file's descriptor as its
    // integer argument; both descriptors are open for the whole call.
    unsafe { ioctls::loop_set_fd(dev.as_raw_fd(), fd) }?;
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, which
    // `LoopInfo64` mirrors (size checked above); `info` is a live reference.
    if let Err(e) = unsafe { ioctls::loop_set_status64(dev.as_raw_fd(), info) } {
        // SAFETY: LOOP_CLR_FD takes no argument; `dev` is open.
        let _ = unsafe { ioctls::loop_clr_fd(dev.as_raw_fd()) };
        return Err(e);
    }
    Ok(())
}

/// A short, growing pause so that racing attachers spread out.
fn backoff(attempt: u32) {
    let jitter = u64::from(std::process::id() % 7) + u64::from(attempt % 5);
    std::thread::sleep(Duration::from_millis(
        1 + u64::from(attempt.min(20)) + jitter,
    ));
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

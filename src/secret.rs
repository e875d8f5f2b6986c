//! Key material containers: fixed-size, memory-locked where the OS allows,
//! zeroized on drop, and never printed.
//!
//! Every byte of a passphrase or volume key in this crate lives in a
//! [`SecretBytes`]. The buffer is allocated once at its final size (a `Vec`
//! that grows would leave stale copies behind in freed memory), locked with
//! `mlock(2)` so it is not swapped out, and wiped before it is freed.
//! [`forbid_core_dumps`] keeps the rest of the process's memory (TLS and
//! HTTP buffers that held a key on its way in) out of core dumps.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::{Mutex, OnceLock};

use zeroize::Zeroize;

/// Largest passphrase accepted from a key file or stdin. cryptsetup's own
/// default is 8 MiB; passphrases handed to us are hex keys of a few dozen
/// bytes, so anything beyond this bound is a mistake, not a key.
pub const MAX_PASSPHRASE_LEN: usize = 64 * 1024;

/// A heap buffer of secret bytes that is locked in memory and zeroized on
/// drop. `Debug` prints only the length.
pub struct SecretBytes {
    buf: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes, locked in memory when possible.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len].into_boxed_slice();
        let locked = lock_memory(&buf);
        SecretBytes { buf, locked }
    }

    /// Copies `bytes` into a new locked buffer. The caller remains
    /// responsible for wiping its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut s = Self::zeroed(bytes.len());
        s.buf.copy_from_slice(bytes);
        s
    }

    /// A secret filled from the operating system's random number generator.
    pub fn random(len: usize) -> Result<Self, getrandom::Error> {
        let mut s = Self::zeroed(len);
        getrandom::fill(&mut s.buf)?;
        Ok(s)
    }

    /// Reads a whole stream (a key file or stdin) as a secret, without
    /// stripping anything, the way `cryptsetup --key-file` does. Returns
    /// `Ok(None)` when the input exceeds `MAX_PASSPHRASE_LEN`.
    pub fn read_all(mut reader: impl Read) -> std::io::Result<Option<Self>> {
        let mut staging = SecretCollector::new(MAX_PASSPHRASE_LEN);
        loop {
            let Some(room) = staging.room() else {
                return Ok(None);
            };
            match reader.read(room) {
                Ok(0) => break,
                Ok(n) => staging.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(staging.finish()))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.buf
    }

    /// The secret bytes, writable (used to fill a buffer in place).
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when the secret holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Whether `mlock` succeeded for this buffer.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Lowercase hex of the bytes, itself a secret. This is how os-brick and
    /// nova turn a key manager's symmetric key into a LUKS passphrase.
    pub fn to_hex(&self) -> SecretBytes {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Self::zeroed(self.buf.len() * 2);
        for (i, b) in self.buf.iter().enumerate() {
            out.buf[2 * i] = DIGITS[usize::from(b >> 4)];
            out.buf[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
        }
        out
    }
}

/// Secret bytes of a length not known in advance (a key file, a key
/// manager's answer), collected up to `max` bytes. Keys are a few dozen
/// bytes, so it starts small and doubles: each move goes into a new locked
/// buffer and the old one is wiped as it is dropped, so no copy is left
/// behind.
pub struct SecretCollector {
    buf: SecretBytes,
    len: usize,
    max: usize,
}

impl SecretCollector {
    const FIRST_CAPACITY: usize = 256;

    /// An empty collector that accepts at most `max` bytes.
    pub fn new(max: usize) -> Self {
        SecretCollector {
            buf: SecretBytes::zeroed(Self::FIRST_CAPACITY.min(max.saturating_add(1))),
            len: 0,
            max,
        }
    }

    /// Makes room for `extra` more bytes, up to one byte past `max` (so a
    /// reader can show that its input is too long).
    fn reserve(&mut self, extra: usize) {
        let need = self
            .len
            .saturating_add(extra)
            .min(self.max.saturating_add(1));
        if need <= self.buf.len() {
            return;
        }
        let cap = need
            .max(self.buf.len().saturating_mul(2))
            .min(self.max.saturating_add(1));
        let mut bigger = SecretBytes::zeroed(cap);
        bigger.buf[..self.len].copy_from_slice(&self.buf.buf[..self.len]);
        self.buf = bigger;
    }

    /// Appends `bytes`; `false`, with nothing appended, when the total
    /// would exceed `max`.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.len.saturating_add(bytes.len()) > self.max {
            return false;
        }
        self.reserve(bytes.len());
        self.buf.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        true
    }

    /// Space to read into, grown first when full; `None` once more than
    /// `max` bytes have been read. Follow a read with [`Self::advance`].
    pub fn room(&mut self) -> Option<&mut [u8]> {
        if self.len > self.max {
            return None;
        }
        self.reserve(1);
        Some(&mut self.buf.buf[self.len..])
    }

    /// Counts `n` bytes read into [`Self::room`].
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.buf.len());
    }

    /// The bytes collected, in a buffer of exactly their length.
    pub fn finish(self) -> SecretBytes {
        SecretBytes::from_slice(&self.buf.buf[..self.len])
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.buf.zeroize();
        if self.locked {
            unlock_memory(&self.buf);
        }
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::from_slice(&self.buf)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.buf.len())
    }
}

/// A LUKS passphrase (for volumes attached from a key manager: the hex of
/// the key).
#[derive(Clone)]
pub struct Passphrase(SecretBytes);

impl Passphrase {
    /// Wraps secret bytes as a passphrase.
    pub fn new(bytes: SecretBytes) -> Self {
        Passphrase(bytes)
    }

    /// Copies a byte slice into a passphrase (tests and fixed inputs).
    pub fn from_slice(bytes: &[u8]) -> Self {
        Passphrase(SecretBytes::from_slice(bytes))
    }

    /// The passphrase bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// True when the passphrase is the lowercase hex form of a key of at
    /// least 128 bits: the only shape for which the minimal KDF is safe,
    /// because the entropy is then that of the key manager's random key.
    pub fn is_high_entropy_hex(&self) -> bool {
        let p = self.expose();
        p.len() >= 32
            && p.len().is_multiple_of(2)
            && p.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([REDACTED])")
    }
}

/// The master key of a LUKS volume: what dm-crypt or QEMU encrypts data with.
#[derive(Clone)]
pub struct VolumeKey(SecretBytes);

impl VolumeKey {
    /// Wraps secret bytes as a volume key.
    pub fn new(bytes: SecretBytes) -> Self {
        VolumeKey(bytes)
    }

    /// The key bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty key (never valid).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Lowercase hex of the key, for `--dump-volume-key` only.
    pub fn to_hex(&self) -> SecretBytes {
        self.0.to_hex()
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeKey([REDACTED; {} bytes])", self.len())
    }
}

/// Makes the process non-dumpable (`PR_SET_DUMPABLE` 0), as ssh-agent
/// does: a crash writes no core dump, so the key material that passed
/// through buffers this crate does not own (TLS records, HTTP bodies,
/// JSON) never reaches a file, and users other than root cannot attach a
/// debugger. Called first thing by the binary.
pub fn forbid_core_dumps() -> nix::Result<()> {
    nix::sys::prctl::set_dumpable(false)
}

/// How many live secrets use each locked page, by page number.
/// `mlock` does not nest: a single `munlock` unlocks a page for every
/// secret on it, so small secrets that share a heap page keep it locked
/// until the last of them is dropped.
static LOCKED_PAGES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions and reads no memory of ours.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// The page numbers `[first, end)` that `buf` touches.
fn pages_of(buf: &[u8]) -> (usize, usize) {
    let page = page_size();
    let start = buf.as_ptr() as usize;
    (start / page, (start + buf.len()).div_ceil(page))
}

fn locked_pages() -> std::sync::MutexGuard<'static, BTreeMap<usize, usize>> {
    // The map holds only counters; one left by a panicking thread is
    // still consistent.
    LOCKED_PAGES.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock_memory(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return false;
    }
    let (first, end) = pages_of(buf);
    let mut pages = locked_pages();
    if (first..end).any(|p| !pages.contains_key(&p)) {
        // Pages already locked for another secret are locked again, which
        // is harmless and keeps this to one call.
        // SAFETY: mlock only reads the address range, which is a live
        // allocation of exactly `buf.len()` bytes owned by the caller.
        if unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) } != 0 {
            return false;
        }
    }
    for p in first..end {
        *pages.entry(p).or_insert(0) += 1;
    }
    true
}

/// Releases `buf`'s hold on its pages and unlocks those no other secret
/// holds. Only for a buffer that `lock_memory` locked.
fn unlock_memory(buf: &[u8]) {
    let (first, end) = pages_of(buf);
    let page = page_size();
    // The map stays held until the munlock calls are done, so no other
    // secret can take one of these pages in between.
    let mut pages = locked_pages();
    let unused: Vec<usize> = (first..end)
        .filter(|p| match pages.get_mut(p) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                pages.remove(p);
                true
            }
            None => false,
        })
        .collect();
    for run in unused.chunk_by(|a, b| *b == a + 1) {
        munlock_pages(run[0] * page, run.len() * page);
    }
}

fn munlock_pages(addr: usize, len: usize) {
    // SAFETY: the pages belong to a live allocation that was locked and
    // that no other secret still uses; munlock does not touch their
    // contents.
    unsafe {
        libc::munlock(addr as *const libc::c_void, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let s = SecretBytes::from_slice(b"topsecret");
        let p = Passphrase::from_slice(b"topsecret");
        let k = VolumeKey::new(SecretBytes::from_slice(&[0xab; 32]));
        for text in [format!("{s:?}"), format!("{p:?}"), format!("{k:?}")] {
            assert!(!text.contains("topsecret"), "{text}");
            assert!(!text.contains("ab"), "{text}");
            assert!(text.contains("REDACTED"), "{text}");
        }
    }

    #[test]
    fn hex_matches_os_brick() {
        // os-brick: binascii.hexlify(key).decode('utf-8')
        let k = SecretBytes::from_slice(&[0x00, 0x0f, 0xa5, 0xff]);
        assert_eq!(k.to_hex().expose(), b"000fa5ff");
    }

    #[test]
    fn read_all_keeps_newlines_and_bounds_size() {
        let s = SecretBytes::read_all(&b"abc\n"[..]).unwrap().unwrap();
        assert_eq!(s.expose(), b"abc\n");
        let big = vec![b'x'; MAX_PASSPHRASE_LEN + 1];
        assert!(SecretBytes::read_all(&big[..]).unwrap().is_none());
        let max = vec![b'x'; MAX_PASSPHRASE_LEN];
        assert_eq!(
            SecretBytes::read_all(&max[..]).unwrap().unwrap().len(),
            MAX_PASSPHRASE_LEN
        );
    }

    #[test]
    fn the_collector_grows_without_losing_bytes_and_keeps_its_bound() {
        let input: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        // One byte per read: every doubling happens on the way.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let Some((first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                out[0] = *first;
                self.0 = rest;
                Ok(1)
            }
        }
        let read = SecretBytes::read_all(Trickle(&input)).unwrap().unwrap();
        assert_eq!(read.expose(), &input[..]);
        assert!(read.is_locked());

        let mut c = SecretCollector::new(1000);
        assert!(c.push(&input[..600]));
        assert!(
            !c.push(&input[600..1001]),
            "1001 bytes accepted with max 1000"
        );
        assert!(c.push(&input[600..1000]));
        assert!(!c.push(&input[..1]));
        assert_eq!(c.finish().expose(), &input[..1000]);
    }

    #[test]
    fn high_entropy_hex_shape() {
        assert!(Passphrase::from_slice(&[b'a'; 64]).is_high_entropy_hex());
        assert!(!Passphrase::from_slice(&[b'a'; 30]).is_high_entropy_hex());
        assert!(!Passphrase::from_slice(&[b'A'; 64]).is_high_entropy_hex());
        assert!(
            !Passphrase::from_slice(b"correct horse battery staple 1234").is_high_entropy_hex()
        );
    }

    #[test]
    fn small_secrets_are_locked() {
        // RLIMIT_MEMLOCK is at least 64 KiB on Linux, so a small key locks.
        let s = SecretBytes::zeroed(64);
        assert!(s.is_locked());
        assert!(page_is_locked(s.expose().as_ptr() as usize));
    }

    /// Whether the kernel has the page holding `addr` locked: the
    /// `VmFlags` of its mapping in /proc/self/smaps include `lo`.
    fn page_is_locked(addr: usize) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = head.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().any(|f| f == "lo");
            }
        }
        panic!("{addr:#x} is in no mapping of /proc/self/smaps");
    }

    #[test]
    fn a_shared_page_stays_locked_until_its_last_secret_goes() {
        let page = page_size();
        // Three pages of our own hold one whole page that no other
        // allocation (another test's secret) can share.
        let backing = vec![0u8; 3 * page];
        let base = backing.as_ptr() as usize;
        let at = base.next_multiple_of(page) - base;
        let (a, b) = (&backing[at..at + 32], &backing[at + 64..at + 96]);
        let (c, d) = (
            &backing[at + page - 16..at + page + 16],
            &backing[at + page + 64..at + page + 96],
        );
        assert!(lock_memory(a) && lock_memory(b) && lock_memory(c) && lock_memory(d));
        let (p1, p2) = (base + at, base + at + page);
        assert!(page_is_locked(p1) && page_is_locked(p2));
        unlock_memory(a);
        assert!(
            page_is_locked(p1),
            "dropping one secret unlocked the page of another"
        );
        unlock_memory(c);
        assert!(
            page_is_locked(p1) && page_is_locked(p2),
            "a straddling secret's unlock took its neighbours' pages"
        );
        unlock_memory(b);
        assert!(
            !page_is_locked(p1),
            "the page stayed locked after its last secret"
        );
        assert!(page_is_locked(p2));
        unlock_memory(d);
        assert!(!page_is_locked(p2));
    }
}

//! Shared helpers of the fuzz targets: disk images built from fuzz input,
//! LUKS2 checksum repair (so that mutations reach the JSON parser instead
//! of stopping at the checksum), the KDF limits used while fuzzing, and the
//! reference images the `unlock` target mutates.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;

use luks_agent::luks::luks2::{ALLOWED_HDR_SIZES, BINARY_LEN, MAGIC_PRIMARY, MAGIC_SECONDARY};
use luks_agent::luks::{
    self, Argon2Variant, Disk, FormatOptions, HashAlg, Header, Kdf, KdfLimits, KdfPolicy,
    LuksVersion, MemDisk,
};
use luks_agent::secret::Passphrase;
use sha2::{Digest as _, Sha256};

/// Largest fuzz input used: the first 64 KiB of a device hold a LUKS1
/// header and LUKS2 headers of up to 32 KiB with both copies.
pub const MAX_INPUT: usize = 64 * 1024;

/// Size of the padded device the input is placed at the start of: the
/// 16 MiB data offset of cryptsetup's default LUKS2 layout plus a data
/// sector, which also leaves room for a secondary LUKS2 header at the
/// largest allowed offset (4 MiB) and for the keyslot areas of any LUKS1
/// header with keys of up to 512 bits.
pub const PADDED_DISK: u64 = 16 * 1024 * 1024 + 4096;

/// Byte offset of the checksum in a LUKS2 binary header.
const CSUM_AT: usize = 448;

/// Passphrase of the reference images.
pub const PASSPHRASE: &[u8] = b"fuzz-passphrase";
/// A passphrase no reference image accepts.
pub const WRONG_PASSPHRASE: &[u8] = b"fuzz-passphrasf";

/// Small KDF limits: a hostile header must not make one iteration slow.
/// The reference images use pbkdf2 with 1000 iterations and Argon2id with
/// time 4, 64 KiB, 1 lane, all within these.
pub const LIMITS: KdfLimits = KdfLimits {
    max_pbkdf2_iterations: 2000,
    max_argon2_memory_kib: 64,
    max_argon2_time: 4,
    max_argon2_parallel: 1,
    // The run-time estimate is checked too, so it is fuzzed with the rest.
    max_time: Some(std::time::Duration::from_secs(1)),
};

/// A read-only device of `size` bytes that holds `head` at offset 0,
/// `tail` at its very end and zeros everywhere else. Behaves as a padded
/// `MemDisk` without allocating and copying megabytes (or terabytes) for
/// every input, and counts the bytes read from it.
pub struct PaddedDisk<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    size: u64,
    bytes_read: Cell<u64>,
}

impl<'a> PaddedDisk<'a> {
    /// `head` followed by zeros up to `size` bytes (at least `head.len()`).
    pub fn new(head: &'a [u8], size: u64) -> Self {
        Self::with_tail(head, &[], size)
    }

    /// `head`, zeros, then `tail` ending at `size` (at least the length of
    /// both; where they would overlap, `tail` wins).
    pub fn with_tail(head: &'a [u8], tail: &'a [u8], size: u64) -> Self {
        PaddedDisk {
            head,
            tail,
            size: size.max(head.len() as u64 + tail.len() as u64),
            bytes_read: Cell::new(0),
        }
    }

    /// Bytes handed out by `read_at` so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.get()
    }
}

/// Copies the part of `src`, which lies at `src_at` on the device, that
/// overlaps `buf`, which is read from `offset`.
fn copy_overlap(buf: &mut [u8], offset: u64, src: &[u8], src_at: u64) {
    let start = offset.max(src_at);
    let end = (offset + buf.len() as u64).min(src_at + src.len() as u64);
    if start < end {
        let n = (end - start) as usize;
        let (b, s) = ((start - offset) as usize, (start - src_at) as usize);
        buf[b..b + n].copy_from_slice(&src[s..s + n]);
    }
}

impl Disk for PaddedDisk<'_> {
    fn name(&self) -> &str {
        "fuzz"
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "access beyond the end of the device",
                )
            })?;
        buf.fill(0);
        copy_overlap(buf, offset, self.head, 0);
        copy_overlap(buf, offset, self.tail, self.size - self.tail.len() as u64);
        self.bytes_read
            .set(self.bytes_read.get() + buf.len() as u64);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the fuzz device is read-only",
        ))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `image` holds a LUKS2 binary header (either magic, version 2) at 0 or at
/// one of the allowed secondary offsets.
pub fn has_luks2_magic(image: &[u8]) -> bool {
    std::iter::once(0u64)
        .chain(ALLOWED_HDR_SIZES)
        .any(|off| luks2_magic_at(image, off as usize))
}

fn luks2_magic_at(image: &[u8], off: usize) -> bool {
    image.len() >= off + 8 && {
        let m = &image[off..off + 6];
        (m == MAGIC_PRIMARY || m == MAGIC_SECONDARY) && image[off + 6..off + 8] == [0, 2]
    }
}

/// Recomputes the sha256 checksum of every LUKS2 header copy in `image`
/// (at 0 and at each allowed secondary offset) as cryptsetup would have
/// written it, for a device of `device_size` bytes that holds `image`
/// followed by zeros. A copy is repaired when its binary header lies in
/// `image` and its `hdr_size` is allowed and fits the device. Returns how
/// many copies were repaired.
pub fn fix_luks2_checksums(image: &mut [u8], device_size: u64) -> usize {
    let mut fixed = 0;
    for off in std::iter::once(0u64).chain(ALLOWED_HDR_SIZES) {
        let start = off as usize;
        if !luks2_magic_at(image, start) || image.len() < start + BINARY_LEN {
            continue;
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&image[start + 8..start + 16]);
        let hdr_size = u64::from_be_bytes(size);
        if !ALLOWED_HDR_SIZES.contains(&hdr_size) || off + hdr_size > device_size {
            continue;
        }
        let end = (start + hdr_size as usize).min(image.len());
        image[start + CSUM_AT..start + CSUM_AT + 64].fill(0);
        let mut h = Sha256::new();
        h.update(&image[start..end]);
        h.update(vec![0u8; start + hdr_size as usize - end]);
        let csum = h.finalize();
        image[start + CSUM_AT..start + CSUM_AT + 32].copy_from_slice(&csum);
        fixed += 1;
    }
    fixed
}

/// Renders a parsed header both ways; neither may panic.
pub fn render(h: &Header) {
    let _ = luks::dump::to_json(h).to_string();
    let _ = luks::dump::to_text(h, "fuzz");
    // The accessors the CLI uses on every header.
    let _ = (
        h.version(),
        h.uuid(),
        h.data_offset(),
        h.cipher(),
        h.key_bytes(),
        h.sector_size(),
        h.key_id(),
        h.keyslots(),
    );
}

/// A freshly formatted image and its volume key.
pub struct RefImage {
    /// What the image is, for messages.
    pub name: &'static str,
    /// The whole device.
    pub bytes: Vec<u8>,
    /// The volume key `PASSPHRASE` opens.
    pub volume_key: Vec<u8>,
}

/// Formats a `size`-byte memory device with `opts` and `PASSPHRASE`.
pub fn format_image(name: &'static str, size: usize, opts: &FormatOptions) -> RefImage {
    let disk = MemDisk::new(name, vec![0u8; size]);
    let (_, key) = luks::format(&disk, opts, &Passphrase::from_slice(PASSPHRASE))
        .unwrap_or_else(|e| panic!("formatting the {name} reference image: {e}"));
    let bytes = disk.contents();
    // The image must open as formatted, or the target tests nothing.
    let header = Header::read(&disk).expect("reading the reference image");
    let unlocked = header
        .unlock(&disk, &Passphrase::from_slice(PASSPHRASE), None, &LIMITS)
        .unwrap_or_else(|e| panic!("unlocking the {name} reference image: {e}"));
    assert_eq!(unlocked.volume_key.expose(), key.expose());
    RefImage {
        name,
        bytes,
        volume_key: key.expose().to_vec(),
    }
}

fn pbkdf2_1000() -> KdfPolicy {
    KdfPolicy::Fixed(Kdf::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    })
}

fn small_luks2(kdf: KdfPolicy) -> FormatOptions {
    let mut opts = FormatOptions::new(LuksVersion::Luks2, 256, kdf).expect("aes-xts-plain64");
    opts.metadata_size = Some(16 * 1024);
    opts.keyslots_size = Some(256 * 1024);
    opts
}

/// The reference images of the `unlock` target, built once per process:
/// LUKS1 (3 MiB) and LUKS2 with a pbkdf2 keyslot (2 MiB), both with the
/// fixed pbkdf2-sha256 1000 policy, and LUKS2 with a small Argon2id
/// keyslot (2 MiB).
pub fn reference_images() -> &'static [RefImage] {
    static IMAGES: OnceLock<Vec<RefImage>> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let luks1 = FormatOptions::new(LuksVersion::Luks1, 256, pbkdf2_1000()).expect("luks1");
        // Another cipher, IV generator and hash, so the unlock target also
        // runs the keyslot code of ciphers other than AES-XTS.
        let mut serpent = luks1.clone();
        serpent.cipher = luks_agent::luks::CipherSpec::parse("serpent-cbc-essiv:sha256", 32)
            .expect("serpent-cbc-essiv:sha256");
        serpent.hash = luks_agent::luks::HashAlg::Whirlpool;
        serpent.kdf = KdfPolicy::Fixed(Kdf::Pbkdf2 {
            hash: luks_agent::luks::HashAlg::Whirlpool,
            iterations: 1000,
        });
        vec![
            format_image("luks1-pbkdf2", 3 * 1024 * 1024, &luks1),
            format_image("luks1-serpent-whirlpool", 3 * 1024 * 1024, &serpent),
            format_image("luks2-pbkdf2", 2 * 1024 * 1024, &small_luks2(pbkdf2_1000())),
            format_image(
                "luks2-argon2id",
                2 * 1024 * 1024,
                &small_luks2(KdfPolicy::Fixed(Kdf::Argon2 {
                    variant: Argon2Variant::Argon2id,
                    time: 4,
                    memory_kib: 64,
                    parallel: 1,
                })),
            ),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> Vec<(String, Vec<u8>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/header_parse");
        let mut seeds: Vec<_> = std::fs::read_dir(dir)
            .expect("seed corpus")
            .map(|e| {
                let p = e.expect("entry").path();
                (p.display().to_string(), std::fs::read(&p).expect("seed"))
            })
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty());
        seeds
    }

    #[test]
    fn seeds_parse_on_the_padded_disk() {
        for (name, seed) in seeds() {
            let h = Header::read(&PaddedDisk::new(&seed, PADDED_DISK))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            render(&h);
        }
    }

    #[test]
    fn checksum_repair_keeps_valid_headers_unchanged() {
        for (name, seed) in seeds() {
            let mut fixed = seed.clone();
            let n = fix_luks2_checksums(&mut fixed, PADDED_DISK);
            assert_eq!(n, if has_luks2_magic(&seed) { 2 } else { 0 }, "{name}");
            assert!(fixed == seed, "{name}: repair changed a valid header");
        }
    }

    #[test]
    fn checksum_repair_makes_an_edited_header_valid() {
        let (name, seed) = seeds()
            .into_iter()
            .find(|(_, s)| has_luks2_magic(s))
            .expect("a LUKS2 seed");
        let mut edited = seed.clone();
        // An edited label breaks the primary's checksum: only the secondary
        // copy is valid until the primary is repaired.
        edited[24] = b'x';
        let h = Header::read(&PaddedDisk::new(&edited, PADDED_DISK));
        assert!(
            matches!(h, Ok(Header::Luks2(ref l)) if l.copies_valid == (false, true)),
            "{name}: {h:?}"
        );
        fix_luks2_checksums(&mut edited, PADDED_DISK);
        let h = Header::read(&PaddedDisk::new(&edited, PADDED_DISK))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Header::Luks2(l) = h else {
            panic!("{name}: not LUKS2")
        };
        assert_eq!(l.copies_valid, (true, true));
        assert!(l.binary.label.starts_with('x'));
    }

    #[test]
    fn padded_disk_reads_as_the_device_it_describes() {
        let head: Vec<u8> = (1..=100u8).collect();
        let tail: Vec<u8> = (101..=150u8).collect();
        for size in [150u64, 151, 4096] {
            let mut whole = vec![0u8; size as usize];
            whole[..100].copy_from_slice(&head);
            let at = size as usize - tail.len();
            whole[at..].copy_from_slice(&tail);
            let disk = PaddedDisk::with_tail(&head, &tail, size);
            assert_eq!(disk.size().unwrap(), size);
            let mut read = 0;
            for (offset, len) in [(0u64, size as usize), (90, 20), (99, 2), (at as u64 - 1, 3)] {
                let mut buf = vec![0xaau8; len];
                disk.read_at(&mut buf, offset).unwrap();
                assert_eq!(
                    buf,
                    whole[offset as usize..offset as usize + len],
                    "{size} {offset}"
                );
                read += len as u64;
            }
            assert_eq!(disk.bytes_read(), read);
            assert!(disk.read_at(&mut [0u8; 2], size - 1).is_err());
        }
    }

    #[test]
    fn reference_images_open() {
        assert_eq!(reference_images().len(), 3);
    }
}

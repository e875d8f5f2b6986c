//! On-disk LUKS formats: parse, validate, unlock, format and manage
//! keyslots of LUKS1 and LUKS2 volumes, interchangeably with cryptsetup and
//! QEMU. No network, no policy about *when* to format: callers decide.

pub mod af;
mod argon2_memory;
pub mod cipher;
pub mod dump;
pub mod error;
pub mod hash;
pub mod kdf;
pub mod keyslot;
pub mod luks1;
pub mod luks2;
pub mod plain;

use std::time::Duration;

use uuid::Uuid;

/// Positioned I/O on a device or image (it lives with the other device
/// code in `blockdev`, which the engine builds on).
pub use crate::blockdev::disk::{self, Disk, FileDisk, MemDisk};
pub use cipher::CipherSpec;
pub use error::LuksError;
pub use hash::HashAlg;
pub use kdf::{Argon2Variant, Kdf, KdfLimits};
pub use luks1::Luks1Header;
pub use luks2::Luks2Header;

use crate::secret::{Passphrase, SecretBytes, VolumeKey};

/// LUKS format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LuksVersion {
    /// LUKS1 (what QEMU and nova's native path open).
    Luks1,
    /// LUKS2.
    Luks2,
}

/// The family of KDF to benchmark for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdfKind {
    /// PBKDF2 with this hash.
    Pbkdf2(HashAlg),
    /// Argon2 of this variant (LUKS2 only).
    Argon2(Argon2Variant),
}

/// How a keyslot's KDF is chosen. Callers must pick one explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdfPolicy {
    /// The passphrase is the hex of a key manager's random key of at least
    /// 128 bits: pbkdf2-sha256 with 1000 iterations (for keyslot and
    /// digest), as clevis does for high-entropy keys. A brute-force search
    /// faces the key's entropy, not the KDF's cost. Refused for a passphrase
    /// that is not such hex.
    HighEntropyKey,
    /// cryptsetup-strength: benchmark to `iter_time`, Argon2 memory capped
    /// at `max_memory_kib` (and half the physical memory).
    Benchmark {
        /// KDF family.
        kind: KdfKind,
        /// Target unlock time.
        iter_time: Duration,
        /// Argon2 memory cap in KiB.
        max_memory_kib: u32,
        /// Argon2 lanes.
        parallel: u32,
    },
    /// Exactly these parameters (digest iterations: the minimum, 1000).
    Fixed(Kdf),
}

impl KdfPolicy {
    /// cryptsetup's defaults for `version`: LUKS1 pbkdf2-sha256 2 s; LUKS2
    /// argon2id 2 s, 1 GiB, up to 4 lanes.
    pub fn cryptsetup_default(version: LuksVersion) -> KdfPolicy {
        let kind = match version {
            LuksVersion::Luks1 => KdfKind::Pbkdf2(HashAlg::Sha256),
            LuksVersion::Luks2 => KdfKind::Argon2(Argon2Variant::Argon2id),
        };
        KdfPolicy::Benchmark {
            kind,
            iter_time: Duration::from_millis(2000),
            max_memory_kib: 1024 * 1024,
            parallel: default_parallel(),
        }
    }
}

/// cryptsetup's default Argon2 lane count: online CPUs, at most 4.
pub fn default_parallel() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(4) as u32)
        .unwrap_or(1)
}

fn physical_memory_kib() -> u64 {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(page as u64) / 1024
}

/// KDF parameters for a new keyslot plus the digest iteration count a
/// format with that policy uses.
pub fn resolve_kdf(
    policy: &KdfPolicy,
    version: LuksVersion,
    key_len: usize,
    passphrase: &Passphrase,
    device: &str,
) -> Result<(Kdf, u32), LuksError> {
    const MIN: u32 = luks1::MIN_DIGEST_ITERATIONS;
    let arg = |reason: String| LuksError::InvalidArgument {
        device: device.into(),
        reason,
    };
    let (kdf, digest_iterations) = match *policy {
        KdfPolicy::HighEntropyKey => {
            if !passphrase.is_high_entropy_hex() {
                return Err(arg(
                    "the high-entropy KDF policy needs a passphrase that is the hex of a key of at least 128 bits"
                        .into(),
                ));
            }
            (
                Kdf::Pbkdf2 {
                    hash: HashAlg::Sha256,
                    iterations: MIN,
                },
                MIN,
            )
        }
        KdfPolicy::Fixed(kdf) => (kdf, MIN),
        KdfPolicy::Benchmark {
            kind,
            iter_time,
            max_memory_kib,
            parallel,
        } => {
            let digest =
                kdf::benchmark_pbkdf2(HashAlg::Sha256, key_len, Duration::from_millis(125), MIN);
            let kdf = match kind {
                KdfKind::Pbkdf2(hash) => Kdf::Pbkdf2 {
                    hash,
                    iterations: kdf::benchmark_pbkdf2(hash, key_len, iter_time, MIN),
                },
                KdfKind::Argon2(variant) => {
                    let cap = u64::from(max_memory_kib).min(physical_memory_kib() / 2) as u32;
                    kdf::benchmark_argon2(variant, key_len, iter_time, cap, parallel)
                        .map_err(|e| arg(e.to_string()))?
                }
            };
            (kdf, digest)
        }
    };
    if version == LuksVersion::Luks1 && !matches!(kdf, Kdf::Pbkdf2 { .. }) {
        return Err(arg("LUKS1 keyslots support only pbkdf2".into()));
    }
    kdf.check(&KdfLimits::default())
        .map_err(|e| arg(e.to_string()))?;
    Ok((kdf, digest_iterations))
}

/// Everything `format` needs to know.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// LUKS1 or LUKS2.
    pub version: LuksVersion,
    /// Data (and keyslot) cipher with the volume key length.
    pub cipher: CipherSpec,
    /// Hash for LUKS1 everything / LUKS2 digest, AF and pbkdf2.
    pub hash: HashAlg,
    /// How the first keyslot's KDF is chosen.
    pub kdf: KdfPolicy,
    /// Keyslot to use (default 0).
    pub keyslot: Option<u32>,
    /// Volume UUID (default random).
    pub uuid: Option<Uuid>,
    /// LUKS2 encryption sector size (default 512).
    pub sector_size: u32,
    /// LUKS2 header size (default 16 KiB).
    pub metadata_size: Option<u64>,
    /// LUKS2 keyslots area size (default: up to the 16 MiB data offset).
    pub keyslots_size: Option<u64>,
    /// LUKS2: record this key manager key id in a `luks-agent` token.
    pub key_id: Option<String>,
}

impl FormatOptions {
    /// aes-xts-plain64 with `key_bits` (256 = AES-128-XTS, as cryptsetup).
    pub fn new(
        version: LuksVersion,
        key_bits: usize,
        kdf: KdfPolicy,
    ) -> Result<FormatOptions, cipher::CipherSpecError> {
        Ok(FormatOptions {
            version,
            cipher: CipherSpec::parse("aes-xts-plain64", key_bits / 8)?,
            hash: HashAlg::Sha256,
            kdf,
            keyslot: None,
            uuid: None,
            sector_size: 512,
            metadata_size: None,
            keyslots_size: None,
            key_id: None,
        })
    }

    /// Where [`format`] with these options puts the data segment: the
    /// bytes before it are all that a format writes.
    pub fn data_offset(&self) -> u64 {
        match self.version {
            LuksVersion::Luks1 => luks1::layout_data_offset(self.cipher.key_bytes),
            LuksVersion::Luks2 => luks2::layout_data_offset(
                self.metadata_size.unwrap_or(luks2::DEFAULT_HDR_SIZE),
                self.keyslots_size,
            ),
        }
    }
}

/// A successful unlock.
#[derive(Debug)]
pub struct Unlocked {
    /// Keyslot that opened.
    pub keyslot: u32,
    /// The volume key.
    pub volume_key: VolumeKey,
}

/// A parsed header of either version.
#[derive(Clone, Debug)]
pub enum Header {
    /// LUKS1.
    Luks1(Luks1Header),
    /// LUKS2.
    Luks2(Luks2Header),
}

/// Summary of one keyslot, for dumps.
#[derive(Clone, Debug)]
pub struct KeyslotInfo {
    /// Number.
    pub slot: u32,
    /// KDF.
    pub kdf: Kdf,
    /// Salt.
    pub salt: Vec<u8>,
    /// Area offset in bytes.
    pub area_offset: u64,
    /// Area length in bytes.
    pub area_length: u64,
    /// Area cipher.
    pub cipher: String,
    /// Stored key bits.
    pub key_bits: usize,
    /// AF hash.
    pub af_hash: HashAlg,
    /// Priority (LUKS2; LUKS1 always normal).
    pub priority: u8,
}

impl Header {
    /// Reads and validates the header of `disk`.
    pub fn read(disk: &dyn Disk) -> Result<Header, LuksError> {
        let device = disk.name();
        let size = disk
            .size()
            .map_err(|e| error::io_err(device, "reading the device size", e))?;
        let mut first = [0u8; luks1::PHDR_LEN];
        let have = size.min(first.len() as u64) as usize;
        disk.read_at(&mut first[..have], 0)
            .map_err(|e| error::io_err(device, "reading the header", e))?;
        let version = (have >= 8 && first[..6] == luks1::MAGIC)
            .then(|| u16::from_be_bytes([first[6], first[7]]));
        let header = match version {
            Some(1) => {
                if have < luks1::PHDR_LEN {
                    return Err(LuksError::TooSmall {
                        device: device.into(),
                        what: "LUKS1 header".into(),
                        needed: luks1::PHDR_LEN as u64,
                        size,
                    });
                }
                let h = Luks1Header::parse(device, &first)?;
                if h.metadata_end() > size {
                    return Err(LuksError::TooSmall {
                        device: device.into(),
                        what: "LUKS1 keyslot areas".into(),
                        needed: h.metadata_end(),
                        size,
                    });
                }
                Ok(Header::Luks1(h))
            }
            Some(2) | None => Luks2Header::read(disk).map(Header::Luks2),
            // A damaged version field of a LUKS2 primary: the checksummed
            // secondary copy still says what the volume is.
            Some(v) => {
                Luks2Header::read(disk)
                    .map(Header::Luks2)
                    .map_err(|_| LuksError::Unsupported {
                        device: device.into(),
                        what: format!("LUKS version {v}"),
                    })
            }
        }?;
        // A device shorter than its own data offset has been truncated; a
        // header backup (exactly the data offset long) is still accepted.
        if size < header.data_offset() {
            return Err(LuksError::TooSmall {
                device: device.into(),
                what: "header, keyslots and the data offset they declare".into(),
                needed: header.data_offset(),
                size,
            });
        }
        Ok(header)
    }

    /// Format version.
    pub fn version(&self) -> LuksVersion {
        match self {
            Header::Luks1(_) => LuksVersion::Luks1,
            Header::Luks2(_) => LuksVersion::Luks2,
        }
    }

    /// Volume UUID.
    pub fn uuid(&self) -> &str {
        match self {
            Header::Luks1(h) => &h.uuid,
            Header::Luks2(h) => &h.binary.uuid,
        }
    }

    /// Data offset in bytes.
    pub fn data_offset(&self) -> u64 {
        match self {
            Header::Luks1(h) => h.data_offset(),
            Header::Luks2(h) => h.data_offset(),
        }
    }

    /// Data cipher, e.g. `aes-xts-plain64`.
    pub fn cipher(&self) -> String {
        match self {
            Header::Luks1(h) => h.cipher.full_name(),
            Header::Luks2(h) => h.cipher(),
        }
    }

    /// Volume key length in bytes.
    pub fn key_bytes(&self) -> usize {
        match self {
            Header::Luks1(h) => h.key_bytes as usize,
            Header::Luks2(h) => h.key_bytes(),
        }
    }

    /// Encryption sector size of the data.
    pub fn sector_size(&self) -> u32 {
        match self {
            Header::Luks1(_) => 512,
            Header::Luks2(h) => h
                .meta
                .segments
                .values()
                .next()
                .map(|s| s.sector_size)
                .unwrap_or(512),
        }
    }

    /// The key manager key id recorded in our LUKS2 token, if any.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Header::Luks1(_) => None,
            Header::Luks2(h) => h.meta.tokens.values().find_map(|t| t.key_id.as_deref()),
        }
    }

    /// Active keyslots.
    pub fn keyslots(&self) -> Vec<KeyslotInfo> {
        match self {
            Header::Luks1(h) => h
                .keyslots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.active)
                .map(|(i, s)| KeyslotInfo {
                    slot: i as u32,
                    kdf: Kdf::Pbkdf2 {
                        hash: h.hash,
                        iterations: s.iterations,
                    },
                    salt: s.salt.to_vec(),
                    area_offset: u64::from(s.key_material_offset) * 512,
                    area_length: keyslot::af_sectors(h.key_bytes as usize, keyslot::STRIPES) * 512,
                    cipher: h.cipher.full_name(),
                    key_bits: h.key_bytes as usize * 8,
                    af_hash: h.hash,
                    priority: 1,
                })
                .collect(),
            Header::Luks2(h) => h
                .meta
                .keyslots
                .iter()
                .map(|(id, k)| KeyslotInfo {
                    slot: *id,
                    kdf: k.kdf,
                    salt: k.salt.clone(),
                    area_offset: k.area_offset,
                    area_length: k.area_size,
                    cipher: k.area_cipher.full_name(),
                    key_bits: k.key_size * 8,
                    af_hash: k.af_hash,
                    priority: k.priority,
                })
                .collect(),
        }
    }

    /// Opens the volume key with `passphrase`, trying keyslots in the
    /// order cryptsetup does (or only `only_slot`).
    pub fn unlock(
        &self,
        disk: &dyn Disk,
        passphrase: &Passphrase,
        only_slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<Unlocked, LuksError> {
        let (keyslot, volume_key) = match self {
            Header::Luks1(h) => h.unlock(disk, passphrase.expose(), only_slot, limits)?,
            Header::Luks2(h) => h.unlock(disk, passphrase.expose(), only_slot, limits)?,
        };
        Ok(Unlocked {
            keyslot,
            volume_key,
        })
    }

    /// Adds a keyslot for `new_passphrase` holding `key` (obtained by an
    /// unlock), then proves it by unlocking that slot with the new
    /// passphrase. Returns the slot number.
    pub fn add_keyslot(
        &mut self,
        disk: &dyn Disk,
        key: &VolumeKey,
        new_passphrase: &Passphrase,
        slot: Option<u32>,
        policy: &KdfPolicy,
        limits: &KdfLimits,
    ) -> Result<u32, LuksError> {
        let device = disk.name();
        let no_free = || LuksError::Refused {
            device: device.into(),
            reason: "no free keyslot".into(),
        };
        let (kdf, _) = resolve_kdf(policy, self.version(), key.len(), new_passphrase, device)?;
        let slot = match self {
            Header::Luks1(h) => {
                let Kdf::Pbkdf2 { iterations, hash } = kdf else {
                    unreachable!("resolve_kdf refuses non-pbkdf2 for LUKS1")
                };
                if hash != h.hash {
                    return Err(LuksError::InvalidArgument {
                        device: device.into(),
                        reason: format!("LUKS1 keyslots use the header hash {}", h.hash.name()),
                    });
                }
                let slot = match slot {
                    Some(s) => s as usize,
                    None => h.free_slot().ok_or_else(no_free)?,
                };
                h.store_keyslot(disk, slot, iterations, new_passphrase.expose(), key)?;
                slot as u32
            }
            Header::Luks2(h) => {
                let slot = match slot {
                    Some(s) => s,
                    None => h.free_slot().ok_or_else(no_free)?,
                };
                h.store_keyslot(disk, slot, kdf, new_passphrase.expose(), key)?;
                slot
            }
        };
        // Prove the new slot from what is now on disk, not from memory.
        let reread = Header::read(disk)?;
        let check = reread.unlock(disk, new_passphrase, Some(slot), limits)?;
        if check.volume_key.expose() != key.expose() {
            return Err(LuksError::InvalidHeader {
                device: device.into(),
                version: if reread.version() == LuksVersion::Luks1 {
                    1
                } else {
                    2
                },
                reason: format!("keyslot {slot} did not verify after writing"),
            });
        }
        *self = reread;
        Ok(slot)
    }

    /// Removes `slot`. Refuses to remove the last active keyslot, which
    /// would make the volume unopenable.
    pub fn remove_keyslot(&mut self, disk: &dyn Disk, slot: u32) -> Result<(), LuksError> {
        let device = disk.name();
        let active: Vec<u32> = self.keyslots().iter().map(|k| k.slot).collect();
        if !active.contains(&slot) {
            return Err(LuksError::InvalidArgument {
                device: device.into(),
                reason: format!("keyslot {slot} is not active"),
            });
        }
        if active.len() == 1 {
            return Err(LuksError::Refused {
                device: device.into(),
                reason: format!(
                    "keyslot {slot} is the last one; removing it would make the volume unopenable"
                ),
            });
        }
        match self {
            Header::Luks1(h) => h.destroy_keyslot(disk, slot as usize),
            Header::Luks2(h) => h.destroy_keyslot(disk, slot),
        }
    }
}

/// Formats `disk`: a random volume key, the header, one keyslot for
/// `passphrase`. Key material and the wiped areas are written and flushed
/// before the header, so an interrupted format leaves no valid header.
/// Callers decide whether the device may be formatted at all.
pub fn format(
    disk: &dyn Disk,
    opts: &FormatOptions,
    passphrase: &Passphrase,
) -> Result<(Header, VolumeKey), LuksError> {
    plan_format(disk, opts, passphrase)?.write(disk, passphrase)
}

/// A format worked out in memory and checked against the device (its
/// size included) without writing anything: every way a format can fail
/// before its first write fails here. [`FormatPlan::write`] is the first
/// write, so a caller can keep records of a format it is about to start
/// only for plans that got that far.
pub struct FormatPlan {
    header: PlannedHeader,
    key: VolumeKey,
    kdf: Kdf,
    slot: u32,
    link_token: bool,
}

enum PlannedHeader {
    Luks1(Luks1Header),
    Luks2(luks2::Luks2Header),
}

/// Works out the format of `disk` with `opts` (the KDF benchmarked, the
/// volume key drawn, the header laid out, the size checked); writes
/// nothing.
pub fn plan_format(
    disk: &dyn Disk,
    opts: &FormatOptions,
    passphrase: &Passphrase,
) -> Result<FormatPlan, LuksError> {
    let device = disk.name();
    let arg = |reason: String| LuksError::InvalidArgument {
        device: device.into(),
        reason,
    };
    if passphrase.expose().is_empty() {
        return Err(arg("the passphrase is empty".into()));
    }
    let size = disk
        .size()
        .map_err(|e| error::io_err(device, "reading the device size", e))?;
    // The layout alone says how large the device must be: refuse a device
    // that is too small before the KDF benchmark costs seconds.
    require_size(device, opts.data_offset(), size)?;
    let key = VolumeKey::new(SecretBytes::random(opts.cipher.key_bytes).map_err(|_| {
        LuksError::Random {
            device: device.into(),
        }
    })?);
    let (kdf, digest_iterations) =
        resolve_kdf(&opts.kdf, opts.version, key.len(), passphrase, device)?;
    let uuid = opts
        .uuid
        .unwrap_or_else(Uuid::new_v4)
        .hyphenated()
        .to_string();
    let slot = opts.keyslot.unwrap_or(0);
    let header = match opts.version {
        LuksVersion::Luks1 => {
            if opts.key_id.is_some() {
                return Err(arg(
                    "LUKS1 has no tokens; a key id can be recorded only in LUKS2".into(),
                ));
            }
            let h = Luks1Header::new_layout(
                opts.cipher,
                opts.hash,
                &key,
                digest_iterations,
                &uuid,
                device,
            )?;
            require_size(device, h.data_offset(), size)?;
            PlannedHeader::Luks1(h)
        }
        LuksVersion::Luks2 => {
            let hdr_size = opts.metadata_size.unwrap_or(luks2::DEFAULT_HDR_SIZE);
            let h = luks2::Luks2Header::new_layout(
                device,
                opts.cipher,
                opts.hash,
                &key,
                digest_iterations,
                &uuid,
                opts.sector_size,
                hdr_size,
                opts.keyslots_size,
                opts.key_id.as_deref(),
            )?;
            require_size(device, h.data_offset(), size)?;
            PlannedHeader::Luks2(h)
        }
    };
    Ok(FormatPlan {
        header,
        key,
        kdf,
        slot,
        link_token: opts.key_id.is_some(),
    })
}

impl FormatPlan {
    /// Where the data segment starts: the bytes before it are all that
    /// [`write`](Self::write) touches.
    pub fn data_offset(&self) -> u64 {
        match &self.header {
            PlannedHeader::Luks1(h) => h.data_offset(),
            PlannedHeader::Luks2(h) => h.data_offset(),
        }
    }

    /// Writes the planned format: the header area zeroed, the keyslot
    /// material for `passphrase` (the one the plan was made for), and the
    /// header last.
    pub fn write(
        self,
        disk: &dyn Disk,
        passphrase: &Passphrase,
    ) -> Result<(Header, VolumeKey), LuksError> {
        let device = disk.name();
        let FormatPlan {
            header,
            key,
            kdf,
            slot,
            link_token,
        } = self;
        let header = match header {
            PlannedHeader::Luks1(mut h) => {
                let Kdf::Pbkdf2 { iterations, .. } = kdf else {
                    unreachable!("resolve_kdf gives LUKS1 only pbkdf2")
                };
                // As cryptsetup: the header area reads as zeros, and all
                // eight keyslot areas hold random bytes, used or not.
                keyslot::wipe_zero(disk, 0, h.data_offset())?;
                for area in h.keyslot_areas() {
                    keyslot::wipe_random(disk, area.0, area.1)?;
                }
                h.prepare_keyslot(disk, slot as usize, iterations, passphrase.expose(), &key)?;
                h.write(disk)?;
                Header::Luks1(h)
            }
            PlannedHeader::Luks2(mut h) => {
                // Both metadata copies and the whole keyslots region read
                // as zeros (old headers and keyslots are gone); the area of
                // each keyslot we create is filled with random bytes before
                // its key material goes in. cryptsetup random-fills the
                // unused rest of the region too; that hides nothing (the
                // JSON metadata lists every keyslot in plain text) and costs
                // a 16 MiB write, while a zero range is a metadata operation
                // on files and thin devices.
                keyslot::wipe_zero(disk, 0, h.data_offset())?;
                h.prepare_keyslot(disk, slot, kdf, passphrase.expose(), &key)?;
                if link_token {
                    h.link_token_to_keyslot(device, slot)?;
                }
                h.write_new(disk)?;
                Header::Luks2(h)
            }
        };
        Ok((header, key))
    }
}

fn require_size(device: &str, needed: u64, size: u64) -> Result<(), LuksError> {
    if size <= needed {
        return Err(LuksError::TooSmall {
            device: device.into(),
            what: "header, keyslots and at least one data sector".into(),
            needed: needed + 512,
            size,
        });
    }
    Ok(())
}

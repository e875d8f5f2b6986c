//! LUKS1: the 592-byte `phdr` with eight fixed keyslots (LUKS On-Disk Format
//! Specification 1.2.3), read, validated, unlocked and written.
//!
//! Writes change as few bytes as possible: activating or removing a keyslot
//! rewrites only that slot's 48-byte descriptor, after (or before) its key
//! material, so a write torn by a crash can only affect the slot being
//! changed, never another working one.

use std::ops::Range;

use super::cipher::{CipherSpec, SECTOR};
use super::disk::Disk;
use super::error::{LuksError, invalid, io_err};
use super::hash::HashAlg;
use super::kdf::{Kdf, KdfLimits};
use super::keyslot::{self, AreaSpec, STRIPES, af_sectors};
use crate::secret::VolumeKey;

/// LUKS1 and LUKS2 share the first six bytes.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the on-disk header.
pub const PHDR_LEN: usize = 592;
/// Number of keyslots.
pub const KEYSLOTS: usize = 8;
const KEY_ENABLED: u32 = 0x00AC_71F3;
const KEY_DISABLED: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Smallest digest iteration count cryptsetup writes or accepts.
pub const MIN_DIGEST_ITERATIONS: u32 = 1000;
const SLOTS_AT: usize = 208;
const SLOT_LEN: usize = 48;
/// Keyslot areas start and are aligned at 4 KiB (cryptsetup's layout).
const ALIGN_KEYSLOTS_SECTORS: u64 = 4096 / SECTOR as u64;
/// Data is aligned to 1 MiB (cryptsetup's default alignment).
const ALIGN_PAYLOAD_SECTORS: u64 = 2048;

/// One of the eight keyslot descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyslot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors.
    pub key_material_offset: u32,
    /// AF stripes (always 4000).
    pub stripes: u32,
}

/// A validated LUKS1 header.
#[derive(Clone, Debug)]
pub struct Luks1Header {
    /// Cipher of data and keyslots.
    pub cipher: CipherSpec,
    /// Hash for PBKDF2, AF and the digest.
    pub hash: HashAlg,
    /// Data start, in sectors.
    pub payload_offset: u32,
    /// Volume key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the volume key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_digest_iter: u32,
    /// UUID string as stored.
    pub uuid: String,
    /// The eight keyslots.
    pub keyslots: [Keyslot; KEYSLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn c_string(field: &[u8]) -> Result<String, String> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end])
        .map(str::to_string)
        .map_err(|_| "not UTF-8".to_string())
}

fn put_c_string(dst: &mut [u8], s: &str) {
    dst.iter_mut().for_each(|b| *b = 0);
    dst[..s.len()].copy_from_slice(s.as_bytes());
}

/// A fresh layout for a volume key of `key_len` bytes, in sectors: the
/// key material offset of each keyslot and the payload offset.
fn layout_sectors(key_len: usize) -> ([u64; KEYSLOTS], u64) {
    let secs = af_sectors(key_len, STRIPES);
    let mut next = ALIGN_KEYSLOTS_SECTORS;
    let offsets = std::array::from_fn(|_| {
        let at = next;
        next = (next + secs).div_ceil(ALIGN_KEYSLOTS_SECTORS) * ALIGN_KEYSLOTS_SECTORS;
        at
    });
    (
        offsets,
        next.div_ceil(ALIGN_PAYLOAD_SECTORS) * ALIGN_PAYLOAD_SECTORS,
    )
}

/// Where a fresh layout for a volume key of `key_len` bytes puts the
/// payload, in bytes.
pub fn layout_data_offset(key_len: usize) -> u64 {
    layout_sectors(key_len).1 * SECTOR as u64
}

impl Luks1Header {
    /// Parses and validates the 592-byte header of `device`.
    pub fn parse(device: &str, raw: &[u8]) -> Result<Luks1Header, LuksError> {
        let bad = |reason: String| invalid(device, 1, reason);
        if raw.len() < PHDR_LEN {
            return Err(bad(format!(
                "header is {} bytes, needs {PHDR_LEN}",
                raw.len()
            )));
        }
        if raw[..6] != MAGIC {
            return Err(LuksError::NotLuks {
                device: device.into(),
            });
        }
        let version = u16::from_be_bytes([raw[6], raw[7]]);
        if version != 1 {
            return Err(bad(format!("version is {version}, expected 1")));
        }
        let text = |r: Range<usize>, name: &str| {
            c_string(&raw[r]).map_err(|e| bad(format!("{name} is {e}")))
        };
        let cipher_name = text(8..40, "cipher-name")?;
        let cipher_mode = text(40..72, "cipher-mode")?;
        let hash_spec = text(72..104, "hash-spec")?;
        let payload_offset = be32(raw, 104);
        let key_bytes = be32(raw, 108);
        let hash = HashAlg::parse(&hash_spec).ok_or_else(|| LuksError::Unsupported {
            device: device.into(),
            what: format!("hash '{hash_spec}'"),
        })?;
        if key_bytes == 0 || key_bytes > 512 {
            return Err(bad(format!("key-bytes is {key_bytes}")));
        }
        let cipher = CipherSpec::parse_parts(&cipher_name, &cipher_mode, key_bytes as usize)
            .map_err(|e| LuksError::Unsupported {
                device: device.into(),
                what: e.to_string(),
            })?;
        let mk_digest_iter = be32(raw, 164);
        if mk_digest_iter < MIN_DIGEST_ITERATIONS {
            return Err(bad(format!(
                "mk-digest-iter is {mk_digest_iter}, below the minimum {MIN_DIGEST_ITERATIONS}"
            )));
        }
        let uuid = text(168..208, "uuid")?;
        let mut keyslots: [Keyslot; KEYSLOTS] = std::array::from_fn(|_| Keyslot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: 0,
            stripes: 0,
        });
        for (i, slot) in keyslots.iter_mut().enumerate() {
            let at = SLOTS_AT + i * SLOT_LEN;
            let state = be32(raw, at);
            slot.active = match state {
                KEY_ENABLED => true,
                KEY_DISABLED => false,
                other => return Err(bad(format!("keyslot {i} state is {other:#010x}"))),
            };
            slot.iterations = be32(raw, at + 4);
            slot.salt.copy_from_slice(&raw[at + 8..at + 40]);
            slot.key_material_offset = be32(raw, at + 40);
            slot.stripes = be32(raw, at + 44);
            if slot.active && slot.iterations == 0 {
                return Err(bad(format!("keyslot {i} is active with 0 iterations")));
            }
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&raw[112..132]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&raw[132..164]);
        let hdr = Luks1Header {
            cipher,
            hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            uuid,
            keyslots,
        };
        hdr.check_keyslot_layout(device)?;
        Ok(hdr)
    }

    /// The keyslot area rules of cryptsetup's `LUKS_check_keyslots`: 4000
    /// stripes, areas after the header, before the payload and disjoint.
    fn check_keyslot_layout(&self, device: &str) -> Result<(), LuksError> {
        let bad = |reason: String| invalid(device, 1, reason);
        let secs = af_sectors(self.key_bytes as usize, STRIPES);
        for (i, s) in self.keyslots.iter().enumerate() {
            if s.stripes as usize != STRIPES {
                return Err(bad(format!(
                    "keyslot {i} has {} stripes, expected {STRIPES}",
                    s.stripes
                )));
            }
            if u64::from(s.key_material_offset) * (SECTOR as u64) < PHDR_LEN as u64 {
                return Err(bad(format!(
                    "keyslot {i} key material at sector {} overlaps the header",
                    s.key_material_offset
                )));
            }
            if self.payload_offset != 0
                && u64::from(s.key_material_offset) + secs > u64::from(self.payload_offset)
            {
                return Err(bad(format!(
                    "keyslot {i} key material (sector {} + {secs}) runs into the payload at sector {}",
                    s.key_material_offset, self.payload_offset
                )));
            }
        }
        let mut order: Vec<usize> = (0..KEYSLOTS).collect();
        order.sort_by_key(|i| self.keyslots[*i].key_material_offset);
        for pair in order.windows(2) {
            let (a, b) = (&self.keyslots[pair[0]], &self.keyslots[pair[1]]);
            if u64::from(b.key_material_offset) < u64::from(a.key_material_offset) + secs {
                return Err(bad(format!("keyslots {} and {} overlap", pair[0], pair[1])));
            }
        }
        Ok(())
    }

    /// Serialises the header to its 592 bytes.
    pub fn to_bytes(&self) -> [u8; PHDR_LEN] {
        let mut b = [0u8; PHDR_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_c_string(&mut b[8..40], self.cipher.cipher_name());
        put_c_string(&mut b[40..72], &self.cipher.mode_name());
        put_c_string(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put_c_string(&mut b[168..208], &self.uuid);
        for i in 0..KEYSLOTS {
            b[Self::slot_range(i)].copy_from_slice(&self.slot_bytes(i));
        }
        b
    }

    fn slot_range(i: usize) -> Range<usize> {
        SLOTS_AT + i * SLOT_LEN..SLOTS_AT + (i + 1) * SLOT_LEN
    }

    fn slot_bytes(&self, i: usize) -> [u8; SLOT_LEN] {
        let s = &self.keyslots[i];
        let mut b = [0u8; SLOT_LEN];
        let state = if s.active { KEY_ENABLED } else { KEY_DISABLED };
        b[0..4].copy_from_slice(&state.to_be_bytes());
        b[4..8].copy_from_slice(&s.iterations.to_be_bytes());
        b[8..40].copy_from_slice(&s.salt);
        b[40..44].copy_from_slice(&s.key_material_offset.to_be_bytes());
        b[44..48].copy_from_slice(&s.stripes.to_be_bytes());
        b
    }

    /// Byte offset of the data.
    pub fn data_offset(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR as u64
    }

    fn area(&self, slot: usize) -> AreaSpec {
        AreaSpec {
            offset: u64::from(self.keyslots[slot].key_material_offset) * SECTOR as u64,
            cipher: self.cipher,
            af_hash: self.hash,
            stripes: STRIPES,
            key_len: self.key_bytes as usize,
        }
    }

    /// End of the last keyslot area in bytes: the least the device must hold.
    pub fn metadata_end(&self) -> u64 {
        (0..KEYSLOTS)
            .map(|i| self.area(i).offset + self.area(i).material_len())
            .max()
            .unwrap_or(0)
    }

    fn kdf(&self, slot: usize) -> Kdf {
        Kdf::Pbkdf2 {
            hash: self.hash,
            iterations: self.keyslots[slot].iterations,
        }
    }

    /// Tries the active keyslots in order and returns the first volume key
    /// whose digest matches.
    pub fn unlock(
        &self,
        disk: &dyn Disk,
        passphrase: &[u8],
        only_slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, VolumeKey), LuksError> {
        let digest = Kdf::Pbkdf2 {
            hash: self.hash,
            iterations: self.mk_digest_iter,
        };
        keyslot::check_digest(disk, "volume key digest", &digest, DIGEST_LEN, limits)?;
        let candidates = (0..KEYSLOTS)
            .filter(|&i| self.keyslots[i].active && only_slot.is_none_or(|s| s as usize == i))
            .map(|i| {
                Ok(keyslot::Candidate {
                    slot: i as u32,
                    kdf: self.kdf(i),
                    salt: &self.keyslots[i].salt,
                    area: self.area(i),
                })
            });
        keyslot::first_opening(disk, candidates, limits, passphrase, |_, key| {
            self.key_matches(key)
        })
    }

    /// Whether `key` is this volume's key.
    pub fn key_matches(&self, key: &VolumeKey) -> bool {
        key.len() == self.key_bytes as usize
            && keyslot::digest_matches(
                key,
                self.hash,
                &self.mk_digest_salt,
                self.mk_digest_iter,
                &self.mk_digest,
            )
    }

    /// A fresh header in cryptsetup's default layout for `key`.
    pub fn new_layout(
        cipher: CipherSpec,
        hash: HashAlg,
        key: &VolumeKey,
        digest_iterations: u32,
        uuid: &str,
        device: &str,
    ) -> Result<Luks1Header, LuksError> {
        let key_bytes = key.len() as u32;
        let (offsets, payload_offset) = layout_sectors(key.len());
        let keyslots: [Keyslot; KEYSLOTS] = std::array::from_fn(|i| Keyslot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: offsets[i] as u32,
            stripes: STRIPES as u32,
        });
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&keyslot::random_bytes(device, SALT_LEN)?);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&keyslot::digest(
            key,
            hash,
            &mk_digest_salt,
            digest_iterations,
            DIGEST_LEN,
        ));
        Ok(Luks1Header {
            cipher,
            hash,
            payload_offset: payload_offset as u32,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter: digest_iterations,
            uuid: uuid.to_string(),
            keyslots,
        })
    }

    /// Writes the whole 592-byte header.
    pub fn write(&self, disk: &dyn Disk) -> Result<(), LuksError> {
        disk.write_at(&self.to_bytes(), 0)
            .map_err(|e| io_err(disk.name(), "writing the LUKS1 header", e))?;
        disk.sync()
            .map_err(|e| io_err(disk.name(), "flushing the LUKS1 header", e))
    }

    fn write_slot_descriptor(&self, disk: &dyn Disk, slot: usize) -> Result<(), LuksError> {
        let r = Self::slot_range(slot);
        disk.write_at(&self.slot_bytes(slot), r.start as u64)
            .map_err(|e| io_err(disk.name(), format!("writing keyslot {slot} descriptor"), e))?;
        disk.sync()
            .map_err(|e| io_err(disk.name(), "flushing the LUKS1 header", e))
    }

    /// Stores `key` under `passphrase` in `slot` with PBKDF2 `iterations`:
    /// key material first, flushed, then the descriptor that activates it.
    pub fn store_keyslot(
        &mut self,
        disk: &dyn Disk,
        slot: usize,
        iterations: u32,
        passphrase: &[u8],
        key: &VolumeKey,
    ) -> Result<(), LuksError> {
        self.prepare_keyslot(disk, slot, iterations, passphrase, key)?;
        self.write_slot_descriptor(disk, slot)
    }

    /// Writes and flushes the key material of `slot` and activates the slot
    /// in memory only; the caller writes the descriptor (or whole header).
    pub fn prepare_keyslot(
        &mut self,
        disk: &dyn Disk,
        slot: usize,
        iterations: u32,
        passphrase: &[u8],
        key: &VolumeKey,
    ) -> Result<(), LuksError> {
        let device = disk.name();
        if slot >= KEYSLOTS {
            return Err(LuksError::InvalidArgument {
                device: device.into(),
                reason: format!("LUKS1 has no keyslot {slot}"),
            });
        }
        if self.keyslots[slot].active {
            return Err(LuksError::Refused {
                device: device.into(),
                reason: format!("keyslot {slot} is in use"),
            });
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&keyslot::random_bytes(device, SALT_LEN)?);
        let kdf = Kdf::Pbkdf2 {
            hash: self.hash,
            iterations,
        };
        keyslot::store_area(disk, &kdf, &salt, &self.area(slot), passphrase, key)?;
        disk.sync()
            .map_err(|e| io_err(device, "flushing keyslot material", e))?;
        let s = &mut self.keyslots[slot];
        s.active = true;
        s.iterations = iterations;
        s.salt = salt;
        Ok(())
    }

    /// Deactivates `slot` (descriptor first, so the old key can no longer be
    /// used even if the wipe is interrupted), then wipes its material.
    pub fn destroy_keyslot(&mut self, disk: &dyn Disk, slot: usize) -> Result<(), LuksError> {
        let s = &mut self.keyslots[slot];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; SALT_LEN];
        self.write_slot_descriptor(disk, slot)?;
        let area = self.area(slot);
        keyslot::wipe_random(disk, area.offset, area.material_len())?;
        disk.sync()
            .map_err(|e| io_err(disk.name(), "flushing keyslot wipe", e))
    }

    /// (offset, length) in bytes of the eight keyslot areas.
    pub fn keyslot_areas(&self) -> Vec<(u64, u64)> {
        (0..KEYSLOTS)
            .map(|i| (self.area(i).offset, self.area(i).material_len()))
            .collect()
    }

    /// First inactive slot.
    pub fn free_slot(&self) -> Option<usize> {
        self.keyslots.iter().position(|s| !s.active)
    }
}

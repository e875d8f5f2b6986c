//! LUKS2: two binary header copies, each followed by the JSON metadata
//! (LUKS2 On-Disk Format Specification 1.1.x), read with the same recovery
//! rules as cryptsetup and written so that a crash at any point leaves one
//! valid copy.

pub mod metadata;

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::cipher::{CipherSpec, SECTOR};
use super::disk::Disk;
use super::error::{LuksError, invalid, io_err};
use super::hash::HashAlg;
use super::kdf::{Kdf, KdfLimits};
use super::keyslot::{self, AreaSpec, STRIPES, af_sectors};
use crate::secret::VolumeKey;
use metadata::{Digest, Keyslot, Metadata, MetadataError, TOKEN_TYPE};

/// Magic of the primary header.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary header.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// Size of the binary part of a header.
pub const BINARY_LEN: usize = 4096;
/// Header sizes (binary + JSON) the specification allows; also the offsets
/// at which a secondary header may be found.
pub const ALLOWED_HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];
/// Default header size (16 KiB, as cryptsetup).
pub const DEFAULT_HDR_SIZE: u64 = 0x4000;
/// Default data offset (16 MiB, as cryptsetup).
pub const DEFAULT_DATA_OFFSET: u64 = 16 * 1024 * 1024;
const CSUM_AT: usize = 448;
const KEYSLOT_ALIGN: u64 = 4096;
const SALT_LEN: usize = 32;

/// The fields of one binary header.
#[derive(Clone, Debug)]
pub struct BinaryHeader {
    /// Header + JSON size.
    pub hdr_size: u64,
    /// Update counter; the higher valid copy wins.
    pub seqid: u64,
    /// Label.
    pub label: String,
    /// Checksum algorithm (always sha256).
    pub checksum_alg: String,
    /// Per-copy salt.
    pub salt: [u8; 64],
    /// Volume UUID.
    pub uuid: String,
    /// Subsystem label.
    pub subsystem: String,
    /// Offset of this copy.
    pub hdr_offset: u64,
}

/// A validated LUKS2 header: the newest valid copy.
#[derive(Clone, Debug)]
pub struct Luks2Header {
    /// Binary fields of the copy in use.
    pub binary: BinaryHeader,
    /// Salt of the secondary copy (kept when rewriting).
    pub secondary_salt: [u8; 64],
    /// Which copies were valid when read: (primary, secondary).
    pub copies_valid: (bool, bool),
    /// Metadata.
    pub meta: Metadata,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn c_string(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).ok().map(str::to_string)
}

fn put(dst: &mut [u8], s: &str) {
    dst[..s.len()].copy_from_slice(s.as_bytes());
}

/// Reads and checks the copy at `offset`. `Ok(None)`: no magic there.
fn read_copy(
    disk: &dyn Disk,
    offset: u64,
    magic: &[u8; 6],
    size: u64,
) -> Result<Option<(BinaryHeader, Metadata)>, LuksError> {
    let device = disk.name();
    let bad = |reason: String| invalid(device, 2, reason);
    let which = if offset == 0 {
        "primary".to_string()
    } else {
        format!("secondary header at {offset}")
    };
    if offset + BINARY_LEN as u64 > size {
        return Ok(None);
    }
    let mut bin = vec![0u8; BINARY_LEN];
    disk.read_at(&mut bin, offset)
        .map_err(|e| io_err(device, format!("reading {which}"), e))?;
    if bin[..6] != *magic {
        return Ok(None);
    }
    let version = u16::from_be_bytes([bin[6], bin[7]]);
    if version != 2 {
        return Err(bad(format!("{which}: version is {version}, expected 2")));
    }
    let hdr_size = be64(&bin, 8);
    if !ALLOWED_HDR_SIZES.contains(&hdr_size) {
        return Err(bad(format!(
            "{which}: hdr_size {hdr_size} is not an allowed size"
        )));
    }
    let hdr_offset = be64(&bin, 256);
    if hdr_offset != offset {
        return Err(bad(format!(
            "{which}: hdr_offset {hdr_offset} does not match its position {offset}"
        )));
    }
    let text = |r: std::ops::Range<usize>, name: &str| {
        c_string(&bin[r]).ok_or_else(|| bad(format!("{which}: {name} is not UTF-8")))
    };
    let checksum_alg = text(72..104, "checksum_alg")?;
    if checksum_alg != "sha256" {
        return Err(LuksError::Unsupported {
            device: device.into(),
            what: format!("checksum algorithm '{checksum_alg}'"),
        });
    }
    if offset + hdr_size > size {
        return Err(LuksError::TooSmall {
            device: device.into(),
            what: which,
            needed: offset + hdr_size,
            size,
        });
    }
    let mut area = vec![0u8; hdr_size as usize];
    area[..BINARY_LEN].copy_from_slice(&bin);
    disk.read_at(&mut area[BINARY_LEN..], offset + BINARY_LEN as u64)
        .map_err(|e| io_err(device, format!("reading {which} metadata"), e))?;
    let stored: Vec<u8> = area[CSUM_AT..CSUM_AT + 64].to_vec();
    area[CSUM_AT..CSUM_AT + 64].iter_mut().for_each(|b| *b = 0);
    let computed = Sha256::digest(&area);
    if !bool::from(computed.as_slice().ct_eq(&stored[..32])) || stored[32..].iter().any(|b| *b != 0)
    {
        return Err(bad(format!("{which}: checksum mismatch")));
    }
    let json_area = &area[BINARY_LEN..];
    let Some(nul) = json_area.iter().position(|b| *b == 0) else {
        return Err(bad(format!("{which}: JSON area is not NUL-terminated")));
    };
    if json_area[nul..].iter().any(|b| *b != 0) {
        return Err(bad(format!(
            "{which}: bytes after the JSON terminator are not zero"
        )));
    }
    let doc: Value = serde_json::from_slice(&json_area[..nul])
        .map_err(|e| bad(format!("{which}: JSON does not parse: {e}")))?;
    let meta = Metadata::from_value(doc, hdr_size).map_err(|e| match e {
        MetadataError::Invalid(r) => bad(format!("{which}: {r}")),
        MetadataError::Unsupported(what) => LuksError::Unsupported {
            device: device.into(),
            what,
        },
    })?;
    let mut salt = [0u8; 64];
    salt.copy_from_slice(&bin[104..168]);
    let binary = BinaryHeader {
        hdr_size,
        seqid: be64(&bin, 16),
        label: text(24..72, "label")?,
        checksum_alg,
        salt,
        uuid: text(168..208, "uuid")?,
        subsystem: text(208..256, "subsystem")?,
        hdr_offset,
    };
    Ok(Some((binary, meta)))
}

/// Where a fresh layout with these sizes puts the data segment: the
/// default 16 MiB, or both header copies plus the keyslots area rounded
/// up to a MiB.
pub fn layout_data_offset(hdr_size: u64, keyslots_size: Option<u64>) -> u64 {
    match keyslots_size {
        None => DEFAULT_DATA_OFFSET.max((2 * hdr_size).div_ceil(1 << 20) * (1 << 20)),
        Some(k) => (2 * hdr_size + k).div_ceil(1 << 20) * (1 << 20),
    }
}

impl Luks2Header {
    /// Reads both copies and keeps the newest valid one. A damaged primary
    /// is recovered from a secondary found at any allowed offset.
    pub fn read(disk: &dyn Disk) -> Result<Luks2Header, LuksError> {
        let device = disk.name();
        let size = disk
            .size()
            .map_err(|e| io_err(device, "reading the device size", e))?;
        let primary = read_copy(disk, 0, &MAGIC_PRIMARY, size);
        let secondary = match &primary {
            Ok(Some((b, _))) => read_copy(disk, b.hdr_size, &MAGIC_SECONDARY, size),
            _ => {
                let mut found = Ok(None);
                for off in ALLOWED_HDR_SIZES {
                    match read_copy(disk, off, &MAGIC_SECONDARY, size) {
                        Ok(None) => continue,
                        other => {
                            found = other;
                            if found.as_ref().is_ok_and(Option::is_some) {
                                break;
                            }
                        }
                    }
                }
                found
            }
        };
        let p_ok = matches!(primary, Ok(Some(_)));
        let s_ok = matches!(secondary, Ok(Some(_)));
        let (p, s) = (primary.ok().flatten(), secondary);
        let (chosen, other_salt) = match (p, s) {
            (Some(p), Ok(Some(s))) => {
                let s_salt = s.0.salt;
                if s.0.seqid > p.0.seqid {
                    (s, p.0.salt)
                } else {
                    (p, s_salt)
                }
            }
            (Some(p), _) => {
                let salt = p.0.salt;
                (p, salt)
            }
            (None, Ok(Some(s))) => {
                let salt = s.0.salt;
                (s, salt)
            }
            (None, Err(e)) => return Err(e),
            (None, Ok(None)) => {
                // Re-read the primary to report why it failed, if it has magic.
                return match read_copy(disk, 0, &MAGIC_PRIMARY, size) {
                    Err(e) => Err(e),
                    _ => Err(LuksError::NotLuks {
                        device: device.into(),
                    }),
                };
            }
        };
        let (mut binary, meta) = chosen;
        let secondary_salt = if binary.hdr_offset == 0 {
            other_salt
        } else {
            binary.salt
        };
        if binary.hdr_offset != 0 {
            binary.salt = other_salt;
            binary.hdr_offset = 0;
        }
        Ok(Luks2Header {
            binary,
            secondary_salt,
            copies_valid: (p_ok, s_ok),
            meta,
        })
    }

    /// Data offset of the first segment.
    pub fn data_offset(&self) -> u64 {
        self.meta
            .segments
            .values()
            .map(|s| s.offset)
            .min()
            .unwrap_or(0)
    }

    /// Volume key length: that of the keyslots bound to the data
    /// segment's digest (an unbound keyslot may hold a key of any size).
    pub fn key_bytes(&self) -> usize {
        let bound = self.segment_digest().map(|(_, d)| d.keyslots.clone());
        self.meta
            .keyslots
            .iter()
            .find(|(id, _)| bound.as_ref().is_some_and(|b| b.contains(id)))
            .map(|(_, k)| k.key_size)
            .unwrap_or(0)
    }

    /// Segment encryption of the first segment.
    pub fn cipher(&self) -> String {
        self.meta
            .segments
            .values()
            .next()
            .map(|s| s.encryption.clone())
            .unwrap_or_default()
    }

    /// End of metadata and keyslot areas.
    pub fn metadata_end(&self) -> u64 {
        2 * self.binary.hdr_size + self.meta.keyslots_size
    }

    fn area(k: &Keyslot) -> AreaSpec {
        AreaSpec {
            offset: k.area_offset,
            cipher: k.area_cipher,
            af_hash: k.af_hash,
            stripes: k.stripes,
            key_len: k.key_size,
        }
    }

    /// Tries keyslots in priority order (high, then normal; `ignore` only
    /// when asked for by number) and returns the first verified key.
    pub fn unlock(
        &self,
        disk: &dyn Disk,
        passphrase: &[u8],
        only_slot: Option<u32>,
        limits: &KdfLimits,
    ) -> Result<(u32, VolumeKey), LuksError> {
        // Only a keyslot whose digest is bound to the data segment holds the
        // volume key: an unbound keyslot (`cryptsetup luksAddKey --unbound`)
        // opens with its passphrase and verifies against its own digest, but
        // its key is not the segment's, and mapping the volume with it
        // would show the guest noise.
        let bound = self.segment_digest();
        if let Some(s) = only_slot
            && self.meta.keyslots.contains_key(&s)
            && bound.is_none_or(|(_, d)| !d.keyslots.contains(&s))
        {
            return Err(LuksError::InvalidArgument {
                device: disk.name().into(),
                reason: format!(
                    "keyslot {s} is unbound: its key is not the volume key of the data segment"
                ),
            });
        }
        let Some((digest_id, digest)) = bound else {
            return Err(LuksError::InvalidHeader {
                device: disk.name().into(),
                version: 2,
                reason: "no digest is bound to the data segment".into(),
            });
        };
        let mut order: Vec<(&u32, &Keyslot)> = self
            .meta
            .keyslots
            .iter()
            .filter(|(id, _)| digest.keyslots.contains(id))
            .filter(|(id, k)| match only_slot {
                Some(s) => **id == s,
                None => k.priority > 0,
            })
            .collect();
        order.sort_by_key(|(id, k)| (std::cmp::Reverse(k.priority), **id));
        let kdf = Kdf::Pbkdf2 {
            hash: digest.hash,
            iterations: digest.iterations,
        };
        keyslot::check_digest(
            disk,
            &format!("digest {digest_id}"),
            &kdf,
            digest.digest.len(),
            limits,
        )?;
        let size = disk
            .size()
            .map_err(|e| io_err(disk.name(), "reading the device size", e))?;
        let candidates = order.into_iter().map(|(id, k)| {
            let area = Self::area(k);
            if area.offset + area.material_len() > size {
                return Err(LuksError::TooSmall {
                    device: disk.name().into(),
                    what: format!("keyslot {id} area"),
                    needed: area.offset + area.material_len(),
                    size,
                });
            }
            Ok(keyslot::Candidate {
                slot: *id,
                kdf: k.kdf,
                salt: &k.salt,
                area,
            })
        });
        keyslot::first_opening(disk, candidates, limits, passphrase, |slot, key| {
            self.key_matches_slot(slot, key)
        })
    }

    /// The digest bound to the data segment (the first one), whose
    /// keyslots hold its volume key.
    pub fn segment_digest(&self) -> Option<(u32, &metadata::Digest)> {
        let segment = *self.meta.segments.keys().next()?;
        self.meta
            .digests
            .iter()
            .find(|(_, d)| d.segments.contains(&segment))
            .map(|(id, d)| (*id, d))
    }

    /// Whether keyslot `slot` is bound to the data segment's digest.
    pub fn is_bound(&self, slot: u32) -> bool {
        self.segment_digest()
            .is_some_and(|(_, d)| d.keyslots.contains(&slot))
    }

    fn key_matches_slot(&self, slot: u32, key: &VolumeKey) -> bool {
        match self.meta.digest_for(slot) {
            Some((_, d)) => keyslot::digest_matches(key, d.hash, &d.salt, d.iterations, &d.digest),
            None => false,
        }
    }

    /// Whether `key` is the volume key of the segments.
    pub fn key_matches(&self, key: &VolumeKey) -> bool {
        self.meta.digests.values().any(|d| {
            d.segments
                .iter()
                .any(|s| self.meta.segments.contains_key(s))
                && keyslot::digest_matches(key, d.hash, &d.salt, d.iterations, &d.digest)
        })
    }

    /// Writes both copies with `seqid + 1`: primary, flush, secondary,
    /// flush. Whichever write a crash interrupts, the other copy is valid
    /// and the reader picks the newest valid one.
    pub fn write(&mut self, disk: &dyn Disk) -> Result<(), LuksError> {
        self.write_copies(disk, true)
    }

    /// Writes both copies of a header that replaces no valid one (format),
    /// with a single flush: a crash before it leaves no valid header, which
    /// is what an interrupted format must leave.
    pub fn write_new(&mut self, disk: &dyn Disk) -> Result<(), LuksError> {
        self.write_copies(disk, false)?;
        disk.sync()
            .map_err(|e| io_err(disk.name(), "flushing the LUKS2 header", e))
    }

    fn write_copies(&mut self, disk: &dyn Disk, flush_each: bool) -> Result<(), LuksError> {
        let device = disk.name();
        let text = self.meta.to_text();
        let json_room = self.binary.hdr_size as usize - BINARY_LEN;
        if text.len() >= json_room {
            return Err(LuksError::Refused {
                device: device.into(),
                reason: format!(
                    "metadata of {} bytes does not fit the {json_room}-byte JSON area",
                    text.len()
                ),
            });
        }
        self.binary.seqid += 1;
        for (offset, magic, salt) in [
            (0, MAGIC_PRIMARY, self.binary.salt),
            (self.binary.hdr_size, MAGIC_SECONDARY, self.secondary_salt),
        ] {
            let copy = self.serialize(&text, offset, &magic, &salt);
            disk.write_at(&copy, offset)
                .map_err(|e| io_err(device, format!("writing the LUKS2 header at {offset}"), e))?;
            if flush_each {
                disk.sync()
                    .map_err(|e| io_err(device, "flushing the LUKS2 header", e))?;
            }
        }
        self.copies_valid = (true, true);
        Ok(())
    }

    fn serialize(&self, json: &str, offset: u64, magic: &[u8; 6], salt: &[u8; 64]) -> Vec<u8> {
        let b = &self.binary;
        let mut area = vec![0u8; b.hdr_size as usize];
        area[..6].copy_from_slice(magic);
        area[6..8].copy_from_slice(&2u16.to_be_bytes());
        area[8..16].copy_from_slice(&b.hdr_size.to_be_bytes());
        area[16..24].copy_from_slice(&b.seqid.to_be_bytes());
        put(&mut area[24..72], &b.label);
        put(&mut area[72..104], "sha256");
        area[104..168].copy_from_slice(salt);
        put(&mut area[168..208], &b.uuid);
        put(&mut area[208..256], &b.subsystem);
        area[256..264].copy_from_slice(&offset.to_be_bytes());
        area[BINARY_LEN..BINARY_LEN + json.len()].copy_from_slice(json.as_bytes());
        let csum = Sha256::digest(&area);
        area[CSUM_AT..CSUM_AT + 32].copy_from_slice(&csum);
        area
    }

    /// A lowest free keyslot area of `len` bytes, 4 KiB aligned.
    fn free_area(&self, len: u64) -> Option<u64> {
        let start = 2 * self.binary.hdr_size;
        let end = self.metadata_end();
        let mut used: Vec<(u64, u64)> = self
            .meta
            .keyslots
            .values()
            .map(|k| (k.area_offset, k.area_offset + k.area_size))
            .collect();
        used.sort();
        let mut candidate = start;
        for (a, b) in used {
            if candidate + len <= a {
                break;
            }
            candidate = candidate.max(b.div_ceil(KEYSLOT_ALIGN) * KEYSLOT_ALIGN);
        }
        (candidate + len <= end).then_some(candidate)
    }

    /// Lowest unused keyslot number.
    pub fn free_slot(&self) -> Option<u32> {
        (0..metadata::MAX_KEYSLOTS).find(|i| !self.meta.keyslots.contains_key(i))
    }

    /// Stores `key` under `passphrase` in a new keyslot: area first,
    /// flushed, then the header that references it.
    pub fn store_keyslot(
        &mut self,
        disk: &dyn Disk,
        slot: u32,
        kdf: Kdf,
        passphrase: &[u8],
        key: &VolumeKey,
    ) -> Result<(), LuksError> {
        self.prepare_keyslot(disk, slot, kdf, passphrase, key)?;
        self.write(disk)
    }

    /// Writes and flushes the area of a new keyslot and adds it to the
    /// metadata in memory; the caller writes the header.
    pub fn prepare_keyslot(
        &mut self,
        disk: &dyn Disk,
        slot: u32,
        kdf: Kdf,
        passphrase: &[u8],
        key: &VolumeKey,
    ) -> Result<(), LuksError> {
        let device = disk.name();
        if slot >= metadata::MAX_KEYSLOTS {
            return Err(LuksError::InvalidArgument {
                device: device.into(),
                reason: format!("LUKS2 has no keyslot {slot}"),
            });
        }
        if self.meta.keyslots.contains_key(&slot) {
            return Err(LuksError::Refused {
                device: device.into(),
                reason: format!("keyslot {slot} is in use"),
            });
        }
        let Some((digest_id, _)) =
            self.meta.digests.iter().find(|(_, d)| {
                keyslot::digest_matches(key, d.hash, &d.salt, d.iterations, &d.digest)
            })
        else {
            return Err(LuksError::InvalidArgument {
                device: device.into(),
                reason: "key does not match any digest".into(),
            });
        };
        let digest_id = *digest_id;
        let area_cipher = match self.meta.keyslots.values().next() {
            Some(k) => k.area_cipher,
            None => CipherSpec::parse(&self.cipher(), key.len())
                .or_else(|_| CipherSpec::parse("aes-xts-plain64", 64))
                .map_err(|e| LuksError::Unsupported {
                    device: device.into(),
                    what: e.to_string(),
                })?,
        };
        let area_cipher = if area_cipher.key_bytes == key.len() {
            area_cipher
        } else {
            CipherSpec::parse(&area_cipher.full_name(), key.len()).unwrap_or(area_cipher)
        };
        let area_size = (af_sectors(key.len(), STRIPES) * SECTOR as u64).div_ceil(KEYSLOT_ALIGN)
            * KEYSLOT_ALIGN;
        let Some(area_offset) = self.free_area(area_size) else {
            return Err(LuksError::Refused {
                device: device.into(),
                reason: "no free space in the keyslots area".into(),
            });
        };
        let ks = Keyslot {
            key_size: key.len(),
            af_hash: HashAlg::Sha256,
            stripes: STRIPES,
            area_offset,
            area_size,
            area_cipher,
            kdf,
            salt: keyslot::random_bytes(device, SALT_LEN)?,
            priority: 1,
        };
        keyslot::wipe_random(disk, ks.area_offset, ks.area_size)?;
        keyslot::store_area(disk, &ks.kdf, &ks.salt, &Self::area(&ks), passphrase, key)?;
        disk.sync()
            .map_err(|e| io_err(device, "flushing keyslot material", e))?;

        let mut doc = self.meta.doc.clone();
        section(&mut doc, "keyslots").insert(slot.to_string(), metadata::keyslot_json(&ks));
        sort_numeric(section(&mut doc, "keyslots"));
        if let Some(Value::Array(list)) = section(&mut doc, "digests")
            .get_mut(&digest_id.to_string())
            .and_then(|d| d.get_mut("keyslots"))
        {
            list.push(Value::String(slot.to_string()));
        }
        self.replace_doc(device, doc)
    }

    /// Removes `slot` from the header (and from digests and tokens), writes
    /// it, then wipes the area.
    pub fn destroy_keyslot(&mut self, disk: &dyn Disk, slot: u32) -> Result<(), LuksError> {
        let device = disk.name();
        let Some(ks) = self.meta.keyslots.get(&slot).cloned() else {
            return Err(LuksError::InvalidArgument {
                device: device.into(),
                reason: format!("keyslot {slot} is not in use"),
            });
        };
        let mut doc = self.meta.doc.clone();
        section(&mut doc, "keyslots").remove(&slot.to_string());
        let name = Value::String(slot.to_string());
        for sec in ["digests", "tokens"] {
            for entry in section(&mut doc, sec).values_mut() {
                if let Some(Value::Array(list)) = entry.get_mut("keyslots") {
                    list.retain(|v| *v != name);
                }
            }
        }
        self.replace_doc(device, doc)?;
        self.write(disk)?;
        keyslot::wipe_random(disk, ks.area_offset, ks.area_size)?;
        disk.sync()
            .map_err(|e| io_err(device, "flushing keyslot wipe", e))
    }

    fn replace_doc(&mut self, device: &str, doc: Value) -> Result<(), LuksError> {
        self.meta = Metadata::from_value(doc, self.binary.hdr_size).map_err(|e| match e {
            MetadataError::Invalid(r) | MetadataError::Unsupported(r) => {
                invalid(device, 2, format!("edited metadata does not validate: {r}"))
            }
        })?;
        Ok(())
    }

    /// Builds a fresh header for `key`, without keyslots.
    #[allow(clippy::too_many_arguments)]
    pub fn new_layout(
        device: &str,
        cipher: CipherSpec,
        digest_hash: HashAlg,
        key: &VolumeKey,
        digest_iterations: u32,
        uuid: &str,
        sector_size: u32,
        hdr_size: u64,
        keyslots_size: Option<u64>,
        key_id: Option<&str>,
    ) -> Result<Luks2Header, LuksError> {
        let arg = |reason: String| LuksError::InvalidArgument {
            device: device.into(),
            reason,
        };
        if !ALLOWED_HDR_SIZES.contains(&hdr_size) {
            return Err(arg(format!(
                "metadata size {hdr_size} is not an allowed LUKS2 header size"
            )));
        }
        if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(arg(format!(
                "sector size {sector_size} is not 512, 1024, 2048 or 4096"
            )));
        }
        let (keyslots_size, data_offset) = match keyslots_size {
            None => {
                let data = layout_data_offset(hdr_size, None);
                (data - 2 * hdr_size, data)
            }
            Some(k) if k % KEYSLOT_ALIGN == 0 && k > 0 => {
                (k, layout_data_offset(hdr_size, Some(k)))
            }
            Some(k) => {
                return Err(arg(format!(
                    "keyslots size {k} is not a positive multiple of 4096"
                )));
            }
        };
        let salt = keyslot::random_bytes(device, SALT_LEN)?;
        let digest = Digest {
            keyslots: vec![],
            segments: vec![0],
            hash: digest_hash,
            iterations: digest_iterations,
            digest: keyslot::digest(
                key,
                digest_hash,
                &salt,
                digest_iterations,
                digest_hash.output_len(),
            ),
            salt,
        };
        let mut tokens = Map::new();
        if let Some(id) = key_id {
            tokens.insert(
                "0".into(),
                serde_json::json!({ "type": TOKEN_TYPE, "keyslots": [], "key_id": id }),
            );
        }
        let doc = serde_json::json!({
            "keyslots": {},
            "tokens": Value::Object(tokens),
            "segments": { "0": {
                "type": "crypt",
                "offset": data_offset.to_string(),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": cipher.full_name(),
                "sector_size": sector_size,
            }},
            "digests": { "0": metadata::digest_json(&digest) },
            "config": {
                "json_size": (hdr_size - BINARY_LEN as u64).to_string(),
                "keyslots_size": keyslots_size.to_string(),
            },
        });
        let meta = Metadata::from_value(doc, hdr_size).map_err(|e| match e {
            MetadataError::Invalid(r) | MetadataError::Unsupported(r) => arg(r),
        })?;
        let mut salts = [[0u8; 64]; 2];
        for s in &mut salts {
            s.copy_from_slice(&keyslot::random_bytes(device, 64)?);
        }
        Ok(Luks2Header {
            binary: BinaryHeader {
                hdr_size,
                seqid: 0,
                label: String::new(),
                checksum_alg: "sha256".into(),
                salt: salts[0],
                uuid: uuid.to_string(),
                subsystem: String::new(),
                hdr_offset: 0,
            },
            secondary_salt: salts[1],
            copies_valid: (false, false),
            meta,
        })
    }

    /// Adds our token's reference to `slot` (used right after format, when
    /// the token was created before the first keyslot existed).
    pub fn link_token_to_keyslot(&mut self, device: &str, slot: u32) -> Result<(), LuksError> {
        let mut doc = self.meta.doc.clone();
        for entry in section(&mut doc, "tokens").values_mut() {
            if entry.get("type").and_then(Value::as_str) == Some(TOKEN_TYPE)
                && let Some(Value::Array(list)) = entry.get_mut("keyslots")
            {
                list.push(Value::String(slot.to_string()));
            }
        }
        self.replace_doc(device, doc)
    }
}

fn section<'a>(doc: &'a mut Value, name: &str) -> &'a mut Map<String, Value> {
    match doc.get_mut(name) {
        Some(Value::Object(m)) => m,
        _ => unreachable!("validated metadata has every section"),
    }
}

/// Keeps numbered objects in numeric order, as cryptsetup prints them.
fn sort_numeric(map: &mut Map<String, Value>) {
    let mut entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
    entries.sort_by_key(|(k, _)| k.parse::<u64>().unwrap_or(u64::MAX));
    map.extend(entries);
}

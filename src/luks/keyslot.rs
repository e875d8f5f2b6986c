//! The keyslot machinery both LUKS versions share: a passphrase-derived key
//! decrypts an anti-forensic area that merges into the volume key, and the
//! reverse for storing a key.

use subtle::ConstantTimeEq;

use super::af;
use super::cipher::{CipherSpec, SECTOR, fill_random_fast};
use super::disk::Disk;
use super::error::{LuksError, io_err};
use super::hash::HashAlg;
use super::kdf::{Kdf, KdfLimits};
use crate::secret::{SecretBytes, VolumeKey};

/// Stripe count every LUKS implementation uses.
pub const STRIPES: usize = 4000;

/// Where and how one keyslot's key material is stored.
#[derive(Clone, Debug)]
pub struct AreaSpec {
    /// Byte offset of the area on the device.
    pub offset: u64,
    /// Cipher of the area (and its key length).
    pub cipher: CipherSpec,
    /// AF hash.
    pub af_hash: HashAlg,
    /// AF stripes.
    pub stripes: usize,
    /// Length of the key stored in the area.
    pub key_len: usize,
}

impl AreaSpec {
    /// Bytes of AF material, rounded up to whole sectors.
    pub fn material_len(&self) -> u64 {
        af_sectors(self.key_len, self.stripes) * SECTOR as u64
    }
}

/// Sectors needed for `key_len * stripes` bytes of AF material.
pub fn af_sectors(key_len: usize, stripes: usize) -> u64 {
    ((key_len as u64) * (stripes as u64)).div_ceil(SECTOR as u64)
}

/// Refuses a digest whose PBKDF2 (as costly as a keyslot's KDF: a hostile
/// header must not get around the limits through it) is outside the
/// limits or would run too long, before any KDF runs.
pub fn check_digest(
    disk: &dyn Disk,
    what: &str,
    kdf: &Kdf,
    len: usize,
    limits: &KdfLimits,
) -> Result<(), LuksError> {
    kdf.check(limits)
        .and_then(|()| kdf.check_time(len, limits))
        .map_err(|source| LuksError::Kdf {
            device: disk.name().into(),
            what: what.into(),
            source,
        })
}

/// One keyslot to try: its number, KDF, salt and area.
pub struct Candidate<'a> {
    /// Keyslot number.
    pub slot: u32,
    /// Its KDF.
    pub kdf: Kdf,
    /// Its KDF salt.
    pub salt: &'a [u8],
    /// Its area.
    pub area: AreaSpec,
}

/// Tries `candidates` in order and returns the first key `verifies`
/// accepts. A keyslot whose KDF is refused (too slow, too much memory) is
/// skipped, not run: another may still open; if none does, the first
/// refusal is the answer, else a wrong passphrase.
pub fn first_opening<'a>(
    disk: &dyn Disk,
    candidates: impl IntoIterator<Item = Result<Candidate<'a>, LuksError>>,
    limits: &KdfLimits,
    passphrase: &[u8],
    verifies: impl Fn(u32, &VolumeKey) -> bool,
) -> Result<(u32, VolumeKey), LuksError> {
    let mut refused = None;
    for c in candidates {
        let c = c?;
        let key = match open_area(disk, c.slot, &c.kdf, limits, c.salt, &c.area, passphrase) {
            Ok(k) => k,
            Err(e @ LuksError::Kdf { .. }) => {
                refused.get_or_insert(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if verifies(c.slot, &key) {
            return Ok((c.slot, key));
        }
    }
    Err(refused.unwrap_or_else(|| LuksError::WrongPassphrase {
        device: disk.name().into(),
    }))
}

/// Derives the area key from the passphrase and decrypts the area into a
/// candidate volume key. The caller checks it against the digest.
pub fn open_area(
    disk: &dyn Disk,
    slot: u32,
    kdf: &Kdf,
    limits: &KdfLimits,
    salt: &[u8],
    area: &AreaSpec,
    passphrase: &[u8],
) -> Result<VolumeKey, LuksError> {
    let device = disk.name();
    let what = || format!("keyslot {slot}");
    kdf.check(limits)
        .and_then(|()| kdf.check_time(area.cipher.key_bytes, limits))
        .map_err(|source| LuksError::Kdf {
            device: device.into(),
            what: what(),
            source,
        })?;
    // AF material is at most 512 bytes x 4000 stripes (checked by the
    // header parsers), so this length always fits.
    let len = area.material_len() as usize;
    let mut material = SecretBytes::zeroed(len);
    disk.read_at(material.expose_mut(), area.offset)
        .map_err(|e| {
            io_err(
                device,
                format!("reading keyslot {slot} area at offset {}", area.offset),
                e,
            )
        })?;
    let area_key = kdf
        .derive(passphrase, salt, area.cipher.key_bytes)
        .map_err(|source| LuksError::Kdf {
            device: device.into(),
            what: what(),
            source,
        })?;
    area.cipher
        .with_key(area_key.expose())
        .decrypt(material.expose_mut(), SECTOR, 0);
    let key = af::merge(material.expose(), area.key_len, area.stripes, area.af_hash);
    Ok(VolumeKey::new(key))
}

/// Splits `key`, encrypts it under a key derived from the passphrase and
/// writes the area. Returns nothing; the header that activates the slot is
/// written by the caller afterwards, so a crash here leaves the slot unused.
pub fn store_area(
    disk: &dyn Disk,
    kdf: &Kdf,
    salt: &[u8],
    area: &AreaSpec,
    passphrase: &[u8],
    key: &VolumeKey,
) -> Result<(), LuksError> {
    let device = disk.name();
    let random = |_| LuksError::Random {
        device: device.into(),
    };
    let area_key = kdf
        .derive(passphrase, salt, area.cipher.key_bytes)
        .map_err(|source| LuksError::Kdf {
            device: device.into(),
            what: "new keyslot".into(),
            source,
        })?;
    let split = af::split(key.expose(), area.stripes, area.af_hash).map_err(random)?;
    let len = usize::try_from(area.material_len()).unwrap_or(usize::MAX);
    let mut material = SecretBytes::zeroed(len);
    // The tail past the AF data up to the sector boundary is random too, as
    // cryptsetup leaves it.
    fill_random_fast(material.expose_mut()).map_err(random)?;
    material.expose_mut()[..split.len()].copy_from_slice(split.expose());
    area.cipher
        .with_key(area_key.expose())
        .encrypt(material.expose_mut(), SECTOR, 0);
    disk.write_bulk_at(material.expose(), area.offset)
        .map_err(|e| {
            io_err(
                device,
                format!("writing keyslot area at offset {}", area.offset),
                e,
            )
        })
}

/// Overwrites `len` bytes at `offset` with random data (keyslot wipe).
pub fn wipe_random(disk: &dyn Disk, offset: u64, len: u64) -> Result<(), LuksError> {
    const CHUNK: u64 = 1 << 20;
    let device = disk.name();
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        fill_random_fast(&mut buf[..n]).map_err(|_| LuksError::Random {
            device: device.into(),
        })?;
        disk.write_bulk_at(&buf[..n], offset + done).map_err(|e| {
            io_err(
                device,
                format!("wiping keyslot area at offset {}", offset + done),
                e,
            )
        })?;
        done += n as u64;
    }
    Ok(())
}

/// Makes `len` bytes at `offset` read as zeros.
pub fn wipe_zero(disk: &dyn Disk, offset: u64, len: u64) -> Result<(), LuksError> {
    disk.zero_range(offset, len).map_err(|e| {
        io_err(
            disk.name(),
            format!("zeroing {len} bytes at offset {offset}"),
            e,
        )
    })
}

/// PBKDF2 digest of a candidate volume key compared in constant time.
pub fn digest_matches(
    key: &VolumeKey,
    hash: HashAlg,
    salt: &[u8],
    iterations: u32,
    expected: &[u8],
) -> bool {
    let mut computed = vec![0u8; expected.len()];
    hash.pbkdf2(key.expose(), salt, iterations, &mut computed);
    bool::from(computed.ct_eq(expected))
}

/// Computes a PBKDF2 digest of `key` of `len` bytes.
pub fn digest(key: &VolumeKey, hash: HashAlg, salt: &[u8], iterations: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    hash.pbkdf2(key.expose(), salt, iterations, &mut out);
    out
}

/// Random bytes for salts.
pub fn random_bytes(device: &str, len: usize) -> Result<Vec<u8>, LuksError> {
    let mut v = vec![0u8; len];
    getrandom::fill(&mut v).map_err(|_| LuksError::Random {
        device: device.into(),
    })?;
    Ok(v)
}

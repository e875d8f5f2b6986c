//! Block encryption of LUKS keyslot areas (and, for tests and tools, of data
//! sectors): the cipher specifications that LUKS volumes in the wild use.

use aes::cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit, StreamCipher, consts::U16,
};
use aes::{Aes128, Aes192, Aes256};
use sha2::{Digest, Sha256};
use xts_mode::{Xts128, get_tweak_default};

use crate::secret::SecretBytes;

/// Chaining mode and IV generator of a supported cipher specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    /// `xts-plain64`: XTS, tweak = 64-bit little-endian sector number.
    XtsPlain64,
    /// `cbc-essiv:sha256`: CBC, IV = AES-256_{sha256(key)}(sector number).
    CbcEssivSha256,
}

/// A validated cipher specification: AES in one of the supported modes with
/// a key length that mode accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// Mode and IV generator.
    pub mode: CipherMode,
    /// Length of the whole key in bytes (for XTS both halves together).
    pub key_bytes: usize,
}

/// Why a cipher specification cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CipherSpecError {
    /// `cipher_null`: a keyslot or segment that does not encrypt at all.
    #[error("cipher '{0}' does not encrypt (null cipher); refusing it")]
    Null(String),
    /// Anything we do not implement.
    #[error("unsupported cipher '{0}'")]
    Unsupported(String),
    /// Key length the mode does not accept.
    #[error("cipher '{spec}' cannot use a {bits}-bit key")]
    KeySize {
        /// The cipher as written.
        spec: String,
        /// The key length asked for.
        bits: usize,
    },
}

impl CipherSpec {
    /// Parses a combined specification such as `aes-xts-plain64`.
    pub fn parse(spec: &str, key_bytes: usize) -> Result<CipherSpec, CipherSpecError> {
        let (name, mode) = spec.split_once('-').unwrap_or((spec, ""));
        Self::parse_parts(name, mode, key_bytes)
    }

    /// Parses LUKS1's separate cipher name and mode fields.
    pub fn parse_parts(
        name: &str,
        mode: &str,
        key_bytes: usize,
    ) -> Result<CipherSpec, CipherSpecError> {
        let full = if mode.is_empty() {
            name.to_string()
        } else {
            format!("{name}-{mode}")
        };
        if name.starts_with("cipher_null") || name == "null" {
            return Err(CipherSpecError::Null(full));
        }
        if name != "aes" {
            return Err(CipherSpecError::Unsupported(full));
        }
        let mode = match mode {
            "xts-plain64" => CipherMode::XtsPlain64,
            "cbc-essiv:sha256" => CipherMode::CbcEssivSha256,
            _ => return Err(CipherSpecError::Unsupported(full)),
        };
        let ok = match mode {
            CipherMode::XtsPlain64 => matches!(key_bytes, 32 | 64),
            CipherMode::CbcEssivSha256 => matches!(key_bytes, 16 | 24 | 32),
        };
        if !ok {
            return Err(CipherSpecError::KeySize {
                spec: full,
                bits: key_bytes * 8,
            });
        }
        Ok(CipherSpec { mode, key_bytes })
    }

    /// The cipher name field (`aes`).
    pub fn cipher_name(&self) -> &'static str {
        "aes"
    }

    /// The mode field (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            CipherMode::XtsPlain64 => "xts-plain64",
            CipherMode::CbcEssivSha256 => "cbc-essiv:sha256",
        }
    }

    /// The combined form (`aes-xts-plain64`).
    pub fn full_name(&self) -> String {
        format!("{}-{}", self.cipher_name(), self.mode_name())
    }

    /// Keys a sector cipher; `key` must be `key_bytes` long.
    pub fn with_key(&self, key: &[u8]) -> SectorCipher {
        assert_eq!(
            key.len(),
            self.key_bytes,
            "key length checked by the caller"
        );
        let inner = match (self.mode, key.len()) {
            (CipherMode::XtsPlain64, 32) => Inner::Xts128(Box::new(Xts128::new(
                aes_key::<Aes128>(&key[..16]),
                aes_key::<Aes128>(&key[16..]),
            ))),
            (CipherMode::XtsPlain64, _) => Inner::Xts256(Box::new(Xts128::new(
                aes_key::<Aes256>(&key[..32]),
                aes_key::<Aes256>(&key[32..]),
            ))),
            (CipherMode::CbcEssivSha256, n) => {
                let essiv_key = Sha256::digest(key);
                let essiv = aes_key::<Aes256>(&essiv_key);
                let data = match n {
                    16 => Cbc::Aes128(aes_key::<Aes128>(key)),
                    24 => Cbc::Aes192(aes_key::<Aes192>(key)),
                    _ => Cbc::Aes256(aes_key::<Aes256>(key)),
                };
                Inner::CbcEssiv {
                    data: Box::new(data),
                    essiv: Box::new(essiv),
                }
            }
        };
        SectorCipher { inner }
    }
}

fn aes_key<C: KeyInit>(key: &[u8]) -> C {
    C::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("AES key lengths are fixed by CipherSpec"))
}

enum Cbc {
    Aes128(Aes128),
    Aes192(Aes192),
    Aes256(Aes256),
}

enum Inner {
    Xts128(Box<Xts128<Aes128>>),
    Xts256(Box<Xts128<Aes256>>),
    CbcEssiv { data: Box<Cbc>, essiv: Box<Aes256> },
}

/// A keyed cipher that encrypts or decrypts whole 512-byte-addressed sectors.
/// The AES crates zeroize their round keys on drop.
pub struct SectorCipher {
    inner: Inner,
}

/// The sector size in which LUKS IVs count (keyslot areas always use 512).
pub const SECTOR: usize = 512;

impl SectorCipher {
    /// Decrypts `buf` (a multiple of `sector_size`), whose first sector has
    /// IV number `first_iv`; IVs advance by `sector_size / 512` per sector
    /// unless `large_iv` is set (LUKS2 `iv_large_sectors`).
    pub fn decrypt(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.run(buf, sector_size, first_iv, false);
    }

    /// Encrypts `buf`; see [`SectorCipher::decrypt`] for the IV numbering.
    pub fn encrypt(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.run(buf, sector_size, first_iv, true);
    }

    fn run(&self, buf: &mut [u8], sector_size: usize, first_iv: u64, encrypt: bool) {
        for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
            let iv = first_iv.wrapping_add(i as u64);
            match &self.inner {
                Inner::Xts128(x) => xts(x, sector, iv, encrypt),
                Inner::Xts256(x) => xts(x, sector, iv, encrypt),
                Inner::CbcEssiv { data, essiv } => {
                    let mut ivb = Array::<u8, U16>::default();
                    ivb[..8].copy_from_slice(&iv.to_le_bytes());
                    essiv.encrypt_block(&mut ivb);
                    match data.as_ref() {
                        Cbc::Aes128(c) => cbc(c, sector, ivb, encrypt),
                        Cbc::Aes192(c) => cbc(c, sector, ivb, encrypt),
                        Cbc::Aes256(c) => cbc(c, sector, ivb, encrypt),
                    }
                }
            }
        }
    }
}

fn xts<C>(x: &Xts128<C>, sector: &mut [u8], iv: u64, encrypt: bool)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + aes::cipher::BlockSizeUser<BlockSize = U16>,
{
    let tweak = get_tweak_default(u128::from(iv));
    if encrypt {
        x.encrypt_sector(sector, tweak);
    } else {
        x.decrypt_sector(sector, tweak);
    }
}

/// CBC over one sector with the given IV, built from the block cipher: the
/// chaining is a single XOR per block, done here so one keyed AES serves all
/// sectors instead of re-running the key schedule per sector.
fn cbc<C>(c: &C, sector: &mut [u8], iv: Array<u8, U16>, encrypt: bool)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + aes::cipher::BlockSizeUser<BlockSize = U16>,
{
    let mut prev = iv;
    for chunk in sector.chunks_exact_mut(16) {
        let block: &mut Array<u8, U16> = chunk
            .try_into()
            .unwrap_or_else(|_| unreachable!("chunks_exact(16)"));
        if encrypt {
            for (b, p) in block.iter_mut().zip(prev.iter()) {
                *b ^= p;
            }
            c.encrypt_block(block);
            prev = *block;
        } else {
            let saved = *block;
            c.decrypt_block(block);
            for (b, p) in block.iter_mut().zip(prev.iter()) {
                *b ^= p;
            }
            prev = saved;
        }
    }
}

/// Fills `buf` with cryptographically random bytes quickly: an AES-128-CTR
/// keystream under a fresh OS-random key. Used to wipe keyslot areas, where
/// megabytes must look like key material.
pub fn fill_random_fast(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    use aes::cipher::KeyIvInit;
    let seed = SecretBytes::random(32)?;
    let mut stream =
        ctr::Ctr128BE::<Aes128>::new_from_slices(&seed.expose()[..16], &seed.expose()[16..])
            .unwrap_or_else(|_| unreachable!("fixed lengths"));
    buf.iter_mut().for_each(|b| *b = 0);
    stream.apply_keystream(buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_ieee1619_vector_10() {
        // IEEE P1619 XTS-AES-256 vector 10 (sector 0xff, 512 bytes).
        let key = hex::decode(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ))
        .unwrap();
        let spec = CipherSpec::parse("aes-xts-plain64", 64).unwrap();
        let mut buf: Vec<u8> = (0..512).map(|i| i as u8).collect();
        spec.with_key(&key).encrypt(&mut buf, 512, 0xff);
        assert_eq!(hex::encode(&buf[..16]), "1c3b3a102f770386e4836c99e370cf9b");
        spec.with_key(&key).decrypt(&mut buf, 512, 0xff);
        assert!(buf.iter().enumerate().all(|(i, b)| *b == i as u8));
    }

    #[test]
    fn cbc_essiv_round_trip_and_iv_per_sector() {
        let spec = CipherSpec::parse("aes-cbc-essiv:sha256", 32).unwrap();
        let c = spec.with_key(&[7u8; 32]);
        let mut buf = vec![0u8; 1024];
        c.encrypt(&mut buf, 512, 0);
        assert_ne!(buf[..512], buf[512..], "each sector has its own IV");
        c.decrypt(&mut buf, 512, 0);
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn refuses_null_and_unknown() {
        assert!(matches!(
            CipherSpec::parse("cipher_null-ecb", 0),
            Err(CipherSpecError::Null(_))
        ));
        assert!(matches!(
            CipherSpec::parse("serpent-xts-plain64", 64),
            Err(CipherSpecError::Unsupported(_))
        ));
        assert!(matches!(
            CipherSpec::parse("aes-xts-plain64", 16),
            Err(CipherSpecError::KeySize { .. })
        ));
    }
}

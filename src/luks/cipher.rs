//! Block encryption of LUKS keyslot areas (and, for tests and tools, of data
//! sectors): every cipher specification `cipher-chainmode-ivmode` that
//! cryptsetup 2.6/2.7 accepts in LUKS headers and for which RustCrypto has
//! the primitives, with cryptsetup's IV generators
//! (`lib/crypto_backend/crypto_storage.c`).
//!
//! Ciphers: aes, serpent, twofish, camellia, aria, sm4, cast6 (16-byte
//! blocks); cast5, blowfish, des, des3_ede (8-byte blocks). Modes:
//! ecb, cbc, and xts (16-byte blocks). IV generators: null, plain,
//! plain64, plain64be, essiv:HASH, benbi. What stays unsupported is
//! refused by name with the reason: lrw, ctr and the other modes (no
//! RustCrypto implementation), anubis, khazad, seed, tea, xtea (no
//! RustCrypto cipher usable here), `capi:` kernel specifications, and IV generators that are not
//! LUKS's (lmk, tcw, random, eboiv, elephant).
//!
//! IVs count 512-byte sectors whatever the encryption sector size (LUKS
//! never sets `iv_large_sectors`); keyslot areas start at IV 0.

use aes::cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt,
    BlockSizeUser, InnerIvInit, KeyInit, StreamCipher, consts::U16,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

use super::hash::HashAlg;
use crate::secret::SecretBytes;

/// A block cipher a LUKS header can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockCipher {
    /// AES (128, 192, 256-bit keys).
    Aes,
    /// Serpent (128 to 256-bit keys).
    Serpent,
    /// Twofish (128, 192, 256-bit keys).
    Twofish,
    /// Camellia (128, 192, 256-bit keys).
    Camellia,
    /// ARIA (128, 192, 256-bit keys; cryptsetup 2.7).
    Aria,
    /// SM4 (128-bit keys).
    Sm4,
    /// CAST-256 (128 to 256-bit keys in 32-bit steps).
    Cast6,
    /// CAST-128 (40 to 128-bit keys), 8-byte blocks.
    Cast5,
    /// Blowfish (32 to 448-bit keys), 8-byte blocks.
    Blowfish,
    /// DES (64-bit keys), 8-byte blocks.
    Des,
    /// Triple DES EDE (192-bit keys), 8-byte blocks.
    Des3Ede,
}

impl BlockCipher {
    fn parse(name: &str) -> Option<BlockCipher> {
        Some(match name {
            "aes" => BlockCipher::Aes,
            "serpent" => BlockCipher::Serpent,
            "twofish" => BlockCipher::Twofish,
            "camellia" => BlockCipher::Camellia,
            "aria" => BlockCipher::Aria,
            "sm4" => BlockCipher::Sm4,
            "cast6" => BlockCipher::Cast6,
            "cast5" => BlockCipher::Cast5,
            "blowfish" => BlockCipher::Blowfish,
            "des" => BlockCipher::Des,
            "des3_ede" => BlockCipher::Des3Ede,
            _ => return None,
        })
    }

    /// The name as headers and the kernel spell it.
    pub fn name(self) -> &'static str {
        match self {
            BlockCipher::Aes => "aes",
            BlockCipher::Serpent => "serpent",
            BlockCipher::Twofish => "twofish",
            BlockCipher::Camellia => "camellia",
            BlockCipher::Aria => "aria",
            BlockCipher::Sm4 => "sm4",
            BlockCipher::Cast6 => "cast6",
            BlockCipher::Cast5 => "cast5",
            BlockCipher::Blowfish => "blowfish",
            BlockCipher::Des => "des",
            BlockCipher::Des3Ede => "des3_ede",
        }
    }

    /// Block size in bytes.
    pub fn block_size(self) -> usize {
        match self {
            BlockCipher::Cast5
            | BlockCipher::Blowfish
            | BlockCipher::Des
            | BlockCipher::Des3Ede => 8,
            _ => 16,
        }
    }

    /// Whether the cipher takes a key of `len` bytes (the kernel's ranges).
    pub fn key_ok(self, len: usize) -> bool {
        match self {
            BlockCipher::Aes | BlockCipher::Twofish | BlockCipher::Camellia | BlockCipher::Aria => {
                matches!(len, 16 | 24 | 32)
            }
            BlockCipher::Serpent => (16..=32).contains(&len),
            BlockCipher::Sm4 => len == 16,
            BlockCipher::Cast6 => matches!(len, 16 | 20 | 24 | 28 | 32),
            BlockCipher::Cast5 => (5..=16).contains(&len),
            BlockCipher::Blowfish => (4..=56).contains(&len),
            BlockCipher::Des => len == 8,
            BlockCipher::Des3Ede => len == 24,
        }
    }
}

/// The chaining mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainMode {
    /// ECB (no IV).
    Ecb,
    /// CBC.
    Cbc,
    /// XTS (16-byte blocks; the key is two cipher keys).
    Xts,
}

/// The hash of an `essiv:HASH` IV generator: any LUKS hash, or the
/// kernel's truncated Whirlpool names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EssivHash {
    /// A hash by its LUKS name.
    Hash(HashAlg),
    /// `wp256`: Whirlpool's first 32 bytes.
    Wp256,
    /// `wp384`: Whirlpool's first 48 bytes.
    Wp384,
    /// `wp512`: Whirlpool.
    Wp512,
}

impl EssivHash {
    fn parse(name: &str) -> Option<EssivHash> {
        Some(match name {
            "wp256" => EssivHash::Wp256,
            "wp384" => EssivHash::Wp384,
            "wp512" => EssivHash::Wp512,
            other => EssivHash::Hash(HashAlg::parse(other)?),
        })
    }

    fn name(self) -> &'static str {
        match self {
            EssivHash::Hash(h) => h.name(),
            EssivHash::Wp256 => "wp256",
            EssivHash::Wp384 => "wp384",
            EssivHash::Wp512 => "wp512",
        }
    }

    fn output_len(self) -> usize {
        match self {
            EssivHash::Hash(h) => h.output_len(),
            EssivHash::Wp256 => 32,
            EssivHash::Wp384 => 48,
            EssivHash::Wp512 => 64,
        }
    }

    fn digest(self, key: &[u8]) -> SecretBytes {
        let mut out = SecretBytes::zeroed(self.output_len());
        let hash = match self {
            EssivHash::Hash(h) => h,
            _ => HashAlg::Whirlpool,
        };
        hash.digest_into(&[key], out.expose_mut());
        out
    }
}

/// The IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    /// ECB: no IV at all (the specification has no IV part).
    None,
    /// `null`: an all-zero IV.
    Null,
    /// `plain`: the sector number, 32-bit little-endian.
    Plain,
    /// `plain64`: the sector number, 64-bit little-endian.
    Plain64,
    /// `plain64be`: the sector number, 64-bit big-endian, at the end.
    Plain64Be,
    /// `essiv:HASH`: the sector number encrypted with the same cipher under
    /// HASH(volume key).
    Essiv(EssivHash),
    /// `benbi`: the big-endian count of cipher blocks, plus one.
    Benbi,
}

impl IvGen {
    fn parse(text: &str) -> Option<IvGen> {
        Some(match text {
            "null" => IvGen::Null,
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "plain64be" => IvGen::Plain64Be,
            "benbi" => IvGen::Benbi,
            _ => IvGen::Essiv(EssivHash::parse(text.strip_prefix("essiv:")?)?),
        })
    }

    fn name(self) -> String {
        match self {
            IvGen::None => String::new(),
            IvGen::Null => "null".into(),
            IvGen::Plain => "plain".into(),
            IvGen::Plain64 => "plain64".into(),
            IvGen::Plain64Be => "plain64be".into(),
            IvGen::Benbi => "benbi".into(),
            IvGen::Essiv(h) => format!("essiv:{}", h.name()),
        }
    }
}

/// A validated cipher specification: cipher, chaining mode, IV generator
/// and a key length they accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// The block cipher.
    pub cipher: BlockCipher,
    /// The chaining mode.
    pub mode: ChainMode,
    /// The IV generator.
    pub iv: IvGen,
    /// Length of the whole key in bytes (for XTS both halves together).
    pub key_bytes: usize,
}

/// Why a cipher specification cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CipherSpecError {
    /// `cipher_null`: a keyslot or segment that does not encrypt at all.
    #[error("cipher '{0}' does not encrypt (null cipher); refusing it")]
    Null(String),
    /// Valid for cryptsetup or the kernel, but not implemented here; the
    /// text says why.
    #[error("unsupported cipher '{spec}': {why}")]
    Unsupported {
        /// The specification as written.
        spec: String,
        /// What is missing.
        why: String,
    },
    /// Key length the cipher or mode does not accept.
    #[error("cipher '{spec}' cannot use a {bits}-bit key")]
    KeySize {
        /// The cipher as written.
        spec: String,
        /// The key length asked for.
        bits: usize,
    },
}

/// Ciphers the kernel knows and RustCrypto does not implement.
const NO_RUSTCRYPTO_CIPHER: &[&str] = &["anubis", "khazad", "seed", "tea", "xeta", "xtea", "paes"];
/// Chaining modes the kernel knows and we do not implement.
const NO_RUSTCRYPTO_MODE: &[&str] = &["lrw", "ctr", "pcbc", "cts", "hctr2", "xctr", "ofb", "cfb"];
/// IV generators of other on-disk formats (loop-AES, TrueCrypt,
/// BitLocker, dm-integrity).
const NOT_LUKS_IV: &[&str] = &["lmk", "tcw", "random", "eboiv", "elephant"];

impl CipherSpec {
    /// Parses a combined specification such as `aes-xts-plain64`.
    pub fn parse(spec: &str, key_bytes: usize) -> Result<CipherSpec, CipherSpecError> {
        let (name, mode) = spec.split_once('-').unwrap_or((spec, ""));
        Self::parse_parts(name, mode, key_bytes)
    }

    /// Parses LUKS1's separate cipher name and mode fields (the mode
    /// holding chaining mode and IV generator, `xts-plain64`).
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
        let unsupported = |why: &str| CipherSpecError::Unsupported {
            spec: full.clone(),
            why: why.into(),
        };
        if name.starts_with("cipher_null") || name == "null" {
            return Err(CipherSpecError::Null(full));
        }
        if name.starts_with("capi:") {
            return Err(unsupported(
                "kernel crypto API (capi:) specifications are not implemented",
            ));
        }
        let Some(cipher) = BlockCipher::parse(name) else {
            return Err(unsupported(if NO_RUSTCRYPTO_CIPHER.contains(&name) {
                "no RustCrypto implementation of this cipher"
            } else {
                "unknown cipher"
            }));
        };
        let (chain, iv_text) = mode.split_once('-').unwrap_or((mode, ""));
        let chain = match chain {
            "ecb" => ChainMode::Ecb,
            "cbc" => ChainMode::Cbc,
            "xts" => ChainMode::Xts,
            "" => return Err(unsupported("no chaining mode")),
            other if NO_RUSTCRYPTO_MODE.contains(&other) => {
                return Err(unsupported("no RustCrypto implementation of this mode"));
            }
            _ => return Err(unsupported("unknown chaining mode")),
        };
        let iv = match (chain, iv_text) {
            (ChainMode::Ecb, "") => IvGen::None,
            (ChainMode::Ecb, _) => return Err(unsupported("ECB takes no IV")),
            (_, "") => return Err(unsupported("the mode needs an IV generator")),
            (_, text) => match IvGen::parse(text) {
                Some(iv) => iv,
                None if NOT_LUKS_IV.iter().any(|p| text.starts_with(p)) => {
                    return Err(unsupported("an IV generator of another on-disk format"));
                }
                None if text.starts_with("essiv:") => {
                    return Err(unsupported("unknown ESSIV hash"));
                }
                None => return Err(unsupported("unknown IV generator")),
            },
        };
        let key_size = || CipherSpecError::KeySize {
            spec: full.clone(),
            bits: key_bytes * 8,
        };
        if chain == ChainMode::Xts {
            if cipher.block_size() != 16 {
                return Err(unsupported("XTS needs a 16-byte block cipher"));
            }
            if !key_bytes.is_multiple_of(2) || !cipher.key_ok(key_bytes / 2) {
                return Err(key_size());
            }
        } else if !cipher.key_ok(key_bytes) {
            return Err(key_size());
        }
        if let IvGen::Essiv(h) = iv
            && !cipher.key_ok(h.output_len())
        {
            return Err(unsupported(&format!(
                "ESSIV keys the cipher with the {}-bit {} digest, a key length {} does not take",
                h.output_len() * 8,
                h.name(),
                cipher.name()
            )));
        }
        Ok(CipherSpec {
            cipher,
            mode: chain,
            iv,
            key_bytes,
        })
    }

    /// The cipher name field (`aes`).
    pub fn cipher_name(&self) -> &'static str {
        self.cipher.name()
    }

    /// The mode field (`xts-plain64`, `cbc-essiv:sha256`, `ecb`).
    pub fn mode_name(&self) -> String {
        let chain = match self.mode {
            ChainMode::Ecb => "ecb",
            ChainMode::Cbc => "cbc",
            ChainMode::Xts => "xts",
        };
        match self.iv {
            IvGen::None => chain.into(),
            iv => format!("{chain}-{}", iv.name()),
        }
    }

    /// The combined form (`aes-xts-plain64`), as cryptsetup writes it into
    /// LUKS2 headers and loads it into dm-crypt tables.
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
        SectorCipher {
            inner: keyed(self, key),
        }
    }
}

/// A keyed cipher that encrypts or decrypts whole sectors of a buffer.
trait Crypt: Send + Sync {
    fn run(&self, buf: &mut [u8], sector_size: usize, first_iv: u64, encrypt: bool);
}

/// A keyed cipher that encrypts or decrypts whole 512-byte-addressed
/// sectors. The RustCrypto ciphers zeroize their key schedules on drop.
pub struct SectorCipher {
    inner: Box<dyn Crypt>,
}

/// The sector size in which LUKS IVs count (keyslot areas always use 512).
pub const SECTOR: usize = 512;

impl SectorCipher {
    /// Decrypts `buf` (a multiple of `sector_size`), whose first sector has
    /// IV number `first_iv`; IVs advance by one per sector.
    pub fn decrypt(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.inner.run(buf, sector_size, first_iv, false);
    }

    /// Encrypts `buf`; see [`SectorCipher::decrypt`] for the IV numbering.
    pub fn encrypt(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.inner.run(buf, sector_size, first_iv, true);
    }
}

/// One block cipher encryption, whatever the cipher type: the ESSIV
/// cipher is the data cipher's algorithm under a key of the digest's
/// length, which can be another Rust type (AES-128 data, AES-256 ESSIV).
trait OneBlock: Send + Sync {
    fn encrypt(&self, block: &mut [u8]);
}

struct EssivCipher<C>(C);

impl<C: BlockCipherEncrypt + Send + Sync> OneBlock for EssivCipher<C> {
    fn encrypt(&self, block: &mut [u8]) {
        let (blocks, _) = Array::<u8, C::BlockSize>::slice_as_chunks_mut(block);
        for b in blocks {
            self.0.encrypt_block(b);
        }
    }
}

/// The IV of sector `sector` for a cipher with `C`'s block size; ESSIV
/// encrypts it with `essiv`.
fn iv_block<C: BlockCipherEncrypt>(
    iv: IvGen,
    sector: u64,
    essiv: Option<&dyn OneBlock>,
) -> Array<u8, C::BlockSize> {
    let mut b = Array::<u8, C::BlockSize>::default();
    let bs = b.len();
    match iv {
        IvGen::None | IvGen::Null => {}
        IvGen::Plain => b[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
        IvGen::Plain64 => b[..8].copy_from_slice(&sector.to_le_bytes()),
        IvGen::Plain64Be => b[bs - 8..].copy_from_slice(&sector.to_be_bytes()),
        IvGen::Benbi => {
            // Counts cipher blocks of 512-byte sectors, from 1.
            let shift = 9 - bs.trailing_zeros();
            let n = (sector << shift).wrapping_add(1);
            b[bs - 8..].copy_from_slice(&n.to_be_bytes());
        }
        IvGen::Essiv(_) => {
            b[..8].copy_from_slice(&sector.to_le_bytes());
            if let Some(e) = essiv {
                e.encrypt(&mut b);
            }
        }
    }
    b
}

/// ECB or CBC with any block cipher.
struct Chained<C> {
    cipher: C,
    mode: ChainMode,
    iv: IvGen,
    essiv: Option<Box<dyn OneBlock>>,
}

impl<C> Crypt for Chained<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + Clone + Send + Sync,
{
    fn run(&self, buf: &mut [u8], sector_size: usize, first_iv: u64, encrypt: bool) {
        for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
            let (blocks, rest) = Array::<u8, C::BlockSize>::slice_as_chunks_mut(sector);
            debug_assert!(
                rest.is_empty(),
                "sector sizes are multiples of the block size"
            );
            match self.mode {
                ChainMode::Ecb => {
                    for b in blocks {
                        if encrypt {
                            self.cipher.encrypt_block(b);
                        } else {
                            self.cipher.decrypt_block(b);
                        }
                    }
                }
                _ => {
                    let iv = iv_block::<C>(
                        self.iv,
                        first_iv.wrapping_add(i as u64),
                        self.essiv.as_deref(),
                    );
                    if encrypt {
                        cbc::Encryptor::<C>::inner_iv_init(self.cipher.clone(), &iv)
                            .encrypt_blocks(blocks);
                    } else {
                        cbc::Decryptor::<C>::inner_iv_init(self.cipher.clone(), &iv)
                            .decrypt_blocks(blocks);
                    }
                }
            }
        }
    }
}

/// XTS with a 16-byte block cipher; the tweak is the IV.
struct XtsMode<C: BlockSizeUser<BlockSize = U16>> {
    xts: Xts128<C>,
    iv: IvGen,
    essiv: Option<Box<dyn OneBlock>>,
}

impl<C> Crypt for XtsMode<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn run(&self, buf: &mut [u8], sector_size: usize, first_iv: u64, encrypt: bool) {
        for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
            let tweak = iv_block::<C>(
                self.iv,
                first_iv.wrapping_add(i as u64),
                self.essiv.as_deref(),
            );
            if encrypt {
                self.xts.encrypt_sector(sector, tweak);
            } else {
                self.xts.decrypt_sector(sector, tweak);
            }
        }
    }
}

fn new_cipher<C: KeyInit>(key: &[u8]) -> C {
    C::new_from_slice(key).unwrap_or_else(|_| unreachable!("key lengths are checked by CipherSpec"))
}

/// The ESSIV cipher: the same algorithm keyed with HASH(whole key).
fn essiv_of(spec: &CipherSpec, key: &[u8]) -> Option<Box<dyn OneBlock>> {
    let IvGen::Essiv(h) = spec.iv else {
        return None;
    };
    let k = h.digest(key);
    let k = k.expose();
    fn one<C: KeyInit + BlockCipherEncrypt + Send + Sync + 'static>(k: &[u8]) -> Box<dyn OneBlock> {
        Box::new(EssivCipher(new_cipher::<C>(k)))
    }
    Some(match (spec.cipher, k.len()) {
        (BlockCipher::Aes, 16) => one::<Aes128>(k),
        (BlockCipher::Aes, 24) => one::<Aes192>(k),
        (BlockCipher::Aes, _) => one::<Aes256>(k),
        (BlockCipher::Serpent, _) => one::<serpent::Serpent>(k),
        (BlockCipher::Twofish, _) => one::<twofish::Twofish>(k),
        (BlockCipher::Camellia, 16) => one::<camellia::Camellia128>(k),
        (BlockCipher::Camellia, 24) => one::<camellia::Camellia192>(k),
        (BlockCipher::Camellia, _) => one::<camellia::Camellia256>(k),
        (BlockCipher::Aria, 16) => one::<aria::Aria128>(k),
        (BlockCipher::Aria, 24) => one::<aria::Aria192>(k),
        (BlockCipher::Aria, _) => one::<aria::Aria256>(k),
        (BlockCipher::Sm4, _) => one::<sm4::Sm4>(k),
        (BlockCipher::Cast6, _) => one::<cast6::Cast6>(k),
        (BlockCipher::Cast5, _) => one::<cast5::Cast5>(k),
        (BlockCipher::Blowfish, _) => one::<blowfish::Blowfish>(k),
        (BlockCipher::Des, _) => one::<des::Des>(k),
        (BlockCipher::Des3Ede, _) => one::<des::TdesEde3>(k),
    })
}

fn chained<C>(spec: &CipherSpec, key: &[u8]) -> Box<dyn Crypt>
where
    C: KeyInit + BlockCipherEncrypt + BlockCipherDecrypt + Clone + Send + Sync + 'static,
{
    Box::new(Chained::<C> {
        cipher: new_cipher(key),
        mode: spec.mode,
        iv: spec.iv,
        essiv: essiv_of(spec, key),
    })
}

fn xts<C>(spec: &CipherSpec, key: &[u8]) -> Box<dyn Crypt>
where
    C: KeyInit
        + BlockCipherEncrypt
        + BlockCipherDecrypt
        + BlockSizeUser<BlockSize = U16>
        + Send
        + Sync
        + 'static,
{
    let half = key.len() / 2;
    Box::new(XtsMode::<C> {
        xts: Xts128::new(new_cipher(&key[..half]), new_cipher(&key[half..])),
        iv: spec.iv,
        essiv: essiv_of(spec, key),
    })
}

/// Picks the RustCrypto type for the cipher and the length of one cipher
/// key, then builds the mode around it.
fn keyed(spec: &CipherSpec, key: &[u8]) -> Box<dyn Crypt> {
    macro_rules! build {
        ($t:ty) => {
            if spec.mode == ChainMode::Xts {
                build_xts!($t)
            } else {
                chained::<$t>(spec, key)
            }
        };
    }
    macro_rules! build_xts {
        ($t:ty) => {
            xts::<$t>(spec, key)
        };
    }
    macro_rules! build8 {
        ($t:ty) => {
            chained::<$t>(spec, key)
        };
    }
    let one_key = if spec.mode == ChainMode::Xts {
        key.len() / 2
    } else {
        key.len()
    };
    match (spec.cipher, one_key) {
        (BlockCipher::Aes, 16) => build!(Aes128),
        (BlockCipher::Aes, 24) => build!(Aes192),
        (BlockCipher::Aes, _) => build!(Aes256),
        (BlockCipher::Serpent, _) => build!(serpent::Serpent),
        (BlockCipher::Twofish, _) => build!(twofish::Twofish),
        (BlockCipher::Camellia, 16) => build!(camellia::Camellia128),
        (BlockCipher::Camellia, 24) => build!(camellia::Camellia192),
        (BlockCipher::Camellia, _) => build!(camellia::Camellia256),
        (BlockCipher::Aria, 16) => build!(aria::Aria128),
        (BlockCipher::Aria, 24) => build!(aria::Aria192),
        (BlockCipher::Aria, _) => build!(aria::Aria256),
        (BlockCipher::Sm4, _) => build!(sm4::Sm4),
        (BlockCipher::Cast6, _) => build!(cast6::Cast6),
        (BlockCipher::Cast5, _) => build8!(cast5::Cast5),
        (BlockCipher::Blowfish, _) => build8!(blowfish::Blowfish),
        (BlockCipher::Des, _) => build8!(des::Des),
        (BlockCipher::Des3Ede, _) => build8!(des::TdesEde3),
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
#[path = "cipher_tests.rs"]
mod tests;

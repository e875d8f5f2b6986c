//! Hash algorithms that LUKS headers name: for PBKDF2, AF diffusion and the
//! volume key digest. The names and the set are those of cryptsetup's
//! kernel crypto backend (`lib/crypto_backend/crypto_kernel.c`) for which
//! RustCrypto has the hash; cryptsetup refuses hashes shorter than 20 bytes
//! for LUKS, and so do we.

use digest::Digest;

/// A hash named by a LUKS header (`hash-spec` in LUKS1, `hash` in LUKS2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-1 (LUKS1's historic default).
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256 (the default of every current tool).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// RIPEMD-160 (old LUKS1 volumes, and the plain-mode passphrase hash).
    Ripemd160,
    /// Whirlpool.
    Whirlpool,
    /// SHA3-224.
    Sha3_224,
    /// SHA3-256.
    Sha3_256,
    /// SHA3-384.
    Sha3_384,
    /// SHA3-512.
    Sha3_512,
    /// BLAKE2b with a 160-bit digest.
    Blake2b160,
    /// BLAKE2b with a 256-bit digest.
    Blake2b256,
    /// BLAKE2b with a 384-bit digest.
    Blake2b384,
    /// BLAKE2b with a 512-bit digest.
    Blake2b512,
    /// BLAKE2s with a 160-bit digest.
    Blake2s160,
    /// BLAKE2s with a 224-bit digest.
    Blake2s224,
    /// BLAKE2s with a 256-bit digest.
    Blake2s256,
    /// SM3.
    Sm3,
    /// GOST R 34.11-2012 (Streebog), 256-bit.
    Stribog256,
    /// GOST R 34.11-2012 (Streebog), 512-bit.
    Stribog512,
}

/// Every hash we implement, for tests and listings.
pub const ALL: [HashAlg; 21] = [
    HashAlg::Sha1,
    HashAlg::Sha224,
    HashAlg::Sha256,
    HashAlg::Sha384,
    HashAlg::Sha512,
    HashAlg::Ripemd160,
    HashAlg::Whirlpool,
    HashAlg::Sha3_224,
    HashAlg::Sha3_256,
    HashAlg::Sha3_384,
    HashAlg::Sha3_512,
    HashAlg::Blake2b160,
    HashAlg::Blake2b256,
    HashAlg::Blake2b384,
    HashAlg::Blake2b512,
    HashAlg::Blake2s160,
    HashAlg::Blake2s224,
    HashAlg::Blake2s256,
    HashAlg::Sm3,
    HashAlg::Stribog256,
    HashAlg::Stribog512,
];

type Blake2b160 = blake2::Blake2b<digest::consts::U20>;
type Blake2b384 = blake2::Blake2b<digest::consts::U48>;
type Blake2s160 = blake2::Blake2s<digest::consts::U20>;
type Blake2s224 = blake2::Blake2s<digest::consts::U28>;

/// Runs `$f::<H>($args)` for the RustCrypto type `H` of `$alg`; `$lazy` is
/// used for the hashes whose HMAC is `SimpleHmac` (SHA-3 and BLAKE2 do not
/// expose the block-level core that `Hmac` needs).
macro_rules! by_hash {
    ($alg:expr, $eager:ident, $lazy:ident $(, $a:expr)*) => {
        match $alg {
            HashAlg::Sha1 => $eager::<sha1::Sha1>($($a),*),
            HashAlg::Sha224 => $eager::<sha2::Sha224>($($a),*),
            HashAlg::Sha256 => $eager::<sha2::Sha256>($($a),*),
            HashAlg::Sha384 => $eager::<sha2::Sha384>($($a),*),
            HashAlg::Sha512 => $eager::<sha2::Sha512>($($a),*),
            HashAlg::Ripemd160 => $eager::<ripemd::Ripemd160>($($a),*),
            HashAlg::Whirlpool => $eager::<whirlpool::Whirlpool>($($a),*),
            HashAlg::Sm3 => $eager::<sm3::Sm3>($($a),*),
            HashAlg::Stribog256 => $eager::<streebog::Streebog256>($($a),*),
            HashAlg::Stribog512 => $eager::<streebog::Streebog512>($($a),*),
            HashAlg::Sha3_224 => $lazy::<sha3::Sha3_224>($($a),*),
            HashAlg::Sha3_256 => $lazy::<sha3::Sha3_256>($($a),*),
            HashAlg::Sha3_384 => $lazy::<sha3::Sha3_384>($($a),*),
            HashAlg::Sha3_512 => $lazy::<sha3::Sha3_512>($($a),*),
            HashAlg::Blake2b160 => $lazy::<Blake2b160>($($a),*),
            HashAlg::Blake2b256 => $lazy::<blake2::Blake2b256>($($a),*),
            HashAlg::Blake2b384 => $lazy::<Blake2b384>($($a),*),
            HashAlg::Blake2b512 => $lazy::<blake2::Blake2b512>($($a),*),
            HashAlg::Blake2s160 => $lazy::<Blake2s160>($($a),*),
            HashAlg::Blake2s224 => $lazy::<Blake2s224>($($a),*),
            HashAlg::Blake2s256 => $lazy::<blake2::Blake2s256>($($a),*),
        }
    };
}

fn pbkdf2_eager<D>(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8])
where
    D: hmac::EagerHash,
    D::Core: Sync,
{
    pbkdf2::pbkdf2_hmac::<D>(password, salt, iterations, out);
}

fn pbkdf2_simple<D>(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8])
where
    D: Digest + digest::block_api::BlockSizeUser + Clone + Sync,
{
    // HMAC accepts keys of any length: this cannot fail.
    let _ = pbkdf2::pbkdf2::<hmac::SimpleHmac<D>>(password, salt, iterations, out);
}

fn digest_parts<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
    let mut d = D::new();
    for p in parts {
        d.update(p);
    }
    let full = d.finalize();
    let n = out.len().min(full.len());
    out[..n].copy_from_slice(&full[..n]);
}

impl HashAlg {
    /// Parses a header's hash name; `None` for anything we do not
    /// implement (the caller names it in its refusal).
    pub fn parse(name: &str) -> Option<HashAlg> {
        ALL.into_iter().find(|h| h.name() == name)
    }

    /// The name as headers spell it.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
            HashAlg::Whirlpool => "whirlpool",
            HashAlg::Sha3_224 => "sha3-224",
            HashAlg::Sha3_256 => "sha3-256",
            HashAlg::Sha3_384 => "sha3-384",
            HashAlg::Sha3_512 => "sha3-512",
            HashAlg::Blake2b160 => "blake2b-160",
            HashAlg::Blake2b256 => "blake2b-256",
            HashAlg::Blake2b384 => "blake2b-384",
            HashAlg::Blake2b512 => "blake2b-512",
            HashAlg::Blake2s160 => "blake2s-160",
            HashAlg::Blake2s224 => "blake2s-224",
            HashAlg::Blake2s256 => "blake2s-256",
            HashAlg::Sm3 => "sm3",
            HashAlg::Stribog256 => "stribog256",
            HashAlg::Stribog512 => "stribog512",
        }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha1 | HashAlg::Ripemd160 | HashAlg::Blake2b160 | HashAlg::Blake2s160 => 20,
            HashAlg::Sha224 | HashAlg::Sha3_224 | HashAlg::Blake2s224 => 28,
            HashAlg::Sha256
            | HashAlg::Sha3_256
            | HashAlg::Blake2b256
            | HashAlg::Blake2s256
            | HashAlg::Sm3
            | HashAlg::Stribog256 => 32,
            HashAlg::Sha384 | HashAlg::Sha3_384 | HashAlg::Blake2b384 => 48,
            HashAlg::Sha512
            | HashAlg::Whirlpool
            | HashAlg::Sha3_512
            | HashAlg::Blake2b512
            | HashAlg::Stribog512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        by_hash!(
            self,
            pbkdf2_eager,
            pbkdf2_simple,
            password,
            salt,
            iterations,
            out
        )
    }

    /// Hash of the concatenation of `parts`, truncated or whole, written to
    /// `out` (at most `output_len` bytes are written).
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        by_hash!(self, digest_parts, digest_parts, parts, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_rfc6070_sha1() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(hex::encode(out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
    }

    #[test]
    fn names_round_trip_and_lengths_match_the_digests() {
        for h in ALL {
            assert_eq!(HashAlg::parse(h.name()), Some(h));
            let mut out = vec![0u8; 128];
            h.digest_into(&[b"abc"], &mut out);
            let n = out.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            assert!(n <= h.output_len(), "{}: wrote {n} bytes", h.name());
            assert!(n + 4 > h.output_len(), "{}: wrote only {n} bytes", h.name());
        }
        assert_eq!(HashAlg::parse("md5"), None);
        assert_eq!(HashAlg::parse("whirlpool_gcryptbug"), None);
    }

    #[test]
    fn known_answers() {
        // Published digests of "abc".
        let abc = |h: HashAlg| {
            let mut out = vec![0u8; h.output_len()];
            h.digest_into(&[b"abc"], &mut out);
            hex::encode(out)
        };
        for (h, want) in [
            (
                HashAlg::Ripemd160,
                "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc",
            ),
            (
                HashAlg::Sha3_256,
                "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
            ),
            (
                HashAlg::Blake2s256,
                "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982",
            ),
            (
                HashAlg::Sm3,
                "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
            ),
        ] {
            assert_eq!(abc(h), want, "{}", h.name());
        }
    }

    #[test]
    fn simple_hmac_pbkdf2_equals_the_block_level_one() {
        // SHA-3 and BLAKE2 go through SimpleHmac; it must be the same
        // RFC 2104 construction as Hmac, which SHA-256 has both of.
        for len in [20, 32, 64, 100] {
            let mut a = vec![0u8; len];
            let mut b = vec![0u8; len];
            pbkdf2_eager::<sha2::Sha256>(b"passphrase", b"salt salt", 7, &mut a);
            pbkdf2_simple::<sha2::Sha256>(b"passphrase", b"salt salt", 7, &mut b);
            assert_eq!(a, b, "{len}");
        }
    }
}

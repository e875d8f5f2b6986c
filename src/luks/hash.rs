//! Hash algorithms that LUKS headers name: for PBKDF2, AF diffusion and the
//! volume key digest.

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

/// A hash named by a LUKS header (`hash-spec` in LUKS1, `hash` in LUKS2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1 (LUKS1's historic default).
    Sha1,
    /// SHA-256 (the default of every current tool).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Parses a header's hash name; `None` for anything we do not implement.
    pub fn parse(name: &str) -> Option<HashAlg> {
        match name {
            "sha1" => Some(HashAlg::Sha1),
            "sha256" => Some(HashAlg::Sha256),
            "sha512" => Some(HashAlg::Sha512),
            _ => None,
        }
    }

    /// The name as headers spell it.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// Hash of the concatenation of `parts`, truncated or whole, written to
    /// `out` (at most `output_len` bytes are written).
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            let full = d.finalize();
            let n = out.len().min(full.len());
            out[..n].copy_from_slice(&full[..n]);
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts, out),
            HashAlg::Sha256 => run::<Sha256>(parts, out),
            HashAlg::Sha512 => run::<Sha512>(parts, out),
        }
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
    fn names_round_trip() {
        for h in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            assert_eq!(HashAlg::parse(h.name()), Some(h));
        }
        assert_eq!(HashAlg::parse("whirlpool"), None);
    }
}

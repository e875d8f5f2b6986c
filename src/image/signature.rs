//! Hash methods, key types and the check of an image signature against a
//! certificate's public key, as cursive makes it: RSA-PSS with MGF1 of the
//! image's hash and the largest salt, ECDSA and DSA with DER signatures,
//! all over the digest of the raw image bytes. The primitives are
//! RustCrypto's.

use digest::Digest;
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::hazmat::PrehashVerifier;
use rsa::traits::PublicKeyParts;
use x509_cert::der::Encode;
use x509_cert::spki::SubjectPublicKeyInfoOwned;

use super::oid;

/// `img_signature_hash_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashMethod {
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashMethod {
    /// The method glance names `name`.
    pub fn from_name(name: &str) -> Option<HashMethod> {
        Some(match name {
            "SHA-224" => HashMethod::Sha224,
            "SHA-256" => HashMethod::Sha256,
            "SHA-384" => HashMethod::Sha384,
            "SHA-512" => HashMethod::Sha512,
            _ => return None,
        })
    }

    /// The name as glance spells it.
    pub fn name(self) -> &'static str {
        match self {
            HashMethod::Sha224 => "SHA-224",
            HashMethod::Sha256 => "SHA-256",
            HashMethod::Sha384 => "SHA-384",
            HashMethod::Sha512 => "SHA-512",
        }
    }

    /// A fresh running hash of this method.
    pub fn hasher(self) -> Hasher {
        match self {
            HashMethod::Sha224 => Hasher::Sha224(sha2::Sha224::new()),
            HashMethod::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashMethod::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            HashMethod::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// The digest of `data` in one go.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }
}

/// A running hash of one of the [`HashMethod`]s.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-224.
    Sha224(sha2::Sha224),
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-384.
    Sha384(sha2::Sha384),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha224(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest.
    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha224(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// `img_signature_key_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// RSA with PSS padding.
    RsaPss,
    /// DSA.
    Dsa,
    /// ECDSA, named for the NIST P-384 curve.
    EccSecp384r1,
    /// ECDSA, named for the NIST P-521 curve.
    EccSecp521r1,
}

impl KeyType {
    /// The key type glance names `name`. The SECT (binary) curves of
    /// older cursive releases are not taken: current cryptography
    /// releases, and so cursive, no longer have them either.
    pub fn from_name(name: &str) -> Option<KeyType> {
        Some(match name {
            "RSA-PSS" => KeyType::RsaPss,
            "DSA" => KeyType::Dsa,
            "ECC_SECP384R1" => KeyType::EccSecp384r1,
            "ECC_SECP521R1" => KeyType::EccSecp521r1,
            _ => return None,
        })
    }

    /// The name as glance spells it.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::RsaPss => "RSA-PSS",
            KeyType::Dsa => "DSA",
            KeyType::EccSecp384r1 => "ECC_SECP384R1",
            KeyType::EccSecp521r1 => "ECC_SECP521R1",
        }
    }
}

/// A certificate's public key, parsed.
#[derive(Clone)]
pub enum PublicKey {
    /// RSA.
    Rsa(rsa::PublicKey),
    /// DSA.
    Dsa(dsa::VerifyingKey),
    /// ECDSA on P-256 (CA certificates only: no image key type names it).
    P256(p256::ecdsa::VerifyingKey),
    /// ECDSA on P-384.
    P384(p384::ecdsa::VerifyingKey),
    /// ECDSA on P-521.
    P521(p521::ecdsa::VerifyingKey),
}

/// Why a signature does not check out.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature is not one this key made over this digest.
    #[error("the signature does not match")]
    Mismatch,
    /// The key cannot check signatures of this kind.
    #[error("{0}")]
    WrongKey(String),
}

/// The widest RSA modulus taken, in bits: OpenSSL's own limit for RSA
/// (`OPENSSL_RSA_MAX_MODULUS_BITS`). The rsa crate stops at 8192 unless
/// told otherwise. Narrower than what OpenSSL (and so cursive) takes:
/// moduli under 1024 bits and public exponents over 2^33 - 1, which the
/// rsa crate refuses.
pub const RSA_MAX_BITS: usize = 16384;

/// An RSA public key from a PKCS#1 RSAPublicKey, with a modulus of
/// `rsa::PublicKey::MIN_SIZE` (1024) to [`RSA_MAX_BITS`] bits.
pub fn rsa_from_pkcs1(der: &[u8]) -> Result<rsa::PublicKey, String> {
    use rsa::pkcs1::der::Decode;
    let key = rsa::pkcs1::RsaPublicKeyRef::from_der(der).map_err(|e| e.to_string())?;
    let uint = |v: &[u8]| {
        let bits = u32::try_from(v.len().max(1) * 8).map_err(|_| "an integer too long")?;
        rsa::BoxedUint::from_be_slice(v, bits).map_err(|_| "an integer too long")
    };
    let n = uint(key.modulus.as_bytes())?;
    let e = uint(key.public_exponent.as_bytes())?;
    rsa::PublicKey::new_with_size_limits(n, e, rsa::PublicKey::MIN_SIZE..=RSA_MAX_BITS).map_err(
        |e| match e {
            rsa::Error::ModulusTooLarge => format!("a modulus over {RSA_MAX_BITS} bits"),
            rsa::Error::ModulusTooSmall => {
                format!("a modulus under {} bits", rsa::PublicKey::MIN_SIZE)
            }
            other => other.to_string(),
        },
    )
}

/// The widest DSA prime p taken, in bits: OpenSSL's own limit for DSA
/// (`OPENSSL_DSA_MAX_MODULUS_BITS`).
pub const DSA_MAX_P_BITS: usize = 10000;

/// The DSA subgroup sizes taken, in bits: the three OpenSSL verifies with
/// (its `DSA_R_BAD_Q_VALUE` otherwise).
pub const DSA_Q_BITS: [usize; 3] = [160, 224, 256];

/// A DSA public key from a SubjectPublicKeyInfo: p of 1024 (our floor;
/// OpenSSL has none) to [`DSA_MAX_P_BITS`] bits, q of one of
/// [`DSA_Q_BITS`]. The dsa crate on its own takes only FIPS 186's four
/// (p, q) pairs, and `openssl dsaparam` makes others (1536 or 4096 bits
/// with a 224-bit q), which cursive verifies with. g and y must both be
/// of order q (at least 2, and 1 when raised to q modulo p): a g of 1 or
/// of small order would let one signature verify over many digests.
/// OpenSSL does not check g.
pub fn dsa_from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<dsa::VerifyingKey, String> {
    use x509_cert::der::Decode;
    use x509_cert::der::asn1::UintRef;
    let params = spki
        .algorithm
        .parameters
        .as_ref()
        .ok_or("no domain parameters")?;
    // Dss-Parms is SEQUENCE { p, q, g }: a SEQUENCE OF three INTEGERs.
    let pqg: Vec<UintRef<'_>> = params
        .decode_as()
        .map_err(|e: x509_cert::der::Error| e.to_string())?;
    let [p, q, g] = pqg.as_slice() else {
        return Err("domain parameters that are not (p, q, g)".into());
    };
    let y = spki
        .subject_public_key
        .as_bytes()
        .ok_or("a public key of a partial byte")?;
    let y = UintRef::from_der(y).map_err(|e| e.to_string())?;
    let p = dsa::BoxedUint::from_be_slice_vartime(p.as_bytes());
    let q = dsa::BoxedUint::from_be_slice_vartime(q.as_bytes());
    // g and y take p's precision: the crate's modular arithmetic asserts
    // that its operands have the same number of limbs, and a short g or y
    // (a hostile certificate's g = 2) would panic it.
    let below_p = |v: &UintRef<'_>, what: &str| {
        dsa::BoxedUint::from_be_slice(v.as_bytes(), p.bits_precision())
            .ok()
            .filter(|v| *v < p)
            .ok_or_else(|| format!("{what} not below p"))
    };
    let (g, y) = (below_p(g, "a generator g")?, below_p(&y, "a public value")?);
    let p_bits = p.bit_width() as usize;
    let q_bits = q.bit_width() as usize;
    if !(1024..=DSA_MAX_P_BITS).contains(&p_bits) {
        return Err(format!(
            "a prime p of {p_bits} bits (1024 to {DSA_MAX_P_BITS} are taken)"
        ));
    }
    if !DSA_Q_BITS.contains(&q_bits) {
        return Err(format!(
            "a subgroup q of {q_bits} bits (160, 224 or 256 are taken)"
        ));
    }
    let components = dsa::Components::from_components_unchecked(p, q, g.clone())
        .map_err(|_| "domain parameters out of range (p even, or g or q under 2)")?;
    // The crate's check of a public value is the check g needs too.
    if dsa::VerifyingKey::from_components(components.clone(), g).is_err() {
        return Err("a generator g that is not of order q".into());
    }
    dsa::VerifyingKey::from_components(components, y)
        .map_err(|_| "a public value that is not in the subgroup".into())
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo.
    pub fn from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<PublicKey, String> {
        let alg = &spki.algorithm.oid;
        let bad = |what: &str, e: &dyn std::fmt::Display| format!("invalid {what} public key: {e}");
        if *alg == oid::RSA_ENCRYPTION || *alg == oid::RSASSA_PSS {
            // Both carry a PKCS#1 RSAPublicKey. An id-RSASSA-PSS key is an
            // RSA key restricted to PSS; the restriction's parameters are
            // not needed to verify.
            return rsa_from_pkcs1(spki.subject_public_key.raw_bytes())
                .map(PublicKey::Rsa)
                .map_err(|e| bad("RSA", &e));
        }
        if *alg == oid::DSA {
            return dsa_from_spki(spki)
                .map(PublicKey::Dsa)
                .map_err(|e| bad("DSA", &e));
        }
        if *alg == oid::EC_PUBLIC_KEY {
            let der = spki
                .to_der()
                .map_err(|e| format!("the public key cannot be encoded: {e}"))?;
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok());
            return match curve {
                Some(c) if c == oid::SECP256R1 => {
                    p256::ecdsa::VerifyingKey::from_public_key_der(&der)
                        .map(PublicKey::P256)
                        .map_err(|e| bad("P-256", &e))
                }
                Some(c) if c == oid::SECP384R1 => {
                    p384::ecdsa::VerifyingKey::from_public_key_der(&der)
                        .map(PublicKey::P384)
                        .map_err(|e| bad("P-384", &e))
                }
                Some(c) if c == oid::SECP521R1 => {
                    p521::ecdsa::VerifyingKey::from_public_key_der(&der)
                        .map(PublicKey::P521)
                        .map_err(|e| bad("P-521", &e))
                }
                Some(c) => Err(format!("an EC key on curve {c}, which is not supported")),
                None => Err("an EC key without a named curve".into()),
            };
        }
        Err(format!(
            "a public key of algorithm {alg}, which is not supported"
        ))
    }

    /// What the key is, for messages.
    pub fn describe(&self) -> String {
        match self {
            PublicKey::Rsa(k) => format!("an RSA key of {} bits", k.n().bit_width()),
            PublicKey::Dsa(k) => format!("a DSA key of {} bits", k.components().p().bit_width()),
            PublicKey::P256(_) => "an EC key on P-256".into(),
            PublicKey::P384(_) => "an EC key on P-384".into(),
            PublicKey::P521(_) => "an EC key on P-521".into(),
        }
    }

    /// Whether an image of key type `t` can be signed by this key. As
    /// cursive: the key's kind decides; an `ECC_*` type takes any EC key
    /// (cursive checks only that it is one).
    pub fn fits(&self, t: KeyType) -> bool {
        matches!(
            (self, t),
            (PublicKey::Rsa(_), KeyType::RsaPss)
                | (PublicKey::Dsa(_), KeyType::Dsa)
                | (
                    PublicKey::P256(_) | PublicKey::P384(_) | PublicKey::P521(_),
                    KeyType::EccSecp384r1 | KeyType::EccSecp521r1
                )
        )
    }

    /// Checks an image signature: `digest` is the image's digest by
    /// `hash`, `sig` the decoded `img_signature`.
    pub fn verify_image(
        &self,
        key_type: KeyType,
        hash: HashMethod,
        digest: &[u8],
        sig: &[u8],
    ) -> Result<(), SignatureError> {
        if !self.fits(key_type) {
            return Err(SignatureError::WrongKey(format!(
                "the image's key type is {} but the certificate holds {}",
                key_type.name(),
                self.describe()
            )));
        }
        match self {
            PublicKey::Rsa(k) => verify_pss(k, hash, digest, sig, None),
            _ => self.verify_prehash(digest, sig),
        }
    }

    /// Checks a DSA or ECDSA signature (DER) over a digest.
    pub fn verify_prehash(&self, digest: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
        let ok = match self {
            PublicKey::Rsa(_) => {
                return Err(SignatureError::WrongKey(
                    "an RSA key needs a padding scheme".into(),
                ));
            }
            PublicKey::Dsa(k) => dsa::Signature::try_from(sig)
                .ok()
                .is_some_and(|s| k.verify_prehash(digest, &s).is_ok()),
            PublicKey::P256(k) => p256::ecdsa::DerSignature::try_from(sig)
                .ok()
                .is_some_and(|s| k.verify_prehash(digest, &s).is_ok()),
            PublicKey::P384(k) => p384::ecdsa::DerSignature::try_from(sig)
                .ok()
                .is_some_and(|s| k.verify_prehash(digest, &s).is_ok()),
            PublicKey::P521(k) => p521::ecdsa::DerSignature::try_from(sig)
                .ok()
                .is_some_and(|s| k.verify_prehash(digest, &s).is_ok()),
        };
        if ok {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

/// RSA-PSS with MGF1 of `hash`. `salt`: the salt length the signature
/// must have; `None`: any, read from the signature (cursive asks for
/// `PSS.MAX_LENGTH`, which cryptography takes as "detect" when verifying;
/// openssl signs with the largest by default).
pub fn verify_pss(
    key: &rsa::PublicKey,
    hash: HashMethod,
    digest: &[u8],
    sig: &[u8],
    salt: Option<usize>,
) -> Result<(), SignatureError> {
    fn check<D>(
        key: &rsa::PublicKey,
        salt: Option<usize>,
        digest: &[u8],
        sig: &[u8],
    ) -> Result<(), SignatureError>
    where
        D: Digest + digest::FixedOutputReset,
    {
        let verifier = match salt {
            Some(len) => rsa::pss::VerifyingKey::<D>::new_with_salt_len(key.clone(), len),
            None => rsa::pss::VerifyingKey::<D>::new_with_auto_salt_len(key.clone()),
        };
        // `try_from` stops at the crate's default 8192 bits.
        let sig = rsa::pss::Signature::from_bytes_with_max_len(sig, RSA_MAX_BITS.div_ceil(8))
            .map_err(|_| SignatureError::Mismatch)?;
        verifier
            .verify_prehash(digest, &sig)
            .map_err(|_| SignatureError::Mismatch)
    }
    match hash {
        HashMethod::Sha224 => check::<sha2::Sha224>(key, salt, digest, sig),
        HashMethod::Sha256 => check::<sha2::Sha256>(key, salt, digest, sig),
        HashMethod::Sha384 => check::<sha2::Sha384>(key, salt, digest, sig),
        HashMethod::Sha512 => check::<sha2::Sha512>(key, salt, digest, sig),
    }
}

/// RSA PKCS#1 v1.5 over a digest by `hash` (certificate signatures).
pub fn verify_pkcs1v15(
    key: &rsa::PublicKey,
    hash: HashMethod,
    digest: &[u8],
    sig: &[u8],
) -> Result<(), SignatureError> {
    let scheme = match hash {
        HashMethod::Sha224 => rsa::Pkcs1v15Sign::new::<sha2::Sha224>(),
        HashMethod::Sha256 => rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
        HashMethod::Sha384 => rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
        HashMethod::Sha512 => rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
    };
    key.verify(scheme, digest, sig)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PKCS#1 RSAPublicKey with an odd modulus of exactly `bits` bits
    /// and e = 65537 (all the checks a public key gets look at).
    fn pkcs1_of(bits: usize) -> Vec<u8> {
        let mut n = vec![0xffu8; bits.div_ceil(8)];
        n[0] = 0xff >> (n.len() * 8 - bits);
        let key = rsa::pkcs1::RsaPublicKeyRef {
            modulus: rsa::pkcs1::UintRef::new(&n).unwrap(),
            public_exponent: rsa::pkcs1::UintRef::new(&[1, 0, 1]).unwrap(),
        };
        key.to_der().unwrap()
    }

    /// A DSA SubjectPublicKeyInfo with a p and a q of the given widths
    /// (odd, all ones), g = 2 and y = 4: enough for the size checks.
    fn dsa_spki(p_bits: usize, q_bits: usize, extra: bool) -> SubjectPublicKeyInfoOwned {
        use x509_cert::der::asn1::{Any, BitString, UintRef};
        let ones = |bits: usize| {
            let mut v = vec![0xffu8; bits.div_ceil(8)];
            v[0] = 0xff >> (v.len() * 8 - bits);
            v
        };
        let (p, q) = (ones(p_bits), ones(q_bits));
        let mut pqg = vec![
            UintRef::new(&p).unwrap(),
            UintRef::new(&q).unwrap(),
            UintRef::new(&[2]).unwrap(),
        ];
        if extra {
            pqg.push(UintRef::new(&[3]).unwrap());
        }
        let params = Any::encode_from(&pqg).unwrap();
        let y = UintRef::new(&[4]).unwrap().to_der().unwrap();
        SubjectPublicKeyInfoOwned {
            algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
                oid: oid::DSA,
                parameters: Some(params),
            },
            subject_public_key: BitString::from_bytes(&y).unwrap(),
        }
    }

    #[test]
    fn dsa_domain_parameters_as_openssl_takes_them() {
        let err = |p, q, extra| dsa_from_spki(&dsa_spki(p, q, extra)).unwrap_err();
        assert_eq!(
            err(1016, 160, false),
            "a prime p of 1016 bits (1024 to 10000 are taken)"
        );
        assert_eq!(
            err(10008, 256, false),
            "a prime p of 10008 bits (1024 to 10000 are taken)"
        );
        assert_eq!(
            err(2048, 200, false),
            "a subgroup q of 200 bits (160, 224 or 256 are taken)"
        );
        assert_eq!(
            err(2048, 224, true),
            "domain parameters that are not (p, q, g)"
        );
        // Sizes pass, and g is still checked: 2 has no order q modulo an
        // all-ones p.
        for (p, q) in [(1536, 224), (4096, 224), (10000, 256), (1024, 160)] {
            assert_eq!(err(p, q, false), "a generator g that is not of order q");
        }
    }

    /// `openssl dsaparam 1536` + `gendsa` + `req -x509`: p of 1536 bits,
    /// q of 224 (not one of FIPS 186's pairs).
    const DSA1536_CERT: &str = "-----BEGIN CERTIFICATE-----\n\
MIIDpjCCA1SgAwIBAgIUUrz776pTM9W6slW8h+9CDDYzAYwwCwYJYIZIAWUDBAMC\n\
MBcxFTATBgNVBAMMDGRzYTE1MzYtdGVzdDAgFw0yNjEyMDUxMDM4NDhaGA8yMTI2\n\
MTExMTEwMzg0OFowFzEVMBMGA1UEAwwMZHNhMTUzNi10ZXN0MIICfzCCAbQGByqG\n\
SM44BAEwggGnAoHBAIpxs5nuxnPGfofGOiwiMuzVL34QjkmWUk4L0SAL29Z4H5qC\n\
1ZEKkWq2RxtOBAMFVz8t35aYfxTiVKrh6y7ylpojPRDNn1o5Mdqu2hKemQnq323c\n\
T38haiHEZWW/xhEREoaYXYxzq9wcD+0xKMCkB9nxje5M+Q7z/yvbzrGGxS6EtbVT\n\
oqRd70eQClx/lVexWPDuYUcaucnl4hIfBlmjE1bGFO3gmXN8kbWym1+8aFS7bWY1\n\
21k7e3k71D+kVBTM9QIdAJh/46IAPeCS1KvgzjEORqe/ho2/WVFpYCCSQ10CgcEA\n\
ga+VeQ3ULOgBklXWzQUMu/mEFQBJvvhs9kZ0pqmHduRVwHX2e4E7zWSGXhtcRbXV\n\
mly884IAyRYx7FUJttu39qfHClXTLjeXtcsaYTtKluW+/h7xJkMjA+zMpYUhQNwG\n\
zwMYTqtH4w6msnm/rj0cTaes/i3FReBm8YEhCxJrPyxKjhFUPKXDuyffBBJtTHw7\n\
9QGs9Y4GuhaZxt1dj3TiIqCUifOE5hc/Syo0QfCR7hti3PQCtIGbT7u4/wjMnZVz\n\
A4HEAAKBwHLR5MQnB4wPGbnwM/u56KIbY/IdtaMTKquj8ub7UeP8GxCnDo9roHPT\n\
dqP3MTb8d3Dg1wR6VxP0lLvL7I78geRCkCxQKMT463GYJnBTDyPZjeG5OotKmOBd\n\
cM0+EOhsYADejBDXYZUE37FIlxt8vXevuCaram4ZdT0yR3Js+tEhYLs7BQzKQbue\n\
LC3BVIZ42bWJTSMnXkMfgVj+RkvRf2gp4oGVEp/7L2eV9wDmZZaOeMmmJm7zBVl2\n\
dlHzLetAFKNTMFEwHQYDVR0OBBYEFC4Q8lDLacG2F4v+K1sfmBwLRpoXMB8GA1Ud\n\
IwQYMBaAFC4Q8lDLacG2F4v+K1sfmBwLRpoXMA8GA1UdEwEB/wQFMAMBAf8wCwYJ\n\
YIZIAWUDBAMCAz8AMDwCHDzV6WW8zwm02cKtQmbwGBa7/GcF7SVjE3TpmzcCHHUS\n\
C/2PgufmZK46woTCcLWMGHgKBkubHiMVymg=\n\
-----END CERTIFICATE-----";

    #[test]
    fn dsa_keys_outside_fips_sizes_are_taken_and_their_g_and_y_checked() {
        use x509_cert::der::DecodePem;
        use x509_cert::der::asn1::{Any, BitString, UintRef};
        let cert = x509_cert::Certificate::from_pem(DSA1536_CERT).unwrap();
        let spki = cert.tbs_certificate().subject_public_key_info().clone();
        let key = dsa_from_spki(&spki).unwrap();
        assert_eq!(key.components().p().bit_width(), 1536);
        assert_eq!(key.components().q().bit_width(), 224);

        let pqg: Vec<UintRef<'_>> = spki
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .decode_as()
            .unwrap();
        let with = |g: &[u8], y: Option<&[u8]>| {
            let mut s = spki.clone();
            let params = [pqg[0], pqg[1], UintRef::new(g).unwrap()];
            s.algorithm.parameters = Some(Any::encode_from(&params.to_vec()).unwrap());
            if let Some(y) = y {
                let y = UintRef::new(y).unwrap().to_der().unwrap();
                s.subject_public_key = BitString::from_bytes(&y).unwrap();
            }
            dsa_from_spki(&s).map(|_| ())
        };
        let g = pqg[2].as_bytes().to_vec();
        assert_eq!(with(&g, None), Ok(()));
        assert_eq!(
            with(&[1], None).unwrap_err(),
            "a generator g that is not of order q"
        );
        assert_eq!(
            with(&[2], None).unwrap_err(),
            "a generator g that is not of order q"
        );
        assert_eq!(
            with(&g, Some(&[4])).unwrap_err(),
            "a public value that is not in the subgroup"
        );
        // g = p - 1 has order 2.
        let mut p_minus_1 = pqg[0].as_bytes().to_vec();
        *p_minus_1.last_mut().unwrap() -= 1;
        assert_eq!(
            with(&p_minus_1, None).unwrap_err(),
            "a generator g that is not of order q"
        );
        // A g or y wider than p is refused, not a panic.
        let wide = vec![0xffu8; pqg[0].as_bytes().len() + 1];
        assert_eq!(with(&wide, None).unwrap_err(), "a generator g not below p");
        assert_eq!(
            with(&g, Some(&wide)).unwrap_err(),
            "a public value not below p"
        );
    }

    #[test]
    fn rsa_keys_are_taken_from_1024_to_openssls_16384_bits() {
        for bits in [1024, 8192, 8200, 9216, RSA_MAX_BITS] {
            let key = rsa_from_pkcs1(&pkcs1_of(bits)).unwrap();
            assert_eq!(key.n().bit_width() as usize, bits);
        }
        let err = rsa_from_pkcs1(&pkcs1_of(RSA_MAX_BITS + 8)).unwrap_err();
        assert_eq!(err, "a modulus over 16384 bits");
        let err = rsa_from_pkcs1(&pkcs1_of(1016)).unwrap_err();
        assert_eq!(err, "a modulus under 1024 bits");
        assert!(rsa_from_pkcs1(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_err());
    }
}

//! Image-signature certificates and signatures as a hostile key manager or
//! image owner may hand them over: parsing a certificate, its public key
//! (RSA, DSA, EC of any size), an image signature checked with it under
//! every key type and hash method, and the certificate-chain checks with
//! the certificate as its own trust anchor and, when the rest of the input
//! is a certificate too, under that one. None of it may panic, and a
//! signature that verifies over a digest must not verify over the same
//! digest with one bit flipped.
//!
//! The input is:
//!
//! - bytes 0..2: the certificate's length (16 bits, little endian;
//!   clamped);
//! - then the certificate's DER, then the signature bytes (or, for the
//!   chain check, a second certificate's DER).
//!
//! The seeds (`fuzz/gen_corpus.sh`) are openssl-made certificates of every
//! key kind with a real signature over [`MESSAGE`] by SHA-256.

#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use luks_agent::image::certificate::{self, Certificate};
use luks_agent::image::signature::{HashMethod, KeyType};

/// What the seed signatures sign.
const MESSAGE: &[u8] = b"luks-agent image_certificate fuzz seed\n";

const HASHES: [HashMethod; 4] = [
    HashMethod::Sha224,
    HashMethod::Sha256,
    HashMethod::Sha384,
    HashMethod::Sha512,
];

const KEY_TYPES: [KeyType; 4] = [
    KeyType::RsaPss,
    KeyType::Dsa,
    KeyType::EccSecp384r1,
    KeyType::EccSecp521r1,
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cert_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let body = &data[2..];
    let (der, rest) = body.split_at(cert_len.min(body.len()));
    let Ok(cert) = Certificate::parse("fuzz", der) else {
        return;
    };
    let key = cert.public_key();
    assert!(!key.describe().is_empty());
    for hash in HASHES {
        let digest = hash.digest(MESSAGE);
        let mut flipped = digest.clone();
        flipped[0] ^= 0x01;
        for key_type in KEY_TYPES {
            if key.verify_image(key_type, hash, &digest, rest).is_ok() {
                assert!(
                    key.verify_image(key_type, hash, &flipped, rest).is_err(),
                    "{} verified one signature over two digests ({})",
                    key.describe(),
                    hash.name()
                );
            }
        }
    }
    cert.warn_unless_signing_key();
    // Now (within the seeds' ten years), and long after.
    let later = SystemTime::UNIX_EPOCH + Duration::from_secs(8_000_000_000);
    let issuer = Certificate::parse("fuzz-issuer", rest).ok();
    for now in [SystemTime::now(), later] {
        let _ = cert.check_dates(now);
        let _ = certificate::validate(&cert, std::slice::from_ref(&cert), now);
        if let Some(issuer) = &issuer {
            let _ = certificate::validate(&cert, std::slice::from_ref(issuer), now);
            let _ = certificate::validate(issuer, &[cert.clone(), issuer.clone()], now);
        }
    }
});

//! Known answers, refusals and round trips of every cipher specification.

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

/// NIST SP 800-38A ECB-AES128 (F.1.1) and the serpent answer cryptsetup's
/// `tests/crypto-vectors.c` gives for the same key and plaintext.
#[test]
fn known_answers_ecb() {
    let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
    let plain =
        hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51").unwrap();
    for (spec, want) in [
        (
            "aes-ecb",
            "3ad77bb40d7a3660a89ecaf32466ef97f5d3d58503b9699de785895a96fdbaaf",
        ),
        (
            "serpent-ecb",
            "f7a721e6c756b655cbdf533fc3b31ac44bc604293a81a6a6e4cba78d1a32a29e",
        ),
    ] {
        let s = CipherSpec::parse(spec, 16).unwrap();
        let mut buf = plain.clone();
        s.with_key(&key).encrypt(&mut buf, 32, 0);
        assert_eq!(hex::encode(&buf), want, "{spec}");
        s.with_key(&key).decrypt(&mut buf, 32, 0);
        assert_eq!(buf, plain, "{spec}");
    }
}

/// SM4 (GB/T 32907-2016, example 1) and ARIA-128 (RFC 5794, A.1), whose
/// kernel modules Debian 12 does not ship, so cryptsetup cannot be their
/// oracle here.
#[test]
fn known_answers_sm4_and_aria() {
    for (spec, key, plain, want) in [
        (
            "sm4-ecb",
            "0123456789abcdeffedcba9876543210",
            "0123456789abcdeffedcba9876543210",
            "681edf34d206965e86b3e94f536e4246",
        ),
        (
            "aria-ecb",
            "000102030405060708090a0b0c0d0e0f",
            "00112233445566778899aabbccddeeff",
            "d718fbd6ab644c739da95f3be6451778",
        ),
    ] {
        let key = hex::decode(key).unwrap();
        let s = CipherSpec::parse(spec, key.len()).unwrap();
        let mut buf = hex::decode(plain).unwrap();
        s.with_key(&key).encrypt(&mut buf, 16, 0);
        assert_eq!(hex::encode(&buf), want, "{spec}");
    }
}

/// The IV generators on one block of zeros: CBC's first ciphertext block
/// is E(IV), so decrypting it with ECB shows the IV each generator made.
#[test]
fn iv_generators_make_cryptsetups_ivs() {
    let key = [0x42u8; 16];
    let ecb = CipherSpec::parse("aes-ecb", 16).unwrap().with_key(&key);
    let iv_of = |spec: &str, sector: u64| {
        let c = CipherSpec::parse(spec, 16).unwrap().with_key(&key);
        let mut b = vec![0u8; 16];
        c.encrypt(&mut b, 16, sector);
        ecb.decrypt(&mut b, 16, 0);
        hex::encode(b)
    };
    let s: u64 = 0x0102_0304_0506_0708;
    assert_eq!(iv_of("aes-cbc-null", s), "00".repeat(16));
    assert_eq!(
        iv_of("aes-cbc-plain", s),
        format!("08070605{}", "00".repeat(12))
    );
    assert_eq!(
        iv_of("aes-cbc-plain64", s),
        format!("0807060504030201{}", "00".repeat(8))
    );
    assert_eq!(
        iv_of("aes-cbc-plain64be", s),
        format!("{}0102030405060708", "00".repeat(8))
    );
    // benbi: 512-byte sectors count 32 AES blocks each, from 1.
    assert_eq!(
        iv_of("aes-cbc-benbi", 3),
        format!("{}{:016x}", "00".repeat(8), (3u64 << 5) + 1)
    );
    // essiv:sha256: the sector under AES-256 keyed with SHA-256(key).
    let essiv_key = {
        let mut k = [0u8; 32];
        HashAlg::Sha256.digest_into(&[&key], &mut k);
        k
    };
    let mut want = [0u8; 16];
    want[..8].copy_from_slice(&s.to_le_bytes());
    CipherSpec::parse("aes-ecb", 32)
        .unwrap()
        .with_key(&essiv_key)
        .encrypt(&mut want, 16, 0);
    assert_eq!(iv_of("aes-cbc-essiv:sha256", s), hex::encode(want));
}

/// Every cipher, mode and IV generator with every key length it takes:
/// keying never panics, encryption round-trips, two sectors differ, and
/// the name reads back as written.
#[test]
fn every_combination_round_trips_and_names_itself() {
    let ciphers = [
        ("aes", &[16, 24, 32][..]),
        ("serpent", &[16, 24, 32]),
        ("twofish", &[16, 24, 32]),
        ("camellia", &[16, 24, 32]),
        ("aria", &[16, 24, 32]),
        ("sm4", &[16]),
        ("cast6", &[16, 20, 24, 28, 32]),
        ("cast5", &[5, 10, 16]),
        ("blowfish", &[4, 16, 32, 56]),
        ("des", &[8]),
        ("des3_ede", &[24]),
    ];
    let ivs = [
        "null",
        "plain",
        "plain64",
        "plain64be",
        "benbi",
        "essiv:sha256",
        "essiv:wp256",
    ];
    let mut tried = 0;
    for (cipher, lens) in ciphers {
        for mode in ["ecb", "cbc", "xts"] {
            let iv_list: &[&str] = if mode == "ecb" { &[""] } else { &ivs };
            for iv in iv_list {
                for &len in lens {
                    let text = if iv.is_empty() {
                        format!("{cipher}-{mode}")
                    } else {
                        format!("{cipher}-{mode}-{iv}")
                    };
                    let key_len = if mode == "xts" { 2 * len } else { len };
                    let spec = match CipherSpec::parse(&text, key_len) {
                        Ok(s) => s,
                        Err(e) => {
                            // Only what cannot be: XTS on 8-byte blocks, or
                            // an ESSIV digest the cipher cannot take as key.
                            let why = e.to_string();
                            assert!(
                                (mode == "xts"
                                    && BlockCipher::parse(cipher).unwrap().block_size() == 8)
                                    || iv.starts_with("essiv"),
                                "{text} ({len}): {why}"
                            );
                            continue;
                        }
                    };
                    assert_eq!(spec.full_name(), text);
                    let key: Vec<u8> = (0..key_len as u8)
                        .map(|i| i.wrapping_mul(37) ^ 0x5a)
                        .collect();
                    let c = spec.with_key(&key);
                    let plain: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
                    let mut buf = plain.clone();
                    c.encrypt(&mut buf, 512, 7);
                    assert_ne!(buf, plain, "{text}: encryption changed nothing");
                    if mode != "ecb" && *iv != "null" {
                        let mut a = vec![0u8; 512];
                        let mut b = vec![0u8; 512];
                        c.encrypt(&mut a, 512, 1);
                        c.encrypt(&mut b, 512, 2);
                        assert_ne!(a, b, "{text}: two sectors share an IV");
                    }
                    c.decrypt(&mut buf, 512, 7);
                    assert_eq!(buf, plain, "{text}: no round trip");
                    tried += 1;
                }
            }
        }
    }
    assert!(tried > 300, "only {tried} combinations");
}

#[test]
fn refusals_name_what_is_missing() {
    assert!(matches!(
        CipherSpec::parse("cipher_null-ecb", 0),
        Err(CipherSpecError::Null(_))
    ));
    for (spec, len, why) in [
        (
            "aes-lrw-plain64",
            48,
            "no RustCrypto implementation of this mode",
        ),
        (
            "aes-ctr-plain64",
            32,
            "no RustCrypto implementation of this mode",
        ),
        (
            "anubis-cbc-plain",
            16,
            "no RustCrypto implementation of this cipher",
        ),
        ("rot13-cbc-plain", 16, "unknown cipher"),
        ("capi:xts(aes)-plain64", 64, "capi:"),
        ("aes-cbc-lmk", 16, "another on-disk format"),
        ("aes-xts-essiv:md5", 64, "unknown ESSIV hash"),
        ("des3_ede-cbc-essiv:sha256", 24, "the 256-bit sha256 digest"),
        ("cast5-xts-plain64", 32, "XTS needs a 16-byte block cipher"),
        ("aes-xts", 64, "needs an IV generator"),
        ("aes-ecb-plain", 16, "ECB takes no IV"),
    ] {
        let e = CipherSpec::parse(spec, len).unwrap_err();
        assert!(
            matches!(e, CipherSpecError::Unsupported { .. }),
            "{spec}: {e:?}"
        );
        assert!(e.to_string().contains(why), "{spec}: {e}");
        assert!(e.to_string().contains(spec), "{spec}: {e}");
    }
    assert!(matches!(
        CipherSpec::parse("aes-xts-plain64", 16),
        Err(CipherSpecError::KeySize { .. })
    ));
    assert!(matches!(
        CipherSpec::parse("sm4-cbc-plain64", 32),
        Err(CipherSpecError::KeySize { .. })
    ));
}

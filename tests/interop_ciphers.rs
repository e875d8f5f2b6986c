//! Every cipher specification and hash both ways with cryptsetup, on the
//! host: what the host kernel's crypto API lets cryptsetup use here (AES in
//! every chaining mode and with every IV generator, and every hash its
//! OpenSSL backend has). The other block ciphers need kernel modules the
//! host lacks; `tests/vm/cipher_interop.sh` runs them in the guest.
//!
//! Each case, LUKS1 and LUKS2: cryptsetup formats (fast PBKDF2) and
//! luks-agent opens with the same volume key and refuses a wrong
//! passphrase; luks-agent formats and cryptsetup opens with the same
//! volume key.

use std::path::Path;

mod common;

use common::*;

const K1: &[u8] = b"interop passphrase one";
const WRONG: &[u8] = b"interop passphrase on3";

/// Both directions for one specification.
fn both_ways(ty: &str, cipher: &str, key_bits: u64, hash: &str) {
    let what = format!("{ty} {cipher} {key_bits}-bit key, hash {hash}");
    let fx = Fixture::new();
    let k1 = fx.key("k1", K1);
    let bad = fx.key("bad", WRONG);
    let bits = key_bits.to_string();
    let spec = ["--cipher", cipher, "--key-size", &bits, "--hash", hash];

    // cryptsetup formats, we open.
    let theirs = fx.image("theirs.img");
    let mut args: Vec<&str> = spec.to_vec();
    args.extend_from_slice(&["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]);
    cs_format(&theirs, &k1, ty, &args);
    agent_expect_passphrase(&theirs, &k1, true, &what);
    agent_expect_passphrase(&theirs, &bad, false, &what);
    let model = agent_model(&theirs);
    assert_eq!(
        model.cipher, cipher,
        "{what}: our dump of cryptsetup's header"
    );
    assert_eq!(
        agent_volume_key(&theirs, &k1),
        cs_volume_key(&theirs, &k1),
        "{what}: volume key of cryptsetup's header"
    );

    // We format, cryptsetup opens.
    let ours = fx.image("ours.img");
    let mut args: Vec<&str> = vec!["--type", ty];
    args.extend_from_slice(&spec);
    args.extend_from_slice(&["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]);
    agent_format(&ours, &k1, &args).expect_ok(&format!("luks-agent luks format, {what}"));
    cs_expect_passphrase(&ours, &k1, true, &what);
    cs_expect_passphrase(&ours, &bad, false, &what);
    assert_eq!(
        cs_volume_key(&ours, &k1),
        agent_volume_key(&ours, &k1),
        "{what}: volume key of our header"
    );
    let text = cs_dump(&ours);
    let shown = if ty == "luks1" {
        let (name, mode) = cipher.split_once('-').unwrap();
        dump_field(&text, "Cipher name").as_deref() == Some(name)
            && dump_field(&text, "Cipher mode").as_deref() == Some(mode)
    } else {
        dump_field(&text, "cipher").as_deref() == Some(cipher)
    };
    assert!(shown, "{what}: cryptsetup's dump of our header:\n{text}");
}

fn each_type(cipher: &str, key_bits: u64, hash: &str) {
    for ty in ["luks1", "luks2"] {
        both_ways(ty, cipher, key_bits, hash);
    }
}

#[test]
fn aes_cbc_with_every_iv_generator() {
    for iv in [
        "null",
        "plain",
        "plain64",
        "plain64be",
        "benbi",
        "essiv:sha256",
    ] {
        for bits in [128, 256] {
            each_type(&format!("aes-cbc-{iv}"), bits, "sha256");
        }
    }
}

#[test]
fn aes_xts_with_every_iv_generator() {
    for iv in [
        "plain",
        "plain64",
        "plain64be",
        "benbi",
        "essiv:sha256",
        "null",
    ] {
        for bits in [256, 512] {
            each_type(&format!("aes-xts-{iv}"), bits, "sha256");
        }
    }
}

#[test]
fn aes_ecb_and_192_bit_keys() {
    each_type("aes-ecb", 128, "sha256");
    each_type("aes-ecb", 256, "sha256");
    each_type("aes-cbc-essiv:sha256", 192, "sha256");
}

/// Every hash Debian's cryptsetup (OpenSSL backend) accepts, as the LUKS1
/// hash (PBKDF2, AF, digest) and LUKS2 PBKDF2/AF/digest hash; and one of
/// them as an ESSIV hash.
#[test]
fn every_hash_cryptsetup_has_here() {
    for hash in [
        "sha1",
        "sha224",
        "sha256",
        "sha384",
        "sha512",
        "ripemd160",
        "whirlpool",
        "sha3-224",
        "sha3-256",
        "sha3-384",
        "sha3-512",
        "blake2b-512",
        "blake2s-256",
        "sm3",
    ] {
        each_type("aes-xts-plain64", 512, hash);
    }
    each_type("aes-cbc-essiv:sha3-256", 256, "sha512");
    each_type("aes-xts-essiv:sm3", 512, "sm3");
}

/// What stays unsupported is refused by name, as a header we read and as
/// an option of `luks format`, exit 4 and 1, and writes nothing.
#[test]
fn unsupported_specifications_are_refused_by_name() {
    let fx = Fixture::new();
    let k1 = fx.key("k1", K1);
    // cryptsetup writes an LRW header (it needs the kernel only to open).
    let lrw = fx.image("lrw.img");
    let r = cryptsetup(&[
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks1",
        "--cipher",
        "aes-lrw-plain64",
        "--key-size",
        "384",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        s(&k1),
        s(&lrw),
    ]);
    if r.success() {
        let before = sha256_file(&lrw);
        let t = agent_test_passphrase(&lrw, &k1);
        assert_eq!(t.code, Some(4), "{t}");
        assert!(
            t.stderr.contains("aes-lrw-plain64") && t.stderr.contains("mode"),
            "{t}"
        );
        assert_eq!(sha256_file(&lrw), before);
    }
    let img = fx.image("fmt.img");
    for (cipher, bits) in [("aes-lrw-plain64", "384"), ("anubis-cbc-plain64", "128")] {
        let r = agent_format(
            &img,
            &k1,
            &["--type", "luks2", "--cipher", cipher, "--key-size", bits],
        );
        assert_eq!(r.code, Some(1), "{cipher}: {r}");
        assert!(r.stderr.contains(cipher), "{cipher}: {r}");
        assert!(zeros(&img), "{cipher}: written");
    }
}

fn zeros(p: &Path) -> bool {
    std::fs::read(p).unwrap().iter().all(|b| *b == 0)
}

//! Interoperability with cryptsetup 2.6.
//!
//! Direction (a): luks-agent formats, cryptsetup reads, unlocks and adds
//! keys, and both tools derive the same volume key.
//! Direction (b): cryptsetup formats with many parameter combinations and
//! luks-agent unlocks to the volume key cryptsetup dumps; luks-agent's
//! add-key / remove-key / change-key results are checked with cryptsetup.

mod common;

use std::path::PathBuf;

use common::*;

const K1: &[u8] = b"correct horse battery staple";
/// Trailing newline on purpose: key files are used byte for byte.
const K2: &[u8] = b"second passphrase, with a trailing newline\n";
/// NUL and non-UTF-8 bytes on purpose.
const K3: &[u8] = b"third\x00passphrase \xff\xfe with binary bytes";
const WRONG: &[u8] = b"not the passphrase";

/// 64 lowercase hex characters: acceptable for `--kdf-policy high-entropy`.
const HEX_KEY: &[u8] = b"00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210";

#[derive(Clone, Copy, Debug)]
enum Kdf {
    Pbkdf2,
    Argon2id,
}

impl Kdf {
    fn args(self) -> &'static [&'static str] {
        match self {
            Kdf::Pbkdf2 => FAST_PBKDF2,
            Kdf::Argon2id => FAST_ARGON2ID,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kdf::Pbkdf2 => "pbkdf2",
            Kdf::Argon2id => "argon2id",
        }
    }
}

fn version_of(ty: &str) -> u64 {
    match ty {
        "luks1" => 1,
        "luks2" => 2,
        other => panic!("unknown type {other}"),
    }
}

/// Fast cryptsetup KDF parameters for a LUKS type.
fn cs_fast(ty: &str) -> &'static [&'static str] {
    if ty == "luks1" {
        FAST_PBKDF2
    } else {
        FAST_ARGON2ID
    }
}

/// Asserts the fast KDF parameters were stored for keyslot `slot`.
fn assert_fast_kdf(model: &HeaderModel, slot: u64, kdf: Kdf, what: &str) {
    let k = model
        .keyslots
        .get(&slot)
        .unwrap_or_else(|| panic!("{what}: keyslot {slot} missing in {model:#?}"));
    assert_eq!(k.ty, kdf.name(), "{what}: keyslot {slot} KDF type");
    match kdf {
        Kdf::Pbkdf2 => {
            assert_eq!(
                k.iterations,
                Some(1000),
                "{what}: keyslot {slot} iterations"
            );
        }
        Kdf::Argon2id => {
            assert_eq!(k.time, Some(4), "{what}: keyslot {slot} argon2 time cost");
            assert_eq!(k.memory, Some(32), "{what}: keyslot {slot} argon2 memory");
        }
    }
}

// ===========================================================================
// Direction (a): luks-agent formats, cryptsetup reads
// ===========================================================================

fn we_format_cryptsetup_reads(ty: &str, key_bits: u64, kdf: Kdf) {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k1 = fx.key("k1", K1);
    let k2 = fx.key("k2", K2);
    let bad = fx.key("bad", WRONG);
    let bits = key_bits.to_string();
    let mut args = vec![
        "--type",
        ty,
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        &bits,
        "--hash",
        "sha256",
    ];
    args.extend_from_slice(kdf.args());
    agent_format(&dev, &k1, &args).expect_ok("luks-agent luks format");

    // cryptsetup parses the header and reports what we asked for.
    let text = cs_dump(&dev);
    let version = version_of(ty);
    assert_eq!(
        dump_field(&text, "Version"),
        Some(version.to_string()),
        "Version in\n{text}"
    );
    if version == 1 {
        assert_eq!(
            dump_field(&text, "Cipher name").as_deref(),
            Some("aes"),
            "in\n{text}"
        );
        assert_eq!(
            dump_field(&text, "Cipher mode").as_deref(),
            Some("xts-plain64"),
            "in\n{text}"
        );
        assert_eq!(
            dump_field(&text, "Hash spec").as_deref(),
            Some("sha256"),
            "in\n{text}"
        );
        assert_eq!(
            dump_field(&text, "MK bits"),
            Some(bits.clone()),
            "in\n{text}"
        );
        assert_eq!(
            luks1_enabled_slots(&text),
            vec![0],
            "enabled keyslots in\n{text}"
        );
        assert_eq!(
            luks1_slot_iterations(&text, 0),
            Some(1000),
            "slot 0 iterations in\n{text}"
        );
    } else {
        assert_eq!(
            dump_field(&text, "cipher").as_deref(),
            Some("aes-xts-plain64"),
            "segment cipher in\n{text}"
        );
        assert_eq!(
            dump_field(&text, "Key"),
            Some(format!("{key_bits} bits")),
            "keyslot key size in\n{text}"
        );
        assert_eq!(
            dump_field(&text, "PBKDF").as_deref(),
            Some(kdf.name()),
            "keyslot PBKDF in\n{text}"
        );
        let meta = cs_json_metadata(&dev);
        let ks = &meta["keyslots"]["0"];
        assert_eq!(
            json_u64(&ks["key_size"]),
            Some(key_bits / 8),
            "keyslot 0 in {meta:#}"
        );
        let kdfj = &ks["kdf"];
        match kdf {
            Kdf::Pbkdf2 => {
                assert_eq!(kdfj["hash"], "sha256", "{meta:#}");
                assert_eq!(json_u64(&kdfj["iterations"]), Some(1000), "{meta:#}");
            }
            Kdf::Argon2id => {
                assert_eq!(json_u64(&kdfj["time"]), Some(4), "{meta:#}");
                assert_eq!(json_u64(&kdfj["memory"]), Some(32), "{meta:#}");
            }
        }
    }

    // Both tools accept the right passphrase and reject a wrong one with 2.
    cs_expect_passphrase(&dev, &k1, true, "after our format");
    cs_expect_passphrase(&dev, &bad, false, "after our format");
    agent_expect_passphrase(&dev, &k1, true, "after our format");
    agent_expect_passphrase(&dev, &bad, false, "after our format");

    // cryptsetup adds a keyslot to our header; we accept it.
    cs_add_key(&dev, &k1, &k2, kdf.args());
    cs_expect_passphrase(&dev, &k2, true, "after cryptsetup luksAddKey");
    agent_expect_passphrase(&dev, &k2, true, "after cryptsetup luksAddKey");
    agent_expect_passphrase(&dev, &bad, false, "after cryptsetup luksAddKey");

    // Same volume key through both passphrases in both tools.
    assert_same_volume_key(&dev, &[&k1, &k2], key_bits);

    // Our dump agrees with cryptsetup's about everything.
    let model = assert_same_header(&dev);
    assert_eq!(model.version, version);
    assert_eq!(model.cipher, "aes-xts-plain64");
    assert_eq!(model.key_size_bits, key_bits);
    assert_eq!(
        model.keyslots.keys().copied().collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_fast_kdf(&model, 0, kdf, "our keyslot");
    assert_fast_kdf(&model, 1, kdf, "cryptsetup's keyslot");
}

#[test]
fn we_format_luks1_xts256_pbkdf2() {
    we_format_cryptsetup_reads("luks1", 256, Kdf::Pbkdf2);
}

#[test]
fn we_format_luks1_xts512_pbkdf2() {
    we_format_cryptsetup_reads("luks1", 512, Kdf::Pbkdf2);
}

#[test]
fn we_format_luks2_xts256_pbkdf2() {
    we_format_cryptsetup_reads("luks2", 256, Kdf::Pbkdf2);
}

#[test]
fn we_format_luks2_xts512_pbkdf2() {
    we_format_cryptsetup_reads("luks2", 512, Kdf::Pbkdf2);
}

#[test]
fn we_format_luks2_xts256_argon2id() {
    we_format_cryptsetup_reads("luks2", 256, Kdf::Argon2id);
}

#[test]
fn we_format_luks2_xts512_argon2id() {
    we_format_cryptsetup_reads("luks2", 512, Kdf::Argon2id);
}

fn we_format_high_entropy(ty: &str) {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k = fx.key("hexkey", HEX_KEY);
    agent_format(&dev, &k, &["--type", ty, "--kdf-policy", "high-entropy"])
        .expect_ok("luks format --kdf-policy high-entropy");
    cs_expect_passphrase(&dev, &k, true, "high-entropy format");
    agent_expect_passphrase(&dev, &k, true, "high-entropy format");
    let model = assert_same_header(&dev);
    assert_eq!(model.version, version_of(ty));
    assert_eq!(model.keyslots.len(), 1, "{model:#?}");
    let kdf = model.keyslots.values().next().expect("one keyslot");
    assert_eq!(
        kdf.ty, "pbkdf2",
        "high-entropy policy is pbkdf2: {model:#?}"
    );
    assert_eq!(
        kdf.hash.as_deref(),
        Some("sha256"),
        "high-entropy policy is sha256: {model:#?}"
    );
    assert_eq!(
        kdf.iterations,
        Some(1000),
        "high-entropy policy is 1000 iterations: {model:#?}"
    );
    assert_same_volume_key(&dev, &[&k], model.key_size_bits);
}

#[test]
fn we_format_luks1_kdf_policy_high_entropy() {
    we_format_high_entropy("luks1");
}

#[test]
fn we_format_luks2_kdf_policy_high_entropy() {
    we_format_high_entropy("luks2");
}

#[test]
fn we_format_kdf_policy_high_entropy_refuses_weak_passphrases() {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let before = sha256_file(&dev);
    let weak: &[(&str, &[u8])] = &[
        ("words", K1),
        ("hex31", b"0123456789abcdef0123456789abcde"),
        (
            "upperhex",
            b"00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF",
        ),
        // The whole file is the passphrase: a newline makes it non-hex.
        (
            "hexnewline",
            b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        ),
        ("empty", b""),
    ];
    for (name, content) in weak {
        let k = fx.key(name, content);
        for ty in ["luks1", "luks2"] {
            agent_format(&dev, &k, &["--type", ty, "--kdf-policy", "high-entropy"]).expect_code(
                1,
                &format!("high-entropy format with a {name} passphrase must be refused as invalid"),
            );
        }
        assert_eq!(
            sha256_file(&dev),
            before,
            "a refused format ({name}) modified the device"
        );
    }
    let r = cryptsetup(&["isLuks", s(&dev)]);
    assert_ne!(
        r.code,
        Some(0),
        "device became LUKS after refused formats\n{r}"
    );
}

#[test]
fn we_format_luks2_key_id_token() {
    const KEY_ID: &str = "barbican:7d4e0c1a-key/42";
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k1 = fx.key("k1", K1);
    let k2 = fx.key("k2", K2);
    let mut args = vec!["--type", "luks2", "--key-id", KEY_ID];
    args.extend_from_slice(FAST_ARGON2ID);
    agent_format(&dev, &k1, &args).expect_ok("luks format --key-id");

    // cryptsetup lists the token ...
    let text = cs_dump(&dev);
    let tokens = luks2_tokens_section(&text);
    assert!(
        tokens.lines().any(|l| l.trim() == "0: luks-agent"),
        "cryptsetup luksDump must list token 0 of type luks-agent; Tokens section:\n{tokens}\nfull dump:\n{text}"
    );
    // ... and exports it with the key id and a keyslot reference.
    let r = cryptsetup(&["token", "export", "--token-id", "0", s(&dev)]);
    assert!(r.success(), "cryptsetup token export\n{r}");
    let tok: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("token export is not JSON: {e}\n{r}"));
    assert_eq!(tok["type"], "luks-agent", "{tok:#}");
    assert_eq!(tok["key_id"], KEY_ID, "{tok:#}");
    assert!(
        tok["keyslots"].is_array(),
        "LUKS2 tokens must carry a keyslots array: {tok:#}"
    );

    cs_expect_passphrase(&dev, &k1, true, "token format");

    let check_ours = |when: &str| {
        let j = agent_dump_json(&dev);
        let toks = j["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("{when}: tokens array in {j:#}"));
        assert_eq!(toks.len(), 1, "{when}: one token expected in {j:#}");
        assert_eq!(toks[0]["id"], 0, "{when}: {j:#}");
        assert_eq!(toks[0]["type"], "luks-agent", "{when}: {j:#}");
        assert_eq!(toks[0]["key_id"], KEY_ID, "{when}: {j:#}");
    };
    check_ours("after our format");

    // cryptsetup rewrites the metadata; the token survives and we read it.
    cs_add_key(&dev, &k1, &k2, FAST_ARGON2ID);
    check_ours("after cryptsetup luksAddKey");
    let model = assert_same_header(&dev);
    assert_same_volume_key(&dev, &[&k1, &k2], model.key_size_bits);
}

#[test]
fn we_format_luks2_without_key_id_has_no_tokens() {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k1 = fx.key("k1", K1);
    let mut args = vec!["--type", "luks2"];
    args.extend_from_slice(FAST_PBKDF2);
    agent_format(&dev, &k1, &args).expect_ok("luks format");
    let j = agent_dump_json(&dev);
    assert_eq!(
        j["tokens"],
        serde_json::json!([]),
        "no tokens expected: {j:#}"
    );
    let meta = cs_json_metadata(&dev);
    assert_eq!(meta["tokens"], serde_json::json!({}), "{meta:#}");
}

#[test]
fn we_format_refuses_existing_header_without_force() {
    for existing in ["luks1", "luks2"] {
        let fx = Fixture::new();
        let dev = fx.image("disk.img");
        let k1 = fx.key("k1", K1);
        let k2 = fx.key("k2", K2);
        cs_format(&dev, &k1, existing, cs_fast(existing));
        let before = sha256_file(&dev);
        for ty in ["luks1", "luks2"] {
            let mut args = vec!["--type", ty];
            args.extend_from_slice(FAST_PBKDF2);
            agent_format(&dev, &k2, &args).expect_code(
                5,
                &format!("formatting {ty} over an existing {existing} header without --force"),
            );
            assert_eq!(
                sha256_file(&dev),
                before,
                "refused format over {existing} modified the device"
            );
        }
        cs_expect_passphrase(&dev, &k1, true, "after refused format");

        let mut args = vec!["--type", "luks2", "--force"];
        args.extend_from_slice(FAST_PBKDF2);
        agent_format(&dev, &k2, &args).expect_ok("format --force over an existing header");
        cs_expect_passphrase(&dev, &k2, true, "after forced format");
        cs_expect_passphrase(&dev, &k1, false, "after forced format");
        let text = cs_dump(&dev);
        assert_eq!(dump_field(&text, "Version").as_deref(), Some("2"), "{text}");
    }
}

#[test]
fn we_format_with_key_on_stdin() {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k2 = fx.key("k2", K2);
    let k2_stripped = fx.key(
        "k2-stripped",
        K2.strip_suffix(b"\n").expect("K2 ends in a newline"),
    );
    let mut args = vec!["luks", "format", "--type", "luks2"];
    args.extend_from_slice(FAST_ARGON2ID);
    args.extend_from_slice(&["--key-file", "-", s(&dev)]);
    agent_stdin(&args, K2).expect_ok("luks format --key-file -");

    // The newline read from stdin is part of the passphrase.
    cs_expect_passphrase(&dev, &k2, true, "stdin format");
    cs_expect_passphrase(&dev, &k2_stripped, false, "stdin format, newline stripped");
    agent_expect_passphrase(&dev, &k2_stripped, false, "stdin format, newline stripped");

    agent_stdin(&["luks", "test-passphrase", "--key-file", "-", s(&dev)], K2)
        .expect_ok("test-passphrase --key-file -");
    agent_stdin(
        &["luks", "test-passphrase", "--key-file", "-", s(&dev)],
        WRONG,
    )
    .expect_code(2, "test-passphrase --key-file - with a wrong passphrase");
    let r = agent_stdin(
        &[
            "luks",
            "dump",
            "--dump-volume-key",
            "--key-file",
            "-",
            s(&dev),
        ],
        K2,
    );
    r.expect_ok("dump --dump-volume-key --key-file -");
    let ours = parse_volume_key(&r.stdout).unwrap_or_else(|| panic!("no volume key\n{r}"));
    assert_eq!(
        ours,
        cs_volume_key(&dev, &k2),
        "volume key via stdin differs from cryptsetup's"
    );
}

// ===========================================================================
// Direction (b): cryptsetup formats, luks-agent unlocks
// ===========================================================================

struct Formatted {
    fx: Fixture,
    dev: PathBuf,
    k1: PathBuf,
    bad: PathBuf,
}

/// cryptsetup formats with `args` (K1 in the slot it picks), then luks-agent
/// must accept K1, reject a wrong passphrase, describe the header as
/// cryptsetup does, and unlock the same volume key.
fn cs_format_we_unlock(ty: &str, args: &[&str], key_bits: u64) -> Formatted {
    cs_format_we_unlock_timeout(ty, args, key_bits, DEFAULT_TIMEOUT)
}

fn cs_format_we_unlock_timeout(
    ty: &str,
    args: &[&str],
    key_bits: u64,
    timeout: std::time::Duration,
) -> Formatted {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k1 = fx.key("k1", K1);
    let bad = fx.key("bad", WRONG);
    cs_format_timeout(&dev, &k1, ty, args, timeout);

    // With cryptsetup's benchmarked KDF every unlock costs seconds (far
    // more in a debug build): there the volume key dump below is the only
    // unlock.
    if timeout == DEFAULT_TIMEOUT {
        agent_expect_passphrase(&dev, &k1, true, "cryptsetup-formatted device");
        agent_expect_passphrase(&dev, &bad, false, "cryptsetup-formatted device");
    }
    let model = assert_same_header(&dev);
    assert_eq!(model.version, version_of(ty));
    assert_eq!(model.key_size_bits, key_bits, "{model:#?}");
    let theirs = cs_volume_key_timeout(&dev, &k1, timeout);
    assert_eq!(
        theirs.len() as u64 * 4,
        key_bits,
        "cryptsetup volume key size: {theirs}"
    );
    let ours = agent_volume_key_timeout(&dev, &k1, timeout);
    assert_eq!(
        ours, theirs,
        "luks-agent volume key (left) differs from cryptsetup's (right)"
    );
    Formatted { fx, dev, k1, bad }
}

fn with_fast<'a>(kdf: &'a [&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    cat(extra, kdf)
}

#[test]
fn cs_format_luks1_xts256() {
    let f = cs_format_we_unlock(
        "luks1",
        &with_fast(
            FAST_PBKDF2,
            &["--cipher", "aes-xts-plain64", "--key-size", "256"],
        ),
        256,
    );
    assert_eq!(agent_model(&f.dev).cipher, "aes-xts-plain64");
}

#[test]
fn cs_format_luks1_xts512() {
    let f = cs_format_we_unlock(
        "luks1",
        &with_fast(
            FAST_PBKDF2,
            &["--cipher", "aes-xts-plain64", "--key-size", "512"],
        ),
        512,
    );
    assert_eq!(agent_model(&f.dev).cipher, "aes-xts-plain64");
}

#[test]
fn cs_format_luks2_xts256() {
    cs_format_we_unlock(
        "luks2",
        &with_fast(
            FAST_PBKDF2,
            &["--cipher", "aes-xts-plain64", "--key-size", "256"],
        ),
        256,
    );
}

#[test]
fn cs_format_luks2_xts512() {
    cs_format_we_unlock(
        "luks2",
        &with_fast(
            FAST_ARGON2ID,
            &["--cipher", "aes-xts-plain64", "--key-size", "512"],
        ),
        512,
    );
}

#[test]
fn cs_format_luks1_cbc_essiv_128() {
    let f = cs_format_we_unlock(
        "luks1",
        &with_fast(
            FAST_PBKDF2,
            &["--cipher", "aes-cbc-essiv:sha256", "--key-size", "128"],
        ),
        128,
    );
    assert_eq!(agent_model(&f.dev).cipher, "aes-cbc-essiv:sha256");
}

#[test]
fn cs_format_luks1_cbc_essiv_256() {
    let f = cs_format_we_unlock(
        "luks1",
        &with_fast(
            FAST_PBKDF2,
            &["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"],
        ),
        256,
    );
    assert_eq!(agent_model(&f.dev).cipher, "aes-cbc-essiv:sha256");
}

fn cs_format_hash(ty: &str, hash: &str) {
    let f = cs_format_we_unlock(ty, &with_fast(FAST_PBKDF2, &["--hash", hash]), 512);
    let model = agent_model(&f.dev);
    assert_eq!(model.keyslots[&0].hash.as_deref(), Some(hash), "{model:#?}");
}

#[test]
fn cs_format_luks1_hash_sha1() {
    cs_format_hash("luks1", "sha1");
}

#[test]
fn cs_format_luks1_hash_sha512() {
    cs_format_hash("luks1", "sha512");
}

#[test]
fn cs_format_luks2_pbkdf2_sha1() {
    cs_format_hash("luks2", "sha1");
}

#[test]
fn cs_format_luks2_pbkdf2_sha512() {
    cs_format_hash("luks2", "sha512");
}

fn cs_format_nonzero_keyslots(ty: &str) {
    let kdf = cs_fast(ty);
    let f = cs_format_we_unlock(ty, &with_fast(kdf, &["--key-slot", "3"]), 512);
    let k2 = f.fx.key("k2", K2);
    cs_add_key(&f.dev, &f.k1, &k2, &with_fast(kdf, &["--key-slot", "5"]));
    let model = assert_same_header(&f.dev);
    assert_eq!(
        model.keyslots.keys().copied().collect::<Vec<_>>(),
        vec![3, 5],
        "{model:#?}"
    );
    agent_expect_passphrase(&f.dev, &k2, true, "keyslot 5");
    agent_expect_passphrase(&f.dev, &f.bad, false, "keyslots 3 and 5");
    assert_same_volume_key(&f.dev, &[&f.k1, &k2], 512);
}

#[test]
fn cs_format_luks1_keyslots_3_and_5() {
    cs_format_nonzero_keyslots("luks1");
}

#[test]
fn cs_format_luks2_keyslots_3_and_5() {
    cs_format_nonzero_keyslots("luks2");
}

fn cs_format_several_keyslots(ty: &str) {
    let kdf = cs_fast(ty);
    let f = cs_format_we_unlock(ty, kdf, 512);
    let k2 = f.fx.key("k2", K2);
    let k3 = f.fx.key("k3", K3);
    cs_add_key(&f.dev, &f.k1, &k2, kdf);
    cs_add_key(&f.dev, &k2, &k3, kdf);
    let model = assert_same_header(&f.dev);
    assert_eq!(
        model.keyslots.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "{model:#?}"
    );
    for k in [&f.k1, &k2, &k3] {
        agent_expect_passphrase(&f.dev, k, true, "several keyslots");
    }
    agent_expect_passphrase(&f.dev, &f.bad, false, "several keyslots");
    // Key files are used byte for byte: K2 without its newline is wrong.
    let stripped =
        f.fx.key("k2-stripped", K2.strip_suffix(b"\n").expect("newline"));
    cs_expect_passphrase(&f.dev, &stripped, false, "newline stripped");
    agent_expect_passphrase(&f.dev, &stripped, false, "newline stripped");
    assert_same_volume_key(&f.dev, &[&f.k1, &k2, &k3], 512);
}

#[test]
fn cs_format_luks1_several_keyslots() {
    cs_format_several_keyslots("luks1");
}

#[test]
fn cs_format_luks2_several_keyslots() {
    cs_format_several_keyslots("luks2");
}

#[test]
fn cs_format_luks2_sector_size_4096() {
    let f = cs_format_we_unlock(
        "luks2",
        &with_fast(FAST_ARGON2ID, &["--sector-size", "4096"]),
        512,
    );
    let meta = cs_json_metadata(&f.dev);
    assert_eq!(
        json_u64(&meta["segments"]["0"]["sector_size"]),
        Some(4096),
        "{meta:#}"
    );
}

#[test]
fn cs_format_luks2_sector_size_512() {
    let f = cs_format_we_unlock(
        "luks2",
        &with_fast(FAST_ARGON2ID, &["--sector-size", "512"]),
        512,
    );
    let meta = cs_json_metadata(&f.dev);
    assert_eq!(
        json_u64(&meta["segments"]["0"]["sector_size"]),
        Some(512),
        "{meta:#}"
    );
}

fn cs_format_metadata_sizes(metadata: &str, keyslots: &str, expect_data_offset: u64) {
    let f = cs_format_we_unlock(
        "luks2",
        &with_fast(
            FAST_PBKDF2,
            &[
                "--luks2-metadata-size",
                metadata,
                "--luks2-keyslots-size",
                keyslots,
            ],
        ),
        512,
    );
    let model = agent_model(&f.dev);
    assert_eq!(model.data_offset_bytes, expect_data_offset, "{model:#?}");
    let k2 = f.fx.key("k2", K2);
    cs_add_key(&f.dev, &f.k1, &k2, FAST_PBKDF2);
    assert_same_header(&f.dev);
    assert_same_volume_key(&f.dev, &[&f.k1, &k2], 512);
}

#[test]
fn cs_format_luks2_metadata_64k_keyslots_4m() {
    // 2 x 64 KiB metadata + 4 MiB keyslots, data aligned to 1 MiB: 5 MiB.
    cs_format_metadata_sizes("64k", "4m", 5 << 20);
}

#[test]
fn cs_format_luks2_metadata_4m_keyslots_1m() {
    // The secondary header sits at 4 MiB, the last offset a reader probes.
    cs_format_metadata_sizes("4m", "1m", 9 << 20);
}

#[test]
fn cs_format_luks2_metadata_256k_keyslots_2m() {
    cs_format_metadata_sizes("256k", "2m", 3 << 20);
}

#[test]
fn cs_format_luks2_argon2i() {
    let f = cs_format_we_unlock("luks2", FAST_ARGON2I, 512);
    let model = agent_model(&f.dev);
    assert_eq!(model.keyslots[&0].ty, "argon2i", "{model:#?}");
    assert_eq!(model.keyslots[&0].time, Some(4), "{model:#?}");
    assert_eq!(model.keyslots[&0].memory, Some(32), "{model:#?}");
}

#[test]
fn cs_format_luks2_argon2id() {
    let f = cs_format_we_unlock("luks2", FAST_ARGON2ID, 512);
    let model = agent_model(&f.dev);
    assert_eq!(model.keyslots[&0].ty, "argon2id", "{model:#?}");
}

/// cryptsetup's benchmarked default KDF (LUKS1: PBKDF2-SHA256 for ~2 s).
#[test]
fn cs_format_luks1_default_kdf() {
    let f = cs_format_we_unlock_timeout("luks1", &[], 512, SLOW_TIMEOUT);
    let model = agent_model(&f.dev);
    assert_eq!(
        model.cipher, "aes-xts-plain64",
        "cryptsetup 2.6 LUKS1 default cipher"
    );
    assert!(
        model.keyslots[&0].iterations.unwrap_or(0) > 1000,
        "{model:#?}"
    );
}

/// cryptsetup's benchmarked default KDF (LUKS2: Argon2id, up to 1 GiB, ~2 s).
#[test]
fn cs_format_luks2_default_kdf() {
    let f = cs_format_we_unlock_timeout("luks2", &[], 512, SLOW_TIMEOUT);
    let model = agent_model(&f.dev);
    assert_eq!(
        model.cipher, "aes-xts-plain64",
        "cryptsetup 2.6 LUKS2 default cipher"
    );
    assert_eq!(model.keyslots[&0].ty, "argon2id", "{model:#?}");
}

// ===========================================================================
// luks-agent key management on cryptsetup-formatted devices
// ===========================================================================

fn agent_kdf(ty: &str) -> (Kdf, &'static [&'static str]) {
    if ty == "luks1" {
        (Kdf::Pbkdf2, FAST_PBKDF2)
    } else {
        (Kdf::Argon2id, FAST_ARGON2ID)
    }
}

fn our_add_key(ty: &str) {
    let f = cs_format_we_unlock(ty, cs_fast(ty), 512);
    let k2 = f.fx.key("k2", K2);
    let k3 = f.fx.key("k3", K3);
    let (kdf, kdf_args) = agent_kdf(ty);

    // A wrong existing passphrase: exit 2, nothing written.
    let before = sha256_file(&f.dev);
    let mut args = vec![
        "luks",
        "add-key",
        "--key-file",
        s(&f.bad),
        "--new-key-file",
        s(&k2),
    ];
    args.extend_from_slice(kdf_args);
    args.push(s(&f.dev));
    agent(&args).expect_code(2, "add-key with a wrong existing passphrase");
    assert_eq!(
        sha256_file(&f.dev),
        before,
        "a failed add-key modified the device"
    );

    // Into an explicit slot.
    let mut args = vec![
        "luks",
        "add-key",
        "--key-file",
        s(&f.k1),
        "--new-key-file",
        s(&k2),
        "--key-slot",
        "4",
    ];
    args.extend_from_slice(kdf_args);
    args.push(s(&f.dev));
    agent(&args).expect_ok("add-key --key-slot 4");
    cs_expect_passphrase(&f.dev, &k2, true, "after our add-key");
    cs_expect_passphrase(&f.dev, &f.k1, true, "after our add-key");

    // Into the next free slot, authorised by the new passphrase.
    let mut args = vec![
        "luks",
        "add-key",
        "--key-file",
        s(&k2),
        "--new-key-file",
        s(&k3),
    ];
    args.extend_from_slice(kdf_args);
    args.push(s(&f.dev));
    agent(&args).expect_ok("add-key into a free slot");
    cs_expect_passphrase(&f.dev, &k3, true, "after our second add-key");

    let model = assert_same_header(&f.dev);
    assert_eq!(model.keyslots.len(), 3, "{model:#?}");
    assert!(
        model.keyslots.contains_key(&4),
        "slot 4 expected in {model:#?}"
    );
    assert_fast_kdf(&model, 4, kdf, "keyslot added by luks-agent");
    assert_same_volume_key(&f.dev, &[&f.k1, &k2, &k3], 512);

    // Slot 4 is taken now.
    let k4 = f.fx.key("k4", b"fourth");
    let before = sha256_file(&f.dev);
    let mut args = vec![
        "luks",
        "add-key",
        "--key-file",
        s(&f.k1),
        "--new-key-file",
        s(&k4),
        "--key-slot",
        "4",
    ];
    args.extend_from_slice(kdf_args);
    args.push(s(&f.dev));
    let r = agent(&args);
    r.expect_code_in(&[1, 5], "add-key into an occupied slot must be refused");
    assert_eq!(
        sha256_file(&f.dev),
        before,
        "refused add-key modified the device"
    );
    cs_expect_passphrase(&f.dev, &k2, true, "slot 4 intact after refused add-key");
}

#[test]
fn cs_format_luks1_then_our_add_key() {
    our_add_key("luks1");
}

#[test]
fn cs_format_luks2_then_our_add_key() {
    our_add_key("luks2");
}

#[test]
fn cs_format_luks1_full_keyslots_our_add_key_refused() {
    let f = cs_format_we_unlock("luks1", FAST_PBKDF2, 512);
    for i in 1..8 {
        let k = f.fx.key(
            &format!("k{i}x"),
            format!("passphrase number {i}").as_bytes(),
        );
        cs_add_key(&f.dev, &f.k1, &k, FAST_PBKDF2);
    }
    assert_eq!(luks1_enabled_slots(&cs_dump(&f.dev)).len(), 8);
    let k9 = f.fx.key("k9", b"one too many");
    let before = sha256_file(&f.dev);
    let mut args = vec![
        "luks",
        "add-key",
        "--key-file",
        s(&f.k1),
        "--new-key-file",
        s(&k9),
    ];
    args.extend_from_slice(FAST_PBKDF2);
    args.push(s(&f.dev));
    agent(&args).expect_code(5, "add-key with all 8 LUKS1 keyslots in use");
    assert_eq!(
        sha256_file(&f.dev),
        before,
        "refused add-key modified the device"
    );
}

fn our_remove_key(ty: &str) {
    let kdf = cs_fast(ty);
    let f = cs_format_we_unlock(ty, kdf, 512);
    let k2 = f.fx.key("k2", K2);
    let k3 = f.fx.key("k3", K3);
    cs_add_key(&f.dev, &f.k1, &k2, &with_fast(kdf, &["--key-slot", "1"]));
    cs_add_key(&f.dev, &f.k1, &k3, &with_fast(kdf, &["--key-slot", "6"]));
    let key = cs_volume_key(&f.dev, &f.k1);

    // A wrong passphrase removes nothing.
    let before = sha256_file(&f.dev);
    agent(&["luks", "remove-key", "--key-file", s(&f.bad), s(&f.dev)])
        .expect_code(2, "remove-key with a wrong passphrase");
    assert_eq!(
        sha256_file(&f.dev),
        before,
        "failed remove-key modified the device"
    );

    // Remove the slot K2 opens.
    agent(&["luks", "remove-key", "--key-file", s(&k2), s(&f.dev)]).expect_ok("remove-key (K2)");
    cs_expect_passphrase(&f.dev, &k2, false, "after removing K2");
    cs_expect_passphrase(&f.dev, &f.k1, true, "after removing K2");
    cs_expect_passphrase(&f.dev, &k3, true, "after removing K2");
    agent_expect_passphrase(&f.dev, &k2, false, "after removing K2");

    // Remove slot 6 (K3), authorised by K1.
    agent(&[
        "luks",
        "remove-key",
        "--key-file",
        s(&f.k1),
        "--key-slot",
        "6",
        s(&f.dev),
    ])
    .expect_ok("remove-key --key-slot 6 authorised by K1");
    cs_expect_passphrase(&f.dev, &k3, false, "after removing slot 6");
    cs_expect_passphrase(&f.dev, &f.k1, true, "after removing slot 6");
    let model = assert_same_header(&f.dev);
    assert_eq!(
        model.keyslots.keys().copied().collect::<Vec<_>>(),
        vec![0],
        "{model:#?}"
    );
    if ty == "luks1" {
        let text = cs_dump(&f.dev);
        assert_eq!(
            dump_field(&text, "Key Slot 1").as_deref(),
            Some("DISABLED"),
            "{text}"
        );
        assert_eq!(
            dump_field(&text, "Key Slot 6").as_deref(),
            Some("DISABLED"),
            "{text}"
        );
    }

    // The last keyslot is never removed.
    let before = sha256_file(&f.dev);
    agent(&["luks", "remove-key", "--key-file", s(&f.k1), s(&f.dev)])
        .expect_code(5, "remove-key of the last keyslot");
    assert_eq!(
        sha256_file(&f.dev),
        before,
        "refused remove-key modified the device"
    );
    cs_expect_passphrase(
        &f.dev,
        &f.k1,
        true,
        "after refusing to remove the last keyslot",
    );
    assert_eq!(cs_volume_key(&f.dev, &f.k1), key, "volume key changed");
}

#[test]
fn cs_format_luks1_then_our_remove_key() {
    our_remove_key("luks1");
}

#[test]
fn cs_format_luks2_then_our_remove_key() {
    our_remove_key("luks2");
}

fn our_change_key(ty: &str) {
    let f = cs_format_we_unlock(ty, cs_fast(ty), 512);
    let k2 = f.fx.key("k2", K2);
    let key = cs_volume_key(&f.dev, &f.k1);
    let (_, kdf_args) = agent_kdf(ty);

    let before = sha256_file(&f.dev);
    let mut args = vec![
        "luks",
        "change-key",
        "--key-file",
        s(&f.bad),
        "--new-key-file",
        s(&k2),
    ];
    args.extend_from_slice(kdf_args);
    args.push(s(&f.dev));
    agent(&args).expect_code(2, "change-key with a wrong passphrase");
    assert_eq!(
        sha256_file(&f.dev),
        before,
        "failed change-key modified the device"
    );

    let mut args = vec![
        "luks",
        "change-key",
        "--key-file",
        s(&f.k1),
        "--new-key-file",
        s(&k2),
    ];
    args.extend_from_slice(kdf_args);
    args.push(s(&f.dev));
    agent(&args).expect_ok("change-key");
    cs_expect_passphrase(&f.dev, &k2, true, "after change-key");
    cs_expect_passphrase(&f.dev, &f.k1, false, "after change-key");
    agent_expect_passphrase(&f.dev, &f.k1, false, "after change-key");
    let model = assert_same_header(&f.dev);
    assert_eq!(
        model.keyslots.len(),
        1,
        "exactly one keyslot after change-key: {model:#?}"
    );
    assert_eq!(
        assert_same_volume_key(&f.dev, &[&k2], 512),
        key,
        "change-key changed the volume key"
    );
}

#[test]
fn cs_format_luks1_then_our_change_key() {
    our_change_key("luks1");
}

#[test]
fn cs_format_luks2_then_our_change_key() {
    our_change_key("luks2");
}

/// A keyslot `cryptsetup luksAddKey --unbound` made opens with its
/// passphrase but holds a key that is not the segment's: luks-agent never
/// uses it (test-passphrase fails, the volume key dump refuses it), shows
/// it as unbound, and still opens with the bound keyslot. cryptsetup
/// agrees that the unbound passphrase does not activate the volume.
#[test]
fn cs_unbound_keyslot_is_never_the_volume_key() {
    let f = cs_format_we_unlock("luks2", &with_fast(FAST_PBKDF2, &[]), 512);
    let k2 = f.fx.key("k2", K2);
    let r = cryptsetup(&cat(
        &[
            "luksAddKey",
            "--batch-mode",
            "--unbound",
            "--key-size",
            "256",
            "--key-file",
            s(&f.k1),
            s(&f.dev),
            s(&k2),
        ],
        FAST_PBKDF2,
    ));
    r.expect_ok("cryptsetup luksAddKey --unbound");
    // cryptsetup's own view: the unbound passphrase does not open the
    // segment.
    let cs = cs_test_passphrase(&f.dev, &k2);
    assert!(
        !cs.success(),
        "cryptsetup accepted the unbound keyslot's passphrase for the segment: {}",
        cs.stderr
    );
    agent_expect_passphrase(&f.dev, &k2, false, "unbound keyslot");
    agent_expect_passphrase(&f.dev, &f.k1, true, "bound keyslot beside an unbound one");
    let dump = agent(&[
        "luks",
        "dump",
        "--dump-volume-key",
        "--key-file",
        s(&k2),
        s(&f.dev),
    ]);
    assert_ne!(
        dump.code,
        Some(0),
        "the unbound keyslot's key was dumped as the volume key: {}",
        dump.stdout
    );
    let text = agent(&["luks", "dump", s(&f.dev)]);
    text.expect_ok("luks dump");
    assert!(
        text.stdout.contains("1: luks2 (unbound)"),
        "{}",
        text.stdout
    );
    let json: serde_json::Value =
        serde_json::from_str(&agent(&["luks", "dump", "--json", s(&f.dev)]).stdout).unwrap();
    let bound: Vec<_> = json["keyslots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["slot"].as_u64().unwrap(), k["bound"].as_bool().unwrap()))
        .collect();
    assert_eq!(bound, vec![(0, true), (1, false)]);
    assert_eq!(json["key_size_bits"], 512);
    assert_same_volume_key(&f.dev, &[&f.k1], 512);
}

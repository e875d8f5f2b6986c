//! Interoperability with QEMU's LUKS driver (qemu-img / qemu-io, LUKS1).
//!
//! The data path is checked end to end: QEMU encrypts guest writes with the
//! volume key, and this test decrypts the raw image with the key luks-agent
//! dumps, using an independent AES-XTS-plain64 implementation.

mod common;

use std::path::Path;

use common::*;

const PASS: &[u8] = b"qemu interop passphrase";
const WRONG: &[u8] = b"wrong qemu passphrase";
const LEN: usize = 64 * 1024;

fn secret_object(key: &Path) -> String {
    format!("secret,id=s0,file={},format=raw", s(key))
}

fn qemu_io_cmd(dev: &Path, key: &Path, cmd: &str) -> Run {
    let opts = format!("driver=luks,key-secret=s0,file.filename={}", s(dev));
    qemu_io(&[
        "--object",
        &secret_object(key),
        "--image-opts",
        &opts,
        "-c",
        cmd,
    ])
}

/// qemu-io writes `len` bytes of `pattern` at guest offset `offset`.
fn qemu_write_pattern(dev: &Path, key: &Path, pattern: u8, offset: u64, len: usize) {
    let r = qemu_io_cmd(
        dev,
        key,
        &format!("write -P 0x{pattern:02x} {offset} {len}"),
    );
    assert!(
        r.success()
            && r.stdout
                .contains(&format!("wrote {len}/{len} bytes at offset {offset}")),
        "qemu-io write failed\n{r}"
    );
}

/// qemu-io reads guest bytes and verifies they are all `pattern`.
fn qemu_verify_pattern(dev: &Path, key: &Path, pattern: u8, offset: u64, len: usize) {
    let r = qemu_io_cmd(dev, key, &format!("read -P 0x{pattern:02x} {offset} {len}"));
    assert!(
        r.success()
            && !r.stdout.contains("Pattern verification failed")
            && !r.stderr.contains("Pattern verification failed"),
        "qemu-io does not read back 0x{pattern:02x} at guest offset {offset}\n{r}"
    );
}

/// Reads the ciphertext of guest bytes `[offset, offset + len)`.
fn raw_guest(dev: &Path, data_offset: u64, offset: u64, len: usize) -> Vec<u8> {
    read_at(dev, data_offset + offset, len)
}

/// Decrypts guest bytes with the volume key (hex) and checks the pattern;
/// also checks the ciphertext is not the plaintext.
fn assert_decrypts_to(
    dev: &Path,
    vk_hex: &str,
    data_offset: u64,
    offset: u64,
    len: usize,
    pattern: u8,
) {
    let key = hex::decode(vk_hex).expect("volume key is hex");
    let raw = raw_guest(dev, data_offset, offset, len);
    for (i, sector) in raw.chunks(512).enumerate() {
        assert!(
            sector.iter().any(|&b| b != pattern),
            "sector {i} at guest offset {offset} is stored in plaintext"
        );
    }
    let mut plain = raw;
    xts_plain64_decrypt(&key, &mut plain, offset / 512);
    if let Some(pos) = plain.iter().position(|&b| b != pattern) {
        panic!(
            "decrypting guest offset {offset} (data offset {data_offset}) with luks-agent's volume key \
             does not give 0x{pattern:02x}: first mismatch at byte {pos} (0x{:02x})",
            plain[pos]
        );
    }
}

/// We encrypt `pattern` at guest `offset` with the volume key; QEMU must
/// read it back.
fn write_encrypted(
    dev: &Path,
    vk_hex: &str,
    data_offset: u64,
    offset: u64,
    len: usize,
    pattern: u8,
) {
    let key = hex::decode(vk_hex).expect("volume key is hex");
    let mut buf = vec![pattern; len];
    xts_plain64_encrypt(&key, &mut buf, offset / 512);
    write_at(dev, data_offset + offset, &buf);
}

fn we_format_qemu_writes(key_bits: u64) {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k = fx.key("key", PASS);
    let bits = key_bits.to_string();
    let mut args = vec![
        "--type",
        "luks1",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        &bits,
        "--hash",
        "sha256",
    ];
    args.extend_from_slice(FAST_PBKDF2);
    agent_format(&dev, &k, &args).expect_ok("luks format");

    let j = agent_dump_json(&dev);
    let model = model_from_agent_json(&j);
    assert_eq!(model.version, 1, "{j:#}");
    assert_eq!(model.key_size_bits, key_bits, "{j:#}");
    let data_offset = model.data_offset_bytes;
    assert!(
        data_offset >= 4096 && data_offset.is_multiple_of(512),
        "implausible data offset {data_offset}"
    );

    // QEMU opens our header and writes through it.
    qemu_write_pattern(&dev, &k, 0x5a, 0, LEN);
    qemu_write_pattern(&dev, &k, 0x3c, 1 << 20, 4096);

    let vk = agent_volume_key(&dev, &k);
    assert_eq!(vk.len() as u64 * 4, key_bits, "volume key size: {vk}");
    assert_decrypts_to(&dev, &vk, data_offset, 0, LEN, 0x5a);
    assert_decrypts_to(&dev, &vk, data_offset, 1 << 20, 4096, 0x3c);

    // The other direction: we encrypt, QEMU reads.
    write_encrypted(&dev, &vk, data_offset, LEN as u64, LEN, 0xa5);
    qemu_verify_pattern(&dev, &k, 0xa5, LEN as u64, LEN);
    qemu_verify_pattern(&dev, &k, 0x5a, 0, LEN);

    // A wrong passphrase does not open in QEMU either.
    let bad = fx.key("bad", WRONG);
    let r = qemu_io_cmd(&dev, &bad, "read 0 512");
    assert!(!r.success(), "qemu-io opened with a wrong passphrase\n{r}");
}

#[test]
fn we_format_luks1_xts512_qemu_io_writes_we_decrypt() {
    we_format_qemu_writes(512);
}

#[test]
fn we_format_luks1_xts256_qemu_io_writes_we_decrypt() {
    we_format_qemu_writes(256);
}

/// qemu-img creates the LUKS1 image (`opts` appended to its -o list).
fn qemu_img_create(dev: &Path, key: &Path, opts: &str) {
    // iter-time keeps QEMU's benchmarked PBKDF2 short.
    let o = format!("key-secret=s0,iter-time=10{opts}");
    let r = qemu_img(&[
        "create",
        "-f",
        "luks",
        "--object",
        &secret_object(key),
        "-o",
        &o,
        s(dev),
        "32M",
    ]);
    assert!(r.success(), "qemu-img create -f luks failed\n{r}");
}

struct Expect {
    cipher: &'static str,
    key_bits: u64,
    hash: &'static str,
}

fn qemu_img_created_we_unlock(opts: &str, expect: Expect) {
    let fx = Fixture::new();
    let dev = fx.path("qemu.img");
    let k = fx.key("key", PASS);
    let bad = fx.key("bad", WRONG);
    qemu_img_create(&dev, &k, opts);

    agent_expect_passphrase(&dev, &k, true, "qemu-img image");
    agent_expect_passphrase(&dev, &bad, false, "qemu-img image");

    // Our view of QEMU's header matches cryptsetup's (QEMU uses its own
    // layout: the payload offset is not 1 MiB aligned).
    let model = assert_same_header(&dev);
    assert_eq!(model.version, 1);
    assert_eq!(model.cipher, expect.cipher, "{model:#?}");
    assert_eq!(model.key_size_bits, expect.key_bits, "{model:#?}");
    for kdf in model.keyslots.values() {
        assert_eq!(kdf.hash.as_deref(), Some(expect.hash), "{model:#?}");
    }
    let vk = agent_volume_key(&dev, &k);
    assert_eq!(
        vk,
        cs_volume_key(&dev, &k),
        "luks-agent and cryptsetup disagree on QEMU's volume key"
    );
    assert_eq!(vk.len() as u64 * 4, expect.key_bits);

    if expect.cipher == "aes-xts-plain64" {
        qemu_write_pattern(&dev, &k, 0x5a, 0, LEN);
        qemu_write_pattern(&dev, &k, 0x77, 3 << 20, 8192);
        assert_decrypts_to(&dev, &vk, model.data_offset_bytes, 0, LEN, 0x5a);
        assert_decrypts_to(&dev, &vk, model.data_offset_bytes, 3 << 20, 8192, 0x77);
        write_encrypted(&dev, &vk, model.data_offset_bytes, 5 << 20, LEN, 0xc3);
        qemu_verify_pattern(&dev, &k, 0xc3, 5 << 20, LEN);
    }
}

#[test]
fn qemu_img_created_aes256_xts_we_unlock_and_decrypt() {
    qemu_img_created_we_unlock(
        "",
        Expect {
            cipher: "aes-xts-plain64",
            key_bits: 512,
            hash: "sha256",
        },
    );
}

#[test]
fn qemu_img_created_aes128_xts_we_unlock_and_decrypt() {
    qemu_img_created_we_unlock(
        ",cipher-alg=aes-128",
        Expect {
            cipher: "aes-xts-plain64",
            key_bits: 256,
            hash: "sha256",
        },
    );
}

#[test]
fn qemu_img_created_aes256_cbc_essiv_sha512_we_unlock() {
    qemu_img_created_we_unlock(
        ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha512",
        Expect {
            cipher: "aes-cbc-essiv:sha256",
            key_bits: 256,
            hash: "sha512",
        },
    );
}

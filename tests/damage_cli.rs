//! Damaged, truncated and hostile headers: luks-agent must fall back to the
//! LUKS2 secondary header where the format allows it, report exit code 4
//! (device unusable) with the device path otherwise, never modify a device
//! on a failed unlock, and never panic.

mod common;

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

const K1: &[u8] = b"damage test passphrase";
const WRONG: &[u8] = b"damage test wrong passphrase";

/// Limit for commands on hostile headers: they must fail fast.
const HOSTILE_TIMEOUT: Duration = Duration::from_secs(60);

struct Dev {
    fx: Fixture,
    dev: PathBuf,
    k1: PathBuf,
    bad: PathBuf,
}

fn formatted(ty: &str, extra: &[&str]) -> Dev {
    let fx = Fixture::new();
    let dev = fx.image("disk.img");
    let k1 = fx.key("k1", K1);
    let bad = fx.key("bad", WRONG);
    let kdf = if ty == "luks1" {
        FAST_PBKDF2
    } else {
        FAST_ARGON2ID
    };
    cs_format(&dev, &k1, ty, &cat(kdf, extra));
    Dev { fx, dev, k1, bad }
}

fn agent_hostile(args: &[&str]) -> Run {
    agent_timeout(args, HOSTILE_TIMEOUT)
}

/// Runs every read-only command with the right passphrase and asserts all
/// of them fail with exit code 4 and name the device.
fn assert_unusable(dev: &Path, key: &Path, what: &str) {
    let runs = [
        ("luks dump", agent_hostile(&["luks", "dump", s(dev)])),
        (
            "luks dump --json",
            agent_hostile(&["luks", "dump", "--json", s(dev)]),
        ),
        (
            "luks test-passphrase",
            agent_hostile(&["luks", "test-passphrase", "--key-file", s(key), s(dev)]),
        ),
        (
            "luks dump --dump-volume-key",
            agent_hostile(&[
                "luks",
                "dump",
                "--dump-volume-key",
                "--key-file",
                s(key),
                s(dev),
            ]),
        ),
    ];
    for (cmd, r) in &runs {
        let what = format!("{what}: {cmd}");
        r.expect_code(4, &what).expect_stderr_names(dev, &what);
    }
}

// ---------------------------------------------------------------------------
// LUKS2 primary header damage: the secondary copy takes over
// ---------------------------------------------------------------------------

fn primary_damage_falls_back(extra: &[&str], damage: Range<u64>, seed: u64) {
    let d = formatted("luks2", extra);
    let vk = cs_volume_key(&d.dev, &d.k1);
    let uuid = dump_field(&cs_dump(&d.dev), "UUID").expect("UUID");
    let len = usize::try_from(damage.end - damage.start).expect("small range");
    write_at(&d.dev, damage.start, &garbage(len, seed));
    // cryptsetup repairs the primary header when it opens a device, so it
    // gets its own copy of the damaged image.
    let cs_copy = d.fx.copy(&d.dev, "cryptsetup-copy.img");
    let before = sha256_file(&d.dev);

    // A wrong passphrase fails with 2 and writes nothing.
    agent_test_passphrase(&d.dev, &d.bad)
        .expect_code(2, "wrong passphrase, damaged primary header");
    agent(&[
        "luks",
        "dump",
        "--dump-volume-key",
        "--key-file",
        s(&d.bad),
        s(&d.dev),
    ])
    .expect_code(
        2,
        "dump-volume-key with a wrong passphrase, damaged primary header",
    );
    assert_eq!(
        sha256_file(&d.dev),
        before,
        "a failed unlock modified the device"
    );

    // The right passphrase works through the secondary header.
    agent_test_passphrase(&d.dev, &d.k1).expect_ok("test-passphrase with a damaged primary header");
    assert_eq!(
        agent_volume_key(&d.dev, &d.k1),
        vk,
        "volume key read via the secondary header"
    );
    let j = agent_dump_json(&d.dev);
    assert_eq!(j["version"], 2, "{j:#}");
    assert_eq!(j["uuid"], uuid.as_str(), "{j:#}");

    // cryptsetup agrees that the device still opens.
    cs_expect_passphrase(&cs_copy, &d.k1, true, "damaged primary header (cryptsetup)");
}

#[test]
fn luks2_primary_binary_header_garbage_uses_secondary() {
    primary_damage_falls_back(&[], 0..4096, 1);
}

#[test]
fn luks2_primary_json_area_garbage_uses_secondary() {
    primary_damage_falls_back(&[], 4096..16384, 2);
}

#[test]
fn luks2_64k_metadata_primary_garbage_uses_secondary_at_64k() {
    primary_damage_falls_back(
        &[
            "--luks2-metadata-size",
            "64k",
            "--luks2-keyslots-size",
            "4m",
        ],
        0..4096,
        3,
    );
}

#[test]
fn luks2_4m_metadata_primary_garbage_uses_secondary_at_4m() {
    primary_damage_falls_back(
        &["--luks2-metadata-size", "4m", "--luks2-keyslots-size", "1m"],
        0..4096,
        4,
    );
}

#[test]
fn luks2_both_headers_damaged_is_unusable() {
    let d = formatted("luks2", &[]);
    write_at(&d.dev, 0, &garbage(4096, 5));
    write_at(&d.dev, 16384, &garbage(4096, 6));
    let before = sha256_file(&d.dev);
    assert_unusable(&d.dev, &d.k1, "both LUKS2 headers damaged");
    assert_eq!(
        sha256_file(&d.dev),
        before,
        "a failed command modified the device"
    );
    let r = cs_test_passphrase(&d.dev, &d.k1);
    assert!(!r.success(), "cryptsetup should not open it either\n{r}");
}

/// Every byte of the primary binary header (0..512) and of its JSON area
/// is covered by the header checksum: with any one of them inverted the
/// device stays usable through the secondary header. Exception: the version
/// field (bytes 6..8), which cryptsetup 2.6 reads before checksumming and
/// rejects ("Unsupported LUKS version"); falling back is fine there too.
/// `luks dump` runs for every offset, the (slower) unlock for a sample.
#[test]
fn luks2_primary_header_single_byte_flips_fall_back() {
    let d = formatted("luks2", &[]);
    let region = read_at(&d.dev, 0, 2 * 16384);
    let mut offsets: Vec<usize> = (0..512).collect();
    offsets.extend((4096..16384).step_by(97));
    let unlock = luks2_unlock_offsets();
    let failures = flip_workers(&d, &region, &offsets, |dev, k1, off| {
        let what = format!("primary LUKS2 header byte {off} inverted");
        let allowed: &[i32] = if matches!(off, 6 | 7) { &[0, 4] } else { &[0] };
        let dump = agent_hostile(&["luks", "dump", s(dev)]);
        if let Some(p) = dump.assert_no_panic_soft() {
            return Some(format!("{what}: luks dump: {p}"));
        }
        if !dump.code.is_some_and(|c| allowed.contains(&c)) {
            return Some(format!(
                "{what}: luks dump must exit {allowed:?} (secondary header)\n{dump}"
            ));
        }
        if !unlock.contains(&off) {
            return None;
        }
        let tp = agent_hostile(&["luks", "test-passphrase", "--key-file", s(k1), s(dev)]);
        if let Some(p) = tp.assert_no_panic_soft() {
            return Some(format!("{what}: test-passphrase: {p}"));
        }
        if !tp.code.is_some_and(|c| allowed.contains(&c)) {
            return Some(format!(
                "{what}: test-passphrase must exit {allowed:?} (secondary header)\n{tp}"
            ));
        }
        None
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// First two and last offset of `range`, or all of them when `dense`.
/// Salts, digests, UUIDs, labels and string padding behave the same at
/// every byte, so a sample of them is enough for the slow checks.
fn pick(range: Range<usize>, dense: bool) -> Vec<usize> {
    if dense || range.len() <= 3 {
        return range.collect();
    }
    vec![range.start, range.start + 1, range.end - 1]
}

fn luks2_unlock_offsets() -> BTreeSet<usize> {
    let mut v = BTreeSet::new();
    for (r, dense) in [
        (0..24, true),     // magic, version, hdr_size, seqid
        (24..72, false),   // label
        (72..80, true),    // checksum_alg "sha256" and its NUL
        (80..104, false),  // checksum_alg padding
        (104..168, false), // salt
        (168..208, false), // uuid
        (208..256, false), // subsystem
        (256..264, true),  // hdr_offset
        (264..448, false), // padding
        (448..480, false), // checksum
        (480..512, false), // checksum field tail
    ] {
        v.extend(pick(r, dense));
    }
    v.extend((4096..16384).step_by(97).step_by(8));
    v
}

// ---------------------------------------------------------------------------
// A wrong passphrase never modifies anything
// ---------------------------------------------------------------------------

fn wrong_passphrase_is_read_only(ty: &str) {
    let d = formatted(ty, &[]);
    let k2 = d.fx.key("k2", b"new passphrase");
    let before = sha256_file(&d.dev);
    let fast = if ty == "luks1" {
        FAST_PBKDF2
    } else {
        FAST_ARGON2ID
    };
    let bad = s(&d.bad);
    let dev = s(&d.dev);
    let cmds: Vec<Vec<&str>> = vec![
        vec!["luks", "test-passphrase", "--key-file", bad, dev],
        vec!["luks", "dump", "--dump-volume-key", "--key-file", bad, dev],
        cat(
            &cat(
                &[
                    "luks",
                    "add-key",
                    "--key-file",
                    bad,
                    "--new-key-file",
                    s(&k2),
                ],
                fast,
            ),
            &[dev],
        ),
        vec!["luks", "remove-key", "--key-file", bad, dev],
        vec![
            "luks",
            "remove-key",
            "--key-file",
            bad,
            "--key-slot",
            "0",
            dev,
        ],
        cat(
            &cat(
                &[
                    "luks",
                    "change-key",
                    "--key-file",
                    bad,
                    "--new-key-file",
                    s(&k2),
                ],
                fast,
            ),
            &[dev],
        ),
    ];
    for args in &cmds {
        agent(args).expect_code(2, &format!("{ty}: wrong passphrase"));
        assert_eq!(
            sha256_file(&d.dev),
            before,
            "{ty}: `{}` with a wrong passphrase modified the device",
            args.join(" ")
        );
    }
    cs_expect_passphrase(&d.dev, &d.k1, true, "after failed commands");
}

#[test]
fn luks1_wrong_passphrase_leaves_device_unchanged() {
    wrong_passphrase_is_read_only("luks1");
}

#[test]
fn luks2_wrong_passphrase_leaves_device_unchanged() {
    wrong_passphrase_is_read_only("luks2");
}

// ---------------------------------------------------------------------------
// Truncated devices, non-LUKS devices
// ---------------------------------------------------------------------------

/// Cuts a formatted image; `header_incomplete` lists cuts at which not even
/// the header can be read (dump must fail too).
fn truncated(ty: &str, cuts: &[u64], header_incomplete: &[u64]) {
    let d = formatted(ty, &[]);
    for &cut in cuts {
        let t = d.fx.truncated_copy(&d.dev, &format!("cut-{cut}.img"), cut);
        let what = format!("{ty} image cut at {cut} bytes");
        agent_hostile(&["luks", "test-passphrase", "--key-file", s(&d.k1), s(&t)])
            .expect_code(4, &format!("{what}: test-passphrase"))
            .expect_stderr_names(&t, &what);
        agent_hostile(&[
            "luks",
            "dump",
            "--dump-volume-key",
            "--key-file",
            s(&d.k1),
            s(&t),
        ])
        .expect_code(4, &format!("{what}: dump --dump-volume-key"))
        .expect_stderr_names(&t, &what);
        let r = agent_hostile(&["luks", "dump", "--json", s(&t)]);
        if header_incomplete.contains(&cut) {
            r.expect_code(4, &format!("{what}: dump --json"))
                .expect_stderr_names(&t, &what);
        } else {
            r.expect_code_in(&[0, 4], &format!("{what}: dump --json"));
        }
    }
}

#[test]
fn luks1_truncated_images_are_unusable() {
    // LUKS1: 592-byte header, keyslot 0 material from 4096 for 256000 bytes.
    truncated("luks1", &[100, 592, 4096, 16384], &[100]);
}

#[test]
fn luks2_truncated_images_are_unusable() {
    // LUKS2: 16 KiB primary, 16 KiB secondary, keyslot 0 area from 32 KiB.
    truncated(
        "luks2",
        &[100, 592, 4096, 16384, 20000, 32768 + 65536],
        &[100, 592, 4096],
    );
}

#[test]
fn zero_filled_device_is_not_luks() {
    let fx = Fixture::new();
    let dev = fx.image("zeros.img");
    let k = fx.key("k", K1);
    assert_unusable(&dev, &k, "zero-filled device");
    let k2 = fx.key("k2", b"other");
    let mut args = vec![
        "luks",
        "add-key",
        "--key-file",
        s(&k),
        "--new-key-file",
        s(&k2),
    ];
    args.extend_from_slice(FAST_PBKDF2);
    args.push(s(&dev));
    agent(&args)
        .expect_code(4, "add-key on a zero-filled device")
        .expect_stderr_names(&dev, "add-key");
    let r = cryptsetup(&["isLuks", s(&dev)]);
    assert!(!r.success(), "the zero-filled device became LUKS\n{r}");
}

#[test]
fn empty_and_missing_devices_are_unusable() {
    let fx = Fixture::new();
    let k = fx.key("k", K1);
    let empty = fx.image_of("empty.img", 0);
    assert_unusable(&empty, &k, "empty file");
    let small = fx.path("short.img");
    std::fs::write(&small, garbage(1000, 9)).expect("write short file");
    assert_unusable(&small, &k, "1000 bytes of garbage");
    let missing = fx.path("does-not-exist.img");
    assert_unusable(&missing, &k, "missing device");
}

// ---------------------------------------------------------------------------
// LUKS1 header byte flips
// ---------------------------------------------------------------------------

/// Runs `check(dev, key, offset)` for each offset on a working copy whose
/// `region` (starting at byte 0) is restored with that single byte inverted
/// before each check, on two threads. Also fails when a check modifies the
/// region. Returns the failure messages.
fn flip_workers<F>(d: &Dev, region: &[u8], offsets: &[usize], check: F) -> Vec<String>
where
    F: Fn(&Path, &Path, usize) -> Option<String> + Sync,
{
    const WORKERS: usize = 2;
    let copies: Vec<PathBuf> = (0..WORKERS)
        .map(|w| d.fx.copy(&d.dev, &format!("flip-{w}.img")))
        .collect();
    let check = &check;
    thread::scope(|scope| {
        let handles: Vec<_> = copies
            .iter()
            .enumerate()
            .map(|(w, copy)| {
                let k1 = d.k1.clone();
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for &off in offsets.iter().skip(w).step_by(WORKERS) {
                        let mut damaged = region.to_vec();
                        damaged[off] ^= 0xff;
                        write_at(copy, 0, &damaged);
                        if let Some(f) = check(copy, &k1, off) {
                            failures.push(f);
                        }
                        if read_at(copy, 0, region.len()) != damaged {
                            failures
                                .push(format!("byte {off} flipped: a command modified the device"));
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("flip worker panicked"))
            .collect()
    })
}

/// LUKS1 phdr field containing `off`.
fn luks1_field(off: usize) -> String {
    match off {
        0..=5 => "magic".into(),
        6..=7 => "version".into(),
        8..=39 => "cipherName".into(),
        40..=71 => "cipherMode".into(),
        72..=103 => "hashSpec".into(),
        104..=107 => "payloadOffset".into(),
        108..=111 => "keyBytes".into(),
        112..=131 => "mkDigest".into(),
        132..=163 => "mkDigestSalt".into(),
        164..=167 => "mkDigestIterations".into(),
        168..=207 => "uuid".into(),
        _ => {
            let slot = (off - 208) / 48;
            let field = match (off - 208) % 48 {
                0..=3 => "active",
                4..=7 => "iterations",
                8..=39 => "salt",
                40..=43 => "keyMaterialOffset",
                _ => "stripes",
            };
            format!("keyslot[{slot}].{field}")
        }
    }
}

/// Offsets of the LUKS1 phdr at which test-passphrase runs after `luks
/// dump`: every byte of the fields whose value steers the unlock, a sample
/// of homogeneous fields, and never the two high bytes of an iteration
/// count (inverted, they make the KDF run for minutes to hours).
fn luks1_unlock_offsets(region: &[u8]) -> BTreeSet<usize> {
    let mut v = BTreeSet::new();
    v.extend(pick(0..8, true)); // magic, version
    for (start, len) in [(8, 32), (40, 32), (72, 32)] {
        // cipherName, cipherMode, hashSpec: the string and its NUL densely,
        // the padding after it sampled.
        let nul = region[start..start + len]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(len);
        let used = (start + nul + 1).min(start + len);
        v.extend(pick(start..used, true));
        v.extend(pick(used..start + len, false));
    }
    v.extend(pick(104..112, true)); // payloadOffset, keyBytes
    v.extend(pick(112..132, false)); // mkDigest
    v.extend(pick(132..164, false)); // mkDigestSalt
    v.extend(pick(166..168, true)); // mkDigestIterations, low bytes
    v.extend(pick(168..208, false)); // uuid
    for slot in 0..8 {
        let b = 208 + 48 * slot;
        v.extend(pick(b..b + 4, true)); // active
        v.extend(pick(b + 6..b + 8, true)); // iterations, low bytes
        v.extend(pick(b + 8..b + 40, false)); // salt
        v.extend(pick(b + 40..b + 48, true)); // keyMaterialOffset, stripes
    }
    v
}

#[test]
fn luks1_header_single_byte_flips() {
    let d = formatted(
        "luks1",
        &[
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "512",
            "--hash",
            "sha256",
        ],
    );
    // Everything up to the payload (keyslot material included) is restored
    // before each run.
    let payload: u64 = dump_field(&cs_dump(&d.dev), "Payload offset")
        .and_then(|v| v.parse().ok())
        .expect("payload offset");
    let region = read_at(&d.dev, 0, usize::try_from(payload * 512).expect("fits"));
    let offsets: Vec<usize> = (0..592).collect();
    let unlock = luks1_unlock_offsets(&region);
    let failures = flip_workers(&d, &region, &offsets, |dev, k1, off| {
        let field = luks1_field(off);
        let what = format!("LUKS1 byte {off} ({field}) inverted");
        let dump = agent_hostile(&["luks", "dump", s(dev)]);
        if let Some(p) = dump.assert_no_panic_soft() {
            return Some(format!("{what}: luks dump: {p}"));
        }
        if !matches!(dump.code, Some(0) | Some(4)) {
            return Some(format!("{what}: luks dump must exit 0 or 4\n{dump}"));
        }
        // Unlock only at the offsets that need it (see luks1_unlock_offsets).
        if !unlock.contains(&off) {
            return None;
        }
        let tp = agent_hostile(&["luks", "test-passphrase", "--key-file", s(k1), s(dev)]);
        if let Some(p) = tp.assert_no_panic_soft() {
            return Some(format!("{what}: test-passphrase: {p}"));
        }
        let ours = tp.code.unwrap_or(-1);
        if ![0, 2, 4].contains(&ours) {
            return Some(format!("{what}: test-passphrase must exit 0, 2 or 4\n{tp}"));
        }
        if dump.code == Some(4) && ours == 0 {
            return Some(format!(
                "{what}: dump calls the header unusable but test-passphrase accepts it\n{dump}\n{tp}"
            ));
        }
        let must = match field.as_str() {
            "magic" | "version" => Some(4),
            "mkDigest" | "mkDigestSalt" | "keyslot[0].salt" => Some(2),
            _ => None,
        };
        if let Some(want) = must {
            if ours != want {
                return Some(format!("{what}: test-passphrase must exit {want}\n{tp}"));
            }
            if want == 4 && dump.code != Some(4) {
                return Some(format!("{what}: dump must exit 4\n{dump}"));
            }
        }
        if ours == 4 && !tp.stderr.contains(s(dev)) {
            return Some(format!("{what}: the error does not name the device\n{tp}"));
        }
        // Differential check against cryptsetup on the same bytes: where
        // cryptsetup unlocks, we must not claim a wrong passphrase; where
        // cryptsetup finds the passphrase wrong, we must not unlock.
        let cs = cs_test_passphrase(dev, k1);
        match (cs.code, ours) {
            (Some(0), 2) => Some(format!(
                "{what}: cryptsetup unlocks but luks-agent says wrong passphrase\n{tp}\n{cs}"
            )),
            (Some(2), 0) => Some(format!(
                "{what}: cryptsetup rejects the passphrase but luks-agent unlocks\n{tp}\n{cs}"
            )),
            _ => None,
        }
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------
// Hostile LUKS2 headers with oversized JSON areas
// ---------------------------------------------------------------------------

const MIB: usize = 1 << 20;

/// A LUKS2 binary header; its checksum is computed over `area` (the
/// header plus JSON area) when `valid_checksum`.
fn hostile_luks2(hdr_size: u64, json: &[u8], valid_checksum: bool) -> Vec<u8> {
    let mut bin = vec![0u8; 4096];
    bin[..6].copy_from_slice(b"LUKS\xba\xbe");
    bin[6..8].copy_from_slice(&2u16.to_be_bytes());
    bin[8..16].copy_from_slice(&hdr_size.to_be_bytes());
    bin[16..24].copy_from_slice(&1u64.to_be_bytes());
    bin[72..78].copy_from_slice(b"sha256");
    bin[104..168].copy_from_slice(&garbage(64, 77));
    bin[168..204].copy_from_slice(b"5b1c3c52-8c7e-4b4b-9a39-0d4e2d3a7f10");
    // hdr_offset 0 (bytes 256..264) already zero.
    let mut area = bin;
    area.extend_from_slice(json);
    if valid_checksum {
        let sum = Sha256::digest(&area);
        area[448..480].copy_from_slice(&sum);
    } else {
        area[448..480].copy_from_slice(&[0x42; 32]);
    }
    area
}

fn hostile_case(name: &str, file_len: u64, header: &[u8]) {
    let fx = Fixture::new();
    let dev = fx.image_of(&format!("{name}.img"), file_len);
    let k = fx.key("k", K1);
    let n = header.len().min(usize::try_from(file_len).expect("fits"));
    write_at(&dev, 0, &header[..n]);
    let before = sha256_file(&dev);
    assert_unusable(&dev, &k, name);
    assert_eq!(
        sha256_file(&dev),
        before,
        "{name}: a failed command modified the device"
    );
}

#[test]
fn luks2_oversize_json_garbage_valid_checksum() {
    let hdr = hostile_luks2(4 * MIB as u64, &garbage(4 * MIB - 4096, 11), true);
    hostile_case("garbage-json-4m", 32 * MIB as u64, &hdr);
}

#[test]
fn luks2_oversize_json_garbage_bad_checksum() {
    let hdr = hostile_luks2(4 * MIB as u64, &garbage(4 * MIB - 4096, 12), false);
    hostile_case("garbage-json-4m-bad-csum", 32 * MIB as u64, &hdr);
}

#[test]
fn luks2_oversize_json_deep_nesting_valid_checksum() {
    // 4 MiB of '[' : a recursive-descent parser without a depth limit
    // overflows its stack.
    let mut json = vec![b'['; 4 * MIB - 4096 - 1];
    json.push(0);
    let hdr = hostile_luks2(4 * MIB as u64, &json, true);
    hostile_case("nested-json-4m", 32 * MIB as u64, &hdr);
}

#[test]
fn luks2_oversize_json_unterminated_object_valid_checksum() {
    // Valid JSON start, a 4 MiB string, no closing quote, no NUL.
    let mut json = b"{\"keyslots\":{},\"x\":\"".to_vec();
    json.resize(4 * MIB - 4096, b'A');
    let hdr = hostile_luks2(4 * MIB as u64, &json, true);
    hostile_case("unterminated-json-4m", 32 * MIB as u64, &hdr);
}

#[test]
fn luks2_hdr_size_beyond_device_end() {
    // Claims 4 MiB of header on a 1 MiB device.
    let hdr = hostile_luks2(4 * MIB as u64, &garbage(4 * MIB - 4096, 13), true);
    hostile_case("hdr-beyond-end", MIB as u64, &hdr);
}

#[test]
fn luks2_absurd_hdr_size() {
    // hdr_size near 2^62: must be rejected without trying to allocate it.
    let mut hdr = hostile_luks2(1 << 62, &[], false);
    hdr.resize(16384, 0);
    hostile_case("absurd-hdr-size", 32 * MIB as u64, &hdr);
}

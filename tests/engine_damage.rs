//! Library-level damage tests of the LUKS engine: damaged, truncated,
//! corrupted and hostile headers read from an in-memory disk.
//!
//! Every case must end in one of two ways: the volume opens with exactly
//! the volume key it was formatted with (because the damage is harmless or
//! a redundant copy covers it), or a typed `LuksError` that names the
//! device. Never a panic, never a hang, never a different key, and reading
//! or failing to unlock never writes to the device.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use luks_agent::luks::{
    self, FormatOptions, HashAlg, Header, Kdf, KdfLimits, KdfPolicy, LuksError, LuksVersion,
    MemDisk,
};
use luks_agent::secret::Passphrase;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Name of every in-memory device; errors must mention it.
const DEV: &str = "memdisk:engine-damage";
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// Size of the binary part of a LUKS2 header copy.
const BIN: usize = 4096;
/// Offset of the LUKS2 checksum field.
const CSUM_AT: usize = 448;

fn fast_kdf() -> KdfPolicy {
    KdfPolicy::Fixed(Kdf::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    })
}

fn passphrase() -> Passphrase {
    Passphrase::from_slice(b"correct horse battery staple")
}

fn second_passphrase() -> Passphrase {
    Passphrase::from_slice(b"second passphrase for slot 1")
}

fn wrong_passphrase() -> Passphrase {
    Passphrase::from_slice(b"correct horse battery stapler")
}

/// Limits tight enough that a corrupted iteration count cannot make a test
/// run for minutes, loose enough for the 1000 iterations we format with.
fn tight_limits() -> KdfLimits {
    KdfLimits {
        max_pbkdf2_iterations: 100_000,
        ..KdfLimits::default()
    }
}

/// A formatted image and the volume key it was formatted with.
struct Image {
    bytes: Vec<u8>,
    key: Vec<u8>,
}

fn format_image(
    version: LuksVersion,
    key_bits: usize,
    size: usize,
    metadata_size: Option<u64>,
    keyslots_size: Option<u64>,
) -> Image {
    let mut opts = FormatOptions::new(version, key_bits, fast_kdf()).expect("cipher options");
    opts.metadata_size = metadata_size;
    opts.keyslots_size = keyslots_size;
    let disk = MemDisk::new(DEV, vec![0u8; size]);
    let (_, key) = luks::format(&disk, &opts, &passphrase()).expect("format");
    Image {
        bytes: disk.contents(),
        key: key.expose().to_vec(),
    }
}

/// LUKS1, AES-128-XTS, 3 MiB (data at 2 MiB).
fn luks1() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| format_image(LuksVersion::Luks1, 256, 3 * MIB, None, None))
}

/// LUKS2 with 16 KiB header copies and a 256 KiB keyslots area (data at
/// 1 MiB), 2 MiB.
fn luks2() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| small_luks2(16 * KIB as u64))
}

fn small_luks2(metadata_size: u64) -> Image {
    let data = (2 * metadata_size + 262_144).div_ceil(MIB as u64) as usize * MIB;
    format_image(
        LuksVersion::Luks2,
        256,
        data + MIB,
        Some(metadata_size),
        Some(262_144),
    )
}

/// LUKS2 with 64 KiB header copies: room for a large JSON document.
fn luks2_64k() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| small_luks2(64 * KIB as u64))
}

/// The small LUKS2 image with a second keyslot (slot 1, `second_passphrase`).
fn luks2_two_slots() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| {
        let base = luks2();
        let disk = MemDisk::new(DEV, base.bytes.clone());
        let mut h = Header::read(&disk).expect("read");
        let u = h
            .unlock(&disk, &passphrase(), None, &KdfLimits::default())
            .expect("unlock");
        let slot = h
            .add_keyslot(
                &disk,
                &u.volume_key,
                &second_passphrase(),
                None,
                &fast_kdf(),
                &KdfLimits::default(),
            )
            .expect("add keyslot");
        assert_eq!(slot, 1);
        Image {
            bytes: disk.contents(),
            key: base.key.clone(),
        }
    })
}

/// Reads the header of `bytes` and unlocks it with `p`: the header and the
/// volume key, or the first error.
fn open_with(
    bytes: &[u8],
    p: &Passphrase,
    limits: &KdfLimits,
) -> Result<(Header, Vec<u8>), LuksError> {
    let disk = MemDisk::new(DEV, bytes.to_vec());
    let h = Header::read(&disk)?;
    let u = h.unlock(&disk, p, None, limits)?;
    Ok((h, u.volume_key.expose().to_vec()))
}

/// Asserts that `bytes` opens with the first passphrase to exactly `key`.
fn assert_opens(bytes: &[u8], key: &[u8], what: &str) -> Header {
    match open_with(bytes, &passphrase(), &tight_limits()) {
        Ok((h, k)) => {
            assert!(k == key, "{what}: unlocked to a different volume key");
            h
        }
        Err(e) => panic!("{what}: expected the volume to open, got {e:?} ({e})"),
    }
}

/// Asserts that opening `bytes` fails, with an error naming the device.
fn open_err(bytes: &[u8], what: &str) -> LuksError {
    match open_with(bytes, &passphrase(), &tight_limits()) {
        Ok(_) => panic!("{what}: expected an error, but the volume opened"),
        Err(e) => {
            assert!(
                e.to_string().contains(DEV),
                "{what}: error does not name the device: {e}"
            );
            e
        }
    }
}

fn luks2_copies_valid(h: &Header) -> (bool, bool) {
    match h {
        Header::Luks2(h) => h.copies_valid,
        Header::Luks1(_) => panic!("expected a LUKS2 header"),
    }
}

fn luks2_seqid(h: &Header) -> u64 {
    match h {
        Header::Luks2(h) => h.binary.seqid,
        Header::Luks1(_) => panic!("expected a LUKS2 header"),
    }
}

// ---------------------------------------------------------------------------
// Raw LUKS2 header editing.

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// `hdr_size` of the primary copy.
fn hdr_size(img: &[u8]) -> usize {
    be64(img, 8) as usize
}

/// The JSON document of the copy at `off`.
fn json_doc(img: &[u8], off: usize) -> Value {
    let hs = be64(img, off + 8) as usize;
    let area = &img[off + BIN..off + hs];
    let nul = area
        .iter()
        .position(|b| *b == 0)
        .expect("NUL-terminated JSON");
    serde_json::from_slice(&area[..nul]).expect("JSON parses")
}

/// Recomputes the checksum of the copy at `off`: sha256 over `hdr_size`
/// bytes with the 64-byte checksum field zeroed.
fn reseal(img: &mut [u8], off: usize) {
    let hs = be64(img, off + 8) as usize;
    img[off + CSUM_AT..off + CSUM_AT + 64].fill(0);
    let sum = Sha256::digest(&img[off..off + hs]);
    img[off + CSUM_AT..off + CSUM_AT + 32].copy_from_slice(&sum);
}

/// Replaces the whole JSON area of the copy at `off` by `area` followed by
/// zeros, and reseals the copy.
fn put_json_area(img: &mut [u8], off: usize, area: &[u8]) {
    let hs = be64(img, off + 8) as usize;
    let room = hs - BIN;
    assert!(
        area.len() <= room,
        "JSON area of {} bytes > {room}",
        area.len()
    );
    let dst = &mut img[off + BIN..off + hs];
    dst.fill(0);
    dst[..area.len()].copy_from_slice(area);
    reseal(img, off);
}

/// Writes `area` as the JSON area of both copies (checksums recomputed).
fn put_json_area_both(img: &mut [u8], area: &[u8]) {
    let hs = hdr_size(img);
    for off in [0, hs] {
        put_json_area(img, off, area);
    }
}

/// Applies `edit` to the JSON of both copies and writes them back with
/// valid checksums, so the reader cannot fall back to an intact copy.
fn edit_json(img: &[u8], edit: impl Fn(&mut Value)) -> Vec<u8> {
    let mut out = img.to_vec();
    let hs = hdr_size(&out);
    for off in [0, hs] {
        let mut doc = json_doc(&out, off);
        edit(&mut doc);
        put_json_area(&mut out, off, doc.to_string().as_bytes());
    }
    out
}

/// Edits the JSON of both copies of `img` and asserts that reading plus
/// unlocking fails with an error `expected` accepts.
fn assert_json_rejected(
    img: &Image,
    what: &str,
    edit: impl Fn(&mut Value),
    expected: impl Fn(&LuksError) -> bool,
) -> LuksError {
    let bytes = edit_json(&img.bytes, edit);
    let e = open_err(&bytes, what);
    assert!(expected(&e), "{what}: unexpected error {e:?} ({e})");
    e
}

fn is_invalid(e: &LuksError) -> bool {
    matches!(e, LuksError::InvalidHeader { version: 2, .. })
}

// ---------------------------------------------------------------------------
// Running many cases with a time bound per case.

/// Runs `check` for every case, several at a time, each with `deadline`.
/// Returns a description of every case that failed its check, panicked,
/// or did not finish in time (its thread is left running).
fn sweep(
    cases: Vec<usize>,
    deadline: Duration,
    check: Arc<dyn Fn(usize) -> Result<(), String> + Send + Sync>,
) -> Vec<String> {
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let mut pending = cases.into_iter();
    let mut running: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut failures = Vec::new();
    loop {
        while running.len() < parallel {
            let Some(case) = pending.next() else { break };
            let tx = tx.clone();
            let check = Arc::clone(&check);
            running.insert(case, Instant::now());
            std::thread::spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(|| check(case))).unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(format!("panicked: {msg}"))
                });
                let _ = tx.send((case, r));
            });
        }
        if running.is_empty() {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((case, r)) => {
                // A case already given up on may still report; ignore it.
                if running.remove(&case).is_some()
                    && let Err(msg) = r
                {
                    failures.push(format!("case {case}: {msg}"));
                }
            }
            Err(_) => {
                let late: Vec<usize> = running
                    .iter()
                    .filter(|(_, t)| t.elapsed() > deadline)
                    .map(|(c, _)| *c)
                    .collect();
                for case in late {
                    running.remove(&case);
                    failures.push(format!(
                        "case {case}: did not finish within {deadline:?} (unbounded work)"
                    ));
                }
            }
        }
    }
    failures
}

// ---------------------------------------------------------------------------
// LUKS2 primary damage and recovery from the secondary.

#[test]
fn luks2_primary_binary_zeroed_recovers_from_secondary() {
    let img = luks2();
    let mut bytes = img.bytes.clone();
    bytes[..BIN].fill(0);
    let h = assert_opens(&bytes, &img.key, "primary binary header zeroed");
    assert_eq!(luks2_copies_valid(&h), (false, true));
}

#[test]
fn luks2_primary_json_byte_flip_recovers_from_secondary() {
    let img = luks2();
    let mut bytes = img.bytes.clone();
    let json_len = bytes[BIN..hdr_size(&bytes)]
        .iter()
        .position(|b| *b == 0)
        .unwrap();
    for at in [
        BIN,
        BIN + json_len / 2,
        BIN + json_len - 1,
        BIN + json_len + 10,
    ] {
        bytes.copy_from_slice(&img.bytes);
        bytes[at] ^= 0x01;
        let h = assert_opens(&bytes, &img.key, &format!("primary JSON byte {at} flipped"));
        assert_eq!(luks2_copies_valid(&h), (false, true), "byte {at}");
    }
}

#[test]
fn luks2_primary_checksum_corrupt_recovers_from_secondary() {
    let img = luks2();
    for at in [CSUM_AT, CSUM_AT + 31, CSUM_AT + 32, CSUM_AT + 63] {
        let mut bytes = img.bytes.clone();
        bytes[at] ^= 0x80;
        let h = assert_opens(&bytes, &img.key, &format!("checksum byte {at} corrupted"));
        assert_eq!(luks2_copies_valid(&h), (false, true), "byte {at}");
    }
}

#[test]
fn luks2_both_copies_destroyed_is_an_error() {
    let img = luks2();
    let hs = hdr_size(&img.bytes);

    let mut bytes = img.bytes.clone();
    bytes[..BIN].fill(0);
    bytes[hs..hs + BIN].fill(0);
    let e = open_err(&bytes, "both binary headers zeroed");
    assert!(matches!(e, LuksError::NotLuks { .. }), "{e:?}");

    let mut bytes = img.bytes.clone();
    bytes[BIN + 1] ^= 0x01;
    bytes[hs + BIN + 1] ^= 0x01;
    let e = open_err(&bytes, "both JSON areas damaged");
    assert!(is_invalid(&e), "{e:?}");

    let mut bytes = img.bytes.clone();
    bytes[CSUM_AT] ^= 0x01;
    bytes[..6].fill(0);
    bytes[hs + CSUM_AT] ^= 0x01;
    let e = open_err(&bytes, "primary magic gone, secondary checksum bad");
    assert!(is_invalid(&e), "{e:?}");
}

#[test]
fn luks2_secondary_found_at_every_allowed_offset() {
    for kib in [16u64, 32, 64, 128, 256, 512, 1024, 2048, 4096] {
        let img = small_luks2(kib * 1024);
        assert_eq!(hdr_size(&img.bytes), kib as usize * KIB);
        let mut bytes = img.bytes.clone();
        bytes[..BIN].fill(0);
        let h = assert_opens(
            &bytes,
            &img.key,
            &format!("{kib} KiB metadata, primary destroyed"),
        );
        assert_eq!(luks2_copies_valid(&h), (false, true), "{kib} KiB");
        assert_eq!(h.data_offset(), img_data_offset(&img.bytes), "{kib} KiB");
    }
}

fn img_data_offset(bytes: &[u8]) -> u64 {
    let doc = json_doc(bytes, 0);
    doc["segments"]["0"]["offset"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn luks2_64k_metadata_primary_destroyed_still_opens() {
    let img = luks2_64k();
    assert_eq!(hdr_size(&img.bytes), 64 * KIB);
    let mut bytes = img.bytes.clone();
    bytes[..BIN].fill(0);
    let h = assert_opens(&bytes, &img.key, "64 KiB metadata, primary zeroed");
    assert_eq!(luks2_copies_valid(&h), (false, true));
    let mut bytes = img.bytes.clone();
    bytes[BIN + 3] ^= 0x20;
    let h = assert_opens(&bytes, &img.key, "64 KiB metadata, primary JSON damaged");
    assert_eq!(luks2_copies_valid(&h), (false, true));
}

#[test]
fn luks2_default_layout_primary_destroyed_still_opens() {
    let img = format_image(LuksVersion::Luks2, 512, 17 * MIB, None, None);
    assert_eq!(hdr_size(&img.bytes), 16 * KIB);
    assert_eq!(img_data_offset(&img.bytes), 16 * MIB as u64);
    let h = assert_opens(&img.bytes, &img.key, "intact default layout");
    assert_eq!(luks2_copies_valid(&h), (true, true));
    let mut bytes = img.bytes.clone();
    bytes[..BIN].fill(0);
    let h = assert_opens(&bytes, &img.key, "default layout, primary zeroed");
    assert_eq!(luks2_copies_valid(&h), (false, true));
    assert_eq!(h.data_offset(), 16 * MIB as u64);
    let mut bytes = img.bytes.clone();
    bytes[CSUM_AT + 5] ^= 0xff;
    let h = assert_opens(&bytes, &img.key, "default layout, primary checksum bad");
    assert_eq!(luks2_copies_valid(&h), (false, true));
}

// ---------------------------------------------------------------------------
// The newest valid copy wins.

/// The small LUKS2 image before and after adding slot 1.
fn before_and_after_add() -> (&'static Image, &'static Image) {
    (luks2(), luks2_two_slots())
}

#[test]
fn luks2_newer_secondary_wins_over_restored_old_primary() {
    let (old, new) = before_and_after_add();
    let hs = hdr_size(&old.bytes);
    let mut bytes = new.bytes.clone();
    bytes[..hs].copy_from_slice(&old.bytes[..hs]);
    let disk = MemDisk::new(DEV, bytes);
    let h = Header::read(&disk).expect("read");
    assert_eq!(luks2_copies_valid(&h), (true, true));
    assert_eq!(
        luks2_seqid(&h),
        2,
        "the newer (secondary) copy must be used"
    );
    let slots: Vec<u32> = h.keyslots().iter().map(|k| k.slot).collect();
    assert_eq!(slots, vec![0, 1]);
    let u = h
        .unlock(&disk, &second_passphrase(), None, &tight_limits())
        .expect("the new keyslot opens");
    assert_eq!(u.keyslot, 1);
    assert!(u.volume_key.expose() == new.key.as_slice());
}

#[test]
fn luks2_newer_primary_wins_over_restored_old_secondary() {
    let (old, new) = before_and_after_add();
    let hs = hdr_size(&old.bytes);
    let mut bytes = new.bytes.clone();
    bytes[hs..2 * hs].copy_from_slice(&old.bytes[hs..2 * hs]);
    let disk = MemDisk::new(DEV, bytes);
    let h = Header::read(&disk).expect("read");
    assert_eq!(luks2_copies_valid(&h), (true, true));
    assert_eq!(luks2_seqid(&h), 2, "the newer (primary) copy must be used");
    let slots: Vec<u32> = h.keyslots().iter().map(|k| k.slot).collect();
    assert_eq!(slots, vec![0, 1]);
    let u = h
        .unlock(&disk, &second_passphrase(), None, &tight_limits())
        .expect("the new keyslot opens");
    assert_eq!(u.keyslot, 1);
    assert!(u.volume_key.expose() == new.key.as_slice());
}

#[test]
fn luks2_old_primary_with_damaged_newer_secondary_uses_old_primary() {
    let (old, new) = before_and_after_add();
    let hs = hdr_size(&old.bytes);
    let mut bytes = new.bytes.clone();
    bytes[..hs].copy_from_slice(&old.bytes[..hs]);
    bytes[hs + BIN + 2] ^= 0x01;
    let disk = MemDisk::new(DEV, bytes);
    let h = Header::read(&disk).expect("read");
    assert_eq!(luks2_copies_valid(&h), (true, false));
    assert_eq!(luks2_seqid(&h), 1);
    assert_eq!(h.keyslots().len(), 1);
    let e = h
        .unlock(&disk, &second_passphrase(), None, &tight_limits())
        .unwrap_err();
    assert!(matches!(e, LuksError::WrongPassphrase { .. }), "{e:?}");
    let u = h
        .unlock(&disk, &passphrase(), None, &tight_limits())
        .expect("old slot opens");
    assert!(u.volume_key.expose() == old.key.as_slice());
}

// ---------------------------------------------------------------------------
// Failed unlocks never write.

#[test]
fn wrong_passphrase_is_reported_and_writes_nothing() {
    for (name, img) in [
        ("LUKS1", luks1()),
        ("LUKS2", luks2()),
        ("LUKS2 two slots", luks2_two_slots()),
    ] {
        let disk = MemDisk::new(DEV, img.bytes.clone());
        let h = Header::read(&disk).expect("read");
        let e = h
            .unlock(&disk, &wrong_passphrase(), None, &tight_limits())
            .unwrap_err();
        assert!(
            matches!(e, LuksError::WrongPassphrase { .. }),
            "{name}: {e:?}"
        );
        assert!(e.to_string().contains(DEV), "{name}: {e}");
        for slot in h.keyslots() {
            let e = h
                .unlock(&disk, &wrong_passphrase(), Some(slot.slot), &tight_limits())
                .unwrap_err();
            assert!(
                matches!(e, LuksError::WrongPassphrase { .. }),
                "{name}: {e:?}"
            );
        }
        assert!(disk.contents() == img.bytes, "{name}: the device changed");
    }
}

#[test]
fn damaged_keyslot_area_is_wrong_passphrase_and_writes_nothing() {
    for (name, img) in [("LUKS1", luks1()), ("LUKS2", luks2())] {
        let disk = MemDisk::new(DEV, img.bytes.clone());
        let h = Header::read(&disk).expect("read");
        let slot = &h.keyslots()[0];
        assert_eq!(slot.slot, 0);
        for (i, at) in [
            slot.area_offset,
            slot.area_offset + slot.area_length / 2,
            slot.area_offset + 32 * 4000 - 1,
        ]
        .into_iter()
        .enumerate()
        {
            let mut bytes = img.bytes.clone();
            bytes[at as usize] ^= 0x01;
            let disk = MemDisk::new(DEV, bytes.clone());
            let h = Header::read(&disk).expect("read");
            let e = h
                .unlock(&disk, &passphrase(), None, &tight_limits())
                .unwrap_err();
            assert!(
                matches!(e, LuksError::WrongPassphrase { .. }),
                "{name} damage {i}: {e:?}"
            );
            assert!(
                disk.contents() == bytes,
                "{name} damage {i}: the device changed"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Truncation.

/// Cut points common to both versions, plus one inside the keyslot areas.
fn truncation_cases(inside_keyslots: usize) -> Vec<usize> {
    vec![0, 100, 591, 592, 4096, 16384, 20000, inside_keyslots]
}

#[test]
fn truncated_images_give_typed_errors_naming_the_device() {
    for (name, img, inside) in [
        ("LUKS1", luks1(), 500_000),
        ("LUKS2", luks2(), 100_000),
        ("LUKS2 64 KiB metadata", luks2_64k(), 200_000),
    ] {
        for cut in truncation_cases(inside) {
            let what = format!("{name} cut at {cut}");
            let e = open_err(&img.bytes[..cut], &what);
            assert!(
                matches!(
                    e,
                    LuksError::TooSmall { .. }
                        | LuksError::NotLuks { .. }
                        | LuksError::InvalidHeader { .. }
                ),
                "{what}: {e:?}"
            );
        }
    }
}

#[test]
fn truncated_one_byte_before_the_data_offset_is_refused() {
    // Header and keyslots are intact but not one data sector is left.
    let mut failures = Vec::new();
    for (name, img) in [("LUKS1", luks1()), ("LUKS2", luks2())] {
        let data = {
            let disk = MemDisk::new(DEV, img.bytes.clone());
            Header::read(&disk).expect("read").data_offset() as usize
        };
        assert!(data < img.bytes.len());
        let what = format!("{name} cut at {} (data offset {data})", data - 1);
        match open_with(&img.bytes[..data - 1], &passphrase(), &tight_limits()) {
            Err(e @ LuksError::TooSmall { .. }) if e.to_string().contains(DEV) => {}
            Err(e) => failures.push(format!("{what}: {e:?}")),
            Ok(_) => failures.push(format!("{what}: read and unlock succeeded")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Every byte of the binary headers.

#[test]
fn luks1_every_phdr_byte_flipped_is_safe() {
    let img = luks1();
    let check = Arc::new(move |at: usize| -> Result<(), String> {
        let mut bytes = img.bytes.clone();
        bytes[at] ^= 0xff;
        match open_with(&bytes, &passphrase(), &tight_limits()) {
            Ok((_, k)) if k == img.key => Ok(()),
            Ok(_) => Err("opened to a different volume key".into()),
            Err(e) if e.to_string().contains(DEV) => Ok(()),
            Err(e) => Err(format!("error does not name the device: {e}")),
        }
    });
    let failures = sweep((0..592).collect(), Duration::from_secs(30), check);
    assert!(
        failures.is_empty(),
        "LUKS1 phdr byte flips:\n{}",
        failures.join("\n")
    );
}

#[test]
fn luks2_every_primary_binary_byte_flipped_recovers_from_secondary() {
    let img = luks2();
    let check = Arc::new(move |at: usize| -> Result<(), String> {
        let mut bytes = img.bytes.clone();
        bytes[at] ^= 0xff;
        match open_with(&bytes, &passphrase(), &tight_limits()) {
            Ok((h, k)) if k == img.key => match luks2_copies_valid(&h) {
                (false, true) => Ok(()),
                other => Err(format!("opened, but copies_valid is {other:?}")),
            },
            Ok(_) => Err("opened to a different volume key".into()),
            Err(e) => Err(format!("did not recover from the secondary: {e:?} ({e})")),
        }
    });
    let failures = sweep((0..512).collect(), Duration::from_secs(30), check);
    assert!(
        failures.is_empty(),
        "LUKS2 primary binary byte flips:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// LUKS2 JSON edge cases. Both copies carry the edit (with valid checksums).

#[test]
fn luks2_json_rewrite_helper_control() {
    // The unmodified document, re-serialised and resealed, must still open:
    // otherwise the rejections below would prove nothing.
    let img = luks2();
    let bytes = edit_json(&img.bytes, |_| {});
    let h = assert_opens(&bytes, &img.key, "identity rewrite");
    assert_eq!(luks2_copies_valid(&h), (true, true));
    let img = luks2_two_slots();
    let bytes = edit_json(&img.bytes, |_| {});
    let (_, k) = open_with(&bytes, &second_passphrase(), &tight_limits()).expect("slot 1");
    assert!(k == img.key);
}

#[test]
fn luks2_json_missing_mandatory_section() {
    for section in ["keyslots", "tokens", "segments", "digests", "config"] {
        let e = assert_json_rejected(
            luks2(),
            &format!("missing {section}"),
            |doc| {
                doc.as_object_mut().unwrap().remove(section);
            },
            is_invalid,
        );
        assert!(e.to_string().contains(section), "{section}: {e}");
    }
}

#[test]
fn luks2_json_non_numeric_keyslot_id() {
    assert_json_rejected(
        luks2(),
        "keyslot id \"a\"",
        |doc| {
            let ks = doc["keyslots"].as_object_mut().unwrap();
            let slot = ks.remove("0").unwrap();
            ks.insert("a".into(), slot);
            doc["digests"]["0"]["keyslots"] = json!(["a"]);
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_offset_as_number() {
    assert_json_rejected(
        luks2(),
        "keyslot area offset as a JSON number",
        |doc| {
            doc["keyslots"]["0"]["area"]["offset"] = json!(32768);
        },
        is_invalid,
    );
    assert_json_rejected(
        luks2(),
        "segment offset as a JSON number",
        |doc| {
            doc["segments"]["0"]["offset"] = json!(1_048_576);
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_u64_overflow_string() {
    for (what, path) in [
        ("area offset", &["keyslots", "0", "area", "offset"][..]),
        ("area size", &["keyslots", "0", "area", "size"][..]),
        ("segment offset", &["segments", "0", "offset"][..]),
        ("keyslots_size", &["config", "keyslots_size"][..]),
    ] {
        assert_json_rejected(
            luks2(),
            &format!("{what} 2^64"),
            |doc| {
                let mut v = &mut *doc;
                for p in path {
                    v = &mut v[*p];
                }
                *v = json!("18446744073709551616");
            },
            is_invalid,
        );
    }
}

#[test]
fn luks2_json_keyslot_area_outside_keyslots_region() {
    // The keyslots region of the small image is [32768, 294912).
    for (what, offset) in [
        ("in the secondary header", 16384u64),
        ("at offset 0", 0),
        ("past the region end", 294_912 - 4096),
        ("in the data", 1_048_576),
    ] {
        assert_json_rejected(
            luks2(),
            &format!("keyslot area {what}"),
            |doc| {
                doc["keyslots"]["0"]["area"]["offset"] = json!(offset.to_string());
            },
            is_invalid,
        );
    }
    assert_json_rejected(
        luks2(),
        "keyslot area size wrapping around",
        |doc| {
            doc["keyslots"]["0"]["area"]["size"] = json!(u64::MAX.to_string());
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_overlapping_keyslot_areas() {
    let img = luks2_two_slots();
    let doc = json_doc(&img.bytes, 0);
    let a0: u64 = doc["keyslots"]["0"]["area"]["offset"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let e = assert_json_rejected(
        img,
        "keyslot 1 area overlapping keyslot 0",
        |doc| {
            doc["keyslots"]["1"]["area"]["offset"] = json!((a0 + 4096).to_string());
        },
        is_invalid,
    );
    assert!(e.to_string().contains("overlap"), "{e}");
    assert_json_rejected(
        img,
        "keyslot 1 area identical to keyslot 0",
        |doc| {
            doc["keyslots"]["1"]["area"]["offset"] = json!(a0.to_string());
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_stripes_not_4000() {
    for stripes in [0u64, 1, 3999, 4001] {
        assert_json_rejected(
            luks2(),
            &format!("{stripes} stripes"),
            |doc| {
                doc["keyslots"]["0"]["af"]["stripes"] = json!(stripes);
            },
            is_invalid,
        );
    }
}

#[test]
fn luks2_json_keyslot_without_digest() {
    assert_json_rejected(
        luks2(),
        "keyslot 0 in no digest",
        |doc| {
            doc["digests"]["0"]["keyslots"] = json!([]);
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_keyslot_in_two_digests() {
    assert_json_rejected(
        luks2(),
        "keyslot 0 in digests 0 and 1",
        |doc| {
            let d = doc["digests"]["0"].clone();
            doc["digests"]
                .as_object_mut()
                .unwrap()
                .insert("1".into(), d);
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_segment_sector_size_8192() {
    for size in [8192u64, 256, 0, 513] {
        assert_json_rejected(
            luks2(),
            &format!("segment sector_size {size}"),
            |doc| {
                doc["segments"]["0"]["sector_size"] = json!(size);
            },
            is_invalid,
        );
    }
}

#[test]
fn luks2_json_segment_offset_not_aligned() {
    assert_json_rejected(
        luks2(),
        "segment offset 1 MiB + 1",
        |doc| {
            doc["segments"]["0"]["offset"] = json!("1048577");
        },
        is_invalid,
    );
    assert_json_rejected(
        luks2(),
        "segment offset 1 MiB + 512 with 4096-byte sectors",
        |doc| {
            doc["segments"]["0"]["offset"] = json!("1049088");
            doc["segments"]["0"]["sector_size"] = json!(4096);
        },
        is_invalid,
    );
}

#[test]
fn luks2_json_mandatory_requirement_is_unsupported() {
    let e = assert_json_rejected(
        luks2(),
        "online-reencrypt-v2 requirement",
        |doc| {
            doc["config"]["requirements"] = json!({ "mandatory": ["online-reencrypt-v2"] });
        },
        |e| matches!(e, LuksError::Unsupported { .. }),
    );
    assert!(e.to_string().contains("online-reencrypt-v2"), "{e}");
}

#[test]
fn luks2_json_cipher_null_keyslot_is_refused() {
    // Refused because it does not encrypt, not merely because it is unknown.
    let e = assert_json_rejected(
        luks2(),
        "keyslot area cipher_null-ecb",
        |doc| {
            doc["keyslots"]["0"]["area"]["encryption"] = json!("cipher_null-ecb");
            doc["keyslots"]["0"]["area"]["key_size"] = json!(0);
        },
        |e| matches!(e, LuksError::Refused { .. } | LuksError::Unsupported { .. }),
    );
    assert!(e.to_string().contains("null"), "{e}");
    assert_json_rejected(
        luks2(),
        "keyslot area cipher_null-ecb with the original key size",
        |doc| {
            doc["keyslots"]["0"]["area"]["encryption"] = json!("cipher_null-ecb");
        },
        |e| matches!(e, LuksError::Refused { .. } | LuksError::Unsupported { .. }),
    );
}

#[test]
fn luks2_json_size_not_matching_hdr_size() {
    for size in ["8192", "12287", "61440", "0"] {
        assert_json_rejected(
            luks2(),
            &format!("json_size {size}"),
            |doc| {
                doc["config"]["json_size"] = json!(size);
            },
            is_invalid,
        );
    }
}

#[test]
fn luks2_json_garbage_after_nul() {
    let img = luks2();
    let mut area = json_doc(&img.bytes, 0).to_string().into_bytes();
    area.push(0);
    area.extend_from_slice(b"garbage");
    let mut bytes = img.bytes.clone();
    put_json_area_both(&mut bytes, &area);
    let e = open_err(&bytes, "garbage after the NUL");
    assert!(is_invalid(&e), "{e:?}");
}

#[test]
fn luks2_json_without_nul() {
    let img = luks2();
    let hs = hdr_size(&img.bytes);
    let mut area = json_doc(&img.bytes, 0).to_string().into_bytes();
    area.resize(hs - BIN, b' ');
    let mut bytes = img.bytes.clone();
    put_json_area_both(&mut bytes, &area);
    let e = open_err(&bytes, "JSON area without a NUL");
    assert!(is_invalid(&e), "{e:?}");
}

#[test]
fn luks2_json_nested_10000_deep() {
    let img = luks2_64k();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    // Nesting inside an otherwise valid document, and as the whole document.
    let mut doc = json_doc(&img.bytes, 0);
    doc["tokens"]["0"] = json!({ "type": "deep", "keyslots": [], "payload": "@DEEP@" });
    let inside = doc.to_string().replace("\"@DEEP@\"", &deep);
    let objects = format!("{}1{}", "{\"a\":".repeat(9_000), "}".repeat(9_000));
    for (what, text) in [
        ("nested in a token", inside),
        ("whole document", deep.clone()),
        ("objects", objects),
    ] {
        let mut bytes = img.bytes.clone();
        put_json_area_both(&mut bytes, text.as_bytes());
        // A thread with the default 2 MiB stack of spawned threads.
        let handle = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(
                move || match open_with(&bytes, &passphrase(), &tight_limits()) {
                    Ok(_) => Err("opened".to_string()),
                    Err(e) => Ok(e),
                },
            )
            .unwrap();
        let e = handle.join().expect("no panic").expect("an error");
        assert!(is_invalid(&e), "{what}: {e:?}");
        assert!(e.to_string().contains(DEV), "{what}: {e}");
    }
}

// ---------------------------------------------------------------------------
// KDF limits are enforced before any KDF runs.

fn assert_kdf_refused_fast(bytes: &[u8], limits: &KdfLimits, what: &str) {
    let disk = MemDisk::new(DEV, bytes.to_vec());
    let h = Header::read(&disk).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    let start = Instant::now();
    let e = h.unlock(&disk, &passphrase(), None, limits).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&e, LuksError::Kdf { what: w, .. } if w == "keyslot 0" || w.contains("digest")),
        "{what}: expected a KDF refusal (keyslot 0 or the digest), got {e:?}"
    );
    assert!(e.to_string().contains(DEV), "{what}: {e}");
    assert!(took < Duration::from_millis(300), "{what}: took {took:?}");
}

#[test]
fn kdf_argon2_memory_above_4_gib_refused_without_running() {
    let img = luks2();
    let bytes = edit_json(&img.bytes, |doc| {
        let salt = doc["keyslots"]["0"]["kdf"]["salt"].clone();
        doc["keyslots"]["0"]["kdf"] = json!({
            "type": "argon2id", "time": 4, "memory": 4 * 1024 * 1024 + 1, "cpus": 1, "salt": salt
        });
    });
    assert_kdf_refused_fast(&bytes, &KdfLimits::default(), "argon2id 4 GiB + 1 KiB");
    let bytes = edit_json(&img.bytes, |doc| {
        let salt = doc["keyslots"]["0"]["kdf"]["salt"].clone();
        doc["keyslots"]["0"]["kdf"] = json!({
            "type": "argon2i", "time": 4, "memory": u32::MAX, "cpus": 4, "salt": salt
        });
    });
    assert_kdf_refused_fast(&bytes, &KdfLimits::default(), "argon2i u32::MAX KiB");
}

#[test]
fn kdf_pbkdf2_iterations_above_limit_refused_without_running() {
    // LUKS1: slot 0 iterations (bytes 212..216) raised to 2e9.
    let mut bytes = luks1().bytes.clone();
    bytes[212..216].copy_from_slice(&2_000_000_000u32.to_be_bytes());
    assert_kdf_refused_fast(&bytes, &tight_limits(), "LUKS1 pbkdf2 2e9 iterations");
    // LUKS1 as formatted (1000 iterations) against a limit of 999.
    let limit_999 = KdfLimits {
        max_pbkdf2_iterations: 999,
        ..KdfLimits::default()
    };
    assert_kdf_refused_fast(&luks1().bytes, &limit_999, "LUKS1 1000 > 999");
    // LUKS2.
    let bytes = edit_json(&luks2().bytes, |doc| {
        doc["keyslots"]["0"]["kdf"]["iterations"] = json!(2_000_000_000u32);
    });
    assert_kdf_refused_fast(&bytes, &tight_limits(), "LUKS2 pbkdf2 2e9 iterations");
    assert_kdf_refused_fast(&luks2().bytes, &limit_999, "LUKS2 1000 > 999");
}

#[test]
fn kdf_digest_iterations_above_limit_refused() {
    // The volume key digest is a PBKDF2 the header asks for too: a hostile
    // header could otherwise demand 2^32 iterations per keyslot tried.
    let limit_1000 = KdfLimits {
        max_pbkdf2_iterations: 1000,
        ..KdfLimits::default()
    };
    let mut l1 = luks1().bytes.clone();
    l1[164..168].copy_from_slice(&1001u32.to_be_bytes());
    let l2 = edit_json(&luks2().bytes, |doc| {
        doc["digests"]["0"]["iterations"] = json!(1001);
    });
    for (what, bytes) in [("LUKS1 mk-digest-iter", l1), ("LUKS2 digest", l2)] {
        match open_with(&bytes, &passphrase(), &limit_1000) {
            Err(LuksError::Kdf { .. } | LuksError::InvalidHeader { .. }) => {}
            other => panic!(
                "{what}: 1001 digest iterations with a limit of 1000: expected a refusal, got {:?}",
                other.map(|_| "an unlocked volume")
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Unbound keyslots and bounded KDF work.

/// The small LUKS2 image with a keyslot that opens with `second_passphrase`
/// but is bound to no segment (as `cryptsetup luksAddKey --unbound` makes
/// it): its own digest verifies its own, different key.
fn luks2_with_unbound_slot() -> Vec<u8> {
    let two = luks2_two_slots();
    // Move slot 1 to a digest of its own, bound to no segment, and replace
    // its key material with that of another volume key (formatting a
    // second image with the same layout gives a real keyslot and digest).
    let other = format_image(
        LuksVersion::Luks2,
        256,
        2 * MIB + MIB,
        Some(16 * KIB as u64),
        Some(262_144),
    );
    let disk = MemDisk::new(DEV, other.bytes.clone());
    let mut h = Header::read(&disk).expect("read other");
    let u = h
        .unlock(&disk, &passphrase(), None, &KdfLimits::default())
        .expect("unlock other");
    h.add_keyslot(
        &disk,
        &u.volume_key,
        &second_passphrase(),
        Some(1),
        &fast_kdf(),
        &KdfLimits::default(),
    )
    .expect("add to other");
    let other = disk.contents();
    let other_doc = json_doc(&other, 0);
    let mut out = two.bytes.clone();
    // Slot 1's area, from the other volume.
    let area = other_doc["keyslots"]["1"]["area"].clone();
    let off: usize = area["offset"].as_str().unwrap().parse().unwrap();
    let len: usize = area["size"].as_str().unwrap().parse().unwrap();
    out[off..off + len].copy_from_slice(&other[off..off + len]);
    edit_json(&out, |doc| {
        doc["keyslots"]["1"] = other_doc["keyslots"]["1"].clone();
        let mut unbound = other_doc["digests"]["0"].clone();
        unbound["keyslots"] = json!(["1"]);
        unbound["segments"] = json!([]);
        doc["digests"]["0"]["keyslots"] = json!(["0"]);
        doc["digests"]["1"] = unbound;
    })
}

#[test]
fn an_unbound_keyslot_never_yields_the_volume_key() {
    let img = luks2_with_unbound_slot();
    let disk = MemDisk::new(DEV, img.clone());
    let h = Header::read(&disk).expect("the header with an unbound keyslot reads");
    // Its passphrase opens nothing: the slot is not tried.
    let e = h
        .unlock(&disk, &second_passphrase(), None, &tight_limits())
        .expect_err("an unbound keyslot opened the volume");
    assert!(matches!(e, LuksError::WrongPassphrase { .. }), "{e:?}");
    // Asked for by number, it is refused as unbound.
    let e = h
        .unlock(&disk, &second_passphrase(), Some(1), &tight_limits())
        .expect_err("an unbound keyslot opened by number");
    assert!(e.to_string().contains("unbound"), "{e}");
    // The bound keyslot still opens, to the segment's key.
    assert_opens(&img, &luks2().key, "bound keyslot beside an unbound one");
    // The dump says which is which.
    let text = luks::dump::to_text(&h, DEV);
    assert!(text.contains("1: luks2 (unbound)"), "{text}");
    assert!(text.contains("0: luks2\n"), "{text}");
    assert_eq!(h.key_bytes(), 32);
}

/// LUKS1 with keyslot 0's iteration count set to `iterations` (field at
/// 208 + 4, big-endian), or the digest's (at 164) when `digest`.
fn luks1_with_iterations(iterations: u32, digest: bool) -> Vec<u8> {
    let mut b = luks1().bytes.clone();
    let at = if digest { 164 } else { 212 };
    b[at..at + 4].copy_from_slice(&iterations.to_be_bytes());
    b
}

#[test]
fn hostile_kdf_costs_are_refused_before_running_naming_device_slot_and_parameters() {
    let limits = KdfLimits::default();
    assert!(limits.max_time.is_some(), "no time bound by default");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "LUKS1 keyslot 0 with 0xffffffff iterations",
            luks1_with_iterations(u32::MAX, false),
            "keyslot 0",
        ),
        (
            "LUKS1 digest with 0xffffffff iterations",
            luks1_with_iterations(u32::MAX, true),
            "digest",
        ),
        (
            "LUKS2 keyslot 0 with 0xffffffff pbkdf2 iterations",
            edit_json(&luks2().bytes, |doc| {
                doc["keyslots"]["0"]["kdf"]["iterations"] = json!(u32::MAX);
            }),
            "keyslot 0",
        ),
        (
            "LUKS2 digest with 0xffffffff iterations",
            edit_json(&luks2().bytes, |doc| {
                doc["digests"]["0"]["iterations"] = json!(u32::MAX);
            }),
            "digest 0",
        ),
        (
            "LUKS2 keyslot 0 with argon2id time 0xffffffff",
            edit_json(&luks2().bytes, |doc| {
                doc["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": u32::MAX,
                    "memory": 1024, "cpus": 1, "salt": doc["keyslots"]["0"]["kdf"]["salt"].clone()});
            }),
            "keyslot 0",
        ),
    ];
    for (what, bytes, names) in cases {
        let started = Instant::now();
        let disk = MemDisk::new(DEV, bytes);
        let e = Header::read(&disk)
            .and_then(|h| h.unlock(&disk, &passphrase(), None, &limits).map(|_| ()))
            .expect_err(what);
        let took = started.elapsed();
        let text = e.to_string() + ": " + &luks_agent::text::error_chain(&e);
        assert!(
            matches!(
                e,
                LuksError::Kdf {
                    source: luks_agent::luks::kdf::KdfError::TooSlow { .. },
                    ..
                }
            ),
            "{what}: {e:?}"
        );
        for needle in [DEV, names, "refused without running", "4294967295"] {
            assert!(text.contains(needle), "{what}: {needle:?} not in {text}");
        }
        // Hours of work before; the refusal itself costs only the one-time
        // speed measurement. Bounded generously (this is not a speed test).
        assert!(took < Duration::from_secs(20), "{what}: took {took:?}");
        eprintln!("{what}: refused in {took:?}");
    }
}

#[test]
fn a_hostile_keyslot_does_not_stop_another_from_opening() {
    // Slot 0 hostile, slot 1 fine: the second passphrase still opens.
    let mut img = luks2_two_slots().bytes.clone();
    img = edit_json(&img, |doc| {
        doc["keyslots"]["0"]["kdf"]["iterations"] = json!(u32::MAX);
    });
    let disk = MemDisk::new(DEV, img);
    let h = Header::read(&disk).expect("read");
    let u = h
        .unlock(&disk, &second_passphrase(), None, &KdfLimits::default())
        .expect("slot 1 opens beside a hostile slot 0");
    assert_eq!(u.keyslot, 1);
    assert_eq!(u.volume_key.expose(), luks2().key.as_slice());
}

//! Crash-safety tests of the LUKS engine: every write of a keyslot change
//! or of a format is interrupted in turn, and the image left behind is
//! opened again from scratch.
//!
//! A fault-injecting `Disk` lets the first N writes land and then either
//! fails every later write with an I/O error, or (power loss) silently
//! drops every later write while reporting success. In the "torn" variants
//! the write at the cut lands only its first half.
//!
//! The invariant: whatever write is interrupted, the volume still opens
//! with the old passphrase or with the new one, and always to the volume
//! key it was formatted with. A format interrupted at any point leaves
//! either no valid header or one that opens with its passphrase.

use std::cell::Cell;
use std::io;

use luks_agent::luks::{
    self, Disk, FormatOptions, HashAlg, Header, Kdf, KdfLimits, KdfPolicy, LuksError, LuksVersion,
    MemDisk,
};
use luks_agent::secret::Passphrase;

/// Name of every in-memory device.
const DEV: &str = "memdisk:engine-crash";
const MIB: usize = 1024 * 1024;

fn fast_kdf() -> KdfPolicy {
    KdfPolicy::Fixed(Kdf::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    })
}

fn old_passphrase() -> Passphrase {
    Passphrase::from_slice(b"the old passphrase")
}

fn new_passphrase() -> Passphrase {
    Passphrase::from_slice(b"the new passphrase")
}

fn third_passphrase() -> Passphrase {
    Passphrase::from_slice(b"a third passphrase")
}

fn limits() -> KdfLimits {
    KdfLimits {
        max_pbkdf2_iterations: 100_000,
        ..KdfLimits::default()
    }
}

/// How writes go wrong once the cut is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every write from the cut on fails with an I/O error.
    Fail,
    /// The write at the cut lands its first half, then fails; every later
    /// write fails.
    TornFail,
    /// Power loss: no write from the cut on lands, yet each reports success.
    Crash,
    /// Power loss during the write at the cut: its first half lands, it and
    /// every later write report success.
    TornCrash,
}

const FAULTS: [Fault; 4] = [Fault::Fail, Fault::TornFail, Fault::Crash, Fault::TornCrash];

/// A `MemDisk` whose writes stop landing after `complete` of them.
struct FaultDisk {
    inner: MemDisk,
    complete: usize,
    fault: Fault,
    writes: Cell<usize>,
    tripped: Cell<bool>,
}

impl FaultDisk {
    fn new(bytes: Vec<u8>, complete: usize, fault: Fault) -> Self {
        FaultDisk {
            inner: MemDisk::new(DEV, bytes),
            complete,
            fault,
            writes: Cell::new(0),
            tripped: Cell::new(false),
        }
    }

    /// A disk on which every write lands (counts them).
    fn clean(bytes: Vec<u8>) -> Self {
        Self::new(bytes, usize::MAX, Fault::Fail)
    }

    fn injected() -> io::Error {
        io::Error::other("injected write failure")
    }
}

impl Disk for FaultDisk {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let index = self.writes.get();
        self.writes.set(index + 1);
        if index < self.complete {
            return self.inner.write_at(buf, offset);
        }
        self.tripped.set(true);
        let torn = matches!(self.fault, Fault::TornFail | Fault::TornCrash);
        if index == self.complete && torn {
            self.inner.write_at(&buf[..buf.len() / 2], offset)?;
        }
        match self.fault {
            Fault::Fail | Fault::TornFail => Err(Self::injected()),
            Fault::Crash | Fault::TornCrash => Ok(()),
        }
    }
    fn sync(&self) -> io::Result<()> {
        match self.fault {
            Fault::Fail | Fault::TornFail if self.tripped.get() => Err(Self::injected()),
            _ => Ok(()),
        }
    }
}

/// A formatted image and its volume key.
struct Image {
    bytes: Vec<u8>,
    key: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    name: &'static str,
    version: LuksVersion,
    key_bits: usize,
    size: usize,
    metadata_size: Option<u64>,
    keyslots_size: Option<u64>,
}

const LUKS1: Layout = Layout {
    name: "LUKS1",
    version: LuksVersion::Luks1,
    key_bits: 256,
    size: 3 * MIB,
    metadata_size: None,
    keyslots_size: None,
};

const LUKS1_512: Layout = Layout {
    name: "LUKS1 512-bit key",
    version: LuksVersion::Luks1,
    key_bits: 512,
    size: 3 * MIB,
    metadata_size: None,
    keyslots_size: None,
};

const LUKS2_SMALL: Layout = Layout {
    name: "LUKS2 small",
    version: LuksVersion::Luks2,
    key_bits: 256,
    size: 2 * MIB,
    metadata_size: Some(16384),
    keyslots_size: Some(262_144),
};

const LUKS2_DEFAULT: Layout = Layout {
    name: "LUKS2 default",
    version: LuksVersion::Luks2,
    key_bits: 512,
    size: 17 * MIB,
    metadata_size: None,
    keyslots_size: None,
};

fn options(layout: &Layout) -> FormatOptions {
    let mut opts =
        FormatOptions::new(layout.version, layout.key_bits, fast_kdf()).expect("cipher options");
    opts.metadata_size = layout.metadata_size;
    opts.keyslots_size = layout.keyslots_size;
    opts
}

fn format_image(layout: &Layout) -> Image {
    let disk = MemDisk::new(DEV, vec![0u8; layout.size]);
    let (_, key) = luks::format(&disk, &options(layout), &old_passphrase()).expect("format");
    Image {
        bytes: disk.contents(),
        key: key.expose().to_vec(),
    }
}

/// What the CLI's change-key does: unlock with `from`, add a keyslot for
/// `to`, remove the keyslot that `from` opened.
fn change_key_from_to(
    disk: &dyn Disk,
    from: &Passphrase,
    to: &Passphrase,
) -> Result<(), LuksError> {
    let mut header = Header::read(disk)?;
    let unlocked = header.unlock(disk, from, None, &limits())?;
    header.add_keyslot(disk, &unlocked.volume_key, to, None, &fast_kdf(), &limits())?;
    header.remove_keyslot(disk, unlocked.keyslot)
}

/// Change-key from the old passphrase to the new one.
fn change_key(disk: &dyn Disk) -> Result<(), LuksError> {
    change_key_from_to(disk, &old_passphrase(), &new_passphrase())
}

/// Which of `passphrases` open `bytes` (read from a fresh disk). Every
/// success must yield `key`; every failure must be a wrong passphrase.
fn which_open(
    bytes: Vec<u8>,
    key: &[u8],
    passphrases: &[&Passphrase],
) -> Result<Vec<bool>, String> {
    let disk = MemDisk::new(DEV, bytes);
    let header = Header::read(&disk).map_err(|e| format!("header does not read: {e:?}"))?;
    let mut opens = Vec::new();
    for (i, p) in passphrases.iter().enumerate() {
        match header.unlock(&disk, p, None, &limits()) {
            Ok(u) if u.volume_key.expose() == key => opens.push(true),
            Ok(u) => {
                return Err(format!(
                    "passphrase {i} opened keyslot {} to a different volume key",
                    u.keyslot
                ));
            }
            Err(LuksError::WrongPassphrase { .. }) => opens.push(false),
            Err(e) => return Err(format!("passphrase {i}: {e:?}")),
        }
    }
    Ok(opens)
}

/// Number of writes `op` performs on a copy of `bytes` when nothing fails.
fn count_writes(bytes: &[u8], op: impl Fn(&dyn Disk) -> Result<(), LuksError>) -> usize {
    let disk = FaultDisk::clean(bytes.to_vec());
    op(&disk).expect("the operation succeeds without faults");
    disk.writes.get()
}

/// Interrupts change-key `from` -> `to` on `img` at every write with every
/// fault. `retired` was removed earlier and must never open again.
fn sweep_change_key(
    name: &str,
    img: &Image,
    from: &Passphrase,
    to: &Passphrase,
    retired: Option<&Passphrase>,
) {
    let op = |d: &dyn Disk| change_key_from_to(d, from, to);
    let total = count_writes(&img.bytes, op);
    assert!(total >= 4, "{name}: only {total} writes counted");
    let mut list = vec![from, to];
    list.extend(retired);
    let mut failures = Vec::new();
    for fault in FAULTS {
        for cut in 0..=total {
            let disk = FaultDisk::new(img.bytes.clone(), cut, fault);
            let result = op(&disk);
            let what = format!(
                "{name} change-key, {fault:?} at write {cut} of {total} (operation returned {})",
                match &result {
                    Ok(()) => "Ok".to_string(),
                    Err(e) => format!("{e}"),
                }
            );
            match which_open(disk.inner.contents(), &img.key, &list) {
                Ok(opens) => {
                    if !opens[0] && !opens[1] {
                        failures.push(format!("{what}: neither passphrase opens"));
                    }
                    if opens.get(2) == Some(&true) {
                        failures.push(format!("{what}: a removed passphrase opens again"));
                    }
                }
                Err(msg) => failures.push(format!("{what}: {msg}")),
            }
            if matches!(fault, Fault::Fail | Fault::TornFail) && cut < total && result.is_ok() {
                failures.push(format!("{what}: a failed write was not reported"));
            }
        }
    }
    // Without a fault, only the new passphrase opens.
    let disk = FaultDisk::clean(img.bytes.clone());
    op(&disk).expect("change-key");
    match which_open(disk.inner.contents(), &img.key, &list) {
        Ok(opens) if opens[..2] == [false, true] && !opens.get(2).copied().unwrap_or(false) => {}
        other => failures.push(format!(
            "{name} change-key without faults: expected only the new passphrase to open, got {other:?}"
        )),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn change_key_survives_every_interruption(layout: &Layout) {
    let img = format_image(layout);
    sweep_change_key(
        layout.name,
        &img,
        &old_passphrase(),
        &new_passphrase(),
        None,
    );
}

/// A second change-key reuses the keyslot area the first one freed.
fn second_change_key_survives_every_interruption(layout: &Layout) {
    let img = format_image(layout);
    let disk = MemDisk::new(DEV, img.bytes.clone());
    change_key(&disk).expect("first change-key");
    let img = Image {
        bytes: disk.contents(),
        key: img.key,
    };
    let name = format!("{} (second change-key)", layout.name);
    sweep_change_key(
        &name,
        &img,
        &new_passphrase(),
        &third_passphrase(),
        Some(&old_passphrase()),
    );
}

#[test]
fn luks1_change_key_survives_every_interruption() {
    change_key_survives_every_interruption(&LUKS1);
}

#[test]
fn luks1_512_bit_change_key_survives_every_interruption() {
    change_key_survives_every_interruption(&LUKS1_512);
}

#[test]
fn luks2_change_key_survives_every_interruption() {
    change_key_survives_every_interruption(&LUKS2_SMALL);
}

#[test]
fn luks2_default_layout_change_key_survives_every_interruption() {
    change_key_survives_every_interruption(&LUKS2_DEFAULT);
}

#[test]
fn luks1_second_change_key_survives_every_interruption() {
    second_change_key_survives_every_interruption(&LUKS1);
}

#[test]
fn luks2_second_change_key_survives_every_interruption() {
    second_change_key_survives_every_interruption(&LUKS2_SMALL);
}

#[test]
fn change_key_writes_every_step() {
    // The sweeps are only meaningful if each step is a separate write: at
    // least key material, descriptor (LUKS1) or two header copies (LUKS2)
    // on add, the same plus the wipe on remove.
    let l1 = format_image(&LUKS1);
    let n1 = count_writes(&l1.bytes, change_key);
    assert!(n1 >= 4, "LUKS1: {n1} writes");
    let l2 = format_image(&LUKS2_SMALL);
    let n2 = count_writes(&l2.bytes, change_key);
    assert!(n2 >= 6, "LUKS2: {n2} writes");
}

/// Formats a zeroed device through a faulty disk; returns the key when
/// format reported success (always so for power-loss faults) and the bytes.
fn format_through(layout: &Layout, cut: usize, fault: Fault) -> (Option<Vec<u8>>, Vec<u8>, String) {
    let disk = FaultDisk::new(vec![0u8; layout.size], cut, fault);
    let result = luks::format(&disk, &options(layout), &old_passphrase());
    let (key, outcome) = match result {
        Ok((_, key)) => (Some(key.expose().to_vec()), "Ok".to_string()),
        Err(e) => (None, e.to_string()),
    };
    (key, disk.inner.contents(), outcome)
}

fn format_survives_every_interruption(layout: &Layout) {
    let total = {
        let disk = FaultDisk::clean(vec![0u8; layout.size]);
        luks::format(&disk, &options(layout), &old_passphrase()).expect("format");
        disk.writes.get()
    };
    assert!(total >= 3, "{}: only {total} writes counted", layout.name);
    let mut failures = Vec::new();
    let mut opened = 0;
    for fault in FAULTS {
        for cut in 0..=total {
            let (key, bytes, outcome) = format_through(layout, cut, fault);
            let what = format!(
                "{} format, {fault:?} at write {cut} of {total} (format returned {outcome})",
                layout.name
            );
            if matches!(fault, Fault::Fail | Fault::TornFail) && cut < total && key.is_some() {
                failures.push(format!("{what}: a failed write was not reported"));
            }
            let disk = MemDisk::new(DEV, bytes);
            let header = match Header::read(&disk) {
                Err(LuksError::NotLuks { .. } | LuksError::InvalidHeader { .. }) => continue,
                Err(e) => {
                    failures.push(format!("{what}: unexpected read error {e:?}"));
                    continue;
                }
                Ok(h) => h,
            };
            match header.unlock(&disk, &old_passphrase(), None, &limits()) {
                Ok(u) => {
                    opened += 1;
                    if let Some(key) = &key
                        && u.volume_key.expose() != key.as_slice()
                    {
                        failures.push(format!("{what}: opened to a different volume key"));
                    }
                }
                Err(e) => failures.push(format!(
                    "{what}: the header reads but its passphrase does not open it: {e:?}"
                )),
            }
        }
    }
    assert!(
        opened > 0,
        "{}: no interrupted format ever opened",
        layout.name
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn luks1_format_survives_every_interruption() {
    format_survives_every_interruption(&LUKS1);
}

#[test]
fn luks2_format_survives_every_interruption() {
    format_survives_every_interruption(&LUKS2_SMALL);
}

#[test]
fn luks2_default_layout_format_survives_every_interruption() {
    format_survives_every_interruption(&LUKS2_DEFAULT);
}

#[test]
fn fault_disk_models_the_cut() {
    // The harness itself: first `complete` writes land, the torn write
    // lands half, the rest never land; errors only in the failing modes.
    for fault in FAULTS {
        let disk = FaultDisk::new(vec![0u8; 16], 1, fault);
        assert!(disk.write_at(&[1, 1, 1, 1], 0).is_ok());
        let second = disk.write_at(&[2, 2, 2, 2], 4);
        let third = disk.write_at(&[3, 3, 3, 3], 8);
        let c = disk.inner.contents();
        assert_eq!(&c[..4], &[1, 1, 1, 1], "{fault:?}");
        let torn = matches!(fault, Fault::TornFail | Fault::TornCrash);
        let expect_second: &[u8] = if torn { &[2, 2, 0, 0] } else { &[0, 0, 0, 0] };
        assert_eq!(&c[4..8], expect_second, "{fault:?}");
        assert_eq!(&c[8..12], &[0, 0, 0, 0], "{fault:?}");
        let fails = matches!(fault, Fault::Fail | Fault::TornFail);
        assert_eq!(second.is_err(), fails, "{fault:?}");
        assert_eq!(third.is_err(), fails, "{fault:?}");
        assert_eq!(disk.sync().is_err(), fails, "{fault:?}");
    }
}

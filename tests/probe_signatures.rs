//! Signature probing against signatures made by the real tools, and the
//! loop device fixture.
//!
//! Every signature here is created by the tool that creates it in the
//! field, on a sparse file or on a loop device, and `probe` must report it
//! with the right kind and offset. The offsets are also checked against
//! libblkid's own view (`wipefs`), so a disagreement on where a signature
//! lives shows up here.
//!
//! Needs root (loop devices) and these Debian packages; a missing tool
//! fails its test, it is never skipped:
//!
//!   e2fsprogs      mkfs.ext2, mkfs.ext3, mkfs.ext4
//!   xfsprogs       mkfs.xfs
//!   btrfs-progs    mkfs.btrfs
//!   dosfstools     mkfs.vfat
//!   util-linux     mkswap, wipefs
//!   fdisk          sfdisk (MBR and GPT)
//!   mdadm          mdadm
//!   lvm2           pvcreate
//!   cryptsetup-bin cryptsetup

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use luks_agent::blockdev::loopdev::LoopDevice;
use luks_agent::blockdev::probe::{Signature, SignatureKind, is_blank, probe};
use luks_agent::luks::FileDisk;

use SignatureKind::*;

const MIB: u64 = 1 << 20;

/// Locates a required tool, or fails the test naming the package.
fn tool(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return p;
        }
    }
    panic!(
        "required tool `{name}` was not found in PATH, /usr/sbin or /sbin: install the \
         Debian package `{package}` (apt-get install {package}, or run \
         scripts/install-deps.sh as root) and run the tests again. \
         These tests never skip silently."
    );
}

/// Loop devices, `pvcreate` and `mdadm` need root.
fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test attaches loop devices and needs root (and /dev/loop-control)"
    );
}

/// Runs a command to completion (at most five minutes), failing the test
/// with its output if it does not succeed. Returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = run_status(cmd);
    assert!(out.0, "{}", out.2);
    out.1
}

/// Runs a command; returns (success, stdout, a printable report).
fn run_status(cmd: &mut Command) -> (bool, String, String) {
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {line}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{line} did not finish within five minutes");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    let report = format!("{line}: {status}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    (status.success(), out, report)
}

/// A sparse file of `size` bytes.
fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).expect("create sparse file");
    f.set_len(size).expect("size sparse file");
    p
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, offset).expect("write");
    f.sync_all().expect("sync");
}

/// Probes a file or block device, opened read-only the way the agent
/// opens devices.
fn probe_path(path: &Path) -> Vec<Signature> {
    let file = luks_agent::blockdev::open_device(
        path,
        false,
        luks_agent::blockdev::Accept::BlockOrFile,
        std::time::Duration::from_secs(10),
    )
    .expect("open device for probing");
    let disk = FileDisk::new(file, path.display().to_string());
    probe(&disk).unwrap_or_else(|e| panic!("probe {}: {e}", path.display()))
}

fn kinds(sigs: &[Signature]) -> Vec<(SignatureKind, u64)> {
    sigs.iter().map(|s| (s.kind, s.offset)).collect()
}

/// Probes `path` and asserts exactly `expected` (kind, offset) pairs, in
/// order of offset, and that the device is not blank.
fn expect(path: &Path, expected: &[(SignatureKind, u64)]) -> Vec<Signature> {
    let sigs = probe_path(path);
    assert_sigs(path, &sigs, expected);
    sigs
}

fn assert_sigs(path: &Path, sigs: &[Signature], expected: &[(SignatureKind, u64)]) {
    assert_eq!(kinds(sigs), expected, "{}: got {sigs:#?}", path.display());
    assert!(!is_blank(sigs), "{}: not blank", path.display());
}

/// What libblkid finds on `path`: (type, offset) pairs from `wipefs`.
fn wipefs(path: &Path) -> Vec<(String, u64)> {
    let out = run(Command::new(tool("wipefs", "util-linux"))
        .args(["--json", "--output", "TYPE,OFFSET"])
        .arg(path));
    if out.trim().is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("wipefs JSON");
    v["signatures"]
        .as_array()
        .expect("signatures array")
        .iter()
        .map(|s| {
            let ty = s["type"].as_str().expect("type").to_string();
            let off = s["offset"].as_str().expect("offset");
            let off = u64::from_str_radix(off.trim_start_matches("0x"), 16).expect("hex offset");
            (ty, off)
        })
        .collect()
}

/// Every signature we report lies where libblkid reports one, and every
/// kind of signature libblkid reports is matched by one of ours.
fn cross_check(path: &Path, sigs: &[Signature]) {
    cross_check_with(path, sigs, &wipefs(path));
}

fn cross_check_with(path: &Path, sigs: &[Signature], theirs: &[(String, u64)]) {
    for s in sigs {
        assert!(
            theirs.iter().any(|(_, off)| *off == s.offset),
            "{}: we report {s} where wipefs sees nothing; wipefs: {theirs:?}",
            path.display()
        );
    }
    for (ty, _) in theirs {
        assert!(
            theirs
                .iter()
                .filter(|(t, _)| t == ty)
                .any(|(_, off)| sigs.iter().any(|s| s.offset == *off)),
            "{}: wipefs sees {ty} but we do not; ours: {sigs:#?}; wipefs: {theirs:?}",
            path.display()
        );
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("probe-sigs-")
        .tempdir()
        .expect("temporary directory")
}

// ---------------------------------------------------------------------------
// Blank devices
// ---------------------------------------------------------------------------

#[test]
fn zeroed_sparse_file_is_blank() {
    let dir = tempdir();
    for size in [0, 4096, MIB, 64 * MIB, 10 * 1024 * MIB + 512] {
        let img = sparse(dir.path(), "blank.img", size);
        let sigs = probe_path(&img);
        assert!(is_blank(&sigs), "size {size}: {sigs:#?}");
    }
}

#[test]
fn zeroed_loop_device_is_blank() {
    require_root();
    let dir = tempdir();
    let dev = LoopDevice::with_sparse_file(dir.path(), 64 * MIB).expect("attach loop device");
    let sigs = probe_path(dev.path());
    assert!(is_blank(&sigs), "{sigs:#?}");
}

/// Documented limitation: only the places where signatures live are read,
/// so data in the middle of an otherwise zeroed device is not seen.
#[test]
fn random_data_in_the_middle_is_blank() {
    let dir = tempdir();
    let img = sparse(dir.path(), "middle.img", 64 * MIB);
    let mut noise = vec![0u8; MIB as usize];
    getrandom_fill(&mut noise);
    write_at(&img, 8 * MIB, &noise);
    write_at(&img, 200 * 1024, &noise[..4096]);
    let sigs = probe_path(&img);
    assert!(is_blank(&sigs), "{sigs:#?}");

    // The same noise in the first or last 64 KiB is not blank.
    write_at(&img, 40_000, &noise[..16]);
    let sigs = probe_path(&img);
    assert_eq!(sigs.len(), 1, "{sigs:#?}");
    assert_eq!(sigs[0].kind, NonZeroHead);
    assert!(sigs[0].offset >= 40_000 && sigs[0].offset < 40_016);
    let img2 = sparse(dir.path(), "tail.img", 64 * MIB);
    write_at(&img2, 64 * MIB - 1000, &[0xff]);
    assert_eq!(kinds(&probe_path(&img2)), [(NonZeroHead, 64 * MIB - 1000)]);
}

/// Non-zero pseudo-random bytes (xorshift; the content does not matter,
/// only that it is not zero and carries no magic).
fn getrandom_fill(buf: &mut [u8]) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8 | 1;
    }
}

// ---------------------------------------------------------------------------
// File systems and swap
// ---------------------------------------------------------------------------

#[test]
fn ext2_ext3_ext4() {
    let dir = tempdir();
    for fs_type in ["ext2", "ext3", "ext4"] {
        let mkfs = tool(&format!("mkfs.{fs_type}"), "e2fsprogs");
        let img = sparse(dir.path(), &format!("{fs_type}.img"), 64 * MIB);
        run(Command::new(mkfs).args(["-F", "-q"]).arg(&img));
        let sigs = expect(&img, &[(Filesystem, 0x438)]);
        assert_eq!(sigs[0].what, fs_type);
        cross_check(&img, &sigs);
    }
}

#[test]
fn xfs() {
    let mkfs = tool("mkfs.xfs", "xfsprogs");
    let dir = tempdir();
    // xfsprogs refuses file systems under 300 MiB.
    let img = sparse(dir.path(), "xfs.img", 512 * MIB);
    run(Command::new(mkfs).args(["-f", "-q"]).arg(&img));
    let sigs = expect(&img, &[(Filesystem, 0)]);
    assert_eq!(sigs[0].what, "xfs");
    cross_check(&img, &sigs);
}

#[test]
fn btrfs() {
    let mkfs = tool("mkfs.btrfs", "btrfs-progs");
    let dir = tempdir();
    let img = sparse(dir.path(), "btrfs.img", 256 * MIB);
    run(Command::new(mkfs).args(["-f", "-q"]).arg(&img));
    let sigs = expect(&img, &[(Filesystem, 0x10040)]);
    assert_eq!(sigs[0].what, "btrfs");
    cross_check(&img, &sigs);
}

/// A FAT boot sector ends in 0x55AA like an MBR, and its boot code sits
/// where an MBR keeps its partition entries; `--mbr=y` even writes a real
/// looking partition entry there. It must be reported as a file system
/// only.
#[test]
fn vfat_is_a_file_system_not_a_partition_table() {
    let mkfs = tool("mkfs.vfat", "dosfstools");
    let dir = tempdir();
    for (bits, offset, fake_mbr) in [
        ("12", 0x36, false),
        ("16", 0x36, false),
        ("32", 0x52, false),
        ("16", 0x36, true),
        ("32", 0x52, true),
    ] {
        let img = sparse(dir.path(), &format!("fat{bits}-{fake_mbr}.img"), 64 * MIB);
        let mut cmd = Command::new(&mkfs);
        cmd.args(["-F", bits]);
        if fake_mbr {
            cmd.arg("--mbr=y");
        }
        run(cmd.arg(&img));
        let sigs = expect(&img, &[(Filesystem, offset)]);
        assert!(sigs[0].what.starts_with("vfat"), "{sigs:#?}");
        cross_check(&img, &sigs);
    }
}

#[test]
fn swap_at_every_page_size() {
    let mkswap = tool("mkswap", "util-linux");
    let dir = tempdir();
    for page in [4096u64, 8192, 16384, 65536] {
        let img = sparse(dir.path(), &format!("swap{page}.img"), 64 * MIB);
        run(Command::new(&mkswap)
            .args(["--pagesize", &page.to_string()])
            .arg(&img));
        let sigs = expect(&img, &[(Swap, page - 10)]);
        assert!(sigs[0].what.contains("v1"), "{sigs:#?}");
        cross_check(&img, &sigs);
    }
}

// ---------------------------------------------------------------------------
// Partition tables
// ---------------------------------------------------------------------------

fn sfdisk(img: &Path, script: &str) {
    let sfdisk = tool("sfdisk", "fdisk");
    let script_path = img.with_extension("sfdisk");
    fs::write(&script_path, script).expect("write sfdisk script");
    run(Command::new("sh").arg("-c").arg(format!(
        "exec '{}' --quiet --no-reread --no-tell-kernel '{}' < '{}'",
        sfdisk.display(),
        img.display(),
        script_path.display()
    )));
}

#[test]
fn mbr_partition_table() {
    let dir = tempdir();
    let img = sparse(dir.path(), "mbr.img", 64 * MIB);
    sfdisk(&img, "label: dos\n,8M,83\n,8M,82\n");
    let sigs = expect(&img, &[(PartitionTable, 510)]);
    assert!(sigs[0].what.contains("2 partition"), "{sigs:#?}");
    cross_check(&img, &sigs);
}

#[test]
fn gpt_partition_table_and_its_backup() {
    let dir = tempdir();
    let size = 64 * MIB;
    let img = sparse(dir.path(), "gpt.img", size);
    sfdisk(&img, "label: gpt\n,8M\n,8M\n");
    let sigs = expect(
        &img,
        &[
            (PartitionTable, 510),
            (PartitionTable, 512),
            (PartitionTable, size - 512),
        ],
    );
    assert!(sigs[0].what.contains("protective"), "{sigs:#?}");
    cross_check(&img, &sigs);

    // Wipe the protective MBR, the primary header and the primary entries
    // (the whole first MiB): the backup header at the end still counts.
    write_at(&img, 0, &vec![0u8; MIB as usize]);
    let sigs = expect(&img, &[(PartitionTable, size - 512)]);
    assert!(sigs[0].what.contains("backup"), "{sigs:#?}");
    cross_check(&img, &sigs);
}

// ---------------------------------------------------------------------------
// LUKS
// ---------------------------------------------------------------------------

fn luks_format(img: &Path, key: &Path, args: &[&str]) {
    let cryptsetup = tool("cryptsetup", "cryptsetup-bin");
    run(Command::new(cryptsetup)
        .args(["luksFormat", "--batch-mode", "--key-file"])
        .arg(key)
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .args(args)
        .arg(img));
}

#[test]
fn luks1() {
    let dir = tempdir();
    let key = dir.path().join("key");
    fs::write(&key, b"probe passphrase").unwrap();
    let img = sparse(dir.path(), "luks1.img", 32 * MIB);
    luks_format(&img, &key, &["--type", "luks1"]);
    let sigs = expect(&img, &[(Luks1, 0)]);
    cross_check(&img, &sigs);
}

#[test]
fn luks2_primary_and_secondary_headers() {
    let dir = tempdir();
    let key = dir.path().join("key");
    fs::write(&key, b"probe passphrase").unwrap();
    // The secondary header sits right after the primary's metadata area,
    // whose size cryptsetup lets the user choose.
    for (metadata, secondary) in [(None, 0x4000u64), (Some("1m"), MIB), (Some("4m"), 4 * MIB)] {
        let img = sparse(
            dir.path(),
            &format!("luks2-{}.img", metadata.unwrap_or("default")),
            64 * MIB,
        );
        let mut args = vec!["--type", "luks2"];
        if let Some(m) = metadata {
            args.extend(["--luks2-metadata-size", m]);
        }
        luks_format(&img, &key, &args);
        let sigs = expect(&img, &[(Luks2Primary, 0), (Luks2Secondary, secondary)]);
        cross_check(&img, &sigs);

        // Zero the whole primary metadata area: found through the
        // secondary header alone.
        write_at(&img, 0, &vec![0u8; secondary as usize]);
        let sigs = expect(&img, &[(Luks2Secondary, secondary)]);
        assert!(sigs[0].what.contains("version 2"), "{sigs:#?}");
        assert!(!sigs[0].what.contains("does not match"), "{sigs:#?}");
        cross_check(&img, &sigs);
    }
}

// ---------------------------------------------------------------------------
// LVM2 and MD (need block devices: loop devices)
// ---------------------------------------------------------------------------

/// `pvcreate` only accepts block devices that pass its device filter; the
/// configuration here accepts exactly the one loop device and keeps LVM
/// away from the host's devices file, hints and udev.
#[test]
fn lvm2_physical_volume() {
    require_root();
    let pvcreate = tool("pvcreate", "lvm2");
    let dir = tempdir();
    let dev = LoopDevice::with_sparse_file(dir.path(), 64 * MIB).expect("attach loop device");
    let path = dev.path().display().to_string();
    let config = format!(
        "devices {{ filter=[\"a|^{path}$|\", \"r|.*|\"] global_filter=[\"a|^{path}$|\", \
         \"r|.*|\"] use_devicesfile=0 obtain_device_list_from_udev=0 hints=\"none\" }}"
    );
    run(Command::new(pvcreate)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .args(["--config", &config, "--yes"])
        .arg(dev.path()));
    let sigs = expect(dev.path(), &[(Lvm2, 512 + 24)]);
    cross_check(dev.path(), &sigs);
}

const MD_MAGIC: u32 = 0xa92b_4efc;

/// Where mdadm puts each metadata version's superblock on a member of
/// `size` bytes.
fn md_offset(version: &str, size: u64) -> u64 {
    match version {
        "0.90" => (size & !0xffff) - 0x10000,
        "1.0" => ((size / 512 - 16) & !7) * 512,
        "1.1" => 0,
        "1.2" => 0x1000,
        v => panic!("unknown MD metadata version {v}"),
    }
}

/// A version 1 superblock as mdadm writes it (`struct mdp_superblock_1`
/// from `<linux/raid/md_p.h>`), for a 2-disk RAID1 member, with a valid
/// checksum, so that `mdadm --examine` accepts it.
fn md_superblock_v1(version: &str, size: u64) -> Vec<u8> {
    let sectors = size / 512;
    let super_offset = md_offset(version, size) / 512;
    let (data_offset, data_size) = match version {
        "1.0" => (0, super_offset - 8),
        _ => (2048, sectors - 2048),
    };
    let max_dev = 2u32;
    let mut sb = vec![0u8; 256 + 2 * max_dev as usize];
    let put32 =
        |sb: &mut Vec<u8>, at: usize, v: u32| sb[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |sb: &mut Vec<u8>, at: usize, v: u64| sb[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put32(&mut sb, 0, MD_MAGIC);
    put32(&mut sb, 4, 1); // major_version
    sb[16..32].copy_from_slice(b"probe-set-uuid!!"); // set_uuid
    sb[32..39].copy_from_slice(b"probe:0"); // set_name
    put64(&mut sb, 64, 1_700_000_000); // ctime
    put32(&mut sb, 72, 1); // level: RAID1
    put64(&mut sb, 80, data_size); // size
    put32(&mut sb, 92, 2); // raid_disks
    put64(&mut sb, 128, data_offset);
    put64(&mut sb, 136, data_size);
    put64(&mut sb, 144, super_offset);
    sb[168..184].copy_from_slice(b"probe-dev-uuid!!"); // device_uuid
    put64(&mut sb, 192, 1_700_000_000); // utime
    put64(&mut sb, 200, 1); // events
    put64(&mut sb, 208, u64::MAX); // resync_offset: clean
    put32(&mut sb, 220, max_dev);
    sb[256..260].copy_from_slice(&[0, 0, 1, 0]); // dev_roles: 0, 1
    // calc_sb_1_csum: 32-bit little-endian words summed into 64 bits,
    // folded once.
    let sum: u64 = sb
        .chunks(4)
        .map(|w| u64::from(u32::from_le_bytes(w.try_into().unwrap())))
        .sum();
    put32(&mut sb, 216, ((sum & 0xffff_ffff) + (sum >> 32)) as u32);
    sb
}

/// A version 0.90 superblock (`mdp_super_t`, 4 KiB of host-endian 32-bit
/// words) for a 2-disk RAID1 member, with a valid checksum.
fn md_superblock_v090(size: u64) -> Vec<u8> {
    let mut w = [0u32; 1024];
    w[0] = MD_MAGIC;
    w[2] = 90; // minor_version
    w[5] = 0x1234_5678; // set_uuid0
    w[6] = 1_700_000_000; // ctime
    w[7] = 1; // level: RAID1
    w[8] = (md_offset("0.90", size) / 1024) as u32; // size in KiB
    w[9] = 2; // nr_disks
    w[10] = 2; // raid_disks
    w[13..16].copy_from_slice(&[1, 2, 3]); // set_uuid1..3
    w[32] = 1_700_000_000; // utime
    w[33] = 1; // state: clean
    w[34] = 2; // active_disks
    w[35] = 2; // working_disks
    w[39] = 1; // events_lo
    for i in 0..2u32 {
        // disks[i]: number, major, minor, raid_disk, state (active|sync)
        let d = 128 + 32 * i as usize;
        w[d..d + 5].copy_from_slice(&[i, 7, i, i, 6]);
    }
    w[992..997].copy_from_slice(&[0, 7, 0, 0, 6]); // this_disk
    let sum: u64 = w.iter().map(|&x| u64::from(x)).sum();
    w[38] = ((sum & 0xffff_ffff) + (sum >> 32)) as u32; // sb_csum
    w.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// What was found on one MD member: where, our view, libblkid's view.
type MdMember = (PathBuf, Vec<Signature>, Vec<(String, u64)>);

/// MD members of every metadata version. With the md driver, `mdadm
/// --create` makes real RAID1 arrays over two loop devices. Without it
/// (`/proc/mdstat` missing, as in containers and minimal VMs) `mdadm
/// --create` cannot work at all ("unexpected failure opening /dev/md0"),
/// so the test writes the superblock mdadm would write
/// (`md_superblock_v1`, `md_superblock_v090`) at the offset mdadm uses,
/// and proves it genuine with `mdadm --examine`, which must accept it,
/// checksum included.
#[test]
fn md_superblocks_of_every_version() {
    require_root();
    let mdadm = tool("mdadm", "mdadm");
    let dir = tempdir();
    let size = 64 * MIB;
    let have_md = Path::new("/proc/mdstat").exists();
    for version in ["0.90", "1.0", "1.1", "1.2"] {
        let members = if have_md {
            md_created(&mdadm, dir.path(), version, size)
        } else {
            md_written(&mdadm, dir.path(), version, size)
        };
        let offset = md_offset(version, size);
        for (path, sigs, theirs) in members {
            assert_sigs(&path, &sigs, &[(Md, offset)]);
            cross_check_with(&path, &sigs, &theirs);
        }
    }
}

/// A real array over two loop devices, stopped again; its members are
/// probed through their backing files (md writes through the block layer,
/// around the loop devices' page cache). Everything is looked at before
/// the superblocks are wiped and any array udev may have assembled again
/// behind our back is stopped, so that the loop devices can go.
fn md_created(mdadm: &Path, dir: &Path, version: &str, size: u64) -> Vec<MdMember> {
    let a = LoopDevice::with_sparse_file(dir, size).expect("attach loop device");
    let b = LoopDevice::with_sparse_file(dir, size).expect("attach loop device");
    let name = format!(
        "/dev/md/probe-{}-{}",
        std::process::id(),
        version.replace('.', "")
    );
    run(Command::new(mdadm)
        .args(["--create", &name, "--run", "--force", "--assume-clean"])
        .args(["--metadata", version, "--level=1", "--raid-devices=2"])
        .args(["--bitmap=none", "--homehost=probe"])
        .arg(a.path())
        .arg(b.path()));
    stop_md(mdadm, &name);
    let members = [&a, &b]
        .iter()
        .map(|d| {
            let file = d.backing_file().to_path_buf();
            let sigs = probe_path(&file);
            let theirs = wipefs(&file);
            (file, sigs, theirs)
        })
        .collect();
    for d in [&a, &b] {
        release_md_member(mdadm, d);
    }
    members
}

/// Without the md driver: the superblock mdadm would write, on a loop
/// device, checked with `mdadm --examine`.
fn md_written(mdadm: &Path, dir: &Path, version: &str, size: u64) -> Vec<MdMember> {
    let dev = LoopDevice::with_sparse_file(dir, size).expect("attach loop device");
    let sb = if version == "0.90" {
        md_superblock_v090(size)
    } else {
        md_superblock_v1(version, size)
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.path())
        .expect("open loop device");
    f.write_all_at(&sb, md_offset(version, size))
        .expect("write superblock");
    f.sync_all().expect("sync");
    drop(f);
    let examined = run(Command::new(mdadm).arg("--examine").arg(dev.path()));
    let shown_version = if version == "0.90" {
        "0.90.00"
    } else {
        version
    };
    assert!(
        examined
            .lines()
            .any(|l| l.trim().starts_with("Version :") && l.trim().ends_with(shown_version)),
        "mdadm --examine does not see a v{version} superblock:\n{examined}"
    );
    assert!(
        examined.contains("- correct"),
        "mdadm --examine does not accept the checksum:\n{examined}"
    );
    let path = dev.path().to_path_buf();
    let sigs = probe_path(&path);
    let theirs = wipefs(&path);
    vec![(path, sigs, theirs)]
}

fn stop_md(mdadm: &Path, name: &str) {
    let mut report = String::new();
    for _ in 0..50 {
        let (ok, _, r) = run_status(Command::new(mdadm).arg("--stop").arg(name));
        if ok {
            return;
        }
        report = r;
        thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot stop {name}:\n{report}");
}

/// Stops any array holding `dev` (udev's incremental assembly may have
/// put it back together) and wipes its superblock. Best effort.
fn release_md_member(mdadm: &Path, dev: &LoopDevice) {
    for _ in 0..50 {
        let holders: Vec<String> = fs::read_dir(dev.sys_dir().join("holders"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if holders.is_empty() {
            break;
        }
        for h in holders {
            let _ = run_status(Command::new(mdadm).arg("--stop").arg(format!("/dev/{h}")));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = run_status(Command::new(mdadm).arg("--zero-superblock").arg(dev.path()));
}

// ---------------------------------------------------------------------------
// The loop device fixture
// ---------------------------------------------------------------------------

fn sys_backing_file(number: u32) -> Option<String> {
    fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Waits until `/dev/loop<number>` no longer serves `backing` (it may
/// already serve another test's file: tests run in parallel).
fn wait_detached(number: u32, backing: &Path) {
    let ours = fs::canonicalize(backing)
        .unwrap_or_else(|_| backing.to_path_buf())
        .display()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    // sysfs appends " (deleted)" once the file was unlinked.
    while let Some(b) = sys_backing_file(number).filter(|b| b.starts_with(&ours)) {
        assert!(
            Instant::now() < deadline,
            "/dev/loop{number} is still attached to {b}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn assert_attached(dev: &LoopDevice) {
    let expected = fs::canonicalize(dev.backing_file()).expect("canonical backing path");
    assert_eq!(
        sys_backing_file(dev.number()).as_deref(),
        Some(expected.to_str().unwrap()),
        "{dev:?}"
    );
    let autoclear = fs::read_to_string(dev.sys_dir().join("loop/autoclear")).expect("autoclear");
    assert_eq!(autoclear.trim(), "1", "{dev:?} lacks LO_FLAGS_AUTOCLEAR");
    assert_eq!(dev.path(), Path::new(&format!("/dev/loop{}", dev.number())));
    let size = luks_agent::blockdev::size_of(&File::open(dev.path()).expect("open loop device"))
        .expect("loop device size");
    assert_eq!(size, fs::metadata(dev.backing_file()).unwrap().len());
}

#[test]
fn loop_fixture_attach_and_drop() {
    require_root();
    let dir = tempdir();
    let dev = LoopDevice::with_sparse_file(dir.path(), 16 * MIB).expect("attach");
    assert_attached(&dev);
    let number = dev.number();
    let backing = fs::canonicalize(dev.backing_file()).unwrap();
    drop(dev);
    wait_detached(number, &backing);
    assert!(
        !backing.exists(),
        "the sparse backing file is removed on drop"
    );
}

#[test]
fn loop_fixture_detaches_when_the_test_panics() {
    require_root();
    let dir = tempdir();
    let seen = Mutex::new(None);
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let dev = LoopDevice::with_sparse_file(dir.path(), 16 * MIB).expect("attach");
        assert_attached(&dev);
        let backing = fs::canonicalize(dev.backing_file()).unwrap();
        *seen.lock().unwrap() = Some((dev.number(), backing));
        panic!("deliberate panic with {} attached", dev.path().display());
    }));
    assert!(result.is_err(), "the closure panics");
    let (number, backing) = seen.lock().unwrap().take().expect("device was attached");
    wait_detached(number, &backing);
}

#[test]
fn loop_fixture_explicit_detach_read_only_and_legacy_ioctls() {
    require_root();
    let dir = tempdir();
    let img = sparse(dir.path(), "given.img", 8 * MIB);

    let dev = LoopDevice::attach(&img).expect("attach");
    assert_attached(&dev);
    let number = dev.number();
    dev.detach().expect("detach");
    let canonical = fs::canonicalize(&img).unwrap();
    assert!(
        sys_backing_file(number).is_none_or(|b| !b.starts_with(canonical.to_str().unwrap())),
        "detach() returned before the device was detached"
    );
    assert!(img.exists(), "a given backing file is left alone");

    // The pre-5.8 path: LOOP_SET_FD then LOOP_SET_STATUS64.
    let dev = LoopDevice::attach_legacy(&img).expect("attach with legacy ioctls");
    assert_attached(&dev);
    let number = dev.number();
    drop(dev);
    wait_detached(number, &img);

    let dev = LoopDevice::attach_read_only(&img).expect("attach read-only");
    assert_attached(&dev);
    let ro = fs::read_to_string(dev.sys_dir().join("ro")).expect("ro attribute");
    assert_eq!(ro.trim(), "1");
    let number = dev.number();
    drop(dev);
    wait_detached(number, &img);
}

/// Threads racing for `LOOP_CTL_GET_FREE` are offered the same device; the
/// losers see EBUSY and must retry with another.
#[test]
fn loop_fixture_parallel_attach_gets_distinct_devices() {
    require_root();
    let dir = Arc::new(tempdir());
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (dir, barrier) = (Arc::clone(&dir), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                LoopDevice::with_sparse_file(dir.path(), 4 * MIB).expect("attach under contention")
            })
        })
        .collect();
    let devs: Vec<LoopDevice> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut numbers: Vec<u32> = devs.iter().map(LoopDevice::number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), n, "{devs:?}");
    for d in &devs {
        assert_attached(d);
    }
    let attached: Vec<(u32, PathBuf)> = devs
        .iter()
        .map(|d| (d.number(), fs::canonicalize(d.backing_file()).unwrap()))
        .collect();
    drop(devs);
    for (number, backing) in attached {
        wait_detached(number, &backing);
    }
}

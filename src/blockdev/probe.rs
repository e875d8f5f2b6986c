//! Device signature probing for the first-use format guard.
//!
//! Before a volume is formatted on first use, the agent must be sure the
//! device holds nothing: a volume that was already formatted (by us, by
//! cryptsetup, by a guest that wrote a file system straight onto it) must
//! never be formatted again. [`probe`] reports every signature it knows of,
//! not just the first, so that the refusal message can name all of them.
//!
//! Every magic number and offset below comes from libblkid (util-linux,
//! `libblkid/src/superblocks/*.c` and `libblkid/src/partitions/*.c`); the
//! comment at each check names the file. The probe only compares magics
//! (plus a few cheap fields to tell look-alikes apart); it does not verify
//! checksums, because for a format guard a damaged header must still count
//! as "something is here".
//!
//! Only small regions are read, never the whole device: the first 68 KiB,
//! the last 64 KiB, one 4 KiB block at each LUKS2 secondary header offset
//! beyond the first 68 KiB, one block for the MD 0.90 superblock and at most
//! one block for a displaced GPT backup header. That is under 200 KiB in
//! all (see [`MAX_READ_BYTES`]). Regions that lie beyond the end of a small
//! device are skipped.
//!
//! Known limitation: data that lies anywhere else (a file system without a
//! signature, random data in the middle of the device) is not seen. The
//! generic [`SignatureKind::NonZeroHead`] check covers the first and last
//! 64 KiB, where partition tables, boot sectors and superblocks live.

use std::fmt;
use std::io;

use super::disk::Disk;

/// What kind of signature was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SignatureKind {
    /// LUKS1 header (`LUKS\xba\xbe`, version 1) at offset 0.
    Luks1,
    /// LUKS2 primary header (`LUKS\xba\xbe`, version 2) at offset 0.
    Luks2Primary,
    /// LUKS2 secondary header (`SKUL\xba\xbe`) at one of the offsets
    /// cryptsetup may place it (16 KiB to 4 MiB).
    Luks2Secondary,
    /// A file system superblock (ext2/3/4, XFS, btrfs, FAT, NTFS, exFAT,
    /// ISO 9660, UDF, squashfs, f2fs, bcachefs).
    Filesystem,
    /// Linux swap space or a hibernation image in a swap area.
    Swap,
    /// LVM2 physical volume label.
    Lvm2,
    /// Linux MD (software RAID) superblock, any metadata version.
    Md,
    /// bcache backing or cache device superblock.
    Bcache,
    /// MBR (DOS) or GPT partition table, primary or backup.
    PartitionTable,
    /// No known signature, but the first or last 64 KiB are not all zero.
    NonZeroHead,
}

impl fmt::Display for SignatureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SignatureKind::Luks1 => "LUKS1",
            SignatureKind::Luks2Primary => "LUKS2 primary header",
            SignatureKind::Luks2Secondary => "LUKS2 secondary header",
            SignatureKind::Filesystem => "file system",
            SignatureKind::Swap => "swap",
            SignatureKind::Lvm2 => "LVM2 physical volume",
            SignatureKind::Md => "Linux MD RAID member",
            SignatureKind::Bcache => "bcache",
            SignatureKind::PartitionTable => "partition table",
            SignatureKind::NonZeroHead => "non-zero data",
        };
        f.write_str(s)
    }
}

/// One signature found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// What it is.
    pub kind: SignatureKind,
    /// Byte offset of the magic on the device (the offset `wipefs` shows),
    /// or of the first non-zero byte for [`SignatureKind::NonZeroHead`].
    pub offset: u64,
    /// Human-readable detail: the exact format and what was matched.
    pub what: String,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {:#x}: {}",
            self.kind, self.offset, self.what
        )
    }
}

/// Whether a probe result means the device may be formatted: nothing at
/// all was found, not even unknown non-zero data at its head or tail.
pub fn is_blank(sigs: &[Signature]) -> bool {
    sigs.is_empty()
}

const KIB: u64 = 1024;

/// Bytes read from the start of the device: the first 64 KiB (checked for
/// non-zero data) plus one more 4 KiB block so that the btrfs magic at
/// 65600 is covered.
const HEAD_READ: u64 = 68 * KIB;
/// Bytes at the start and end of the device that must be all zero.
const ZERO_CHECK: u64 = 64 * KIB;
/// Granularity of reads outside the head and tail.
const BLOCK: u64 = 4 * KIB;

/// Upper bound of the bytes [`probe`] reads from a device: the head, the
/// tail, six LUKS2 secondary header offsets beyond the head, the MD 0.90
/// superblock and a displaced GPT backup header, each one block (two when
/// a field straddles a block boundary).
pub const MAX_READ_BYTES: u64 = HEAD_READ + ZERO_CHECK + (6 + 1 + 1) * 2 * BLOCK;
const _: () = assert!(MAX_READ_BYTES < 1 << 20);

/// Reports every known signature on `disk`, sorted by offset. An empty
/// result means the device is blank (see [`is_blank`]). Reads at most
/// [`MAX_READ_BYTES`] bytes.
pub fn probe(disk: &dyn Disk) -> Result<Vec<Signature>, io::Error> {
    let size = disk.size()?;
    let mut p = Prober::new(disk, size)?;
    p.luks()?;
    p.filesystems()?;
    p.swap()?;
    p.lvm2()?;
    p.md()?;
    p.bcache()?;
    p.partition_tables()?;
    if p.found.is_empty() {
        p.non_zero()?;
    }
    let mut found = p.found;
    found.sort_by_key(|s| (s.offset, s.kind));
    Ok(found)
}

/// Bytes read so far, kept as a few windows of the device.
struct Prober<'a> {
    disk: &'a dyn Disk,
    size: u64,
    windows: Vec<(u64, Vec<u8>)>,
    found: Vec<Signature>,
}

impl<'a> Prober<'a> {
    fn new(disk: &'a dyn Disk, size: u64) -> io::Result<Self> {
        let mut p = Prober {
            disk,
            size,
            windows: Vec::new(),
            found: Vec::new(),
        };
        p.read_window(0, HEAD_READ.min(size))?;
        let tail = ZERO_CHECK.min(size);
        if size - tail >= HEAD_READ {
            p.read_window(size - tail, tail)?;
        } else if size > HEAD_READ {
            // The tail overlaps the head: read only what the head lacks.
            p.read_window(HEAD_READ, size - HEAD_READ)?;
        }
        Ok(p)
    }

    fn read_window(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let n = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut buf = vec![0u8; n];
        self.disk.read_at(&mut buf, offset)?;
        self.windows.push((offset, buf));
        Ok(())
    }

    /// The `len` bytes at `offset`, reading them if no window holds them;
    /// `None` when they reach beyond the end of the device.
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<Option<&[u8]>> {
        let Some(end) = offset.checked_add(len as u64) else {
            return Ok(None);
        };
        if end > self.size {
            return Ok(None);
        }
        let covering = |&(start, ref data): &(u64, Vec<u8>)| {
            offset >= start && end <= start + data.len() as u64
        };
        let idx = match self.windows.iter().position(covering) {
            Some(i) => i,
            None => {
                let start = offset - offset % BLOCK;
                let stop = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(self.size);
                self.read_window(start, stop - start)?;
                self.windows.len() - 1
            }
        };
        let (start, data) = &self.windows[idx];
        let from = (offset - start) as usize;
        Ok(Some(&data[from..from + len]))
    }

    fn matches(&mut self, offset: u64, magic: &[u8]) -> io::Result<bool> {
        Ok(self.bytes(offset, magic.len())? == Some(magic))
    }

    fn array<const N: usize>(&mut self, offset: u64) -> io::Result<Option<[u8; N]>> {
        Ok(self
            .bytes(offset, N)?
            .map(|b| b.try_into().expect("slice has the requested length")))
    }

    fn u16_le(&mut self, offset: u64) -> io::Result<Option<u16>> {
        Ok(self.array(offset)?.map(u16::from_le_bytes))
    }

    fn u16_be(&mut self, offset: u64) -> io::Result<Option<u16>> {
        Ok(self.array(offset)?.map(u16::from_be_bytes))
    }

    fn u32_le(&mut self, offset: u64) -> io::Result<Option<u32>> {
        Ok(self.array(offset)?.map(u32::from_le_bytes))
    }

    fn u64_le(&mut self, offset: u64) -> io::Result<Option<u64>> {
        Ok(self.array(offset)?.map(u64::from_le_bytes))
    }

    fn u64_be(&mut self, offset: u64) -> io::Result<Option<u64>> {
        Ok(self.array(offset)?.map(u64::from_be_bytes))
    }

    fn add(&mut self, kind: SignatureKind, offset: u64, what: impl Into<String>) {
        self.found.push(Signature {
            kind,
            offset,
            what: what.into(),
        });
    }

    fn has(&self, kind: SignatureKind, offset: u64) -> bool {
        self.found
            .iter()
            .any(|s| s.kind == kind && s.offset == offset)
    }

    /// libblkid `superblocks/luks.c`: `LUKS\xba\xbe` at 0 with a big-endian
    /// version (1 or 2) at 6; the LUKS2 secondary header `SKUL\xba\xbe` at
    /// one of `LUKS2_HDR2_OFFSETS` (0x4000 to 0x400000, doubling), with
    /// `hdr_offset` (big-endian u64 at 256) equal to where it lies. Every
    /// offset is checked, whether or not a primary header was found; a
    /// secondary header is reported even when `hdr_offset` disagrees.
    fn luks(&mut self) -> io::Result<()> {
        const MAGIC: &[u8] = b"LUKS\xba\xbe";
        const MAGIC2: &[u8] = b"SKUL\xba\xbe";
        const HDR2_OFFSETS: [u64; 9] = [
            0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
        ];
        if self.matches(0, MAGIC)? {
            match self.u16_be(6)? {
                Some(2) => self.add(SignatureKind::Luks2Primary, 0, "LUKS2 primary header"),
                Some(1) => self.add(SignatureKind::Luks1, 0, "LUKS1 header"),
                v => self.add(
                    SignatureKind::Luks1,
                    0,
                    format!("LUKS header with unknown version {}", v.unwrap_or(0)),
                ),
            }
        }
        for off in HDR2_OFFSETS {
            if !self.matches(off, MAGIC2)? {
                continue;
            }
            let version = self.u16_be(off + 6)?.unwrap_or(0);
            let hdr_offset = self.u64_be(off + 256)?;
            let what = if hdr_offset == Some(off) {
                format!("LUKS2 secondary header (version {version})")
            } else {
                format!(
                    "LUKS2 secondary header magic (version {version}; hdr_offset field {:#x} \
                     does not match)",
                    hdr_offset.unwrap_or(0)
                )
            };
            self.add(SignatureKind::Luks2Secondary, off, what);
        }
        Ok(())
    }

    fn filesystems(&mut self) -> io::Result<()> {
        use SignatureKind::Filesystem;

        // libblkid superblocks/ext.c: s_magic 0xEF53 (little-endian) at
        // superblock 0x400 + 0x38; ext2/ext3/ext4/jbd told apart by the
        // feature flags at 0x45C (compat), 0x460 (incompat), 0x464 (ro).
        if self.u16_le(0x438)? == Some(0xEF53) {
            let compat = self.u32_le(0x45C)?.unwrap_or(0);
            let incompat = self.u32_le(0x460)?.unwrap_or(0);
            let ro = self.u32_le(0x464)?.unwrap_or(0);
            let has_journal = compat & 0x4 != 0;
            let name = if incompat & 0x8 != 0 {
                "ext3/ext4 external journal (jbd)"
            } else if !has_journal && incompat & !0x12 == 0 && ro & !0x7 == 0 {
                "ext2"
            } else if has_journal && incompat & !0x16 == 0 && ro & !0x7 == 0 {
                "ext3"
            } else {
                "ext4"
            };
            self.add(Filesystem, 0x438, name);
        }
        // libblkid superblocks/xfs.c: "XFSB" at 0.
        if self.matches(0, b"XFSB")? {
            self.add(Filesystem, 0, "xfs");
        }
        // libblkid superblocks/btrfs.c: "_BHRfS_M" at 64 KiB + 0x40.
        if self.matches(0x10040, b"_BHRfS_M")? {
            self.add(Filesystem, 0x10040, "btrfs");
        }
        // libblkid superblocks/vfat.c: boot sector with 0x55AA at 510 and a
        // file system type in the BPB: "FAT12   ", "FAT16   ", "FAT     "
        // (or "MSDOS") at 0x36, "FAT32   " (or "MSWIN") at 0x52.
        if let Some(off) = self.fat_type_offset()? {
            let name = self.bytes(off, 8)?.unwrap_or_default();
            let name = String::from_utf8_lossy(name).trim_end().to_string();
            self.add(Filesystem, off, format!("vfat ({name})"));
        }
        // libblkid superblocks/ntfs.c: OEM id "NTFS    " at 3.
        if self.matches(3, b"NTFS    ")? {
            self.add(Filesystem, 3, "ntfs");
        }
        // libblkid superblocks/exfat.c: OEM id "EXFAT   " at 3.
        if self.matches(3, b"EXFAT   ")? {
            self.add(Filesystem, 3, "exfat");
        }
        // libblkid superblocks/iso9660.c and udf.c: volume descriptor at
        // 32 KiB, identifier at 0x8001: "CD001" (ISO 9660), "BEA01",
        // "NSR02", "NSR03" (UDF volume recognition sequence).
        if self.matches(0x8001, b"CD001")? {
            self.add(Filesystem, 0x8001, "iso9660");
        }
        for id in [&b"BEA01"[..], b"NSR02", b"NSR03"] {
            if self.matches(0x8001, id)? {
                self.add(Filesystem, 0x8001, "udf");
                break;
            }
        }
        // libblkid superblocks/squashfs.c: "hsqs" (little-endian) or
        // "sqsh" (big-endian) at 0.
        if self.matches(0, b"hsqs")? || self.matches(0, b"sqsh")? {
            self.add(Filesystem, 0, "squashfs");
        }
        // libblkid superblocks/f2fs.c: 0xF2F52010 (little-endian) at 1 KiB.
        if self.u32_le(0x400)? == Some(0xF2F5_2010) {
            self.add(Filesystem, 0x400, "f2fs");
        }
        // libblkid superblocks/bcache.c: bcachefs's own magic at 4 KiB + 24
        // (older bcachefs uses the bcache magic: see `bcache`).
        if self.matches(0x1018, BCACHEFS_MAGIC)? {
            self.add(Filesystem, 0x1018, "bcachefs");
        }
        Ok(())
    }

    /// Offset of the FAT type string when sector 0 is a FAT boot sector.
    fn fat_type_offset(&mut self) -> io::Result<Option<u64>> {
        if !self.matches(510, b"\x55\xaa")? {
            return Ok(None);
        }
        if self.matches(0x52, b"FAT32   ")? || self.matches(0x52, b"MSWIN")? {
            return Ok(Some(0x52));
        }
        if self.matches(0x36, b"FAT")? || self.matches(0x36, b"MSDOS")? {
            return Ok(Some(0x36));
        }
        Ok(None)
    }

    /// libblkid superblocks/swap.c: "SWAPSPACE2" (v1) or "SWAP-SPACE" (v0)
    /// in the last 10 bytes of the first page, for page sizes 4, 8, 16, 32
    /// and 64 KiB; hibernation images ("S1SUSPEND", "S2SUSPEND",
    /// "ULSUSPEND", "LINHIB0001") at the same places, and the TuxOnIce
    /// magic at 0.
    fn swap(&mut self) -> io::Result<()> {
        const MAGICS: [(&[u8], &str); 6] = [
            (b"SWAPSPACE2", "swap (v1)"),
            (b"SWAP-SPACE", "swap (v0)"),
            (b"S1SUSPEND", "hibernation image (S1SUSPEND) in swap"),
            (b"S2SUSPEND", "hibernation image (S2SUSPEND) in swap"),
            (b"ULSUSPEND", "hibernation image (ULSUSPEND) in swap"),
            (b"LINHIB0001", "hibernation image (LINHIB0001) in swap"),
        ];
        for page in [4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB] {
            let off = page - 10;
            for (magic, what) in MAGICS {
                if self.matches(off, magic)? {
                    self.add(
                        SignatureKind::Swap,
                        off,
                        format!("{what}, page size {page}"),
                    );
                }
            }
        }
        if self.matches(0, b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c")? {
            self.add(SignatureKind::Swap, 0, "TuxOnIce hibernation image");
        }
        Ok(())
    }

    /// libblkid superblocks/lvm.c: label header "LABELONE" at the start of
    /// one of the first four 512-byte sectors, with the type "LVM2 001" 24
    /// bytes into it (the reported offset, as wipefs shows it).
    fn lvm2(&mut self) -> io::Result<()> {
        for sector in 0..4u64 {
            let label = sector * 512;
            if self.matches(label, b"LABELONE")? && self.matches(label + 24, b"LVM2 001")? {
                self.add(
                    SignatureKind::Lvm2,
                    label + 24,
                    format!("LVM2 physical volume label in sector {sector}"),
                );
            }
        }
        Ok(())
    }

    /// libblkid superblocks/linux_raid.c: MD superblock magic 0xa92b4efc.
    /// Version 1 superblocks are little-endian: 1.1 at 0, 1.2 at 4 KiB,
    /// 1.0 at `((sectors - 16) & !7) * 512` (mdadm's formula; libblkid's
    /// `(size & !0xfff) - 0x2000` is the same offset). Version 0.90 is in
    /// the host's byte order (either is accepted) at
    /// `(size & !0xffff) - 0x10000`, on devices larger than 64 KiB.
    fn md(&mut self) -> io::Result<()> {
        const MAGIC: u32 = 0xa92b_4efc;
        let mut v1 = vec![(0u64, "1.1"), (0x1000, "1.2")];
        if let Some(sectors) = (self.size / 512).checked_sub(16) {
            v1.push(((sectors & !7) * 512, "1.0"));
        }
        for (off, layout) in v1 {
            if self.has(SignatureKind::Md, off) || self.u32_le(off)? != Some(MAGIC) {
                continue;
            }
            let major = self.u32_le(off + 4)?.unwrap_or(0);
            self.add(
                SignatureKind::Md,
                off,
                format!("Linux MD superblock at the v{layout} location (major_version {major})"),
            );
        }
        if self.size > 0x10000 {
            let off = (self.size & !0xffff) - 0x10000;
            if !self.has(SignatureKind::Md, off)
                && let Some(b) = self.array::<4>(off)?
            {
                let (le, be) = (u32::from_le_bytes(b), u32::from_be_bytes(b));
                if le == MAGIC || be == MAGIC {
                    let order = if le == MAGIC { "little" } else { "big" };
                    self.add(
                        SignatureKind::Md,
                        off,
                        format!("Linux MD superblock v0.90 ({order}-endian)"),
                    );
                }
            }
        }
        Ok(())
    }

    /// libblkid superblocks/bcache.c: the bcache magic at 4 KiB + 24.
    fn bcache(&mut self) -> io::Result<()> {
        const MAGIC: &[u8] = b"\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81";
        if self.matches(0x1018, MAGIC)? {
            self.add(
                SignatureKind::Bcache,
                0x1018,
                "bcache superblock (or an older bcachefs)",
            );
        }
        Ok(())
    }

    fn partition_tables(&mut self) -> io::Result<()> {
        self.mbr()?;
        self.gpt()
    }

    /// libblkid partitions/dos.c: 0x55AA at 510, not a FAT (or NTFS,
    /// exFAT) boot sector, every boot indicator 0x00 or 0x80, and at least
    /// one non-empty entry in the table at 446. A table with an entry of
    /// type 0xEE is GPT's protective MBR (libblkid then reports only the
    /// GPT; it is reported here too, since it can outlive both GPT
    /// headers).
    fn mbr(&mut self) -> io::Result<()> {
        if !self.matches(510, b"\x55\xaa")? {
            return Ok(());
        }
        let boot_fs = self
            .found
            .iter()
            .any(|s| s.kind == SignatureKind::Filesystem && matches!(s.offset, 3 | 0x36 | 0x52));
        if boot_fs {
            return Ok(());
        }
        let Some(table) = self.array::<64>(446)? else {
            return Ok(());
        };
        let entries: Vec<&[u8]> = table.chunks(16).collect();
        if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
            return Ok(());
        }
        let used: Vec<&&[u8]> = entries
            .iter()
            .filter(|e| e[4] != 0 && e[12..16] != [0, 0, 0, 0])
            .collect();
        if used.is_empty() {
            return Ok(());
        }
        let what = if used.iter().any(|e| e[4] == 0xEE) {
            "protective MBR (GPT disk)".to_string()
        } else {
            format!("MBR (dos) partition table, {} partition(s)", used.len())
        };
        self.add(SignatureKind::PartitionTable, 510, what);
        Ok(())
    }

    /// libblkid partitions/gpt.c: header signature "EFI PART" in LBA 1 (at
    /// 512 for 512-byte logical sectors, 4096 for 4 KiB ones) and the
    /// backup header in the last LBA. Both are checked independently, so
    /// a GPT whose primary header was wiped is still found. A primary
    /// header's AlternateLBA (u64 at 32) is followed too: after a device
    /// was grown the backup is no longer in the last sector.
    fn gpt(&mut self) -> io::Result<()> {
        const MAGIC: &[u8] = b"EFI PART";
        let mut alternates = Vec::new();
        for sector in [512u64, 4096] {
            if self.matches(sector, MAGIC)? {
                self.add(
                    SignatureKind::PartitionTable,
                    sector,
                    format!("GPT primary header ({sector}-byte sectors)"),
                );
                if let Some(alt) = self.u64_le(sector + 32)? {
                    alternates.push(alt.saturating_mul(sector));
                }
            }
        }
        for sector in [512u64, 4096] {
            let lba = self.size / sector;
            if lba < 2 {
                continue;
            }
            let off = (lba - 1) * sector;
            if !self.has(SignatureKind::PartitionTable, off) && self.matches(off, MAGIC)? {
                self.add(
                    SignatureKind::PartitionTable,
                    off,
                    format!("GPT backup header (last {sector}-byte sector)"),
                );
            }
        }
        // Follow at most one AlternateLBA, which keeps the reads bounded.
        let displaced = alternates
            .into_iter()
            .find(|&off| off > 4096 && !self.has(SignatureKind::PartitionTable, off));
        if let Some(off) = displaced
            && self.matches(off, MAGIC)?
        {
            self.add(
                SignatureKind::PartitionTable,
                off,
                "GPT backup header at the primary header's AlternateLBA, \
                     not at the end of the device (was the device grown?)",
            );
        }
        Ok(())
    }

    /// The first non-zero byte in the first or last 64 KiB. Both were read
    /// up front, so this reads nothing more.
    fn non_zero(&mut self) -> io::Result<()> {
        let size = self.size;
        let watched = |at: u64| at < ZERO_CHECK || at >= size.saturating_sub(ZERO_CHECK);
        let first = self
            .windows
            .iter()
            .filter_map(|(start, data)| {
                data.iter()
                    .enumerate()
                    .map(|(i, &b)| (start + i as u64, b))
                    .find(|&(at, b)| b != 0 && watched(at))
                    .map(|(at, _)| at)
            })
            .min();
        if let Some(at) = first {
            let place = if at < ZERO_CHECK { "first" } else { "last" };
            self.add(
                SignatureKind::NonZeroHead,
                at,
                format!("no known signature, but the {place} 64 KiB are not all zero"),
            );
        }
        Ok(())
    }
}

/// bcachefs superblock magic (libblkid superblocks/bcache.c).
const BCACHEFS_MAGIC: &[u8] = b"\xc6\x85\x73\xf6\x66\xce\x90\xa9\xd9\x6a\x60\xcf\x80\x3d\xf7\xef";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::disk::MemDisk;
    use std::cell::Cell;

    /// A device of `size` zero bytes with `patches` written into it.
    fn disk(size: usize, patches: &[(u64, &[u8])]) -> MemDisk {
        let mut bytes = vec![0u8; size];
        for (off, data) in patches {
            let off = *off as usize;
            bytes[off..off + data.len()].copy_from_slice(data);
        }
        MemDisk::new("test", bytes)
    }

    fn kinds(sigs: &[Signature]) -> Vec<(SignatureKind, u64)> {
        sigs.iter().map(|s| (s.kind, s.offset)).collect()
    }

    /// Counts the bytes read through it.
    struct Counting<'a> {
        inner: &'a dyn Disk,
        read: Cell<u64>,
        largest: Cell<u64>,
    }

    impl Disk for Counting<'_> {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size(&self) -> io::Result<u64> {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.set(self.read.get() + buf.len() as u64);
            self.largest.set(self.largest.get().max(buf.len() as u64));
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            unreachable!("probing never writes")
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn zeroed_device_is_blank() {
        for size in [0, 1, 511, 512, 4096, 65536, 70000, 8 * MIB + 7] {
            let sigs = probe(&disk(size, &[])).unwrap();
            assert!(is_blank(&sigs), "size {size}: {sigs:?}");
        }
    }

    #[test]
    fn reads_stay_small_on_a_large_device() {
        // A GPT primary header whose AlternateLBA points into the middle:
        // every optional read happens.
        let mut hdr = b"EFI PART".to_vec();
        hdr.resize(40, 0);
        hdr[32..40].copy_from_slice(&(8192u64 * 2 + 1).to_le_bytes());
        let inner = disk(
            64 * MIB + 4096 + 1000,
            &[(512, &hdr), (16385 * 512, b"EFI PART")],
        );
        let counting = Counting {
            inner: &inner,
            read: Cell::new(0),
            largest: Cell::new(0),
        };
        let sigs = probe(&counting).unwrap();
        assert!(sigs.iter().any(|s| s.offset == 16385 * 512), "{sigs:?}");
        assert!(counting.read.get() <= MAX_READ_BYTES);
        assert!(counting.largest.get() <= HEAD_READ);
    }

    #[test]
    fn luks_headers() {
        let mut v1 = b"LUKS\xba\xbe\x00\x01".to_vec();
        v1.resize(16, b'x');
        let sigs = probe(&disk(2 * MIB, &[(0, &v1)])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Luks1, 0)]);
        assert!(!is_blank(&sigs));

        let mut hdr2 = b"SKUL\xba\xbe\x00\x02".to_vec();
        hdr2.resize(264, 0);
        for off in [
            0x4000u64, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
        ] {
            hdr2[256..264].copy_from_slice(&off.to_be_bytes());
            let sigs = probe(&disk(
                8 * MIB,
                &[(0, b"LUKS\xba\xbe\x00\x02"), (off, &hdr2)],
            ))
            .unwrap();
            assert_eq!(
                kinds(&sigs),
                [
                    (SignatureKind::Luks2Primary, 0),
                    (SignatureKind::Luks2Secondary, off)
                ]
            );
            // Primary wiped: still found through the secondary.
            let sigs = probe(&disk(8 * MIB, &[(off, &hdr2)])).unwrap();
            assert_eq!(kinds(&sigs), [(SignatureKind::Luks2Secondary, off)]);
            assert!(sigs[0].what.contains("version 2"), "{sigs:?}");
        }
        // A secondary header beyond the end of a small device is skipped.
        let sigs = probe(&disk(0x4000 + 100, &[(0x4000, b"SKUL\xba\xbe")])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Luks2Secondary, 0x4000)]);
        assert!(sigs[0].what.contains("does not match"));
    }

    #[test]
    fn filesystem_magics() {
        /// Bytes to write, where the magic is, the name reported.
        type Case = (&'static [(u64, &'static [u8])], u64, &'static str);
        let cases: [Case; 10] = [
            (&[(0x438, b"\x53\xef")], 0x438, "ext2"),
            (&[(0x438, b"\x53\xef"), (0x45C, b"\x04")], 0x438, "ext3"),
            (
                &[(0x438, b"\x53\xef"), (0x45C, b"\x04"), (0x460, b"\x42\x02")],
                0x438,
                "ext4",
            ),
            (&[(0, b"XFSB")], 0, "xfs"),
            (&[(0x10040, b"_BHRfS_M")], 0x10040, "btrfs"),
            (&[(3, b"NTFS    ")], 3, "ntfs"),
            (&[(3, b"EXFAT   ")], 3, "exfat"),
            (&[(0x8001, b"CD001")], 0x8001, "iso9660"),
            (&[(0, b"hsqs")], 0, "squashfs"),
            (&[(0x400, b"\x10\x20\xf5\xf2")], 0x400, "f2fs"),
        ];
        for (patches, off, name) in cases {
            let sigs = probe(&disk(MIB, patches)).unwrap();
            assert_eq!(kinds(&sigs), [(SignatureKind::Filesystem, off)], "{name}");
            assert_eq!(sigs[0].what, name);
        }
        let sigs = probe(&disk(MIB, &[(0x1018, BCACHEFS_MAGIC)])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Filesystem, 0x1018)]);
    }

    /// A FAT boot sector with a fake partition table spanning the whole
    /// device where an MBR keeps its table (as `mkfs.vfat --mbr=y` writes).
    fn fat_boot_sector(fat32: bool) -> Vec<u8> {
        let mut s = mbr(&[0x0c]);
        s[0..3].copy_from_slice(b"\xeb\x58\x90");
        if fat32 {
            s[0x52..0x5a].copy_from_slice(b"FAT32   ");
        } else {
            s[0x36..0x3e].copy_from_slice(b"FAT16   ");
        }
        s
    }

    fn mbr(types: &[u8]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        for (i, &t) in types.iter().enumerate() {
            let e = 446 + 16 * i;
            s[e + 4] = t;
            s[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
            s[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
        }
        s[510..512].copy_from_slice(b"\x55\xaa");
        s
    }

    #[test]
    fn fat_is_not_an_mbr() {
        let sigs = probe(&disk(MIB, &[(0, &fat_boot_sector(true))])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Filesystem, 0x52)]);
        let sigs = probe(&disk(MIB, &[(0, &fat_boot_sector(false))])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Filesystem, 0x36)]);
    }

    #[test]
    fn mbr_needs_a_used_entry() {
        let sigs = probe(&disk(MIB, &[(0, &mbr(&[0x83]))])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::PartitionTable, 510)]);
        let sigs = probe(&disk(MIB, &[(0, &mbr(&[0xEE]))])).unwrap();
        assert!(sigs[0].what.contains("protective"));
        // Empty table: not a partition table, but not blank either.
        let sigs = probe(&disk(MIB, &[(0, &mbr(&[]))])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::NonZeroHead, 510)]);
        // Bad boot indicator.
        let mut bad = mbr(&[0x83]);
        bad[446] = 0x12;
        let sigs = probe(&disk(MIB, &[(0, &bad)])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::NonZeroHead, 446)]);
    }

    #[test]
    fn gpt_primary_and_backup() {
        let size = 4 * MIB;
        let last = (size - 512) as u64;
        let sigs = probe(&disk(size, &[(512, b"EFI PART"), (last, b"EFI PART")])).unwrap();
        assert_eq!(
            kinds(&sigs),
            [
                (SignatureKind::PartitionTable, 512),
                (SignatureKind::PartitionTable, last)
            ]
        );
        let sigs = probe(&disk(size, &[(last, b"EFI PART")])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::PartitionTable, last)]);
        // 4 KiB logical sectors.
        let last4k = (size - 4096) as u64;
        let sigs = probe(&disk(size, &[(4096, b"EFI PART"), (last4k, b"EFI PART")])).unwrap();
        assert_eq!(
            kinds(&sigs),
            [
                (SignatureKind::PartitionTable, 4096),
                (SignatureKind::PartitionTable, last4k)
            ]
        );
    }

    #[test]
    fn swap_at_every_page_size() {
        for page in [4096u64, 8192, 16384, 32768, 65536] {
            let sigs = probe(&disk(MIB, &[(page - 10, b"SWAPSPACE2")])).unwrap();
            assert_eq!(kinds(&sigs), [(SignatureKind::Swap, page - 10)]);
        }
        let sigs = probe(&disk(MIB, &[(4086, b"SWAP-SPACE")])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Swap, 4086)]);
    }

    #[test]
    fn lvm2_label_in_any_of_four_sectors() {
        for sector in 0..4u64 {
            let label = sector * 512;
            let sigs = probe(&disk(
                MIB,
                &[(label, b"LABELONE"), (label + 24, b"LVM2 001")],
            ))
            .unwrap();
            assert_eq!(kinds(&sigs), [(SignatureKind::Lvm2, label + 24)]);
        }
        // LABELONE alone is not an LVM2 label (but is not blank).
        let sigs = probe(&disk(MIB, &[(512, b"LABELONE")])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::NonZeroHead, 512)]);
    }

    #[test]
    fn md_superblocks() {
        let magic = 0xa92b_4efcu32.to_le_bytes();
        let size = 10 * MIB as u64 + 3 * 512;
        let v10 = ((size / 512 - 16) & !7) * 512;
        let v090 = (size & !0xffff) - 0x10000;
        for off in [0, 0x1000, v10, v090] {
            let sigs = probe(&disk(size as usize, &[(off, &magic)])).unwrap();
            assert_eq!(kinds(&sigs), [(SignatureKind::Md, off)], "at {off:#x}");
        }
        let be = 0xa92b_4efcu32.to_be_bytes();
        let sigs = probe(&disk(size as usize, &[(v090, &be)])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Md, v090)]);
        assert!(sigs[0].what.contains("big-endian"));
        // Tiny devices: the end-of-device locations collide with the start.
        let sigs = probe(&disk(70000, &[(0, &magic)])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Md, 0)]);
    }

    #[test]
    fn bcache_superblock() {
        let magic = b"\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81";
        let sigs = probe(&disk(MIB, &[(0x1018, magic)])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::Bcache, 0x1018)]);
    }

    #[test]
    fn non_zero_head_and_tail() {
        let sigs = probe(&disk(MIB, &[(777, b"\x01")])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::NonZeroHead, 777)]);
        let at = (MIB - 3) as u64;
        let sigs = probe(&disk(MIB, &[(at, b"\x01")])).unwrap();
        assert_eq!(kinds(&sigs), [(SignatureKind::NonZeroHead, at)]);
        assert!(sigs[0].what.contains("last"));
        // Between the head and the tail nobody looks.
        let sigs = probe(&disk(MIB, &[(300_000, b"\x01")])).unwrap();
        assert!(is_blank(&sigs));
        // Beyond 64 KiB but inside the 68 KiB read: still not checked for
        // non-zero data.
        let sigs = probe(&disk(MIB, &[(66_000, b"\x01")])).unwrap();
        assert!(is_blank(&sigs));
    }

    #[test]
    fn every_signature_is_reported() {
        // Nonsense, but a guard must list everything it sees.
        let mut v1 = b"LUKS\xba\xbe\x00\x01".to_vec();
        v1.resize(8, 0);
        let sigs = probe(&disk(
            MIB,
            &[
                (0, &v1),
                (0x438, b"\x53\xef"),
                (4086, b"SWAPSPACE2"),
                (0x10040, b"_BHRfS_M"),
            ],
        ))
        .unwrap();
        assert_eq!(
            kinds(&sigs),
            [
                (SignatureKind::Luks1, 0),
                (SignatureKind::Filesystem, 0x438),
                (SignatureKind::Swap, 4086),
                (SignatureKind::Filesystem, 0x10040)
            ]
        );
        let shown = sigs[0].to_string();
        assert_eq!(shown, "LUKS1 at offset 0x0: LUKS1 header");
    }
}

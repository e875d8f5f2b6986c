//! The first-use format guard's signature probe on arbitrary device
//! contents: it must never panic, must read no more than
//! `probe::MAX_READ_BYTES`, must report only offsets on the device, sorted,
//! and must never call a device blank whose first or last 64 KiB hold a
//! non-zero byte (a blank device is the one the guard may format).
//!
//! The same device then goes through the check that lets another host redo
//! an interrupted format (`Inspection::foreign_to_format`), with the UUID
//! of the LUKS header magic at offset 0 as the format intent's: it must
//! never pass a device that holds a signature other than our LUKS headers,
//! or non-zero bytes in the first MiB of the data segment or in the last
//! 64 KiB past the header area.
//!
//! The input is:
//!
//! - byte 0: bits 0-1, the device size: 0 exactly the head and tail, 1 the
//!   16 MiB + 4 KiB of `PADDED_DISK` (room for every LUKS2 secondary header
//!   offset), 2 the little-endian 40-bit value of bytes 1..6 (a device of
//!   up to a TiB, for GPT backup and MD 0.90 offsets taken from the end),
//!   3 the same plus 8 TiB; bits 2-3, the data offset of the interrupted
//!   format: 1, 2, 4 or 16 MiB;
//! - bytes 6..9, the head length (24 bits, little endian; clamped);
//! - then the head (at offset 0) and the tail (ending at the device's end).

#![no_main]

use libfuzzer_sys::fuzz_target;
use luks_agent::blockdev::probe::SignatureKind;
use luks_agent::blockdev::probe::{self, MAX_READ_BYTES};
use luks_agent::luks::Disk;
use luks_agent::volume::guard::{DATA_HEAD_CHECK, Inspection, raw_header_uuid};
use luks_agent_fuzz::{PADDED_DISK, PaddedDisk};
use uuid::Uuid;

/// Bytes at each end that a blank device must have all zero.
const ZERO_CHECK: u64 = 64 * 1024;
/// Data offsets of the interrupted format the redo check is asked about.
const DATA_OFFSETS: [u64; 4] = [1 << 20, 2 << 20, 4 << 20, 16 << 20];

/// The UUID in the raw UUID field of a LUKS header at 0 (valid or torn),
/// or a fixed one when there is none.
fn header_uuid(disk: &dyn Disk) -> Uuid {
    raw_header_uuid(disk, 0)
        .expect("the fuzz device reads without errors")
        .and_then(|t| Uuid::try_parse(&t).ok())
        .unwrap_or(Uuid::from_u128(0x0f4e_2c1a))
}

fn all_zero(disk: &dyn Disk, offset: u64, len: u64) -> bool {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, offset)
        .expect("reading the fuzz device");
    buf.iter().all(|&b| b == 0)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let mut size40 = [0u8; 8];
    size40[..5].copy_from_slice(&data[1..6]);
    let head_len = u32::from_le_bytes([data[6], data[7], data[8], 0]) as usize;
    let body = &data[9..];
    let (head, tail) = body.split_at(head_len.min(body.len()));
    let data_offset = DATA_OFFSETS[usize::from(data[0] >> 2) % 4];
    let size = match data[0] % 4 {
        0 => 0,
        1 => PADDED_DISK,
        2 => u64::from_le_bytes(size40),
        _ => u64::from_le_bytes(size40) + (8 << 40),
    };
    let disk = PaddedDisk::with_tail(head, tail, size);
    let size = disk.size().expect("size");

    let sigs = probe::probe(&disk).expect("the fuzz device reads without errors");
    assert!(
        disk.bytes_read() <= MAX_READ_BYTES,
        "probe read {} bytes of a {size}-byte device, more than {MAX_READ_BYTES}",
        disk.bytes_read()
    );
    assert!(
        sigs.windows(2).all(|w| w[0].offset <= w[1].offset),
        "signatures not sorted: {sigs:?}"
    );
    for s in &sigs {
        assert!(s.offset < size, "{s} lies beyond the {size}-byte device");
        assert!(!s.what.is_empty(), "{s:?} says nothing");
    }
    if probe::is_blank(&sigs) {
        let n = ZERO_CHECK.min(size);
        assert!(
            all_zero(&disk, 0, n) && all_zero(&disk, size - n, n),
            "a device with non-zero bytes in its first or last 64 KiB was called blank"
        );
    }

    // The redo check reads the device again; only its verdict matters.
    let inspection = Inspection { signatures: sigs };
    let verdict = inspection
        .foreign_to_format(&disk, &header_uuid(&disk), data_offset)
        .expect("the fuzz device reads without errors");
    if verdict.is_none() {
        for s in &inspection.signatures {
            assert!(
                matches!(
                    s.kind,
                    SignatureKind::Luks1
                        | SignatureKind::Luks2Primary
                        | SignatureKind::Luks2Secondary
                        | SignatureKind::NonZeroHead
                ),
                "redo allowed over {s}"
            );
        }
        let head_end = data_offset.saturating_add(DATA_HEAD_CHECK).min(size);
        let tail_start = size.saturating_sub(ZERO_CHECK).max(data_offset);
        assert!(
            data_offset >= size || all_zero(&disk, data_offset, head_end - data_offset),
            "redo allowed over data at the start of the data segment"
        );
        assert!(
            tail_start >= size || all_zero(&disk, tail_start, size - tail_start),
            "redo allowed over data at the end of the device"
        );
    }
});

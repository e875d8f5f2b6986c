//! The first-use format guard's signature probe on arbitrary device
//! contents: it must never panic, must read no more than
//! `probe::MAX_READ_BYTES`, must report only offsets on the device, sorted,
//! and must never call a device blank whose first or last 64 KiB hold a
//! non-zero byte (a blank device is the one the guard may format).
//!
//! The input is:
//!
//! - byte 0, the device size: `% 4` = 0 exactly the head and tail, 1 the
//!   16 MiB + 4 KiB of `PADDED_DISK` (room for every LUKS2 secondary header
//!   offset), 2 the little-endian 40-bit value of bytes 1..6 (a device of
//!   up to a TiB, for GPT backup and MD 0.90 offsets taken from the end),
//!   3 the same plus 8 TiB;
//! - bytes 6..9, the head length (24 bits, little endian; clamped);
//! - then the head (at offset 0) and the tail (ending at the device's end).

#![no_main]

use libfuzzer_sys::fuzz_target;
use luks_agent::blockdev::probe::{self, MAX_READ_BYTES};
use luks_agent::luks::Disk;
use luks_agent_fuzz::{PADDED_DISK, PaddedDisk};

/// Bytes at each end that a blank device must have all zero.
const ZERO_CHECK: u64 = 64 * 1024;

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
});

//! `Header::read` on arbitrary device contents must never panic, and every
//! header it accepts must render as JSON and text.
//!
//! The input (at most 64 KiB) is the start of the device. Each input is
//! read three ways: as a `MemDisk` exactly as long as the input (short
//! device paths); as the start of a 16 MiB device of zeros (room for every
//! LUKS2 secondary header offset and for LUKS1 keyslot areas); and, when it
//! carries a LUKS2 magic at 0 or at a secondary header offset, as that
//! padded device with every LUKS2 header checksum recomputed, so that
//! mutations get past the checksum into the JSON metadata validation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use luks_agent::luks::{Disk, Header, MemDisk};
use luks_agent_fuzz::{
    MAX_INPUT, PADDED_DISK, PaddedDisk, fix_luks2_checksums, has_luks2_magic, render,
};

fn parse(disk: &dyn Disk) {
    if let Ok(h) = Header::read(disk) {
        render(&h);
    }
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_INPUT)];
    parse(&MemDisk::new("fuzz", data.to_vec()));
    parse(&PaddedDisk::new(data, PADDED_DISK));
    if has_luks2_magic(data) {
        let mut fixed = data.to_vec();
        if fix_luks2_checksums(&mut fixed, PADDED_DISK) > 0 {
            parse(&PaddedDisk::new(&fixed, PADDED_DISK));
        }
    }
});

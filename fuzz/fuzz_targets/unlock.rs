//! Unlocking a damaged header must never panic, never accept a wrong
//! passphrase, and never return anything but the real volume key.
//!
//! Reference images (LUKS1, LUKS1 serpent-cbc-essiv with whirlpool, LUKS2
//! with a pbkdf2 keyslot, LUKS2 with an Argon2id keyslot; passphrase
//! `fuzz-passphrase`) are formatted once per process. The input is:
//!
//! - byte 0, flags: `flags % 4` picks the image; bit 2 set recomputes the
//!   LUKS2 header checksums after mutating (otherwise most LUKS2 mutations
//!   stop at the checksum); `flags >> 4` picks the keyslot argument
//!   (0 or above 9: any slot, 1..=9: slot 0..=8);
//! - then records of 3 bytes, `offset` (u16, little endian) and `value`:
//!   the byte at `offset` of the first 64 KiB (header, JSON metadata and
//!   start of the keyslot area) of a copy of the image is set to `value`.
//!
//! The mutated copy is read and unlocked with the right and with a wrong
//! passphrase, under small KDF limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use luks_agent::luks::{Header, MemDisk};
use luks_agent::secret::Passphrase;
use luks_agent_fuzz::{
    LIMITS, PASSPHRASE, WRONG_PASSPHRASE, fix_luks2_checksums, reference_images, render,
};

fuzz_target!(|data: &[u8]| {
    let images = reference_images();
    let Some((&flags, mutations)) = data.split_first() else {
        return;
    };
    let image = &images[usize::from(flags) % images.len()];
    let only_slot = match flags >> 4 {
        s @ 1..=9 => Some(u32::from(s) - 1),
        _ => None,
    };
    let mut bytes = image.bytes.clone();
    for m in mutations.chunks_exact(3) {
        let offset = usize::from(u16::from_le_bytes([m[0], m[1]]));
        bytes[offset] = m[2];
    }
    if flags & 4 != 0 {
        let size = bytes.len() as u64;
        fix_luks2_checksums(&mut bytes, size);
    }
    let disk = MemDisk::new(image.name, bytes);
    let Ok(header) = Header::read(&disk) else {
        return;
    };
    render(&header);

    let wrong = header.unlock(
        &disk,
        &Passphrase::from_slice(WRONG_PASSPHRASE),
        only_slot,
        &LIMITS,
    );
    if let Ok(u) = wrong {
        panic!(
            "{}: a wrong passphrase unlocked keyslot {} (only_slot {only_slot:?})",
            image.name, u.keyslot
        );
    }

    if let Ok(u) = header.unlock(
        &disk,
        &Passphrase::from_slice(PASSPHRASE),
        only_slot,
        &LIMITS,
    ) {
        assert!(
            u.volume_key.expose() == image.volume_key.as_slice(),
            "{}: keyslot {} returned a key that is not the volume key ({} bytes, expected {})",
            image.name,
            u.keyslot,
            u.volume_key.len(),
            image.volume_key.len()
        );
    }
});

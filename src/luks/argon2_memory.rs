//! Argon2's working memory as an anonymous mapping instead of the heap.
//!
//! Left to itself, the argon2 crate allocates its blocks with
//! `alloc_zeroed`, which for 64-byte-aligned blocks is an aligned `malloc`
//! followed by a `memset`: every page of tens or hundreds of MiB is faulted
//! in, one 4 KiB page at a time, before the first block is computed (a
//! fifth of an argon2id unlock on the host, more in a guest without
//! hardware virtualisation, where every fault is expensive). A fresh
//! anonymous mapping is already zeros, page-aligned, and can ask for
//! transparent huge pages, so the kernel faults it in 2 MiB at a time
//! where it allows (Debian's default THP mode, `madvise`, does).
//!
//! The blocks are derived from the passphrase, so the memory is wiped
//! before it is unmapped, as cryptsetup's libargon2 does.

use std::ffi::c_void;
use std::ptr::NonNull;

use argon2::Block;

/// Huge-page size on x86-64 and aarch64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// `blocks` Argon2 blocks in their own mapping, wiped and unmapped on drop.
pub struct Argon2Memory {
    /// The whole mapping (what `munmap` takes).
    map: NonNull<c_void>,
    map_len: usize,
    /// Where the blocks start: the first huge-page boundary in the mapping.
    start: NonNull<Block>,
    blocks: usize,
}

// SAFETY: the mapping is owned exclusively by this value (like a Box), and
// only reachable through `&mut self`.
unsafe impl Send for Argon2Memory {}

impl Argon2Memory {
    /// Maps memory for `blocks` blocks.
    pub fn new(blocks: usize) -> std::io::Result<Argon2Memory> {
        let too_large = || std::io::Error::from(std::io::ErrorKind::OutOfMemory);
        let len = blocks.checked_mul(Block::SIZE).ok_or_else(too_large)?;
        // One huge page more than needed, so the blocks can start on a
        // huge-page boundary: only aligned 2 MiB ranges get huge pages.
        let map_len = len
            .checked_add(HUGE_PAGE)
            .filter(|_| len > 0)
            .ok_or_else(too_large)?;
        // SAFETY: a new private anonymous mapping at an address the kernel
        // chooses aliases nothing in this process.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = NonNull::new(raw).ok_or_else(too_large)?;
        let skip = (HUGE_PAGE - (raw as usize % HUGE_PAGE)) % HUGE_PAGE;
        // SAFETY: `skip < HUGE_PAGE`, so the blocks (`len` bytes from
        // there) lie inside the `len + HUGE_PAGE` bytes mapped; the address
        // is page-aligned, hence aligned for `Block` (64 bytes).
        let start = unsafe { NonNull::new_unchecked(raw.cast::<u8>().add(skip).cast::<Block>()) };
        // SAFETY: advice about our own mapping; it changes no contents.
        // Huge pages only speed things up, so a refusal (a kernel without
        // THP) is ignored.
        unsafe {
            libc::madvise(start.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
        }
        Ok(Argon2Memory {
            map,
            map_len,
            start,
            blocks,
        })
    }
}

impl AsMut<[Block]> for Argon2Memory {
    fn as_mut(&mut self) -> &mut [Block] {
        // SAFETY: `start` points at `blocks * Block::SIZE` mapped, readable
        // and writable bytes, aligned for `Block`, owned by `self` and
        // borrowed mutably here; any bytes are a valid `Block` (it is
        // `[u64; 128]`), and a fresh mapping reads as zeros.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.blocks) }
    }
}

impl Drop for Argon2Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, `map_len` bytes, writable, and
        // unmapped exactly once, here; `explicit_bzero` is a `memset` the
        // compiler may not remove.
        unsafe {
            libc::explicit_bzero(self.map.as_ptr(), self.map_len);
            libc::munmap(self.map.as_ptr(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_zeroed_aligned_and_writable() {
        let mut m = Argon2Memory::new(3000).unwrap();
        let blocks = m.as_mut();
        assert_eq!(blocks.len(), 3000);
        assert_eq!(blocks.as_ptr() as usize % HUGE_PAGE, 0);
        let bytes = Block::SIZE * blocks.len();
        // SAFETY: reading the blocks' own bytes.
        let raw = unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), bytes) };
        assert!(raw.iter().all(|&b| b == 0));
        blocks[2999] = Block::default();
    }

    #[test]
    fn argon2_with_this_memory_matches_its_own_allocation() {
        let params = argon2::Params::new(8 * 1024, 2, 1, Some(32)).unwrap();
        let a2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut own = [0u8; 32];
        a2.hash_password_into(b"password", b"somesaltsomesalt", &mut own)
            .unwrap();
        let mut mem = Argon2Memory::new(a2.params().block_count()).unwrap();
        let mut ours = [0u8; 32];
        a2.hash_password_into_with_memory(b"password", b"somesaltsomesalt", &mut ours, &mut mem)
            .unwrap();
        assert_eq!(own, ours);
    }

    #[test]
    fn no_memory_is_an_error_not_a_panic() {
        assert!(Argon2Memory::new(0).is_err());
        assert!(Argon2Memory::new(usize::MAX / 512).is_err());
    }
}

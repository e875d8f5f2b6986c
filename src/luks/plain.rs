//! cryptsetup's plain mode (no header): the volume key is derived from the
//! passphrase the way `cryptsetup create` does when, as in os-brick, the
//! passphrase arrives on stdin: RIPEMD-160 in the "hashalot" construction,
//! `H(p) || H("A" || p) || H("AA" || p) ...` truncated to the key size.

use ripemd::{Digest, Ripemd160};

use crate::secret::{SecretBytes, VolumeKey};

/// The plain-mode volume key of `key_bytes` bytes for `passphrase`.
pub fn plain_key(passphrase: &[u8], key_bytes: usize) -> VolumeKey {
    let mut key = SecretBytes::zeroed(key_bytes);
    let mut filled = 0;
    let mut round = 0usize;
    while filled < key_bytes {
        let mut h = Ripemd160::new();
        h.update(vec![b'A'; round]);
        h.update(passphrase);
        let block = h.finalize();
        let n = block.len().min(key_bytes - filled);
        key.expose_mut()[filled..filled + n].copy_from_slice(&block[..n]);
        filled += n;
        round += 1;
    }
    VolumeKey::new(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cryptsetup_create_with_stdin_key() {
        // `printf %s P | cryptsetup create --key-file=- --cipher
        // aes-xts-plain64 --key-size 256` then `dmsetup table --showkeys`,
        // run once in the VM tier's guest.
        let p = b"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        assert_eq!(
            hex::encode(plain_key(p, 32).expose()),
            "543317950f1817f3fc5152532a196b15d5e426136cd2393a8710011f6844a477"
        );
    }
}

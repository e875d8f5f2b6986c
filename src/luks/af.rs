//! The anti-forensic splitter of the LUKS specification: a key is stored as
//! `stripes` blocks so that destroying any part of the area destroys the key.

use super::hash::HashAlg;
use crate::secret::SecretBytes;

/// Diffuses `block` in place: every `digest_len` chunk `i` becomes
/// `H(be32(i) || chunk)`, the last partial chunk truncated (LUKS spec 2.4).
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let ds = hash.output_len();
    let mut tmp = [0u8; 64];
    for (i, chunk) in block.chunks_mut(ds).enumerate() {
        let iv = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        hash.digest_into(&[&iv, chunk], &mut tmp[..chunk.len()]);
        chunk.copy_from_slice(&tmp[..chunk.len()]);
    }
    tmp.iter_mut().for_each(|b| *b = 0);
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, o) in acc.iter_mut().zip(other) {
        *a ^= o;
    }
}

/// Recovers the key of `key_len` bytes from `material` (`key_len * stripes`
/// bytes).
pub fn merge(material: &[u8], key_len: usize, stripes: usize, hash: HashAlg) -> SecretBytes {
    let mut block = SecretBytes::zeroed(key_len);
    for stripe in material.chunks_exact(key_len).take(stripes - 1) {
        xor_into(block.expose_mut(), stripe);
        diffuse(hash, block.expose_mut());
    }
    let last = &material[(stripes - 1) * key_len..stripes * key_len];
    xor_into(block.expose_mut(), last);
    block
}

/// Splits `key` into `stripes` blocks, all but the last random.
pub fn split(key: &[u8], stripes: usize, hash: HashAlg) -> Result<SecretBytes, getrandom::Error> {
    let key_len = key.len();
    let mut material = SecretBytes::random(key_len * stripes)?;
    let mut block = SecretBytes::zeroed(key_len);
    for stripe in material.expose().chunks_exact(key_len).take(stripes - 1) {
        xor_into(block.expose_mut(), stripe);
        diffuse(hash, block.expose_mut());
    }
    xor_into(block.expose_mut(), key);
    material.expose_mut()[(stripes - 1) * key_len..].copy_from_slice(block.expose());
    Ok(material)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_returns_key() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for len in [16usize, 32, 64, 33] {
                let key: Vec<u8> = (0..len as u8).collect();
                let m = split(&key, 4000, hash).unwrap();
                assert_eq!(merge(m.expose(), len, 4000, hash).expose(), &key[..]);
                let mut damaged = m.clone();
                damaged.expose_mut()[len * 10] ^= 1;
                assert_ne!(merge(damaged.expose(), len, 4000, hash).expose(), &key[..]);
            }
        }
    }
}

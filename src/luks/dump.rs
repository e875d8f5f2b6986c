//! Human (cryptsetup luksDump style) and JSON renderings of a header.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Header, Kdf};

fn hex_spaced(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn kdf_json(kdf: &Kdf) -> Value {
    match *kdf {
        Kdf::Pbkdf2 { hash, iterations } => {
            json!({"type": "pbkdf2", "hash": hash.name(), "iterations": iterations})
        }
        Kdf::Argon2 {
            variant,
            time,
            memory_kib,
            parallel,
        } => {
            json!({"type": variant.name(), "time": time, "memory": memory_kib, "cpus": parallel})
        }
    }
}

/// A JSON summary (stable field names, documented in the README), plus the
/// raw LUKS2 metadata under `luks2_metadata`.
pub fn to_json(h: &Header) -> Value {
    let version = match h {
        Header::Luks1(_) => 1,
        Header::Luks2(_) => 2,
    };
    let keyslots: Vec<Value> = h
        .keyslots()
        .iter()
        .map(|k| {
            let bound = match h {
                Header::Luks1(_) => true,
                Header::Luks2(l2) => l2.is_bound(k.slot),
            };
            json!({
                "slot": k.slot,
                "kdf": kdf_json(&k.kdf),
                "key_bits": k.key_bits,
                "cipher": k.cipher,
                "area_offset": k.area_offset,
                "area_length": k.area_length,
                "priority": k.priority,
                "bound": bound,
            })
        })
        .collect();
    let mut out = json!({
        "version": version,
        "uuid": h.uuid(),
        "cipher": h.cipher(),
        "key_size_bits": h.key_bytes() * 8,
        "data_offset_bytes": h.data_offset(),
        "sector_size": h.sector_size(),
        "keyslots": keyslots,
        "tokens": [],
    });
    if let Header::Luks2(l2) = h {
        let tokens: Vec<Value> = l2
            .meta
            .tokens
            .iter()
            .map(|(id, t)| {
                let mut v = json!({"id": id, "type": t.kind, "keyslots": t.keyslots});
                if let Some(k) = &t.key_id {
                    v["key_id"] = json!(k);
                }
                v
            })
            .collect();
        out["tokens"] = json!(tokens);
        out["seqid"] = json!(l2.binary.seqid);
        out["metadata_size"] = json!(l2.binary.hdr_size);
        out["keyslots_size"] = json!(l2.meta.keyslots_size);
        out["luks2_metadata"] = l2.meta.doc.clone();
    }
    out
}

/// Text in the layout of `cryptsetup luksDump`.
pub fn to_text(h: &Header, device: &str) -> String {
    let mut s = String::new();
    match h {
        Header::Luks1(l1) => {
            let _ = writeln!(s, "LUKS header information for {device}\n");
            let _ = writeln!(s, "Version:       \t1");
            let _ = writeln!(s, "Cipher name:   \t{}", l1.cipher.cipher_name());
            let _ = writeln!(s, "Cipher mode:   \t{}", l1.cipher.mode_name());
            let _ = writeln!(s, "Hash spec:     \t{}", l1.hash.name());
            let _ = writeln!(s, "Payload offset:\t{}", l1.payload_offset);
            let _ = writeln!(s, "MK bits:       \t{}", l1.key_bytes * 8);
            let _ = writeln!(s, "MK digest:     \t{}", hex_spaced(&l1.mk_digest));
            let _ = writeln!(s, "MK salt:       \t{}", hex_spaced(&l1.mk_digest_salt));
            let _ = writeln!(s, "MK iterations: \t{}", l1.mk_digest_iter);
            let _ = writeln!(s, "UUID:          \t{}\n", l1.uuid);
            for (i, k) in l1.keyslots.iter().enumerate() {
                if k.active {
                    let _ = writeln!(s, "Key Slot {i}: ENABLED");
                    let _ = writeln!(s, "\tIterations:         \t{}", k.iterations);
                    let _ = writeln!(s, "\tSalt:               \t{}", hex_spaced(&k.salt));
                    let _ = writeln!(s, "\tKey material offset:\t{}", k.key_material_offset);
                    let _ = writeln!(s, "\tAF stripes:            \t{}", k.stripes);
                } else {
                    let _ = writeln!(s, "Key Slot {i}: DISABLED");
                }
            }
        }
        Header::Luks2(l2) => {
            let b = &l2.binary;
            let or = |v: &str, none: &str| {
                if v.is_empty() {
                    none.to_string()
                } else {
                    v.to_string()
                }
            };
            let _ = writeln!(s, "LUKS header information");
            let _ = writeln!(s, "Version:       \t2");
            let _ = writeln!(s, "Epoch:         \t{}", b.seqid);
            let _ = writeln!(s, "Metadata area: \t{} [bytes]", b.hdr_size);
            let _ = writeln!(s, "Keyslots area: \t{} [bytes]", l2.meta.keyslots_size);
            let _ = writeln!(s, "UUID:          \t{}", b.uuid);
            let _ = writeln!(s, "Label:         \t{}", or(&b.label, "(no label)"));
            let _ = writeln!(s, "Subsystem:     \t{}", or(&b.subsystem, "(no subsystem)"));
            let _ = writeln!(s, "\nData segments:");
            for (id, seg) in &l2.meta.segments {
                let _ = writeln!(s, "  {id}: crypt");
                let _ = writeln!(s, "\toffset: {} [bytes]", seg.offset);
                match seg.size {
                    Some(n) => {
                        let _ = writeln!(s, "\tlength: {n} [bytes]");
                    }
                    None => {
                        let _ = writeln!(s, "\tlength: (whole device)");
                    }
                }
                let _ = writeln!(s, "\tcipher: {}", seg.encryption);
                let _ = writeln!(s, "\tsector: {} [bytes]", seg.sector_size);
            }
            let _ = writeln!(s, "\nKeyslots:");
            for (id, k) in &l2.meta.keyslots {
                if l2.is_bound(*id) {
                    let _ = writeln!(s, "  {id}: luks2");
                } else {
                    let _ = writeln!(s, "  {id}: luks2 (unbound)");
                }
                let _ = writeln!(s, "\tKey:        {} bits", k.key_size * 8);
                let prio = ["ignored", "normal", "high"][usize::from(k.priority.min(2))];
                let _ = writeln!(s, "\tPriority:   {prio}");
                let _ = writeln!(s, "\tCipher:     {}", k.area_cipher.full_name());
                let _ = writeln!(s, "\tCipher key: {} bits", k.area_cipher.key_bytes * 8);
                match k.kdf {
                    Kdf::Pbkdf2 { hash, iterations } => {
                        let _ = writeln!(
                            s,
                            "\tPBKDF:      pbkdf2\n\tHash:       {}\n\tIterations: {iterations}",
                            hash.name()
                        );
                    }
                    Kdf::Argon2 {
                        variant,
                        time,
                        memory_kib,
                        parallel,
                    } => {
                        let _ = writeln!(
                            s,
                            "\tPBKDF:      {}\n\tTime cost:  {time}\n\tMemory:     {memory_kib}\n\tThreads:    {parallel}",
                            variant.name()
                        );
                    }
                }
                let _ = writeln!(s, "\tSalt:       {}", hex_spaced(&k.salt));
                let _ = writeln!(
                    s,
                    "\tAF stripes: {}\n\tAF hash:    {}",
                    k.stripes,
                    k.af_hash.name()
                );
                let _ = writeln!(
                    s,
                    "\tArea offset:{} [bytes]\n\tArea length:{} [bytes]",
                    k.area_offset, k.area_size
                );
                if let Some((d, _)) = l2.meta.digest_for(*id) {
                    let _ = writeln!(s, "\tDigest ID:  {d}");
                }
            }
            let _ = writeln!(s, "Tokens:");
            for (id, t) in &l2.meta.tokens {
                let _ = writeln!(s, "  {id}: {}", t.kind);
                if let Some(k) = &t.key_id {
                    let _ = writeln!(s, "\tKey ID:     {k}");
                }
                for slot in &t.keyslots {
                    let _ = writeln!(s, "\tKeyslot:    {slot}");
                }
            }
            let _ = writeln!(s, "Digests:");
            for (id, d) in &l2.meta.digests {
                let _ = writeln!(s, "  {id}: pbkdf2");
                let _ = writeln!(
                    s,
                    "\tHash:       {}\n\tIterations: {}",
                    d.hash.name(),
                    d.iterations
                );
                let _ = writeln!(s, "\tSalt:       {}", hex_spaced(&d.salt));
                let _ = writeln!(s, "\tDigest:     {}", hex_spaced(&d.digest));
            }
        }
    }
    s
}

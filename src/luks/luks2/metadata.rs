//! The LUKS2 JSON metadata: the document as stored (kept whole so that
//! fields and tokens written by other tools survive our edits) and the
//! validated typed view the engine acts on.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value};

use super::super::cipher::CipherSpec;
use super::super::cipher::SECTOR;
use super::super::hash::HashAlg;
use super::super::kdf::{Argon2Variant, Kdf};
use super::super::keyslot::{STRIPES, af_sectors};

/// Most keyslots a LUKS2 header may hold (cryptsetup's limit).
pub const MAX_KEYSLOTS: u32 = 32;
/// Most tokens a LUKS2 header may hold.
pub const MAX_TOKENS: u32 = 32;
/// Token type under which we record the key manager's key id.
pub const TOKEN_TYPE: &str = "luks-agent";

/// A keyslot of type `luks2`.
#[derive(Clone, Debug)]
pub struct Keyslot {
    /// Length of the key stored (the volume key).
    pub key_size: usize,
    /// AF hash.
    pub af_hash: HashAlg,
    /// AF stripes.
    pub stripes: usize,
    /// Area offset in bytes.
    pub area_offset: u64,
    /// Area size in bytes.
    pub area_size: u64,
    /// Area cipher.
    pub area_cipher: CipherSpec,
    /// KDF and its costs.
    pub kdf: Kdf,
    /// KDF salt.
    pub salt: Vec<u8>,
    /// 0 = ignore, 1 = normal, 2 = high.
    pub priority: u8,
}

/// A data segment of type `crypt`.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Data start in bytes.
    pub offset: u64,
    /// Length in bytes, `None` for `dynamic` (to the end of the device).
    pub size: Option<u64>,
    /// IV offset in sectors.
    pub iv_tweak: u64,
    /// Cipher specification string.
    pub encryption: String,
    /// Encryption sector size.
    pub sector_size: u32,
}

/// A `pbkdf2` digest.
#[derive(Clone, Debug)]
pub struct Digest {
    /// Keyslots whose key this digest verifies.
    pub keyslots: Vec<u32>,
    /// Segments using that key.
    pub segments: Vec<u32>,
    /// PBKDF2 hash.
    pub hash: HashAlg,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// Expected digest.
    pub digest: Vec<u8>,
}

/// A token of any type; `key_id` is read from our own type.
#[derive(Clone, Debug)]
pub struct Token {
    /// Token type.
    pub kind: String,
    /// Keyslots it refers to.
    pub keyslots: Vec<u32>,
    /// For `luks-agent` tokens: the key manager's key id.
    pub key_id: Option<String>,
}

/// The validated metadata.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// The document, as parsed (object order preserved).
    pub doc: Value,
    /// Keyslots by id.
    pub keyslots: BTreeMap<u32, Keyslot>,
    /// Segments by id.
    pub segments: BTreeMap<u32, Segment>,
    /// Digests by id.
    pub digests: BTreeMap<u32, Digest>,
    /// Tokens by id.
    pub tokens: BTreeMap<u32, Token>,
    /// `config.json_size`.
    pub json_size: u64,
    /// `config.keyslots_size`.
    pub keyslots_size: u64,
}

/// Why a document is not acceptable.
#[derive(Debug, PartialEq, Eq)]
pub enum MetadataError {
    /// Breaks the format rules.
    Invalid(String),
    /// Valid, but uses a feature we do not implement.
    Unsupported(String),
}

type Res<T> = Result<T, MetadataError>;

fn inv<T>(msg: impl Into<String>) -> Res<T> {
    Err(MetadataError::Invalid(msg.into()))
}

fn obj<'a>(v: &'a Value, key: &str, ctx: &str) -> Res<&'a Map<String, Value>> {
    match v.get(key) {
        Some(Value::Object(m)) => Ok(m),
        Some(_) => inv(format!("{ctx}.{key} is not an object")),
        None => inv(format!("{ctx}.{key} is missing")),
    }
}

fn string<'a>(v: &'a Value, key: &str, ctx: &str) -> Res<&'a str> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => inv(format!("{ctx}.{key} is not a string")),
        None => inv(format!("{ctx}.{key} is missing")),
    }
}

/// A 64-bit integer stored as a decimal string, as LUKS2 requires for
/// offsets and sizes (JSON numbers lose precision above 2^53).
fn u64_string(v: &Value, key: &str, ctx: &str) -> Res<u64> {
    let s = string(v, key, ctx)?;
    parse_u64_str(s).ok_or_else(|| {
        MetadataError::Invalid(format!(
            "{ctx}.{key} '{s}' is not a 64-bit unsigned integer"
        ))
    })
}

fn parse_u64_str(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok()
}

fn number(v: &Value, key: &str, ctx: &str, max: u64) -> Res<u64> {
    match v.get(key) {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if x <= max => Ok(x),
            _ => inv(format!("{ctx}.{key} {n} is out of range 0..={max}")),
        },
        Some(_) => inv(format!("{ctx}.{key} is not a number")),
        None => inv(format!("{ctx}.{key} is missing")),
    }
}

fn base64(v: &Value, key: &str, ctx: &str) -> Res<Vec<u8>> {
    let s = string(v, key, ctx)?;
    B64.decode(s)
        .map_err(|_| MetadataError::Invalid(format!("{ctx}.{key} is not base64")))
}

fn hash(v: &Value, key: &str, ctx: &str) -> Res<HashAlg> {
    let name = string(v, key, ctx)?;
    HashAlg::parse(name)
        .ok_or_else(|| MetadataError::Unsupported(format!("{ctx}.{key}: hash '{name}'")))
}

fn id_key(key: &str, ctx: &str, max: u32) -> Res<u32> {
    match parse_u64_str(key) {
        Some(n) if n < u64::from(max) => Ok(n as u32),
        _ => inv(format!("{ctx} id '{key}' is not a number below {max}")),
    }
}

fn id_list(v: &Value, key: &str, ctx: &str) -> Res<Vec<u32>> {
    let Some(Value::Array(items)) = v.get(key) else {
        return inv(format!("{ctx}.{key} is not an array"));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => id_key(s, &format!("{ctx}.{key}"), u32::MAX),
            _ => inv(format!("{ctx}.{key} holds a non-string")),
        })
        .collect()
}

impl Metadata {
    /// Validates a parsed document against the header's `hdr_size`.
    pub fn from_value(doc: Value, hdr_size: u64) -> Res<Metadata> {
        if !doc.is_object() {
            return inv("top level is not an object");
        }
        for section in ["keyslots", "tokens", "segments", "digests", "config"] {
            obj(&doc, section, "metadata")?;
        }
        let config = &doc["config"];
        let json_size = u64_string(config, "json_size", "config")?;
        if json_size != hdr_size - 4096 {
            return inv(format!(
                "config.json_size {json_size} does not match the header size {hdr_size}"
            ));
        }
        let keyslots_size = u64_string(config, "keyslots_size", "config")?;
        if keyslots_size % 4096 != 0 {
            return inv(format!(
                "config.keyslots_size {keyslots_size} is not aligned to 4096"
            ));
        }
        if let Some(flags) = config.get("flags") {
            match flags {
                Value::Array(a) if a.iter().all(Value::is_string) => {}
                _ => return inv("config.flags is not an array of strings"),
            }
        }
        if let Some(req) = config.get("requirements") {
            let Value::Object(req) = req else {
                return inv("config.requirements is not an object");
            };
            if let Some(m) = req.get("mandatory") {
                let Value::Array(m) = m else {
                    return inv("config.requirements.mandatory is not an array");
                };
                if !m.is_empty() {
                    let names: Vec<String> = m
                        .iter()
                        .map(|x| x.as_str().unwrap_or("?").to_string())
                        .collect();
                    return Err(MetadataError::Unsupported(format!(
                        "mandatory requirement(s) {}",
                        names.join(", ")
                    )));
                }
            }
        }

        let areas_start = 2 * hdr_size;
        let areas_end = areas_start
            .checked_add(keyslots_size)
            .ok_or_else(|| MetadataError::Invalid("config.keyslots_size overflows".into()))?;
        let mut keyslots = BTreeMap::new();
        for (k, v) in obj(&doc, "keyslots", "metadata")? {
            let id = id_key(k, "keyslot", MAX_KEYSLOTS)?;
            keyslots.insert(
                id,
                parse_keyslot(v, &format!("keyslots.{k}"), areas_start, areas_end)?,
            );
        }
        let mut spans: Vec<(u64, u64, u32)> = keyslots
            .iter()
            .map(|(id, s)| (s.area_offset, s.area_offset + s.area_size, *id))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return inv(format!("keyslot areas {} and {} overlap", w[0].2, w[1].2));
            }
        }

        let mut segments = BTreeMap::new();
        for (k, v) in obj(&doc, "segments", "metadata")? {
            let id = id_key(k, "segment", u32::MAX)?;
            segments.insert(id, parse_segment(v, &format!("segments.{k}"))?);
        }
        check_segment_layout(&segments)?;
        if let Some(first) = segments.values().map(|s| s.offset).min()
            && first != 0
            && first < areas_end
        {
            return inv(format!(
                "data offset {first} lies inside the metadata and keyslot areas (which end at {areas_end})"
            ));
        }

        let mut digests = BTreeMap::new();
        let mut digest_of_slot: BTreeMap<u32, u32> = BTreeMap::new();
        for (k, v) in obj(&doc, "digests", "metadata")? {
            let id = id_key(k, "digest", u32::MAX)?;
            let ctx = format!("digests.{k}");
            let d = parse_digest(v, &ctx)?;
            for s in &d.keyslots {
                if !keyslots.contains_key(s) {
                    return inv(format!("{ctx} refers to missing keyslot {s}"));
                }
                if digest_of_slot.insert(*s, id).is_some() {
                    return inv(format!("keyslot {s} is assigned to more than one digest"));
                }
            }
            for s in &d.segments {
                if !segments.contains_key(s) {
                    return inv(format!("{ctx} refers to missing segment {s}"));
                }
            }
            digests.insert(id, d);
        }
        for id in keyslots.keys() {
            if !digest_of_slot.contains_key(id) {
                return inv(format!("keyslot {id} has no digest"));
            }
        }

        let mut tokens = BTreeMap::new();
        for (k, v) in obj(&doc, "tokens", "metadata")? {
            let id = id_key(k, "token", MAX_TOKENS)?;
            let ctx = format!("tokens.{k}");
            let kind = string(v, "type", &ctx)?.to_string();
            let slots = id_list(v, "keyslots", &ctx)?;
            for s in &slots {
                if !keyslots.contains_key(s) {
                    return inv(format!("{ctx} refers to missing keyslot {s}"));
                }
            }
            let key_id = if kind == TOKEN_TYPE {
                Some(string(v, "key_id", &ctx)?.to_string())
            } else {
                None
            };
            tokens.insert(
                id,
                Token {
                    kind,
                    keyslots: slots,
                    key_id,
                },
            );
        }

        Ok(Metadata {
            doc,
            keyslots,
            segments,
            digests,
            tokens,
            json_size,
            keyslots_size,
        })
    }

    /// The digest that verifies keyslot `slot`'s key.
    pub fn digest_for(&self, slot: u32) -> Option<(u32, &Digest)> {
        self.digests
            .iter()
            .find(|(_, d)| d.keyslots.contains(&slot))
            .map(|(id, d)| (*id, d))
    }

    /// Compact JSON text as stored on disk.
    pub fn to_text(&self) -> String {
        self.doc.to_string()
    }
}

fn parse_keyslot(v: &Value, ctx: &str, areas_start: u64, areas_end: u64) -> Res<Keyslot> {
    let kind = string(v, "type", ctx)?;
    if kind != "luks2" {
        return Err(MetadataError::Unsupported(format!(
            "{ctx}: keyslot type '{kind}'"
        )));
    }
    let key_size = number(v, "key_size", ctx, 512)? as usize;
    if key_size == 0 {
        return inv(format!("{ctx}.key_size is 0"));
    }
    let af = &v["af"];
    obj(v, "af", ctx)?;
    let af_ctx = format!("{ctx}.af");
    let af_type = string(af, "type", &af_ctx)?;
    if af_type != "luks1" {
        return Err(MetadataError::Unsupported(format!(
            "{af_ctx}: AF type '{af_type}'"
        )));
    }
    let stripes = number(af, "stripes", &af_ctx, u64::from(u32::MAX))? as usize;
    if stripes != STRIPES {
        return inv(format!("{af_ctx}.stripes is {stripes}, expected {STRIPES}"));
    }
    let af_hash = hash(af, "hash", &af_ctx)?;

    obj(v, "area", ctx)?;
    let area = &v["area"];
    let area_ctx = format!("{ctx}.area");
    let area_type = string(area, "type", &area_ctx)?;
    if area_type != "raw" {
        return Err(MetadataError::Unsupported(format!(
            "{area_ctx}: area type '{area_type}'"
        )));
    }
    let area_offset = u64_string(area, "offset", &area_ctx)?;
    let area_size = u64_string(area, "size", &area_ctx)?;
    let area_key_size = number(area, "key_size", &area_ctx, 512)? as usize;
    let encryption = string(area, "encryption", &area_ctx)?;
    let area_cipher = CipherSpec::parse(encryption, area_key_size)
        .map_err(|e| MetadataError::Unsupported(format!("{area_ctx}: {e}")))?;
    if area_offset % SECTOR as u64 != 0 {
        return inv(format!(
            "{area_ctx}.offset {area_offset} is not sector aligned"
        ));
    }
    let end = area_offset
        .checked_add(area_size)
        .ok_or_else(|| MetadataError::Invalid(format!("{area_ctx} offset + size overflows")))?;
    if area_offset < areas_start || end > areas_end {
        return inv(format!(
            "{area_ctx} [{area_offset}, {end}) is outside the keyslots area [{areas_start}, {areas_end})"
        ));
    }
    let needed = af_sectors(key_size, stripes) * SECTOR as u64;
    if area_size < needed {
        return inv(format!(
            "{area_ctx}.size {area_size} is smaller than the {needed} bytes of key material"
        ));
    }

    obj(v, "kdf", ctx)?;
    let kdf_v = &v["kdf"];
    let kdf_ctx = format!("{ctx}.kdf");
    let kdf_type = string(kdf_v, "type", &kdf_ctx)?;
    let kdf = match kdf_type {
        "pbkdf2" => Kdf::Pbkdf2 {
            hash: hash(kdf_v, "hash", &kdf_ctx)?,
            iterations: number(kdf_v, "iterations", &kdf_ctx, u64::from(u32::MAX))? as u32,
        },
        "argon2i" | "argon2id" => Kdf::Argon2 {
            variant: if kdf_type == "argon2i" {
                Argon2Variant::Argon2i
            } else {
                Argon2Variant::Argon2id
            },
            time: number(kdf_v, "time", &kdf_ctx, u64::from(u32::MAX))? as u32,
            memory_kib: number(kdf_v, "memory", &kdf_ctx, u64::from(u32::MAX))? as u32,
            parallel: number(kdf_v, "cpus", &kdf_ctx, u64::from(u32::MAX))? as u32,
        },
        other => {
            return Err(MetadataError::Unsupported(format!(
                "{kdf_ctx}: KDF '{other}'"
            )));
        }
    };
    let salt = base64(kdf_v, "salt", &kdf_ctx)?;
    let priority = match v.get("priority") {
        None => 1,
        Some(_) => number(v, "priority", ctx, 2)? as u8,
    };
    Ok(Keyslot {
        key_size,
        af_hash,
        stripes,
        area_offset,
        area_size,
        area_cipher,
        kdf,
        salt,
        priority,
    })
}

fn parse_segment(v: &Value, ctx: &str) -> Res<Segment> {
    let kind = string(v, "type", ctx)?;
    if kind != "crypt" {
        return Err(MetadataError::Unsupported(format!(
            "{ctx}: segment type '{kind}'"
        )));
    }
    if v.get("integrity").is_some() {
        return Err(MetadataError::Unsupported(format!(
            "{ctx}: authenticated encryption (integrity)"
        )));
    }
    let offset = u64_string(v, "offset", ctx)?;
    let size = match v.get("size") {
        Some(Value::String(s)) if s == "dynamic" => None,
        _ => Some(u64_string(v, "size", ctx)?),
    };
    let iv_tweak = u64_string(v, "iv_tweak", ctx)?;
    let encryption = string(v, "encryption", ctx)?.to_string();
    let sector_size = number(v, "sector_size", ctx, 4096)? as u32;
    if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
        return inv(format!(
            "{ctx}.sector_size {sector_size} is not 512, 1024, 2048 or 4096"
        ));
    }
    if offset % u64::from(sector_size) != 0 {
        return inv(format!(
            "{ctx}.offset {offset} is not aligned to the sector size {sector_size}"
        ));
    }
    if let Some(size) = size
        && size % u64::from(sector_size) != 0
    {
        return inv(format!(
            "{ctx}.size {size} is not a multiple of the sector size {sector_size}"
        ));
    }
    if let Some(flags) = v.get("flags")
        && !matches!(flags, Value::Array(a) if a.iter().all(Value::is_string))
    {
        return inv(format!("{ctx}.flags is not an array of strings"));
    }
    Ok(Segment {
        offset,
        size,
        iv_tweak,
        encryption,
        sector_size,
    })
}

fn check_segment_layout(segments: &BTreeMap<u32, Segment>) -> Res<()> {
    let mut ordered: Vec<(&u32, &Segment)> = segments.iter().collect();
    ordered.sort_by_key(|(_, s)| s.offset);
    for w in ordered.windows(2) {
        let ((a_id, a), (b_id, b)) = (w[0], w[1]);
        let Some(size) = a.size else {
            return inv(format!(
                "segment {a_id} is dynamic but segment {b_id} follows it"
            ));
        };
        let end = a
            .offset
            .checked_add(size)
            .ok_or_else(|| MetadataError::Invalid(format!("segment {a_id} overflows")))?;
        if end != b.offset {
            return inv(format!("segments {a_id} and {b_id} leave a gap or overlap"));
        }
    }
    Ok(())
}

fn parse_digest(v: &Value, ctx: &str) -> Res<Digest> {
    let kind = string(v, "type", ctx)?;
    if kind != "pbkdf2" {
        return Err(MetadataError::Unsupported(format!(
            "{ctx}: digest type '{kind}'"
        )));
    }
    let keyslots = id_list(v, "keyslots", ctx)?;
    let segments = id_list(v, "segments", ctx)?;
    let h = hash(v, "hash", ctx)?;
    let iterations = number(v, "iterations", ctx, u64::from(u32::MAX))? as u32;
    if iterations == 0 {
        return inv(format!("{ctx}.iterations is 0"));
    }
    let salt = base64(v, "salt", ctx)?;
    let digest = base64(v, "digest", ctx)?;
    if digest.is_empty() || digest.len() > h.output_len() {
        return inv(format!("{ctx}.digest has {} bytes", digest.len()));
    }
    Ok(Digest {
        keyslots,
        segments,
        hash: h,
        iterations,
        salt,
        digest,
    })
}

/// JSON for a keyslot, in the field order cryptsetup writes.
pub fn keyslot_json(k: &Keyslot) -> Value {
    let kdf = match k.kdf {
        Kdf::Pbkdf2 { hash, iterations } => serde_json::json!({
            "type": "pbkdf2", "hash": hash.name(), "iterations": iterations, "salt": B64.encode(&k.salt)
        }),
        Kdf::Argon2 {
            variant,
            time,
            memory_kib,
            parallel,
        } => serde_json::json!({
            "type": variant.name(), "time": time, "memory": memory_kib, "cpus": parallel, "salt": B64.encode(&k.salt)
        }),
    };
    serde_json::json!({
        "type": "luks2",
        "key_size": k.key_size,
        "af": { "type": "luks1", "stripes": k.stripes, "hash": k.af_hash.name() },
        "area": {
            "type": "raw",
            "offset": k.area_offset.to_string(),
            "size": k.area_size.to_string(),
            "encryption": k.area_cipher.full_name(),
            "key_size": k.area_cipher.key_bytes,
        },
        "kdf": kdf,
    })
}

/// JSON for a digest.
pub fn digest_json(d: &Digest) -> Value {
    serde_json::json!({
        "type": "pbkdf2",
        "keyslots": d.keyslots.iter().map(u32::to_string).collect::<Vec<_>>(),
        "segments": d.segments.iter().map(u32::to_string).collect::<Vec<_>>(),
        "hash": d.hash.name(),
        "iterations": d.iterations,
        "salt": B64.encode(&d.salt),
        "digest": B64.encode(&d.digest),
    })
}

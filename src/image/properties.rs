//! The four glance image properties that describe a signature, read as
//! cursive reads them: all four present means "verify", none means "not
//! signed", anything in between is an error (nova refuses such an image).

use serde_json::{Map, Value};

use super::signature::{HashMethod, KeyType};
use crate::keymgr::KeyId;

/// `img_signature`: the base64 signature.
pub const SIGNATURE: &str = "img_signature";
/// `img_signature_hash_method`: `SHA-224`, `SHA-256`, `SHA-384`, `SHA-512`.
pub const HASH_METHOD: &str = "img_signature_hash_method";
/// `img_signature_key_type`: `RSA-PSS`, `DSA`, `ECC_SECP384R1`, ...
pub const KEY_TYPE: &str = "img_signature_key_type";
/// `img_signature_certificate_uuid`: the signing certificate in the key
/// manager.
pub const CERT_UUID: &str = "img_signature_certificate_uuid";

const ALL: [&str; 4] = [SIGNATURE, HASH_METHOD, KEY_TYPE, CERT_UUID];

/// Longest base64 signature taken: a 16384-bit RSA signature is 2732
/// characters; anything far longer is not a signature.
const MAX_SIGNATURE_B64: usize = 8192;

/// What an image's properties ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Signed {
    /// None of the four properties: the image is not signed.
    No,
    /// All four, parsed.
    Yes(SignatureProperties),
}

/// The parsed signature properties.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureProperties {
    /// The signature bytes (decoded).
    pub signature: Vec<u8>,
    /// The hash the signature covers.
    pub hash: HashMethod,
    /// The kind of key that made it.
    pub key_type: KeyType,
    /// The signing certificate's id in the key manager.
    pub certificate: KeyId,
}

/// Properties that cannot be verified (the message says which and why).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadProperties(pub String);

/// Reads the signature properties of `properties` (a glance image's
/// properties; other keys are ignored).
pub fn parse(properties: &Map<String, Value>) -> Result<Signed, BadProperties> {
    let present: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|k| properties.contains_key(*k))
        .collect();
    if present.is_empty() {
        return Ok(Signed::No);
    }
    if present.len() < ALL.len() {
        let missing: Vec<&str> = ALL
            .iter()
            .copied()
            .filter(|k| !present.contains(k))
            .collect();
        return Err(BadProperties(format!(
            "the image has {} but not {}: a signed image needs all four",
            present.join(", "),
            missing.join(", ")
        )));
    }
    let text = |key: &str| -> Result<&str, BadProperties> {
        properties[key]
            .as_str()
            .ok_or_else(|| BadProperties(format!("{key} is not a string")))
    };
    let b64 = text(SIGNATURE)?;
    if b64.len() > MAX_SIGNATURE_B64 {
        return Err(BadProperties(format!(
            "{SIGNATURE} is {} characters long; no signature is",
            b64.len()
        )));
    }
    let signature =
        decode_base64(b64).ok_or_else(|| BadProperties(format!("{SIGNATURE} is not base64")))?;
    if signature.is_empty() {
        return Err(BadProperties(format!("{SIGNATURE} is empty")));
    }
    let hash_name = text(HASH_METHOD)?;
    let hash = HashMethod::from_name(hash_name).ok_or_else(|| {
        BadProperties(format!(
            "{HASH_METHOD} '{}' is none of SHA-224, SHA-256, SHA-384, SHA-512",
            shown(hash_name)
        ))
    })?;
    let key_name = text(KEY_TYPE)?;
    let key_type = KeyType::from_name(key_name).ok_or_else(|| {
        BadProperties(format!(
            "{KEY_TYPE} '{}' is none of RSA-PSS, DSA, ECC_SECP384R1, ECC_SECP521R1",
            shown(key_name)
        ))
    })?;
    let cert = text(CERT_UUID)?;
    let certificate = KeyId::new(cert).map_err(|_| {
        BadProperties(format!(
            "{CERT_UUID} '{}' is not a key manager id",
            shown(cert)
        ))
    })?;
    Ok(Signed::Yes(SignatureProperties {
        signature,
        hash,
        key_type,
        certificate,
    }))
}

/// Base64 as oslo's `decode_as_bytes` (Python's `b64decode`) takes it:
/// the standard alphabet, padding required, line breaks and other
/// characters outside the alphabet discarded.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let cleaned: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        .collect();
    // Python's decoder also takes non-zero bits after the last character.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    lenient.decode(cleaned.as_bytes()).ok()
}

/// A caller's value for messages and logs: escaped, and cut at 64
/// characters (it may be anything of any length).
fn shown(value: &str) -> String {
    let mut s: String = value
        .chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if value.chars().count() > 64 {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().expect("an object").clone()
    }

    fn full() -> Value {
        json!({
            "img_signature": "AAEC",
            "img_signature_hash_method": "SHA-256",
            "img_signature_key_type": "RSA-PSS",
            "img_signature_certificate_uuid": "8a1c93b0-2d38-4b5d-a9a2-7a3c8e0f6b11",
            "os_distro": "debian",
        })
    }

    #[test]
    fn no_signature_properties_is_not_signed() {
        assert_eq!(parse(&props(json!({"os_distro": "x"}))), Ok(Signed::No));
    }

    #[test]
    fn all_four_are_parsed() {
        let Ok(Signed::Yes(p)) = parse(&props(full())) else {
            panic!("not parsed");
        };
        assert_eq!(p.signature, vec![0, 1, 2]);
        assert_eq!(p.hash, HashMethod::Sha256);
        assert_eq!(p.key_type, KeyType::RsaPss);
        assert_eq!(
            p.certificate.as_str(),
            "8a1c93b0-2d38-4b5d-a9a2-7a3c8e0f6b11"
        );
    }

    #[test]
    fn some_but_not_all_names_the_missing_ones() {
        let mut p = props(full());
        p.remove(KEY_TYPE);
        let err = parse(&p).expect_err("three of four accepted");
        assert!(err.0.contains("not img_signature_key_type"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_property_named() {
        for (key, value, says) in [
            (HASH_METHOD, json!("MD5"), "img_signature_hash_method 'MD5'"),
            (HASH_METHOD, json!(256), "is not a string"),
            (KEY_TYPE, json!("ECC_SECT571K1"), "'ECC_SECT571K1'"),
            (SIGNATURE, json!("AA*"), "not base64"),
            (SIGNATURE, json!("===="), "not base64"),
            (SIGNATURE, json!(""), "is empty"),
            (CERT_UUID, json!("has space"), "not a key manager id"),
        ] {
            let mut p = props(full());
            p.insert(key.into(), value);
            let err = parse(&p).expect_err(key);
            assert!(err.0.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn base64_with_line_breaks_decodes_as_python_does() {
        assert_eq!(decode_base64("AA\nEC"), Some(vec![0, 1, 2]));
        assert_eq!(decode_base64("AAE"), None);
        // Non-zero bits after the last character, as Python takes them.
        assert_eq!(decode_base64("AB=="), Some(vec![0]));
        assert!(shown(&"x".repeat(500)).len() < 80);
    }
}

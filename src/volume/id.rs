//! Volume ids: the one rule for what the agent accepts as a volume id
//! (cinder's are UUIDs; tests and operators use short names), so that it
//! can name lock files, records and mappings safely.

use std::fmt;

/// What a volume id may be, for messages.
pub const RULE: &str =
    "volume ids are 1-128 characters of letters, digits, '-', '_' and '.', not starting with '.'";

/// A volume id that follows [`RULE`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(String);

/// A text that is not a volume id (shown escaped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{}': {RULE}", .0.escape_debug())]
pub struct InvalidVolumeId(pub String);

impl VolumeId {
    /// `id`, if it follows [`RULE`].
    pub fn parse(id: &str) -> Result<VolumeId, InvalidVolumeId> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !id.starts_with('.');
        if ok {
            Ok(VolumeId(id.to_string()))
        } else {
            Err(InvalidVolumeId(id.to_string()))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A volume id reads as the text it is (lock, record and mapping names
/// are made from it).
impl std::ops::Deref for VolumeId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for ok in [
            "v1",
            "0b4a2f3c-5d6e-4f70-8a9b-0c1d2e3f4a5b",
            "a.b_c-d",
            &"x".repeat(128),
        ] {
            assert_eq!(VolumeId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(129),
            "a\nb",
        ] {
            let e = VolumeId::parse(bad).unwrap_err();
            assert!(e.to_string().contains("1-128 characters"), "{e}");
            assert!(!e.to_string().contains('\n'), "{e:?}");
        }
    }
}

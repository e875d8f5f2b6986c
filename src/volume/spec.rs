//! Cinder's encryption metadata for a volume, and the providers os-brick
//! and nova accept (including legacy class names).

use serde::Deserialize;

/// What kind of encryption a volume uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// LUKS1 (`luks`).
    Luks1,
    /// LUKS2 (`luks2`).
    Luks2,
    /// cryptsetup plain mode (`plain`, deprecated).
    Plain,
    /// No front-end encryption: nothing to do.
    NoOp,
}

/// Why encryption metadata cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The provider is unknown.
    #[error("unknown encryption provider '{}'", crate::text::escape_controls(.0))]
    UnknownProvider(String),
    /// A front-end volume without a key id.
    #[error("encryption metadata has no encryption_key_id")]
    MissingKeyId,
    /// A key size that is not a whole number of bytes, or absurd.
    #[error("key_size {0} is not supported")]
    KeySize(u64),
    /// The JSON does not parse.
    #[error("encryption metadata is not valid JSON: {0}")]
    Json(String),
}

/// The `encryption` dictionary as cinder returns it (other fields cinder
/// adds are ignored).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EncryptionSpec {
    /// Key manager id of the volume's key.
    #[serde(default)]
    pub encryption_key_id: Option<String>,
    /// Provider name or legacy class name.
    #[serde(default)]
    pub provider: Option<String>,
    /// Cipher (e.g. `aes-xts-plain64`); used for format and plain mode.
    #[serde(default)]
    pub cipher: Option<String>,
    /// Key size in bits (256 = AES-128-XTS with aes-xts-plain64).
    #[serde(default)]
    pub key_size: Option<u64>,
    /// `front-end` (ours) or `back-end` (the storage encrypts).
    #[serde(default)]
    pub control_location: Option<String>,
}

impl EncryptionSpec {
    /// Parses cinder's JSON.
    pub fn from_json(text: &str) -> Result<EncryptionSpec, SpecError> {
        serde_json::from_str(text).map_err(|e| SpecError::Json(e.to_string()))
    }

    /// The provider to apply: `NoOp` unless the control location is
    /// front-end (case-insensitive) and a provider is set.
    pub fn provider(&self) -> Result<Provider, SpecError> {
        let front_end = self
            .control_location
            .as_deref()
            .is_none_or(|c| c.eq_ignore_ascii_case("front-end"));
        if !front_end {
            return Ok(Provider::NoOp);
        }
        let Some(p) = self.provider.as_deref() else {
            return Ok(Provider::NoOp);
        };
        let p = p.trim();
        // os-brick's FORMAT_TO_FRONTEND_ENCRYPTOR_MAP and
        // LEGACY_PROVIDER_CLASS_TO_FORMAT_MAP.
        Ok(match p {
            "luks"
            | "LuksEncryptor"
            | "nova.volume.encryptors.luks.LuksEncryptor"
            | "os_brick.encryptors.luks.LuksEncryptor" => Provider::Luks1,
            "luks2" | "Luks2Encryptor" | "os_brick.encryptors.luks.Luks2Encryptor" => {
                Provider::Luks2
            }
            "plain"
            | "CryptsetupEncryptor"
            | "nova.volume.encryptors.cryptsetup.CryptsetupEncryptor"
            | "os_brick.encryptors.cryptsetup.CryptsetupEncryptor" => Provider::Plain,
            ""
            | "NoOpEncryptor"
            | "NoopEncryptor"
            | "nova.volume.encryptors.nop.NoopEncryptor"
            | "os_brick.encryptors.nop.NoopEncryptor"
            | "os_brick.encryptors.nop.NoOpEncryptor" => Provider::NoOp,
            other => return Err(SpecError::UnknownProvider(other.to_string())),
        })
    }

    /// The key manager's id of the volume's key; required by every
    /// provider that is not a no-op.
    pub fn key_id(&self) -> Result<&str, SpecError> {
        self.encryption_key_id
            .as_deref()
            .ok_or(SpecError::MissingKeyId)
    }

    /// Cipher for a new format or plain mode (os-brick's default).
    pub fn cipher(&self) -> &str {
        self.cipher
            .as_deref()
            .filter(|c| !c.is_empty())
            .unwrap_or("aes-xts-plain64")
    }

    /// Cipher of a plain volume: cinder's, else cryptsetup's plain-mode
    /// default (what os-brick gets when it passes none).
    pub fn plain_cipher(&self) -> &str {
        self.cipher
            .as_deref()
            .filter(|c| !c.is_empty())
            .unwrap_or("aes-cbc-essiv:sha256")
    }

    /// Key size of a plain volume: cinder's, else cryptsetup's plain-mode
    /// default of 256 bits.
    pub fn plain_key_bits(&self) -> Result<usize, SpecError> {
        match self.key_size {
            None => Ok(256),
            Some(k) if k % 8 == 0 && (128..=512).contains(&k) => Ok(k as usize),
            Some(k) => Err(SpecError::KeySize(k)),
        }
    }

    /// Key size in bits for a new format: cinder's `key_size`, which
    /// os-brick passes to `cryptsetup --key-size`; when unset os-brick
    /// passes nothing and cryptsetup's default (512 for XTS) applies.
    pub fn key_bits(&self) -> Result<usize, SpecError> {
        match self.key_size {
            None => Ok(512),
            Some(k) if k % 8 == 0 && (128..=512).contains(&k) => Ok(k as usize),
            Some(k) => Err(SpecError::KeySize(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(provider: &str, location: &str) -> EncryptionSpec {
        EncryptionSpec {
            encryption_key_id: Some("k".into()),
            provider: Some(provider.into()),
            control_location: Some(location.into()),
            ..Default::default()
        }
    }

    #[test]
    fn providers_and_legacy_names() {
        for (p, want) in [
            ("luks", Provider::Luks1),
            ("nova.volume.encryptors.luks.LuksEncryptor", Provider::Luks1),
            ("os_brick.encryptors.luks.LuksEncryptor", Provider::Luks1),
            ("LuksEncryptor", Provider::Luks1),
            ("luks2", Provider::Luks2),
            ("os_brick.encryptors.luks.Luks2Encryptor", Provider::Luks2),
            ("plain", Provider::Plain),
            (
                "nova.volume.encryptors.cryptsetup.CryptsetupEncryptor",
                Provider::Plain,
            ),
            ("CryptsetupEncryptor", Provider::Plain),
            ("nova.volume.encryptors.nop.NoopEncryptor", Provider::NoOp),
            ("NoOpEncryptor", Provider::NoOp),
        ] {
            assert_eq!(spec(p, "front-end").provider().unwrap(), want, "{p}");
        }
        assert_eq!(
            spec("luks", "FRONT-END").provider().unwrap(),
            Provider::Luks1
        );
        assert_eq!(spec("luks", "back-end").provider().unwrap(), Provider::NoOp);
        assert!(matches!(
            spec("rot13", "front-end").provider(),
            Err(SpecError::UnknownProvider(_))
        ));
        assert_eq!(
            EncryptionSpec::default().provider().unwrap(),
            Provider::NoOp
        );
    }

    #[test]
    fn cinder_json_with_extra_fields() {
        let s = EncryptionSpec::from_json(
            r#"{"encryption_key_id": "abc", "provider": "luks", "cipher": "aes-xts-plain64", "key_size": 256,
                "control_location": "front-end", "deleted": false, "volume_type_id": "x"}"#,
        )
        .unwrap();
        assert_eq!(s.provider().unwrap(), Provider::Luks1);
        assert_eq!(s.key_bits().unwrap(), 256);
        assert!(
            EncryptionSpec {
                key_size: Some(100),
                ..s
            }
            .key_bits()
            .is_err()
        );
    }
}

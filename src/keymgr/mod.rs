//! Key managers: where a volume's key comes from. Barbican behind Keystone
//! on a cloud, the legacy fixed key of nova's ConfKeyManager, and a local
//! key store for machines without a cloud. This layer knows nothing of
//! devices; it returns key material and keeps the per-key "formatted"
//! marker that the first-use format guard consults.

pub mod barbican;
pub mod error;
pub mod fixed;
pub mod http;
pub mod keystone;
pub mod local;
pub mod marker;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use error::{InvalidMaterial, KeyError};

use crate::secret::{Passphrase, SecretBytes};

/// A boxed future, so that the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A key manager's identifier of a key, as cinder stores it in
/// `encryption_key_id`: a UUID, a secret href, or the legacy all-zero id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Validates an id: 1 to 1024 printable ASCII characters, no spaces.
    pub fn new(id: &str) -> Result<KeyId, KeyError> {
        if id.is_empty() || id.len() > 1024 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::InvalidKeyId {
                key_id: id.escape_debug().to_string(),
            });
        }
        Ok(KeyId(id.to_string()))
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last path segment: for an href
    /// `https://kms:9311/v1/secrets/<uuid>` the UUID, as barbicanclient
    /// reads it.
    pub fn last_segment(&self) -> &str {
        self.0
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(&self.0)
    }

    /// The secret UUID this id names (the last path segment, parsed).
    pub fn uuid(&self) -> Result<uuid::Uuid, KeyError> {
        uuid::Uuid::parse_str(self.last_segment()).map_err(|_| KeyError::InvalidKeyId {
            key_id: self.0.clone(),
        })
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// What kind of secret the key manager holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// Random key bytes; the LUKS passphrase is their lowercase hex.
    Symmetric,
    /// A passphrase; used as raw UTF-8.
    Passphrase,
}

/// Key material fetched from a key manager.
pub struct Key {
    id: KeyId,
    kind: SecretKind,
    bytes: SecretBytes,
}

/// Shortest symmetric key accepted: 128 bits. Anything shorter is not a
/// volume key (castellan creates 256-bit keys for volumes).
pub const MIN_SYMMETRIC_BYTES: usize = 16;
/// Longest symmetric key accepted: 512 bits (AES-256-XTS).
pub const MAX_SYMMETRIC_BYTES: usize = 64;

impl Key {
    /// Validates key material: symmetric keys of 128 to 512 bits in whole
    /// bytes, passphrases non-empty UTF-8.
    pub fn new(id: KeyId, kind: SecretKind, bytes: SecretBytes) -> Result<Key, InvalidMaterial> {
        let invalid = InvalidMaterial;
        if bytes.is_empty() {
            return Err(invalid("the secret is empty".into()));
        }
        match kind {
            SecretKind::Symmetric => {
                if !(MIN_SYMMETRIC_BYTES..=MAX_SYMMETRIC_BYTES).contains(&bytes.len()) {
                    return Err(invalid(format!(
                        "a symmetric key of {} bits; volume keys are 128 to 512 bits",
                        bytes.len() * 8
                    )));
                }
            }
            SecretKind::Passphrase => {
                if std::str::from_utf8(bytes.expose()).is_err() {
                    return Err(invalid("a passphrase secret that is not UTF-8".into()));
                }
            }
        }
        Ok(Key { id, kind, bytes })
    }

    /// The key id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The secret's kind.
    pub fn kind(&self) -> &SecretKind {
        &self.kind
    }

    /// Length in bits.
    pub fn bits(&self) -> usize {
        self.bytes.len() * 8
    }

    /// The raw secret.
    pub fn expose(&self) -> &[u8] {
        self.bytes.expose()
    }

    /// The LUKS passphrase exactly as os-brick and nova derive it: the
    /// lowercase hex of a symmetric key, a passphrase secret as is.
    pub fn passphrase(&self) -> Passphrase {
        match self.kind {
            SecretKind::Symmetric => Passphrase::new(self.bytes.to_hex()),
            SecretKind::Passphrase => Passphrase::new(self.bytes.clone()),
        }
    }

    /// True when the passphrase carries at least 128 bits of key-manager
    /// randomness, so the minimal KDF is safe.
    pub fn is_high_entropy(&self) -> bool {
        self.kind == SecretKind::Symmetric && self.bytes.len() >= MIN_SYMMETRIC_BYTES
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Key {{ id: {}, kind: {:?}, bits: {}, bytes: [REDACTED] }}",
            self.id,
            self.kind,
            self.bits()
        )
    }
}

/// A bearer token or other credential string, kept like key material.
#[derive(Clone)]
pub struct SecretString(SecretBytes);

impl SecretString {
    /// Wraps a credential.
    pub fn new(s: &str) -> Self {
        SecretString(SecretBytes::from_slice(s.as_bytes()))
    }

    /// Reads a credential from a file or stdin (`-`), trimming one trailing
    /// newline (tokens are written by tools that add one).
    pub fn from_reader(r: impl std::io::Read) -> std::io::Result<Option<Self>> {
        let Some(bytes) = SecretBytes::read_all(r)? else {
            return Ok(None);
        };
        let mut end = bytes.len();
        while end > 0 && matches!(bytes.expose()[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        let s = std::str::from_utf8(&bytes.expose()[..end])
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        Ok(Some(SecretString::new(s)))
    }

    /// The credential.
    pub fn expose(&self) -> &str {
        std::str::from_utf8(self.0.expose()).unwrap_or_default()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([REDACTED])")
    }
}

/// Credentials of the caller on whose behalf a key is fetched.
#[derive(Clone, Debug, Default)]
pub enum RequestAuth {
    /// The agent's own configured credentials.
    #[default]
    Service,
    /// A user token passed along by the compute service (nova's request
    /// context), optionally with a service token (`X-Service-Token`).
    UserToken {
        /// The user's Keystone token.
        token: SecretString,
        /// A service token to send along; when absent and the agent has
        /// service credentials and is configured to, it sends its own.
        service_token: Option<SecretString>,
    },
}

/// A source of volume keys.
pub trait KeyManager: Send + Sync {
    /// A short description for logs and errors (backend and endpoint).
    fn describe(&self) -> String;

    /// Fetches the key named by `id`.
    fn fetch<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Key, KeyError>>;

    /// Whether a volume using this key was formatted before.
    fn is_marked_formatted<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<bool, KeyError>>;

    /// Records that a volume using this key has been formatted.
    fn mark_formatted<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<(), KeyError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn href_and_uuid_ids() {
        let id =
            KeyId::new("https://other-host:9311/v1/secrets/6f1c1f1e-0000-4000-8000-000000000001")
                .unwrap();
        assert_eq!(id.last_segment(), "6f1c1f1e-0000-4000-8000-000000000001");
        assert!(id.uuid().is_ok());
        assert!(KeyId::new("").is_err());
        assert!(KeyId::new("a b").is_err());
        assert!(KeyId::new("not-a-uuid").unwrap().uuid().is_err());
    }

    #[test]
    fn passphrase_derivation_matches_os_brick() {
        let id = KeyId::new("k").unwrap();
        let key = Key::new(
            id.clone(),
            SecretKind::Symmetric,
            SecretBytes::from_slice(&[0xde, 0xad, 0xbe, 0xef].repeat(8)),
        )
        .unwrap();
        assert_eq!(key.passphrase().expose(), "deadbeef".repeat(8).as_bytes());
        assert!(key.is_high_entropy());
        let p = Key::new(
            id.clone(),
            SecretKind::Passphrase,
            SecretBytes::from_slice("pässword".as_bytes()),
        )
        .unwrap();
        assert_eq!(p.passphrase().expose(), "pässword".as_bytes());
        assert!(!p.is_high_entropy());
    }

    #[test]
    fn invalid_key_material_is_typed_and_never_printed() {
        let id = KeyId::new("k").unwrap();
        for bytes in [vec![], vec![1, 2, 3], vec![7; 65]] {
            let e = Key::new(
                id.clone(),
                SecretKind::Symmetric,
                SecretBytes::from_slice(&bytes),
            )
            .unwrap_err();
            assert!(e.0.contains("bits") || e.0.contains("empty"), "{e:?}");
        }
        let e = Key::new(
            id.clone(),
            SecretKind::Passphrase,
            SecretBytes::from_slice(&[0xff, 0xfe]),
        )
        .unwrap_err();
        assert!(e.0.contains("UTF-8"), "{e:?}");
        let k = Key::new(
            id,
            SecretKind::Symmetric,
            SecretBytes::from_slice(&[0xab; 32]),
        )
        .unwrap();
        assert!(!format!("{k:?}").contains("ab"));
    }
}

//! nova's legacy ConfKeyManager: the all-zero key id means the configured
//! `fixed_key`. As castellan's migration wrapper does, that id is resolved
//! here before any other key manager is asked.

use super::{BoxFuture, FormatIntent, Key, KeyError, KeyId, KeyManager, RequestAuth, SecretKind};
use crate::secret::SecretBytes;

/// The id ConfKeyManager gives its one key.
pub const FIXED_KEY_ID: &str = "00000000-0000-0000-0000-000000000000";

/// Wraps a key manager so that the fixed key id resolves locally.
pub struct WithFixedKey {
    fixed: SecretBytes,
    inner: Box<dyn KeyManager>,
}

impl WithFixedKey {
    /// `fixed_key_hex` as ConfKeyManager reads it (hex).
    pub fn new(fixed_key_hex: &str, inner: Box<dyn KeyManager>) -> Result<Self, KeyError> {
        let hex = fixed_key_hex.trim();
        let bad = || KeyError::Config("fixed_key is not an even number of hex digits".into());
        if !hex.len().is_multiple_of(2) {
            return Err(bad());
        }
        let mut fixed = SecretBytes::zeroed(hex.len() / 2);
        hex::decode_to_slice(hex, fixed.expose_mut()).map_err(|_| bad())?;
        let check = KeyId::new(FIXED_KEY_ID)?;
        Key::new(check, SecretKind::Symmetric, fixed.clone())
            .map_err(|e| KeyError::Config(format!("fixed_key: {}", e.0)))?;
        Ok(WithFixedKey { fixed, inner })
    }

    fn is_fixed(id: &KeyId) -> bool {
        id.last_segment() == FIXED_KEY_ID
    }
}

impl KeyManager for WithFixedKey {
    fn describe(&self) -> String {
        format!("fixed key + {}", self.inner.describe())
    }

    fn fetch<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Key, KeyError>> {
        if Self::is_fixed(id) {
            return Box::pin(async move {
                Key::new(id.clone(), SecretKind::Symmetric, self.fixed.clone())
                    .map_err(|e| e.at(id.as_str(), "fixed_key"))
            });
        }
        self.inner.fetch(id, auth)
    }

    /// Every legacy volume shares the fixed key id, so a per-key marker
    /// cannot say anything about one volume: never marked; the blank-device
    /// checks alone guard those volumes.
    fn is_marked_formatted<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<bool, KeyError>> {
        if Self::is_fixed(id) {
            return Box::pin(async { Ok(false) });
        }
        self.inner.is_marked_formatted(id, auth)
    }

    fn mark_formatted<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<(), KeyError>> {
        if Self::is_fixed(id) {
            return Box::pin(async { Ok(()) });
        }
        self.inner.mark_formatted(id, auth)
    }

    /// Like the marker, an intent on the shared fixed key id would speak
    /// for every legacy volume at once: none is kept, so those volumes
    /// never get the cross-host redo of an interrupted format.
    fn mark_formatting<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        intent: &'a FormatIntent,
    ) -> BoxFuture<'a, Result<(), KeyError>> {
        if Self::is_fixed(id) {
            return Box::pin(async { Ok(()) });
        }
        self.inner.mark_formatting(id, auth, intent)
    }

    fn withdraw_formatting<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        intent: &'a FormatIntent,
    ) -> BoxFuture<'a, Result<(), KeyError>> {
        if Self::is_fixed(id) {
            return Box::pin(async { Ok(()) });
        }
        self.inner.withdraw_formatting(id, auth, intent)
    }

    fn formatting_intent<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Option<FormatIntent>, KeyError>> {
        if Self::is_fixed(id) {
            return Box::pin(async { Ok(None) });
        }
        self.inner.formatting_intent(id, auth)
    }
}

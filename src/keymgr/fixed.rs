//! nova's legacy ConfKeyManager: the all-zero key id means the configured
//! `fixed_key`. As castellan's migration wrapper does, that id is resolved
//! here before any other key manager is asked.

use super::{
    BoxFuture, FormatState, FormatStateOp, Key, KeyError, KeyId, KeyManager, RequestAuth,
    SecretKind,
};
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
    /// Every legacy volume shares the fixed key id, so a per-key marker or
    /// intent would speak for all of them at once: none is kept (never
    /// marked, no intent); the device checks alone guard those volumes,
    /// and they never get the cross-host redo of an interrupted format.
    fn format_state<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        op: FormatStateOp<'a>,
    ) -> BoxFuture<'a, Result<FormatState, KeyError>> {
        if !Self::is_fixed(id) {
            return self.inner.format_state(id, auth, op);
        }
        Box::pin(async move {
            Ok(match op {
                FormatStateOp::IsMarked => FormatState::Marked(false),
                FormatStateOp::Intent => FormatState::Intent(None),
                _ => FormatState::Done,
            })
        })
    }

    fn describe(&self) -> String {
        format!("fixed key + {}", self.inner.describe())
    }

    /// The fixed key lives in the configuration: nothing can delete it
    /// from a key manager, and no holder is kept.
    fn hold<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        holder: &'a super::KeyHolder,
        op: super::HoldOp,
        revoke_read: bool,
    ) -> BoxFuture<'a, Result<super::Hold, KeyError>> {
        if !Self::is_fixed(id) {
            return self.inner.hold(id, auth, holder, op, revoke_read);
        }
        Box::pin(async { Ok(super::Hold::NoHolders) })
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

    fn fetch_certificate<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Vec<u8>, KeyError>> {
        self.inner.fetch_certificate(id, auth)
    }
}

//! The "this key's volume was formatted" marker and the "a format of this
//! key's volume started" intent kept on local disk: the local key store's
//! only copies, and the fallback when Barbican's policy does not let us
//! write secret metadata.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{FormatIntent, FormatState, FormatStateOp, KeyError, KeyId};
use crate::state_file::{self, Durability};

/// Markers as files under `<state_dir>/formatted/`, intents as one-line
/// files under `<state_dir>/format-intents/`.
#[derive(Clone, Debug)]
pub struct LocalMarkers {
    dir: PathBuf,
    intents: PathBuf,
}

/// A file name for any key id: the UUID when the id names one, else a
/// hash of the id (ids may be hrefs with slashes).
fn file_name(id: &KeyId) -> String {
    match id.uuid() {
        Ok(u) => u.hyphenated().to_string(),
        Err(_) => hex::encode(Sha256::digest(id.as_str().as_bytes())),
    }
}

/// Largest intent file read; a valid one is under 200 bytes.
const MAX_INTENT_FILE: u64 = 4096;

impl LocalMarkers {
    /// Markers under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        LocalMarkers {
            dir: state_dir.join("formatted"),
            intents: state_dir.join("format-intents"),
        }
    }

    fn path(&self, id: &KeyId) -> PathBuf {
        self.dir.join(file_name(id))
    }

    fn err(&self, id: &KeyId, op: &str, path: &Path, source: std::io::Error) -> KeyError {
        KeyError::Local {
            key_id: id.to_string(),
            op: op.into(),
            path: path.display().to_string(),
            source,
        }
    }

    /// Whether a marker exists.
    pub fn is_marked(&self, id: &KeyId) -> Result<bool, KeyError> {
        let p = self.path(id);
        match fs::symlink_metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(id, "reading formatted marker", &p, e)),
        }
    }

    /// Creates the marker durably (file and directory entry flushed).
    pub fn mark(&self, id: &KeyId) -> Result<(), KeyError> {
        let p = self.path(id);
        state_file::replace(
            &p,
            format!("{}\n", id.as_str()).as_bytes(),
            Durability::PowerLoss,
        )
        .map_err(|e| self.err(id, "writing formatted marker", &p, e))
    }

    /// The recorded format intent; `None` when there is none or when the
    /// file does not hold a valid one (logged: such a file was not written
    /// by us, and an intent we cannot read must not allow a format).
    pub fn intent(&self, id: &KeyId) -> Result<Option<FormatIntent>, KeyError> {
        use std::io::Read;
        let p = self.intents.join(file_name(id));
        let mut text = String::new();
        match File::open(&p).and_then(|f| f.take(MAX_INTENT_FILE).read_to_string(&mut text)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => text.clear(),
            Err(e) => return Err(self.err(id, "reading format intent", &p, e)),
        }
        let intent = FormatIntent::decode(&text);
        if intent.is_none() {
            tracing::warn!(
                key_id = id.as_str(),
                path = %p.display(),
                "ignoring a local format intent that does not parse"
            );
        }
        Ok(intent)
    }

    /// Records `intent` durably, replacing an earlier one, so that a crash
    /// leaves the old intent or the new one.
    pub fn set_intent(&self, id: &KeyId, intent: &FormatIntent) -> Result<(), KeyError> {
        let p = self.intents.join(file_name(id));
        let line = format!("{}\n", intent.encode());
        state_file::replace(&p, line.as_bytes(), Durability::PowerLoss)
            .map_err(|e| self.err(id, "writing format intent", &p, e))
    }
}

impl LocalMarkers {
    /// Does what [`super::KeyManager::format_state`] asks, locally.
    pub fn apply(&self, id: &KeyId, op: FormatStateOp<'_>) -> Result<FormatState, KeyError> {
        Ok(match op {
            FormatStateOp::IsMarked => FormatState::Marked(self.is_marked(id)?),
            FormatStateOp::Mark => {
                self.mark(id)?;
                FormatState::Done
            }
            FormatStateOp::SetIntent(intent) => {
                self.set_intent(id, intent)?;
                FormatState::Done
            }
            FormatStateOp::WithdrawIntent(intent) => {
                self.withdraw_intent(id, intent)?;
                FormatState::Done
            }
            FormatStateOp::Intent => FormatState::Intent(self.intent(id)?),
        })
    }

    /// Removes the recorded intent when it is `intent` (durably).
    pub fn withdraw_intent(&self, id: &KeyId, intent: &FormatIntent) -> Result<(), KeyError> {
        if self.intent(id)?.as_ref() != Some(intent) {
            return Ok(());
        }
        let p = self.intents.join(file_name(id));
        match fs::remove_file(&p) {
            Ok(()) => state_file::sync_dir(&self.intents)
                .map_err(|e| self.err(id, "removing format intent", &p, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(id, "removing format intent", &p, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_round_trip_replace_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let m = LocalMarkers::new(dir.path());
        let id = KeyId::new("https://kms/v1/secrets/6f1c1f1e-0000-4000-8000-000000000001").unwrap();
        assert_eq!(m.intent(&id).unwrap(), None);
        let first = FormatIntent::new_here();
        m.set_intent(&id, &first).unwrap();
        assert_eq!(m.intent(&id).unwrap(), Some(first));
        let second = FormatIntent::new_here();
        m.set_intent(&id, &second).unwrap();
        assert_eq!(m.intent(&id).unwrap(), Some(second));
        let file = dir
            .path()
            .join("format-intents/6f1c1f1e-0000-4000-8000-000000000001");
        assert!(file.is_file());
        for garbage in [&b"nonsense"[..], b"\xff\xfe", b""] {
            fs::write(&file, garbage).unwrap();
            assert_eq!(m.intent(&id).unwrap(), None);
        }
        // Another key has its own intent.
        let other = KeyId::new("not-a-uuid/x").unwrap();
        assert_eq!(m.intent(&other).unwrap(), None);
    }
}

//! This host's hold on the keys of its attached volumes (Barbican: a secret
//! consumer, and the agent's user on the secret's read ACL): taken after an
//! attach in either mode, released after the detach. A record per volume
//! under the run directory (`holds/`) says which key is held and whether
//! the agent added itself to the key's read ACL, because a detach carries
//! no key of its own and should only undo what its attach did.

use serde::{Deserialize, Serialize};

use super::records::{RunRecords, attach_records};
use super::{Failure, Volumes};
use crate::keymgr::{Hold, HoldOp, KeyHolder, KeyId, RequestAuth};
use crate::volume::id::VolumeId;
use crate::volume::spec::EncryptionSpec;

/// The run directory's subdirectory of hold records.
const HOLD_RECORDS: &str = "holds";

/// What an attach's hold on its key came to, as status shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyHoldRecord {
    /// The key id.
    pub key_id: String,
    /// Whether the key manager registered this host as a user of the key
    /// (Barbican: a consumer), so that it refuses to delete the key.
    pub consumer: bool,
    /// Whether the agent added its own user to the key's read ACL.
    pub granted_read: bool,
    /// Why no consumer is registered, when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The hold records under `run_dir`, by volume id (for status listings).
pub fn key_holds(run_dir: &std::path::Path) -> Vec<(String, KeyHoldRecord)> {
    RunRecords::new(run_dir, HOLD_RECORDS).all()
}

/// Whether the volume is attached on this host in either mode.
fn is_attached(run_dir: &std::path::Path, volume_id: &str) -> bool {
    attach_records(run_dir).path(volume_id).exists()
        || RunRecords::new(run_dir, super::native::SECRET_RECORDS)
            .path(volume_id)
            .exists()
}

impl Volumes<'_> {
    fn hold_records(&self) -> RunRecords {
        RunRecords::new(&self.opts.run_dir, HOLD_RECORDS)
    }

    /// After an attach: asks the key manager to keep the volume's key while
    /// it is attached here, and records the answer. `None` for a volume
    /// without front-end encryption, or one that is no longer attached (a
    /// detach came in between). A refusal is logged once per volume and is
    /// not an error unless the key manager's configuration requires the
    /// hold (then `Err`, and the caller undoes the attach).
    pub async fn hold_key(
        &self,
        volume_id: &VolumeId,
        spec: &EncryptionSpec,
        auth: &RequestAuth,
    ) -> Result<Option<KeyHoldRecord>, Failure> {
        let Some(begun) = self.begin(volume_id, spec, true, |_| Ok(()))? else {
            return Ok(None);
        };
        if !is_attached(&self.opts.run_dir, volume_id) {
            return Ok(None);
        }
        let key_id = KeyId::new(begun.key_id)?;
        let earlier: Option<KeyHoldRecord> = self.hold_records().read(volume_id);
        let holder = KeyHolder::here(volume_id);
        let hold = self
            .keys
            .hold(&key_id, auth, &holder, HoldOp::Take, false)
            .await
            .map_err(|source| Failure::KeyHold { source })?;
        let granted_before = earlier
            .as_ref()
            .is_some_and(|r| r.key_id == key_id.as_str() && r.granted_read);
        let record = match hold {
            Hold::Held { granted_read } => KeyHoldRecord {
                key_id: key_id.to_string(),
                consumer: true,
                granted_read: granted_read || granted_before,
                reason: None,
            },
            Hold::NotKept { reason } => {
                if earlier.as_ref().and_then(|r| r.reason.as_ref()) != Some(&reason) {
                    tracing::warn!(
                        volume_id = volume_id.as_str(),
                        key_id = key_id.as_str(),
                        "the key is not protected against deletion while attached: {reason}"
                    );
                }
                KeyHoldRecord {
                    key_id: key_id.to_string(),
                    consumer: false,
                    granted_read: granted_before,
                    reason: Some(reason),
                }
            }
            Hold::NoHolders => KeyHoldRecord {
                key_id: key_id.to_string(),
                consumer: false,
                granted_read: false,
                reason: Some("this key manager keeps no holders".into()),
            },
            Hold::Released { .. } => KeyHoldRecord {
                key_id: key_id.to_string(),
                consumer: false,
                granted_read: granted_before,
                reason: Some("released".into()),
            },
        };
        self.hold_records().write(volume_id, &record)?;
        Ok(Some(record))
    }

    /// After a detach: releases what [`hold_key`](Self::hold_key) took.
    /// A key manager that cannot be reached leaves the record, so that the
    /// next detach of the volume (detach is idempotent) tries again; the
    /// detach itself has succeeded and stays a success.
    pub async fn release_key(
        &self,
        volume_id: &VolumeId,
        spec: &EncryptionSpec,
        auth: &RequestAuth,
    ) -> Result<Option<Hold>, Failure> {
        let Some(_begun) = self.begin(volume_id, spec, false, |_| Ok(()))? else {
            return Ok(None);
        };
        if is_attached(&self.opts.run_dir, volume_id) {
            return Ok(None);
        }
        self.release_recorded(volume_id, auth).await
    }

    /// Releases the hold its record names, the volume's lock held by the
    /// caller and the volume known to be detached.
    pub(super) async fn release_recorded(
        &self,
        volume_id: &str,
        auth: &RequestAuth,
    ) -> Result<Option<Hold>, Failure> {
        let Some(record) = self.hold_records().read::<KeyHoldRecord>(volume_id) else {
            return Ok(None);
        };
        let key_id = KeyId::new(&record.key_id)?;
        if !record.consumer && !record.granted_read {
            self.hold_records().remove(volume_id)?;
            return Ok(None);
        }
        let holder = KeyHolder::here(volume_id);
        match self
            .keys
            .hold(&key_id, auth, &holder, HoldOp::Release, record.granted_read)
            .await
        {
            Ok(hold) => {
                if let Hold::NotKept { reason } = &hold {
                    tracing::warn!(
                        volume_id,
                        key_id = key_id.as_str(),
                        "this host's consumer of the key could not be removed: {reason}"
                    );
                }
                if let Hold::Released {
                    revoked_read: false,
                } = hold
                    && record.granted_read
                {
                    tracing::info!(
                        volume_id,
                        key_id = key_id.as_str(),
                        "the agent stays on the key's read ACL (a detach without the owner's token cannot change it)"
                    );
                }
                self.hold_records().remove(volume_id)?;
                Ok(Some(hold))
            }
            Err(e) => {
                tracing::warn!(
                    volume_id,
                    key_id = key_id.as_str(),
                    error = %crate::text::error_chain(&e),
                    "this host's consumer of the key was not removed; the next detach of the volume tries again"
                );
                Ok(None)
            }
        }
    }
}

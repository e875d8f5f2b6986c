//! One volume operation, from the API's request body to its response body:
//! attach, detach or extend, as a dm-crypt mapping or QEMU-native through a
//! libvirt secret. The agent's server and the CLI acting directly
//! (`--local`) both run operations through here, so they answer alike.

use std::time::Instant;

use super::api::{self, AttachResponse, DetachResponse, ExtendResponse, Mode, VolumeBody};
use super::codes::ApiCode;
use crate::text::error_chain;
use crate::volume::native::{NativeOptions, SecretAction};
use crate::volume::{
    Action, AttachRequest, EncryptionSpec, Failure, VolumeError, VolumeId, Volumes,
};

/// What a caller asks of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Attach (format on first use).
    Attach,
    /// Detach.
    Detach,
    /// Grow to the device's new size.
    Extend,
}

impl Op {
    /// The route's last segment and the log's name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Attach => "attach",
            Op::Detach => "detach",
            Op::Extend => "extend",
        }
    }
}

/// The name of a dm-mode action in answers and logs.
pub fn action_name(a: Action) -> &'static str {
    match a {
        Action::Created => "created",
        Action::Removed => "removed",
        Action::Identity => "identity",
        Action::NoOp => "no_op",
    }
}

fn secret_action_name(a: SecretAction) -> &'static str {
    match a {
        SecretAction::Created => "created",
        SecretAction::Reused => "reused",
        SecretAction::Replaced => "replaced",
        SecretAction::Removed => "removed",
        SecretAction::Kept => "kept",
        SecretAction::Absent => "absent",
        SecretAction::NoOp => "no_op",
    }
}

/// The volume layer's request for `body`; `Err` carries the message of an
/// `invalid_spec` answer.
pub fn request_of(volume_id: &VolumeId, body: &VolumeBody) -> Result<AttachRequest, String> {
    let spec: EncryptionSpec =
        serde_json::from_value(body.encryption.clone()).map_err(|e| format!("encryption: {e}"))?;
    Ok(AttachRequest {
        volume_id: volume_id.clone(),
        device_path: body.device.clone(),
        spec,
        multipath_id: body.multipath_id.clone(),
        auth: api::Auth::to_request_auth(body.auth.as_ref()),
    })
}

/// The answer of one operation: its JSON body and the action for the log.
pub struct Outcome {
    /// The response body (an `AttachResponse`, `DetachResponse` or
    /// `ExtendResponse`).
    pub body: serde_json::Value,
    /// What happened, for the operation's log line.
    pub action: &'static str,
}

/// Who asked for an operation, for its log line: the peer of the agent's
/// socket, or nobody for the CLI acting itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    /// The caller's uid.
    pub uid: Option<u32>,
    /// The caller's pid.
    pub pid: Option<i32>,
}

/// Runs `op` for `request` in `mode` and writes its one log line (operation,
/// mode, volume, device, outcome, duration, caller), the same whichever
/// front end ran it. A failure is a warning for the agent (`caller` is
/// its peer) and information for the CLI acting itself (`None`: the
/// command prints the error anyway).
pub async fn perform(
    volumes: &Volumes<'_>,
    native: &NativeOptions,
    op: Op,
    mode: Mode,
    keep_secret: bool,
    request: &AttachRequest,
    caller: Option<Caller>,
) -> Result<Outcome, VolumeError> {
    let started = Instant::now();
    let result = run(volumes, native, op, mode, keep_secret, request).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let device = request.device_path.to_string_lossy();
    let (op_name, mode_name) = (op.name(), mode.name());
    let vid = request.volume_id.as_str();
    let (uid, pid) = (caller.and_then(|c| c.uid), caller.and_then(|c| c.pid));
    // One line, whichever way it went; the fields that always come first.
    macro_rules! line {
        ($level:ident, $($rest:tt)*) => {
            tracing::$level!(
                op = op_name,
                mode = mode_name,
                volume_id = vid,
                device = %device,
                duration_ms = ms,
                uid,
                pid,
                $($rest)*
            )
        };
    }
    match &result {
        Ok(out) => line!(
            info,
            outcome = "ok",
            action = out.action,
            "volume operation"
        ),
        Err(e) => {
            let (outcome, error) = (ApiCode::of_volume(e).name(), error_chain(e));
            if caller.is_some() {
                line!(warn, outcome, error = %error, "volume operation");
            } else {
                line!(info, outcome, error = %error, "volume operation");
            }
        }
    }
    result
}

/// Runs `op` for `request` in `mode`. The caller holds no lock: the volume
/// layer serialises per volume itself.
async fn run(
    volumes: &Volumes<'_>,
    native: &NativeOptions,
    op: Op,
    mode: Mode,
    keep_secret: bool,
    request: &AttachRequest,
) -> Result<Outcome, VolumeError> {
    let started = Instant::now();
    let ms = || started.elapsed().as_secs_f64() * 1000.0;
    let vid = &request.volume_id;
    let (body, action) = match (op, mode) {
        (Op::Attach, Mode::Dm) => {
            let out = volumes.attach(request).await?;
            let key_held = hold_or_undo(volumes, native, mode, request).await?;
            let action = action_name(out.action);
            let r = AttachResponse {
                volume_id: vid.to_string(),
                path: out.path,
                mapping: out.mapping,
                action: action.into(),
                formatted: out.formatted,
                duration_ms: ms(),
                key_held,
                ..AttachResponse::default()
            };
            (serde_json::to_value(r), action)
        }
        (Op::Attach, Mode::Libvirt) => {
            let out = volumes.attach_native(request, native).await?;
            let key_held = hold_or_undo(volumes, native, mode, request).await?;
            let action = secret_action_name(out.secret);
            let r = AttachResponse {
                volume_id: vid.to_string(),
                path: out.path,
                mapping: None,
                action: action.into(),
                formatted: out.formatted,
                duration_ms: ms(),
                secret_uuid: out.secret_uuid,
                encryption_xml: out.encryption_xml,
                ephemeral: out.flags.map(|f| f.ephemeral),
                private: out.flags.map(|f| f.private),
                key_held,
            };
            (serde_json::to_value(r), action)
        }
        (Op::Detach, Mode::Dm) => {
            let out = volumes
                .detach(
                    vid,
                    &request.device_path,
                    &request.spec,
                    request.multipath_id.as_deref(),
                )
                .await?;
            release(volumes, request).await;
            let action = action_name(out.action);
            let r = DetachResponse {
                volume_id: vid.to_string(),
                mapping: out.mapping,
                action: action.into(),
                duration_ms: ms(),
                secret_uuid: None,
            };
            (serde_json::to_value(r), action)
        }
        (Op::Detach, Mode::Libvirt) => {
            let out = volumes.detach_native(vid, &request.spec, native, keep_secret)?;
            release(volumes, request).await;
            let action = secret_action_name(out.secret);
            let r = DetachResponse {
                volume_id: vid.to_string(),
                mapping: None,
                action: action.into(),
                duration_ms: ms(),
                secret_uuid: out.secret_uuid,
            };
            (serde_json::to_value(r), action)
        }
        (Op::Extend, Mode::Dm) => {
            let out = volumes.extend(request).await?;
            let r = ExtendResponse {
                volume_id: vid.to_string(),
                mapping: out.mapping,
                new_size: out.new_size,
                device_size: None,
                payload_offset: None,
            };
            (serde_json::to_value(r), "extended")
        }
        (Op::Extend, Mode::Libvirt) => {
            let out = volumes.extend_native(request)?;
            let r = ExtendResponse {
                volume_id: vid.to_string(),
                mapping: None,
                new_size: out.new_size,
                device_size: Some(out.device_size),
                payload_offset: Some(out.payload_offset),
            };
            (serde_json::to_value(r), "extended")
        }
    };
    Ok(Outcome {
        // Plain structs of strings and numbers always serialise.
        body: body.unwrap_or_default(),
        action,
    })
}

/// After an attach: asks the key manager to keep the volume's key while it
/// is attached here (`Some(kept)`; `None`: no key to keep). When the
/// configuration requires that and it was refused, the attach is undone
/// and the refusal is the answer. A local failure to record the hold is
/// logged: the attach itself stands.
async fn hold_or_undo(
    volumes: &Volumes<'_>,
    native: &NativeOptions,
    mode: Mode,
    request: &AttachRequest,
) -> Result<Option<bool>, VolumeError> {
    let vid = &request.volume_id;
    match volumes.hold_key(vid, &request.spec, &request.auth).await {
        Ok(held) => Ok(held.map(|h| h.consumer)),
        Err(cause @ Failure::KeyHold { .. }) => {
            let undone = match mode {
                Mode::Dm => volumes
                    .detach(
                        vid,
                        &request.device_path,
                        &request.spec,
                        request.multipath_id.as_deref(),
                    )
                    .await
                    .map(drop),
                Mode::Libvirt => volumes
                    .detach_native(vid, &request.spec, native, false)
                    .map(drop),
            };
            Err(VolumeError::new(
                vid,
                Failure::with_rollback(cause, undone.map_err(|e| e.failure)),
            ))
        }
        Err(other) => {
            tracing::warn!(
                volume_id = vid.as_str(),
                error = %error_chain(&other),
                "the hold on the volume's key was not recorded"
            );
            Ok(None)
        }
    }
}

/// After a detach: releases the hold its attach took. Failures are logged
/// (the detach has happened); a later detach of the volume tries again.
async fn release(volumes: &Volumes<'_>, request: &AttachRequest) {
    let vid = &request.volume_id;
    if let Err(e) = volumes.release_key(vid, &request.spec, &request.auth).await {
        tracing::warn!(
            volume_id = vid.as_str(),
            error = %error_chain(&e),
            "the hold on the volume's key was not released"
        );
    }
}

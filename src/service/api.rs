//! Request and response bodies of the API, shared by the server and the
//! CLI's client. Unknown fields are errors everywhere, except inside the
//! `encryption` object: it is cinder's metadata dictionary exactly as the
//! CLI's `--encryption` takes it, and cinder adds fields of its own.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keymgr::{RequestAuth, SecretString};

/// How an attached volume reaches its user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A dm-crypt mapping on this host; the answer names its device.
    #[default]
    Dm,
    /// QEMU decrypts the volume itself with a passphrase held in a libvirt
    /// secret (nova's native path, provider `luks` only); the answer
    /// carries the disk's `<encryption>` element.
    Libvirt,
}

impl Mode {
    /// The name as the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Dm => "dm",
            Mode::Libvirt => "libvirt",
        }
    }
}

/// A credential in a request body; redacted in `Debug`, zeroized on drop.
#[derive(Clone)]
pub struct Secret(pub SecretString);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = zeroize::Zeroizing::new(String::deserialize(d)?);
        Ok(Secret(SecretString::new(&s)))
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.expose())
    }
}

/// Whose credentials fetch the key: the CLI's `--token-file` and
/// `--service-token-file`. Absent: the agent's own credentials.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Auth {
    /// The caller's Keystone token.
    pub token: Secret,
    /// A service token to send along (`X-Service-Token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_token: Option<Secret>,
    /// Fields the API does not know (a request with any is refused).
    #[serde(flatten, skip_serializing)]
    pub unknown: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Auth {
    /// The fields the API knows.
    pub const FIELDS: &'static [&'static str] = &["token", "service_token"];
}

impl Auth {
    /// The key manager's form.
    pub fn to_request_auth(auth: Option<&Auth>) -> RequestAuth {
        match auth {
            None => RequestAuth::Service,
            Some(a) => RequestAuth::UserToken {
                token: a.token.0.clone(),
                service_token: a.service_token.as_ref().map(|s| s.0.clone()),
            },
        }
    }
}

/// Body of `POST /v1/volumes/{id}/attach`, `.../detach` and `.../extend`.
/// Unknown fields are collected, not ignored: the server refuses a body
/// with any (`unknown_field`), by this type rather than by the text of a
/// parser's message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeBody {
    /// The connector's device path (a block device or a symlink to one).
    pub device: PathBuf,
    /// Cinder's encryption metadata, the shape of the CLI's `--encryption`.
    pub encryption: serde_json::Value,
    /// Multipath WWN of the device (an older mapping name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipath_id: Option<String>,
    /// Whose credentials fetch the key; absent: the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// `dm` (default) or `libvirt`.
    #[serde(default)]
    pub mode: Mode,
    /// Detach in libvirt mode: leave the volume's secret defined (as nova
    /// does across a hard reboot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_secret: bool,
    /// Fields the API does not know (a request with any is refused).
    #[serde(flatten, skip_serializing)]
    pub unknown: std::collections::BTreeMap<String, serde_json::Value>,
}

impl VolumeBody {
    /// The first field, here or in `auth`, that the API does not know,
    /// and the fields it expected there.
    pub fn unknown_field(&self) -> Option<(&str, &'static [&'static str])> {
        first_unknown(&self.unknown, Self::FIELDS, self.auth.as_ref())
    }

    /// The fields the API knows.
    pub const FIELDS: &'static [&'static str] = &[
        "device",
        "encryption",
        "multipath_id",
        "auth",
        "mode",
        "keep_secret",
    ];
}

/// Answer to an attach.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachResponse {
    /// Volume.
    pub volume_id: String,
    /// The device the guest should use.
    pub path: PathBuf,
    /// The mapping name (absent for volumes without front-end encryption).
    pub mapping: Option<String>,
    /// dm mode: `created`, `identity` (already attached) or `no_op`.
    /// libvirt mode, what happened to the secret: `created`, `reused`,
    /// `replaced` or `no_op`.
    pub action: String,
    /// Whether this attach formatted the volume.
    pub formatted: bool,
    /// Time the operation took, in milliseconds.
    pub duration_ms: f64,
    /// libvirt mode: the volume's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_uuid: Option<String>,
    /// libvirt mode: the `<encryption>` element for the disk's XML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_xml: Option<String>,
    /// libvirt mode: whether the secret lives in libvirtd's memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// libvirt mode: whether the secret's value cannot be read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<bool>,
    /// Whether the key manager keeps the volume's key while it is attached
    /// here (Barbican: this host is a consumer of the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_held: Option<bool>,
}

/// Answer to a detach.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachResponse {
    /// Volume.
    pub volume_id: String,
    /// The mapping name.
    pub mapping: Option<String>,
    /// dm mode: `removed`, `identity` (was not attached) or `no_op`.
    /// libvirt mode, what happened to the secret: `removed`, `kept`,
    /// `absent` or `no_op`.
    pub action: String,
    /// Time the operation took, in milliseconds.
    pub duration_ms: f64,
    /// libvirt mode: the volume's secret, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_uuid: Option<String>,
}

/// Answer to an extend.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendResponse {
    /// Volume.
    pub volume_id: String,
    /// The mapping name.
    pub mapping: Option<String>,
    /// Size of the decrypted device in bytes (libvirt mode: what the
    /// guest sees, device size minus payload offset, as nova computes it).
    pub new_size: u64,
    /// libvirt mode: the device's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_size: Option<u64>,
    /// libvirt mode: where the encrypted payload starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_offset: Option<u64>,
}

/// A dm-crypt mapping as the kernel reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Name.
    pub name: String,
    /// DM uuid.
    pub uuid: String,
    /// `major:minor`.
    pub device: String,
    /// Number of openers.
    pub open_count: i32,
}

/// One attached volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeStatus {
    /// Volume.
    pub volume_id: String,
    /// How it is attached.
    #[serde(default)]
    pub mode: Mode,
    /// dm mode: the mapping its attach created.
    pub mapping: Option<String>,
    /// dm mode: the connector's device path.
    pub device_path: Option<PathBuf>,
    /// dm mode: where the device path pointed before attach.
    pub original_target: Option<PathBuf>,
    /// dm mode: the mapping as the kernel reports it; absent when it is
    /// gone or device-mapper cannot be asked.
    pub kernel: Option<Mapping>,
    /// libvirt mode: the secret QEMU reads the passphrase from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_uuid: Option<String>,
    /// The volume's key, and whether the key manager keeps it while the
    /// volume is attached here (Barbican: this host is a consumer of the
    /// secret); absent when the attach recorded no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::volume::KeyHoldRecord>,
    /// Whether the volume uses nova's legacy fixed key (the all-zeros key
    /// id); absent when the attach recorded no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_key: Option<bool>,
}

/// Answer to `GET /v1/volumes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumesResponse {
    /// Volumes with an attach record.
    pub volumes: Vec<VolumeStatus>,
    /// Every dm-crypt mapping (ours and cryptsetup's), as `luks-agent
    /// status` lists them; absent when device-mapper cannot be asked.
    pub mappings: Option<Vec<Mapping>>,
    /// Why device-mapper could not be asked.
    pub device_mapper_error: Option<String>,
}

/// Answer to `GET /healthz`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The agent's version.
    pub version: String,
    /// Volume operations running now.
    pub operations_in_flight: u64,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error: a stable code for programs, a message for people.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable snake_case code (see the README's table).
    pub code: String,
    /// What went wrong, with its causes; never key material.
    pub message: String,
    /// The volume, when the request named one.
    pub volume_id: Option<String>,
}

/// Body of `POST /v1/images/{id}/verify`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageVerifyBody {
    /// The image file; the caller must be able to read it.
    pub file: PathBuf,
    /// The image's glance properties (the `img_signature*` ones matter).
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// Trusted certificate ids: when given, the signing certificate must
    /// chain to one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_certificate_ids: Vec<String>,
    /// Whose credentials fetch the certificates; absent: the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// Fields the API does not know (a request with any is refused).
    #[serde(flatten, skip_serializing)]
    pub unknown: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ImageVerifyBody {
    /// The fields the API knows.
    pub const FIELDS: &'static [&'static str] =
        &["file", "properties", "trusted_certificate_ids", "auth"];
}

/// The first of a body's `unknown` fields, else the first of its `auth`
/// object's, with the fields expected there.
fn first_unknown<'a>(
    unknown: &'a std::collections::BTreeMap<String, serde_json::Value>,
    fields: &'static [&'static str],
    auth: Option<&'a Auth>,
) -> Option<(&'a str, &'static [&'static str])> {
    if let Some(f) = unknown.keys().next() {
        return Some((f, fields));
    }
    auth?
        .unknown
        .keys()
        .next()
        .map(|f| (f.as_str(), Auth::FIELDS))
}

/// A request body whose unknown fields are refused.
pub trait KnownFields {
    /// The first field, here or in `auth`, that the API does not know,
    /// and the fields it expected there.
    fn unknown_field(&self) -> Option<(&str, &'static [&'static str])>;
}

impl KnownFields for VolumeBody {
    fn unknown_field(&self) -> Option<(&str, &'static [&'static str])> {
        VolumeBody::unknown_field(self)
    }
}

impl KnownFields for ImageVerifyBody {
    fn unknown_field(&self) -> Option<(&str, &'static [&'static str])> {
        first_unknown(&self.unknown, Self::FIELDS, self.auth.as_ref())
    }
}

/// Answer of `POST /v1/images/{id}/verify` (and the CLI's output).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVerdict {
    /// Glance's image id.
    pub image_id: String,
    /// `verified` or `not_signed`.
    pub result: String,
    /// The hash method (verified images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_method: Option<String>,
    /// The key type (verified images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    /// The signing certificate (verified images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// Whether the certificate chained to a trusted one.
    #[serde(default)]
    pub certificate_validated: bool,
    /// Bytes of the image hashed (verified images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl ImageVerdict {
    /// The answer for `verdict` about `image_id`.
    pub fn of(image_id: &str, verdict: &crate::image::Verdict) -> ImageVerdict {
        match verdict {
            crate::image::Verdict::NotSigned => ImageVerdict {
                image_id: image_id.into(),
                result: "not_signed".into(),
                hash_method: None,
                key_type: None,
                certificate_id: None,
                certificate_validated: false,
                bytes: None,
            },
            crate::image::Verdict::Verified(v) => ImageVerdict {
                image_id: image_id.into(),
                result: "verified".into(),
                hash_method: Some(v.hash_method.into()),
                key_type: Some(v.key_type.into()),
                certificate_id: Some(v.certificate_id.clone()),
                certificate_validated: v.certificate_validated,
                bytes: Some(v.bytes),
            },
        }
    }
}

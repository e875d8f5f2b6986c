//! libvirt secrets that hand a LUKS passphrase to QEMU's own LUKS driver,
//! in the shape nova's libvirt driver uses: usage type `volume`, usage id
//! the volume id, the value the passphrase. nova finds a volume's secret
//! with `virSecretLookupByUsage(VOLUME, volume_id)`, so it finds ours.
//!
//! Unlike nova's (persistent and readable, so the key sits base64-encoded
//! under `/etc/libvirt/secrets/`), our secrets are by default ephemeral
//! (held in libvirtd's memory only) and private (the value cannot be read
//! back through the API). The value goes to libvirtd only through
//! `virSecretSetValue`, straight from the caller's locked buffer, never
//! through argv, the environment, files or logs.
//!
//! This module knows nothing of key managers or devices: it takes a
//! passphrase and a volume id. libvirt itself is loaded on first use
//! (`ffi.rs`), so processes that never use this mode never load it.

mod ffi;

use self::ffi::{Connection, ERR_NO_SECRET, Failure, SecretHandle, USAGE_TYPE_VOLUME};
use crate::secret::Passphrase;

/// Marks the secrets this agent defines (their `<description>`), so
/// `secrets list` can tell them from nova's.
pub const DESCRIPTION_PREFIX: &str = "luks-agent: passphrase of volume ";

/// Why a libvirt operation failed. Names the URI, the volume and the
/// secret's UUID where known; never the value.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// libvirtd cannot be reached (not running, socket missing, refused),
    /// or libvirt is not installed.
    #[error("libvirt is unavailable at {uri}")]
    Unavailable {
        /// The connection URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: Failure,
    },
    /// An operation on a volume's secret failed.
    #[error("libvirt secret {uuid} of volume {volume_id}: {op}")]
    Secret {
        /// The volume (the secret's usage id).
        volume_id: String,
        /// The secret's UUID, or `-` before one exists.
        uuid: String,
        /// What we did.
        op: &'static str,
        /// libvirt's error.
        #[source]
        source: Failure,
    },
}

/// The flags of a secret that matter to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecretFlags {
    /// Held in libvirtd's memory only (gone when libvirtd stops).
    pub ephemeral: bool,
    /// The value cannot be read back through the API.
    pub private: bool,
}

/// A volume secret as libvirt reports it (never its value).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecretInfo {
    /// The secret's UUID, the one the disk's `<encryption>` names.
    pub uuid: String,
    /// The usage id: the volume id.
    pub volume_id: String,
    /// Its flags.
    #[serde(flatten)]
    pub flags: SecretFlags,
    /// Whether this agent defined it (by its description).
    pub ours: bool,
}

/// A connection to libvirt for managing volume secrets.
pub struct Secrets {
    conn: Connection,
    uri: String,
}

/// The `<encryption>` element of a disk whose passphrase is the secret
/// `uuid`, as nova writes it for QEMU-native LUKS.
pub fn encryption_xml(uuid: &str) -> String {
    format!("<encryption format='luks'><secret type='passphrase' uuid='{uuid}'/></encryption>")
}

/// The value of attribute `name` of the root element of libvirt's XML.
fn root_attr(xml: &str, name: &str) -> Option<String> {
    let start = xml.find("<secret")?;
    let end = start + xml[start..].find('>')?;
    let tag = &xml[start..end];
    for quote in ['\'', '"'] {
        let pat = format!("{name}={quote}");
        if let Some(p) = tag.find(&pat) {
            let rest = &tag[p + pat.len()..];
            return rest.find(quote).map(|q| rest[..q].to_string());
        }
    }
    None
}

/// The text of the first `<tag>` element.
fn element_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    Some(xml[start..start + len].to_string())
}

impl Secrets {
    /// Connects to libvirt at `uri` (for nova's secrets: `qemu:///system`).
    pub fn connect(uri: &str) -> Result<Secrets, LibvirtError> {
        let conn = Connection::open(uri).map_err(|source| LibvirtError::Unavailable {
            uri: uri.to_string(),
            source,
        })?;
        Ok(Secrets {
            conn,
            uri: uri.to_string(),
        })
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn err(volume_id: &str, uuid: &str, op: &'static str) -> impl FnOnce(Failure) -> LibvirtError {
        let (volume_id, uuid) = (volume_id.to_string(), uuid.to_string());
        move |source| LibvirtError::Secret {
            volume_id,
            uuid,
            op,
            source,
        }
    }

    fn info_of(secret: &SecretHandle, volume_id: &str) -> Result<SecretInfo, LibvirtError> {
        let uuid = secret
            .uuid()
            .map_err(Self::err(volume_id, "-", "reading the UUID"))?;
        let xml = secret
            .xml()
            .map_err(Self::err(volume_id, &uuid, "reading the definition"))?;
        // Flags, usage id and description in one call: the XML has them all.
        let usage = element_text(&xml, "volume").unwrap_or_default();
        Ok(SecretInfo {
            uuid,
            volume_id: usage,
            flags: SecretFlags {
                ephemeral: root_attr(&xml, "ephemeral").as_deref() == Some("yes"),
                private: root_attr(&xml, "private").as_deref() == Some("yes"),
            },
            ours: element_text(&xml, "description")
                .is_some_and(|d| d.starts_with(DESCRIPTION_PREFIX)),
        })
    }

    /// The secret of `volume_id`, looked up by usage exactly as nova does.
    pub fn find(&self, volume_id: &str) -> Result<Option<SecretInfo>, LibvirtError> {
        match self.conn.lookup_by_usage(USAGE_TYPE_VOLUME, volume_id) {
            Ok(s) => Self::info_of(&s, volume_id).map(Some),
            Err(e) if e.code == ERR_NO_SECRET => Ok(None),
            Err(e) => Err(Self::err(volume_id, "-", "looking up by usage")(e)),
        }
    }

    /// Defines the secret of `volume_id` with `flags` and our description,
    /// or redefines the existing secret `uuid` that way (libvirt keeps the
    /// UUID, so a disk that names it still finds it). Returns the UUID.
    /// The value is set separately ([`Secrets::set_value`]).
    pub fn define(
        &self,
        volume_id: &str,
        flags: SecretFlags,
        uuid: Option<&str>,
    ) -> Result<String, LibvirtError> {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        // Volume ids are validated by the caller (letters, digits, '-',
        // '_' and '.'), so they need no XML escaping; UUIDs come from
        // libvirt.
        let xml = format!(
            "<secret ephemeral='{}' private='{}'>{}<description>{DESCRIPTION_PREFIX}{volume_id}</description><usage type='volume'><volume>{volume_id}</volume></usage></secret>",
            yes_no(flags.ephemeral),
            yes_no(flags.private),
            uuid.map(|u| format!("<uuid>{u}</uuid>"))
                .unwrap_or_default(),
        );
        let secret = self.conn.define_secret(&xml).map_err(Self::err(
            volume_id,
            uuid.unwrap_or("-"),
            "defining",
        ))?;
        secret.uuid().map_err(Self::err(
            volume_id,
            uuid.unwrap_or("-"),
            "reading the UUID",
        ))
    }

    fn lookup(&self, volume_id: &str, uuid: &str) -> Result<SecretHandle, LibvirtError> {
        self.conn
            .lookup_by_uuid(uuid)
            .map_err(Self::err(volume_id, uuid, "looking up by UUID"))
    }

    /// Sets the value of secret `uuid` to `passphrase`. The bytes go from
    /// the caller's locked buffer straight to the RPC call; no copy is made
    /// here.
    pub fn set_value(
        &self,
        volume_id: &str,
        uuid: &str,
        passphrase: &Passphrase,
    ) -> Result<(), LibvirtError> {
        self.lookup(volume_id, uuid)?
            .set_value(passphrase.expose())
            .map_err(Self::err(volume_id, uuid, "setting the value"))
    }

    /// Undefines secret `uuid` (its value and, for a persistent secret, its
    /// files under `/etc/libvirt/secrets/`). A secret that is already gone
    /// is not an error: returns whether this call removed it.
    pub fn undefine(&self, volume_id: &str, uuid: &str) -> Result<bool, LibvirtError> {
        let secret = match self.conn.lookup_by_uuid(uuid) {
            Ok(s) => s,
            Err(e) if e.code == ERR_NO_SECRET => return Ok(false),
            Err(e) => return Err(Self::err(volume_id, uuid, "looking up by UUID")(e)),
        };
        match secret.undefine() {
            Ok(()) => Ok(true),
            Err(e) if e.code == ERR_NO_SECRET => Ok(false),
            Err(e) => Err(Self::err(volume_id, uuid, "undefining")(e)),
        }
    }

    /// Whether a domain, running or only defined, names the secret `uuid`
    /// (a disk's `<secret ... uuid='...'/>`): a guest may still use it
    /// although the secret itself is gone (an ephemeral secret after a
    /// libvirtd restart).
    pub fn used_by_a_domain(&self, volume_id: &str, uuid: &str) -> Result<bool, LibvirtError> {
        let domains =
            self.conn
                .list_all_domains()
                .map_err(Self::err(volume_id, uuid, "listing domains"))?;
        for d in &domains {
            // A domain that vanished between the listing and this call
            // uses nothing.
            if let Ok(xml) = d.xml()
                && xml.contains(uuid)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every secret of usage type `volume`, ours and others'.
    pub fn list(&self) -> Result<Vec<SecretInfo>, LibvirtError> {
        let all = self
            .conn
            .list_all_secrets()
            .map_err(Self::err("-", "-", "listing secrets"))?;
        let mut out = Vec::new();
        for s in &all {
            // Secrets of other usage types (ceph, iscsi, tls, vtpm) are not
            // volume passphrases.
            let volume = s.usage_type().is_ok_and(|t| t == USAGE_TYPE_VOLUME);
            if volume {
                out.push(Self::info_of(s, "-")?);
            }
        }
        out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_attributes_and_elements() {
        let xml = "<secret ephemeral='yes' private=\"no\">\n  <uuid>u</uuid>\n  <description>luks-agent: passphrase of volume v</description>\n  <usage type='volume'>\n    <volume>v</volume>\n  </usage>\n</secret>\n";
        assert_eq!(root_attr(xml, "ephemeral").as_deref(), Some("yes"));
        assert_eq!(root_attr(xml, "private").as_deref(), Some("no"));
        assert_eq!(root_attr(xml, "type"), None, "only the root element");
        assert_eq!(element_text(xml, "volume").as_deref(), Some("v"));
        assert!(
            element_text(xml, "description").is_some_and(|d| d.starts_with(DESCRIPTION_PREFIX))
        );
    }

    #[test]
    fn encryption_element_is_novas() {
        assert_eq!(
            encryption_xml("0b4b8f5e-1111-2222-3333-444455556666"),
            "<encryption format='luks'><secret type='passphrase' uuid='0b4b8f5e-1111-2222-3333-444455556666'/></encryption>"
        );
    }

    #[test]
    fn an_unreachable_daemon_is_a_typed_error_naming_the_uri() {
        // libvirt's in-process test driver has no secrets; secrets are
        // tested against a real libvirtd in tests/libvirt_native.rs.
        let uri = "qemu:///system?socket=/nonexistent/luks-agent-test-sock";
        match Secrets::connect(uri) {
            Err(e @ LibvirtError::Unavailable { .. }) => {
                assert!(e.to_string().contains(uri), "{e}")
            }
            Err(e) => panic!("wrong error: {e:?}"),
            Ok(_) => panic!("connected to a socket that does not exist"),
        }
    }
}

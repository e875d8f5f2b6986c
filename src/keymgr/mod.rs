//! Key managers: where a volume's key comes from. Barbican behind Keystone
//! on a cloud, the legacy fixed key of nova's ConfKeyManager, and a local
//! key store for machines without a cloud. This layer knows nothing of
//! devices; it returns key material and keeps the per-key "formatted"
//! marker and "formatting" intent that the first-use format guard
//! consults (see `volume/guard.rs`).

pub mod barbican;
mod consumers;
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

/// The first certificate block of a PEM payload (`CERTIFICATE` or
/// `X509 CERTIFICATE`), as DER: what castellan makes of a Barbican
/// `certificate` secret (cryptography's `load_pem_x509_certificate`: text
/// before the block and further blocks are ignored, the base64 may be
/// wrapped at any width; a payload without such a block, DER included, is
/// refused).
pub fn certificate_from_pem(payload: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let (start, label) = ["CERTIFICATE", "X509 CERTIFICATE"]
        .iter()
        .filter_map(|l| find(payload, format!("-----BEGIN {l}-----").as_bytes()).map(|at| (at, *l)))
        .min()
        .ok_or(
            "the payload holds no PEM CERTIFICATE block (castellan reads certificates only as PEM)",
        )?;
    let body_start = start + format!("-----BEGIN {label}-----").len();
    let end_line = format!("-----END {label}-----");
    let body_len = find(&payload[body_start..], end_line.as_bytes())
        .ok_or("the PEM CERTIFICATE block has no END line")?;
    let body: Vec<u8> = payload[body_start..body_start + body_len]
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let der = lenient
        .decode(&body)
        .map_err(|e| format!("the PEM CERTIFICATE block is not base64: {e}"))?;
    if der.is_empty() {
        return Err("the PEM CERTIFICATE block is empty".into());
    }
    Ok(der)
}

/// A certificate file as an operator hands it over: PEM (the first
/// CERTIFICATE block) or DER.
pub fn certificate_pem_or_der(payload: &[u8]) -> Result<Vec<u8>, String> {
    if payload.windows(10).any(|w| w == b"-----BEGIN") {
        certificate_from_pem(payload)
    } else {
        Ok(payload.to_vec())
    }
}

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

    /// [`uuid`](Self::uuid) as Barbican's URLs and the local store's file
    /// names spell it (lowercase, hyphenated).
    pub fn uuid_text(&self) -> Result<String, KeyError> {
        Ok(self.uuid()?.hyphenated().to_string())
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

/// Longest host name kept in a [`FormatIntent`]; longer names are cut.
pub const MAX_INTENT_HOST_LEN: usize = 128;

/// A first-use format that was started: stored beside the key, before the
/// first byte goes to the device, so that any host that later attaches the
/// volume can tell the leftovers of an interrupted format of ours (a
/// header carrying this UUID, or no header) from anything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatIntent {
    /// The UUID the format writes into the LUKS header.
    pub luks_uuid: uuid::Uuid,
    /// When the format started, in seconds since the Unix epoch.
    pub started_at: u64,
    /// The host that started it (for refusals and logs only).
    pub host: String,
}

impl FormatIntent {
    /// An intent to format now, on this host, with a fresh UUID.
    pub fn new_here() -> FormatIntent {
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        FormatIntent {
            luks_uuid: uuid::Uuid::new_v4(),
            started_at,
            host: clean_host(&this_host()),
        }
    }

    /// The stored form: `<uuid>,<unix seconds>,<host>`. Short, because
    /// Barbican's metadata values are short strings.
    pub fn encode(&self) -> String {
        format!(
            "{},{},{}",
            self.luks_uuid.hyphenated(),
            self.started_at,
            self.host
        )
    }

    /// Parses a stored intent. Anything else than exactly what
    /// [`encode`](Self::encode) writes (a hyphenated UUID, decimal seconds,
    /// a host of printable ASCII without commas) is `None`: the value may
    /// have been set by anyone with write access to the key's metadata.
    pub fn decode(s: &str) -> Option<FormatIntent> {
        let mut parts = s.trim_end_matches('\n').splitn(3, ',');
        let (uuid, secs, host) = (parts.next()?, parts.next()?, parts.next()?);
        if uuid.len() != 36 || secs.is_empty() || secs.len() > 20 {
            return None;
        }
        if !secs.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if host.is_empty()
            || host.len() > MAX_INTENT_HOST_LEN
            || !host.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        {
            return None;
        }
        Some(FormatIntent {
            luks_uuid: uuid::Uuid::try_parse(uuid).ok()?,
            started_at: secs.parse().ok()?,
            host: host.to_string(),
        })
    }
}

/// The name of this host as the kernel reports it, `unknown` if unset.
fn this_host() -> String {
    match nix::unistd::gethostname() {
        Ok(name) if !name.is_empty() => name.to_string_lossy().into_owned(),
        _ => "unknown".into(),
    }
}

/// A host name as [`FormatIntent::decode`] accepts it: printable ASCII
/// without commas (others become `_`), at most [`MAX_INTENT_HOST_LEN`].
fn clean_host(host: &str) -> String {
    let cleaned: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ',' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_INTENT_HOST_LEN)
        .collect();
    if cleaned.is_empty() {
        "unknown".into()
    } else {
        cleaned
    }
}

/// What [`KeyManager::format_state`] is asked to do.
#[derive(Clone, Copy, Debug)]
pub enum FormatStateOp<'a> {
    /// Is the volume recorded as formatted?
    IsMarked,
    /// Record it as formatted.
    Mark,
    /// Record the intent of a format about to start.
    SetIntent(&'a FormatIntent),
    /// Remove the intent if it is this one.
    WithdrawIntent(&'a FormatIntent),
    /// What intent is recorded?
    Intent,
}

/// What [`KeyManager::format_state`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatState {
    /// The change was recorded.
    Done,
    /// Whether the volume is recorded as formatted.
    Marked(bool),
    /// The recorded intent, if any.
    Intent(Option<FormatIntent>),
}

/// The part of a [`FormatState`] answer one of the named forms returns.
fn answer<'a, T: 'a>(
    state: BoxFuture<'a, Result<FormatState, KeyError>>,
    pick: impl FnOnce(FormatState) -> T + Send + 'a,
) -> BoxFuture<'a, Result<T, KeyError>> {
    Box::pin(async move { state.await.map(pick) })
}

/// This host's attachment of a volume, as the holder of the volume's key:
/// while it lasts, the key manager is asked to keep the key (Barbican: a
/// secret consumer, which refuses a delete of the secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyHolder {
    /// The attached volume's id.
    pub volume_id: String,
    /// This host, as [`FormatIntent`] names hosts.
    pub host: String,
}

impl KeyHolder {
    /// The holder for `volume_id` on this host.
    pub fn here(volume_id: &str) -> KeyHolder {
        KeyHolder {
            volume_id: volume_id.into(),
            host: clean_host(&this_host()),
        }
    }
}

/// What [`KeyManager::hold`] is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldOp {
    /// Register the holder (at attach; again at a repeated attach).
    Take,
    /// Remove the holder (at detach).
    Release,
}

/// What came of a [`KeyManager::hold`] request that did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The key manager keeps the key for this holder. `granted_read`: the
    /// agent's own user was added to the key's read ACL now (so that
    /// attaches without a caller's token can fetch it).
    Held {
        /// Whether this request added the agent to the key's read ACL.
        granted_read: bool,
    },
    /// The holder is gone. `revoked_read`: the agent's own user was taken
    /// off the key's read ACL as well.
    Released {
        /// Whether this request removed the agent from the key's read ACL.
        revoked_read: bool,
    },
    /// This key manager has no notion of holders (the local store, the
    /// fixed key): nothing to take or release, nothing to warn about.
    NoHolders,
    /// The key manager refused to keep the key here (the reason says why;
    /// it names no key bytes).
    NotKept {
        /// Why not.
        reason: String,
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

    /// Fetches the X.509 certificate named by `id` (a secret of type
    /// `certificate`), as DER. Key managers without certificates answer
    /// that they hold none.
    fn fetch_certificate<'a>(
        &'a self,
        id: &'a KeyId,
        _auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Vec<u8>, KeyError>> {
        let endpoint = self.describe();
        Box::pin(async move {
            Err(KeyError::NotFound {
                key_id: id.to_string(),
                endpoint,
                status: 0,
            })
        })
    }

    /// Reads or changes what the key manager records about the format of
    /// the volume using this key (the "formatted" marker and the format
    /// intent). The one method each key manager implements; the methods
    /// below are its named forms.
    fn format_state<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        op: FormatStateOp<'a>,
    ) -> BoxFuture<'a, Result<FormatState, KeyError>>;

    /// Registers or removes `holder` as a user of the key, so that the key
    /// cannot be deleted while a volume using it is attached. `revoke_read`
    /// (at release): the agent's own read access, granted at an earlier
    /// take, may go when no other host of the agent holds the key. Key
    /// managers without such a notion answer [`Hold::NotKept`].
    fn hold<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        holder: &'a KeyHolder,
        op: HoldOp,
        revoke_read: bool,
    ) -> BoxFuture<'a, Result<Hold, KeyError>> {
        let _ = (id, auth, holder, op, revoke_read);
        Box::pin(async { Ok(Hold::NoHolders) })
    }

    /// Whether a volume using this key was formatted before.
    fn is_marked_formatted<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<bool, KeyError>> {
        answer(self.format_state(id, auth, FormatStateOp::IsMarked), |s| {
            s == FormatState::Marked(true)
        })
    }

    /// Records that a volume using this key has been formatted.
    fn mark_formatted<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<(), KeyError>> {
        answer(self.format_state(id, auth, FormatStateOp::Mark), drop)
    }

    /// Durably records that a first-use format of the volume using this
    /// key is about to start, replacing any earlier intent. Called before
    /// the first byte goes to the device.
    fn mark_formatting<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        intent: &'a FormatIntent,
    ) -> BoxFuture<'a, Result<(), KeyError>> {
        answer(
            self.format_state(id, auth, FormatStateOp::SetIntent(intent)),
            drop,
        )
    }

    /// Removes the recorded format intent when it is `intent`: a format
    /// that failed before its first write takes back what it recorded, so
    /// that its intent does not hold off later attaches. An intent that
    /// another attempt recorded since is left alone; no intent is fine.
    fn withdraw_formatting<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        intent: &'a FormatIntent,
    ) -> BoxFuture<'a, Result<(), KeyError>> {
        answer(
            self.format_state(id, auth, FormatStateOp::WithdrawIntent(intent)),
            drop,
        )
    }

    /// The last recorded format intent for this key, if any. A stored value
    /// that does not parse is logged and reported as no intent.
    fn formatting_intent<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Option<FormatIntent>, KeyError>> {
        answer(
            self.format_state(id, auth, FormatStateOp::Intent),
            |s| match s {
                FormatState::Intent(i) => i,
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_come_out_of_pem_as_castellan_reads_them() {
        use base64::Engine;
        let block = |der: &[u8]| {
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                base64::engine::general_purpose::STANDARD.encode(der)
            )
        };
        let (first, second) = (b"first der".as_slice(), b"second der".as_slice());
        let bundle = format!("Subject: x\n{}{}", block(first), block(second));
        assert_eq!(certificate_from_pem(bundle.as_bytes()).unwrap(), first);
        assert_eq!(certificate_pem_or_der(bundle.as_bytes()).unwrap(), first);
        // DER is not PEM: castellan refuses it, so does Barbican's path;
        // an operator's file may be either.
        assert!(certificate_from_pem(first).is_err());
        assert_eq!(certificate_pem_or_der(first).unwrap(), first);
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(certificate_from_pem(key.as_bytes()).is_err());
        let cut = &block(first)[..40];
        assert!(certificate_from_pem(cut.as_bytes()).is_err());
        // Any wrap width, and the older label, as cryptography takes them.
        let long: Vec<u8> = (0..200u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&long);
        let wrapped: Vec<String> = b64
            .as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        let pem76 = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            wrapped.join("\n")
        );
        assert_eq!(certificate_from_pem(pem76.as_bytes()).unwrap(), long);
        let x509 =
            format!("-----BEGIN X509 CERTIFICATE-----\n{b64}\n-----END X509 CERTIFICATE-----\n");
        assert_eq!(certificate_from_pem(x509.as_bytes()).unwrap(), long);
    }

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
    fn format_intent_round_trip_and_hostile_values() {
        let i = FormatIntent {
            luks_uuid: uuid::Uuid::new_v4(),
            started_at: 1_700_000_000,
            host: "compute-1.example".into(),
        };
        assert_eq!(FormatIntent::decode(&i.encode()), Some(i.clone()));
        let here = FormatIntent::new_here();
        assert_eq!(FormatIntent::decode(&here.encode()), Some(here));
        let u = i.luks_uuid.hyphenated().to_string();
        for bad in [
            String::new(),
            "nonsense".into(),
            u.clone(),
            format!("{u},"),
            format!("{u},12"),
            format!("{u},12,"),
            format!("{u},-12,h"),
            format!("{u},+12,h"),
            format!("{u},12x,h"),
            format!("{u},99999999999999999999999,h"),
            format!("{u},12,a b"),
            format!("{u},12,a,b"),
            format!("{u},12,{}", "h".repeat(MAX_INTENT_HOST_LEN + 1)),
            format!("{},12,h", u.replace('-', "")),
            format!("{}x,12,h", &u[..35]),
            "00000000-0000-0000-0000-00000000000g,1,h".into(),
            format!("{u},12,h\u{e9}"),
        ] {
            assert_eq!(FormatIntent::decode(&bad), None, "{bad:?}");
        }
        assert_eq!(clean_host("a b,c\u{e9}"), "a_b_c_");
        assert_eq!(clean_host(""), "unknown");
        assert_eq!(clean_host(&"x".repeat(300)).len(), MAX_INTENT_HOST_LEN);
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

//! Glance image signatures, verified as nova and cinder verify them with
//! cursive: the four `img_signature*` properties, the signing certificate
//! fetched from the key manager, optionally validated against trusted
//! certificates, and the signature checked over the digest of the image
//! file, read once. A layer beside `volume/`: it uses `keymgr/` for the
//! certificates and nothing below it.

pub mod certificate;
pub mod file;
mod oid;
pub mod properties;
pub mod signature;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::keymgr::{KeyError, KeyId, KeyManager, RequestAuth};
use certificate::{Certificate, CertificateError};
use file::{Caller, FileError};
use properties::{BadProperties, Signed};
use signature::SignatureError;

/// What an image id may be, for refusals.
pub const IMAGE_ID_RULE: &str = "the image id is not 1-128 letters, digits, '-', '_' and '.'";

/// Whether `id` can be a glance image id here: 1 to 128 ASCII letters,
/// digits, `-`, `_` and `.` (glance's are UUIDs), not only dots.
pub fn valid_image_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.bytes().all(|b| b == b'.')
}

/// What to verify.
pub struct VerifyRequest<'a> {
    /// Glance's image id (for messages and logs).
    pub image_id: &'a str,
    /// The image file.
    pub path: &'a Path,
    /// The image's properties.
    pub properties: &'a Map<String, Value>,
    /// Trusted certificate ids; empty: the signing certificate is not
    /// validated (nova with certificate validation off).
    pub trusted: &'a [KeyId],
    /// Whose permissions open the file (`None`: this process's).
    pub caller: Option<Caller>,
}

/// The outcome of a verification that did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The signature checks out.
    Verified(Verified),
    /// The image has no signature properties.
    NotSigned,
}

/// What was verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The hash method.
    pub hash_method: &'static str,
    /// The key type.
    pub key_type: &'static str,
    /// The signing certificate's id.
    pub certificate_id: String,
    /// Whether the certificate was validated against trusted ones.
    pub certificate_validated: bool,
    /// Bytes of the image hashed.
    pub bytes: u64,
}

/// A verification that failed, for the image it names.
#[derive(Debug, thiserror::Error)]
#[error("image {image_id}")]
pub struct ImageError {
    /// Glance's image id.
    pub image_id: String,
    /// What failed.
    #[source]
    pub failure: ImageFailure,
}

/// What failed in a verification.
#[derive(Debug, thiserror::Error)]
pub enum ImageFailure {
    /// The signature properties cannot be used.
    #[error("bad signature properties")]
    Properties(#[from] BadProperties),
    /// The signature is not the certificate's key's over this image.
    #[error("the signature does not match the image and certificate {certificate_id}")]
    Mismatch {
        /// The signing certificate.
        certificate_id: String,
    },
    /// The certificate cannot vouch for the image.
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    /// The key manager failed.
    #[error("fetching certificate {certificate_id}")]
    Key {
        /// The certificate asked for.
        certificate_id: String,
        /// What the key manager said.
        #[source]
        source: KeyError,
    },
    /// The image file cannot be read.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Verifies an image. Logs "Image signature verification succeeded for
/// image <id>" or "... failed for image <id>: <why>", the lines nova logs
/// and operators look for.
pub async fn verify(
    keys: &dyn KeyManager,
    auth: &RequestAuth,
    req: VerifyRequest<'_>,
) -> Result<Verdict, ImageError> {
    let image_id = req.image_id;
    let result = verify_inner(keys, auth, req).await;
    match &result {
        Ok(Verdict::Verified(v)) => tracing::info!(
            image_id,
            certificate_id = v.certificate_id,
            bytes = v.bytes,
            "Image signature verification succeeded for image {image_id}"
        ),
        Ok(Verdict::NotSigned) => {
            tracing::info!(image_id, "image {image_id} has no signature properties")
        }
        Err(e) => tracing::error!(
            image_id,
            "Image signature verification failed for image {image_id}: {}",
            crate::text::error_chain(e)
        ),
    }
    result.map_err(|failure| ImageError {
        image_id: image_id.to_string(),
        failure,
    })
}

async fn verify_inner(
    keys: &dyn KeyManager,
    auth: &RequestAuth,
    req: VerifyRequest<'_>,
) -> Result<Verdict, ImageFailure> {
    let props = match properties::parse(req.properties)? {
        Signed::No => return Ok(Verdict::NotSigned),
        Signed::Yes(p) => p,
    };
    let opened = {
        let (path, caller) = (req.path.to_path_buf(), req.caller.clone());
        tokio::task::spawn_blocking(move || file::open(&path, caller.as_ref()))
            .await
            .map_err(|e| FileError::Io {
                path: req.path.display().to_string(),
                op: "opening",
                source: std::io::Error::other(e),
            })??
    };
    let signer = fetch_certificate(keys, auth, &props.certificate).await?;
    let now = SystemTime::now();
    if !req.trusted.is_empty() {
        let mut trusted = Vec::with_capacity(req.trusted.len());
        for id in req.trusted {
            match fetch_certificate(keys, auth, id).await {
                Ok(c) => trusted.push(c),
                // cursive leaves out a trusted certificate it cannot get,
                // whatever the key manager said (not found, forbidden, not a
                // certificate); a key manager that is down or too slow is
                // a failure of its own, not "untrusted".
                Err(ImageFailure::Key {
                    source: e @ (KeyError::Unavailable { .. } | KeyError::TimedOut { .. }),
                    certificate_id,
                }) => {
                    return Err(ImageFailure::Key {
                        certificate_id,
                        source: e,
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        "trusted certificate {id}: {}; it is left out",
                        crate::text::error_chain(&e)
                    );
                }
            }
        }
        // The chain's signature checks are big-number arithmetic (a DSA
        // key may have a 10000-bit p): off the async workers.
        let leaf = signer.clone();
        tokio::task::spawn_blocking(move || certificate::validate(&leaf, &trusted, now))
            .await
            .map_err(|e| CertificateError {
                id: props.certificate.to_string(),
                reason: format!("the chain check did not finish: {e}"),
            })??;
    }
    let key = signer.public_key();
    if !key.fits(props.key_type) {
        return Err(CertificateError {
            id: signer.id.clone(),
            reason: format!(
                "the image's key type is {} but the certificate holds {}",
                props.key_type.name(),
                key.describe()
            ),
        }
        .into());
    }
    let (path, hash, key_type) = (req.path.to_path_buf(), props.hash, props.key_type);
    let signature = props.signature.clone();
    let signer_id = signer.id.clone();
    // A dropped future (the agent stops, or the connection is gone) stops
    // the blocking pass over the file within a chunk.
    let abandon = AbandonOnDrop::default();
    let flag = abandon.0.clone();
    // Waiting here holds no buffers; the permit goes with the pass and
    // ends with it, even when this future is dropped first.
    let pass = Arc::clone(&PASSES)
        .acquire_owned()
        .await
        .expect("the semaphore of passes is never closed");
    // The hash, and then the signature check, on a blocking thread.
    let (digested, checked) = tokio::task::spawn_blocking(move || {
        let _pass = pass;
        let digested = file::digest(opened, &path, hash, &flag)?;
        let checked =
            signer
                .public_key()
                .verify_image(key_type, hash, &digested.digest, &signature);
        Ok::<_, FileError>((digested, checked))
    })
    .await
    .map_err(|e| FileError::Io {
        path: req.path.display().to_string(),
        op: "reading",
        source: std::io::Error::other(e),
    })??;
    match checked {
        Ok(()) => Ok(Verdict::Verified(Verified {
            hash_method: props.hash.name(),
            key_type: props.key_type.name(),
            certificate_id: props.certificate.to_string(),
            certificate_validated: !req.trusted.is_empty(),
            bytes: digested.bytes,
        })),
        Err(SignatureError::Mismatch) => Err(ImageFailure::Mismatch {
            certificate_id: props.certificate.to_string(),
        }),
        Err(SignatureError::WrongKey(reason)) => Err(CertificateError {
            id: signer_id,
            reason,
        }
        .into()),
    }
}

/// Passes over image files at once, per process. Hashing is bound by the
/// CPU, so more than one per CPU only adds memory (two 4 MiB buffers
/// each) and takes CPU time from volume operations; the others wait.
pub fn max_passes() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
}

static PASSES: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(max_passes())));

/// Set when dropped: the pass over the file whose future this is stops.
#[derive(Default)]
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Fetches and parses a certificate. A secret that is not a certificate
/// is a certificate problem, not a key manager one.
async fn fetch_certificate(
    keys: &dyn KeyManager,
    auth: &RequestAuth,
    id: &KeyId,
) -> Result<Certificate, ImageFailure> {
    match keys.fetch_certificate(id, auth).await {
        Ok(der) => Ok(Certificate::parse(id.as_str(), &der)?),
        Err(KeyError::InvalidKeyMaterial { reason, .. }) => Err(CertificateError {
            id: id.to_string(),
            reason,
        }
        .into()),
        Err(source) => Err(ImageFailure::Key {
            certificate_id: id.to_string(),
            source,
        }),
    }
}

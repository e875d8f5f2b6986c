//! X.509 certificates of image signers, and their validation against
//! trusted certificates as cursive's `verify_certificate` does it: the
//! signer within its dates, a chain through trusted certificates only (each
//! within its dates, a CA with keyCertSign) up to a self-signed one, and
//! every path length constraint kept. Beyond cursive: certificates signed
//! with RSA-PSS are accepted (the one verdict that differs), SHA-1
//! certificate signatures are refused, and a chain cannot loop.

use std::time::SystemTime;

use x509_cert::der::{Decode, Encode, Reader, SliceReader};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};

use super::oid;
use super::signature::{self, HashMethod, PublicKey, SignatureError};

/// Longest chain followed; real ones are 1 to 4 certificates.
const MAX_CHAIN: usize = 16;

/// A parsed certificate and where it came from.
#[derive(Clone)]
pub struct Certificate {
    /// The key manager id it was fetched by (for messages).
    pub id: String,
    der: Vec<u8>,
    cert: x509_cert::Certificate,
    key: PublicKey,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certificate({})", self.id)
    }
}

/// Why a certificate cannot be used (the message names it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("certificate {id}: {reason}")]
pub struct CertificateError {
    /// The certificate's id in the key manager.
    pub id: String,
    /// What is wrong.
    pub reason: String,
}

impl Certificate {
    /// Parses a DER certificate fetched by `id`.
    pub fn parse(id: &str, der: &[u8]) -> Result<Certificate, CertificateError> {
        let err = |reason: String| CertificateError {
            id: id.to_string(),
            reason,
        };
        let cert = x509_cert::Certificate::from_der(der)
            .map_err(|e| err(format!("not an X.509 certificate: {e}")))?;
        let key =
            PublicKey::from_spki(cert.tbs_certificate().subject_public_key_info()).map_err(err)?;
        Ok(Certificate {
            id: id.to_string(),
            der: der.to_vec(),
            cert,
            key,
        })
    }

    /// The certificate's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }

    fn error(&self, reason: impl Into<String>) -> CertificateError {
        CertificateError {
            id: self.id.clone(),
            reason: reason.into(),
        }
    }

    /// Whether `now` lies within the validity dates (both ends included,
    /// as cursive compares).
    pub fn check_dates(&self, now: SystemTime) -> Result<(), CertificateError> {
        let v = self.cert.tbs_certificate().validity();
        let (from, to) = (v.not_before.to_system_time(), v.not_after.to_system_time());
        if now < from {
            return Err(self.error(format!("not valid before {}", v.not_before)));
        }
        if now > to {
            return Err(self.error(format!("expired at {}", v.not_after)));
        }
        Ok(())
    }

    fn basic_constraints(&self) -> Result<Option<BasicConstraints>, CertificateError> {
        self.cert
            .tbs_certificate()
            .get_extension::<BasicConstraints>()
            .map(|e| e.map(|(_, bc)| bc))
            .map_err(|e| self.error(format!("unreadable basic constraints: {e}")))
    }

    fn key_usage(&self) -> Result<Option<KeyUsage>, CertificateError> {
        self.cert
            .tbs_certificate()
            .get_extension::<KeyUsage>()
            .map(|e| e.map(|(_, ku)| ku))
            .map_err(|e| self.error(format!("unreadable key usage: {e}")))
    }

    /// A trusted certificate must be a CA allowed to sign certificates.
    fn check_can_sign_certificates(&self) -> Result<(), CertificateError> {
        match self.basic_constraints()? {
            Some(bc) if bc.ca => {}
            Some(_) => return Err(self.error("is not a CA (basic constraints)")),
            None => return Err(self.error("has no basic constraints, so it is not a CA")),
        }
        match self.key_usage()? {
            Some(ku) if ku.key_cert_sign() => Ok(()),
            Some(_) => Err(self.error("may not sign certificates (key usage lacks keyCertSign)")),
            None => Err(self.error("has no key usage, so it may not sign certificates")),
        }
    }

    /// Warns when the signer's key usage excludes signatures. Not a
    /// refusal: cursive never looks at it, and an image nova boots must
    /// verify here too.
    pub fn warn_unless_signing_key(&self) {
        if let Ok(Some(ku)) = self.key_usage()
            && !(ku.digital_signature() || ku.non_repudiation())
        {
            tracing::warn!(
                "certificate {}: its key usage names neither digitalSignature nor nonRepudiation, yet it signed an image",
                self.id
            );
        }
    }

    fn same_as(&self, other: &Certificate) -> bool {
        self.der == other.der
    }

    /// Whether this certificate issued `child`: its subject is the child's
    /// issuer and its key verifies the child's signature.
    fn issued(&self, child: &Certificate) -> bool {
        name_key(self.cert.tbs_certificate().subject())
            == name_key(child.cert.tbs_certificate().issuer())
            && self.verifies(child).is_ok()
    }

    /// Checks `child`'s signature with this certificate's key.
    fn verifies(&self, child: &Certificate) -> Result<(), SignatureError> {
        let tbs = tbs_bytes(&child.der).ok_or(SignatureError::Mismatch)?;
        let alg = child.cert.signature_algorithm();
        let sig = child
            .cert
            .signature()
            .as_bytes()
            .ok_or(SignatureError::Mismatch)?;
        let ecdsa_or_dsa = |hash: HashMethod| self.key.verify_prehash(&hash.digest(tbs), sig);
        let rsa = || match &self.key {
            PublicKey::Rsa(k) => Ok(k),
            _ => Err(SignatureError::Mismatch),
        };
        let o = &alg.oid;
        let pkcs1 = [
            (oid::SHA224_WITH_RSA, HashMethod::Sha224),
            (oid::SHA256_WITH_RSA, HashMethod::Sha256),
            (oid::SHA384_WITH_RSA, HashMethod::Sha384),
            (oid::SHA512_WITH_RSA, HashMethod::Sha512),
        ];
        if let Some((_, h)) = pkcs1.iter().find(|(id, _)| id == o) {
            return signature::verify_pkcs1v15(rsa()?, *h, &h.digest(tbs), sig);
        }
        let prehashed = [
            (oid::ECDSA_WITH_SHA224, HashMethod::Sha224, true),
            (oid::ECDSA_WITH_SHA256, HashMethod::Sha256, true),
            (oid::ECDSA_WITH_SHA384, HashMethod::Sha384, true),
            (oid::ECDSA_WITH_SHA512, HashMethod::Sha512, true),
            (oid::DSA_WITH_SHA224, HashMethod::Sha224, false),
            (oid::DSA_WITH_SHA256, HashMethod::Sha256, false),
        ];
        if let Some((_, h, ec)) = prehashed.iter().find(|(id, _, _)| id == o) {
            let kind_fits = match &self.key {
                PublicKey::Dsa(_) => !ec,
                PublicKey::Rsa(_) => false,
                _ => *ec,
            };
            if !kind_fits {
                return Err(SignatureError::Mismatch);
            }
            return ecdsa_or_dsa(*h);
        }
        if *o == oid::RSASSA_PSS {
            let encoded = alg
                .parameters
                .as_ref()
                .and_then(|p| p.to_der().ok())
                .ok_or(SignatureError::Mismatch)?;
            let (hash, salt) = pss_params(&encoded).ok_or(SignatureError::Mismatch)?;
            return signature::verify_pss(rsa()?, hash, &hash.digest(tbs), sig, Some(salt));
        }
        Err(SignatureError::WrongKey(format!(
            "signature algorithm {o} is not supported"
        )))
    }
}

/// The hash and salt length of RSASSA-PSS parameters (DER), when the
/// mask is MGF1 with the same hash.
fn pss_params(encoded: &[u8]) -> Option<(HashMethod, usize)> {
    let params =
        <rsa::pkcs1::RsaPssParams<x509_cert::der::Any> as Decode>::from_der(encoded).ok()?;
    let hash = hash_of(&params.hash.oid)?;
    let mgf_hash = params.mask_gen.parameters.as_ref().map(|p| p.oid);
    if params.mask_gen.oid != oid::MGF1 || mgf_hash.and_then(|o| hash_of(&o)) != Some(hash) {
        return None;
    }
    Some((hash, params.salt_len.into()))
}

/// A name as cryptography compares names (and so cursive chains them):
/// per relative name, the set of attribute types and values, whatever
/// string type encodes each value (PrintableString or UTF8String).
fn name_key(name: &x509_cert::name::Name) -> Vec<Vec<(String, Vec<u8>)>> {
    name.iter_rdn()
        .map(|rdn| {
            let mut atvs: Vec<(String, Vec<u8>)> = rdn
                .iter()
                .map(|atv| (atv.oid.to_string(), atv.value.value().to_vec()))
                .collect();
            atvs.sort();
            atvs
        })
        .collect()
}

/// The hash named by a hash algorithm OID.
fn hash_of(o: &x509_cert::der::asn1::ObjectIdentifier) -> Option<HashMethod> {
    [
        (oid::SHA224, HashMethod::Sha224),
        (oid::SHA256, HashMethod::Sha256),
        (oid::SHA384, HashMethod::Sha384),
        (oid::SHA512, HashMethod::Sha512),
    ]
    .into_iter()
    .find(|(id, _)| id == o)
    .map(|(_, h)| h)
}

/// The signed part of a certificate exactly as it was encoded (the first
/// element of the outer SEQUENCE): a re-encoding could differ from what
/// the issuer signed.
fn tbs_bytes(der: &[u8]) -> Option<&[u8]> {
    let mut reader = SliceReader::new(der).ok()?;
    reader
        .sequence(|r: &mut SliceReader<'_>| {
            let tbs = r.tlv_bytes()?;
            // The rest (algorithm, signature) is not needed here.
            while !r.is_finished() {
                r.tlv_bytes()?;
            }
            Ok::<_, x509_cert::der::Error>(tbs)
        })
        .ok()
}

/// Validates `signer` against `trusted` at `now`. Trusted certificates
/// that are outside their dates or not CAs are left out (with a warning,
/// as cursive does); the chain is then built through the rest only.
pub fn validate(
    signer: &Certificate,
    trusted: &[Certificate],
    now: SystemTime,
) -> Result<(), CertificateError> {
    signer.check_dates(now)?;
    signer.warn_unless_signing_key();
    let usable: Vec<&Certificate> = trusted
        .iter()
        .filter(|t| {
            let ok = t
                .check_dates(now)
                .and_then(|()| t.check_can_sign_certificates());
            if let Err(e) = &ok {
                tracing::warn!("trusted {e}; it cannot be on the chain and is left out");
            }
            ok.is_ok()
        })
        .collect();
    // chain[0] is the signer; each next one issued the one before.
    let mut chain: Vec<&Certificate> = vec![signer];
    loop {
        let current = chain[chain.len() - 1];
        let Some(issuer) = usable.iter().copied().find(|t| t.issued(current)) else {
            let whose = if chain.len() == 1 {
                "the image's signing certificate".to_string()
            } else {
                format!("trusted certificate {}", current.id)
            };
            return Err(CertificateError {
                id: signer.id.clone(),
                reason: format!(
                    "no trusted certificate issued {whose}: the chain does not reach a trusted root"
                ),
            });
        };
        if issuer.same_as(current) {
            break;
        }
        if chain.iter().any(|c| c.same_as(issuer)) || chain.len() >= MAX_CHAIN {
            return Err(signer.error("the chain of trusted certificates loops or is too long"));
        }
        chain.push(issuer);
    }
    // Path lengths: a CA's constraint counts the CAs below it, down to
    // the signer (which is not counted).
    for (i, ca) in chain.iter().enumerate().skip(1) {
        let below = i - 1;
        let Some(bc) = ca.basic_constraints()? else {
            return Err(ca.error("has no basic constraints"));
        };
        if let Some(limit) = bc.path_len_constraint
            && usize::from(limit) < below
        {
            return Err(ca.error(format!(
                "allows {limit} CA certificate(s) below it, the chain has {below}"
            )));
        }
    }
    Ok(())
}

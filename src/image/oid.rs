//! The object identifiers of the key and signature algorithms that image
//! certificates use (RFC 3279, 4055, 5480, 5758).

use x509_cert::der::asn1::ObjectIdentifier as Oid;

/// rsaEncryption.
pub const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
/// id-RSASSA-PSS (as a key and as a signature algorithm).
pub const RSASSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
/// id-mgf1.
pub const MGF1: Oid = Oid::new_unwrap("1.2.840.113549.1.1.8");
/// sha224WithRSAEncryption.
pub const SHA224_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.14");
/// sha256WithRSAEncryption.
pub const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
/// sha384WithRSAEncryption.
pub const SHA384_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
/// sha512WithRSAEncryption.
pub const SHA512_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
/// id-dsa.
pub const DSA: Oid = Oid::new_unwrap("1.2.840.10040.4.1");
/// id-dsa-with-sha224.
pub const DSA_WITH_SHA224: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.3.1");
/// id-dsa-with-sha256.
pub const DSA_WITH_SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.3.2");
/// id-ecPublicKey.
pub const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
/// ecdsa-with-SHA224.
pub const ECDSA_WITH_SHA224: Oid = Oid::new_unwrap("1.2.840.10045.4.3.1");
/// ecdsa-with-SHA256.
pub const ECDSA_WITH_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
/// ecdsa-with-SHA384.
pub const ECDSA_WITH_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
/// ecdsa-with-SHA512.
pub const ECDSA_WITH_SHA512: Oid = Oid::new_unwrap("1.2.840.10045.4.3.4");
/// secp256r1 (P-256).
pub const SECP256R1: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
/// secp384r1 (P-384).
pub const SECP384R1: Oid = Oid::new_unwrap("1.3.132.0.34");
/// secp521r1 (P-521).
pub const SECP521R1: Oid = Oid::new_unwrap("1.3.132.0.35");
/// id-sha224.
pub const SHA224: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.4");
/// id-sha256.
pub const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
/// id-sha384.
pub const SHA384: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.2");
/// id-sha512.
pub const SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");

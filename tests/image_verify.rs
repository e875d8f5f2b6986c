//! `luks-agent image verify` with the local key store, on images signed by
//! openssl exactly as the glance documentation signs them (`openssl dgst
//! -sign ... -sigopt rsa_padding_mode:pss`), with certificates and chains
//! made by openssl: every key type and hash method, tampered images and
//! signatures, wrong and mismatching certificates, partial properties,
//! chains through trusted certificates, path lengths, expiry, and files
//! that are not regular files. The verdicts against cursive itself are in
//! tests/image_signatures (with a real Barbican).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::serve::{cli, write_local_config};
use serde_json::{Value, json};

struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    image: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (install-deps installs it)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let config = write_local_config(&dir, "");
        let image = dir.join("image.raw");
        std::fs::write(&image, common::garbage(3 << 20, 7)).unwrap();
        Lab {
            _tmp: tmp,
            dir,
            config,
            image,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A private key `name.key`: `rsa:BITS`, `ec:CURVE` or `dsa:BITS`.
    fn key(&self, name: &str, kind: &str) {
        let key = format!("{name}.key");
        match kind.split_once(':') {
            Some(("rsa", bits)) => openssl(&self.dir, &["genrsa", "-out", &key, bits]),
            Some(("ec", curve)) => openssl(
                &self.dir,
                &["ecparam", "-name", curve, "-genkey", "-noout", "-out", &key],
            ),
            Some(("dsa", bits)) => openssl(&self.dir, &["dsaparam", "-genkey", "-out", &key, bits]),
            _ => panic!("key kind {kind}"),
        }
    }

    /// A self-signed certificate `name.pem` for `name.key`; `ext`: extra
    /// `-addext` values.
    fn self_signed(&self, name: &str, days: &str, ext: &[&str]) {
        let (key, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        let mut args = vec![
            "req", "-new", "-x509", "-key", &key, "-out", &pem, "-days", days, "-subj", &subj,
        ];
        // Only the given extensions, not openssl.cnf's defaults.
        args.extend(["-config", "/dev/null"]);
        for e in ext {
            args.extend(["-addext", e]);
        }
        openssl(&self.dir, &args);
    }

    /// `name.pem` for `name.key`, issued by `issuer` (its .pem and .key);
    /// `ext` lines go into the certificate's extensions; `sigopt`: signing
    /// options of the issuer (RSA-PSS).
    fn issued(&self, name: &str, issuer: &str, days: &str, ext: &[&str], sigopt: &[&str]) {
        let (key, csr, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
                "-config",
                "/dev/null",
            ],
        );
        let extfile = format!("{name}.ext");
        std::fs::write(self.dir.join(&extfile), ext.join("\n") + "\n").unwrap();
        let (ca, ca_key) = (format!("{issuer}.pem"), format!("{issuer}.key"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-set_serial",
            "7",
            "-days",
            days,
            "-out",
            &pem,
            "-extfile",
            &extfile,
            "-sha256",
        ];
        for o in sigopt {
            args.extend(["-sigopt", o]);
        }
        openssl(&self.dir, &args);
    }

    /// Imports `name.pem` into the local store; its id.
    fn import(&self, name: &str) -> String {
        let (code, out, err) = cli(
            &self.config,
            &[
                "keys",
                "import-certificate",
                &self.path(&format!("{name}.pem")),
            ],
        );
        assert_eq!(code, 0, "import {name}: {err}");
        out.trim().to_string()
    }

    /// The base64 signature of the image by `name.key`, as the glance
    /// documentation makes it.
    fn sign(&self, name: &str, hash: &str, pss: bool) -> String {
        let dgst = format!("-{}", hash.to_ascii_lowercase().replace('-', ""));
        let key = format!("{name}.key");
        let mut args = vec!["dgst", dgst.as_str(), "-sign", &key];
        if pss {
            args.extend(["-sigopt", "rsa_padding_mode:pss"]);
        }
        let image = self.image.display().to_string();
        args.extend(["-out", "sig.bin", &image]);
        openssl(&self.dir, &args);
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(self.dir.join("sig.bin")).unwrap())
    }

    fn verify(&self, props: &Value, trusted: &[&str]) -> (i32, String, String) {
        let image = self.image.display().to_string();
        let props = props.to_string();
        let mut args = vec![
            "image",
            "verify",
            "--image-id",
            "img-1",
            "--file",
            &image,
            "--properties",
            &props,
        ];
        for t in trusted {
            args.extend(["--trusted-cert-id", t]);
        }
        cli(&self.config, &args)
    }
}

fn props(sig: &str, hash: &str, key_type: &str, cert: &str) -> Value {
    json!({
        "img_signature": sig,
        "img_signature_hash_method": hash,
        "img_signature_key_type": key_type,
        "img_signature_certificate_uuid": cert,
        "os_distro": "debian",
    })
}

fn flip_last_byte(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 1;
    std::fs::write(path, data).unwrap();
}

#[test]
fn every_key_type_and_hash_verifies_and_any_tampering_is_a_mismatch() {
    let lab = Lab::new();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "rsa:2048",
            "RSA-PSS",
            &["SHA-224", "SHA-256", "SHA-384", "SHA-512"],
        ),
        ("rsa:3072", "RSA-PSS", &["SHA-256"]),
        ("rsa:4096", "RSA-PSS", &["SHA-512"]),
        (
            "ec:secp384r1",
            "ECC_SECP384R1",
            &["SHA-256", "SHA-384", "SHA-512"],
        ),
        (
            "ec:secp521r1",
            "ECC_SECP521R1",
            &["SHA-224", "SHA-256", "SHA-512"],
        ),
        ("dsa:2048", "DSA", &["SHA-224", "SHA-256"]),
    ];
    for (i, (kind, key_type, hashes)) in cases.iter().enumerate() {
        let name = format!("k{i}");
        lab.key(&name, kind);
        lab.self_signed(&name, "30", &[]);
        let cert = lab.import(&name);
        for hash in *hashes {
            let sig = lab.sign(&name, hash, *key_type == "RSA-PSS");
            let what = format!("{kind} {hash}");
            let (code, out, err) = lab.verify(&props(&sig, hash, key_type, &cert), &[]);
            assert_eq!(code, 0, "{what}: {err}");
            let v: Value =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: {e}: {out}"));
            assert_eq!(v["result"], "verified", "{what}");
            assert_eq!(v["bytes"], 3 << 20, "{what}");
            assert!(
                err.contains("Image signature verification succeeded for image img-1"),
                "{what}: {err}"
            );

            let mut bad = base64::engine::general_purpose::STANDARD
                .decode(&sig)
                .unwrap();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x40;
            let bad = base64::engine::general_purpose::STANDARD.encode(bad);
            let (code, _, err) = lab.verify(&props(&bad, hash, key_type, &cert), &[]);
            assert_eq!(code, 14, "{what}, tampered signature: {err}");

            flip_last_byte(&lab.image);
            let (code, _, err) = lab.verify(&props(&sig, hash, key_type, &cert), &[]);
            flip_last_byte(&lab.image);
            assert_eq!(code, 14, "{what}, tampered image: {err}");
            assert!(
                err.contains("Image signature verification failed for image img-1"),
                "{what}: {err}"
            );
        }
    }
}

#[test]
fn a_signature_of_another_key_or_the_wrong_key_type_is_refused() {
    let lab = Lab::new();
    for (name, kind) in [("a", "rsa:2048"), ("b", "rsa:2048"), ("e", "ec:secp384r1")] {
        lab.key(name, kind);
        lab.self_signed(name, "30", &[]);
    }
    let (a, b, e) = (lab.import("a"), lab.import("b"), lab.import("e"));
    let sig = lab.sign("a", "SHA-256", true);
    let (code, _, err) = lab.verify(&props(&sig, "SHA-256", "RSA-PSS", &a), &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = lab.verify(&props(&sig, "SHA-256", "RSA-PSS", &b), &[]);
    assert_eq!(code, 14, "another key's certificate: {err}");
    let (code, _, err) = lab.verify(&props(&sig, "SHA-256", "RSA-PSS", &e), &[]);
    assert_eq!(code, 16, "EC certificate for RSA-PSS: {err}");
    assert!(err.contains("key type is RSA-PSS"), "{err}");
    let (code, _, err) = lab.verify(&props(&sig, "SHA-256", "DSA", &a), &[]);
    assert_eq!(code, 16, "RSA certificate for DSA: {err}");
    // PKCS#1 v1.5 is not PSS.
    let v15 = lab.sign("a", "SHA-256", false);
    let (code, _, err) = lab.verify(&props(&v15, "SHA-256", "RSA-PSS", &a), &[]);
    assert_eq!(code, 14, "PKCS#1 v1.5 signature: {err}");
    // The hash named must be the one signed with.
    let (code, _, err) = lab.verify(&props(&sig, "SHA-384", "RSA-PSS", &a), &[]);
    assert_eq!(code, 14, "SHA-384 named, SHA-256 signed: {err}");
    // A certificate id the store does not hold.
    let missing = "5b0c4a8e-1d2f-4c3b-9a8d-7e6f5a4b3c2d";
    let (code, _, err) = lab.verify(&props(&sig, "SHA-256", "RSA-PSS", missing), &[]);
    assert_eq!(code, 6, "missing certificate: {err}");
    assert!(err.contains(missing), "{err}");
    // A stored file that is not a certificate.
    let junk = "0d7e3a51-88c4-4a1e-b1f2-3c4d5e6f7a8b";
    std::fs::write(lab.dir.join("keys/certificates").join(junk), b"junk").unwrap();
    let (code, _, err) = lab.verify(&props(&sig, "SHA-256", "RSA-PSS", junk), &[]);
    assert_eq!(code, 16, "junk certificate: {err}");
    assert!(err.contains("not an X.509 certificate"), "{err}");
}

#[test]
fn properties_not_signed_partial_or_invalid() {
    let lab = Lab::new();
    lab.key("a", "rsa:2048");
    lab.self_signed("a", "30", &[]);
    let a = lab.import("a");
    let sig = lab.sign("a", "SHA-256", true);
    let (code, out, err) = lab.verify(&json!({"os_distro": "debian"}), &[]);
    assert_eq!(code, 13, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["result"],
        "not_signed"
    );
    let full = props(&sig, "SHA-256", "RSA-PSS", &a);
    for drop in [
        "img_signature",
        "img_signature_hash_method",
        "img_signature_key_type",
        "img_signature_certificate_uuid",
    ] {
        let mut p = full.clone();
        p.as_object_mut().unwrap().remove(drop);
        let (code, _, err) = lab.verify(&p, &[]);
        assert_eq!(code, 15, "without {drop}: {err}");
        assert!(err.contains(drop), "{drop}: {err}");
    }
    for (key, value) in [
        ("img_signature_hash_method", json!("SHA-1")),
        ("img_signature_key_type", json!("ECC_SECT571K1")),
        ("img_signature", json!("not base64!")),
    ] {
        let mut p = full.clone();
        p[key] = value.clone();
        let (code, _, err) = lab.verify(&p, &[]);
        assert_eq!(code, 15, "{key}={value}: {err}");
    }
    // Usage errors: properties that are not an object, a bad image id.
    let image = lab.image.display().to_string();
    let (code, _, _) = cli(
        &lab.config,
        &[
            "image",
            "verify",
            "--image-id",
            "i",
            "--file",
            &image,
            "--properties",
            "[]",
        ],
    );
    assert_eq!(code, 1);
    let (code, _, _) = cli(
        &lab.config,
        &[
            "image",
            "verify",
            "--image-id",
            "a/b",
            "--file",
            &image,
            "--properties",
            "{}",
        ],
    );
    assert_eq!(code, 1);
}

#[test]
fn the_image_must_be_a_regular_file() {
    let lab = Lab::new();
    lab.key("a", "rsa:2048");
    lab.self_signed("a", "30", &[]);
    let a = lab.import("a");
    let sig = lab.sign("a", "SHA-256", true);
    let p = props(&sig, "SHA-256", "RSA-PSS", &a).to_string();
    let fifo = lab.dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let link = lab.dir.join("link");
    std::os::unix::fs::symlink(&lab.image, &link).unwrap();
    for (path, code_wanted) in [
        (fifo.display().to_string(), 4),
        (lab.dir.display().to_string(), 4),
        ("/dev/zero".to_string(), 4),
        (lab.path("missing"), 4),
        (link.display().to_string(), 0),
    ] {
        let r = common::agent_timeout(
            &[
                "--config",
                common::s(&lab.config),
                "image",
                "verify",
                "--image-id",
                "i",
                "--file",
                &path,
                "--properties",
                &p,
            ],
            std::time::Duration::from_secs(30),
        );
        assert_eq!(r.code, Some(code_wanted), "{path}: {}", r.stderr);
    }
}

#[test]
fn chains_through_trusted_certificates_as_cursive_builds_them() {
    let lab = Lab::new();
    let ca = [
        "basicConstraints=critical,CA:TRUE",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    let ca0 = [
        "basicConstraints=critical,CA:TRUE,pathlen:0",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    let leaf = ["keyUsage=critical,digitalSignature"];
    for (name, kind) in [
        ("root", "rsa:3072"),
        ("root0", "ec:secp384r1"),
        ("inter", "ec:prime256v1"),
        ("nonca", "rsa:2048"),
        ("leaf", "rsa:2048"),
        ("leaf2", "rsa:2048"),
        ("leaf3", "rsa:2048"),
        ("leaf4", "rsa:2048"),
        ("leaf5", "ec:secp521r1"),
    ] {
        lab.key(name, kind);
    }
    let ca_ext: Vec<String> = ca.iter().map(|s| s.to_string()).collect();
    let ca_ext: Vec<&str> = ca_ext.iter().map(|s| s.as_str()).collect();
    lab.self_signed("root", "30", &ca_ext);
    lab.self_signed("root0", "30", &ca0);
    lab.issued("inter", "root", "30", &ca, &[]);
    lab.issued(
        "nonca",
        "root",
        "30",
        &["basicConstraints=critical,CA:FALSE", "keyUsage=keyCertSign"],
        &[],
    );
    lab.issued("leaf", "inter", "30", &leaf, &[]);
    lab.issued("leaf2", "nonca", "30", &leaf, &[]);
    lab.issued("leaf3", "root", "-1", &leaf, &[]);
    lab.issued(
        "leaf4",
        "root",
        "30",
        &["keyUsage=critical,keyEncipherment"],
        &[],
    );
    // An RSA-PSS certificate signature (cursive checks only PKCS#1 v1.5).
    lab.issued(
        "leaf5",
        "root",
        "30",
        &leaf,
        &["rsa_padding_mode:pss", "rsa_pss_saltlen:32"],
    );
    let id = |n: &str| lab.import(n);
    let (root, root0, inter, nonca) = (id("root"), id("root0"), id("inter"), id("nonca"));
    let (leaf1, leaf2, leaf3, leaf4, leaf5) = (
        id("leaf"),
        id("leaf2"),
        id("leaf3"),
        id("leaf4"),
        id("leaf5"),
    );

    let check = |signer: &str, cert: &str, trusted: &[&str], want: i32, what: &str| {
        let (key_type, pss) = if signer == "leaf5" {
            ("ECC_SECP521R1", false)
        } else {
            ("RSA-PSS", true)
        };
        let sig = lab.sign(signer, "SHA-256", pss);
        let (code, out, err) = lab.verify(&props(&sig, "SHA-256", key_type, cert), trusted);
        assert_eq!(code, want, "{what}: {out} {err}");
        if want == 0 {
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["certificate_validated"], !trusted.is_empty(), "{what}");
        }
        err
    };
    check(
        "leaf",
        &leaf1,
        &[&root, &inter],
        0,
        "leaf <- inter <- root, both trusted",
    );
    check("leaf", &leaf1, &[&inter, &root], 0, "trusted in any order");
    check("leaf", &leaf1, &[], 0, "no trusted ids: the signature only");
    let err = check("leaf", &leaf1, &[&root], 16, "intermediate not trusted");
    assert!(err.contains("does not reach a trusted root"), "{err}");
    check("leaf", &leaf1, &[&inter], 16, "no self-signed root");
    check("leaf", &leaf1, &[&root0], 16, "another root");
    let err = check("leaf2", &leaf2, &[&root, &nonca], 16, "issuer is not a CA");
    assert!(
        err.contains("left out") || err.contains("trusted root"),
        "{err}"
    );
    let err = check("leaf3", &leaf3, &[&root], 16, "expired signer");
    assert!(err.contains("expired"), "{err}");
    check(
        "leaf3",
        &leaf3,
        &[],
        0,
        "expired signer, no validation (as cursive)",
    );
    // cursive never looks at the signer's key usage; a warning only.
    let err = check(
        "leaf4",
        &leaf4,
        &[&root],
        0,
        "signer's key usage without signatures",
    );
    assert!(err.contains("digitalSignature"), "{err}");
    check("leaf5", &leaf5, &[&root], 0, "RSA-PSS-signed certificate");
    // A root that allows no CA below it.
    lab.issued("inter", "root0", "30", &ca, &[]);
    lab.issued("leaf", "inter", "30", &leaf, &[]);
    let (inter0, leaf0) = (id("inter"), id("leaf"));
    let err = check(
        "leaf",
        &leaf0,
        &[&root0, &inter0],
        16,
        "pathlen 0 with a CA below",
    );
    assert!(err.contains("allows 0 CA"), "{err}");
    // A trusted root may sign images itself, whatever its key usage says
    // about signatures (cursive does not look at the signer's key usage).
    check(
        "root",
        &root,
        &[&root],
        0,
        "CA restricted to keyCertSign as the signer",
    );
    lab.key("selfsign", "rsa:2048");
    lab.self_signed(
        "selfsign",
        "30",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,digitalSignature",
        ],
    );
    let selfsign = id("selfsign");
    check(
        "selfsign",
        &selfsign,
        &[&selfsign],
        0,
        "self-signed CA trusted as itself",
    );
    // A missing trusted id is left out, as cursive does.
    let missing = "5b0c4a8e-1d2f-4c3b-9a8d-7e6f5a4b3c2d";
    check("leaf", &leaf0, &[missing, &root0], 16, "missing trusted id");
    check(
        "selfsign",
        &selfsign,
        &[missing, &selfsign],
        0,
        "missing trusted id, then the root",
    );
}

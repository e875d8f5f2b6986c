//! TLS to the key manager: certificates are verified by default (a server
//! signed by an unknown CA is refused), a configured CA bundle is trusted,
//! a client certificate is presented for mutual TLS, and verification is
//! skipped only when explicitly configured. Certificates are made with
//! the openssl command for each run; the server is rustls on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use luks_agent::keymgr::barbican::{Barbican, BarbicanConfig};
use luks_agent::keymgr::http::{HttpConfig, build_client};
use luks_agent::keymgr::{KeyError, KeyId, KeyManager, RequestAuth, SecretString};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const SECRET: &str = "6f1c1f1e-0000-4000-8000-00000000beef";
const KEY: [u8; 32] = [0x42; 32];

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect(
            "the openssl command is needed for this test (scripts/install-deps.sh installs it)",
        );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate.
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=luks-agent test CA",
    ]);
    openssl(dir, &ca);
    std::fs::write(
        dir.join("srv.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("cli.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("srv", "127.0.0.1"), ("cli", "luks-agent client")] {
        let mut req = vec!["req"];
        req.extend(ec);
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let subj = format!("/CN={cn}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        );
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS server that answers Barbican's two calls; with
/// `require_client_cert` it demands a certificate signed by the test CA.
fn serve_tls(dir: &Path, require_client_cert: bool) -> u16 {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("srv.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("srv.key")).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = Arc::new(builder.with_single_cert(chain, key).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut byte) {
                        Ok(1) => req.push(byte[0]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let (ctype, body): (&str, Vec<u8>) = if line
                    .lines()
                    .next()
                    .unwrap_or("")
                    .contains("/payload")
                {
                    ("application/octet-stream", KEY.to_vec())
                } else {
                    (
                        "application/json",
                        br#"{"status":"ACTIVE","secret_type":"symmetric","bit_length":256,"content_types":{"default":"application/octet-stream"}}"#.to_vec(),
                    )
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls
                    .write_all(head.as_bytes())
                    .and_then(|_| tls.write_all(&body))
                    .and_then(|_| tls.flush());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

fn fetch(port: u16, http: HttpConfig) -> Result<Vec<u8>, KeyError> {
    let state = tempfile::tempdir().unwrap();
    let client = build_client(&http)?;
    let cfg = BarbicanConfig {
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        ..BarbicanConfig::default()
    };
    let b = Barbican::new(cfg, http, client, None, state.path())?;
    let auth = RequestAuth::UserToken {
        token: SecretString::new("t"),
        service_token: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = KeyId::new(SECRET).unwrap();
    rt.block_on(b.fetch(&id, &auth))
        .map(|k| k.expose().to_vec())
}

fn base(dir: &Path) -> (PathBuf, HttpConfig) {
    let http = HttpConfig {
        max_attempts: 1,
        deadline_ms: 5000,
        ..HttpConfig::default()
    };
    (dir.to_path_buf(), http)
}

#[test]
fn unknown_ca_is_refused_by_default() {
    let d = tempfile::tempdir().unwrap();
    make_pki(d.path());
    let port = serve_tls(d.path(), false);
    let (_, http) = base(d.path());
    match fetch(port, http) {
        Err(KeyError::Unavailable { last, .. }) => {
            assert!(last.to_lowercase().contains("certificate"), "{last}")
        }
        other => panic!("expected a verification failure, got {other:?}"),
    }
}

#[test]
fn configured_ca_bundle_is_trusted() {
    let d = tempfile::tempdir().unwrap();
    make_pki(d.path());
    let port = serve_tls(d.path(), false);
    let (dir, http) = base(d.path());
    let http = HttpConfig {
        ca_file: Some(dir.join("ca.pem")),
        ..http
    };
    assert_eq!(fetch(port, http).unwrap(), KEY);
}

#[test]
fn client_certificate_is_presented_for_mutual_tls() {
    let d = tempfile::tempdir().unwrap();
    make_pki(d.path());
    let port = serve_tls(d.path(), true);
    let (dir, http) = base(d.path());
    let with_ca = HttpConfig {
        ca_file: Some(dir.join("ca.pem")),
        ..http
    };
    assert!(
        fetch(port, with_ca.clone()).is_err(),
        "the server demands a client certificate"
    );
    let mtls = HttpConfig {
        client_cert: Some(dir.join("cli.pem")),
        client_key: Some(dir.join("cli.key")),
        ..with_ca
    };
    assert_eq!(fetch(port, mtls).unwrap(), KEY);
}

#[test]
fn verification_is_skipped_only_when_configured() {
    let d = tempfile::tempdir().unwrap();
    make_pki(d.path());
    let port = serve_tls(d.path(), false);
    let (_, http) = base(d.path());
    let insecure = HttpConfig {
        insecure_skip_verify: true,
        ..http
    };
    assert_eq!(fetch(port, insecure).unwrap(), KEY);
}

#[test]
fn half_configured_client_auth_is_a_config_error() {
    let d = tempfile::tempdir().unwrap();
    make_pki(d.path());
    let http = HttpConfig {
        client_cert: Some(d.path().join("cli.pem")),
        ..HttpConfig::default()
    };
    assert!(matches!(build_client(&http), Err(KeyError::Config(_))));
    let http = HttpConfig {
        ca_file: Some(d.path().join("missing.pem")),
        ..HttpConfig::default()
    };
    assert!(matches!(build_client(&http), Err(KeyError::Config(_))));
}

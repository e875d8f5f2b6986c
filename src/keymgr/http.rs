//! HTTP for the remote key managers: one TLS client (rustls, verification
//! on unless explicitly disabled) and one retry loop with bounded,
//! jittered backoff and an overall deadline for every call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::KeyError;

fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    4
}
fn default_backoff_base_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    3_000
}
fn default_deadline_ms() -> u64 {
    30_000
}
fn default_max_concurrent_requests() -> u32 {
    16
}

/// Timeouts, retries and TLS for calls to Keystone and Barbican.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Time to establish a TCP (and TLS) connection, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time for one request, headers and body, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Attempts per call, the first included (connection errors, 5xx and
    /// 429 are retried; other 4xx never).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First backoff between attempts, in milliseconds (doubles each time,
    /// with full jitter).
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    /// Largest backoff, in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Overall deadline for one key fetch, all calls and retries included,
    /// in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// PEM bundle of CA certificates to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Do not verify server certificates. Dangerous; logged as a warning.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Requests to Keystone and Barbican this host has in flight at most;
    /// more wait in a queue (within their deadline). After a rack's power
    /// returns, every volume of every host attaches at once: the cap turns
    /// that storm into queueing instead of errors.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: u32,
    /// The queue behind `max_concurrent_requests`: one per loaded
    /// configuration, shared by its copies (Keystone's and Barbican's
    /// clients alike), so one per host.
    #[serde(skip)]
    pub queue: RequestQueue,
}

/// The host's queue of key-manager requests, made at first use with the
/// configured size; clones share it.
#[derive(Clone, Debug, Default)]
pub struct RequestQueue(Arc<std::sync::OnceLock<Arc<tokio::sync::Semaphore>>>);

impl RequestQueue {
    fn semaphore(&self, size: u32) -> Arc<tokio::sync::Semaphore> {
        self.0
            .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(size.max(1) as usize)))
            .clone()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            max_attempts: default_max_attempts(),
            backoff_base_ms: default_backoff_base_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            deadline_ms: default_deadline_ms(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            insecure_skip_verify: false,
            max_concurrent_requests: default_max_concurrent_requests(),
            queue: RequestQueue::default(),
        }
    }
}

impl HttpConfig {
    /// The overall deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}

/// Builds the shared HTTP client.
pub fn build_client(cfg: &HttpConfig) -> Result<reqwest::Client, KeyError> {
    let conf_err = |what: String| KeyError::Config(what);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| conf_err(format!("TLS: {e}")))?;
    let builder = if cfg.insecure_skip_verify {
        tracing::warn!(
            "TLS certificate verification is DISABLED for key manager connections (insecure_skip_verify)"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| conf_err(format!("CA file {}: {e}", path.display())))?;
                for cert in certs {
                    let cert =
                        cert.map_err(|e| conf_err(format!("CA file {}: {e}", path.display())))?;
                    roots
                        .add(cert)
                        .map_err(|e| conf_err(format!("CA file {}: {e}", path.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    tracing::warn!(
                        "no system CA certificates found; HTTPS key managers will fail verification"
                    );
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let tls = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| conf_err(format!("client certificate {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| conf_err(format!("client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| conf_err(format!("client certificate: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(conf_err(
                "client_cert and client_key must be given together".into(),
            ));
        }
    };
    reqwest::Client::builder()
        // Who calls, in Keystone's and Barbican's access logs.
        .user_agent(concat!("luks-agent/", env!("CARGO_PKG_VERSION")))
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| conf_err(format!("HTTP client: {e}")))
}

#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The time one key fetch may take: when it started and its deadline.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Start of the fetch.
    pub started: Instant,
    /// When it must have ended.
    pub deadline: Instant,
}

impl Budget {
    /// A budget starting now with the configured deadline.
    pub fn start(cfg: &HttpConfig) -> Budget {
        let started = Instant::now();
        Budget {
            started,
            deadline: started + cfg.deadline(),
        }
    }
}

/// How a call ended when it produced no usable response.
#[derive(Debug)]
pub enum CallFailure {
    /// The deadline passed.
    TimedOut(Duration),
    /// Every attempt failed with a retryable error.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last failure, described without secrets.
        last: String,
    },
}

impl CallFailure {
    /// The matching key error.
    pub fn into_key_error(self, key_id: &str, endpoint: &str) -> KeyError {
        match self {
            CallFailure::TimedOut(after) => KeyError::TimedOut {
                key_id: key_id.into(),
                endpoint: endpoint.into(),
                after,
            },
            CallFailure::Exhausted { attempts, last } => KeyError::Unavailable {
                key_id: key_id.into(),
                endpoint: endpoint.into(),
                attempts,
                last,
            },
        }
    }
}

fn retryable_status(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Full jitter: a uniformly random wait in `[0, min(max, base * 2^n)]`.
fn backoff(cfg: &HttpConfig, attempt: u32) -> Duration {
    let cap = cfg
        .backoff_base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cfg.backoff_max_ms);
    let r = getrandom::u64().unwrap_or(u64::MAX / 2);
    Duration::from_millis(if cap == 0 { 0 } else { r % (cap + 1) })
}

/// Sends the request built by `make` until it gets a response that is not
/// retryable (2xx, or a 4xx other than 429), the attempts run out, or
/// `deadline` passes. Each attempt's timeout is capped by what is left.
pub async fn send(
    cfg: &HttpConfig,
    budget: &Budget,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, CallFailure> {
    let (started, deadline) = (budget.started, budget.deadline);
    let per_request = Duration::from_millis(cfg.request_timeout_ms);
    let attempts = cfg.max_attempts.max(1);
    let mut last = String::new();
    for attempt in 0..attempts {
        let now = Instant::now();
        if now >= deadline {
            return Err(CallFailure::TimedOut(started.elapsed()));
        }
        let left = deadline - now;
        let mut wait = backoff(cfg, attempt);
        // A place in the host's queue first, within the deadline.
        let Ok(Ok(_permit)) = tokio::time::timeout(
            left,
            cfg.queue
                .semaphore(cfg.max_concurrent_requests)
                .acquire_owned(),
        )
        .await
        else {
            return Err(CallFailure::TimedOut(started.elapsed()));
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match make().timeout(per_request.min(left)).send().await {
            Ok(resp) if !retryable_status(resp.status()) => return Ok(resp),
            Ok(resp) => {
                last = format!("HTTP {}", resp.status().as_u16());
                // The server's Retry-After, plus jitter: hosts that were
                // all told the same wait must not all come back at once.
                if let Some(after) = retry_after(&resp) {
                    wait = after + wait;
                }
            }
            Err(e) if e.is_timeout() => {
                if Instant::now() >= deadline {
                    return Err(CallFailure::TimedOut(started.elapsed()));
                }
                last = "request timed out".into();
            }
            Err(e) => {
                last = if e.is_connect() {
                    format!("connection failed: {}", root_cause(&e))
                } else {
                    root_cause(&e)
                };
            }
        }
        if attempt + 1 == attempts {
            break;
        }
        let now = Instant::now();
        if now + wait >= deadline {
            // Waiting would run past the deadline: say what we saw.
            return Err(CallFailure::Exhausted {
                attempts: attempt + 1,
                last,
            });
        }
        // An operator should see a key manager that fails now and then,
        // even when a later attempt succeeds.
        tracing::warn!(
            attempt = attempt + 1,
            attempts,
            error = %last,
            wait_ms = wait.as_millis() as u64,
            "key manager request failed; retrying"
        );
        tokio::time::sleep(wait).await;
    }
    Err(CallFailure::Exhausted { attempts, last })
}

/// The innermost error message (reqwest wraps hyper wraps io).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let cfg = HttpConfig {
            backoff_base_ms: 100,
            backoff_max_ms: 1000,
            ..HttpConfig::default()
        };
        for attempt in 0..40 {
            assert!(backoff(&cfg, attempt) <= Duration::from_millis(1000));
        }
        assert!(backoff(&cfg, 0) <= Duration::from_millis(100));
    }

    #[test]
    fn retry_classes() {
        assert!(retryable_status(reqwest::StatusCode::SERVICE_UNAVAILABLE));
        assert!(retryable_status(reqwest::StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable_status(reqwest::StatusCode::FORBIDDEN));
        assert!(!retryable_status(reqwest::StatusCode::NOT_FOUND));
        assert!(!retryable_status(reqwest::StatusCode::UNAUTHORIZED));
    }
}

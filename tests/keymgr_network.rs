//! The Barbican client against misbehaving servers on loopback: servers
//! that never answer, refuse connections, fail transiently, throttle,
//! answer nonsense or hand out unusable keys. Each test runs a tiny HTTP
//! server on 127.0.0.1 that scripts its answers and counts requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luks_agent::keymgr::barbican::{Barbican, BarbicanConfig};
use luks_agent::keymgr::http::{HttpConfig, build_client};
use luks_agent::keymgr::{
    Hold, HoldOp, KeyError, KeyHolder, KeyId, KeyManager, RequestAuth, SecretKind, SecretString,
};

const SECRET: &str = "6f1c1f1e-0000-4000-8000-00000000abcd";

/// What a test server answers to its n-th request for a path (`None`:
/// accept and never answer).
type Script = dyn Fn(usize, &str) -> Option<Reply> + Send + Sync;

/// One scripted answer: status, content type, body.
#[derive(Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra_headers: Vec<(&'static str, String)>,
}

fn reply(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
    Reply {
        status,
        content_type,
        body: body.into(),
        extra_headers: vec![],
    }
}

fn meta(secret_type: &str, bits: u32) -> Reply {
    reply(
        200,
        "application/json",
        format!(
            r#"{{"status": "ACTIVE", "secret_type": "{secret_type}", "bit_length": {bits},
               "content_types": {{"default": "application/octet-stream"}}, "name": "vol"}}"#
        ),
    )
}

struct Server {
    port: u16,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

/// Serves `script(n, path)` for the n-th request (0-based).
fn serve(script: impl Fn(usize, &str) -> Option<Reply> + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(vec![]));
    let (r, s) = (requests.clone(), seen.clone());
    let script = Arc::new(script);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (r, s, script) = (r.clone(), s.clone(), script.clone());
            std::thread::spawn(move || handle(conn, &r, &s, &*script));
        }
    });
    Server {
        port,
        requests,
        seen,
    }
}

fn handle(
    conn: TcpStream,
    count: &AtomicUsize,
    seen: &Mutex<Vec<String>>,
    script: &dyn Fn(usize, &str) -> Option<Reply>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = String::new();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            headers.push_str(&h);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok();
        let n = count.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(format!("{line}{headers}"));
        match script(n, &path) {
            None => {
                // Accept and never answer.
                std::thread::sleep(Duration::from_secs(600));
                return;
            }
            Some(rep) => {
                let mut head = format!(
                    "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
                    rep.status,
                    rep.content_type,
                    rep.body.len()
                );
                for (k, v) in &rep.extra_headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if conn
                    .write_all(head.as_bytes())
                    .and_then(|_| conn.write_all(&rep.body))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

fn http(deadline_ms: u64, attempts: u32) -> HttpConfig {
    HttpConfig {
        connect_timeout_ms: 500,
        request_timeout_ms: 700,
        max_attempts: attempts,
        backoff_base_ms: 50,
        backoff_max_ms: 200,
        deadline_ms,
        ..HttpConfig::default()
    }
}

fn barbican(port: u16, http: HttpConfig) -> (Barbican, tempfile::TempDir) {
    barbican_with(port, http, false)
}

fn barbican_with(
    port: u16,
    http: HttpConfig,
    require_consumer: bool,
) -> (Barbican, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let client = build_client(&http).unwrap();
    let cfg = BarbicanConfig {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        require_consumer,
    };
    (
        Barbican::new(cfg, http, client, None, state.path()).unwrap(),
        state,
    )
}

fn user() -> RequestAuth {
    RequestAuth::UserToken {
        token: SecretString::new("user-token-123"),
        service_token: None,
    }
}

fn fetch(
    b: &Barbican,
    id: &str,
    auth: &RequestAuth,
) -> (Result<luks_agent::keymgr::Key, KeyError>, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = KeyId::new(id).unwrap();
    let start = Instant::now();
    let r = rt.block_on(b.fetch(&id, auth));
    (r, start.elapsed())
}

fn standard(
    payload: Vec<u8>,
    secret_type: &'static str,
    bits: u32,
) -> impl Fn(usize, &str) -> Option<Reply> {
    move |_, path| {
        Some(if path.ends_with("/payload") {
            reply(200, "application/octet-stream", payload.clone())
        } else {
            meta(secret_type, bits)
        })
    }
}

#[test]
fn fetches_key_sends_token_and_uses_only_the_uuid_of_an_href() {
    let key: Vec<u8> = (0..32).collect();
    let s = serve(standard(key.clone(), "symmetric", 256));
    let (b, _state) = barbican(s.port, http(5000, 3));
    // The host in an href is ignored; the configured endpoint is used.
    let href = format!("https://elsewhere.invalid:9311/v1/secrets/{SECRET}");
    let auth = RequestAuth::UserToken {
        token: SecretString::new("user-token-123"),
        service_token: Some(SecretString::new("svc-token-456")),
    };
    let (r, _) = fetch(&b, &href, &auth);
    let k = r.unwrap();
    assert_eq!(k.expose(), &key[..]);
    assert_eq!(k.kind(), &SecretKind::Symmetric);
    assert_eq!(k.passphrase().expose(), hex::encode(&key).as_bytes());
    let seen = s.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0].starts_with(&format!("GET /v1/secrets/{SECRET} ")),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].starts_with(&format!("GET /v1/secrets/{SECRET}/payload ")),
        "{}",
        seen[1]
    );
    let lower = seen[1].to_ascii_lowercase();
    assert!(lower.contains("x-auth-token: user-token-123"), "{lower}");
    assert!(lower.contains("x-service-token: svc-token-456"), "{lower}");
    assert!(
        lower.contains("accept: application/octet-stream"),
        "{lower}"
    );
}

#[test]
fn passphrase_secrets_are_used_raw() {
    let s = serve(standard(b"correct horse".to_vec(), "passphrase", 0));
    let (b, _state) = barbican(s.port, http(5000, 3));
    let (r, _) = fetch(&b, SECRET, &user());
    let k = r.unwrap();
    assert_eq!(k.kind(), &SecretKind::Passphrase);
    assert_eq!(k.passphrase().expose(), b"correct horse");
    assert!(!k.is_high_entropy());
}

#[test]
fn a_long_payload_arrives_whole() {
    // Far past the first buffer the body is collected into, so it has to
    // grow several times, across many reads.
    let long: Vec<u8> = (0..40_000u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    let s = serve(standard(long.clone(), "passphrase", 0));
    let (b, _state) = barbican(s.port, http(5000, 2));
    let (r, _) = fetch(&b, SECRET, &user());
    assert_eq!(r.unwrap().passphrase().expose(), &long[..]);
}

#[test]
fn server_that_never_answers_times_out_within_the_deadline() {
    let s = serve(|_, _| None);
    let (b, _state) = barbican(s.port, http(2000, 10));
    let (r, took) = fetch(&b, SECRET, &user());
    assert!(matches!(r, Err(KeyError::TimedOut { .. })), "{r:?}");
    assert!(took < Duration::from_millis(3000), "took {took:?}");
    assert!(
        s.requests.load(Ordering::SeqCst) >= 2,
        "retried within the deadline"
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains(SECRET) && msg.contains(&format!("127.0.0.1:{}", s.port)),
        "{msg}"
    );
}

#[test]
fn refused_connections_are_unavailable_after_bounded_retries() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (b, _state) = barbican(port, http(5000, 3));
    let (r, took) = fetch(&b, SECRET, &user());
    match r {
        Err(KeyError::Unavailable {
            attempts, ref last, ..
        }) => {
            assert_eq!(attempts, 3);
            assert!(last.contains("connection"), "{last}");
        }
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn transient_5xx_is_retried_and_then_succeeds() {
    let key = vec![7u8; 32];
    let k2 = key.clone();
    let s = serve(move |n, path| {
        Some(match n {
            0 | 1 => reply(503, "text/plain", "busy"),
            _ if path.ends_with("/payload") => reply(200, "application/octet-stream", k2.clone()),
            _ => meta("symmetric", 256),
        })
    });
    let (b, _state) = barbican(s.port, http(5000, 4));
    let (r, _) = fetch(&b, SECRET, &user());
    assert_eq!(r.unwrap().expose(), &key[..]);
    assert_eq!(s.requests.load(Ordering::SeqCst), 4);
}

#[test]
fn throttling_honours_retry_after() {
    let key = vec![9u8; 32];
    let k2 = key.clone();
    let s = serve(move |n, path| {
        Some(match n {
            0 => Reply {
                extra_headers: vec![("Retry-After", "1".into())],
                ..reply(429, "text/plain", "slow down")
            },
            _ if path.ends_with("/payload") => reply(200, "application/octet-stream", k2.clone()),
            _ => meta("symmetric", 256),
        })
    });
    let (b, _state) = barbican(s.port, http(5000, 3));
    let (r, took) = fetch(&b, SECRET, &user());
    assert_eq!(r.unwrap().expose(), &key[..]);
    assert!(took >= Duration::from_millis(1000), "waited {took:?}");
}

#[test]
fn client_errors_are_typed_and_never_retried() {
    for (status, check) in [
        (
            404u16,
            (|e: &KeyError| matches!(e, KeyError::NotFound { status: 404, .. }))
                as fn(&KeyError) -> bool,
        ),
        (403, |e| {
            matches!(e, KeyError::Forbidden { status: 403, .. })
        }),
        (401, |e| {
            matches!(e, KeyError::Unauthenticated { status: 401, .. })
        }),
        (400, |e| matches!(e, KeyError::Protocol { status: 400, .. })),
    ] {
        let s = serve(move |_, _| Some(reply(status, "application/json", "{}")));
        let (b, _state) = barbican(s.port, http(5000, 4));
        let (r, _) = fetch(&b, SECRET, &user());
        let e = r.unwrap_err();
        assert!(check(&e), "{status}: {e:?}");
        assert_eq!(
            s.requests.load(Ordering::SeqCst),
            1,
            "{status} must not be retried"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(SECRET) && msg.contains(&status.to_string()),
            "{msg}"
        );
    }
}

#[test]
fn nonsense_answers_are_protocol_errors() {
    let cases: Vec<Box<Script>> = vec![
        Box::new(|_, _| Some(reply(200, "application/json", "<html>not json</html>"))),
        Box::new(|_, path| {
            Some(if path.ends_with("/payload") {
                reply(200, "text/html", "<html>login page</html>")
            } else {
                meta("symmetric", 256)
            })
        }),
        Box::new(|_, path| {
            Some(if path.ends_with("/payload") {
                reply(200, "application/octet-stream", vec![0u8; 1 << 20])
            } else {
                meta("symmetric", 256)
            })
        }),
    ];
    for script in cases {
        let s = serve(script);
        let (b, _state) = barbican(s.port, http(5000, 2));
        let (r, _) = fetch(&b, SECRET, &user());
        assert!(matches!(r, Err(KeyError::Protocol { .. })), "{r:?}");
    }
}

#[test]
fn unusable_key_material_is_refused() {
    for (payload, secret_type, bits) in [
        (vec![1u8, 2, 3], "symmetric", 24),
        (vec![], "symmetric", 256),
        (vec![5u8; 32], "symmetric", 128),
        (vec![0xff, 0xfe, 0xfd], "passphrase", 0),
        (vec![5u8; 32], "certificate", 256),
    ] {
        let s = serve(standard(payload.clone(), secret_type, bits));
        let (b, _state) = barbican(s.port, http(5000, 2));
        let (r, _) = fetch(&b, SECRET, &user());
        let e = r.unwrap_err();
        assert!(
            matches!(e, KeyError::InvalidKeyMaterial { .. }),
            "{secret_type} {payload:?}: {e:?}"
        );
        assert!(e.to_string().contains(SECRET));
    }
}

#[test]
fn ids_that_are_not_secret_uuids_are_refused_without_a_request() {
    let s = serve(|_, _| Some(reply(200, "application/json", "{}")));
    let (b, _state) = barbican(s.port, http(5000, 2));
    let (r, _) = fetch(&b, "not-a-uuid", &user());
    assert!(matches!(r, Err(KeyError::InvalidKeyId { .. })), "{r:?}");
    assert_eq!(s.requests.load(Ordering::SeqCst), 0);
}

/// The most requests the server had in flight at once while `fetches`
/// keys were fetched at the same time through one client with
/// `max_concurrent_requests = cap`; every fetch must succeed.
fn peak_in_flight(cap: u32, fetches: usize) -> usize {
    let key = vec![4u8; 32];
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n2, p2) = (now.clone(), peak.clone());
    let answer = standard(key.clone(), "symmetric", 256);
    let s = serve(move |n, path| {
        let in_flight = n2.fetch_add(1, Ordering::SeqCst) + 1;
        p2.fetch_max(in_flight, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        n2.fetch_sub(1, Ordering::SeqCst);
        answer(n, path)
    });
    let cfg = HttpConfig {
        max_concurrent_requests: cap,
        ..http(20_000, 1)
    };
    let (b, _state) = barbican(s.port, cfg);
    let b = Arc::new(b);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..fetches {
            let b = b.clone();
            all.spawn(async move {
                let id = KeyId::new(SECRET).unwrap();
                b.fetch(&id, &user()).await.map(|k| k.expose().to_vec())
            });
        }
        while let Some(r) = all.join_next().await {
            assert_eq!(r.unwrap().unwrap(), key, "a fetch in the storm failed");
        }
    });
    assert_eq!(s.requests.load(Ordering::SeqCst), 2 * fetches);
    peak.load(Ordering::SeqCst)
}

/// A storm of fetches queues behind the host's cap on requests in flight
/// (and all succeed); without the cap the same storm reaches the server
/// at once, so the check can see the difference.
#[test]
fn a_storm_of_fetches_queues_behind_the_cap() {
    let capped = peak_in_flight(3, 24);
    assert!(
        (1..=3).contains(&capped),
        "{capped} requests in flight with a cap of 3"
    );
    let uncapped = peak_in_flight(64, 24);
    assert!(
        uncapped > 3,
        "only {uncapped} requests in flight without a cap: the test cannot tell"
    );
}

/// Taking the hold on a key (the Barbican consumer) against a server that
/// fails at it: `status` for every consumer request. The outcome, and the
/// server's requests.
fn take_hold_against(status: u16, require: bool) -> (Result<Hold, KeyError>, Vec<String>) {
    let s = serve(move |_, path| {
        Some(if path.contains("/consumers") {
            reply(status, "application/json", r#"{"code": 1, "title": "no"}"#)
        } else {
            reply(200, "application/json", "{}")
        })
    });
    let (b, _state) = barbican_with(s.port, http(3000, 2), require);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = KeyId::new(SECRET).unwrap();
    let holder = KeyHolder {
        volume_id: "vol-1".into(),
        host: "compute-1".into(),
    };
    let r = rt.block_on(b.hold(&id, &user(), &holder, HoldOp::Take, false));
    let seen = s.seen.lock().unwrap().clone();
    (r, seen)
}

/// A Barbican that refuses consumers (policy), has no such API, or fails
/// at it (500 after the retries) never fails the attach's hold unless
/// `require_consumer` is set; then the error is typed and names the key: a
/// refusal is `NotHeld`, a failing Barbican `Unavailable`. The consumer
/// request carries the microversion that has consumers and the caller's
/// token.
#[test]
fn a_refused_or_failing_consumer_is_not_an_error_unless_required() {
    for status in [403, 404, 500] {
        let (r, seen) = take_hold_against(status, false);
        match r {
            Ok(Hold::NotKept { reason }) => {
                assert!(!reason.contains("user-token-123"), "{reason}");
            }
            other => panic!("HTTP {status}: {other:?}"),
        }
        let post = seen
            .iter()
            .find(|r| r.starts_with("POST /v1/secrets/") && r.contains("/consumers"))
            .unwrap_or_else(|| panic!("no consumer request in {seen:?}"));
        let lower = post.to_ascii_lowercase();
        assert!(
            lower.contains("openstack-api-version: key-manager 1.1"),
            "{post}"
        );
        assert!(lower.contains("x-auth-token: user-token-123"), "{post}");
        let (r, _) = take_hold_against(status, true);
        match (status, r) {
            (403 | 404, Err(e @ KeyError::NotHeld { .. })) => {
                let shown = e.to_string();
                assert!(
                    shown.contains(SECRET) && shown.contains("require_consumer"),
                    "{shown}"
                );
            }
            (500, Err(e @ KeyError::Unavailable { .. })) => {
                assert!(e.to_string().contains(SECRET), "{e}");
            }
            (_, other) => panic!("HTTP {status}, required: {other:?}"),
        }
    }
}

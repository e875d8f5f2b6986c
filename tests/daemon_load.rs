//! Load on the agent's API in the libvirt mode: the real `luks-agent
//! serve` binary, a real libvirtd (`tests/harness/libvirtd.sh`) and a real
//! Keystone and Barbican (`tests/harness/openstack.py`), 50 volumes on
//! sparse files with one 256-bit symmetric Barbican key each, as cinder
//! makes them.
//!
//! 200 requests: 50 chains of four, one chain per volume, all released at
//! once (a fifth of the chains open with two attaches of their volume at
//! the same time). Within a chain the requests are sequential, so every
//! answer is determined: first-use attach (format and secret), re-attach,
//! detach, detach with `keep_secret`, detach of a detached volume, and
//! status. Half the requests carry the caller's Keystone token, the others
//! use the agent's own credentials. Every answer is checked field by field:
//! all 200 are 200, the status requests (taken right after the chain's
//! attach) showing the volume in mode `libvirt` with its secret.
//!
//! Afterwards: exactly the volumes left attached have a libvirt secret
//! (found by usage, as nova looks it up) and a secret record in the run
//! directory; no per-volume lock is held (a non-blocking flock of every
//! lock file succeeds, and a second round of attach and detach of all 50
//! finishes); every volume was formatted once, as LUKS1, and never again;
//! no format record is left; the whole agent log holds none of the keys
//! (raw, hex, base64), the token or the agent's password.
//!
//! Latency per operation (p50, p99, max, measured by the caller: connect
//! to last byte; beside it the agent's own `duration_ms` and the rest:
//! queueing for the volume and HTTP) and the agent's peak RSS (`VmHWM`)
//! are printed, never asserted: speed belongs in benchmarks.
//!
//! A second test takes one volume through the API step by step with the
//! local key store: the secret defined, private and without a file, the
//! `encryption_xml`, re-attach, `keep_secret`, detach twice, `luks2` and
//! `plain` refused, and an unreachable libvirtd, with nothing written.
//!
//! Needs root. With CI=true a libvirtd that cannot start fails the test;
//! elsewhere it says loudly that it is skipped. A test cloud that cannot
//! start fails it, as in `tests/keymgr_openstack.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use luks_agent::keymgr::http::{HttpConfig, build_client};
use serde_json::{Value, json};
use virt::connect::Connect;
use virt::secret::Secret;

mod common;

use common::harness::{libvirtd_or_skip, openstack_py, test_cloud};
use common::serve::{Answer, Server, create_local_key, request_bytes, write_local_config};

const URI: &str = "qemu:///system";
const VOLUMES: usize = 50;
const MIB: u64 = 1 << 20;
const VOLUME: i32 = virt::sys::VIR_SECRET_USAGE_TYPE_VOLUME as i32;

// ---------------------------------------------------------------------------
// Barbican secrets
// ---------------------------------------------------------------------------

fn barbican_client() -> reqwest::Client {
    build_client(&HttpConfig::default()).unwrap()
}

/// Creates one Barbican secret per key, as castellan stores cinder's
/// volume keys: the ids made (in order) and the error that stopped it.
/// One at a time: the test cloud's Barbican keeps its database in SQLite,
/// which answers concurrent inserts with "database is locked" (500).
fn create_secrets(endpoint: &str, token: &str, keys: &[[u8; 32]]) -> (Vec<String>, Option<String>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = barbican_client();
        let mut ids = vec![];
        for (i, key) in keys.iter().enumerate() {
            let body = json!({
                "name": format!("luks-agent-load-{i}"),
                "secret_type": "symmetric",
                "algorithm": "aes",
                "bit_length": 256,
                "payload": base64::engine::general_purpose::STANDARD.encode(key),
                "payload_content_type": "application/octet-stream",
                "payload_content_encoding": "base64",
            });
            let resp = match client
                .post(format!("{endpoint}/v1/secrets"))
                .header("X-Auth-Token", token)
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return (ids, Some(format!("POST /v1/secrets: {e}"))),
            };
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or_default();
            match v["secret_ref"].as_str() {
                Some(href) if status == 201 => {
                    ids.push(href.rsplit('/').next().unwrap_or_default().to_string())
                }
                _ => return (ids, Some(format!("POST /v1/secrets: {status} {v}"))),
            }
        }
        (ids, None)
    })
}

fn delete_secrets(endpoint: &str, token: &str, ids: &[String]) {
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return;
    };
    rt.block_on(async {
        let client = barbican_client();
        for id in ids.iter().filter(|i| !i.is_empty()) {
            let _ = client
                .delete(format!("{endpoint}/v1/secrets/{id}"))
                .header("X-Auth-Token", token)
                .send()
                .await;
        }
    });
}

/// Barbican's user metadata of secret `id`.
fn secret_metadata(endpoint: &str, token: &str, ids: &[String]) -> Vec<Value> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = barbican_client();
        let mut out = vec![];
        for id in ids {
            let r = client
                .get(format!("{endpoint}/v1/secrets/{id}/metadata"))
                .header("X-Auth-Token", token)
                .header("Accept", "application/json")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200, "metadata of {id}");
            out.push(r.json::<Value>().await.unwrap());
        }
        out
    })
}

// ---------------------------------------------------------------------------
// HTTP over the agent's socket
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    body: Value,
}

/// One request on a new connection; the answer and the time from connect
/// to the last byte.
fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> (Resp, Duration) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let raw = request_bytes(method, path, body.as_bytes(), None);
    let started = Instant::now();
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&raw).unwrap();
    let mut out = vec![];
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let took = started.elapsed();
    let answer = Answer::parse(&out);
    let body = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&answer.body)
        )
    });
    (
        Resp {
            status: answer.status,
            body,
        },
        took,
    )
}

// ---------------------------------------------------------------------------
// The run: agent, volumes, keys, and everything to clean up
// ---------------------------------------------------------------------------

struct Volume {
    id: String,
    file: PathBuf,
    key_id: String,
    key: [u8; 32],
}

/// Everything the test made; Drop stops the agent and removes the
/// secrets (libvirt and Barbican), also when the test fails. The files
/// go with the temporary directory.
struct Run {
    dir: tempfile::TempDir,
    socket: PathBuf,
    agent: Option<Server>,
    barbican: String,
    token: String,
    volumes: Vec<Volume>,
}

impl Run {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn pid(&self) -> i32 {
        self.agent.as_ref().unwrap().pid()
    }

    fn start_agent(&mut self, config: &Path) {
        let log = self.log_path();
        self.agent = Some(Server::start(
            config,
            &self.socket,
            &log,
            Duration::from_secs(30),
        ));
    }

    /// SIGTERM; the exit status.
    fn stop_agent(&mut self) -> Option<std::process::ExitStatus> {
        self.agent.as_mut()?.try_stop()
    }

    fn body(&self, v: &Volume, token: bool, extra: Value) -> Value {
        let mut b = json!({
            "device": v.file,
            "encryption": {"provider": "luks", "control_location": "front-end",
                           "cipher": "aes-xts-plain64", "key_size": 256,
                           "encryption_key_id": v.key_id},
            "mode": "libvirt",
        });
        if token {
            b["auth"] = json!({"token": self.token});
        }
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop_agent();
        if let Ok(mut conn) = Connect::open(Some(URI)) {
            for v in &self.volumes {
                if let Ok(s) = Secret::lookup_by_usage(&conn, VOLUME, &v.id) {
                    let _ = s.undefine();
                }
            }
            let _ = conn.close();
        }
        let ids: Vec<String> = self.volumes.iter().map(|v| v.key_id.clone()).collect();
        delete_secrets(&self.barbican, &self.token, &ids);
    }
}

/// Secrets with usage type volume whose usage id is one of `ids`, as
/// `virsh secret-list` shows them: usage id -> UUIDs.
fn libvirt_secrets(ids: &BTreeSet<String>) -> BTreeMap<String, Vec<String>> {
    let out = Command::new("virsh")
        .args(["-c", URI, "secret-list"])
        .stdin(Stdio::null())
        .output()
        .expect("virsh (libvirt-clients) is required");
    assert!(out.status.success(), "virsh secret-list: {out:?}");
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [uuid, "volume", vid] = f[..]
            && ids.contains(vid)
        {
            found.entry(vid.to_string()).or_default().push(uuid.into());
        }
    }
    found
}

/// The secret nova would find for `vid` (`virSecretLookupByUsage`).
fn lookup_by_usage(conn: &Connect, vid: &str) -> Option<String> {
    Secret::lookup_by_usage(conn, VOLUME, vid)
        .ok()
        .map(|s| s.get_uuid_string().unwrap())
}

/// LUKS version and UUID of the header on `file`.
fn luks_header(file: &Path) -> (u16, String) {
    let mut h = [0u8; 208];
    fs::File::open(file).unwrap().read_exact(&mut h).unwrap();
    assert_eq!(
        &h[..6],
        b"LUKS\xba\xbe",
        "{}: no LUKS header",
        file.display()
    );
    let version = u16::from_be_bytes([h[6], h[7]]);
    let uuid = String::from_utf8_lossy(&h[168..208])
        .trim_end_matches('\0')
        .to_string();
    (version, uuid)
}

/// Whether another process holds the flock on `path`.
fn lock_is_held(path: &Path) -> bool {
    let f = fs::File::open(path).unwrap();
    // SAFETY: flock on a descriptor we own; LOCK_NB never blocks.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

/// One answer, for the latency figures.
struct Sample {
    op: &'static str,
    took: Duration,
    /// The agent's own `duration_ms` for attach and detach: the operation
    /// alone, without the wait for the volume's lock.
    agent_ms: Option<f64>,
}

/// What each chain's volume should end as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Attached,
    Detached,
}

/// The kind of chain run for volume `i` and how it ends.
fn chain_end(i: usize) -> End {
    match i % 5 {
        0 | 2 => End::Detached,
        _ => End::Attached,
    }
}

/// Checks an attach answer; returns the secret's UUID.
fn check_attach(r: &Resp, v: &Volume, actions: &[&str], formatted: Option<bool>) -> String {
    let b = &r.body;
    assert_eq!(r.status, 200, "attach {}: {b}", v.id);
    assert_eq!(b["volume_id"], v.id.as_str(), "{b}");
    assert_eq!(b["path"], v.file.to_str().unwrap(), "{b}");
    assert_eq!(b["mapping"], Value::Null, "{b}");
    assert!(
        actions.contains(&b["action"].as_str().unwrap_or_default()),
        "attach {}: action not in {actions:?}: {b}",
        v.id
    );
    if let Some(f) = formatted {
        assert_eq!(b["formatted"], f, "attach {}: {b}", v.id);
    }
    assert_eq!(b["ephemeral"], true, "{b}");
    assert_eq!(b["private"], true, "{b}");
    let uuid = b["secret_uuid"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&uuid).is_ok(), "{b}");
    assert_eq!(
        b["encryption_xml"],
        format!("<encryption format='luks'><secret type='passphrase' uuid='{uuid}'/></encryption>"),
        "{b}"
    );
    uuid
}

fn check_detach(r: &Resp, v: &Volume, action: &str, uuid: Option<&str>) {
    let b = &r.body;
    assert_eq!(r.status, 200, "detach {}: {b}", v.id);
    assert_eq!(b["volume_id"], v.id.as_str(), "{b}");
    assert_eq!(b["mapping"], Value::Null, "{b}");
    assert_eq!(b["action"], action, "detach {}: {b}", v.id);
    assert_eq!(b["secret_uuid"].as_str(), uuid, "detach {}: {b}", v.id);
}

/// Status of a libvirt-mode volume that its chain has just attached: its
/// own route answers with mode `libvirt` and its secret, and the listing
/// (where other chains' volumes come and go) includes it likewise.
fn check_status(r: &Resp, v: &Volume, one: bool) {
    let b = &r.body;
    assert_eq!(r.status, 200, "status of {}: {b}", v.id);
    let entry = if one {
        b.clone()
    } else {
        b["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|e| e["volume_id"] == v.id.as_str()))
            .cloned()
            .unwrap_or_else(|| panic!("{} missing from the listing: {b}", v.id))
    };
    assert_eq!(entry["volume_id"], v.id.as_str(), "{entry}");
    assert_eq!(entry["mode"], "libvirt", "{entry}");
    assert!(entry["secret_uuid"].is_string(), "{entry}");
    assert_eq!(entry["mapping"], Value::Null, "{entry}");
}

/// Runs volume `i`'s chain of four requests; the secret UUID it ends with
/// (attached) and whether the volume was formatted by it (count).
fn chain(
    run: &Run,
    i: usize,
    start: &Barrier,
    samples: &Mutex<Vec<Sample>>,
) -> (Option<String>, usize) {
    let v = &run.volumes[i];
    let s = &run.socket;
    let token = i.is_multiple_of(2);
    let attach_path = format!("/v1/volumes/{}/attach", v.id);
    let detach_path = format!("/v1/volumes/{}/detach", v.id);
    let show_path = format!("/v1/volumes/{}", v.id);
    let record = |op, took, r: &Resp| {
        let agent_ms = r.body["duration_ms"].as_f64();
        samples.lock().unwrap().push(Sample { op, took, agent_ms })
    };
    let attach = |token: bool| {
        let (r, t) = call(
            s,
            "POST",
            &attach_path,
            Some(&run.body(v, token, json!({}))),
        );
        record("attach", t, &r);
        r
    };
    let detach = |keep: bool| {
        let extra = if keep {
            json!({"keep_secret": true})
        } else {
            json!({})
        };
        let (r, t) = call(s, "POST", &detach_path, Some(&run.body(v, token, extra)));
        record("detach", t, &r);
        r
    };
    let status = |one: bool| {
        let (r, t) = call(s, "GET", if one { &show_path } else { "/v1/volumes" }, None);
        record("status", t, &r);
        check_status(&r, v, one);
    };
    let formatted = |r: &Resp| usize::from(r.body["formatted"] == true);
    match i % 5 {
        // attach, attach (reused), status, detach.
        0 => {
            start.wait();
            let a = attach(token);
            let uuid = check_attach(&a, v, &["created"], Some(true));
            let b = attach(!token);
            assert_eq!(check_attach(&b, v, &["reused"], Some(false)), uuid);
            status(true);
            check_detach(&detach(false), v, "removed", Some(&uuid));
            (None, formatted(&a))
        }
        // attach, list, detach keeping the secret, attach (reused).
        1 => {
            start.wait();
            let a = attach(token);
            let uuid = check_attach(&a, v, &["created"], Some(true));
            status(false);
            check_detach(&detach(true), v, "kept", Some(&uuid));
            let b = attach(token);
            assert_eq!(check_attach(&b, v, &["reused"], Some(false)), uuid);
            (Some(uuid), formatted(&a))
        }
        // two attaches at once, detach, detach again.
        2 => {
            let (a, b) = std::thread::scope(|sc| {
                let other = sc.spawn(|| {
                    start.wait();
                    attach(!token)
                });
                start.wait();
                (attach(token), other.join().unwrap())
            });
            let ua = check_attach(&a, v, &["created", "reused"], None);
            let ub = check_attach(&b, v, &["created", "reused"], None);
            assert_eq!(ua, ub, "two secrets for {}", v.id);
            let actions: BTreeSet<_> = [&a, &b]
                .iter()
                .map(|r| r.body["action"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(actions.len(), 2, "{} and {}", a.body, b.body);
            assert_eq!(formatted(&a) + formatted(&b), 1, "{} {}", a.body, b.body);
            check_detach(&detach(false), v, "removed", Some(&ua));
            check_detach(&detach(false), v, "absent", None);
            (None, formatted(&a) + formatted(&b))
        }
        // attach, detach, attach (a new secret, no format), status.
        3 => {
            start.wait();
            let a = attach(token);
            let first = check_attach(&a, v, &["created"], Some(true));
            check_detach(&detach(false), v, "removed", Some(&first));
            let b = attach(!token);
            let uuid = check_attach(&b, v, &["created"], Some(false));
            status(true);
            (Some(uuid), formatted(&a))
        }
        // attach, status, list, attach (reused).
        _ => {
            start.wait();
            let a = attach(token);
            let uuid = check_attach(&a, v, &["created"], Some(true));
            status(true);
            status(false);
            let b = attach(!token);
            assert_eq!(check_attach(&b, v, &["reused"], Some(false)), uuid);
            (Some(uuid), formatted(&a))
        }
    }
}

fn report(title: &str, samples: &[Sample], wall: Duration) {
    let mut by_op: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for s in samples {
        by_op.entry(s.op).or_default().push(s.took);
        by_op.entry("all").or_default().push(s.took);
    }
    eprintln!("{title}: {} requests in {:.0} ms", samples.len(), ms(wall));
    for (op, mut d) in by_op {
        d.sort();
        eprintln!(
            "  {op:<7} n={:<4} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
            d.len(),
            ms(percentile(&d, 0.50)),
            ms(percentile(&d, 0.99)),
            ms(*d.last().unwrap())
        );
        let mut own: Vec<Duration> = vec![];
        let mut outside: Vec<Duration> = vec![];
        for s in samples.iter().filter(|s| s.op == op) {
            if let Some(a) = s.agent_ms {
                let a = Duration::from_secs_f64(a / 1000.0);
                own.push(a);
                outside.push(s.took.saturating_sub(a));
            }
        }
        if !own.is_empty() {
            own.sort();
            outside.sort();
            eprintln!(
                "          the operation (agent's duration_ms): p50 {:>7.1} ms  p99 {:>7.1} ms; \
                 the rest (queue, HTTP): p50 {:>7.1} ms  p99 {:>7.1} ms",
                ms(percentile(&own, 0.50)),
                ms(percentile(&own, 0.99)),
                ms(percentile(&outside, 0.50)),
                ms(percentile(&outside, 0.99))
            );
        }
    }
}

/// One test at a time, so that the load's figures are its own.
static SERIAL: Mutex<()> = Mutex::new(());

/// The lock, once libvirtd answers; `None` (after saying why, loudly)
/// when it cannot run here, and in CI a failure instead.
fn libvirtd() -> Option<MutexGuard<'static, ()>> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // libvirt's default handler prints every error (an expected "no such
    // secret" too) to stderr.
    virt::error::clear_error_callback();
    libvirtd_or_skip("the libvirt-mode API tests").then_some(serial)
}

#[test]
fn two_hundred_concurrent_requests_in_libvirt_mode() {
    let Some(_serial) = libvirtd() else { return };
    let cloud = test_cloud().unwrap_or_else(|e| panic!("the Keystone + Barbican test cloud: {e}"));
    let state = cloud["state_dir"].as_str().unwrap();
    let token = openstack_py(&["token", "--state", state, "--user", "alice"])
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string();
    let barbican = cloud["barbican"]["endpoint"].as_str().unwrap().to_string();
    let password = cloud["users"]["alice"]["password"]
        .as_str()
        .unwrap()
        .to_string();

    let dir = tempfile::tempdir().unwrap();
    let mut run = Run {
        socket: dir.path().join("agent.sock"),
        dir,
        agent: None,
        barbican: barbican.clone(),
        token: token.clone(),
        volumes: vec![],
    };
    let keys: Vec<[u8; 32]> = (0..VOLUMES)
        .map(|_| {
            let mut k = [0u8; 32];
            getrandom::fill(&mut k).unwrap();
            k
        })
        .collect();
    let t = Instant::now();
    let (key_ids, failed) = create_secrets(&barbican, &token, &keys);
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    for (i, key) in keys.iter().enumerate() {
        let file = run.dir.path().join(format!("vol{i:02}.img"));
        fs::File::create(&file).unwrap().set_len(8 * MIB).unwrap();
        run.volumes.push(Volume {
            id: format!("load-{tag}-{i:02}"),
            file,
            key_id: key_ids.get(i).cloned().unwrap_or_default(),
            key: *key,
        });
    }
    // Checked once the volumes are registered, so that Drop deletes what
    // was made.
    if let Some(e) = failed {
        panic!("creating the Barbican secrets: {e}");
    }
    eprintln!(
        "{VOLUMES} Barbican secrets created in {:.0} ms",
        ms(t.elapsed())
    );

    let p = run.dir.path().display().to_string();
    // More retries than the default 4: the test cloud's Barbican keeps its
    // database in SQLite, which answers concurrent writes (the formatted
    // markers of 50 first-use attaches) with "database is locked" (500)
    // often enough that a marker can need four attempts or more.
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let config = run.dir.path().join("agent.toml");
    let text = format!(
        "state_dir = \"{p}/state\"\nrun_dir = \"{p}/run\"\n\n\
         [key_manager]\nbackend = \"barbican\"\n\n\
         [key_manager.barbican]\nendpoint = {}\n\n\
         [key_manager.keystone]\nauth_url = {}\nauth_type = \"password\"\n\
         username = \"alice\"\npassword = {}\nproject_name = \"proj-a\"\n\
         user_domain_name = \"Default\"\nproject_domain_name = \"Default\"\n\n\
         [key_manager.http]\nmax_attempts = 12\nbackoff_base_ms = 100\n\
         backoff_max_ms = 1000\ndeadline_ms = 60000\n\n\
         [server]\nsocket = \"{p}/agent.sock\"\nkdf_memory_budget_kib = 262144\n\n\
         [libvirt]\nuri = \"{URI}\"\n",
        q(&barbican),
        q(cloud["keystone"]["auth_url"].as_str().unwrap()),
        q(&password),
    );
    // The agent refuses a file holding a password that others can read.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    run.start_agent(&config);

    // Phase 1: 50 chains of 4 requests, released together.
    let threads = VOLUMES + (0..VOLUMES).filter(|i| i % 5 == 2).count();
    let start = Arc::new(Barrier::new(threads));
    let samples = Mutex::new(vec![]);
    let t = Instant::now();
    let results: Vec<(Option<String>, usize)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..VOLUMES)
            .map(|i| {
                let (run, start, samples) = (&run, start.clone(), &samples);
                sc.spawn(move || chain(run, i, &start, samples))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = t.elapsed();
    let samples = samples.into_inner().unwrap();
    assert_eq!(samples.len(), 4 * VOLUMES);
    report(
        "load: 50 volumes, chains of 4, released together",
        &samples,
        wall,
    );

    // Every volume formatted exactly once, as LUKS1.
    let mut header_uuids = vec![];
    for (v, (_, formats)) in run.volumes.iter().zip(&results) {
        assert_eq!(*formats, 1, "{} formatted {formats} times", v.id);
        let (version, uuid) = luks_header(&v.file);
        assert_eq!(version, 1, "{}: QEMU-native volumes are LUKS1", v.id);
        header_uuids.push(uuid);
    }
    for v in &run.volumes {
        let cs = Command::new("cryptsetup")
            .args(["isLuks", "--type", "luks1"])
            .arg(&v.file)
            .status()
            .expect("cryptsetup is required");
        assert!(
            cs.success(),
            "cryptsetup isLuks --type luks1 {}: {cs}",
            v.id
        );
    }

    // Exactly the attached volumes have a secret, the one their last
    // attach returned, found by usage as nova finds it.
    let ids: BTreeSet<String> = run.volumes.iter().map(|v| v.id.clone()).collect();
    let listed = libvirt_secrets(&ids);
    let mut conn = Connect::open(Some(URI)).unwrap();
    for (i, (v, (uuid, _))) in run.volumes.iter().zip(&results).enumerate() {
        assert_eq!(uuid.is_some(), chain_end(i) == End::Attached);
        let want: Vec<String> = uuid.iter().cloned().collect();
        assert_eq!(
            listed.get(&v.id).cloned().unwrap_or_default(),
            want,
            "libvirt secrets of {}",
            v.id
        );
        assert_eq!(lookup_by_usage(&conn, &v.id), *uuid, "{}", v.id);
    }
    conn.close().unwrap();

    // The run directory: a secret record per attached volume, no attach
    // record (the libvirt mode makes none), no lock held, no format
    // record left in the state directory.
    let run_dir = run.run_dir();
    for (i, v) in run.volumes.iter().enumerate() {
        let rec = run_dir.join(format!("secrets/{}.json", v.id));
        assert_eq!(
            rec.exists(),
            chain_end(i) == End::Attached,
            "{}",
            rec.display()
        );
        let lock = run_dir.join(format!("locks/{}.lock", v.id));
        assert!(!lock_is_held(&lock), "{} is still locked", lock.display());
    }
    let entries = |d: PathBuf| -> Vec<String> {
        fs::read_dir(&d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(entries(run_dir.join("volumes")), Vec::<String>::new());
    assert_eq!(
        entries(run.dir.path().join("state/formatting")),
        Vec::<String>::new()
    );
    // Barbican records every key as formatted.
    let metadata = secret_metadata(
        &barbican,
        &token,
        &run.volumes
            .iter()
            .map(|v| v.key_id.clone())
            .collect::<Vec<_>>(),
    );
    for (v, m) in run.volumes.iter().zip(&metadata) {
        assert!(
            m["metadata"]
                .as_object()
                .is_some_and(|o| o.keys().any(|k| k.contains("formatted"))),
            "key {} of {} not marked formatted: {m}",
            v.key_id,
            v.id
        );
    }

    // Phase 2: no lock left behind in the agent either: attach all 50 at
    // once (no format), then detach all 50 at once.
    let mut round = vec![];
    let mut second: Vec<String> = vec![];
    let t = Instant::now();
    for op in ["attach", "detach"] {
        let answers: Vec<(Resp, Duration)> = std::thread::scope(|sc| {
            let handles: Vec<_> = run
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let run = &run;
                    sc.spawn(move || {
                        let path = format!("/v1/volumes/{}/{op}", v.id);
                        call(
                            &run.socket,
                            "POST",
                            &path,
                            Some(&run.body(v, i % 2 == 1, json!({}))),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, ((r, took), v)) in answers.into_iter().zip(&run.volumes).enumerate() {
            let before = results[i].0.as_deref();
            if op == "attach" {
                let want = if before.is_some() {
                    "reused"
                } else {
                    "created"
                };
                let uuid = check_attach(&r, v, &[want], Some(false));
                if let Some(b) = before {
                    assert_eq!(uuid, b, "{}", v.id);
                }
                second.push(uuid);
            } else {
                check_detach(&r, v, "removed", Some(&second[i]));
            }
            round.push(Sample {
                op,
                took,
                agent_ms: r.body["duration_ms"].as_f64(),
            });
        }
    }
    report(
        "then 50 attaches and 50 detaches at once",
        &round,
        t.elapsed(),
    );
    assert!(
        libvirt_secrets(&ids).is_empty(),
        "secrets left after detach"
    );
    for v in &run.volumes {
        assert!(!run_dir.join(format!("secrets/{}.json", v.id)).exists());
        assert!(!lock_is_held(&run_dir.join(format!("locks/{}.lock", v.id))));
    }
    for (v, before) in run.volumes.iter().zip(&header_uuids) {
        assert_eq!(
            &luks_header(&v.file).1,
            before,
            "{} was formatted again",
            v.id
        );
    }

    // Peak memory of the agent over the whole run.
    let status = fs::read_to_string(format!("/proc/{}/status", run.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    eprintln!(
        "agent peak RSS (VmHWM) {}, now (VmRSS) {}",
        field("VmHWM:"),
        field("VmRSS:")
    );
    let st = run.stop_agent().expect("the agent did not stop on SIGTERM");
    assert!(st.success(), "agent exit: {st}");

    // No key (raw, hex, base64), token or password anywhere in the log.
    let log = fs::read(run.log_path()).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert_eq!(
        text.matches("volume operation").count(),
        4 * VOLUMES - samples.iter().filter(|s| s.op == "status").count() + 2 * VOLUMES,
        "one log line per operation"
    );
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("token".into(), token.clone().into_bytes()),
        ("password".into(), password.clone().into_bytes()),
    ];
    for v in &run.volumes {
        needles.extend(common::key_encodings(&format!("key of {}", v.id), &v.key));
    }
    common::assert_none_in(&log, &needles, "the agent's log");
    eprintln!(
        "agent log: {} lines, {} bytes, none of {} keys/credentials in it",
        text.lines().count(),
        log.len(),
        needles.len()
    );
}

/// One volume through the API in the libvirt mode, step by step, with the
/// local key store: the secret defined (found by usage, private, no file),
/// the `<encryption>` element, re-attach, detach keeping the secret,
/// detach, detach again; `luks2` and an unreachable libvirtd refused with
/// nothing written.
#[test]
fn attach_and_detach_through_the_api_in_libvirt_mode() {
    let Some(_serial) = libvirtd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display().to_string();
    let mut run = Run {
        socket: dir.path().join("agent.sock"),
        dir,
        agent: None,
        barbican: String::new(),
        token: String::new(),
        volumes: vec![],
    };
    let config = write_local_config(
        run.dir.path(),
        &format!("kdf_memory_budget_kib = 262144\n[libvirt]\nuri = \"{URI}\""),
    );
    let text = fs::read_to_string(&config).unwrap();
    let (key_id, hex) = create_local_key(&config);
    let mut key = [0u8; 32];
    key.copy_from_slice(&hex::decode(&hex).unwrap());
    let file = run.dir.path().join("vol.img");
    fs::File::create(&file).unwrap().set_len(8 * MIB).unwrap();
    run.volumes.push(Volume {
        id: format!("api-{}", uuid::Uuid::new_v4()),
        file: file.clone(),
        key_id: String::new(),
        key,
    });
    run.start_agent(&config);
    let v = &run.volumes[0];
    let body = |provider: &str, extra: Value| {
        let mut b = run.body(v, false, extra);
        b["encryption"]["provider"] = json!(provider);
        b["encryption"]["encryption_key_id"] = json!(key_id);
        b
    };
    let post = |op: &str, b: &Value| {
        call(
            &run.socket,
            "POST",
            &format!("/v1/volumes/{}/{op}", v.id),
            Some(b),
        )
        .0
    };
    let zeros = || fs::read(&file).unwrap().iter().all(|b| *b == 0);

    // QEMU cannot open LUKS2 (or plain) natively: refused, nothing written.
    for provider in ["luks2", "plain"] {
        let r = post("attach", &body(provider, json!({})));
        assert_eq!(r.status, 422, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "unsupported", "{}", r.body);
        assert!(zeros(), "{provider}: the device was written");
    }

    let a = post("attach", &body("luks", json!({})));
    let uuid = check_attach(&a, v, &["created"], Some(true));
    let mut conn = Connect::open(Some(URI)).unwrap();
    assert_eq!(
        lookup_by_usage(&conn, &v.id).as_deref(),
        Some(uuid.as_str())
    );
    let s = Secret::lookup_by_usage(&conn, VOLUME, &v.id).unwrap();
    assert!(
        s.get_value(0).is_err(),
        "a private secret's value was readable"
    );
    drop(s);
    for ext in ["xml", "base64"] {
        let f = PathBuf::from(format!("/etc/libvirt/secrets/{uuid}.{ext}"));
        assert!(!f.exists(), "an ephemeral secret has {}", f.display());
    }
    assert_eq!(luks_header(&file).0, 1);
    let b = post("attach", &body("luks", json!({})));
    assert_eq!(check_attach(&b, v, &["reused"], Some(false)), uuid);

    let k = post("detach", &body("luks", json!({"keep_secret": true})));
    check_detach(&k, v, "kept", Some(&uuid));
    assert_eq!(
        lookup_by_usage(&conn, &v.id).as_deref(),
        Some(uuid.as_str())
    );
    let r = post("attach", &body("luks", json!({"keep_secret": true})));
    assert_eq!(
        (r.status, &r.body["error"]["code"]),
        (400, &json!("invalid_request")),
        "{}",
        r.body
    );
    let d = post("detach", &body("luks", json!({})));
    check_detach(&d, v, "removed", Some(&uuid));
    assert_eq!(lookup_by_usage(&conn, &v.id), None);
    let d = post("detach", &body("luks", json!({})));
    check_detach(&d, v, "absent", None);
    conn.close().unwrap();
    assert!(
        !run.run_dir()
            .join(format!("secrets/{}.json", v.id))
            .exists()
    );

    // libvirtd unreachable: 503 libvirt_unavailable, the volume untouched.
    let dir2 = tempfile::tempdir().unwrap();
    let mut down = Run {
        socket: dir2.path().join("agent.sock"),
        dir: dir2,
        agent: None,
        barbican: String::new(),
        token: String::new(),
        volumes: vec![],
    };
    let config2 = down.dir.path().join("agent.toml");
    fs::write(
        &config2,
        text.replace(
            &format!("socket = \"{p}/agent.sock\""),
            &format!("socket = \"{}\"", down.socket.display()),
        )
        .replace(
            &format!("uri = \"{URI}\""),
            "uri = \"qemu:///system?socket=/nonexistent/libvirt-sock\"",
        ),
    )
    .unwrap();
    down.start_agent(&config2);
    let before = fs::read(&file).unwrap();
    let (r, _) = call(
        &down.socket,
        "POST",
        &format!("/v1/volumes/{}/attach", v.id),
        Some(&body("luks", json!({}))),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "libvirt_unavailable", "{}", r.body);
    assert_eq!(r.body["error"]["volume_id"], v.id.as_str(), "{}", r.body);
    assert!(
        fs::read(&file).unwrap() == before,
        "written although libvirtd was unreachable"
    );
    down.stop_agent();
    run.stop_agent();
    let log = fs::read(run.log_path()).unwrap();
    common::assert_none_in(&log, &common::key_encodings("key", &key), "the agent's log");
}

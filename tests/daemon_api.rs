//! The agent's API over its Unix socket, against the real `luks-agent
//! serve` binary with a temporary configuration and local key store. Every
//! test asserts on the HTTP status and error code the server really sent.
//!
//! Runs as root on the host. The host kernel may lack device-mapper, so
//! the operations checked here are the ones that get an answer without it
//! (or that expect its absence); real attaches run in the VM tier
//! (tests/vm/daemon.sh).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::AGENT;
use common::serve::{Answer, Server, cli, create_local_key, request_bytes, write_local_config};

const NOBODY: u32 = 65534;

/// A running agent on a temporary socket; stopped (SIGTERM) on drop.
struct Daemon {
    // Declared first: the agent stops before its directory goes.
    server: Server,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Daemon {
    /// Starts an agent whose `[server]` section gets `server_extra`.
    fn start(server_extra: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // Other uids must reach the socket for the peer-credential tests.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("agent.sock");
        let config = write_local_config(
            dir.path(),
            &format!("kdf_memory_budget_kib = 262144\n{server_extra}"),
        );
        let log = dir.path().join("agent.log");
        let server = Server::start(&config, &socket, &log, Duration::from_secs(20));
        Daemon {
            server,
            dir,
            socket,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    fn log(&self) -> String {
        self.server.log()
    }

    fn get(&self, path: &str) -> Answer {
        request(&self.socket, "GET", path, &[], None)
    }

    fn post(&self, path: &str, body: &[u8]) -> Answer {
        request(&self.socket, "POST", path, body, None)
    }

    /// SIGTERM and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        self.server.stop()
    }
}

/// The API's error answers.
impl Answer {
    /// The error code, after checking the error body's exact shape.
    fn code(&self) -> String {
        let v = self.json();
        let e = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
        let mut keys: Vec<_> = e.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["code", "message", "volume_id"], "{v}");
        assert!(!e["message"].as_str().unwrap().is_empty(), "{v}");
        e["code"].as_str().unwrap().to_string()
    }

    fn expect(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code().as_str()),
            (status, code),
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            self.head
        );
    }
}

/// Writes `raw` to the socket and reads the answer until the server closes.
fn exchange(socket: &Path, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(raw)?;
    let mut out = vec![];
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn try_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: Option<&str>,
) -> std::io::Result<Answer> {
    exchange(socket, &request_bytes(method, path, body, extra_headers)).map(|r| Answer::parse(&r))
}

fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: Option<&str>,
) -> Answer {
    try_request(socket, method, path, body, extra_headers).unwrap()
}

/// The exchange as another uid: a forked child drops to `uid`/`gid`,
/// connects and relays the raw answer through a pipe. Between fork and
/// `_exit` the child makes only system calls on memory prepared before the
/// fork (the test process has other threads).
fn request_as(uid: u32, gid: u32, socket: &Path, raw: &[u8]) -> Vec<u8> {
    request_with_groups(uid, gid, &[], socket, raw)
}

/// As `request_as`, with supplementary groups `groups` in the child.
fn request_with_groups(
    uid: u32,
    gid: u32,
    groups: &[libc::gid_t],
    socket: &Path,
    raw: &[u8],
) -> Vec<u8> {
    let path = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes_with_nul();
    assert!(bytes.len() <= addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: the child below only calls async-signal-safe functions on
    // memory allocated before the fork, then _exit()s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: (child) plain system calls on valid, pre-allocated
        // memory; every path ends in _exit.
        unsafe {
            libc::close(fds[0]);
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(2);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if s < 0
                || libc::connect(
                    s,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) != 0
            {
                libc::_exit(3);
            }
            let mut off = 0;
            while off < raw.len() {
                let n = libc::write(s, raw[off..].as_ptr().cast(), raw.len() - off);
                if n <= 0 {
                    libc::_exit(4);
                }
                off += n as usize;
            }
            loop {
                let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(fds[1], buf.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, an fd we own.
    unsafe { libc::close(fds[1]) };
    // SAFETY: fds[0] is the pipe's read end, owned from here on.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut out = vec![];
    f.read_to_end(&mut out).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child as uid {uid} failed: {status:#x}"
    );
    out
}

fn spec(provider: &str, key_id: &str, location: &str) -> Value {
    json!({"provider": provider, "control_location": location, "cipher": "aes-xts-plain64",
           "key_size": 256, "encryption_key_id": key_id})
}

fn dm_available() -> bool {
    luks_agent::dm::DeviceMapper::open().is_ok()
}

#[test]
fn healthz_and_metrics_in_prometheus_text() {
    let d = Daemon::start("");
    let h = d.get("/healthz");
    assert_eq!(h.status, 200);
    let v = h.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    d.get("/nope").expect(404, "not_found");
    let m = d.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{}",
        m.head
    );
    let text = String::from_utf8(m.body).unwrap();
    for want in [
        "# TYPE luks_agent_requests_total counter",
        "luks_agent_requests_total{route=\"/healthz\",outcome=\"ok\"} ",
        "luks_agent_requests_total{route=\"other\",outcome=\"not_found\"} 1\n",
        "# TYPE luks_agent_request_duration_seconds histogram",
        "luks_agent_request_duration_seconds_bucket{route=\"/healthz\",le=\"+Inf\"} ",
        "luks_agent_requests_in_flight 1\n",
        "luks_agent_operations_in_flight 0\n",
        "luks_agent_kdf_memory_budget_kib 262144\n",
        "luks_agent_kdf_memory_in_use_kib 0\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Every sample line is `name{labels} number` or `name number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.starts_with("luks_agent_")
                && bare.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{line}"
        );
        assert_eq!(name.contains('{'), name.ends_with('}'), "{line}");
    }
}

#[test]
fn peers_not_configured_get_403_and_a_log_line() {
    // The socket's group lets nobody connect; the policy must still refuse.
    let mut d = Daemon::start(&format!(
        "socket_group = \"{NOBODY}\"\nallowed_uids = [4242]"
    ));
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), NOBODY);
    let raw = request_bytes("GET", "/healthz", &[], None);
    let r = Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw));
    r.expect(403, "forbidden");
    let body = spec("luks", "k", "front-end");
    let raw = request_bytes(
        "POST",
        "/v1/volumes/v1/attach",
        json!({"device": "/dev/null", "encryption": body})
            .to_string()
            .as_bytes(),
        None,
    );
    Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw)).expect(403, "forbidden");
    // Root always may.
    assert_eq!(d.get("/healthz").status, 200);
    let m = String::from_utf8(d.get("/metrics").body).unwrap();
    assert!(
        m.contains("luks_agent_requests_total{route=\"/healthz\",outcome=\"forbidden\"} 1\n"),
        "{m}"
    );
    d.stop();
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("caller not allowed"))
        .unwrap_or_else(|| panic!("no log line for the refused peer:\n{log}"));
    assert!(
        line.contains("uid=65534") && line.contains("gid=65534") && line.contains("pid="),
        "{line}"
    );
}

#[test]
fn configured_uid_and_gid_may_call() {
    let d = Daemon::start(&format!(
        "socket_group = \"{NOBODY}\"\nallowed_uids = [{NOBODY}]"
    ));
    let raw = request_bytes("GET", "/healthz", &[], None);
    let r = Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    drop(d);
    let d = Daemon::start(&format!(
        "socket_group = \"{NOBODY}\"\nallowed_gids = [{NOBODY}]"
    ));
    let r = Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn a_supplementary_group_named_in_allowed_groups_may_call() {
    // "disk" exists on every Debian system; the caller has it only as a
    // supplementary group, which the kernel reports with SO_PEERGROUPS.
    let disk = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("disk:x:")?
                .split(':')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .expect("no disk group");
    let d = Daemon::start(&format!(
        "socket_group = \"{NOBODY}\"\nallowed_groups = [\"disk\"]"
    ));
    let raw = request_bytes("GET", "/healthz", &[], None);
    let r = Answer::parse(&request_with_groups(
        NOBODY,
        NOBODY,
        &[disk],
        &d.socket,
        &raw,
    ));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    Answer::parse(&request_with_groups(NOBODY, NOBODY, &[], &d.socket, &raw))
        .expect(403, "forbidden");
    Answer::parse(&request_with_groups(
        NOBODY,
        NOBODY,
        &[disk + 1],
        &d.socket,
        &raw,
    ))
    .expect(403, "forbidden");
}

#[test]
fn malformed_unknown_oversize_and_unrouted_requests() {
    let d = Daemon::start("max_body_bytes = 4096");
    let good = json!({"device": "/dev/null", "encryption": spec("luks", "k", "back-end")});
    // Sanity: the well-formed request is accepted (a back-end volume is a
    // no-op that needs no device-mapper).
    let ok = d.post("/v1/volumes/v1/attach", good.to_string().as_bytes());
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["action"], "no_op");
    assert_eq!(ok.json()["path"], "/dev/null");

    d.post("/v1/volumes/v1/attach", b"{\"device\": ")
        .expect(400, "malformed_json");
    d.post("/v1/volumes/v1/attach", b"not json")
        .expect(400, "malformed_json");
    d.post("/v1/volumes/v1/attach", b"")
        .expect(400, "malformed_json");
    let mut extra = good.clone();
    extra["devise"] = json!("/dev/null");
    let r = d.post("/v1/volumes/v1/attach", extra.to_string().as_bytes());
    r.expect(400, "unknown_field");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("devise")
    );
    let mut extra = good.clone();
    extra["auth"] = json!({"token": "t", "scope": "x"});
    d.post("/v1/volumes/v1/attach", extra.to_string().as_bytes())
        .expect(400, "unknown_field");
    d.post(
        "/v1/volumes/v1/detach",
        json!({"device": "/dev/null"}).to_string().as_bytes(),
    )
    .expect(400, "invalid_request");
    d.post(
        "/v1/volumes/v1/attach",
        json!({"device": 5, "encryption": {}})
            .to_string()
            .as_bytes(),
    )
    .expect(400, "invalid_request");

    // Oversize, announced by Content-Length and sent chunked.
    let mut big = good.clone();
    big["multipath_id"] = json!("x".repeat(5000));
    let r = d.post("/v1/volumes/v1/attach", big.to_string().as_bytes());
    r.expect(413, "payload_too_large");
    let text = big.to_string();
    let chunked = format!("{:x}\r\n{text}\r\n0\r\n\r\n", text.len());
    request(
        &d.socket,
        "POST",
        "/v1/volumes/v1/attach",
        chunked.as_bytes(),
        Some("Transfer-Encoding: chunked\r\n"),
    )
    .expect(413, "payload_too_large");

    d.get("/v2/volumes").expect(404, "not_found");
    d.post("/v1/volumes/v1/format", good.to_string().as_bytes())
        .expect(404, "not_found");
    d.get("/v1/volumes/v1/attach")
        .expect(405, "method_not_allowed");
    d.get("/v1/volumes/never-attached")
        .expect(404, "volume_not_found");
    assert_eq!(
        d.get("/v1/volumes/never-attached").json()["error"]["volume_id"],
        "never-attached"
    );
    d.get("/v1/volumes/..").expect(400, "invalid_volume_id");
    d.post("/v1/volumes/a%20b/attach", good.to_string().as_bytes())
        .expect(400, "invalid_volume_id");
    d.get("/v1/volumes/.hidden")
        .expect(400, "invalid_volume_id");

    // Encryption metadata that cannot be used: 422 invalid_spec.
    let bad = json!({"device": "/dev/null", "encryption": {"provider": "rot13", "encryption_key_id": "k"}});
    d.post("/v1/volumes/v1/attach", bad.to_string().as_bytes())
        .expect(422, "invalid_spec");
    let bad = json!({"device": "/dev/null", "encryption": {"provider": "luks"}});
    d.post("/v1/volumes/v1/attach", bad.to_string().as_bytes())
        .expect(422, "invalid_spec");
    let bad = json!({"device": "/dev/null", "encryption": {"key_size": "big"}});
    d.post("/v1/volumes/v1/attach", bad.to_string().as_bytes())
        .expect(422, "invalid_spec");

    // The libvirt mode: a back-end volume is a no-op there too (no secret,
    // no libvirtd needed); keep_secret belongs to a libvirt detach only.
    let mut lv = good.clone();
    lv["mode"] = json!("libvirt");
    let r = d.post("/v1/volumes/v1/attach", lv.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["action"], "no_op");
    assert!(r.json().get("secret_uuid").is_none(), "{}", r.json());
    lv["keep_secret"] = json!(true);
    d.post("/v1/volumes/v1/attach", lv.to_string().as_bytes())
        .expect(400, "invalid_request");
    let r = d.post("/v1/volumes/v1/detach", lv.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    lv["keep_secret"] = json!(false);
    lv["mode"] = json!("qemu");
    d.post("/v1/volumes/v1/attach", lv.to_string().as_bytes())
        .expect(400, "invalid_request");
}

#[test]
fn slow_clients_are_cut_off() {
    let d = Daemon::start("header_timeout_ms = 300\nbody_timeout_ms = 300");
    // Headers never finish: the server closes the connection.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "connection held for {took:?}"
    );
    assert!(!String::from_utf8_lossy(&out).contains(" 200 "), "{out:?}");
    // A body that stops halfway: 408 request_timeout.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(
        b"POST /v1/volumes/v1/attach HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"device\":",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    Answer::parse(&out).expect(408, "request_timeout");
    // A kept-alive connection left idle is closed too.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let started = Instant::now();
    let mut rest = vec![];
    let _ = s.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connection held for {:?}",
        started.elapsed()
    );
    // The server still serves others.
    assert_eq!(d.get("/healthz").status, 200);
}

#[test]
fn volume_operations_and_listing_without_device_mapper() {
    let d = Daemon::start("");
    let body = json!({"device": "/dev/null", "encryption": spec("luks2", "0f8a6c70-0000-4000-8000-000000000001", "front-end")});
    let r = d.post("/v1/volumes/v1/detach", body.to_string().as_bytes());
    let list = d.get("/v1/volumes");
    assert_eq!(list.status, 200);
    let v = list.json();
    assert_eq!(v["volumes"], json!([]));
    if dm_available() {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["action"], "identity");
        assert!(v["mappings"].is_array(), "{v}");
    } else {
        r.expect(500, "device_mapper_error");
        assert_eq!(r.json()["error"]["volume_id"], "v1");
        assert!(v["mappings"].is_null(), "{v}");
        assert!(
            v["device_mapper_error"]
                .as_str()
                .unwrap()
                .contains("device-mapper")
        );
    }
    // An attach record makes the volume known to GET /v1/volumes/{id}.
    let run = d.dir.path().join("run/volumes");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("v2.json"),
        r#"{"mapping":"crypt-sdx","device_path":"/dev/disk/by-id/x","original_target":"/dev/sdx"}"#,
    )
    .unwrap();
    let one = d.get("/v1/volumes/v2");
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["mapping"], "crypt-sdx");
    assert_eq!(one.json()["kernel"], Value::Null);
    assert_eq!(d.get("/v1/volumes").json()["volumes"][0]["volume_id"], "v2");
}

fn attach_requests(d: &Daemon) -> u64 {
    let m = String::from_utf8(d.get("/metrics").body).unwrap();
    m.lines()
        .filter(|l| l.starts_with("luks_agent_requests_total{route=\"/v1/volumes/{id}/attach\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn cli_through_the_agent_and_locally_prints_and_exits_alike() {
    let mut d = Daemon::start("");
    let noop = spec("luks", "k", "back-end").to_string();
    let bad = json!({"provider": "rot13", "encryption_key_id": "k"}).to_string();
    let attach = |d: &Daemon, enc: &str, extra: &[&str]| {
        let mut a = vec![
            "attach",
            "--volume-id",
            "v1",
            "--device",
            "/dev/null",
            "--encryption",
            enc,
        ];
        a.extend_from_slice(extra);
        cli(&d.config(), &a)
    };
    let before = attach_requests(&d);
    let remote = attach(&d, &noop, &[]);
    assert_eq!(
        attach_requests(&d),
        before + 1,
        "the CLI did not use the agent"
    );
    let local = attach(&d, &noop, &["--local"]);
    assert_eq!(attach_requests(&d), before + 1, "--local used the agent");
    assert_eq!((remote.0, &remote.1), (0, &"/dev/null\n".to_string()));
    assert_eq!((local.0, &local.1), (0, &"/dev/null\n".to_string()));
    let strip_ms = |s: &str| s.split(" in ").next().unwrap().to_string();
    assert_eq!(strip_ms(&remote.2), strip_ms(&local.2));
    assert!(remote.2.starts_with("volume v1: NoOp"), "{}", remote.2);

    let remote = attach(&d, &noop, &["--json"]);
    let local = attach(&d, &noop, &["--local", "--json"]);
    let mut r: Value = serde_json::from_str(&remote.1).unwrap();
    let mut l: Value = serde_json::from_str(&local.1).unwrap();
    r["duration_ms"] = json!(0);
    l["duration_ms"] = json!(0);
    assert_eq!(r, l);

    // Errors: same message and exit code (1: invalid metadata).
    let remote = attach(&d, &bad, &[]);
    let local = attach(&d, &bad, &["--local"]);
    assert_eq!(remote.0, 1, "{}", remote.2);
    assert_eq!((remote.0, &remote.2), (local.0, &local.2));
    assert_eq!(attach_requests(&d), before + 3);

    // status: same output and exit code either way.
    let remote = cli(&d.config(), &["status"]);
    let local = cli(&d.config(), &["status", "--local"]);
    assert_eq!(remote, local);
    if !dm_available() {
        assert_eq!(remote.0, 4, "{}", remote.2);
    }

    // No agent: the CLI acts directly.
    d.stop();
    assert!(!d.socket.exists(), "socket left behind");
    let direct = attach(&d, &noop, &[]);
    assert_eq!(
        (direct.0, direct.1.as_str()),
        (0, "/dev/null\n"),
        "{}",
        direct.2
    );
}

#[test]
fn refuses_a_second_agent_on_the_same_socket_and_stops_cleanly() {
    let mut d = Daemon::start("");
    let second = Command::new(AGENT)
        .args(["--config", d.config().to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already listening"),
        "{second:?}"
    );
    assert_eq!(d.get("/healthz").status, 200);
    let st = d.stop();
    assert!(st.success(), "{st}");
    assert!(!d.socket.exists());
    let log = d.log();
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");
}

#[test]
fn accepts_a_socket_from_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display();
    let config = dir.path().join("agent.toml");
    // The configured socket must stay untouched: systemd's is used.
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{p}/state\"\nrun_dir = \"{p}/run\"\n[server]\nsocket = \"{p}/unused.sock\"\n"
        ),
    )
    .unwrap();
    let sock = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" \"$@\"",
        AGENT,
        "--config",
        config.to_str().unwrap(),
        "serve",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs in the forked child on
    // descriptors that exist there.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ok = loop {
        if let Ok(r) = try_request(&sock, "GET", "/healthz", &[], None) {
            break r;
        }
        assert!(Instant::now() < deadline, "no answer on the passed socket");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ok.status, 200);
    assert!(!dir.path().join("unused.sock").exists());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("systemd"));
}

#[test]
fn logs_hold_no_credentials_or_keys() {
    let mut d = Daemon::start("log_format = \"json\"");
    // A real key in the store; its bytes, hex, base64 and passphrase must
    // never reach a log line, nor the tokens callers send.
    let (key_id, hex) = create_local_key(&d.config());
    let token = "gAAAAABtoken-SECRET-7c1f0e5a9b";
    let service = "gAAAAABservice-SECRET-3e8d21";
    let body = json!({"device": "/dev/null",
        "encryption": spec("luks2", &key_id, "front-end"),
        "auth": {"token": token, "service_token": service}});
    for op in ["attach", "detach", "extend"] {
        let r = d.post(&format!("/v1/volumes/v1/{op}"), body.to_string().as_bytes());
        assert!(r.status >= 400 || dm_available(), "{r:?}");
    }
    let mut noop = body.clone();
    noop["encryption"] = spec("luks2", &key_id, "back-end");
    assert_eq!(
        d.post("/v1/volumes/v1/attach", noop.to_string().as_bytes())
            .status,
        200
    );
    let raw = hex::decode(&hex).unwrap();
    d.stop();
    let log = std::fs::read(d.log_path()).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("volume operation"), "{text}");
    // One JSON object per line.
    for line in text.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    let mut needles = common::key_encodings("key", &raw);
    needles.push(("token".into(), token.as_bytes().to_vec()));
    needles.push(("service token".into(), service.as_bytes().to_vec()));
    common::assert_none_in(&log, &needles, "the logs");
}

/// `openssl ARGS` in `dir`.
fn openssl_in(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A signed 1 MiB image `image.raw` in `dir` (0644), its signing
/// certificate imported into the local store of `config`: the image's
/// signature properties.
fn signed_image(dir: &Path, config: &Path) -> Value {
    std::fs::write(dir.join("image.raw"), common::garbage(1 << 20, 3)).unwrap();
    std::fs::set_permissions(
        dir.join("image.raw"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    openssl_in(dir, &["genrsa", "-out", "signer.key", "2048"]);
    openssl_in(
        dir,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            "signer.key",
            "-out",
            "signer.pem",
            "-days",
            "30",
            "-subj",
            "/CN=signer",
        ],
    );
    openssl_in(
        dir,
        &[
            "dgst",
            "-sha256",
            "-sign",
            "signer.key",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-out",
            "sig.bin",
            "image.raw",
        ],
    );
    let (code, out, err) = cli(
        config,
        &[
            "keys",
            "import-certificate",
            common::s(&dir.join("signer.pem")),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let cert = out.trim().to_string();
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(dir.join("sig.bin")).unwrap());
    json!({
        "img_signature": sig,
        "img_signature_hash_method": "SHA-256",
        "img_signature_key_type": "RSA-PSS",
        "img_signature_certificate_uuid": cert,
    })
}

#[test]
fn image_verify_reads_the_file_as_the_caller() {
    let d = Daemon::start(&format!(
        "socket_group = \"{NOBODY}\"\nallowed_uids = [{NOBODY}]"
    ));
    let dir = d.dir.path();
    let props = signed_image(dir, &d.config());
    let body =
        |file: &Path| serde_json::to_vec(&json!({"file": file, "properties": props})).unwrap();
    let image = dir.join("image.raw");

    let r = d.post("/v1/images/img-7/verify", &body(&image));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"], "verified");
    assert_eq!(r.json()["bytes"], 1 << 20);
    assert!(
        d.log()
            .contains("Image signature verification succeeded for image img-7"),
        "{}",
        d.log()
    );

    // As nobody: a file it may read verifies, one behind a directory it
    // may not enter is refused before anything else happens.
    let raw = request_bytes("POST", "/v1/images/img-7/verify", &body(&image), None);
    let r = Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(&image, private.join("image.raw")).unwrap();
    std::fs::set_permissions(
        private.join("image.raw"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let raw = request_bytes(
        "POST",
        "/v1/images/img-7/verify",
        &body(&private.join("image.raw")),
        None,
    );
    let r = Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw));
    r.expect(422, "image_file_unusable");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the caller may not read it"),
        "{}",
        r.json()
    );
    // A relative path, and a magic link that would name the agent's own
    // view of the file system, are refused for a caller.
    let root_link = format!("/proc/self/root{}", image.display());
    for (path, says) in [
        ("image.raw", "not an absolute path"),
        (root_link.as_str(), "magic link"),
    ] {
        let raw = request_bytes(
            "POST",
            "/v1/images/img-7/verify",
            &body(Path::new(path)),
            None,
        );
        let r = Answer::parse(&request_as(NOBODY, NOBODY, &d.socket, &raw));
        r.expect(422, "image_file_unusable");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{path}: {message}");
    }
    // Root reads it.
    let r = d.post("/v1/images/img-7/verify", &body(&private.join("image.raw")));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Tampered, unsigned, partial, malformed.
    let mut tampered = std::fs::read(&image).unwrap();
    tampered[0] ^= 1;
    std::fs::write(dir.join("tampered.raw"), tampered).unwrap();
    d.post("/v1/images/img-7/verify", &body(&dir.join("tampered.raw")))
        .expect(422, "signature_mismatch");
    assert!(
        d.log()
            .contains("Image signature verification failed for image img-7"),
        "{}",
        d.log()
    );
    let r = d.post(
        "/v1/images/img-7/verify",
        &serde_json::to_vec(&json!({"file": image, "properties": {"os_distro": "x"}})).unwrap(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"], "not_signed");
    d.post(
        "/v1/images/img-7/verify",
        &serde_json::to_vec(&json!({"file": image, "properties": {"img_signature": "AA=="}}))
            .unwrap(),
    )
    .expect(422, "invalid_image_properties");
    d.post(
        "/v1/images/img-7/verify",
        &serde_json::to_vec(&json!({"file": image, "properties": props, "extra": 1})).unwrap(),
    )
    .expect(400, "unknown_field");
    d.post("/v1/images/a..%2Fb/verify", &body(&image))
        .expect(400, "invalid_request");
    d.post("/v1/images/img-7/verify", &body(Path::new("/dev/zero")))
        .expect(422, "image_file_unusable");
    let metrics = String::from_utf8_lossy(&d.get("/metrics").body).into_owned();
    assert!(
        metrics.contains("route=\"/v1/images/{id}/verify\""),
        "{metrics}"
    );
}

/// The capability bounding set of the packaged systemd unit, as
/// `setpriv --bounding-set` takes it (`-all,+sys_admin,...`), less `drop`.
fn unit_bounding_set(drop: &[&str]) -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/luks-agent.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    let mut set = String::from("-all");
    for cap in line.split_whitespace().filter(|c| !drop.contains(c)) {
        set.push_str(",+");
        set.push_str(&cap.trim_start_matches("CAP_").to_ascii_lowercase());
    }
    set
}

#[test]
fn image_verify_as_a_caller_works_within_the_units_capabilities() {
    for (dropped, works) in [(&[][..], true), (&["CAP_SETUID", "CAP_SETGID"][..], false)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("agent.sock");
        let config = write_local_config(
            dir.path(),
            &format!("socket_group = \"{NOBODY}\"\nallowed_uids = [{NOBODY}]"),
        );
        let props = signed_image(dir.path(), &config);
        let mut setpriv = Command::new("setpriv");
        setpriv.arg(format!("--bounding-set={}", unit_bounding_set(dropped)));
        let server = Server::start_under(setpriv, &config, &socket, Duration::from_secs(20));
        let body =
            serde_json::to_vec(&json!({"file": dir.path().join("image.raw"), "properties": props}))
                .unwrap();
        let raw = request_bytes("POST", "/v1/images/img-8/verify", &body, None);
        let r = Answer::parse(&request_as(NOBODY, NOBODY, &socket, &raw));
        if works {
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json()["result"], "verified");
        } else {
            // The agent's own shortcoming, said as such: not "the caller
            // may not read it".
            r.expect(500, "io_error");
            let message = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(message.contains("CAP_SETUID"), "{message}");
        }
        drop(server);
    }
}

/// A verify request body for a sparse 64 GiB file in the agent's
/// directory, with a real signature's properties: tens of seconds of
/// hashing on any CPU, so no verdict comes before the test is done.
fn long_verify_body(d: &Daemon) -> Vec<u8> {
    let dir = d.dir.path();
    let props = signed_image(dir, &d.config());
    let big = dir.join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    serde_json::to_vec(&json!({"file": big, "properties": props})).unwrap()
}

#[test]
fn image_verify_in_flight_is_answered_shutting_down_when_the_agent_stops() {
    let mut d = Daemon::start("");
    let body = long_verify_body(&d);
    let socket = d.socket.clone();
    let asked = std::thread::spawn(move || {
        request(&socket, "POST", "/v1/images/img-9/verify", &body, None)
    });
    // The verify is in flight once the agent counts two requests: it and
    // the one asking.
    let in_flight = |d: &Daemon| -> u64 {
        let m = d.get("/metrics");
        String::from_utf8_lossy(&m.body)
            .lines()
            .find_map(|l| l.strip_prefix("luks_agent_requests_in_flight "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the metrics count requests in flight")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_flight(&d) < 2 {
        assert!(Instant::now() < deadline, "the verify never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.stop().success());
    let r = asked.join().unwrap();
    r.expect(503, "shutting_down");
}

#[test]
fn image_verify_runs_at_most_one_pass_per_cpu_and_the_rest_wait() {
    let mut d = Daemon::start("");
    let body = long_verify_body(&d);
    // The agent's limit: one pass per CPU, at most 8.
    let cap = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let asked: Vec<_> = (0..cap + 2)
        .map(|i| {
            let (socket, body) = (d.socket.clone(), body.clone());
            std::thread::spawn(move || {
                request(
                    &socket,
                    "POST",
                    &format!("/v1/images/img-{i}/verify"),
                    &body,
                    None,
                )
            })
        })
        .collect();
    let pid = d.server.pid();
    let readers = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "image-read")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut most = 0;
    while most < cap {
        assert!(Instant::now() < deadline, "{most} passes ran, never {cap}");
        most = most.max(readers());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every request in flight, and still no more than `cap` passes.
    for _ in 0..25 {
        let n = readers();
        assert!(n <= cap, "{n} passes over files at once, more than {cap}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.stop().success());
    for a in asked {
        a.join().unwrap().expect(503, "shutting_down");
    }
}

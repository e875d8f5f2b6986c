//! What hostile or unlucky input must never do: format a device that
//! holds data after an earlier attempt failed, open a FIFO, character
//! device or directory as a device, hang a request or the shutdown, forge
//! a log line, or leave a counter or a connection behind. Every test runs
//! the real binary, through the CLI and through the agent's API.
//!
//! Host tier: root, loop devices, a real libvirtd for the libvirt mode
//! (`tests/harness/libvirtd.sh`); dm mode, which needs device-mapper,
//! is covered in the guest by `tests/vm/format_guard.sh`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::harness::libvirtd_or_skip;
use common::serve::{Answer, Server, cli, create_local_key, request_bytes, write_local_config};
use common::{sha256_file, tool};

const MIB: u64 = 1 << 20;

/// A temporary agent configuration with a local key store and one key;
/// `extra` goes into its `[server]` section.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    key_id: String,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = write_local_config(
            dir.path(),
            &format!("{extra}\n[libvirt]\nuri = \"qemu:///system\"\n"),
        );
        let (key_id, _) = create_local_key(&config);
        Setup {
            dir,
            config,
            key_id,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("agent.sock")
    }

    fn enc(&self, provider: &str) -> String {
        json!({"provider": provider, "control_location": "front-end",
               "cipher": "aes-xts-plain64", "key_size": 256,
               "encryption_key_id": self.key_id})
        .to_string()
    }

    fn serve(&self) -> Server {
        Server::start(
            &self.config,
            &self.socket(),
            &self.path("agent.log"),
            Duration::from_secs(20),
        )
    }

    /// What the state directory records about formats: the local records
    /// and intents (empty when nothing was recorded).
    fn recorded(&self) -> Vec<String> {
        let mut found = vec![];
        for sub in ["state/formatting", "state/format-intents"] {
            if let Ok(entries) = std::fs::read_dir(self.path(sub)) {
                for e in entries {
                    found.push(format!(
                        "{sub}/{}",
                        e.unwrap().file_name().to_string_lossy()
                    ));
                }
            }
        }
        found
    }

    /// `luks-agent attach` on the CLI: exit code and stderr.
    fn cli_attach(&self, vid: &str, device: &Path, mode: &str, provider: &str) -> (i32, String) {
        let (code, _, err) = cli(
            &self.config,
            &[
                "attach",
                "--volume-id",
                vid,
                "--device",
                device.to_str().unwrap(),
                "--encryption",
                &self.enc(provider),
                "--mode",
                mode,
            ],
        );
        (code, err)
    }

    /// One operation through the agent's API.
    fn api(&self, op: &str, vid: &str, device: &str, mode: &str, provider: &str) -> Answer {
        let body = json!({"device": device, "encryption": serde_json::from_str::<Value>(&self.enc(provider)).unwrap(), "mode": mode});
        exchange(
            &self.socket(),
            &request_bytes(
                "POST",
                &format!("/v1/volumes/{vid}/{op}"),
                body.to_string().as_bytes(),
                None,
            ),
        )
    }
}

fn exchange(socket: &Path, raw: &[u8]) -> Answer {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = vec![];
    s.read_to_end(&mut out).unwrap();
    Answer::parse(&out)
}

fn error_of(a: &Answer) -> (u16, String, String) {
    let v = a.json();
    (
        a.status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

fn ext4_image(path: &Path) {
    image(path, 32 * MIB);
    let out = Command::new(tool("mkfs.ext4"))
        .args(["-q", "-F", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
}

fn random_image(path: &Path) {
    std::fs::write(path, common::garbage(32 * MIB as usize, 7)).unwrap();
}

/// The reproduction of the data-loss report, in libvirt mode (the dm mode
/// runs in the guest): a first attach fails on a device that is too
/// small, then the same volume id and key are attached on a device that
/// holds ext4 (or random data). The second device must be refused, named
/// in the error, and left byte-identical; nothing may stay recorded.
#[test]
fn a_failed_first_attach_never_lets_a_later_one_format_over_data() {
    if !libvirtd_or_skip("the format guard reproduction in libvirt mode") {
        return;
    }
    for (how, fill) in [
        ("ext4", ext4_image as fn(&Path)),
        ("random", random_image as fn(&Path)),
    ] {
        for via in ["cli", "api"] {
            let st = Setup::new("");
            let server = (via == "api").then(|| st.serve());
            let vid = format!("vol-{how}-{via}");
            let (small, victim) = (st.path("small.img"), st.path("victim.img"));
            image(&small, MIB);
            fill(&victim);
            let before = sha256_file(&victim);
            let attach = |dev: &Path| -> (i32, String) {
                if via == "cli" {
                    st.cli_attach(&vid, dev, "libvirt", "luks")
                } else {
                    let a = st.api("attach", &vid, dev.to_str().unwrap(), "libvirt", "luks");
                    let (status, code, msg) = error_of(&a);
                    (i32::from(status), format!("{code}: {msg}"))
                }
            };
            let (code, err) = attach(&small);
            assert!(
                (via == "cli" && code == 4) || (via == "api" && code == 422),
                "{how}/{via}: small device: {code} {err}"
            );
            assert!(
                err.contains("too small") || err.contains("TooSmall") || err.contains("needs"),
                "{err}"
            );
            let left = st.recorded();
            let (code, err) = attach(&victim);
            assert_eq!(
                sha256_file(&victim),
                before,
                "{how}/{via}: the device holding data was written ({code}: {err})"
            );
            assert_eq!(
                left,
                Vec::<String>::new(),
                "{how}/{via}: the failed attempt left records"
            );
            if via == "cli" {
                assert_eq!(code, 5, "{how}/{via}: {err}");
            } else {
                assert_eq!(code, 422, "{err}");
                assert!(err.starts_with("format_refused:"), "{err}");
            }
            let named = if how == "ext4" {
                "ext4"
            } else {
                "not all zero"
            };
            assert!(
                err.contains(named),
                "{how}/{via}: refusal does not name {named}: {err}"
            );
            assert!(err.contains("victim.img"), "{err}");
            drop(server);
        }
    }
}

/// Character devices, FIFOs, sockets and directories are refused by name
/// before anything opens them or records anything, through the CLI and
/// the API, in both modes and for every operation; none of it blocks.
#[test]
fn non_devices_are_refused_by_name_and_nothing_is_recorded() {
    let st = Setup::new("");
    let fifo = st.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let dir = st.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let server = st.serve();
    let cases: [(&Path, &str); 4] = [
        (Path::new("/dev/null"), "character device"),
        (Path::new("/dev/zero"), "character device"),
        (&fifo, "FIFO"),
        (&dir, "directory"),
    ];
    for (path, what) in cases {
        let p = path.to_str().unwrap();
        for mode in ["dm", "libvirt"] {
            for op in ["attach", "extend"] {
                if mode == "dm" && op == "attach" && luks_agent::dm::DeviceMapper::open().is_err() {
                    // Without device-mapper a dm attach stops before it
                    // looks at the device (the guest tier covers it).
                    continue;
                }
                let started = Instant::now();
                let a = st.api(op, "v1", p, mode, "luks");
                let (status, code, msg) = error_of(&a);
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{p} {mode} {op} took {:?}",
                    started.elapsed()
                );
                if op == "extend" && mode == "dm" && luks_agent::dm::DeviceMapper::open().is_err() {
                    assert_eq!(code, "device_mapper_error", "{msg}");
                    continue;
                }
                assert_eq!(
                    (status, code.as_str()),
                    (422, "device_unusable"),
                    "{p} {mode} {op}: {msg}"
                );
                assert!(
                    msg.contains(what) && msg.contains(p),
                    "{p} {mode} {op}: {msg}"
                );
            }
        }
        // The no-op provider's extend answers without opening the path:
        // still refused by what it is.
        let a = st.api("extend", "v1", p, "libvirt", "nop");
        let (status, code, msg) = error_of(&a);
        let _ = (status, &code);
        assert!(
            code == "device_unusable" || code == "invalid_spec",
            "{p} no-op extend: {code} {msg}"
        );
        let (code, err) = st.cli_attach("v1", path, "libvirt", "luks");
        assert_ne!(code, 0, "{err}");
        assert!(err.contains(what), "{p}: {err}");
    }
    // A NUL byte in the device path: a 422 naming it, not a 500.
    let a = exchange(
        &st.socket(),
        &request_bytes(
            "POST",
            "/v1/volumes/v1/attach",
            br#"{"device": "/dev/lo\u0000op0", "mode": "libvirt", "encryption": {"provider": "luks", "control_location": "front-end", "encryption_key_id": "00000000-0000-4000-8000-000000000001"}}"#,
            None,
        ),
    );
    let (status, code, msg) = error_of(&a);
    assert_eq!((status, code.as_str()), (422, "device_unusable"), "{msg}");
    assert!(msg.contains("NUL"), "{msg}");
    assert_eq!(st.recorded(), Vec::<String>::new());
    // A FIFO in the key store is not a key, and reading it does not block.
    let keys = st.path("keys");
    let fifo_key = keys.join("00000000-0000-4000-8000-00000000f1f0");
    nix::unistd::mkfifo(
        &fifo_key,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "/etc/passwd",
        keys.join("00000000-0000-4000-8000-00000000511c"),
    )
    .unwrap();
    std::fs::create_dir(keys.join("00000000-0000-4000-8000-000000000d1e")).unwrap();
    let (code, out, err) = cli(&st.config, &["keys", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&st.key_id), "{out}");
    for fake in ["f1f0", "511c", "d1e"] {
        assert!(!out.contains(fake), "keys list shows a non-key: {out}");
    }
    let started = Instant::now();
    let img = st.path("blank.img");
    image(&img, 32 * MIB);
    let body = json!({"device": img, "mode": "libvirt", "encryption": {"provider": "luks", "control_location": "front-end", "encryption_key_id": "00000000-0000-4000-8000-00000000f1f0"}});
    let a = exchange(
        &st.socket(),
        &request_bytes(
            "POST",
            "/v1/volumes/v1/attach",
            body.to_string().as_bytes(),
            None,
        ),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a FIFO key blocked the attach"
    );
    assert_ne!(a.status, 200);
    drop(server);
}

/// `luks format` refuses what attach's guard refuses, and names it;
/// `--force` overrides.
#[test]
fn luks_format_refuses_a_device_that_holds_data_unless_forced() {
    let st = Setup::new("");
    let key = st.path("key");
    std::fs::write(&key, b"correct horse battery staple").unwrap();
    let ext4 = st.path("ext4.img");
    ext4_image(&ext4);
    let random = st.path("random.img");
    random_image(&random);
    image(&st.path("loop.img"), 32 * MIB);
    let mut loop_ext4 = luks_agent::blockdev::loopdev::LoopDevice::attach(&st.path("loop.img"))
        .map_err(|e| {
            common::harness::skip_or_fail_in_ci("luks format on a loop device", &e.to_string())
        })
        .ok();
    let loop_path = loop_ext4.as_ref().map(|l| l.path().to_path_buf());
    if let Some(lp) = &loop_path {
        let out = Command::new(tool("mkfs.ext4"))
            .args(["-q", "-F", lp.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let mut targets = vec![(ext4.clone(), "ext4"), (random.clone(), "not all zero")];
    if let Some(lp) = &loop_path {
        targets.push((lp.clone(), "ext4"));
    }
    for (dev, named) in &targets {
        let before = sha256_file(dev);
        let r = common::agent(&[
            "luks",
            "format",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            key.to_str().unwrap(),
            dev.to_str().unwrap(),
        ]);
        assert_eq!(r.code, Some(5), "{}: {}", dev.display(), r.stderr);
        assert!(
            r.stderr.contains(named) && r.stderr.contains("--force"),
            "{}",
            r.stderr
        );
        assert_eq!(sha256_file(dev), before, "{} was written", dev.display());
    }
    let r = common::agent(&[
        "luks",
        "format",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--force",
        "--key-file",
        key.to_str().unwrap(),
        ext4.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // A blank image needs no --force.
    let blank = st.path("blank.img");
    image(&blank, 32 * MIB);
    let r = common::agent(&[
        "luks",
        "format",
        "--type",
        "luks1",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        key.to_str().unwrap(),
        blank.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    loop_ext4.take();
}

/// A device path, provider or volume id with a newline or an escape
/// cannot forge a line of the human log.
#[test]
fn caller_values_cannot_forge_human_log_lines() {
    let st = Setup::new("log_format = \"human\"");
    let server = st.serve();
    let forged = "/dev/x\n2026-01-01T00:00:00.000000Z  INFO luks_agent::daemon::server: volume operation op=\"attach\" outcome=\"ok\"\x1b[2J";
    let body = json!({"device": forged, "mode": "libvirt", "encryption": {"provider": "luks\nINFO forged", "control_location": "front-end", "encryption_key_id": st.key_id}});
    let _ = exchange(
        &st.socket(),
        &request_bytes(
            "POST",
            "/v1/volumes/v1/attach",
            body.to_string().as_bytes(),
            None,
        ),
    );
    let body = json!({"device": forged, "mode": "libvirt", "encryption": serde_json::from_str::<Value>(&st.enc("luks")).unwrap()});
    let _ = exchange(
        &st.socket(),
        &request_bytes(
            "POST",
            "/v1/volumes/v1/attach",
            body.to_string().as_bytes(),
            None,
        ),
    );
    let log = server.log();
    for line in log.lines() {
        assert!(!line.starts_with("2026-01-01"), "forged line: {line:?}");
        assert!(
            !line.contains('\x1b'),
            "escape sequence passed through: {line:?}"
        );
        assert!(!line.starts_with("INFO forged"), "forged line: {line:?}");
    }
    assert!(
        log.contains("/dev/x\\n2026"),
        "the device is not in the log, escaped: {log}"
    );
}

fn metric(socket: &Path, name: &str) -> i64 {
    let a = exchange(socket, &request_bytes("GET", "/metrics", &[], None));
    String::from_utf8(a.body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}"))
        .parse()
        .unwrap()
}

/// A client that shuts down its sending side after the request still gets
/// its answer, and the in-flight gauge comes back down; connections over
/// the limit are answered 503 and closed; a volume id that does not
/// decode gets the JSON error shape; an error chain names each fact once.
#[test]
fn half_closed_clients_connection_flood_and_undecodable_ids() {
    let st = Setup::new("max_connections = 8");
    let server = st.serve();
    let sock = st.socket();
    let baseline = metric(&sock, "luks_agent_requests_in_flight");
    for _ in 0..20 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = json!({"device": "/dev/null", "encryption": {"provider": "x"}});
        s.write_all(&request_bytes(
            "POST",
            "/v1/volumes/v1/attach",
            body.to_string().as_bytes(),
            None,
        ))
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = vec![];
        s.read_to_end(&mut out).unwrap();
        let a = Answer::parse(&out);
        let (status, code, msg) = error_of(&a);
        assert_eq!((status, code.as_str()), (422, "invalid_spec"), "{msg}");
        assert_eq!(
            msg.matches("unknown encryption provider").count(),
            1,
            "{msg}"
        );
    }
    assert_eq!(metric(&sock, "luks_agent_requests_in_flight"), baseline);

    // Eight stalled connections (a body promised, never sent) fill the
    // limit; the ninth is answered 503 at once. First let the agent finish
    // closing the connections above (a slot is freed just after the
    // client sees the close).
    std::thread::sleep(Duration::from_millis(300));
    let mut stalled = vec![];
    for _ in 0..8 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"POST /v1/volumes/v1/attach HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65000\r\n\r\n{")
            .unwrap();
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&request_bytes("GET", "/healthz", &[], None));
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    let a = Answer::parse(&out);
    assert_eq!(error_of(&a).0, 503);
    assert_eq!(error_of(&a).1, "too_many_connections");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        exchange(&sock, &request_bytes("GET", "/healthz", &[], None)).status,
        200
    );

    for path in ["/v1/volumes/%FF/attach", "/v1/volumes/%FF"] {
        let method = if path.ends_with("attach") {
            "POST"
        } else {
            "GET"
        };
        let a = exchange(&sock, &request_bytes(method, path, b"{}", None));
        let (status, code, msg) = error_of(&a);
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_volume_id"),
            "{path}: {msg}"
        );
    }
    drop(server);
}

/// SIGTERM with an operation stuck (its key manager accepts the
/// connection and never answers): the agent exits at the shutdown
/// timeout and names the operation it abandoned; while it is still
/// stopping, the CLI does not fall back to acting locally.
#[test]
fn shutdown_is_bounded_and_the_cli_does_not_act_beside_a_stopping_agent() {
    // The stuck operation is a libvirt-mode attach, the one that reaches
    // the key manager on a host without device-mapper.
    if !libvirtd_or_skip("the bounded shutdown test") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = vec![];
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Ok((c, _)) = listener.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{p}/state\"\nrun_dir = \"{p}/run\"\n\
             [key_manager]\nbackend = \"barbican\"\n\
             [key_manager.barbican]\nendpoint = \"http://127.0.0.1:{port}\"\n\
             [key_manager.http]\nconnect_timeout_ms = 1000\nrequest_timeout_ms = 120000\n\
             deadline_ms = 120000\nmax_attempts = 1\n\
             [server]\nsocket = \"{p}/agent.sock\"\nshutdown_timeout_ms = 4000\n\
             [libvirt]\nuri = \"qemu:///system\"\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("agent.log");
    let mut server = Server::start(&config, &socket, &log, Duration::from_secs(20));
    let img = dir.path().join("v.img");
    image(&img, 32 * MIB);
    let body = json!({"device": img, "mode": "libvirt", "auth": {"token": "t"},
                      "encryption": {"provider": "luks", "control_location": "front-end",
                                     "encryption_key_id": "00000000-0000-4000-8000-000000000001"}});
    let sock = socket.clone();
    let caller = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&request_bytes(
            "POST",
            "/v1/volumes/stuck-vol/attach",
            body.to_string().as_bytes(),
            None,
        ))
        .unwrap();
        let mut out = vec![];
        let _ = s.read_to_end(&mut out);
    });
    std::thread::sleep(Duration::from_millis(800));
    let pid = server.pid();
    // SAFETY: kill has no memory preconditions; pid is our running child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let signalled = Instant::now();
    // While it stops (socket gone, process alive), the CLI must not act.
    let deadline = Instant::now() + Duration::from_secs(3);
    while socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!socket.exists(), "the socket is still there");
    let (code, _, err) = cli(
        &config,
        &[
            "attach",
            "--volume-id",
            "stuck-vol",
            "--device",
            img.to_str().unwrap(),
            "--mode",
            "libvirt",
            "--encryption",
            r#"{"provider": "luks", "control_location": "front-end", "encryption_key_id": "00000000-0000-4000-8000-000000000001"}"#,
        ],
    );
    assert_eq!(code, 10, "the CLI acted beside a stopping agent: {err}");
    assert!(err.contains("still running"), "{err}");
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("the agent did not exit at its shutdown timeout");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "stopping took {took:?} with a 4 s shutdown timeout"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("abandoning an operation") && text.contains("stuck-vol"),
        "the abandoned operation is not named: {text}"
    );
    let _ = status;
    caller.join().unwrap();
    drop(held);
}

//! The agent's log in the journal: `luks-agent serve` under a real
//! systemd-journald (private to the test, in its own mount namespace:
//! `tests/harness/journald.sh`), driven through the CLI as an operator
//! would. Checks that every operation is one structured entry with the
//! right priority and fields (`VOLUME_ID`, `OP`, `OUTCOME`), and that no
//! key, passphrase or token reaches the journal in any encoding.
//!
//! Needs root (a mount namespace) and systemd-journald (package systemd).
//! With CI=true a test that cannot run fails; elsewhere it says so loudly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::AGENT;
use common::harness::{script, skip_or_fail_in_ci};

/// Why the test cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a mount namespace for a private journald)".into());
    }
    let found = [
        "/lib/systemd/systemd-journald",
        "/usr/lib/systemd/systemd-journald",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    (!found).then(|| "systemd-journald not found (package systemd)".into())
}

/// `GET /healthz` answered 200.
fn healthy(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = String::new();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: luks-agent\r\nConnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// Runs the CLI with the test's config; (exit code, stdout, stderr).
fn cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stop(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill has no memory preconditions; the pid is our child, not
    // yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent under journald did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field<'a>(entry: &'a Value, name: &str) -> &'a str {
    entry[name].as_str().unwrap_or("")
}

#[test]
fn operations_are_structured_journal_entries_without_secrets() {
    if let Some(why) = cannot_run() {
        skip_or_fail_in_ci("the journald test", &why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display();
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{p}/state\"\nrun_dir = \"{p}/run\"\n\
             [key_manager.local]\ndir = \"{p}/keys\"\n\
             [server]\nsocket = \"{p}/agent.sock\"\n"
        ),
    )
    .unwrap();
    let key_id = cli(&config, &["keys", "create"]).1.trim().to_string();
    let hex = cli(&config, &["keys", "fetch", "--key-id", &key_id, "--reveal"])
        .1
        .lines()
        .find_map(|l| l.strip_prefix("passphrase: "))
        .expect("keys fetch --reveal prints the passphrase")
        .to_string();
    let raw = hex::decode(&hex).unwrap();
    let token = "gAAAAABjournal-token-SECRET-51c0";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();

    let journal = dir.path().join("journal.export");
    let mut child = Command::new(script("journald.sh"))
        .arg(&journal)
        .arg("--")
        .arg(AGENT)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("LUKS_AGENT_LOG", "debug")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy(&socket) {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("journald.sh or the agent exited early: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not answer /healthz"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Through the agent (its socket answers): one operation that fails
    // after the key was fetched and one that succeeds.
    let spec = |location: &str| {
        format!(
            r#"{{"provider": "luks2", "control_location": "{location}", "encryption_key_id": "{key_id}"}}"#
        )
    };
    let token_arg = token_file.to_str().unwrap();
    let failed = cli(
        &config,
        &[
            "attach",
            "--volume-id",
            "vol-journal-1",
            "--device",
            "/dev/null",
            "--encryption",
            &spec("front-end"),
            "--token-file",
            token_arg,
        ],
    );
    assert_ne!(failed.0, 0, "attach of /dev/null succeeded: {failed:?}");
    let noop = cli(
        &config,
        &[
            "attach",
            "--volume-id",
            "vol-journal-2",
            "--device",
            "/dev/null",
            "--encryption",
            &spec("back-end"),
            "--token-file",
            token_arg,
        ],
    );
    assert_eq!(noop.0, 0, "back-end attach: {noop:?}");
    let status = stop(&mut child);
    assert!(
        status.success(),
        "agent under journald exited with {status}"
    );

    let json = std::fs::read_to_string(journal.with_extension("export.json")).unwrap();
    let entries: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!entries.is_empty(), "nothing in the journal");
    for e in &entries {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), "luks-agent", "{e}");
        assert!(!field(e, "MESSAGE").is_empty(), "{e}");
        let priority: u8 = field(e, "PRIORITY").parse().unwrap();
        assert!(priority <= 7, "{e}");
    }
    let find = |volume: &str| {
        entries
            .iter()
            .find(|e| field(e, "MESSAGE") == "volume operation" && field(e, "VOLUME_ID") == volume)
            .unwrap_or_else(|| panic!("no operation entry for {volume}: {json}"))
    };
    let bad = find("vol-journal-1");
    assert_eq!(field(bad, "OP"), "attach", "{bad}");
    assert_eq!(
        field(bad, "PRIORITY"),
        "4",
        "a refused operation is a warning: {bad}"
    );
    assert!(
        !field(bad, "OUTCOME").is_empty() && field(bad, "OUTCOME") != "ok",
        "{bad}"
    );
    assert!(!field(bad, "ERROR").is_empty(), "{bad}");
    let good = find("vol-journal-2");
    assert_eq!(field(good, "OUTCOME"), "ok", "{good}");
    assert_eq!(field(good, "PRIORITY"), "6", "{good}");
    assert!(
        entries
            .iter()
            .any(|e| field(e, "MESSAGE") == "listening" && field(e, "PRIORITY") == "6"),
        "no start-up entry: {json}"
    );
    assert!(
        entries.iter().any(|e| field(e, "MESSAGE") == "stopped"),
        "no shutdown entry: {json}"
    );

    // The export format carries binary fields raw: scan it for the key in
    // every encoding, and for the caller's token.
    use base64::Engine;
    let export = std::fs::read(&journal).unwrap();
    assert!(!export.is_empty());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    for (what, needle) in [
        ("token", token.as_bytes()),
        ("hex key", hex.as_bytes()),
        ("hex key upper", hex.to_uppercase().as_bytes()),
        ("base64 key", b64.as_bytes()),
        ("raw key", &raw[..]),
    ] {
        assert!(
            !export.windows(needle.len()).any(|w| w == needle),
            "{what} in the journal"
        );
    }
}

//! The agent's log in the journal: `luks-agent serve` under a real
//! systemd-journald (private to the test, in its own mount namespace:
//! `tests/harness/journald.sh`), driven through the CLI as an operator
//! would. Checks that every operation is one structured entry with the
//! right priority and fields (`VOLUME_ID`, `OP`, `OUTCOME`), and that no
//! key, passphrase or token reaches the journal in any encoding.
//!
//! Needs root (a mount namespace) and systemd-journald (package systemd).
//! With CI=true a test that cannot run fails; elsewhere it says so loudly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod common;

use common::harness::{script, skip_or_fail_in_ci};
use common::serve::{Server, cli, create_local_key, write_local_config};

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
    let socket = dir.path().join("agent.sock");
    let config = write_local_config(dir.path(), "");
    let (key_id, hex) = create_local_key(&config);
    let raw = hex::decode(&hex).unwrap();
    let token = "gAAAAABjournal-token-SECRET-51c0";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();

    let journal = dir.path().join("journal.export");
    let mut journald = Command::new(script("journald.sh"));
    journald.arg(&journal).arg("--");
    let mut agent = Server::start_under(journald, &config, &socket, Duration::from_secs(30));

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
    let status = agent.stop();
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
    let export = std::fs::read(&journal).unwrap();
    assert!(!export.is_empty());
    let mut needles = common::key_encodings("key", &raw);
    needles.push(("token".into(), token.as_bytes().to_vec()));
    common::assert_none_in(&export, &needles, "the journal");
}

//! The scripts in `tests/harness/` that run real services for the tests:
//! Keystone and Barbican (`openstack.py`), libvirtd (`libvirtd.sh`) and
//! journald (`journald.sh`); and what a test says when it cannot run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/harness/NAME`.
pub fn script(name: &str) -> PathBuf {
    repo().join("tests/harness").join(name)
}

/// Says loudly that `what` is skipped here and why; fails the test
/// instead with CI=true or under `scripts/test.sh` (which sets
/// LUKS_AGENT_TESTS_STRICT=1: the full suite never counts a tier that
/// cannot run as passed). The caller returns after it.
pub fn skip_or_fail_in_ci(what: &str, why: &str) {
    let set = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x == v);
    if set("CI", "true") || set("LUKS_AGENT_TESTS_STRICT", "1") {
        panic!("{what} cannot run: {why}");
    }
    eprintln!(
        "\n*** SKIPPED: {what} cannot run here: {why}\n*** Run scripts/install-deps.sh as root; under scripts/test.sh or with CI=true this is a failure.\n"
    );
}

/// Runs `cmd` (shown as `shown`): its stdout, or everything it said when
/// it failed.
fn run(mut cmd: Command, shown: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

/// Runs `python3 tests/harness/openstack.py ARGS`: its stdout, or
/// everything it said when it failed.
pub fn openstack_py(args: &[&str]) -> Result<String, String> {
    let script = script("openstack.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args(args);
    run(
        cmd,
        &format!("python3 {} {}", script.display(), args.join(" ")),
    )
}

/// The Keystone + Barbican test cloud's description (its `cloud.json`):
/// the one `LUKS_AGENT_TEST_CLOUD` names, or else the one in
/// `target/test-cloud`, started if it is not running and left running for
/// the next test binary (`scripts/test.sh` stops it).
pub fn test_cloud() -> Result<Value, String> {
    let json = match std::env::var_os("LUKS_AGENT_TEST_CLOUD") {
        Some(p) => PathBuf::from(p),
        None => {
            let state = repo().join("target/test-cloud");
            let out = openstack_py(&["start", "--state", super::s(&state)])?;
            PathBuf::from(out.lines().last().unwrap_or("").trim())
        }
    };
    let text = std::fs::read_to_string(&json)
        .map_err(|e| format!("cannot read cloud description {}: {e}", json.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", json.display()))
}

/// Runs `tests/harness/libvirtd.sh ARGS`.
pub fn libvirtd_sh(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(script("libvirtd.sh"));
    cmd.args(args);
    run(
        cmd,
        &format!("tests/harness/libvirtd.sh {}", args.join(" ")),
    )
    .map(drop)
}

/// Whether libvirtd runs for this test binary: started on first use by
/// `libvirtd.sh`, which stops it when the binary exits. When it cannot
/// start, `what` is skipped (see `skip_or_fail_in_ci`) and this is false.
pub fn libvirtd_or_skip(what: &str) -> bool {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("libvirtd and the agent need root".into());
        }
        libvirtd_sh(&["start", "--owner", &std::process::id().to_string()])
    });
    match started {
        Ok(()) => true,
        Err(why) => {
            skip_or_fail_in_ci(what, why);
            false
        }
    }
}

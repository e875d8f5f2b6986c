//! Key material never leaves through the command line's outputs: every
//! command, on success and on each failure path, is run with known
//! passphrases, and stdout/stderr are searched for the passphrases and the
//! volume key (which only `dump --dump-volume-key` may print).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Arguments, stdin, expected exit code.
type Case<'a> = (Vec<&'a str>, Option<&'a [u8]>, i32);

const BIN: &str = env!("CARGO_BIN_EXE_luks-agent");

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn key_file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.path(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(content).unwrap();
        p
    }
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run luks-agent");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(data) = stdin {
            input.write_all(data).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_clean(out: &Output, secrets: &[&[u8]], what: &str) {
    for (name, stream) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        for secret in secrets {
            assert!(
                !stream.windows(secret.len()).any(|w| w == *secret),
                "{what}: {name} contains key material: {}",
                String::from_utf8_lossy(stream)
            );
        }
        assert!(
            !String::from_utf8_lossy(stream).contains("panicked"),
            "{what}: panic"
        );
    }
}

fn volume_key_of(img: &Path, key: &Path) -> Vec<u8> {
    let out = run(
        &[
            "luks",
            "dump",
            "--dump-volume-key",
            "--key-file",
            s(key),
            s(img),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Volume key: "))
        .expect("Volume key line");
    line.trim().as_bytes().to_vec()
}

#[test]
fn no_command_prints_passphrases_or_the_volume_key() {
    let fx = Fixture::new();
    let pass = b"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let new_pass = b"correct horse battery staple, rotated";
    let wrong = b"wrong passphrase 1234567890";
    let key = fx.key_file("key", pass);
    let new_key = fx.key_file("new", new_pass);
    let wrong_key = fx.key_file("wrong", wrong);
    for ty in ["luks1", "luks2"] {
        let img = fx.image(&format!("{ty}.img"), 20 << 20);
        let secrets_before: Vec<&[u8]> = vec![pass, new_pass, wrong];
        let out = run(
            &[
                "luks",
                "format",
                "--type",
                ty,
                "--kdf-policy",
                "high-entropy",
                "--key-file",
                s(&key),
                s(&img),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_clean(&out, &secrets_before, "format");
        let vk = volume_key_of(&img, &key);
        let secrets: Vec<&[u8]> = vec![pass, new_pass, wrong, &vk];

        let missing = fx.path("missing");
        let small = fx.image("small.img", 4096);
        let cases: Vec<Case> = vec![
            (
                vec!["luks", "test-passphrase", "--key-file", s(&key), s(&img)],
                None,
                0,
            ),
            (
                vec![
                    "luks",
                    "test-passphrase",
                    "--key-file",
                    s(&wrong_key),
                    s(&img),
                ],
                None,
                2,
            ),
            (
                vec!["luks", "test-passphrase", "--key-file", "-", s(&img)],
                Some(wrong),
                2,
            ),
            (vec!["luks", "dump", s(&img)], None, 0),
            (vec!["luks", "dump", "--json", s(&img)], None, 0),
            (
                vec![
                    "luks",
                    "dump",
                    "--dump-volume-key",
                    "--key-file",
                    s(&wrong_key),
                    s(&img),
                ],
                None,
                2,
            ),
            (
                vec![
                    "luks",
                    "format",
                    "--type",
                    ty,
                    "--key-file",
                    s(&key),
                    s(&img),
                ],
                None,
                5,
            ),
            (
                vec![
                    "luks",
                    "format",
                    "--type",
                    ty,
                    "--kdf-policy",
                    "high-entropy",
                    "--force",
                    "--key-file",
                    s(&key),
                    s(&missing),
                ],
                None,
                4,
            ),
            (
                vec![
                    "luks",
                    "format",
                    "--type",
                    ty,
                    "--kdf-policy",
                    "high-entropy",
                    "--force",
                    "--key-file",
                    s(&key),
                    s(&small),
                ],
                None,
                4,
            ),
            (
                vec![
                    "luks",
                    "add-key",
                    "--key-file",
                    s(&wrong_key),
                    "--new-key-file",
                    s(&new_key),
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    s(&img),
                ],
                None,
                2,
            ),
            (
                vec![
                    "luks",
                    "change-key",
                    "--key-file",
                    s(&key),
                    "--new-key-file",
                    s(&new_key),
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    s(&img),
                ],
                None,
                0,
            ),
            (
                vec!["luks", "remove-key", "--key-file", s(&new_key), s(&img)],
                None,
                5,
            ),
            (
                vec!["luks", "test-passphrase", "--key-file", s(&key), s(&img)],
                None,
                2,
            ),
        ];
        for (args, stdin, code) in cases {
            let out = run(&args, stdin);
            assert_eq!(
                out.status.code(),
                Some(code),
                "{ty} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_clean(&out, &secrets, &format!("{ty} {args:?}"));
        }
    }
}

#[test]
fn errors_name_the_device() {
    let fx = Fixture::new();
    let key = fx.key_file("key", b"some passphrase");
    let img = fx.image("zeros.img", 1 << 20);
    let out = run(
        &["luks", "test-passphrase", "--key-file", s(&key), s(&img)],
        None,
    );
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(s(&img)) && err.contains("not a LUKS device"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_1_and_key_material_is_never_an_argument() {
    // There is no option that takes a passphrase on the command line.
    let out = run(&["luks", "format", "--help"], None);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !help.contains("--passphrase") && !help.contains("--key "),
        "{help}"
    );
    let out = run(&["luks", "format", "--passphrase", "x", "dev"], None);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["luks", "frobnicate"], None);
    assert_eq!(out.status.code(), Some(1));
}

/// Starts `argv` in `dir` with the core size limit raised to its hard
/// limit; once it has opened `fifo` for reading (so it runs its own code),
/// writes part of a key into it, keeps it open so the program waits for
/// more, aborts the program with SIGABRT and returns how it ended.
fn abort_while_it_reads(dir: &Path, fifo: &Path, argv: &[&str]) -> std::process::ExitStatus {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut child = Command::new("sh")
        .args(["-c", r#"ulimit -S -c "$(ulimit -H -c)" && exec "$@""#, "sh"])
        .args(argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let started = std::time::Instant::now();
    // A non-blocking open for writing fails (ENXIO) until a reader has
    // the FIFO open; a blocking one would hang if the program died first.
    let mut writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)
                        .unwrap();
                    panic!("{argv:?} ended ({status}) before opening the FIFO: {err}");
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(30),
                    "{argv:?} never opened the FIFO"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("opening the FIFO: {e}"),
        }
    };
    writer.write_all(b"0f1e2d3c4b5a6978").unwrap();
    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-ABRT", &pid]).status().unwrap();
    assert!(kill.success(), "kill -ABRT {pid}");
    let status = child.wait().unwrap();
    drop(writer);
    status
}

#[test]
fn a_crash_while_holding_a_key_writes_no_core_dump() {
    use std::os::unix::process::ExitStatusExt as _;
    let fx = Fixture::new();
    let fifo = fx.path("key.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let img = fx.image("volume.img", 20 << 20);
    let cores = || {
        std::fs::read_dir(fx.dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("core"))
            .collect::<Vec<_>>()
    };

    // The control: an ordinary reader aborted the same way dumps core, so
    // this machine writes core dumps and the check below can fail. (A hard
    // core limit of 0 or a broken core_pattern helper fails here.)
    let control = abort_while_it_reads(fx.dir.path(), &fifo, &["cat", s(&fifo)]);
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    assert!(
        control.core_dumped(),
        "`cat` aborted with the core limit lifted dumped no core ({control}; core_pattern {:?}): \
         this machine cannot show that luks-agent never dumps one",
        pattern.trim()
    );
    for core in cores() {
        std::fs::remove_file(fx.path(&core)).unwrap();
    }

    let agent = abort_while_it_reads(
        fx.dir.path(),
        &fifo,
        &[
            BIN,
            "luks",
            "test-passphrase",
            "--key-file",
            s(&fifo),
            s(&img),
        ],
    );
    assert_eq!(agent.signal(), Some(libc::SIGABRT), "{agent}");
    assert!(
        !agent.core_dumped(),
        "luks-agent dumped core while reading a key"
    );
    assert_eq!(
        cores(),
        Vec::<String>::new(),
        "core files in {:?}",
        fx.dir.path()
    );
}

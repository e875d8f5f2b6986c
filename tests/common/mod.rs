//! Shared helpers for the integration tests: temporary images and key files,
//! running `luks-agent`, `cryptsetup`, `qemu-img` and `qemu-io`, parsing
//! their output, and a reference AES-XTS implementation for checking data;
//! `luks-agent serve` and its socket in `serve`, the service harnesses in
//! `harness`.
//!
//! Every external tool is required: a missing tool fails the test with a
//! message that points at the project's dependency installer.

#![allow(dead_code)]

pub mod harness;
pub mod serve;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_luks-agent");

/// Size of every scratch image: big enough for LUKS2 (16 MiB of metadata
/// and keyslots by default) plus some data.
pub const IMAGE_SIZE: u64 = 32 * 1024 * 1024;

/// Default time limit for one external command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Time limit for commands that run cryptsetup's benchmarked (slow) KDFs.
pub const SLOW_TIMEOUT: Duration = Duration::from_secs(600);

/// Fast PBKDF2 parameters (same spelling for cryptsetup and luks-agent).
pub const FAST_PBKDF2: &[&str] = &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
/// Fast Argon2id parameters (same spelling for cryptsetup and luks-agent).
pub const FAST_ARGON2ID: &[&str] = &[
    "--pbkdf",
    "argon2id",
    "--pbkdf-memory",
    "32",
    "--pbkdf-force-iterations",
    "4",
];
/// Fast Argon2i parameters (same spelling for cryptsetup and luks-agent).
pub const FAST_ARGON2I: &[&str] = &[
    "--pbkdf",
    "argon2i",
    "--pbkdf-memory",
    "32",
    "--pbkdf-force-iterations",
    "4",
];

// ---------------------------------------------------------------------------
// Paths and external tools
// ---------------------------------------------------------------------------

/// `&Path` as `&str` (all our temporary paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("temporary path is not UTF-8")
}

/// Locates a required external tool, or fails the test.
pub fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        let executable = fs::metadata(&p)
            .map(|md| md.is_file() && md.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if executable {
            return p;
        }
    }
    panic!(
        "required external tool `{name}` was not found in PATH, /usr/sbin or /sbin. \
         These interoperability tests need cryptsetup (>= 2.6) and qemu-utils \
         (qemu-img, qemu-io): run the project's dependency installer \
         (scripts/install-deps.sh, as root) to install them, then run the tests \
         again. The tests never skip silently."
    );
}

/// The `cryptsetup` binary, or a failed test.
pub fn cryptsetup_bin() -> PathBuf {
    tool("cryptsetup")
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Result of one finished command.
#[derive(Clone)]
pub struct Run {
    /// Printable command line.
    pub cmdline: String,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// Captured standard output (lossy UTF-8).
    pub stdout: String,
    /// Captured standard error (lossy UTF-8).
    pub stderr: String,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".to_string(),
        };
        write!(
            f,
            "command: {}\n{} after {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmdline, code, self.elapsed, self.stdout, self.stderr
        )
    }
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Run {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails when the output shows a Rust panic or the process died by a
    /// signal (abort, stack overflow, ...).
    pub fn assert_no_panic(&self, what: &str) -> &Self {
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "{what}: the program panicked\n{self}"
        );
        assert!(
            self.code.is_some(),
            "{what}: the program was killed by a signal\n{self}"
        );
        self
    }

    /// Like `assert_no_panic`, but returns the problem instead of failing.
    pub fn assert_no_panic_soft(&self) -> Option<String> {
        if self.stderr.contains("panicked") || self.stdout.contains("panicked") {
            Some(format!("the program panicked\n{self}"))
        } else if self.code.is_none() {
            Some(format!("the program was killed by a signal\n{self}"))
        } else {
            None
        }
    }

    /// Asserts the exit code (and, for luks-agent, that nothing panicked).
    pub fn expect_code(&self, code: i32, what: &str) -> &Self {
        self.assert_no_panic(what);
        assert_eq!(
            self.code,
            Some(code),
            "{what}: expected exit code {code}, got {:?}\n{self}",
            self.code
        );
        self
    }

    /// Asserts exit code 0.
    pub fn expect_ok(&self, what: &str) -> &Self {
        self.expect_code(0, what)
    }

    /// Asserts the exit code is one of `codes`.
    pub fn expect_code_in(&self, codes: &[i32], what: &str) -> &Self {
        self.assert_no_panic(what);
        assert!(
            self.code.is_some_and(|c| codes.contains(&c)),
            "{what}: expected an exit code in {codes:?}, got {:?}\n{self}",
            self.code
        );
        self
    }

    /// Asserts that stderr names `path` (error messages must say which device).
    pub fn expect_stderr_names(&self, path: &Path, what: &str) -> &Self {
        assert!(
            self.stderr.contains(s(path)),
            "{what}: the error message does not name the device {}\n{self}",
            path.display()
        );
        self
    }
}

/// Runs `program` with `args`, feeding `stdin` if given, killing it after
/// `timeout` (which fails the test).
pub fn run_with<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Run {
    let cmdline = std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_ref()))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{cmdline}`: {e}"));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let data = data.to_vec();
        thread::spawn(move || {
            // The program may legitimately stop reading early.
            let _ = pipe.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let mut nap = Duration::from_micros(200);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                if start.elapsed() > timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = err_reader.join().unwrap_or_default();
                    panic!(
                        "`{cmdline}` did not finish within {timeout:?}; stderr so far:\n{}",
                        String::from_utf8_lossy(&stderr)
                    );
                }
                thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Err(e) => panic!("waiting for `{cmdline}` failed: {e}"),
        }
    };
    let elapsed = start.elapsed();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Run {
        cmdline,
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
    }
}

/// Runs luks-agent.
pub fn agent(args: &[&str]) -> Run {
    run_with(Path::new(AGENT), args, None, DEFAULT_TIMEOUT)
}

/// Runs luks-agent with a custom time limit.
pub fn agent_timeout(args: &[&str], timeout: Duration) -> Run {
    run_with(Path::new(AGENT), args, None, timeout)
}

/// Runs luks-agent with `input` on standard input.
pub fn agent_stdin(args: &[&str], input: &[u8]) -> Run {
    run_with(Path::new(AGENT), args, Some(input), DEFAULT_TIMEOUT)
}

/// Runs cryptsetup.
pub fn cryptsetup(args: &[&str]) -> Run {
    run_with(&cryptsetup_bin(), args, None, DEFAULT_TIMEOUT)
}

/// Runs cryptsetup with a custom time limit.
pub fn cryptsetup_timeout(args: &[&str], timeout: Duration) -> Run {
    run_with(&cryptsetup_bin(), args, None, timeout)
}

/// Runs cryptsetup with `input` on standard input.
pub fn cryptsetup_stdin(args: &[&str], input: &[u8]) -> Run {
    run_with(&cryptsetup_bin(), args, Some(input), DEFAULT_TIMEOUT)
}

/// Runs qemu-img.
pub fn qemu_img(args: &[&str]) -> Run {
    run_with(&tool("qemu-img"), args, None, DEFAULT_TIMEOUT)
}

/// Runs qemu-io.
pub fn qemu_io(args: &[&str]) -> Run {
    run_with(&tool("qemu-io"), args, None, DEFAULT_TIMEOUT)
}

/// `args` followed by `extra`.
pub fn cat<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    args.iter().chain(extra.iter()).copied().collect()
}

// ---------------------------------------------------------------------------
// Scratch files
// ---------------------------------------------------------------------------

/// A temporary directory holding images and key files.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("luks-agent-test-")
            .tempdir()
            .expect("create temporary directory");
        Fixture { dir }
    }

    /// A path inside the fixture directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new sparse image of `IMAGE_SIZE` bytes.
    pub fn image(&self, name: &str) -> PathBuf {
        self.image_of(name, IMAGE_SIZE)
    }

    /// A new sparse image of `size` bytes.
    pub fn image_of(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = File::create(&p).expect("create image");
        f.set_len(size).expect("size image");
        p
    }

    /// A key file with mode 0600 holding exactly `content`.
    pub fn key(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.path(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .expect("create key file");
        f.write_all(content).expect("write key file");
        p
    }

    /// A byte-for-byte copy of `src` (holes are not preserved, which is fine
    /// for 32 MiB images).
    pub fn copy(&self, src: &Path, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::copy(src, &p).expect("copy image");
        p
    }

    /// A copy of the first `len` bytes of `src`.
    pub fn truncated_copy(&self, src: &Path, name: &str, len: u64) -> PathBuf {
        let p = self.path(name);
        let mut data = Vec::new();
        File::open(src)
            .expect("open source image")
            .take(len)
            .read_to_end(&mut data)
            .expect("read source image");
        assert_eq!(data.len() as u64, len, "source image shorter than the cut");
        fs::write(&p, &data).expect("write truncated copy");
        p
    }
}

/// Reads `len` bytes at `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).expect("open image");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read image");
    buf
}

/// Overwrites bytes at `offset` (the file keeps its size).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for writing");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write image");
    f.sync_data().ok();
}

/// SHA-256 of the whole file, lowercase hex (coreutils `sha256sum`: the
/// tests run unoptimised, where hashing 32 MiB in-process takes seconds).
pub fn sha256_file(path: &Path) -> String {
    let r = run_with(
        &tool("sha256sum"),
        &["--binary", s(path)],
        None,
        DEFAULT_TIMEOUT,
    );
    assert!(r.success(), "sha256sum failed\n{r}");
    let sum = r.stdout.split_whitespace().next().unwrap_or("").to_string();
    assert!(
        sum.len() == 64 && sum.chars().all(|c| c.is_ascii_hexdigit()),
        "unexpected sha256sum output\n{r}"
    );
    sum
}

/// Deterministic pseudo-random bytes (xorshift64*), never all zero.
pub fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Volume keys
// ---------------------------------------------------------------------------

fn hex_tokens(s: &str) -> Option<String> {
    let mut out = String::new();
    for tok in s.split_whitespace() {
        if tok.len() % 2 != 0 || !tok.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        out.push_str(tok);
    }
    Some(out)
}

/// Extracts a volume key from `luksDump --dump-volume-key` style output:
/// cryptsetup prints `MK dump:` (LUKS1 and, in 2.6, LUKS2) or `Volume key:`
/// followed by space separated hex bytes over several lines; luks-agent
/// prints `Volume key: <contiguous hex>`. Returns contiguous lowercase hex.
pub fn parse_volume_key(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let rest = ["Volume key:", "MK dump:"]
            .iter()
            .find_map(|label| line.find(label).map(|p| &line[p + label.len()..]));
        let Some(rest) = rest else { continue };
        let Some(mut key) = hex_tokens(rest) else {
            continue;
        };
        for next in &lines[i + 1..] {
            if next.trim().is_empty() {
                break;
            }
            match hex_tokens(next) {
                Some(more) => key.push_str(&more),
                None => break,
            }
        }
        if !key.is_empty() {
            return Some(key.to_ascii_lowercase());
        }
    }
    None
}

/// The volume key as cryptsetup sees it.
pub fn cs_volume_key(dev: &Path, key_file: &Path) -> String {
    cs_volume_key_timeout(dev, key_file, DEFAULT_TIMEOUT)
}

/// The volume key as cryptsetup sees it, with a custom time limit.
pub fn cs_volume_key_timeout(dev: &Path, key_file: &Path, timeout: Duration) -> String {
    let r = cryptsetup_timeout(
        &[
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
            s(key_file),
            s(dev),
        ],
        timeout,
    );
    assert!(r.success(), "cryptsetup could not dump the volume key\n{r}");
    parse_volume_key(&r.stdout).unwrap_or_else(|| panic!("no volume key in cryptsetup output\n{r}"))
}

/// The volume key as luks-agent sees it.
pub fn agent_volume_key(dev: &Path, key_file: &Path) -> String {
    agent_volume_key_timeout(dev, key_file, DEFAULT_TIMEOUT)
}

/// The volume key as luks-agent sees it, with a custom time limit.
pub fn agent_volume_key_timeout(dev: &Path, key_file: &Path, timeout: Duration) -> String {
    let r = agent_timeout(
        &[
            "luks",
            "dump",
            "--dump-volume-key",
            "--key-file",
            s(key_file),
            s(dev),
        ],
        timeout,
    );
    r.expect_ok("luks-agent luks dump --dump-volume-key");
    let key = parse_volume_key(&r.stdout)
        .unwrap_or_else(|| panic!("no `Volume key:` line in luks-agent output\n{r}"));
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("Volume key:"))
        .unwrap_or_else(|| panic!("luks-agent must print a `Volume key:` line\n{r}"));
    let printed = line
        .split_once("Volume key:")
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    assert!(
        printed
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            && !printed.is_empty(),
        "luks-agent must print the volume key as lowercase hex without spaces, got {printed:?}\n{r}"
    );
    key
}

// ---------------------------------------------------------------------------
// Common operations
// ---------------------------------------------------------------------------

/// `cryptsetup luksFormat --batch-mode --type <ty> <extra> --key-file <key> <dev>`.
pub fn cs_format(dev: &Path, key_file: &Path, ty: &str, extra: &[&str]) {
    cs_format_timeout(dev, key_file, ty, extra, DEFAULT_TIMEOUT);
}

/// `cs_format` with a custom time limit.
pub fn cs_format_timeout(dev: &Path, key_file: &Path, ty: &str, extra: &[&str], timeout: Duration) {
    let mut args = vec!["luksFormat", "--batch-mode", "--type", ty];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--key-file", s(key_file), s(dev)]);
    let r = cryptsetup_timeout(&args, timeout);
    assert!(r.success(), "cryptsetup luksFormat failed\n{r}");
}

/// `cryptsetup luksAddKey` (existing passphrase in `old`, new one in `new`).
pub fn cs_add_key(dev: &Path, old: &Path, new: &Path, extra: &[&str]) {
    let mut args = vec!["luksAddKey", "--batch-mode"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--key-file", s(old), s(dev), s(new)]);
    let r = cryptsetup(&args);
    assert!(r.success(), "cryptsetup luksAddKey failed\n{r}");
}

/// `cryptsetup open --test-passphrase`: the exit code.
pub fn cs_test_passphrase(dev: &Path, key_file: &Path) -> Run {
    cryptsetup(&[
        "open",
        "--test-passphrase",
        "--batch-mode",
        "--key-file",
        s(key_file),
        s(dev),
    ])
}

/// Asserts cryptsetup accepts (`true`) or rejects with exit 2 (`false`).
pub fn cs_expect_passphrase(dev: &Path, key_file: &Path, accepted: bool, what: &str) {
    let r = cs_test_passphrase(dev, key_file);
    let want = if accepted { 0 } else { 2 };
    assert_eq!(
        r.code,
        Some(want),
        "{what}: cryptsetup open --test-passphrase with {} should exit {want}\n{r}",
        key_file.display()
    );
}

/// `luks-agent luks test-passphrase`: the run.
pub fn agent_test_passphrase(dev: &Path, key_file: &Path) -> Run {
    agent(&["luks", "test-passphrase", "--key-file", s(key_file), s(dev)])
}

/// Asserts luks-agent accepts (exit 0) or rejects with exit 2.
pub fn agent_expect_passphrase(dev: &Path, key_file: &Path, accepted: bool, what: &str) {
    let r = agent_test_passphrase(dev, key_file);
    r.expect_code(
        if accepted { 0 } else { 2 },
        &format!(
            "{what}: luks-agent luks test-passphrase with {}",
            key_file.display()
        ),
    );
}

/// `luks-agent luks format` with `args` then `--key-file key dev`.
pub fn agent_format(dev: &Path, key_file: &Path, args: &[&str]) -> Run {
    let mut v = vec!["luks", "format"];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--key-file", s(key_file), s(dev)]);
    agent(&v)
}

/// `luks-agent luks dump --json`, parsed.
pub fn agent_dump_json(dev: &Path) -> Value {
    let r = agent(&["luks", "dump", "--json", s(dev)]);
    r.expect_ok("luks-agent luks dump --json");
    serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("luks dump --json did not print one JSON object: {e}\n{r}"))
}

/// `cryptsetup luksDump` text.
pub fn cs_dump(dev: &Path) -> String {
    let r = cryptsetup(&["luksDump", s(dev)]);
    assert!(r.success(), "cryptsetup luksDump failed\n{r}");
    r.stdout
}

/// `cryptsetup luksDump --dump-json-metadata` (LUKS2 only), parsed.
pub fn cs_json_metadata(dev: &Path) -> Value {
    let r = cryptsetup(&["luksDump", "--dump-json-metadata", s(dev)]);
    assert!(
        r.success(),
        "cryptsetup luksDump --dump-json-metadata failed\n{r}"
    );
    serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("cryptsetup printed invalid JSON metadata: {e}\n{r}"))
}

/// The value of the first `label: value` line of a cryptsetup dump
/// (leading whitespace ignored, value trimmed).
pub fn dump_field(text: &str, label: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let t = l.trim_start();
        let rest = t.strip_prefix(label)?;
        let rest = rest.trim_start_matches([' ', '\t']);
        let rest = rest.strip_prefix(':')?;
        Some(rest.trim().to_string())
    })
}

/// LUKS1 dump: the enabled keyslots.
pub fn luks1_enabled_slots(text: &str) -> Vec<u64> {
    (0..8)
        .filter(|n| dump_field(text, &format!("Key Slot {n}")).as_deref() == Some("ENABLED"))
        .collect()
}

/// LUKS1 dump: the iteration count of keyslot `n`.
pub fn luks1_slot_iterations(text: &str, n: u64) -> Option<u64> {
    let start = text.find(&format!("Key Slot {n}: ENABLED"))?;
    dump_field(&text[start..], "Iterations")?.parse().ok()
}

/// LUKS2 dump: the text of the `Tokens:` section.
pub fn luks2_tokens_section(text: &str) -> String {
    let start = text
        .find("Tokens:")
        .map(|p| p + "Tokens:".len())
        .unwrap_or(text.len());
    let rest = &text[start..];
    let end = rest.find("Digests:").unwrap_or(rest.len());
    rest[..end].to_string()
}

/// Parses a numeric JSON value that may be a number or a decimal string
/// (LUKS2 metadata stores 64-bit values as strings).
pub fn json_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Header models: what cryptsetup reports versus what luks-agent reports
// ---------------------------------------------------------------------------

/// KDF parameters of one keyslot.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KdfModel {
    pub ty: String,
    pub hash: Option<String>,
    pub iterations: Option<u64>,
    pub time: Option<u64>,
    pub memory: Option<u64>,
    pub cpus: Option<u64>,
}

/// The header facts both tools must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HeaderModel {
    pub version: u64,
    pub uuid: String,
    pub cipher: String,
    pub key_size_bits: u64,
    pub data_offset_bytes: u64,
    pub keyslots: BTreeMap<u64, KdfModel>,
}

/// The header as cryptsetup describes it.
pub fn cs_model(dev: &Path) -> HeaderModel {
    let text = cs_dump(dev);
    let version: u64 = dump_field(&text, "Version")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Version in cryptsetup luksDump:\n{text}"));
    let uuid = dump_field(&text, "UUID").unwrap_or_else(|| panic!("no UUID in luksDump:\n{text}"));
    if version == 1 {
        let field = |label: &str| {
            dump_field(&text, label).unwrap_or_else(|| panic!("no `{label}` in luksDump:\n{text}"))
        };
        let hash = field("Hash spec");
        let keyslots = luks1_enabled_slots(&text)
            .into_iter()
            .map(|n| {
                let kdf = KdfModel {
                    ty: "pbkdf2".into(),
                    hash: Some(hash.clone()),
                    iterations: luks1_slot_iterations(&text, n),
                    ..Default::default()
                };
                (n, kdf)
            })
            .collect();
        HeaderModel {
            version,
            uuid,
            cipher: format!("{}-{}", field("Cipher name"), field("Cipher mode")),
            key_size_bits: field("MK bits").parse().expect("MK bits"),
            data_offset_bytes: field("Payload offset")
                .parse::<u64>()
                .expect("Payload offset")
                * 512,
            keyslots,
        }
    } else {
        let meta = cs_json_metadata(dev);
        let seg = &meta["segments"]["0"];
        let mut keyslots = BTreeMap::new();
        let mut key_bytes = None;
        for (id, ks) in meta["keyslots"].as_object().expect("keyslots object") {
            key_bytes = key_bytes.or_else(|| json_u64(&ks["key_size"]));
            let kdf = &ks["kdf"];
            let ty = kdf["type"].as_str().expect("kdf type").to_string();
            let m = if ty == "pbkdf2" {
                KdfModel {
                    ty,
                    hash: kdf["hash"].as_str().map(str::to_string),
                    iterations: json_u64(&kdf["iterations"]),
                    ..Default::default()
                }
            } else {
                KdfModel {
                    ty,
                    time: json_u64(&kdf["time"]),
                    memory: json_u64(&kdf["memory"]),
                    cpus: json_u64(&kdf["cpus"]),
                    ..Default::default()
                }
            };
            keyslots.insert(id.parse().expect("keyslot id"), m);
        }
        HeaderModel {
            version,
            uuid,
            cipher: seg["encryption"]
                .as_str()
                .expect("segment encryption")
                .to_string(),
            key_size_bits: key_bytes.expect("keyslot key_size") * 8,
            data_offset_bytes: json_u64(&seg["offset"]).expect("segment offset"),
            keyslots,
        }
    }
}

/// The header as `luks-agent luks dump --json` describes it. Fails when a
/// documented field is missing or has the wrong type.
pub fn agent_model(dev: &Path) -> HeaderModel {
    let j = agent_dump_json(dev);
    model_from_agent_json(&j)
}

/// Builds a model from `luks dump --json` output.
pub fn model_from_agent_json(j: &Value) -> HeaderModel {
    let num = |v: &Value, what: &str| -> u64 {
        v.as_u64().unwrap_or_else(|| {
            panic!("luks dump --json: `{what}` must be a number, got {v} in\n{j:#}")
        })
    };
    let text = |v: &Value, what: &str| -> String {
        v.as_str()
            .unwrap_or_else(|| {
                panic!("luks dump --json: `{what}` must be a string, got {v} in\n{j:#}")
            })
            .to_string()
    };
    let mut keyslots = BTreeMap::new();
    for ks in j["keyslots"]
        .as_array()
        .unwrap_or_else(|| panic!("luks dump --json: `keyslots` must be an array in\n{j:#}"))
    {
        let kdf = &ks["kdf"];
        let ty = text(&kdf["type"], "keyslots[].kdf.type");
        let m = if ty == "pbkdf2" {
            KdfModel {
                hash: Some(text(&kdf["hash"], "keyslots[].kdf.hash")),
                iterations: Some(num(&kdf["iterations"], "keyslots[].kdf.iterations")),
                ty,
                ..Default::default()
            }
        } else {
            KdfModel {
                time: Some(num(&kdf["time"], "keyslots[].kdf.time")),
                memory: Some(num(&kdf["memory"], "keyslots[].kdf.memory")),
                cpus: Some(num(&kdf["cpus"], "keyslots[].kdf.cpus")),
                ty,
                ..Default::default()
            }
        };
        let slot = num(&ks["slot"], "keyslots[].slot");
        assert!(
            keyslots.insert(slot, m).is_none(),
            "keyslot {slot} listed twice in\n{j:#}"
        );
    }
    HeaderModel {
        version: num(&j["version"], "version"),
        uuid: text(&j["uuid"], "uuid"),
        cipher: text(&j["cipher"], "cipher"),
        key_size_bits: num(&j["key_size_bits"], "key_size_bits"),
        data_offset_bytes: num(&j["data_offset_bytes"], "data_offset_bytes"),
        keyslots,
    }
}

/// Asserts that luks-agent and cryptsetup describe the header identically.
pub fn assert_same_header(dev: &Path) -> HeaderModel {
    let theirs = cs_model(dev);
    let ours = agent_model(dev);
    assert_eq!(
        ours,
        theirs,
        "luks-agent (left) and cryptsetup (right) disagree about the header of {}",
        dev.display()
    );
    ours
}

/// Asserts every key file unlocks the same volume key in both tools, that
/// the key has `key_bits` bits, and returns it.
pub fn assert_same_volume_key(dev: &Path, keys: &[&Path], key_bits: u64) -> String {
    let reference = cs_volume_key(dev, keys[0]);
    assert_eq!(
        reference.len() as u64 * 4,
        key_bits,
        "cryptsetup volume key has an unexpected size: {reference}"
    );
    for k in keys {
        let theirs = cs_volume_key(dev, k);
        assert_eq!(
            theirs,
            reference,
            "cryptsetup: {} gives another volume key",
            k.display()
        );
        let ours = agent_volume_key(dev, k);
        assert_eq!(
            ours,
            reference,
            "luks-agent volume key (left) differs from cryptsetup's (right) for key file {}",
            k.display()
        );
    }
    reference
}

// ---------------------------------------------------------------------------
// Reference AES-XTS-plain64 (512-byte sectors)
// ---------------------------------------------------------------------------

fn xts_apply(key: &[u8], data: &mut [u8], first_sector: u64, encrypt: bool) {
    use aes::cipher::KeyInit;
    use xts_mode::{Xts128, get_tweak_default};
    assert_eq!(data.len() % 512, 0, "whole sectors only");
    let half = key.len() / 2;
    match key.len() {
        32 => {
            let xts = Xts128::new(
                aes::Aes128::new_from_slice(&key[..half]).expect("aes-128 key"),
                aes::Aes128::new_from_slice(&key[half..]).expect("aes-128 key"),
            );
            if encrypt {
                xts.encrypt_area(data, 512, u128::from(first_sector), get_tweak_default);
            } else {
                xts.decrypt_area(data, 512, u128::from(first_sector), get_tweak_default);
            }
        }
        64 => {
            let xts = Xts128::new(
                aes::Aes256::new_from_slice(&key[..half]).expect("aes-256 key"),
                aes::Aes256::new_from_slice(&key[half..]).expect("aes-256 key"),
            );
            if encrypt {
                xts.encrypt_area(data, 512, u128::from(first_sector), get_tweak_default);
            } else {
                xts.decrypt_area(data, 512, u128::from(first_sector), get_tweak_default);
            }
        }
        n => panic!("unsupported XTS key length {n} bytes"),
    }
}

/// Decrypts whole 512-byte sectors in place; the IV of the first sector is
/// `first_sector` (plain64: little-endian sector number).
pub fn xts_plain64_decrypt(key: &[u8], data: &mut [u8], first_sector: u64) {
    xts_apply(key, data, first_sector, false);
}

/// Encrypts whole 512-byte sectors in place.
pub fn xts_plain64_encrypt(key: &[u8], data: &mut [u8], first_sector: u64) {
    xts_apply(key, data, first_sector, true);
}

/// A key as it could leak into a log or a journal, each form labelled for
/// a failure message: raw bytes, lower and upper case hex, standard base64.
pub fn key_encodings(what: &str, key: &[u8]) -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    let hex = hex::encode(key);
    vec![
        (format!("raw {what}"), key.to_vec()),
        (format!("hex {what}"), hex.clone().into_bytes()),
        (format!("HEX {what}"), hex.to_uppercase().into_bytes()),
        (
            format!("base64 {what}"),
            base64::engine::general_purpose::STANDARD
                .encode(key)
                .into_bytes(),
        ),
    ]
}

/// The label of the first of `needles` that occurs in `haystack`.
pub fn first_found<'a>(haystack: &[u8], needles: &'a [(String, Vec<u8>)]) -> Option<&'a str> {
    needles.iter().find_map(|(what, needle)| {
        assert!(!needle.is_empty(), "nothing to look for as {what}");
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
            .then_some(what.as_str())
    })
}

/// Fails, naming the needle and `place`, when any of `needles` occurs in
/// `haystack`.
pub fn assert_none_in(haystack: &[u8], needles: &[(String, Vec<u8>)], place: &str) {
    if let Some(what) = first_found(haystack, needles) {
        panic!("{what} in {place}");
    }
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn parses_cryptsetup_and_agent_volume_keys() {
        let luks1 = "LUKS header information for a.img\nCipher name:   \taes\nMK bits:       \t256\n\
                     MK dump:\tc3 3b 7f 7d 22 a1 b5 62 b3 6b 80 a0 9b 8c db 21 \n\
                     \t\t73 0f 23 4e ca f6 5c 3a 67 6d 6f 5f 63 89 fa E1 \n";
        assert_eq!(
            parse_volume_key(luks1).as_deref(),
            Some("c33b7f7d22a1b562b36b80a09b8cdb21730f234ecaf65c3a676d6f5f6389fae1")
        );
        let luks2 = "Volume key:\t00 11\n\t\t22 33\nUUID: 1234\n";
        assert_eq!(parse_volume_key(luks2).as_deref(), Some("00112233"));
        let ours = "Version: 2\nVolume key: 00aabb\n";
        assert_eq!(parse_volume_key(ours).as_deref(), Some("00aabb"));
        assert_eq!(parse_volume_key("MK bits: 512\n"), None);
    }

    #[test]
    fn every_encoding_of_a_key_is_found() {
        let key = [0xa5u8, 0x01, 0xfe, 0x7c];
        let needles = key_encodings("k", &key);
        let forms: [(&str, &[u8]); 4] = [
            ("raw k", &key),
            ("hex k", b"a501fe7c"),
            ("HEX k", b"A501FE7C"),
            ("base64 k", b"pQH+fA=="),
        ];
        assert_eq!(needles.len(), forms.len());
        for (what, form) in forms {
            let mut haystack = b"log line: ".to_vec();
            haystack.extend_from_slice(form);
            assert_eq!(first_found(&haystack, &needles), Some(what));
        }
        assert_eq!(first_found(b"nothing secret here", &needles), None);
    }

    #[test]
    fn xts_round_trip() {
        let key = [7u8; 64];
        let mut data = vec![0x5a; 1024];
        xts_plain64_encrypt(&key, &mut data, 3);
        assert_ne!(data, vec![0x5a; 1024]);
        xts_plain64_decrypt(&key, &mut data, 3);
        assert_eq!(data, vec![0x5a; 1024]);
    }
}

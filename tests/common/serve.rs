//! `luks-agent serve` for the API tests: a configuration with a local key
//! store in a temporary directory, the agent started on its socket and
//! stopped with SIGTERM, the CLI run with the same configuration, and the
//! plain HTTP/1.1 the tests speak on the socket.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{AGENT, s};

/// Writes `dir/agent.toml`: state and run directories and a local key
/// store below `dir`, the socket `dir/agent.sock`, then `server_lines`,
/// which go into the `[server]` section and may open further sections.
pub fn write_local_config(dir: &Path, server_lines: &str) -> PathBuf {
    let p = dir.display();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{p}/state\"\nrun_dir = \"{p}/run\"\n\
             [key_manager.local]\ndir = \"{p}/keys\"\n\
             [server]\nsocket = \"{p}/agent.sock\"\n{server_lines}\n"
        ),
    )
    .unwrap();
    config
}

/// Runs the CLI with `config`: exit code (-1 when killed by a signal),
/// stdout and stderr.
pub fn cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let r = super::agent(&super::cat(&["--config", super::s(config)], args));
    (r.code.unwrap_or(-1), r.stdout, r.stderr)
}

/// A new key in the local key store of `config`: its id, and the
/// passphrase that `keys fetch --reveal` shows for it (the key in hex).
pub fn create_local_key(config: &Path) -> (String, String) {
    let (code, out, err) = cli(config, &["keys", "create"]);
    assert_eq!(code, 0, "luks-agent keys create: {err}");
    let key_id = out.trim().to_string();
    let (code, out, err) = cli(config, &["keys", "fetch", "--key-id", &key_id, "--reveal"]);
    assert_eq!(code, 0, "luks-agent keys fetch: {err}");
    let passphrase = out
        .lines()
        .find_map(|l| l.strip_prefix("passphrase: "))
        .unwrap_or_else(|| panic!("keys fetch --reveal printed no passphrase: {out}"))
        .to_string();
    (key_id, passphrase)
}

/// A running `luks-agent serve`. Dropping it stops the agent, and fails
/// the test if SIGTERM does not (unless the test is failing already).
pub struct Server {
    child: Option<Child>,
    socket: PathBuf,
    log: Option<PathBuf>,
    /// How long the agent may take to answer, and to stop.
    patience: Duration,
}

impl Server {
    /// Starts `luks-agent --config CONFIG serve` with debug logging, its
    /// output appended to `log`, and waits until it answers `GET /healthz`
    /// on `socket`.
    pub fn start(config: &Path, socket: &Path, log: &Path, patience: Duration) -> Server {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(AGENT);
        cmd.args(["--config", s(config), "serve"])
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        Server::launch(cmd, socket, Some(log), patience)
    }

    /// As `start`, with the agent's command line appended to `wrapper`,
    /// which runs it; the output is the wrapper's.
    pub fn start_under(
        mut wrapper: Command,
        config: &Path,
        socket: &Path,
        patience: Duration,
    ) -> Server {
        wrapper.args([AGENT, "--config", s(config), "serve"]);
        Server::launch(wrapper, socket, None, patience)
    }

    fn launch(mut cmd: Command, socket: &Path, log: Option<&Path>, patience: Duration) -> Server {
        let child = cmd
            .env("LUKS_AGENT_LOG", "debug")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        // Built before waiting, so that a panic below stops the agent.
        let mut server = Server {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.map(Path::to_path_buf),
            patience,
        };
        let deadline = Instant::now() + patience;
        while !healthy(&server.socket) {
            let child = server.child.as_mut().unwrap();
            if let Some(st) = child.try_wait().unwrap() {
                server.child = None;
                panic!("the agent exited with {st}: {}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not answer /healthz within {patience:?}: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The agent's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the agent is running").id() as i32
    }

    /// What the agent wrote to its log file so far (nothing without one).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGTERM and the exit status; `None` when the agent was not running
    /// or did not stop in time (it is killed then).
    pub fn try_stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill has no memory preconditions; the pid is our child,
        // not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + self.patience;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits, without signalling, for the agent to exit; `None` when it
    /// has not within `limit` (it is killed then).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and the exit status; fails the test when the agent does not
    /// stop in time.
    pub fn stop(&mut self) -> ExitStatus {
        assert!(self.child.is_some(), "the agent was stopped already");
        self.try_stop()
            .unwrap_or_else(|| panic!("the agent did not stop on SIGTERM: {}", self.log()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() && self.try_stop().is_none() && !std::thread::panicking() {
            panic!("the agent did not stop on SIGTERM: {}", self.log());
        }
    }
}

/// Whether the agent answers `GET /healthz` on `socket` with 200.
pub fn healthy(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = String::new();
    s.write_all(&request_bytes("GET", "/healthz", &[], None))
        .is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// One HTTP/1.1 request with `Connection: close`; a POST gets a JSON
/// `Content-Type` and a `Content-Length`, unless `extra_headers` (whole
/// lines, each ending in CRLF) choose chunked transfer.
pub fn request_bytes(
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: Option<&str>,
) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: luks-agent\r\nConnection: close\r\n{}",
        extra_headers.unwrap_or("")
    );
    if method == "POST" && extra_headers.is_none_or(|h| !h.contains("Transfer-Encoding")) {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// An HTTP answer as the agent sent it, the body dechunked.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// Splits everything read from a connection into status, head and body.
    pub fn parse(raw: &[u8]) -> Answer {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let rest = &raw[split + 4..];
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_vec()
        };
        Answer { status, head, body }
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[line_end + 2..line_end + 2 + n]);
        b = &b[line_end + 2 + n + 2..];
    }
}

//! The TOML configuration file (`/etc/luks-agent/agent.toml`). Unknown
//! fields are errors; a file holding secrets must be readable by root only.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dm::CryptOptions;

use crate::keymgr::barbican::{Barbican, BarbicanConfig};
use crate::keymgr::fixed::WithFixedKey;
use crate::keymgr::http::{self, HttpConfig};
use crate::keymgr::keystone::{Keystone, KeystoneConfig};
use crate::keymgr::local::{self, LocalKeyStore};
use crate::keymgr::{KeyError, KeyManager, SecretString};

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/luks-agent/agent.toml";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/luks-agent/state";
/// Default runtime directory: locks, attach records and the API socket.
pub const DEFAULT_RUN_DIR: &str = "/run/luks-agent";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/luks-agent/agent.sock";

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_key_dir() -> PathBuf {
    PathBuf::from(local::DEFAULT_DIR)
}
fn default_run_dir() -> PathBuf {
    PathBuf::from(DEFAULT_RUN_DIR)
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the agent keeps its state (formatted markers).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where volume keys come from.
    #[serde(default)]
    pub key_manager: KeyManagerConfig,
    /// Limits on the cost of LUKS key derivation.
    #[serde(default)]
    pub kdf: KdfConfig,
    /// Where locks and attach records live (cleared at boot).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// The long-running agent (`luks-agent serve`) and its API socket.
    #[serde(default)]
    pub server: ServerConfig,
    /// dm-crypt options of the mappings the agent creates.
    #[serde(default)]
    pub crypt: CryptConfig,
    /// libvirt secrets for QEMU-native LUKS (attach `--mode libvirt`).
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    /// Attach and first-use format.
    #[serde(default)]
    pub volume: VolumeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: default_state_dir(),
            key_manager: KeyManagerConfig::default(),
            kdf: KdfConfig::default(),
            run_dir: default_run_dir(),
            server: ServerConfig::default(),
            crypt: CryptConfig::default(),
            libvirt: LibvirtConfig::default(),
            volume: VolumeConfig::default(),
        }
    }
}

/// Which backend serves keys.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The local key store (the default for machines without a cloud).
    #[default]
    Local,
    /// Barbican, authenticated through Keystone.
    Barbican,
}

/// The `[key_manager]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyManagerConfig {
    /// `local` or `barbican`.
    #[serde(default)]
    pub backend: Backend,
    /// nova's legacy ConfKeyManager key (hex) for key id
    /// 00000000-0000-0000-0000-000000000000.
    #[serde(default)]
    pub fixed_key: Option<SecretString>,
    /// Local key store settings.
    #[serde(default)]
    pub local: LocalConfig,
    /// Barbican settings.
    #[serde(default)]
    pub barbican: BarbicanConfig,
    /// Keystone credentials of the agent.
    #[serde(default)]
    pub keystone: Option<KeystoneConfig>,
    /// Timeouts, retries and TLS.
    #[serde(default)]
    pub http: HttpConfig,
}

/// The `[key_manager.local]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Directory of key files.
    #[serde(default = "default_key_dir")]
    pub dir: PathBuf,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            dir: default_key_dir(),
        }
    }
}

fn default_max_argon2_memory_kib() -> u32 {
    1024 * 1024
}

/// The `[kdf]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfConfig {
    /// Largest Argon2 memory cost, in KiB, for keyslots we create with the
    /// strong policy and for headers we open (cryptsetup's default is
    /// 1 GiB; headers may ask for up to 4 GiB).
    #[serde(default = "default_max_argon2_memory_kib")]
    pub max_argon2_memory_kib: u32,
    /// Longest one KDF of a header (a keyslot's or its digest's) may be
    /// estimated to run on this machine, in seconds: a header asking for
    /// more (a hostile iteration count) is refused before its KDF runs.
    #[serde(default = "default_max_unlock_seconds")]
    pub max_unlock_seconds: u64,
}

fn default_max_unlock_seconds() -> u64 {
    crate::luks::kdf::DEFAULT_MAX_TIME.as_secs()
}

impl Default for KdfConfig {
    fn default() -> Self {
        KdfConfig {
            max_argon2_memory_kib: default_max_argon2_memory_kib(),
            max_unlock_seconds: default_max_unlock_seconds(),
        }
    }
}

/// Default of `[volume] format_intent_min_age_secs`: a first-use format
/// takes milliseconds to seconds (minutes only with a strong KDF on a slow
/// machine), so an intent this old belongs to a format that is no longer
/// running.
pub const DEFAULT_FORMAT_INTENT_MIN_AGE_SECS: u64 = 600;

fn default_format_intent_min_age_secs() -> u64 {
    DEFAULT_FORMAT_INTENT_MIN_AGE_SECS
}

/// The `[volume]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// A first-use format that was interrupted (its host died, or the
    /// volume moved) is redone by the next attach on any host once the
    /// intent it recorded in the key manager is this many seconds old, and
    /// not before: a format still running elsewhere must not be raced.
    #[serde(default = "default_format_intent_min_age_secs")]
    pub format_intent_min_age_secs: u64,
    /// Opening a volume's device gives up after this many milliseconds (a
    /// device stuck in its driver must not hold the volume's lock and a
    /// thread forever); the operation fails and names the device.
    #[serde(default = "default_device_open_timeout_ms")]
    pub device_open_timeout_ms: u64,
}

/// Default of `[volume] device_open_timeout_ms`: ten seconds, far above
/// what opening a healthy local, iSCSI or RBD device takes.
fn default_device_open_timeout_ms() -> u64 {
    10_000
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            format_intent_min_age_secs: default_format_intent_min_age_secs(),
            device_open_timeout_ms: default_device_open_timeout_ms(),
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// The `[server]` section: the API socket of `luks-agent serve`, who may
/// call it, and the limits that keep callers from exhausting the agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The Unix socket to listen on (ignored when systemd passes one).
    pub socket: PathBuf,
    /// Group owning the socket (name or numeric gid); the socket is mode
    /// 0660, so members of this group can connect. Root's group if unset.
    pub socket_group: Option<String>,
    /// Peer uids allowed to call the API besides root.
    pub allowed_uids: Vec<u32>,
    /// Peer gids allowed to call (the calling process's primary group or
    /// one of its supplementary groups).
    pub allowed_gids: Vec<u32>,
    /// The same by group name (or number), resolved when the agent starts.
    pub allowed_groups: Vec<String>,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Connections served at once; more are answered 503
    /// `too_many_connections` and closed, so that many idle or slow
    /// clients cannot exhaust the agent's memory.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and the longest a
    /// kept-alive connection may sit idle, in milliseconds.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request body, in milliseconds.
    pub body_timeout_ms: u64,
    /// On SIGTERM or SIGINT: how long, from the signal, callers and
    /// running operations are given to finish, in milliseconds. An
    /// operation still running then is abandoned (named in the log) and
    /// the agent exits; a second signal stops waiting at once.
    pub shutdown_timeout_ms: u64,
    /// Memory that Argon2 key derivations may use together, in KiB. Unset:
    /// a quarter of the machine's memory, at least 1 GiB.
    pub kdf_memory_budget_kib: Option<u64>,
    /// `human` or `json`.
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
            allowed_uids: vec![],
            allowed_gids: vec![],
            allowed_groups: vec![],
            max_body_bytes: 64 * 1024,
            max_connections: 256,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            shutdown_timeout_ms: 30_000,
            kdf_memory_budget_kib: None,
            log_format: LogFormat::Human,
        }
    }
}

/// The `[crypt]` section: optional dm-crypt parameters of every mapping
/// the agent creates (LUKS and plain). All off by default, as with
/// cryptsetup. The encryption sector size is not here: it comes from each
/// LUKS2 header.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CryptConfig {
    /// Pass discard (TRIM) requests through to the backing device
    /// (`allow_discards`). Lets thin storage reclaim space, but shows the
    /// backend which blocks are unused.
    #[serde(default)]
    pub allow_discards: bool,
    /// Decrypt reads in the context that submitted them instead of
    /// dm-crypt's workqueue (`no_read_workqueue`): lower latency on fast
    /// storage.
    #[serde(default)]
    pub no_read_workqueue: bool,
    /// Encrypt writes in the submitting context (`no_write_workqueue`).
    #[serde(default)]
    pub no_write_workqueue: bool,
}

impl CryptConfig {
    /// The table options these settings ask for.
    pub fn options(&self) -> CryptOptions {
        CryptOptions {
            allow_discards: self.allow_discards,
            no_read_workqueue: self.no_read_workqueue,
            no_write_workqueue: self.no_write_workqueue,
            ..CryptOptions::default()
        }
    }
}

fn default_libvirt_uri() -> String {
    "qemu:///system".into()
}

/// The `[libvirt]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// Connection URI; nova's secrets live in `qemu:///system`.
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// Define secrets persistent (`ephemeral='no'`): guests can restart
    /// without the key manager, but libvirtd then keeps the passphrase in
    /// plain base64 in `/etc/libvirt/secrets/<uuid>.base64`. Default: off,
    /// secrets live in libvirtd's memory only.
    #[serde(default)]
    pub persistent: bool,
    /// How often the agent looks for QEMU-native volumes that nova
    /// detached by deleting their secret itself (nova does not call the
    /// encryptor then), to release their keys' holds; seconds, 0: never.
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
}

fn default_reconcile_interval_secs() -> u64 {
    60
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: default_libvirt_uri(),
            persistent: false,
            reconcile_interval_secs: default_reconcile_interval_secs(),
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML or not our schema. Only the message and line are
    /// kept: a snippet of the file could show a secret.
    #[error("{path}: line {line}: {message}")]
    Parse {
        /// File.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Secrets in a file others can read.
    #[error("{path} holds secrets ({what}) but is {problem}; make it owned by root with mode 0600")]
    Exposed {
        /// File.
        path: String,
        /// Which secrets.
        what: String,
        /// Owner or mode problem.
        problem: String,
    },
}

impl Config {
    /// Loads `path`; a missing file at the default location means defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => zeroize::Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: shown,
                    source,
                });
            }
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            line: e
                .span()
                .map(|s| {
                    text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(0),
            message: e.message().to_string(),
        })?;
        let secrets = cfg.secret_names();
        if !secrets.is_empty() {
            let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
                path: shown.clone(),
                source,
            })?;
            let problem = if meta.uid() != 0 {
                Some(format!("owned by uid {}", meta.uid()))
            } else if meta.mode() & 0o077 != 0 {
                Some(format!("mode {:o}", meta.mode() & 0o777))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ConfigError::Exposed {
                    path: shown,
                    what: secrets.join(", "),
                    problem,
                });
            }
        }
        Ok(cfg)
    }

    fn secret_names(&self) -> Vec<&'static str> {
        let km = &self.key_manager;
        let mut v = vec![];
        if km.fixed_key.is_some() {
            v.push("fixed_key");
        }
        if let Some(ks) = &km.keystone {
            if ks.password.is_some() {
                v.push("keystone password");
            }
            if ks.application_credential_secret.is_some() {
                v.push("application credential secret");
            }
        }
        v
    }

    /// The local key store this configuration names.
    pub fn local_store(&self) -> LocalKeyStore {
        LocalKeyStore::new(&self.key_manager.local.dir, &self.state_dir)
    }

    /// The configured key manager, with the legacy fixed key in front when
    /// one is set.
    pub fn key_manager(&self) -> Result<Box<dyn KeyManager>, KeyError> {
        let km = &self.key_manager;
        let inner: Box<dyn KeyManager> = match km.backend {
            Backend::Local => Box::new(self.local_store()),
            Backend::Barbican => {
                let client = http::build_client(&km.http)?;
                let keystone = km
                    .keystone
                    .clone()
                    .map(|k| Keystone::new(k, km.http.clone(), client.clone()))
                    .transpose()?;
                Box::new(Barbican::new(
                    km.barbican.clone(),
                    km.http.clone(),
                    client,
                    keystone,
                    &self.state_dir,
                )?)
            }
        };
        match &km.fixed_key {
            Some(hex) => Ok(Box::new(WithFixedKey::new(hex.expose(), inner)?)),
            None => Ok(inner),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn unknown_fields_are_errors_without_echoing_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.toml",
            "[key_manager]\nfixed_kee = \"00112233445566778899aabbccddeeff\"\n",
            0o600,
        );
        let e = Config::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("fixed_kee"), "{e}");
        assert!(!e.contains("00112233"), "{e}");
    }

    #[test]
    fn secrets_in_readable_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = "[key_manager]\nfixed_key = \"00112233445566778899aabbccddeeff\"\n";
        let p = write(d.path(), "b.toml", text, 0o644);
        let e = Config::load(&p, true);
        // Only meaningful when the test runs as root (the file is then
        // root-owned and only the mode is wrong).
        assert!(matches!(e, Err(ConfigError::Exposed { .. })), "{e:?}");
        let p = write(d.path(), "c.toml", text, 0o600);
        if nix_is_root() {
            assert!(Config::load(&p, true).is_ok());
        }
        let p = write(
            d.path(),
            "d.toml",
            "[key_manager]\nbackend = \"local\"\n",
            0o644,
        );
        assert!(Config::load(&p, true).is_ok(), "no secrets: any mode");
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../packaging/agent.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.key_manager.backend, Backend::Local);
        assert_eq!(cfg.key_manager.http.deadline_ms, 30000);
        assert_eq!(cfg.server.max_body_bytes, 65536);
        assert_eq!(cfg.server.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(cfg.run_dir, Path::new(DEFAULT_RUN_DIR));
        assert_eq!(cfg.libvirt.uri, "qemu:///system");
        assert!(!cfg.libvirt.persistent);
        assert_eq!(
            cfg.volume.format_intent_min_age_secs,
            DEFAULT_FORMAT_INTENT_MIN_AGE_SECS
        );
        let cfg: Config = toml::from_str("[volume]\nformat_intent_min_age_secs = 0\n").unwrap();
        assert_eq!(cfg.volume.format_intent_min_age_secs, 0);
        assert!(toml::from_str::<Config>("[volume]\nformat_intent_age = 0\n").is_err());
    }

    #[test]
    fn server_section_denies_unknown_fields() {
        let e = toml::from_str::<Config>("[server]\nallowed_uid = [1]\n").unwrap_err();
        assert!(e.to_string().contains("allowed_uid"), "{e}");
        let cfg: Config =
            toml::from_str("[server]\nallowed_uids = [107]\nlog_format = \"json\"\n").unwrap();
        assert_eq!(cfg.server.allowed_uids, vec![107]);
        assert_eq!(cfg.server.log_format, LogFormat::Json);
        assert_eq!(cfg.server.header_timeout_ms, 10_000);
    }

    #[test]
    fn crypt_options_parse_and_reach_the_table_options() {
        let cfg: Config = toml::from_str("").unwrap();
        assert_eq!(cfg.crypt.options(), CryptOptions::default());
        let cfg: Config =
            toml::from_str("[crypt]\nallow_discards = true\nno_write_workqueue = true\n").unwrap();
        let o = cfg.crypt.options();
        assert!(o.allow_discards && !o.no_read_workqueue && o.no_write_workqueue);
        assert_eq!(o.sector_size, 0, "the sector size comes from the header");
        let e = toml::from_str::<Config>("[crypt]\nallow_discard = true\n").unwrap_err();
        assert!(e.to_string().contains("allow_discard"), "{e}");
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let cfg = Config::load(Path::new("/nonexistent/luks-agent.toml"), false).unwrap();
        assert_eq!(cfg.key_manager.backend, Backend::Local);
        assert!(Config::load(Path::new("/nonexistent/luks-agent.toml"), true).is_err());
    }
}

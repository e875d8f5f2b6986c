//! Command-line definitions and the mapping from errors to exit codes.

mod docs_cmd;
mod keys_cmd;
mod luks_cmd;
mod secrets_cmd;
mod serve_cmd;
mod volume_cmd;

use clap::{Parser, Subcommand};

use luks_agent::config;
use luks_agent::daemon::client::{ClientError, RemoteError};
use luks_agent::daemon::errors::ApiError;
use luks_agent::keymgr::KeyError;
use luks_agent::libvirt::LibvirtError;
use luks_agent::luks::LuksError;
use luks_agent::luks::kdf::KdfError;
use luks_agent::volume::VolumeError;

/// Success.
pub const EXIT_OK: u8 = 0;
/// Usage error or invalid argument.
pub const EXIT_USAGE: u8 = 1;
/// No keyslot matches the passphrase.
pub const EXIT_WRONG_PASSPHRASE: u8 = 2;
/// Out of memory.
pub const EXIT_NO_MEMORY: u8 = 3;
/// Device unusable: not LUKS, damaged or invalid header, I/O error,
/// unsupported feature, too small.
pub const EXIT_DEVICE: u8 = 4;
/// Refused: would destroy a header or data, last keyslot, no free keyslot.
pub const EXIT_REFUSED: u8 = 5;
/// The key manager has no such key.
pub const EXIT_KEY_NOT_FOUND: u8 = 6;
/// The key manager refused the credentials or access to the key.
pub const EXIT_KEY_ACCESS: u8 = 7;
/// The key manager is unavailable or timed out (after retries).
pub const EXIT_KEY_UNAVAILABLE: u8 = 8;
/// The key manager answered nonsense or the key cannot be a volume key.
pub const EXIT_KEY_INVALID: u8 = 9;
/// The agent refused the caller, is stopping, or could not be talked to.
pub const EXIT_AGENT: u8 = 10;
/// libvirtd cannot be reached (libvirt mode).
pub const EXIT_LIBVIRT_UNAVAILABLE: u8 = 11;
/// libvirt refused or failed an operation on a secret (libvirt mode).
pub const EXIT_LIBVIRT: u8 = 12;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  usage error or invalid argument (including unreadable key files);
     the agent cannot start
  2  no keyslot matches the passphrase
  3  out of memory
  4  device unusable: not LUKS, invalid or damaged header, I/O error,
     unsupported feature, device too small
  5  refused: the device already holds a LUKS header, the keyslot is the
     last one, or no keyslot is free
  6  the key manager has no such key
  7  the key manager refused the credentials or access to the key
  8  the key manager is unavailable or timed out (after bounded retries)
  9  the key manager answered nonsense, or the key cannot be a volume key
 10  the agent (luks-agent serve) refused the caller, is shutting down, or
     could not be talked to
 11  libvirtd cannot be reached (--mode libvirt, secrets)
 12  libvirt refused or failed an operation on a secret

attach, detach, extend and status ask the agent when it answers on its
socket and act directly otherwise (or with --local); the exit codes are the
same either way.

Key material is read only from --key-file PATH or --key-file - (stdin),
never from the command line.";

/// luks-agent: LUKS volumes for OpenStack compute nodes, without cryptsetup.
#[derive(Parser, Debug)]
#[command(name = "luks-agent", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    /// The agent's API socket (default: [server] socket of the config).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    /// Log format (default: [server] log_format of the config).
    #[arg(long, global = true, value_enum)]
    log_format: Option<config::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read, unlock, format and manage keyslots of LUKS1/LUKS2 headers.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Luks(luks_cmd::LuksCommand),
    /// Attach an encrypted volume: fetch its key, format on first use,
    /// open a dm-crypt mapping; prints the device to use.
    #[command(after_help = EXIT_CODES_HELP)]
    Attach(volume_cmd::VolumeArgs),
    /// Detach an encrypted volume: remove its mapping, restore the device
    /// path.
    #[command(after_help = EXIT_CODES_HELP)]
    Detach(volume_cmd::VolumeArgs),
    /// Grow the mapping of an attached volume to its device's new size;
    /// prints the new decrypted size in bytes.
    #[command(after_help = EXIT_CODES_HELP)]
    Extend(volume_cmd::VolumeArgs),
    /// List dm-crypt mappings (ours and cryptsetup's).
    Status(volume_cmd::StatusArgs),
    /// For udev rules: print the volume id of one of our mappings.
    UdevId(volume_cmd::UdevIdArgs),
    /// List the libvirt secrets of QEMU-native volumes (never values).
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Secrets(secrets_cmd::SecretsCommand),
    /// Manage the local key store and check keys of the key manager.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Keys(keys_cmd::KeysCommand),
    /// Run the agent: an HTTP/JSON API on a Unix socket that attaches,
    /// detaches and extends volumes for its callers, until SIGTERM.
    Serve(serve_cmd::ServeArgs),
    /// Generate man pages or shell completions from this command line.
    #[command(subcommand)]
    Generate(docs_cmd::GenerateCommand),
}

/// Runs a parsed command; `Ok` carries the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    // Packaging runs this on build machines: no configuration involved.
    let command = match cli.command {
        Command::Generate(cmd) => return docs_cmd::run(cmd),
        other => other,
    };
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (std::path::PathBuf::from(config::DEFAULT_PATH), false),
    };
    let mut cfg = config::Config::load(&path, explicit)?;
    if let Some(socket) = cli.socket {
        cfg.server.socket = socket;
    }
    luks_agent::luks::kdf::set_unlock_time_limit(std::time::Duration::from_secs(
        cfg.kdf.max_unlock_seconds,
    ));
    let format = cli.log_format.unwrap_or(cfg.server.log_format);
    let serving = matches!(command, Command::Serve(_));
    // The agent logs one line per operation; one-shot commands only warn.
    luks_agent::daemon::logging::init(format, if serving { "info" } else { "warn" }, serving);
    match command {
        Command::Luks(cmd) => luks_cmd::run(cmd, &cfg),
        Command::Keys(cmd) => keys_cmd::run(cmd, &cfg),
        Command::Secrets(cmd) => secrets_cmd::run(cmd, &cfg),
        Command::Attach(a) => volume_cmd::attach(a, &cfg),
        Command::Detach(a) => volume_cmd::detach(a, &cfg),
        Command::Extend(a) => volume_cmd::extend(a, &cfg),
        Command::Status(a) => volume_cmd::status(a, &cfg),
        Command::Serve(a) => serve_cmd::run(a, &cfg),
        Command::UdevId(a) => volume_cmd::udev_id(a, &cfg),
        Command::Generate(cmd) => docs_cmd::run(cmd),
    }
}

/// Usage errors raised by command handlers (bad combinations of options,
/// unreadable key files).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The documented exit code for an error chain.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some()
        || err.downcast_ref::<config::ConfigError>().is_some()
        || err
            .downcast_ref::<luks_agent::daemon::server::ServeError>()
            .is_some()
    {
        return EXIT_USAGE;
    }
    if let Some(e) = err.downcast_ref::<KeyError>() {
        return keys_cmd::exit_code(e);
    }
    if let Some(e) = err.downcast_ref::<LibvirtError>() {
        return libvirt_exit_code(e);
    }
    // Volume errors go through the agent's error codes, so that a command
    // exits the same way whether it acted itself or the agent did.
    if let Some(e) = err.downcast_ref::<VolumeError>() {
        return exit_code_of_api(ApiError::volume_code(e));
    }
    if let Some(e) = err.downcast_ref::<RemoteError>() {
        return exit_code_of_api(&e.code);
    }
    if err.downcast_ref::<ClientError>().is_some() {
        return EXIT_AGENT;
    }
    match err.downcast_ref::<LuksError>() {
        Some(LuksError::WrongPassphrase { .. }) => EXIT_WRONG_PASSPHRASE,
        Some(LuksError::Refused { .. }) => EXIT_REFUSED,
        Some(LuksError::InvalidArgument { .. }) => EXIT_USAGE,
        Some(LuksError::Kdf {
            source: KdfError::Memory { .. },
            ..
        }) => EXIT_NO_MEMORY,
        Some(_) => EXIT_DEVICE,
        None => EXIT_DEVICE,
    }
}

fn libvirt_exit_code(e: &LibvirtError) -> u8 {
    match e {
        LibvirtError::Unavailable { .. } => EXIT_LIBVIRT_UNAVAILABLE,
        LibvirtError::Secret { .. } => EXIT_LIBVIRT,
    }
}

/// The exit code of an error code the agent answers with.
pub fn exit_code_of_api(code: &str) -> u8 {
    match code {
        "malformed_json" | "unknown_field" | "invalid_request" | "invalid_volume_id"
        | "payload_too_large" | "invalid_spec" | "invalid_key_id" | "unsupported"
        | "not_attached" | "key_manager_config" => EXIT_USAGE,
        "wrong_key" => EXIT_WRONG_PASSPHRASE,
        "out_of_memory" => EXIT_NO_MEMORY,
        "format_refused" | "refused" => EXIT_REFUSED,
        "key_not_found" => EXIT_KEY_NOT_FOUND,
        "key_access_denied" => EXIT_KEY_ACCESS,
        "key_manager_unavailable" | "key_manager_timeout" => EXIT_KEY_UNAVAILABLE,
        "key_manager_error" | "invalid_key_material" => EXIT_KEY_INVALID,
        "libvirt_unavailable" => EXIT_LIBVIRT_UNAVAILABLE,
        "libvirt_error" => EXIT_LIBVIRT,
        "forbidden" | "shutting_down" | "request_timeout" | "method_not_allowed" | "not_found" => {
            EXIT_AGENT
        }
        _ => EXIT_DEVICE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_code_has_a_documented_exit_code() {
        for (code, _) in luks_agent::daemon::errors::CODES {
            let exit = exit_code_of_api(code);
            assert!((1..=EXIT_LIBVIRT).contains(&exit), "{code}");
        }
        assert_eq!(
            exit_code_of_api("key_manager_timeout"),
            EXIT_KEY_UNAVAILABLE
        );
        assert_eq!(exit_code_of_api("format_refused"), EXIT_REFUSED);
        assert_eq!(exit_code_of_api("wrong_key"), EXIT_WRONG_PASSPHRASE);
        assert_eq!(exit_code_of_api("forbidden"), EXIT_AGENT);
    }

    #[test]
    fn local_and_remote_volume_errors_exit_alike() {
        let e = VolumeError::Key {
            volume_id: "v".into(),
            source: KeyError::NotFound {
                key_id: "k".into(),
                endpoint: "local".into(),
                status: 0,
            },
        };
        let code = ApiError::volume_code(&e);
        let local = exit_code(&anyhow::Error::new(e));
        let remote = exit_code(&anyhow::Error::new(RemoteError {
            status: 422,
            code: code.into(),
            message: String::new(),
        }));
        assert_eq!((local, remote), (EXIT_KEY_NOT_FOUND, EXIT_KEY_NOT_FOUND));
    }
}

//! Command-line definitions and the mapping from errors to exit codes.

mod keys_cmd;
mod luks_cmd;
mod secrets_cmd;
mod volume_cmd;

use clap::{Parser, Subcommand};

use luks_agent::config;
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
/// libvirtd cannot be reached (libvirt mode).
pub const EXIT_LIBVIRT_UNAVAILABLE: u8 = 10;
/// libvirt refused or failed an operation on a secret (libvirt mode).
pub const EXIT_LIBVIRT: u8 = 11;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  usage error or invalid argument (including unreadable key files)
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
 10  libvirtd cannot be reached (--mode libvirt, secrets)
 11  libvirt refused or failed an operation on a secret

Key material is read only from --key-file PATH or --key-file - (stdin),
never from the command line.";

/// luks-agent: LUKS volumes for OpenStack compute nodes, without cryptsetup.
#[derive(Parser, Debug)]
#[command(name = "luks-agent", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
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
}

/// Runs a parsed command; `Ok` carries the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (std::path::PathBuf::from(config::DEFAULT_PATH), false),
    };
    let cfg = config::Config::load(&path, explicit)?;
    match cli.command {
        Command::Luks(cmd) => luks_cmd::run(cmd, &cfg),
        Command::Keys(cmd) => keys_cmd::run(cmd, &cfg),
        Command::Secrets(cmd) => secrets_cmd::run(cmd, &cfg),
        Command::Attach(a) => volume_cmd::attach(a, &cfg),
        Command::Detach(a) => volume_cmd::detach(a, &cfg),
        Command::Extend(a) => volume_cmd::extend(a, &cfg),
        Command::Status(a) => volume_cmd::status(a),
        Command::UdevId(a) => volume_cmd::udev_id(a),
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
    {
        return EXIT_USAGE;
    }
    if let Some(e) = err.downcast_ref::<KeyError>() {
        return keys_cmd::exit_code(e);
    }
    if let Some(e) = err.downcast_ref::<LibvirtError>() {
        return libvirt_exit_code(e);
    }
    if let Some(e) = err.downcast_ref::<VolumeError>() {
        return match e {
            VolumeError::Libvirt { source, .. } => libvirt_exit_code(source),
            VolumeError::Key { source, .. } => keys_cmd::exit_code(source),
            VolumeError::Spec { .. } | VolumeError::Unsupported { .. } => EXIT_USAGE,
            VolumeError::Luks {
                source: LuksError::WrongPassphrase { .. },
                ..
            } => EXIT_WRONG_PASSPHRASE,
            VolumeError::FormatRefused { .. } => EXIT_REFUSED,
            _ => EXIT_DEVICE,
        };
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

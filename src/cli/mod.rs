//! Command-line definitions and the mapping from errors to exit codes.

mod docs_cmd;
mod image_cmd;
mod keys_cmd;
mod luks_cmd;
mod secrets_cmd;
mod serve_cmd;
mod volume_cmd;

use clap::{Parser, Subcommand};

use luks_agent::blockdev::DeviceError;
use luks_agent::config;
use luks_agent::image::ImageError;
use luks_agent::keymgr::KeyError;
use luks_agent::libvirt::LibvirtError;
use luks_agent::luks::LuksError;
use luks_agent::service::client::{ClientError, RemoteError};
use luks_agent::service::codes::{ApiCode, EXIT_DEVICE};
use luks_agent::volume::VolumeError;
use luks_agent::volume::id::InvalidVolumeId;

pub use luks_agent::service::codes::{EXIT_AGENT, EXIT_OK, EXIT_USAGE};
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
 13  image verify: the image is not signed (no signature properties)
 14  image verify: the signature does not match the image
 15  image verify: the signature properties are incomplete or invalid
 16  image verify: the signing certificate is not usable or not trusted

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
    /// Verify glance image signatures with certificates from the key
    /// manager, as nova and cinder do.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Image(image_cmd::ImageCommand),
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
    luks_agent::service::logging::init(format, if serving { "info" } else { "warn" }, serving);
    match command {
        Command::Luks(cmd) => luks_cmd::run(cmd, &cfg),
        Command::Keys(cmd) => keys_cmd::run(cmd, &cfg),
        Command::Secrets(cmd) => secrets_cmd::run(cmd, &cfg),
        Command::Image(cmd) => image_cmd::run(cmd, &cfg),
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

/// The documented exit code for an error chain: usage errors, then the
/// API code of the typed error (the same table the agent answers with, so
/// a command exits the same way whether it acted itself or the agent did).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some()
        || err.downcast_ref::<config::ConfigError>().is_some()
        || err
            .downcast_ref::<luks_agent::daemon::server::ServeError>()
            .is_some()
    {
        return EXIT_USAGE;
    }
    if let Some(e) = err.downcast_ref::<RemoteError>() {
        // A code this build does not know: the agent is newer; still an
        // error the agent reported.
        return ApiCode::from_name(&e.code).map_or(EXIT_AGENT, ApiCode::exit_code);
    }
    if err.downcast_ref::<ClientError>().is_some() {
        return EXIT_AGENT;
    }
    api_code(err).map_or(EXIT_DEVICE, ApiCode::exit_code)
}

/// The API code of a typed error of the lower layers, if it is one.
fn api_code(err: &anyhow::Error) -> Option<ApiCode> {
    if let Some(e) = err.downcast_ref::<VolumeError>() {
        return Some(ApiCode::of_volume(e));
    }
    if let Some(e) = err.downcast_ref::<KeyError>() {
        return Some(ApiCode::of_key(e));
    }
    if let Some(e) = err.downcast_ref::<ImageError>() {
        return Some(ApiCode::of_image(e));
    }
    if err.downcast_ref::<InvalidVolumeId>().is_some() {
        return Some(ApiCode::InvalidVolumeId);
    }
    if let Some(e) = err.downcast_ref::<LibvirtError>() {
        return Some(ApiCode::of_libvirt(e));
    }
    if let Some(e) = err.downcast_ref::<DeviceError>() {
        return Some(ApiCode::of_device(e));
    }
    err.downcast_ref::<LuksError>().map(ApiCode::of_luks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use luks_agent::dm::DmError;
    use luks_agent::image::ImageFailure;
    use luks_agent::image::certificate::CertificateError;
    use luks_agent::image::file::FileError;
    use luks_agent::image::properties::BadProperties;
    use luks_agent::volume::Failure;

    /// A local error for every code the volume layer and its key manager,
    /// engine and device checks can produce.
    fn local_errors() -> Vec<anyhow::Error> {
        let vol = |failure| anyhow::Error::new(VolumeError::new("v", failure));
        let image = |failure| {
            anyhow::Error::new(ImageError {
                image_id: "i".into(),
                failure,
            })
        };
        let key = |source| Failure::Key { source };
        let luks = |source| Failure::Luks { source };
        let dev = |source| Failure::Device { source };
        let io = std::io::Error::other;
        vec![
            anyhow::Error::new(
                luks_agent::volume::VolumeId::parse("..").expect_err("'..' is not a volume id"),
            ),
            vol(Failure::Spec {
                source: luks_agent::volume::SpecError::MissingKeyId,
            }),
            vol(key(KeyError::InvalidKeyId { key_id: "k".into() })),
            vol(key(KeyError::NotFound {
                key_id: "k".into(),
                endpoint: "e".into(),
                status: 404,
            })),
            vol(key(KeyError::Forbidden {
                key_id: "k".into(),
                endpoint: "e".into(),
                status: 403,
            })),
            vol(key(KeyError::Unavailable {
                key_id: "k".into(),
                endpoint: "e".into(),
                attempts: 1,
                last: "x".into(),
            })),
            vol(key(KeyError::TimedOut {
                key_id: "k".into(),
                endpoint: "e".into(),
                after: std::time::Duration::from_secs(1),
            })),
            vol(key(KeyError::Protocol {
                key_id: "k".into(),
                endpoint: "e".into(),
                status: 200,
                reason: "r".into(),
            })),
            vol(key(KeyError::Config("c".into()))),
            vol(Failure::KeyHold {
                source: KeyError::NotHeld {
                    key_id: "k".into(),
                    endpoint: "e".into(),
                    reason: "r".into(),
                },
            }),
            vol(key(KeyError::Local {
                key_id: "k".into(),
                op: "o".into(),
                path: "p".into(),
                source: io("x"),
            })),
            vol(luks(LuksError::WrongPassphrase {
                device: "/d".into(),
            })),
            vol(luks(LuksError::NotLuks {
                device: "/d".into(),
            })),
            vol(luks(LuksError::Refused {
                device: "/d".into(),
                reason: "r".into(),
            })),
            vol(luks(LuksError::Io {
                device: "/d".into(),
                op: "o".into(),
                source: io("x"),
            })),
            vol(luks(LuksError::Kdf {
                device: "/d".into(),
                what: "w".into(),
                source: luks_agent::luks::kdf::KdfError::Memory {
                    needed_kib: 1,
                    limit_kib: 0,
                },
            })),
            vol(Failure::FormatRefused {
                device: "/d".into(),
                reason: "r".into(),
            }),
            vol(Failure::Dm {
                source: DmError::Busy {
                    name: "m".into(),
                    attempts: 1,
                },
            }),
            vol(Failure::Dm {
                source: DmError::InvalidId {
                    what: "name",
                    value: "v".into(),
                },
            }),
            vol(dev(DeviceError::NotFound { path: "/d".into() })),
            vol(dev(DeviceError::NotADevice {
                path: "/d".into(),
                what: "a FIFO",
                files_allowed: false,
            })),
            vol(dev(DeviceError::TimedOut {
                path: "/d".into(),
                after: std::time::Duration::from_secs(1),
            })),
            vol(Failure::Io {
                op: luks_agent::volume::FileOp::Locking,
                path: "p".into(),
                source: io("x"),
            }),
            vol(Failure::NotAttached {
                mapping: "m".into(),
            }),
            vol(Failure::Unsupported { what: "w".into() }),
            image(ImageFailure::Properties(BadProperties("p".into()))),
            image(ImageFailure::Mismatch {
                certificate_id: "c".into(),
            }),
            image(ImageFailure::Certificate(CertificateError {
                id: "c".into(),
                reason: "r".into(),
            })),
            image(ImageFailure::File(FileError::Unusable {
                path: "p".into(),
                reason: "r".into(),
            })),
            image(ImageFailure::Key {
                certificate_id: "c".into(),
                source: KeyError::NotFound {
                    key_id: "c".into(),
                    endpoint: "e".into(),
                    status: 404,
                },
            }),
            vol(Failure::Libvirt {
                // Whatever libvirt says about a URI nobody serves, or that
                // libvirt.so is missing: unavailable either way.
                source: Box::new(
                    luks_agent::libvirt::Secrets::connect("luks-agent-test:///nowhere")
                        .err()
                        .expect("connected to a URI nobody serves"),
                ),
            }),
        ]
    }

    #[test]
    fn every_code_exits_alike_locally_and_through_the_agent() {
        let mut covered = std::collections::HashSet::new();
        for e in local_errors() {
            let code = api_code(&e).unwrap_or_else(|| panic!("no code for {e:#}"));
            let local = exit_code(&e);
            let remote = exit_code(&anyhow::Error::new(RemoteError {
                status: code.status(),
                code: code.name().into(),
                message: String::new(),
            }));
            assert_eq!(
                local,
                remote,
                "{}: local {local}, through the agent {remote}",
                code.name()
            );
            assert_eq!(local, code.exit_code(), "{}", code.name());
            covered.insert(code);
        }
        // Every code reaches the same exit code through the agent as the
        // table says; the codes only the server answers with are named.
        let server_only = [
            ApiCode::MalformedJson,
            ApiCode::UnknownField,
            ApiCode::InvalidRequest,
            ApiCode::Forbidden,
            ApiCode::NotFound,
            ApiCode::VolumeNotFound,
            ApiCode::MethodNotAllowed,
            ApiCode::RequestTimeout,
            ApiCode::PayloadTooLarge,
            ApiCode::Internal,
            ApiCode::RollbackFailed,
            ApiCode::InvalidKeyMaterial,
            ApiCode::InvalidSpec,
            ApiCode::DeviceUnusable,
            ApiCode::LibvirtError,
            ApiCode::TooManyConnections,
            ApiCode::ShuttingDown,
        ];
        for c in ApiCode::ALL {
            let remote = exit_code(&anyhow::Error::new(RemoteError {
                status: c.status(),
                code: c.name().into(),
                message: String::new(),
            }));
            assert_eq!(remote, c.exit_code(), "{}", c.name());
            assert!(
                covered.contains(c) || server_only.contains(c),
                "{}: no local error produces it and it is not listed as the server's own",
                c.name()
            );
        }
        // A code from a newer agent is still the agent's error.
        let newer = exit_code(&anyhow::Error::new(RemoteError {
            status: 500,
            code: "from_the_future".into(),
            message: String::new(),
        }));
        assert_eq!(newer, EXIT_AGENT);
    }
}

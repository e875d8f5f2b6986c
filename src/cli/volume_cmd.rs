//! `luks-agent attach | detach | extend | status`: volumes, as dm-crypt
//! mappings (`--mode dm`) or for QEMU to decrypt through a libvirt secret
//! (`--mode libvirt`). Each asks the agent when it answers on its socket,
//! and acts directly (as root) when no agent runs or with `--local`; both
//! run the same operation code, so output and exit codes are the same
//! either way.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use luks_agent::config::Config;
use luks_agent::keymgr::{RequestAuth, SecretString};
use luks_agent::service::api::{
    self, AttachResponse, DetachResponse, ExtendResponse, Mode, VolumeBody, VolumesResponse,
};
use luks_agent::service::client::{self, ClientError, RemoteError};
use luks_agent::service::codes::ApiCode;
use luks_agent::service::ops::{self, Op};
use luks_agent::service::{native_options, volume_options};
use luks_agent::volume::{EncryptionSpec, VolumeId, Volumes};

use super::{EXIT_OK, UsageError};

/// How long the CLI waits for the agent's answer: long enough for a
/// cryptsetup-strength KDF queued behind others and the key manager's own
/// deadline.
const AGENT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// Cinder volume id.
    #[arg(long)]
    volume_id: String,
    /// The connector's device path (a block device or a symlink to one).
    #[arg(long)]
    device: PathBuf,
    /// Cinder's encryption metadata as JSON.
    #[arg(
        long,
        conflicts_with = "encryption_file",
        required_unless_present = "encryption_file"
    )]
    encryption: Option<String>,
    /// File holding the encryption metadata JSON.
    #[arg(long, value_name = "PATH")]
    encryption_file: Option<PathBuf>,
    /// Multipath WWN of the device (an older mapping name).
    #[arg(long)]
    multipath_id: Option<String>,
    /// File with the caller's Keystone token (`-` for stdin); default: the
    /// agent's own credentials.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// File with a service token to send along with --token-file.
    #[arg(long, value_name = "PATH", requires = "token_file")]
    service_token_file: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Act directly, as root, even when the agent runs.
    #[arg(long)]
    local: bool,
    /// `dm`: a dm-crypt mapping on the host. `libvirt`: QEMU decrypts the
    /// volume itself with a passphrase held in a libvirt secret (provider
    /// `luks` only); attach prints the disk's `<encryption>` element.
    #[arg(long, value_enum, default_value_t = Mode::Dm)]
    mode: Mode,
    /// Detach in libvirt mode: leave the volume's secret defined (as nova
    /// does across a hard reboot).
    #[arg(long)]
    keep_secret: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Ask device-mapper directly, even when the agent runs.
    #[arg(long)]
    local: bool,
}

fn spec_text(a: &VolumeArgs) -> anyhow::Result<String> {
    Ok(match (&a.encryption, &a.encryption_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))?,
        (None, None) => {
            return Err(UsageError("--encryption or --encryption-file is required".into()).into());
        }
    })
}

fn spec_of(a: &VolumeArgs) -> anyhow::Result<EncryptionSpec> {
    Ok(EncryptionSpec::from_json(&spec_text(a)?).map_err(|e| UsageError(e.to_string()))?)
}

fn read_secret(p: &PathBuf) -> anyhow::Result<SecretString> {
    let f = std::fs::File::open(p)
        .map_err(|e| UsageError(format!("cannot open {}: {e}", p.display())))?;
    Ok(SecretString::from_reader(f)?
        .ok_or_else(|| UsageError(format!("{} is too large", p.display())))?)
}

fn auth_of(a: &VolumeArgs) -> anyhow::Result<RequestAuth> {
    Ok(match &a.token_file {
        None => RequestAuth::Service,
        Some(p) => RequestAuth::UserToken {
            token: read_secret(p)?,
            service_token: a.service_token_file.as_ref().map(read_secret).transpose()?,
        },
    })
}

/// The request body for the agent; the same checks of the arguments as a
/// direct run, so usage errors read the same.
fn body_of(a: &VolumeArgs) -> anyhow::Result<VolumeBody> {
    spec_of(a)?;
    let encryption: serde_json::Value =
        serde_json::from_str(&spec_text(a)?).map_err(|e| UsageError(e.to_string()))?;
    let auth = match auth_of(a)? {
        RequestAuth::Service => None,
        RequestAuth::UserToken {
            token,
            service_token,
        } => Some(api::Auth {
            token: api::Secret(token),
            service_token: service_token.map(api::Secret),
            unknown: Default::default(),
        }),
    };
    Ok(VolumeBody {
        device: a.device.clone(),
        encryption,
        multipath_id: a.multipath_id.clone(),
        auth,
        mode: a.mode,
        keep_secret: a.keep_secret,
        unknown: Default::default(),
    })
}

/// `--keep-secret` only means something for a detach in libvirt mode.
fn check_keep_secret(a: &VolumeArgs, op: Op) -> anyhow::Result<()> {
    if a.keep_secret && !(op == Op::Detach && a.mode == Mode::Libvirt) {
        return Err(
            UsageError("--keep-secret applies only to detach --mode libvirt".into()).into(),
        );
    }
    Ok(())
}

/// Runs `op` through the agent, or directly when none answers or with
/// `--local`; either way the answer is the API's response body.
fn run_op(a: &VolumeArgs, config: &Config, op: Op) -> anyhow::Result<serde_json::Value> {
    check_keep_secret(a, op)?;
    let body = body_of(a)?;
    // One runtime for asking the agent and, when none answers, acting here.
    let rt = runtime()?;
    if !a.local
        && let Some(out) = ask_agent::<serde_json::Value>(
            &rt,
            config,
            hyper::Method::POST,
            &volume_path(a, op.name()),
            Some(serde_json::to_vec(&body)?),
        )?
    {
        return Ok(out);
    }
    if !a.local && luks_agent::daemon::agent_process_alive(&config.server.socket) {
        // The socket is gone but an agent process lives on (stopping, or
        // stuck in the kernel): it may hold this volume's lock and be
        // halfway through an operation on it. Acting here would queue
        // behind that lock, or race what it left.
        return Err(RemoteError {
            status: 503,
            code: "shutting_down".into(),
            message: format!(
                "no agent answers on {0}, but the agent process serving {0} is still running (stopping): retry when it has exited, or pass --local to act directly",
                config.server.socket.display()
            ),
        }
        .into());
    }
    let vid = VolumeId::parse(&a.volume_id)?;
    let req = ops::request_of(&vid, &body).map_err(UsageError)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), volume_options(config));
    let native = native_options(config);
    let out = rt.block_on(ops::perform(
        &volumes,
        &native,
        op,
        a.mode,
        a.keep_secret,
        &req,
        None,
    ))?;
    Ok(out.body)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Asks the agent; `Ok(None)` when none listens (the caller acts itself).
fn ask_agent<T: serde::de::DeserializeOwned>(
    rt: &tokio::runtime::Runtime,
    config: &Config,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<Option<T>> {
    let socket = &config.server.socket;
    let answer = rt.block_on(client::request(socket, method, path, body, AGENT_TIMEOUT));
    match answer {
        Err(ClientError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
        Ok((status, bytes)) => Ok(Some(client::decode::<T>(status, &bytes)?)),
    }
}

fn volume_path(a: &VolumeArgs, op: &str) -> String {
    // Volume ids the agent accepts need no escaping; others are refused
    // by it with a clear error either way.
    let id: String = a
        .volume_id
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/v1/volumes/{id}/{op}")
}

/// The action as the human-readable line has always named it.
fn action_word(action: &str) -> &str {
    match action {
        "created" => "Created",
        "removed" => "Removed",
        "identity" => "Identity",
        "no_op" => "NoOp",
        other => other,
    }
}

fn print_attached(out: &AttachResponse, json: bool) -> anyhow::Result<u8> {
    if json {
        println!("{}", serde_json::to_string(out)?);
        return Ok(EXIT_OK);
    }
    let formatted = if out.formatted {
        ", formatted on first use"
    } else {
        ""
    };
    match (&out.encryption_xml, &out.secret_uuid) {
        (Some(xml), Some(uuid)) => {
            println!("{xml}");
            eprintln!(
                "volume {}: secret {uuid} {}{formatted} in {:.1} ms",
                out.volume_id, out.action, out.duration_ms
            );
        }
        _ => {
            println!("{}", out.path.display());
            eprintln!(
                "volume {}: {}{formatted} in {:.1} ms",
                out.volume_id,
                action_word(&out.action),
                out.duration_ms
            );
        }
    }
    Ok(EXIT_OK)
}

pub fn attach(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    let out: AttachResponse = serde_json::from_value(run_op(&a, config, Op::Attach)?)?;
    print_attached(&out, a.json)
}

fn print_detached(out: &DetachResponse, mode: Mode, json: bool) -> anyhow::Result<u8> {
    if json {
        println!("{}", serde_json::to_string(out)?);
    } else {
        let what = match (mode, out.action.as_str()) {
            (Mode::Dm, "removed" | "created") => "mapping removed",
            (Mode::Dm, "identity") => "was not attached",
            (Mode::Libvirt, "removed") => "secret undefined",
            (Mode::Libvirt, "kept") => "secret kept",
            (Mode::Libvirt, "absent") => "had no secret",
            _ => "nothing to do",
        };
        eprintln!(
            "volume {}: detached, {what}, in {:.1} ms",
            out.volume_id, out.duration_ms
        );
    }
    Ok(EXIT_OK)
}

pub fn detach(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    let out: DetachResponse = serde_json::from_value(run_op(&a, config, Op::Detach)?)?;
    print_detached(&out, a.mode, a.json)
}

fn print_extended(out: &ExtendResponse, json: bool) -> anyhow::Result<u8> {
    if json {
        println!("{}", serde_json::to_string(out)?);
    } else {
        println!("{}", out.new_size);
    }
    Ok(EXIT_OK)
}

pub fn extend(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    let out: ExtendResponse = serde_json::from_value(run_op(&a, config, Op::Extend)?)?;
    print_extended(&out, a.json)
}

#[derive(Args, Debug)]
pub struct UdevIdArgs {
    /// Device-mapper name of the mapping.
    #[arg(long)]
    dm_name: String,
}

/// For udev's IMPORT{program}: prints `LUKS_AGENT_VOLUME_ID=<id>` for a
/// mapping the agent made, nothing otherwise.
pub fn udev_id(a: UdevIdArgs, config: &Config) -> anyhow::Result<u8> {
    if let Some(id) = luks_agent::volume::volume_of_mapping(&config.run_dir, &a.dm_name) {
        println!("LUKS_AGENT_VOLUME_ID={id}");
    }
    Ok(EXIT_OK)
}

pub fn status(a: StatusArgs, config: &Config) -> anyhow::Result<u8> {
    // The agent's listing, or the same listing built here.
    let remote = if a.local {
        None
    } else {
        ask_agent::<VolumesResponse>(&runtime()?, config, hyper::Method::GET, "/v1/volumes", None)?
    };
    let listing = match remote {
        Some(l) => l,
        None => luks_agent::service::status::volumes_now(&config.run_dir, None),
    };
    if a.json {
        // Everything: attached volumes (with their keys' holds) and the
        // kernel's mappings, or why device-mapper could not be asked.
        println!("{}", serde_json::to_string(&listing)?);
        return Ok(EXIT_OK);
    }
    for v in &listing.volumes {
        let key = v.key.as_ref();
        println!(
            "volume\t{}\t{}\tkey={}\tconsumer={}\tfixed_key={}",
            v.volume_id,
            v.mode.name(),
            key.map_or("-", |k| k.key_id.as_str()),
            key.map_or("-", |k| if k.consumer { "yes" } else { "no" }),
            v.fixed_key.map_or("-", |f| if f { "yes" } else { "no" }),
        );
    }
    let maps = match listing {
        VolumesResponse {
            mappings: Some(m), ..
        } => m,
        VolumesResponse {
            device_mapper_error,
            ..
        } => {
            return Err(RemoteError {
                status: ApiCode::DeviceMapperError.status(),
                code: ApiCode::DeviceMapperError.name().into(),
                message: device_mapper_error.unwrap_or_default(),
            }
            .into());
        }
    };
    for m in maps {
        println!(
            "{}\t{}\t{}\topen={}",
            m.name, m.device, m.uuid, m.open_count
        );
    }
    Ok(EXIT_OK)
}

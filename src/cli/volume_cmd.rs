//! `luks-agent attach | detach | extend | status`: volumes, acting directly
//! as root, as dm-crypt mappings (`--mode dm`) or for QEMU to decrypt
//! through a libvirt secret (`--mode libvirt`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use luks_agent::config::Config;
use luks_agent::dm::{CryptOptions, DeviceMapper};
use luks_agent::keymgr::{RequestAuth, SecretString};
use luks_agent::libvirt::SecretFlags;
use luks_agent::volume::native::{NativeOptions, SecretAction};
use luks_agent::volume::{AttachRequest, EncryptionSpec, VolumeOptions, Volumes};

use super::{EXIT_OK, UsageError};

/// Default directory of locks and attach records.
const RUN_DIR: &str = "/run/luks-agent";

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

/// Where the decryption happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// dm-crypt on the host.
    Dm,
    /// QEMU's own LUKS driver, fed through a libvirt secret.
    Libvirt,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn options(config: &Config) -> VolumeOptions {
    VolumeOptions {
        state_dir: config.state_dir.clone(),
        run_dir: PathBuf::from(RUN_DIR),
        max_argon2_memory_kib: config.kdf.max_argon2_memory_kib,
        detach_attempts: 6,
        detach_backoff: Duration::from_millis(100),
        crypt: CryptOptions::default(),
    }
}

fn native_options(config: &Config) -> NativeOptions {
    NativeOptions {
        uri: config.libvirt.uri.clone(),
        flags: SecretFlags {
            ephemeral: !config.libvirt.persistent,
            private: true,
        },
    }
}

/// `--keep-secret` only means something for a detach in libvirt mode.
fn check_keep_secret(a: &VolumeArgs, detach: bool) -> anyhow::Result<()> {
    if a.keep_secret && !(detach && a.mode == Mode::Libvirt) {
        return Err(
            UsageError("--keep-secret applies only to detach --mode libvirt".into()).into(),
        );
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn attach_libvirt(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    let req = request_of(&a)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), options(config));
    let native = native_options(config);
    let started = Instant::now();
    let r = runtime()?.block_on(volumes.attach_native(&req, &native));
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match &r {
        Ok(out) => {
            tracing::info!(volume_id = a.volume_id, secret = ?out.secret, duration_ms = ms, "attach (libvirt)")
        }
        Err(e) => {
            tracing::info!(volume_id = a.volume_id, error = %e, duration_ms = ms, "attach (libvirt) failed")
        }
    }
    let out = r?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume_id": a.volume_id, "mode": "libvirt", "path": out.path, "secret_uuid": out.secret_uuid, "encryption_xml": out.encryption_xml, "secret": out.secret, "ephemeral": out.flags.map(|f| f.ephemeral), "private": out.flags.map(|f| f.private), "formatted": out.formatted, "duration_ms": ms})
        );
    } else {
        match &out.encryption_xml {
            Some(xml) => println!("{xml}"),
            None => println!("{}", out.path.display()),
        }
        eprintln!(
            "volume {}: secret {} ({:?}){} in {ms:.1} ms",
            a.volume_id,
            out.secret_uuid.as_deref().unwrap_or("-"),
            out.secret,
            if out.formatted {
                ", formatted on first use"
            } else {
                ""
            }
        );
    }
    Ok(EXIT_OK)
}

fn detach_libvirt(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    let spec = spec_of(&a)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), options(config));
    let started = Instant::now();
    let out = volumes.detach_native(&a.volume_id, &spec, &native_options(config), a.keep_secret)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume_id": a.volume_id, "mode": "libvirt", "secret_uuid": out.secret_uuid, "secret": out.secret, "duration_ms": ms})
        );
    } else {
        let what = match out.secret {
            SecretAction::Removed => "secret undefined",
            SecretAction::Kept => "secret kept",
            SecretAction::NoOp => "nothing to do",
            _ => "had no secret",
        };
        eprintln!("volume {}: detached, {what}, in {ms:.1} ms", a.volume_id);
    }
    Ok(EXIT_OK)
}

fn extend_libvirt(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    let req = request_of(&a)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), options(config));
    let out = volumes.extend_native(&req)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume_id": a.volume_id, "mode": "libvirt", "device_size": out.device_size, "payload_offset": out.payload_offset, "new_size": out.new_size})
        );
    } else {
        println!("{}", out.new_size);
    }
    Ok(EXIT_OK)
}

fn spec_of(a: &VolumeArgs) -> anyhow::Result<EncryptionSpec> {
    let text = match (&a.encryption, &a.encryption_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))?,
        (None, None) => {
            return Err(UsageError("--encryption or --encryption-file is required".into()).into());
        }
    };
    Ok(EncryptionSpec::from_json(&text).map_err(|e| UsageError(e.to_string()))?)
}

fn auth_of(a: &VolumeArgs) -> anyhow::Result<RequestAuth> {
    let read = |p: &PathBuf| -> anyhow::Result<SecretString> {
        let f = std::fs::File::open(p)
            .map_err(|e| UsageError(format!("cannot open {}: {e}", p.display())))?;
        Ok(SecretString::from_reader(f)?
            .ok_or_else(|| UsageError(format!("{} is too large", p.display())))?)
    };
    Ok(match &a.token_file {
        None => RequestAuth::Service,
        Some(p) => RequestAuth::UserToken {
            token: read(p)?,
            service_token: a.service_token_file.as_ref().map(read).transpose()?,
        },
    })
}

fn request_of(a: &VolumeArgs) -> anyhow::Result<AttachRequest> {
    Ok(AttachRequest {
        volume_id: a.volume_id.clone(),
        device_path: a.device.clone(),
        spec: spec_of(a)?,
        multipath_id: a.multipath_id.clone(),
        auth: auth_of(a)?,
    })
}

pub fn attach(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    check_keep_secret(&a, false)?;
    if a.mode == Mode::Libvirt {
        return attach_libvirt(a, config);
    }
    let req = request_of(&a)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), options(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let r = rt.block_on(volumes.attach(&req));
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match &r {
        Ok(out) => {
            tracing::info!(volume_id = a.volume_id, outcome = ?out.action, duration_ms = ms, "attach")
        }
        Err(e) => {
            tracing::info!(volume_id = a.volume_id, error = %e, duration_ms = ms, "attach failed")
        }
    }
    let out = r?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume_id": a.volume_id, "path": out.path, "mapping": out.mapping, "action": out.action, "formatted": out.formatted, "duration_ms": ms})
        );
    } else {
        println!("{}", out.path.display());
        eprintln!(
            "volume {}: {:?}{} in {ms:.1} ms",
            a.volume_id,
            out.action,
            if out.formatted {
                ", formatted on first use"
            } else {
                ""
            }
        );
    }
    Ok(EXIT_OK)
}

pub fn detach(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    check_keep_secret(&a, true)?;
    if a.mode == Mode::Libvirt {
        return detach_libvirt(a, config);
    }
    let spec = spec_of(&a)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), options(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let out =
        rt.block_on(volumes.detach(&a.volume_id, &a.device, &spec, a.multipath_id.as_deref()))?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume_id": a.volume_id, "mapping": out.mapping, "action": out.action, "duration_ms": ms})
        );
    } else {
        let what = match out.action {
            luks_agent::volume::Action::Removed | luks_agent::volume::Action::Created => {
                "mapping removed"
            }
            luks_agent::volume::Action::Identity => "was not attached",
            luks_agent::volume::Action::NoOp => "nothing to do",
        };
        eprintln!("volume {}: detached, {what}, in {ms:.1} ms", a.volume_id);
    }
    Ok(EXIT_OK)
}

pub fn extend(a: VolumeArgs, config: &Config) -> anyhow::Result<u8> {
    check_keep_secret(&a, false)?;
    if a.mode == Mode::Libvirt {
        return extend_libvirt(a, config);
    }
    let req = request_of(&a)?;
    let keys = config.key_manager()?;
    let volumes = Volumes::new(keys.as_ref(), options(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(volumes.extend(&req))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume_id": a.volume_id, "mapping": out.mapping, "new_size": out.new_size})
        );
    } else {
        println!("{}", out.new_size);
    }
    Ok(EXIT_OK)
}

#[derive(Args, Debug)]
pub struct UdevIdArgs {
    /// Device-mapper name of the mapping.
    #[arg(long)]
    dm_name: String,
}

/// For udev's IMPORT{program}: prints `LUKS_AGENT_VOLUME_ID=<id>` for a
/// mapping the agent made, nothing otherwise.
pub fn udev_id(a: UdevIdArgs) -> anyhow::Result<u8> {
    if let Some(id) =
        luks_agent::volume::volume_of_mapping(std::path::Path::new(RUN_DIR), &a.dm_name)
    {
        println!("LUKS_AGENT_VOLUME_ID={id}");
    }
    Ok(EXIT_OK)
}

pub fn status(a: StatusArgs) -> anyhow::Result<u8> {
    let dm = DeviceMapper::open()?;
    let maps = dm.list("CRYPT-")?;
    if a.json {
        let v: Vec<_> = maps.iter().map(|m| serde_json::json!({"name": m.name, "uuid": m.uuid, "device": m.device, "open_count": m.open_count})).collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for m in maps {
            println!(
                "{}\t{}\t{}\topen={}",
                m.name, m.device, m.uuid, m.open_count
            );
        }
    }
    Ok(EXIT_OK)
}

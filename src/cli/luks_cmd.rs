//! `luks-agent luks ...`: cryptsetup-like header commands.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use uuid::Uuid;

use luks_agent::blockdev;
use luks_agent::config::Config;
use luks_agent::luks::{
    self, Argon2Variant, CipherSpec, FileDisk, FormatOptions, HashAlg, Header, Kdf, KdfKind,
    KdfLimits, KdfPolicy, LuksError, LuksVersion,
};
use luks_agent::secret::{Passphrase, SecretBytes};

use super::{EXIT_OK, UsageError};

#[derive(Subcommand, Debug)]
pub enum LuksCommand {
    /// Write a new LUKS header (like `cryptsetup luksFormat`).
    Format(FormatArgs),
    /// Print header fields (like `cryptsetup luksDump`).
    Dump(DumpArgs),
    /// Check a passphrase: exit 0 if a keyslot opens, 2 if none does.
    TestPassphrase(UnlockArgs),
    /// Add a keyslot for a new passphrase (like `cryptsetup luksAddKey`).
    AddKey(AddKeyArgs),
    /// Remove a keyslot (like `cryptsetup luksRemoveKey`/`luksKillSlot`).
    RemoveKey(RemoveKeyArgs),
    /// Replace a passphrase: add the new keyslot, verify it, remove the old.
    ChangeKey(AddKeyArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TypeArg {
    Luks1,
    Luks2,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum PbkdfArg {
    Pbkdf2,
    Argon2id,
    Argon2i,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum KdfPolicyArg {
    /// pbkdf2-sha256, 1000 iterations: only for a passphrase that is the hex
    /// of a key manager's key of >= 128 bits.
    HighEntropy,
    /// cryptsetup-strength parameters chosen by benchmark (the default).
    Strong,
}

#[derive(Args, Debug)]
struct KeyFileArg {
    /// File holding the passphrase, or `-` for stdin. Read whole, nothing
    /// stripped.
    #[arg(long, value_name = "PATH")]
    key_file: PathBuf,
}

#[derive(Args, Debug)]
struct KdfArgs {
    /// KDF choice: `high-entropy` or `strong` (default; or the explicit
    /// --pbkdf options).
    #[arg(long, value_enum)]
    kdf_policy: Option<KdfPolicyArg>,
    /// KDF for the new keyslot (default: pbkdf2 for LUKS1, argon2id for
    /// LUKS2).
    #[arg(long, value_enum)]
    pbkdf: Option<PbkdfArg>,
    /// Fixed iteration count (Argon2: time cost) instead of a benchmark.
    #[arg(long, value_name = "N")]
    pbkdf_force_iterations: Option<u32>,
    /// Argon2 memory cost in KiB (with a benchmark: the upper bound;
    /// default `[kdf] max_argon2_memory_kib` of the configuration, 1 GiB).
    #[arg(long, value_name = "KIB")]
    pbkdf_memory: Option<u32>,
    /// Argon2 lanes.
    #[arg(long, value_name = "N")]
    pbkdf_parallel: Option<u32>,
    /// Benchmark target in milliseconds (default 2000).
    #[arg(long, value_name = "MS")]
    iter_time: Option<u64>,
}

#[derive(Args, Debug)]
pub struct FormatArgs {
    /// LUKS version.
    #[arg(long = "type", value_enum, default_value = "luks2")]
    luks_type: TypeArg,
    /// Cipher specification.
    #[arg(long, default_value = "aes-xts-plain64")]
    cipher: String,
    /// Volume key size in bits (XTS: 256 = AES-128-XTS, 512 = AES-256-XTS;
    /// the default is cryptsetup's).
    #[arg(long, default_value_t = 512)]
    key_size: usize,
    /// Hash for PBKDF2, AF and the key digest.
    #[arg(long, default_value = "sha256")]
    hash: String,
    #[command(flatten)]
    kdf: KdfArgs,
    /// Keyslot for the passphrase.
    #[arg(long, value_name = "N")]
    key_slot: Option<u32>,
    /// Volume UUID (default: random).
    #[arg(long)]
    uuid: Option<Uuid>,
    /// LUKS2 encryption sector size (default as cryptsetup: 4096 for image
    /// files, the physical block size for block devices).
    #[arg(long)]
    sector_size: Option<u32>,
    /// LUKS2 metadata (header) size in bytes.
    #[arg(long = "luks2-metadata-size", value_name = "BYTES")]
    metadata_size: Option<u64>,
    /// LUKS2 keyslots area size in bytes.
    #[arg(long = "luks2-keyslots-size", value_name = "BYTES")]
    keyslots_size: Option<u64>,
    /// LUKS2: record this key manager key id in a `luks-agent` token.
    #[arg(long, value_name = "ID")]
    key_id: Option<String>,
    /// Format even if the device holds a LUKS header, a file system or other
    /// data (destroys it).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    key: KeyFileArg,
    /// Block device or image file.
    device: PathBuf,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also print the volume key (needs --key-file). Anyone who sees it can
    /// decrypt the volume.
    #[arg(long, requires = "key_file")]
    dump_volume_key: bool,
    /// Passphrase file for --dump-volume-key.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Block device or image file.
    device: PathBuf,
}

#[derive(Args, Debug)]
pub struct UnlockArgs {
    #[command(flatten)]
    key: KeyFileArg,
    /// Try only this keyslot.
    #[arg(long, value_name = "N")]
    key_slot: Option<u32>,
    /// Block device or image file.
    device: PathBuf,
}

#[derive(Args, Debug)]
pub struct AddKeyArgs {
    #[command(flatten)]
    key: KeyFileArg,
    /// File holding the new passphrase (`-` for stdin).
    #[arg(long, value_name = "PATH")]
    new_key_file: PathBuf,
    /// Keyslot for the new passphrase (default: first free).
    #[arg(long, value_name = "N")]
    key_slot: Option<u32>,
    #[command(flatten)]
    kdf: KdfArgs,
    /// Block device or image file.
    device: PathBuf,
}

#[derive(Args, Debug)]
pub struct RemoveKeyArgs {
    #[command(flatten)]
    key: KeyFileArg,
    /// Remove this keyslot; the passphrase must open another one.
    #[arg(long, value_name = "N")]
    key_slot: Option<u32>,
    /// Block device or image file.
    device: PathBuf,
}

pub fn run(cmd: LuksCommand, config: &Config) -> anyhow::Result<u8> {
    match cmd {
        LuksCommand::Format(a) => format(a, config),
        LuksCommand::Dump(a) => dump(a, config),
        LuksCommand::TestPassphrase(a) => test_passphrase(a, config),
        LuksCommand::AddKey(a) => add_key(a, false, config),
        LuksCommand::ChangeKey(a) => add_key(a, true, config),
        LuksCommand::RemoveKey(a) => remove_key(a, config),
    }
}

fn read_passphrase(path: &Path) -> anyhow::Result<Passphrase> {
    let shown = path.display();
    let secret = if path == Path::new("-") {
        SecretBytes::read_all(std::io::stdin().lock())
    } else {
        let f = File::open(path)
            .map_err(|e| UsageError(format!("cannot open key file {shown}: {e}")))?;
        SecretBytes::read_all(f)
    }
    .map_err(|e| UsageError(format!("cannot read key file {shown}: {e}")))?
    .ok_or_else(|| {
        UsageError(format!(
            "key file {shown} is larger than {} bytes",
            luks_agent::secret::MAX_PASSPHRASE_LEN
        ))
    })?;
    if secret.is_empty() {
        return Err(UsageError(format!("key file {shown} is empty")).into());
    }
    Ok(Passphrase::new(secret))
}

/// Opens a block device or image file (never a FIFO, character device or
/// directory), giving up after the configured device open timeout.
fn open_disk(path: &Path, writable: bool, config: &Config) -> anyhow::Result<FileDisk> {
    let file = blockdev::open_device(
        path,
        writable,
        blockdev::Accept::BlockOrFile,
        std::time::Duration::from_millis(config.volume.device_open_timeout_ms),
    )?;
    Ok(FileDisk::new(file, blockdev::device::shown(path)))
}

fn kdf_policy(
    args: &KdfArgs,
    version: LuksVersion,
    hash: HashAlg,
    memory_cap_kib: u32,
) -> anyhow::Result<KdfPolicy> {
    let explicit = args.pbkdf.is_some()
        || args.pbkdf_force_iterations.is_some()
        || args.pbkdf_memory.is_some()
        || args.pbkdf_parallel.is_some()
        || args.iter_time.is_some();
    if args.kdf_policy == Some(KdfPolicyArg::HighEntropy) {
        if explicit {
            return Err(UsageError(
                "--kdf-policy high-entropy cannot be combined with --pbkdf options".into(),
            )
            .into());
        }
        return Ok(KdfPolicy::HighEntropyKey);
    }
    let pbkdf = args.pbkdf.unwrap_or(match version {
        LuksVersion::Luks1 => PbkdfArg::Pbkdf2,
        LuksVersion::Luks2 => PbkdfArg::Argon2id,
    });
    if version == LuksVersion::Luks1 && pbkdf != PbkdfArg::Pbkdf2 {
        return Err(UsageError("LUKS1 supports only --pbkdf pbkdf2".into()).into());
    }
    let kind = match pbkdf {
        PbkdfArg::Pbkdf2 => KdfKind::Pbkdf2(hash),
        PbkdfArg::Argon2id => KdfKind::Argon2(Argon2Variant::Argon2id),
        PbkdfArg::Argon2i => KdfKind::Argon2(Argon2Variant::Argon2i),
    };
    let parallel = args.pbkdf_parallel.unwrap_or_else(luks::default_parallel);
    let memory = args.pbkdf_memory.unwrap_or(memory_cap_kib);
    Ok(match (args.pbkdf_force_iterations, kind) {
        (Some(iterations), KdfKind::Pbkdf2(hash)) => {
            KdfPolicy::Fixed(Kdf::Pbkdf2 { hash, iterations })
        }
        (Some(time), KdfKind::Argon2(variant)) => KdfPolicy::Fixed(Kdf::Argon2 {
            variant,
            time,
            memory_kib: memory,
            parallel,
        }),
        (None, kind) => KdfPolicy::Benchmark {
            kind,
            iter_time: Duration::from_millis(args.iter_time.unwrap_or(2000)),
            max_memory_kib: memory,
            parallel,
        },
    })
}

fn format(a: FormatArgs, config: &Config) -> anyhow::Result<u8> {
    let version = match a.luks_type {
        TypeArg::Luks1 => LuksVersion::Luks1,
        TypeArg::Luks2 => LuksVersion::Luks2,
    };
    let hash = HashAlg::parse(&a.hash)
        .ok_or_else(|| UsageError(format!("unsupported hash '{}'", a.hash)))?;
    if !a.key_size.is_multiple_of(8) {
        return Err(UsageError(format!(
            "key size {} is not a whole number of bytes",
            a.key_size
        ))
        .into());
    }
    let cipher =
        CipherSpec::parse(&a.cipher, a.key_size / 8).map_err(|e| UsageError(e.to_string()))?;
    let passphrase = read_passphrase(&a.key.key_file)?;
    let kdf = kdf_policy(&a.kdf, version, hash, config.kdf.max_argon2_memory_kib)?;
    let disk = open_disk(&a.device, true, config)?;
    if !a.force {
        match Header::read(&disk) {
            Err(LuksError::NotLuks { .. }) => {}
            Ok(_) | Err(LuksError::InvalidHeader { .. }) | Err(LuksError::Unsupported { .. }) => {
                return Err(LuksError::Refused {
                    device: disk_name(&a.device),
                    reason: "the device already holds a LUKS header; use --force to destroy it"
                        .into(),
                }
                .into());
            }
            Err(LuksError::TooSmall { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // What attach's guard refuses, format refuses too: a file system,
        // a partition table, any known signature, or data where the probe
        // looks. `--force` is the operator saying it may all go.
        let device = disk_name(&a.device);
        let found = luks_agent::blockdev::probe::probe(&disk).map_err(|source| LuksError::Io {
            device: device.clone(),
            op: "probing".into(),
            source,
        })?;
        if !luks_agent::blockdev::probe::is_blank(&found) {
            let what = found
                .iter()
                .map(|s| format!("{} at offset {}", s.what, s.offset))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(LuksError::Refused {
                device,
                reason: format!(
                    "the device is not blank: {what}; use --force to destroy what it holds"
                ),
            }
            .into());
        }
    }
    let opts = FormatOptions {
        version,
        cipher,
        hash,
        kdf,
        keyslot: a.key_slot,
        uuid: a.uuid,
        sector_size: a
            .sector_size
            .unwrap_or_else(|| blockdev::default_encryption_sector_size(disk.file())),
        metadata_size: a.metadata_size,
        keyslots_size: a.keyslots_size,
        key_id: a.key_id,
    };
    let (header, _key) = luks::format(&disk, &opts, &passphrase)?;
    eprintln!(
        "{}: formatted as LUKS{} (uuid {})",
        disk_name(&a.device),
        if version == LuksVersion::Luks1 { 1 } else { 2 },
        header.uuid()
    );
    Ok(EXIT_OK)
}

fn disk_name(p: &Path) -> String {
    blockdev::device::shown(p)
}

fn dump(a: DumpArgs, config: &Config) -> anyhow::Result<u8> {
    let disk = open_disk(&a.device, false, config)?;
    let header = Header::read(&disk)?;
    let key = match (&a.key_file, a.dump_volume_key) {
        (Some(path), true) => {
            let passphrase = read_passphrase(path)?;
            Some(header.unlock(&disk, &passphrase, None, &KdfLimits::default())?)
        }
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = luks::dump::to_json(&header);
        if let Some(u) = &key {
            let hex = u.volume_key.to_hex();
            v["volume_key"] =
                serde_json::Value::String(String::from_utf8_lossy(hex.expose()).into_owned());
            v["volume_key_slot"] = serde_json::json!(u.keyslot);
        }
        writeln!(out, "{v}")?;
    } else {
        write!(
            out,
            "{}",
            luks::dump::to_text(&header, &disk_name(&a.device))
        )?;
        if let Some(u) = &key {
            let hex = u.volume_key.to_hex();
            out.write_all(b"Volume key: ")?;
            out.write_all(hex.expose())?;
            out.write_all(b"\n")?;
        }
    }
    Ok(EXIT_OK)
}

fn test_passphrase(a: UnlockArgs, config: &Config) -> anyhow::Result<u8> {
    let passphrase = read_passphrase(&a.key.key_file)?;
    let disk = open_disk(&a.device, false, config)?;
    let header = Header::read(&disk)?;
    let unlocked = header.unlock(&disk, &passphrase, a.key_slot, &KdfLimits::default())?;
    eprintln!(
        "{}: keyslot {} unlocked",
        disk_name(&a.device),
        unlocked.keyslot
    );
    Ok(EXIT_OK)
}

fn hash_of(header: &Header) -> HashAlg {
    match header {
        Header::Luks1(h) => h.hash,
        Header::Luks2(_) => HashAlg::Sha256,
    }
}

fn add_key(a: AddKeyArgs, remove_old: bool, config: &Config) -> anyhow::Result<u8> {
    if a.key.key_file == Path::new("-") && a.new_key_file == Path::new("-") {
        return Err(
            UsageError("only one of --key-file and --new-key-file can be stdin".into()).into(),
        );
    }
    let old = read_passphrase(&a.key.key_file)?;
    let new = read_passphrase(&a.new_key_file)?;
    let disk = open_disk(&a.device, true, config)?;
    let mut header = Header::read(&disk)?;
    let limits = KdfLimits::default();
    let unlocked = header.unlock(&disk, &old, None, &limits)?;
    let policy = kdf_policy(
        &a.kdf,
        header.version(),
        hash_of(&header),
        config.kdf.max_argon2_memory_kib,
    )?;
    let slot = header
        .add_keyslot(
            &disk,
            &unlocked.volume_key,
            &new,
            a.key_slot,
            &policy,
            &limits,
        )
        .context("adding the new keyslot")?;
    eprintln!("{}: added keyslot {slot}", disk_name(&a.device));
    if remove_old {
        header
            .remove_keyslot(&disk, unlocked.keyslot)
            .context("removing the old keyslot")?;
        eprintln!(
            "{}: removed keyslot {}",
            disk_name(&a.device),
            unlocked.keyslot
        );
    }
    Ok(EXIT_OK)
}

fn remove_key(a: RemoveKeyArgs, config: &Config) -> anyhow::Result<u8> {
    let passphrase = read_passphrase(&a.key.key_file)?;
    let disk = open_disk(&a.device, true, config)?;
    let mut header = Header::read(&disk)?;
    let limits = KdfLimits::default();
    let target = match a.key_slot {
        None => header.unlock(&disk, &passphrase, None, &limits)?.keyslot,
        Some(slot) => {
            // The passphrase must prove authority through another slot.
            let others: Vec<u32> = header
                .keyslots()
                .iter()
                .map(|k| k.slot)
                .filter(|s| *s != slot)
                .collect();
            let mut proven = false;
            for other in others {
                match header.unlock(&disk, &passphrase, Some(other), &limits) {
                    Ok(_) => {
                        proven = true;
                        break;
                    }
                    Err(LuksError::WrongPassphrase { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            if !proven {
                return Err(LuksError::WrongPassphrase {
                    device: disk_name(&a.device),
                }
                .into());
            }
            slot
        }
    };
    header.remove_keyslot(&disk, target)?;
    eprintln!("{}: removed keyslot {target}", disk_name(&a.device));
    Ok(EXIT_OK)
}

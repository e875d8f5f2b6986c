//! `luks-agent keys ...`: the local key store and key manager checks.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use luks_agent::config::Config;
use luks_agent::keymgr::{KeyId, RequestAuth, SecretKind, SecretString};

use super::{EXIT_OK, UsageError};
use luks_agent::service::codes::EXIT_REFUSED;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a random key in the local key store and print its id.
    Create(CreateArgs),
    /// List the keys of the local key store (ids and sizes, never keys).
    List,
    /// Delete a key from the local key store.
    Delete(KeyIdArg),
    /// Store an X.509 certificate (PEM or DER) in the local key store,
    /// for image signatures; prints its new id.
    ImportCertificate(ImportCertificateArgs),
    /// Fetch a key from the configured key manager and say whether it can
    /// open a volume. Prints metadata only, unless --reveal.
    Fetch(FetchArgs),
    /// Say whether an attached volume on this host uses nova's legacy fixed
    /// key (the all-zeros key id). Exits 0 only when none does, so that
    /// `fixed_key` can go from the configuration; else names the volumes
    /// that still depend on it (exit 5).
    FixedKeyInUse,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Key size in bits.
    #[arg(long, default_value_t = 256)]
    bits: usize,
}

#[derive(Args, Debug)]
pub struct ImportCertificateArgs {
    /// The certificate file (`-`: stdin).
    #[arg(value_name = "PATH")]
    file: PathBuf,
}

#[derive(Args, Debug)]
pub struct KeyIdArg {
    /// Key id (UUID or secret href).
    #[arg(long)]
    key_id: String,
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Key id (UUID, secret href, or the legacy all-zero id).
    #[arg(long)]
    key_id: String,
    /// Only check: print nothing but the verdict line.
    #[arg(long)]
    check: bool,
    /// Also print the LUKS passphrase derived from the key. Anyone who sees
    /// it can open the volume.
    #[arg(long)]
    reveal: bool,
    /// File holding a user's Keystone token to fetch with (instead of the
    /// agent's own credentials); `-` for stdin.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// File holding a service token to send along with --token-file.
    #[arg(long, value_name = "PATH", requires = "token_file")]
    service_token_file: Option<PathBuf>,
}

pub fn run(cmd: KeysCommand, config: &Config) -> anyhow::Result<u8> {
    match cmd {
        KeysCommand::Create(a) => {
            let id = config.local_store().create(a.bits)?;
            println!("{id}");
            Ok(EXIT_OK)
        }
        KeysCommand::List => {
            for k in config.local_store().list()? {
                println!("{}\t{} bits", k.id, k.bits);
            }
            Ok(EXIT_OK)
        }
        KeysCommand::Delete(a) => {
            let id = KeyId::new(&a.key_id)?;
            config.local_store().delete(&id)?;
            eprintln!("deleted key {id}");
            Ok(EXIT_OK)
        }
        KeysCommand::ImportCertificate(a) => {
            let payload = if a.file == Path::new("-") {
                let mut v = vec![];
                std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut v)
                    .map_err(|e| UsageError(format!("cannot read stdin: {e}")))?;
                v
            } else {
                std::fs::read(&a.file)
                    .map_err(|e| UsageError(format!("cannot read {}: {e}", a.file.display())))?
            };
            let id = config.local_store().import_certificate(&payload)?;
            println!("{id}");
            Ok(EXIT_OK)
        }
        KeysCommand::Fetch(a) => fetch(a, config),
        KeysCommand::FixedKeyInUse => fixed_key_in_use(config),
    }
}

/// Reads this host's attach records (no agent or key manager needed): a
/// volume attached before keys were recorded counts as unknown, which is
/// not safe either.
fn fixed_key_in_use(config: &Config) -> anyhow::Result<u8> {
    let listing = luks_agent::service::status::volumes_now(&config.run_dir, None);
    let (mut using, mut unknown) = (vec![], vec![]);
    for v in &listing.volumes {
        match v.fixed_key {
            Some(true) => using.push(v.volume_id.as_str()),
            Some(false) => {}
            None => unknown.push(v.volume_id.as_str()),
        }
    }
    if using.is_empty() && unknown.is_empty() {
        println!(
            "no attached volume uses the fixed key ({} attached); fixed_key can be removed from this host's configuration",
            listing.volumes.len()
        );
        return Ok(EXIT_OK);
    }
    if !using.is_empty() {
        println!(
            "the fixed key is in use by {} attached volume(s): {}",
            using.len(),
            using.join(" ")
        );
    }
    if !unknown.is_empty() {
        println!(
            "the key of {} attached volume(s) is not recorded (attached by an older agent; detach and attach again to record it): {}",
            unknown.len(),
            unknown.join(" ")
        );
    }
    Ok(EXIT_REFUSED)
}

pub(super) fn read_token(path: &Path) -> anyhow::Result<SecretString> {
    let shown = path.display();
    let token = if path == Path::new("-") {
        SecretString::from_reader(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(path)
            .map_err(|e| UsageError(format!("cannot open token file {shown}: {e}")))?;
        SecretString::from_reader(f)
    }
    .map_err(|e| UsageError(format!("cannot read token file {shown}: {e}")))?
    .ok_or_else(|| UsageError(format!("token file {shown} is too large")))?;
    if token.expose().is_empty() {
        return Err(UsageError(format!("token file {shown} is empty")).into());
    }
    Ok(token)
}

fn fetch(a: FetchArgs, config: &Config) -> anyhow::Result<u8> {
    let id = KeyId::new(&a.key_id)?;
    let auth = match &a.token_file {
        None => RequestAuth::Service,
        Some(path) => RequestAuth::UserToken {
            token: read_token(path)?,
            service_token: a
                .service_token_file
                .as_deref()
                .map(read_token)
                .transpose()?,
        },
    };
    let manager = config.key_manager()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let key = runtime.block_on(manager.fetch(&id, &auth))?;
    let elapsed = started.elapsed();
    if !a.check {
        println!("key id:      {id}");
        println!("key manager: {}", manager.describe());
        println!(
            "kind:        {}",
            match key.kind() {
                SecretKind::Symmetric => "symmetric (passphrase = lowercase hex of the key)",
                SecretKind::Passphrase => "passphrase (used as is)",
            }
        );
        println!("size:        {} bits", key.bits());
        println!(
            "kdf policy:  {}",
            if key.is_high_entropy() {
                "high-entropy (pbkdf2, 1000 iterations)"
            } else {
                "strong"
            }
        );
        println!("fetched in:  {:.1} ms", elapsed.as_secs_f64() * 1000.0);
    }
    println!("usable: yes");
    if a.reveal {
        eprintln!(
            "WARNING: printing the volume passphrase; anyone who sees it can open the volume"
        );
        let pass = key.passphrase();
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(b"passphrase: ")?;
        out.write_all(pass.expose())?;
        out.write_all(b"\n")?;
    }
    Ok(EXIT_OK)
}

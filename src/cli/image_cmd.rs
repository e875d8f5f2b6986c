//! `luks-agent image verify`: a glance image's signature checked as nova
//! and cinder check it, with certificates from the configured key manager.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use luks_agent::config::Config;
use luks_agent::image::{self, Verdict, VerifyRequest};
use luks_agent::keymgr::{KeyId, RequestAuth};
use luks_agent::service::api::ImageVerdict;
use luks_agent::service::codes::EXIT_IMAGE_NOT_SIGNED;

use super::keys_cmd::read_token;
use super::{EXIT_OK, UsageError};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Verify an image file against its signature properties
    /// (img_signature, img_signature_certificate_uuid,
    /// img_signature_hash_method, img_signature_key_type). Prints a JSON
    /// verdict; exits 0 when verified, 13 when the image is not signed.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Glance's image id (for messages and logs).
    #[arg(long)]
    image_id: String,
    /// The image file.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// The image's properties as a JSON object.
    #[arg(long, value_name = "JSON", conflicts_with = "properties_file")]
    properties: Option<String>,
    /// A file holding the image's properties as a JSON object (`-`: stdin).
    #[arg(long, value_name = "PATH")]
    properties_file: Option<PathBuf>,
    /// A trusted certificate id; repeat for several. Given: the signing
    /// certificate must chain to one of them, as with nova's
    /// trusted_image_certificates.
    #[arg(long = "trusted-cert-id", value_name = "ID")]
    trusted: Vec<String>,
    /// File holding a user's Keystone token to fetch certificates with
    /// (instead of the agent's own credentials); `-` for stdin.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
}

pub fn run(cmd: ImageCommand, config: &Config) -> anyhow::Result<u8> {
    match cmd {
        ImageCommand::Verify(a) => verify(a, config),
    }
}

fn read_properties(a: &VerifyArgs) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let text = match (&a.properties, &a.properties_file) {
        (Some(p), None) => p.clone(),
        (None, Some(path)) if path == Path::new("-") => {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| UsageError(format!("cannot read properties from stdin: {e}")))?
        }
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            UsageError(format!(
                "cannot read properties file {}: {e}",
                path.display()
            ))
        })?,
        _ => {
            return Err(UsageError(
                "give the image's properties: --properties or --properties-file".into(),
            )
            .into());
        }
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(UsageError("the properties are not a JSON object".into()).into()),
        Err(e) => Err(UsageError(format!("the properties are not JSON: {e}")).into()),
    }
}

fn verify(a: VerifyArgs, config: &Config) -> anyhow::Result<u8> {
    if !image::valid_image_id(&a.image_id) {
        return Err(UsageError(image::IMAGE_ID_RULE.into()).into());
    }
    let properties = read_properties(&a)?;
    let trusted = a
        .trusted
        .iter()
        .map(|t| KeyId::new(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UsageError(format!("--trusted-cert-id: {e}")))?;
    let auth = match &a.token_file {
        None => RequestAuth::Service,
        Some(path) => RequestAuth::UserToken {
            token: read_token(path)?,
            service_token: None,
        },
    };
    let manager = config.key_manager()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let request = VerifyRequest {
        image_id: &a.image_id,
        path: &a.file,
        properties: &properties,
        trusted: &trusted,
        caller: None,
    };
    let verdict = runtime.block_on(image::verify(manager.as_ref(), &auth, request))?;
    println!(
        "{}",
        serde_json::to_string(&ImageVerdict::of(&a.image_id, &verdict))?
    );
    Ok(match verdict {
        Verdict::Verified(_) => {
            eprintln!(
                "Image signature verification succeeded for image {}",
                a.image_id
            );
            EXIT_OK
        }
        Verdict::NotSigned => EXIT_IMAGE_NOT_SIGNED,
    })
}

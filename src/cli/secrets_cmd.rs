//! `luks-agent secrets`: the libvirt secrets this agent defined for
//! QEMU-native volumes. Values are never read or printed.

use clap::{Args, Subcommand};

use luks_agent::config::Config;
use luks_agent::libvirt::Secrets;

use super::EXIT_OK;

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// List our volume secrets: volume id, UUID, ephemeral and private
    /// flags (never values).
    List(ListArgs),
    /// Find the QEMU-native volumes nova detached by deleting their secret
    /// itself (no domain uses the secret any more): remove their records
    /// and release their keys' holds (Barbican consumers). The agent does
    /// this every `reconcile_interval_secs`; prints the volumes found.
    Reconcile,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also list volume secrets defined by others (nova).
    #[arg(long)]
    all: bool,
}

pub fn run(cmd: SecretsCommand, config: &Config) -> anyhow::Result<u8> {
    match cmd {
        SecretsCommand::Reconcile => {
            let keys = config.key_manager()?;
            let volumes = luks_agent::volume::Volumes::new(
                keys.as_ref(),
                luks_agent::service::volume_options(config),
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let native = luks_agent::service::native_options(config);
            for v in runtime.block_on(volumes.reconcile_native(&native))? {
                println!("{v}");
            }
            Ok(EXIT_OK)
        }
        SecretsCommand::List(a) => {
            let secrets = Secrets::connect(&config.libvirt.uri)?;
            let list: Vec<_> = secrets
                .list()?
                .into_iter()
                .filter(|s| a.all || s.ours)
                .collect();
            if a.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                let yes_no = |b: bool| if b { "yes" } else { "no" };
                println!("VOLUME\tUUID\tEPHEMERAL\tPRIVATE\tOURS");
                for s in list {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        s.volume_id,
                        s.uuid,
                        yes_no(s.flags.ephemeral),
                        yes_no(s.flags.private),
                        yes_no(s.ours)
                    );
                }
            }
            Ok(EXIT_OK)
        }
    }
}

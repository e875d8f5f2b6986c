//! `luks-agent serve`: runs the agent until SIGTERM or SIGINT.

use clap::Args;

use luks_agent::config::Config;

use super::EXIT_OK;

#[derive(Args, Debug)]
pub struct ServeArgs {}

pub fn run(_a: ServeArgs, config: &Config) -> anyhow::Result<u8> {
    luks_agent::daemon::server::serve(config)?;
    Ok(EXIT_OK)
}

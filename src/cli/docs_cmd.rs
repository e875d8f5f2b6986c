//! Documentation generated from the definitions themselves, so the man
//! pages and shell completions that packages install can never drift from
//! what `--help` says, nor the README's table of API codes from the codes.

use std::path::PathBuf;

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

use super::{Cli, EXIT_OK};

/// What to generate.
#[derive(Subcommand, Debug)]
pub enum GenerateCommand {
    /// Write man pages (luks-agent.1 and one per subcommand) into DIR.
    Man {
        /// Output directory (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print a completion script for SHELL on stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
    /// Print the API's error codes (code, HTTP status, exit code, meaning)
    /// as the README's Markdown table.
    ApiCodes,
}

/// Runs a `generate` command.
pub fn run(cmd: GenerateCommand) -> anyhow::Result<u8> {
    let mut command = Cli::command();
    match cmd {
        GenerateCommand::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(command, &dir)?;
        }
        GenerateCommand::Completions { shell } => {
            clap_complete::generate(shell, &mut command, "luks-agent", &mut std::io::stdout());
        }
        GenerateCommand::ApiCodes => {
            print!("{}", luks_agent::service::codes::ApiCode::markdown_table());
        }
    }
    Ok(EXIT_OK)
}

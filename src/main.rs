//! The `luks-agent` command: parses arguments, runs one command, and turns
//! its outcome into the exit codes documented in `--help` and the README.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything can hold a key: a crash must not dump one to disk.
    if let Err(e) = luks_agent::secret::forbid_core_dumps() {
        eprintln!("luks-agent: warning: cannot turn off core dumps: {e}");
    }
    // Logging starts once the configuration is read (cli::run): its
    // format can come from there. LUKS_AGENT_LOG sets the level.
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { cli::EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("luks-agent: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}

//! `dm-log-replay`: lists a dm-log-writes log, prints the crash states a
//! power cut can leave, and writes one of them onto a copy of the device.
//!
//! ```text
//! dm-log-replay list LOG
//! dm-log-replay states LOG [--subsets N] [--seed S] [--mark-prefix P] [--run-points N]
//! dm-log-replay replay LOG TARGET SPEC
//! ```
//!
//! `states` prints one line per state: name, kind, entries completed,
//! last counted mark (`-` for none), and the state's SPEC for `replay`.
//! Without `--run-points` a prefix ends after every write; with it, long
//! runs of adjacent writes (one large write split into pages) are sampled
//! at N points (the random subsets still choose from all of their writes).
//! `replay` writes the SPEC's entries onto TARGET (a copy of the device as
//! it was when logging started) and flushes it.

use std::path::Path;
use std::process::ExitCode;

use dm_log_replay::{Kind, Log, Options, crash_states, format_spec, parse_spec};

const USAGE: &str = "usage: dm-log-replay list LOG
       dm-log-replay states LOG [--subsets N] [--seed S] [--mark-prefix P] [--run-points N]
       dm-log-replay replay LOG TARGET SPEC";

fn run(args: &[String]) -> Result<(), String> {
    let log = |p: &String| Log::open(Path::new(p)).map_err(|e| e.to_string());
    match args {
        [cmd, path] if cmd == "list" => {
            let log = log(path)?;
            println!(
                "# sector size {}, {} entries",
                log.sector_size,
                log.entries.len()
            );
            for e in &log.entries {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    e.index,
                    e.flag_names(),
                    e.sector,
                    e.nr_sectors,
                    e.mark.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        [cmd, path, rest @ ..] if cmd == "states" => {
            let mut opts = Options::default();
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                let value = it
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                let num = || {
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("{flag}: '{value}' is not a number"))
                };
                match flag.as_str() {
                    "--subsets" => opts.subsets = num()? as usize,
                    "--seed" => opts.seed = num()?,
                    "--mark-prefix" => opts.mark_prefix = value.clone(),
                    "--run-points" => opts.run_points = Some(num()? as usize),
                    _ => return Err(format!("unknown option {flag}\n{USAGE}")),
                }
            }
            let log = log(path)?;
            for s in crash_states(&log.entries, &opts) {
                let kind = match s.kind {
                    Kind::Prefix => "prefix",
                    Kind::DurableOnly => "durable-only",
                    Kind::Subset => "subset",
                    Kind::AllButOne => "all-but-one",
                };
                println!(
                    "{}\t{kind}\t{}\t{}\t{}",
                    s.name,
                    s.after,
                    s.mark.as_deref().unwrap_or("-"),
                    format_spec(&s.writes)
                );
            }
            Ok(())
        }
        [cmd, path, target, spec] if cmd == "replay" => {
            let log = log(path)?;
            let writes = parse_spec(spec).map_err(|e| e.to_string())?;
            log.replay(&writes, Path::new(target))
                .map_err(|e| e.to_string())
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-log-replay: {e}");
            ExitCode::from(2)
        }
    }
}

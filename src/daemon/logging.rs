//! Log output: human-readable lines or JSON objects on stderr, or the
//! journal when the agent runs under systemd (its socket exists). The level
//! comes from `LUKS_AGENT_LOG` (an env-filter directive). No layer of the
//! agent logs key material; the daemon tests scan every line for it.

use std::path::Path;

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// The journal's socket: its presence means journald is running.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Installs the global subscriber. `default_level` applies when
/// `LUKS_AGENT_LOG` is unset; `journal` sends logs to journald when its
/// socket exists (the long-running agent), falling back to stderr.
pub fn init(format: LogFormat, default_level: &str, journal: bool) {
    let filter =
        EnvFilter::try_from_env("LUKS_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let journald = (journal && Path::new(JOURNAL_SOCKET).exists())
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|layer| {
            // Fields as operators query them (`journalctl VOLUME_ID=...`),
            // not behind the layer's default `F_` prefix, and levels on
            // syslog's scale (`journalctl -p info` shows info, not debug).
            layer
                .with_field_prefix(None)
                .with_priority_mappings(PriorityMappings {
                    error: Priority::Error,
                    warn: Priority::Warning,
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    trace: Priority::Debug,
                })
        });
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match (journald, format) {
        (Some(j), _) => j.boxed(),
        (None, LogFormat::Json) => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
        (None, LogFormat::Human) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

//! Log output: human-readable lines or JSON objects on stderr, or the
//! journal when the agent runs under systemd (its socket exists). The level
//! comes from `LUKS_AGENT_LOG` (an env-filter directive). No layer of the
//! agent logs key material; the daemon tests scan every line for it.

use std::fmt;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

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
            .fmt_fields(EscapingFields)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

/// Fields of human-readable lines as `name=value`, space-separated, like
/// tracing's default, but with control characters in every value escaped
/// ([`crate::text::escape_controls`]): device paths, volume ids and
/// providers come from callers, and a newline in one must not start a
/// forged line. JSON lines escape by construction; the journal keeps
/// fields apart.
pub struct EscapingFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapingFields {
    type Visitor = EscapingVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapingVisitor {
            writer: target,
            first: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's or span's fields (see [`EscapingFields`]).
pub struct EscapingVisitor<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn field(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let value = crate::text::escape_controls(value);
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{value}")
        } else {
            write!(self.writer, "{sep}{}={value}", field.name())
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, &format!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapingVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_newline_or_escape_in_a_value_cannot_forge_a_line() {
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapingFields)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let device =
            "/dev/x\n2026-01-01T00:00:00Z  INFO volume operation op=attach outcome=ok\x1b[2J";
        let error = std::io::Error::other("bad\rthing");
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(device, provider = "luks\n", error = %error, volume_id = "v1", "volume operation");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(!out.trim_end().chars().any(|c| c.is_control()), "{out:?}");
        assert!(out.contains("device=/dev/x\\n2026"), "{out}");
        assert!(out.contains("provider=luks\\n"), "{out}");
        assert!(out.contains("error=bad\\rthing"), "{out}");
        assert!(out.contains("volume_id=v1"), "{out}");
        assert!(out.contains("volume operation"), "{out}");
    }
}

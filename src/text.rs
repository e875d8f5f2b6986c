//! Text that came from a caller (device paths, volume ids, providers,
//! ciphers) made safe to print: control characters become escapes, so a
//! hostile value cannot forge a log line or send terminal sequences; and
//! errors with their causes on one line.

/// `s` with every control character written as an escape (`\n`,
/// `\u{1b}`); everything else unchanged.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `e` and its causes on one line, `a: b: c`, as the CLI prints an error
/// chain (so the agent's answers and the CLI print the same text).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cur) = next {
        s.push_str(": ");
        s.push_str(&cur.to_string());
        next = cur.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_escapes_and_nothing_else_changes() {
        assert_eq!(
            escape_controls("/dev/disk/by-id/a b"),
            "/dev/disk/by-id/a b"
        );
        assert_eq!(
            escape_controls("x\nINFO outcome=ok\x1b[2J\r\0"),
            "x\\nINFO outcome=ok\\u{1b}[2J\\r\\u{0}"
        );
        assert_eq!(escape_controls("\u{85}é"), "\\u{85}é");
    }
}

//! Text that came from a caller (device paths, volume ids, providers,
//! ciphers) made safe to print: control characters become escapes, so a
//! hostile value cannot forge a log line or send terminal sequences.

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

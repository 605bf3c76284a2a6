//! Writing values in each file's own syntax: systemd's specifiers, variables and quotes, a
//! D-Bus activation file's shell-like words, XML attributes.

/// Escapes `%` specifiers, which systemd expands in most settings.
pub(super) fn unit_text(text: &str) -> String {
    text.replace('%', "%%")
}

/// One word of a systemd command line: specifiers and variables escaped, quoted when needed.
pub(super) fn unit_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty()
        && escaped
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@+,%$".contains(c))
    {
        return escaped;
    }
    let mut quoted = String::from("\"");
    for c in escaped.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            _ => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// One word of a D-Bus activation file's `Exec=` (parsed like a shell's words).
pub(super) fn dbus_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@+,%".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

pub(super) fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

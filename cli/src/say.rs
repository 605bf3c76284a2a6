//! Every line the tool prints goes through [`say!`]: to stderr (messages, warnings, errors) or
//! to stdout (`status`, `generate`'s summary).
//!
//! `println!` and `eprintln!` panic when the write fails: a full disk (`/dev/full`), a pipe
//! whose reader is gone (`2>&1 | logger`, and the logger died or was restarted), a dropped ssh
//! session. In the wrapper such a panic would end it while COMMAND's tree still runs (see
//! `run::abort_on_panic`), for a message nobody can read anyway. So a line that cannot be
//! written is dropped: what the tool does, and its exit status, never depend on it.

/// Prints one line (`say!("...", args)` to stderr, `say!(stdout, "...", args)` to stdout) as
/// `eprintln!` and `println!` do, but never panics: a failed write is ignored. The line is
/// written in one `write` (up to the pipe's atomic size), so that lines of the wrapper, its
/// keeper and COMMAND sharing one stderr do not interleave within a line.
macro_rules! say {
    (stdout, $($arg:tt)*) => {
        $crate::say::line(&mut ::std::io::stdout(), ::std::format_args!($($arg)*))
    };
    ($($arg:tt)*) => {
        $crate::say::line(&mut ::std::io::stderr(), ::std::format_args!($($arg)*))
    };
}

/// Writes `text` and a newline to `out`, ignoring a failure (see the module's documentation).
pub(crate) fn line(out: &mut impl std::io::Write, text: std::fmt::Arguments<'_>) {
    let mut line = text.to_string();
    line.push('\n');
    // Stdout is line-buffered: the line is handed to it whole, and flushed with it.
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

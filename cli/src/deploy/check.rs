//! Checks of the generator's input: a value systemd or dbus-daemon would read differently from
//! what was given is refused here, before anything is written.

use std::path::Path;

use unique_instance::InstanceName;

/// Where systemd's `UNIT_NAME_MAX` (256, with the terminating NUL) leaves room for the name.
const UNIT_NAME_MAX: usize = 255;

/// The longest line written into any generated file, in bytes: half of systemd's `LONG_LINE_MAX`
/// (1 MiB), the longest line it reads in a unit or tmpfiles.d file ("No buffer space
/// available" past it). The margin leaves room for what else reads the files (dbus-daemon's
/// key-file parser) and for a line that grows when it is edited by hand.
pub(crate) const LINE_MAX: usize = 512 * 1024;

/// The largest D-Bus service (activation) file written, in bytes: dbus-daemon 1.14 loads one of
/// 131 072 bytes and silently drops one of 131 074 (measured; the bus then answers
/// `ServiceUnknown`, and nothing is logged), so a larger one would be written and never used.
pub(crate) const DBUS_SERVICE_FILE_MAX: usize = 128 * 1024;

/// A file name's limit (`NAME_MAX`), in bytes.
pub(super) const FILE_NAME_MAX: usize = 255;

/// The longest instance name that can be deployed: D-Bus activation files must be named
/// `NAME.service`, and that must fit in a file name.
pub(crate) const DEPLOYABLE_NAME_MAX: usize = FILE_NAME_MAX - ".service".len();

/// Checks that `name` fits in the names of the files made from it.
pub(crate) fn check_deployable_name(name: &InstanceName) -> Result<(), String> {
    let len = name.as_str().len();
    if len > DEPLOYABLE_NAME_MAX {
        return Err(format!(
            "the instance name is {len} characters long: a valid name, but its D-Bus \
             activation file must be named NAME.service, and a file name has at most \
             {FILE_NAME_MAX} bytes, so a deployed name can have at most {DEPLOYABLE_NAME_MAX} \
             characters; choose a shorter name"
        ));
    }
    Ok(())
}

/// The executable's path as text, or why it cannot be written into a unit or D-Bus file.
pub(crate) fn executable_text(executable: &Path) -> Result<String, String> {
    let text = executable.to_str().ok_or_else(|| {
        format!(
            "the executable path {executable:?} is not valid UTF-8: systemd units and D-Bus \
             service files are UTF-8 text, so it could not be written as it is; rename the \
             file (or make a link to it) with a UTF-8 name"
        )
    })?;
    check_one_line("the executable path", text)?;
    // systemd refuses quotes and backslashes in an executable's path ("contains special
    // characters"), and does not expand `$` in it (while it does in the argv[0] made from the
    // same word): no spelling of these reaches the program as written.
    if let Some(c) = text.chars().find(|c| matches!(c, '"' | '\'' | '\\' | '$')) {
        return Err(format!(
            "the executable path {text:?} contains {c:?}, which systemd does not accept in the \
             path of the program a unit starts; install it (or make a link to it) at a path \
             without quotes, backslashes or dollar signs"
        ));
    }
    Ok(text.to_owned())
}

/// Checks a unit's description: systemd keeps a value's text as written except that it strips
/// spaces at either end, and reads a final backslash as "continued on the next line" (which
/// would swallow the next setting).
pub(crate) fn check_description(text: &str) -> Result<(), String> {
    check_one_line("the description", text)?;
    if text.is_empty() {
        return Err(
            "the description is empty; systemd would show the unit's name instead: leave \
             --description out for the default one"
                .into(),
        );
    }
    if text.starts_with(' ') || text.ends_with(' ') {
        return Err(format!(
            "the description {text:?} starts or ends with a space, which systemd strips: \
             remove it"
        ));
    }
    if text.ends_with('\\') {
        return Err(format!(
            "the description {text:?} ends in a backslash, which systemd reads as a line \
             continuation (it would swallow the unit's next line): remove it, or put a \
             character after it"
        ));
    }
    Ok(())
}

/// Checks a unit name (without `.service`): systemd's characters, no template `@`, and short
/// enough for the suffix.
pub(crate) fn check_unit_name(unit: &str) -> Result<(), String> {
    let full = format!("{unit}.service");
    if unit.is_empty() {
        return Err("the unit name is empty".into());
    }
    if full.len() > UNIT_NAME_MAX {
        return Err(format!(
            "unit name {full:?} is {} characters long; systemd allows {UNIT_NAME_MAX}: pass a \
             shorter --unit",
            full.len()
        ));
    }
    if let Some(c) = unit
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-')))
    {
        return Err(format!(
            "unit name {unit:?} contains {c:?}; systemd unit names use A-Z a-z 0-9 : _ . - \
             (and @ only for templates, which this is not)"
        ));
    }
    Ok(())
}

/// A user or group name safe to put in a unit and in XML: the portable POSIX set that
/// `useradd` and systemd both accept.
pub(crate) fn valid_account_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
        && name.len() <= 31
}

/// Refuses text that cannot be put on one line of a unit or key file.
pub(crate) fn check_one_line(what: &str, text: &str) -> Result<(), String> {
    match text.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "{what} {text:?} contains the control character {c:?}, which cannot be written \
             into a unit file"
        )),
        None => Ok(()),
    }
}

/// Refuses files any of whose lines is longer than [`LINE_MAX`]: arguments that are each short
/// enough for the kernel (128 KiB) can together make an `ExecStart=` line (and the header
/// comments that repeat the command line) that systemd will not load; and D-Bus service files
/// larger than [`DBUS_SERVICE_FILE_MAX`]. Every line of every file is checked, so nothing is
/// written unless all of them load.
pub(crate) fn check_line_lengths<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<(), String> {
    for (path, contents) in files {
        if path.starts_with("dbus")
            && path.extension().is_some_and(|e| e == "service")
            && contents.len() > DBUS_SERVICE_FILE_MAX
        {
            return Err(format!(
                "{} would be {} bytes long, past the {DBUS_SERVICE_FILE_MAX} bytes dbus-daemon \
                 loads (it would drop the file without a word, and the name could not be \
                 activated); pass shorter arguments (the server can read long ones from a \
                 file); nothing was written",
                path.display(),
                contents.len()
            ));
        }
        if let Some((number, line)) = contents
            .lines()
            .enumerate()
            .find(|(_, line)| line.len() > LINE_MAX)
        {
            return Err(format!(
                "line {} of {} would be {} bytes long, past the line limit of {LINE_MAX} bytes \
                 kept below systemd's (1 MiB: it would not load the file); pass shorter \
                 arguments (the server can read long ones from a file); nothing was written",
                number + 1,
                path.display(),
                line.len()
            ));
        }
    }
    Ok(())
}

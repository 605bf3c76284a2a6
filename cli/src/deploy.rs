//! The deployment files of a server built on unique-instance: systemd units, the system-bus
//! policy, D-Bus activation files and the lock directory's tmpfiles.d line. Pure functions of
//! validated input, so the files are right by construction for any name.
//!
//! Every value goes into its file in that file's own syntax, or is refused before anything is
//! written: XML attributes are escaped and XML comments carry no value at all (a comment cannot
//! escape `--`); unit values escape `%` specifiers, `$` variables and quotes, and a value
//! systemd would read differently (a final `\` continues the line, end spaces are stripped) is
//! refused; paths that are not UTF-8 are refused (unit and D-Bus files are UTF-8 text).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use unique_instance::{InstanceName, SCOPE_ENV};

/// Where deployed services' own lock directories are, one per name: what unique-instance
/// looks for in the system scope before the shared directory.
const SERVICE_LOCK_ROOT: &str = "/run/unique-instance";

/// The system scope's shared lock directory, which the tmpfiles file makes: the one the library
/// locks in for a name with no directory of its own (a test below holds the two together).
const SYSTEM_LOCK_DIR: &str = "/run/lock/unique-instance";

/// How systemd learns the service is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Readiness {
    /// `Type=dbus`: ready once the bus name is owned.
    Dbus,
    /// `Type=notify`: ready on `READY=1`, which the library sends once the instance is held.
    Notify,
}

/// Who may call the service on the system bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Callers {
    /// Any local user (the service checks what is sensitive itself).
    Everyone,
    /// Root only.
    Root,
    /// Members of this group.
    Group(String),
}

impl std::str::FromStr for Callers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "everyone" => Ok(Callers::Everyone),
            "root" => Ok(Callers::Root),
            _ => match s.strip_prefix("group:") {
                Some(group) if valid_account_name(group) => Ok(Callers::Group(group.to_owned())),
                Some(group) => Err(format!("{group:?} is not a valid group name")),
                None => Err(format!("{s:?}: expected everyone, root or group:GROUP")),
            },
        }
    }
}

/// Everything the files are made from, validated.
#[derive(Debug, Clone)]
pub(crate) struct Deployment {
    pub(crate) name: InstanceName,
    /// The unit's name, without `.service`.
    pub(crate) unit: String,
    pub(crate) description: String,
    /// The executable's absolute path, as text: the files are UTF-8, so a path that is not was
    /// refused (see [`executable_text`]).
    pub(crate) executable: String,
    pub(crate) args: Vec<String>,
    pub(crate) user: String,
    /// The user's primary group (a name, or a number when it has none), for its lock directory.
    pub(crate) group: String,
    pub(crate) readiness: Readiness,
    pub(crate) callers: Callers,
}

/// One file to write: where, relative to the output directory; where it is installed; what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GeneratedFile {
    pub(crate) path: PathBuf,
    pub(crate) install_as: PathBuf,
    pub(crate) contents: String,
}

/// Where systemd's `UNIT_NAME_MAX` (256, with the terminating NUL) leaves room for the name.
const UNIT_NAME_MAX: usize = 255;

/// A file name's limit (`NAME_MAX`), in bytes.
const FILE_NAME_MAX: usize = 255;

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

/// Escapes `%` specifiers, which systemd expands in most settings.
fn unit_text(text: &str) -> String {
    text.replace('%', "%%")
}

/// One word of a systemd command line: specifiers and variables escaped, quoted when needed.
fn unit_word(word: &str) -> String {
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
fn dbus_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@+,%".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Deployment {
    fn unit_file_name(&self) -> String {
        format!("{}.service", self.unit)
    }

    fn exec_start(&self) -> String {
        std::iter::once(&self.executable)
            .chain(&self.args)
            .map(|w| unit_word(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `Exec=` of a D-Bus activation file: shell-like words, then written as a key file's
    /// value, where dbus-daemon first reads a backslash as an escape (`\s` is a space, `\n` a
    /// newline, and an unknown escape makes it ignore the whole file): so each is doubled.
    fn dbus_exec(&self) -> String {
        std::iter::once(&self.executable)
            .chain(&self.args)
            .map(|w| dbus_word(w))
            .collect::<Vec<_>>()
            .join(" ")
            .replace('\\', "\\\\")
    }

    /// The command that writes these files again, for their headers.
    pub(crate) fn command_line(&self) -> String {
        let mut words = vec![
            "unique-instance".to_owned(),
            "generate".to_owned(),
            "--exec".to_owned(),
            self.executable.clone(),
            "--user".to_owned(),
            self.user.clone(),
        ];
        if self.readiness == Readiness::Notify {
            words.extend(["--type".to_owned(), "notify".to_owned()]);
        }
        if self.unit != self.name.as_str() {
            words.extend(["--unit".to_owned(), self.unit.clone()]);
        }
        if self.description != default_description(&self.name) {
            words.extend(["--description".to_owned(), self.description.clone()]);
        }
        match &self.callers {
            Callers::Everyone => {}
            Callers::Root => words.extend(["--callers".to_owned(), "root".to_owned()]),
            Callers::Group(g) => words.extend(["--callers".to_owned(), format!("group:{g}")]),
        }
        words.push(self.name.to_string());
        if !self.args.is_empty() {
            words.push("--".to_owned());
            words.extend(self.args.iter().cloned());
        }
        words
            .iter()
            .map(|w| dbus_word(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn service_type(&self) -> &'static str {
        match self.readiness {
            Readiness::Dbus => "dbus",
            Readiness::Notify => "notify",
        }
    }

    /// The system unit.
    fn system_unit(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "\
# The system service {name}: one instance per machine, on the system bus.
# Written by: {command}
#
# Started by `systemctl start {unit}`, or by the first D-Bus call to {name} (its activation
# file names this unit). No [Install] section: a bus-activated service needs none; to start it
# at boot as well, run `systemctl add-wants multi-user.target {unit}`.

[Unit]
Description={description}
Requires=dbus.socket
After=dbus.socket

[Service]
",
            name = self.name,
            // A comment is not expanded: the command is shown as it is typed.
            command = self.command_line(),
            unit = self.unit_file_name(),
            description = unit_text(&self.description),
        );
        match self.readiness {
            Readiness::Dbus => s.push_str(
                "# Ready (active) once its bus name is owned; it requests the name only after taking\n\
                 # its lock file. (systemd does not check who owns the name: should a copy started\n\
                 # by hand own it, this one exits 75 at once. --type notify has no such gap.)\n",
            ),
            Readiness::Notify => s.push_str(
                "# Ready (active) on READY=1, which unique-instance sends once both its lock file\n\
                 # and its bus name are held. BusName= still tells systemd which name it provides.\n",
            ),
        }
        let _ = write!(
            s,
            "\
Type={ty}
BusName={name}
ExecStart={exec}
# A dedicated, static user: the bus policy names it, and dbus-daemon resolves the users of
# its policy when it loads it, so a DynamicUser= (which exists only while the service runs)
# could never be allowed to own the name.
User={user}
# The system scope: the lock file goes in the service's own lock directory,
#   {service_dir}
# (made by its tmpfiles.d file: only root and the service's user can write in it, so no
# other user can take the lock file first), where a copy started by hand (as root, or with
# --system) meets it. Without this a service user would lock in a user directory.
Environment={scope_env}=system
Restart=on-failure
# 75 already running (a copy started by hand holds the instance), 77 not permitted (policy
# or permissions), 64 bad configuration: restarting would not help.
RestartPreventExitStatus=64 75 77

# Hardening. The lock directory is the one place it writes: its own, or the shared one
# where unique-instance locks while the service's own does not exist (its tmpfiles.d file
# not applied yet). ('-': a missing one is no namespace error.)
ReadWritePaths=-{service_dir} -{lock_dir}
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
",
            ty = self.service_type(),
            name = self.name,
            exec = self.exec_start(),
            user = self.user,
            lock_dir = SYSTEM_LOCK_DIR,
            service_dir = self.service_lock_dir(),
            scope_env = SCOPE_ENV,
        );
        s
    }

    /// The service's own lock directory, which unique-instance uses for this name in the
    /// system scope when it exists (and is root's or the service user's, writable by no one
    /// else): so no other local user can create and hold the lock file first.
    fn service_lock_dir(&self) -> String {
        format!("{SERVICE_LOCK_ROOT}/{}", self.name)
    }

    /// The tmpfiles.d file that makes the lock directories at boot.
    fn tmpfiles(&self) -> String {
        format!(
            "\
# The lock directories of the system service {name}, made at boot by systemd-tmpfiles.
# Written by: {command}
#
# After installing this file, run `systemd-tmpfiles --create {file}` once.
#
# The service's own: only root and {user} can write in it, so no other local user can
# create (and hold) its lock file first; root's copies and those of other users (with
# --system) lock the same file there.
d {SERVICE_LOCK_ROOT} 0755 root root -
d {service_dir} 0755 {user} {group} -
# The shared one (root's, sticky and world-writable like /run/lock), for names without a
# directory of their own; the same line for every service.
d {SYSTEM_LOCK_DIR} 1777 root root -
",
            name = self.name,
            command = self.command_line(),
            file = self.tmpfiles_file_name(),
            user = self.user,
            group = self.group,
            service_dir = self.service_lock_dir(),
        )
    }

    fn tmpfiles_file_name(&self) -> String {
        format!("{}.conf", self.name)
    }

    /// The user unit, for the session-bus variant.
    fn user_unit(&self) -> String {
        format!(
            "\
# The user service {name}: one instance per user, on that user's session bus.
# Written by: {command}
#
# Run by each user's systemd (`systemctl --user start {unit}`), or by the first call to
# {name} on the session bus (its activation file names this unit).

[Unit]
Description={description} (per user)
Requires=dbus.socket
After=dbus.socket

[Service]
Type={ty}
BusName={name}
ExecStart={exec}
# The user's own lock directory (/run/lock/unique-instance-UID), even for root's
# user manager, where Auto would choose the system one.
Environment={scope_env}=user
Restart=on-failure
RestartPreventExitStatus=64 75 77

# What a user manager can enforce without user namespaces.
NoNewPrivileges=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
",
            name = self.name,
            command = self.command_line(),
            unit = self.unit_file_name(),
            description = unit_text(&self.description),
            ty = self.service_type(),
            exec = self.exec_start(),
            scope_env = SCOPE_ENV,
        )
    }

    /// The system-bus policy. Its comments name nothing given on the command line: an XML
    /// comment may not contain `--` (nor end in `-`), and has no way to escape it, while names,
    /// units and groups may; the values are in the escaped attributes below each comment.
    fn bus_policy(&self) -> String {
        let name = xml(self.name.as_str());
        let user = xml(&self.user);
        let callers = match &self.callers {
            Callers::Everyone => format!(
                "  <!-- Who may call it: every local user. The service must check anything
       sensitive itself (the caller's uid comes with GetConnectionCredentials). -->
  <policy context=\"default\">
    <allow send_destination=\"{name}\"/>
  </policy>
"
            ),
            Callers::Root => format!(
                "  <!-- Who may call it: root only (and so only root can start it through D-Bus
       activation). -->
  <policy user=\"root\">
    <allow send_destination=\"{name}\"/>
  </policy>
"
            ),
            Callers::Group(group) => {
                let group = xml(group);
                format!(
                    "  <!-- Who may call it: the members of this group (and so only they can start
       it through D-Bus activation). -->
  <policy group=\"{group}\">
    <allow send_destination=\"{name}\"/>
  </policy>
"
                )
            }
        };
        format!(
            "\
<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"
 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">
<!-- The system-bus policy of a service, written by `unique-instance generate` (the command
     is in the header of the service's systemd unit). -->
<busconfig>
  <!-- Only the service's user may own its name. Anyone else, root included, is refused
       by the bus (AccessDenied), which unique-instance reports as \"not permitted\"
       (exit 77), never as \"already running\". -->
  <policy user=\"{user}\">
    <allow own=\"{name}\"/>
  </policy>
{callers}</busconfig>
",
        )
    }

    /// The system bus's activation file.
    fn system_activation(&self) -> String {
        format!(
            "\
# D-Bus activation of {name} on the system bus: the first call to the name starts
# {unit} through systemd. Exec= is never used under systemd; it is /bin/false so that
# the service never runs outside its unit's sandbox and user.
# Written by: {command}
[D-BUS Service]
Name={name}
Exec=/bin/false
User={user}
SystemdService={unit}
",
            name = self.name,
            unit = self.unit_file_name(),
            command = self.command_line(),
            user = self.user,
        )
    }

    /// The session bus's activation file.
    fn session_activation(&self) -> String {
        format!(
            "\
# D-Bus activation of {name} on a session bus: the first call to the name starts the
# user unit {unit} through the user's systemd; a session bus without systemd runs Exec=.
# Written by: {command}
[D-BUS Service]
Name={name}
Exec={exec}
SystemdService={unit}
",
            name = self.name,
            unit = self.unit_file_name(),
            command = self.command_line(),
            exec = self.dbus_exec(),
        )
    }

    /// Every file, in the order they are written and listed.
    pub(crate) fn files(&self) -> Vec<GeneratedFile> {
        let unit = self.unit_file_name();
        let bus_file = format!("{}.service", self.name);
        let file = |path: String, install_as: String, contents: String| GeneratedFile {
            path: PathBuf::from(path),
            install_as: PathBuf::from(install_as),
            contents,
        };
        vec![
            file(
                format!("systemd/{unit}"),
                format!("/etc/systemd/system/{unit}"),
                self.system_unit(),
            ),
            file(
                format!("systemd/user/{unit}"),
                format!("/etc/systemd/user/{unit}"),
                self.user_unit(),
            ),
            file(
                format!("systemd/tmpfiles.d/{}", self.tmpfiles_file_name()),
                format!("/etc/tmpfiles.d/{}", self.tmpfiles_file_name()),
                self.tmpfiles(),
            ),
            file(
                format!("dbus/{}.conf", self.name),
                format!("/etc/dbus-1/system.d/{}.conf", self.name),
                self.bus_policy(),
            ),
            file(
                format!("dbus/system-services/{bus_file}"),
                format!("/usr/local/share/dbus-1/system-services/{bus_file}"),
                self.system_activation(),
            ),
            file(
                format!("dbus/services/{bus_file}"),
                format!("/usr/local/share/dbus-1/services/{bus_file}"),
                self.session_activation(),
            ),
        ]
    }
}

/// The default description of a unit.
pub(crate) fn default_description(name: &InstanceName) -> String {
    format!("{name}, a single instance")
}

/// The name of `user`'s primary group (its number when no group has a name for it), from this
/// machine's user database (NSS) or the `etc/passwd` / `etc/group` of another root directory.
pub(crate) fn primary_group(root: Option<&Path>, user: &str) -> Result<String, String> {
    match root {
        Some(root) => {
            let read = |file: &str| {
                let path = root.join("etc").join(file);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
            };
            let passwd = read("passwd")?;
            let gid = passwd
                .lines()
                .map(|line| line.split(':').collect::<Vec<_>>())
                .find(|fields| fields.first() == Some(&user))
                .and_then(|fields| fields.get(3).map(|gid| (*gid).to_owned()))
                .ok_or_else(|| format!("user {user:?} has no group in the passwd file"))?;
            // Without a group file, the number: systemd-tmpfiles takes either.
            let groups = read("group").unwrap_or_default();
            Ok(groups
                .lines()
                .map(|line| line.split(':').collect::<Vec<_>>())
                .find(|fields| fields.get(2) == Some(&gid.as_str()))
                .and_then(|fields| fields.first().map(|name| (*name).to_owned()))
                .filter(|name| valid_account_name(name))
                .unwrap_or(gid))
        }
        None => {
            let gid = nix::unistd::User::from_name(user)
                .map_err(|e| format!("cannot look user {user:?} up: {e}"))?
                .ok_or_else(|| format!("user {user:?} does not exist"))?
                .gid;
            Ok(nix::unistd::Group::from_gid(gid)
                .ok()
                .flatten()
                .map(|g| g.name)
                .filter(|name| valid_account_name(name))
                .unwrap_or_else(|| gid.to_string()))
        }
    }
}

/// A user's or group's existence, looked up in this machine's user database (NSS), or in the
/// `etc/passwd` / `etc/group` of another root directory (an image being built).
pub(crate) fn account_exists(root: Option<&Path>, file: &str, name: &str) -> Result<bool, String> {
    match root {
        Some(root) => {
            let path = root.join("etc").join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Ok(text
                .lines()
                .any(|line| line.split(':').next() == Some(name)))
        }
        None if file == "passwd" => nix::unistd::User::from_name(name)
            .map(|u| u.is_some())
            .map_err(|e| format!("cannot look user {name:?} up: {e}")),
        None => nix::unistd::Group::from_name(name)
            .map(|g| g.is_some())
            .map_err(|e| format!("cannot look group {name:?} up: {e}")),
    }
}

/// Checks that `executable` is an absolute path to an executable regular file (inside `root`,
/// when given).
pub(crate) fn check_executable(root: Option<&Path>, executable: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !executable.is_absolute() {
        return Err(format!(
            "the executable {} is not an absolute path; systemd and D-Bus need one",
            executable.display()
        ));
    }
    let on_disk = match root {
        Some(root) => root.join(executable.strip_prefix("/").unwrap_or(executable)),
        None => executable.to_owned(),
    };
    let meta = std::fs::metadata(&on_disk).map_err(|e| {
        format!(
            "the executable {} cannot be used: {e}; install it first (or pass --root for an \
             image being built)",
            on_disk.display()
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "the executable {} is not a regular file",
            on_disk.display()
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "{} is not executable (mode {:o})",
            on_disk.display(),
            meta.permissions().mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Deployment {
        let name = InstanceName::new("org.example.Server").expect("valid");
        Deployment {
            unit: name.to_string(),
            description: default_description(&name),
            name,
            executable: "/usr/local/libexec/unique-instance/example-server".into(),
            args: vec!["org.example.Server".into()],
            user: "example-server".into(),
            group: "example-server".into(),
            readiness: Readiness::Dbus,
            callers: Callers::Everyone,
        }
    }

    /// The generator's copy of the shared directory is where the library locks, in the system
    /// scope, a name whose deployment made it no directory of its own.
    #[test]
    fn the_shared_system_lock_dir_is_the_one_the_library_locks_in() {
        use unique_instance::{Backend, InstanceOptions, LOCK_DIR_ENV, Scope};
        assert!(
            std::env::var_os(LOCK_DIR_ENV).is_none(),
            "unset {LOCK_DIR_ENV} to run this test: it moves the library's lock directory"
        );
        // No deployment made this name a directory under SERVICE_LOCK_ROOT.
        let name = "org.example.GeneratorSharedDirCheck";
        assert!(!Path::new(SERVICE_LOCK_ROOT).join(name).exists());
        let plan = InstanceOptions::new(name)
            .scope(Scope::System)
            .backend(Backend::LockFile)
            .plan()
            .expect("plan");
        assert_eq!(
            plan.lock_file,
            Some(Path::new(SYSTEM_LOCK_DIR).join(format!("{name}.lock")))
        );
    }

    #[test]
    fn command_words_are_escaped_for_systemd_and_dbus() {
        assert_eq!(unit_word("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(unit_word("50%"), "50%%");
        assert_eq!(unit_word("$HOME"), "$$HOME");
        assert_eq!(unit_word("a b"), "\"a b\"");
        assert_eq!(unit_word("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(unit_word(""), "\"\"");
        assert_eq!(dbus_word("a b"), "'a b'");
        assert_eq!(dbus_word("it's"), r"'it'\''s'");
    }

    /// The text of every XML comment in `xml`.
    fn xml_comments(xml: &str) -> Vec<&str> {
        xml.split("<!--")
            .skip(1)
            .map(|c| c.split("-->").next().expect("closed"))
            .collect()
    }

    #[test]
    fn policy_comments_stay_valid_xml_whatever_the_names() {
        // XML forbids "--" in a comment and a comment ending in "-"; names, units and groups
        // may contain both.
        let name = InstanceName::new("a--b.c-").expect("valid");
        let d = Deployment {
            unit: "x--y-".into(),
            callers: Callers::Group("g--h-".into()),
            name,
            ..example()
        };
        let policy = d.bus_policy();
        for comment in xml_comments(&policy) {
            assert!(
                !comment.contains("--") && !comment.ends_with('-'),
                "{comment:?}"
            );
        }
        assert!(policy.contains("<allow own=\"a--b.c-\"/>"), "{policy}");
        assert!(policy.contains("<policy group=\"g--h-\">"), "{policy}");
    }

    #[test]
    fn descriptions_systemd_would_read_differently_are_refused() {
        for ok in [
            "100% \"quoted\" it's",
            "a \\ b",
            "x\\y",
            "ünïcode €",
            "a--b",
        ] {
            assert_eq!(check_description(ok), Ok(()), "{ok:?}");
        }
        for (bad, why) in [
            ("ends\\", "continuation"),
            ("", "empty"),
            (" lead", "space"),
            ("trail ", "space"),
            ("two\nlines", "control"),
        ] {
            let err = check_description(bad).expect_err(bad);
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn names_too_long_for_their_files_are_refused() {
        let longest = format!("a.{}", "b".repeat(DEPLOYABLE_NAME_MAX - 2));
        let name = InstanceName::new(&longest).expect("valid");
        assert_eq!(check_deployable_name(&name), Ok(()));
        let d = Deployment {
            unit: longest.clone(),
            name,
            ..example()
        };
        for f in d.files() {
            let len = f.path.file_name().expect("file name").len();
            assert!(len <= FILE_NAME_MAX, "{}: {len}", f.path.display());
        }
        let too_long = InstanceName::new(&format!("{longest}b")).expect("valid");
        let err = check_deployable_name(&too_long).expect_err("too long");
        assert!(err.contains("at most 247"), "{err}");
    }

    #[test]
    fn paths_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(b"/usr/bin/caf\xe9"));
        let err = executable_text(path).expect_err("not UTF-8");
        assert!(
            err.contains("not valid UTF-8") && err.contains("\\xE9"),
            "{err}"
        );
        assert_eq!(executable_text(Path::new("/a b/c%")), Ok("/a b/c%".into()));
        for c in ['"', '\'', '\\', '$'] {
            let path = format!("/usr/bin/a{c}b");
            let err = executable_text(Path::new(&path)).expect_err(&path);
            assert!(err.contains("systemd does not accept"), "{err}");
        }
    }

    #[test]
    fn unit_names_follow_systemd_rules() {
        assert!(check_unit_name("org.example.Server").is_ok());
        assert!(check_unit_name("example-server").is_ok());
        assert!(check_unit_name("a@b").is_err());
        assert!(check_unit_name("a b").is_err());
        assert!(check_unit_name("").is_err());
        assert!(check_unit_name(&"a".repeat(247)).is_ok());
        let err = check_unit_name(&"a".repeat(248)).expect_err("too long with .service");
        assert!(err.contains("255"), "{err}");
    }

    #[test]
    fn account_names_are_portable() {
        for ok in ["example-server", "_svc", "a1"] {
            assert!(valid_account_name(ok), "{ok}");
        }
        for bad in ["", "Root", "1abc", "a b", "a\"b", "<x>", &"a".repeat(32)] {
            assert!(!valid_account_name(bad), "{bad}");
        }
        assert_eq!("group:wheel".parse(), Ok(Callers::Group("wheel".into())));
        assert!("group:Bad Name".parse::<Callers>().is_err());
        assert!("anyone".parse::<Callers>().is_err());
    }

    #[test]
    fn the_files_say_what_the_deployment_needs() {
        let d = example();
        let files = d.files();
        let text = |suffix: &str| {
            &files
                .iter()
                .find(|f| f.path.to_string_lossy().ends_with(suffix))
                .unwrap_or_else(|| panic!("no {suffix}"))
                .contents
        };
        let system = text("systemd/org.example.Server.service");
        for line in [
            "Type=dbus",
            "BusName=org.example.Server",
            "User=example-server",
            "Environment=UNIQUE_INSTANCE_SCOPE=system",
            "ReadWritePaths=-/run/unique-instance/org.example.Server -/run/lock/unique-instance",
            "ProtectSystem=strict",
            "Restart=on-failure",
        ] {
            assert!(system.lines().any(|l| l == line), "missing {line}");
        }
        assert!(!system.lines().any(|l| l.trim() == "[Install]"));
        let policy = text("dbus/org.example.Server.conf");
        assert!(
            policy.contains(
                "<policy user=\"example-server\">\n    <allow own=\"org.example.Server\"/>"
            )
        );
        assert!(!policy.contains("own=\"*\""));
        // An XML comment may not contain "--", and the command line has some.
        let comments: Vec<&str> = policy.split("<!--").skip(1).collect();
        for c in comments {
            let body = c.split("-->").next().expect("closed");
            assert!(!body.contains("--"), "{body}");
        }
        let tmpfiles = text("tmpfiles.d/org.example.Server.conf");
        for line in [
            "d /run/unique-instance 0755 root root -",
            "d /run/unique-instance/org.example.Server 0755 example-server example-server -",
            "d /run/lock/unique-instance 1777 root root -",
        ] {
            assert!(tmpfiles.lines().any(|l| l == line), "missing {line}");
        }
        let system_bus = text("system-services/org.example.Server.service");
        assert!(
            system_bus.contains("User=example-server\nSystemdService=org.example.Server.service")
        );
        let notify = Deployment {
            readiness: Readiness::Notify,
            ..example()
        };
        assert!(notify.system_unit().lines().any(|l| l == "Type=notify"));
        assert!(notify.command_line().contains("--type notify"));
    }
}

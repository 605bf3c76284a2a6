//! The deployment files of a server built on unique-instance: systemd units, the system-bus
//! policy, D-Bus activation files and the lock directory's tmpfiles.d line. Pure functions of
//! validated input, so the files are right by construction for any name.
//!
//! Every value goes into its file in that file's own syntax, or is refused before anything is
//! written: XML attributes are escaped and XML comments carry no value at all (a comment cannot
//! escape `--`); unit values escape `%` specifiers, `$` variables and quotes, and a value
//! systemd would read differently (a final `\` continues the line, end spaces are stripped) is
//! refused; paths that are not UTF-8 are refused (unit and D-Bus files are UTF-8 text).
//!
//! The files' text is in `templates/`, as it is written, with `{key}` where a value goes
//! ([`template`]); [`check`] refuses what no file could carry, [`escape`] writes the rest in
//! each file's syntax, and [`host`] looks the user, group and executable up.

mod check;
mod escape;
mod host;
mod template;

use std::path::PathBuf;

use unique_instance::{InstanceName, SCOPE_ENV};

pub(crate) use check::{
    check_deployable_name, check_description, check_line_lengths, check_one_line, check_unit_name,
    executable_text, valid_account_name,
};
use escape::{dbus_word, unit_text, unit_word, xml};
pub(crate) use host::{account_exists, check_executable, primary_group};
use template::fill;

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
        let readiness = match self.readiness {
            Readiness::Dbus => include_str!("templates/ready-dbus.txt"),
            Readiness::Notify => include_str!("templates/ready-notify.txt"),
        };
        fill(
            include_str!("templates/system.service"),
            &[
                ("name", self.name.as_str()),
                // A comment is not expanded: the command is shown as it is typed.
                ("command", &self.command_line()),
                ("unit", &self.unit_file_name()),
                ("description", &unit_text(&self.description)),
                ("readiness", readiness),
                ("type", self.service_type()),
                ("exec", &self.exec_start()),
                ("user", &self.user),
                ("lock_dir", SYSTEM_LOCK_DIR),
                ("service_dir", &self.service_lock_dir()),
                ("scope_env", SCOPE_ENV),
            ],
        )
    }

    /// The service's own lock directory, which unique-instance uses for this name in the
    /// system scope when it exists (and is root's or the service user's, writable by no one
    /// else): so no other local user can create and hold the lock file first.
    fn service_lock_dir(&self) -> String {
        format!("{SERVICE_LOCK_ROOT}/{}", self.name)
    }

    /// The tmpfiles.d file that makes the lock directories at boot.
    fn tmpfiles(&self) -> String {
        fill(
            include_str!("templates/tmpfiles.conf"),
            &[
                ("name", self.name.as_str()),
                ("command", &self.command_line()),
                ("file", &self.tmpfiles_file_name()),
                ("user", &self.user),
                ("group", &self.group),
                ("service_root", SERVICE_LOCK_ROOT),
                ("service_dir", &self.service_lock_dir()),
                ("lock_dir", SYSTEM_LOCK_DIR),
            ],
        )
    }

    fn tmpfiles_file_name(&self) -> String {
        format!("{}.conf", self.name)
    }

    /// The user unit, for the session-bus variant.
    fn user_unit(&self) -> String {
        fill(
            include_str!("templates/user.service"),
            &[
                ("name", self.name.as_str()),
                ("command", &self.command_line()),
                ("unit", &self.unit_file_name()),
                ("description", &unit_text(&self.description)),
                ("type", self.service_type()),
                ("exec", &self.exec_start()),
                ("scope_env", SCOPE_ENV),
            ],
        )
    }

    /// The system-bus policy. Its comments name nothing given on the command line: an XML
    /// comment may not contain `--` (nor end in `-`), and has no way to escape it, while names,
    /// units and groups may; the values are in the escaped attributes below each comment.
    fn bus_policy(&self) -> String {
        let name = xml(self.name.as_str());
        let callers = match &self.callers {
            Callers::Everyone => fill(
                include_str!("templates/callers-everyone.xml"),
                &[("name", &name)],
            ),
            Callers::Root => fill(
                include_str!("templates/callers-root.xml"),
                &[("name", &name)],
            ),
            Callers::Group(group) => fill(
                include_str!("templates/callers-group.xml"),
                &[("name", &name), ("group", &xml(group))],
            ),
        };
        fill(
            include_str!("templates/policy.conf"),
            &[
                ("user", &xml(&self.user)),
                ("name", &name),
                ("callers", &callers),
            ],
        )
    }

    /// The system bus's activation file.
    fn system_activation(&self) -> String {
        fill(
            include_str!("templates/system-activation.service"),
            &[
                ("name", self.name.as_str()),
                ("unit", &self.unit_file_name()),
                ("command", &self.command_line()),
                ("user", &self.user),
            ],
        )
    }

    /// The session bus's activation file.
    fn session_activation(&self) -> String {
        fill(
            include_str!("templates/session-activation.service"),
            &[
                ("name", self.name.as_str()),
                ("unit", &self.unit_file_name()),
                ("command", &self.command_line()),
                ("exec", &self.dbus_exec()),
            ],
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

#[cfg(test)]
mod tests;

//! The error a caller can match on.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::holder::Holder;
use crate::loss::LossReason;
use crate::name::InstanceName;
use crate::name::NameRule;
use crate::scope::BusKind;

/// Everything that can stop an instance from being acquired, or released cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another copy holds the instance.
    #[error("{name} is already running ({holder})")]
    AlreadyRunning {
        /// The instance name.
        name: String,
        /// What is known of the running copy.
        holder: Box<Holder>,
    },

    /// The name is not a valid D-Bus well-known name; nothing was created or contacted.
    #[error("invalid instance name {name:?}: {rule}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// The rule it broke.
        rule: NameRule,
    },

    /// The bus policy or the file system does not let this process hold the instance.
    #[error("{name}: not permitted: {reason}")]
    NotPermitted {
        /// The instance name.
        name: String,
        /// What refused, in words a user can act on.
        reason: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// No backend could enforce exclusion, so nothing was acquired.
    #[error("{name}: no usable backend: {reason}")]
    NoUsableBackend {
        /// The instance name.
        name: String,
        /// Why each candidate was unusable.
        reason: String,
        /// The underlying error, if one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// The lock path is not a file this process may safely lock.
    #[error("unsafe lock path {}: {problem}; {}", path.display(), problem.advice())]
    UnsafeLockPath {
        /// The path that was refused.
        path: PathBuf,
        /// What is wrong with it.
        problem: UnsafeLockPath,
    },

    /// A file at the lock path is neither empty nor a holder record alone: it is not a lock file
    /// unique-instance made (a data file or a script given as the lock path), so it is left
    /// exactly as it is — never opened for writing, truncated, written or removed — and the
    /// instance is not acquired.
    #[error(
        "{name}: {} is not a lock file (it is neither empty nor a unique-instance record alone); \
         unique-instance never writes into or removes a file it did not create: if you gave \
         this path, use one of its own, e.g. {}.lock; if not, someone put this file where the \
         lock file goes: have its owner remove it, or give the instance a lock directory of its \
         own (`unique-instance generate` makes one for a service)",
        path.display(),
        path.display()
    )]
    NotALockFile {
        /// The instance name.
        name: String,
        /// The file that was left alone.
        path: PathBuf,
    },

    /// The lock directory is on a network file system, where file locks cannot be trusted.
    #[error(
        "lock directory {} is on a network file system ({fs_type}), where file locks may not exclude other hosts or may hang; \
         choose a local directory, or allow network file systems explicitly",
        path.display()
    )]
    NetworkFilesystem {
        /// The directory.
        path: PathBuf,
        /// The file system type that was detected.
        fs_type: &'static str,
    },

    /// A setting read from the environment (such as [`crate::SCOPE_ENV`]) has a value this
    /// library does not understand; nothing was acquired rather than guess.
    #[error("{variable}={value:?} is not valid: {expected}")]
    InvalidEnvironment {
        /// The environment variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        expected: &'static str,
    },

    /// An explicit option (or the environment variable standing for one) has a value that would
    /// not name the same lock for every copy, or no lock file at all; nothing was touched.
    #[error("{option} {value:?} is refused: {reason}")]
    InvalidOption {
        /// The option: `lock_file`, `lock_dir` or [`crate::LOCK_DIR_ENV`].
        option: &'static str,
        /// Its value, exactly as given (it need not be UTF-8).
        value: PathBuf,
        /// What is wrong with it and what to give instead.
        reason: String,
    },

    /// Waiting for the instance gave up.
    #[error("{name}: timed out after {waited:?} waiting for the running copy to exit ({holder})")]
    TimedOut {
        /// The instance name.
        name: String,
        /// How long it waited.
        waited: Duration,
        /// The copy still running, as far as known.
        holder: Box<Holder>,
    },

    /// A file system operation failed (on a file, a directory or a socket).
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path involved: always a path, never an instance name.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// This process could not start what holding the instance needs (the async runtime, or the
    /// thread that services the bus connection of a guard from the blocking API); nothing was
    /// acquired, or what was has been released.
    #[error("{context} {name}: {source}")]
    Runtime {
        /// What was being done.
        context: &'static str,
        /// The instance name, as given.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Released, but the instance had been lost before the release and the program had not been
    /// told: the lock file had stopped being this copy's and no loss had been reported (the
    /// file or a directory on its path was removed or replaced just before the release, before
    /// the watch saw it, or while the watch was off or the copy was stopped: SIGSTOP, a
    /// debugger, a frozen cgroup); or a loss that left nothing excluding other copies had been
    /// reported, but neither the guard nor any [`crate::LossWatcher`] had handed it to the
    /// program yet (it came as the program decided to release, or the program never looks).
    /// Another copy may have run beside this one meanwhile. The instance is released all the
    /// same, and the loss is also in [`crate::InstanceGuard::losses`]'s watchers.
    #[error(
        "{name}: {reason} before the release, and the program had not been told (the watch had \
         not seen it yet, was off, or this copy was stopped; or the loss came as it released): \
         another copy may have run beside it meanwhile"
    )]
    LostBeforeRelease {
        /// The instance name.
        name: String,
        /// What had happened to the lock file.
        reason: LossReason,
    },

    /// Talking to the bus failed.
    #[error("{context} on the {bus} bus: {source}")]
    Bus {
        /// What was being done.
        context: &'static str,
        /// Which bus.
        bus: BusKind,
        /// The underlying error.
        #[source]
        source: zbus::Error,
    },
}

/// Why a lock path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnsafeLockPath {
    /// The path is a symbolic link (never followed: it could point anywhere).
    #[error("it is a symbolic link")]
    Symlink,
    /// The path is not a regular file.
    #[error("it is a {kind}, not a regular file")]
    NotRegularFile {
        /// What it is instead.
        kind: &'static str,
    },
    /// The file belongs to another user, who could remove or rewrite it.
    #[error("it is owned by uid {owner}, not by this user (uid {expected})")]
    WrongOwner {
        /// The file's owner.
        owner: u32,
        /// The user (and, in system scope, root) it should belong to.
        expected: u32,
    },
    /// A directory on the way is writable by others without the sticky bit.
    #[error("directory {} is writable by others without the sticky bit (mode {mode:o})", dir.display())]
    InsecureDirectory {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A symbolic link on the way belongs to another user, who could point it elsewhere.
    #[error("symbolic link {} on the way belongs to uid {owner}, not to this user or root{}", link.display(), unmapped_owner_note(*owner))]
    ForeignSymlink {
        /// The symbolic link.
        link: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// A directory on the way belongs to another user.
    #[error("directory {} is owned by uid {owner}, not by this user or root{}", dir.display(), unmapped_owner_note(*owner))]
    ForeignDirectory {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// The file has more than one name (a hard link): it may be another file in disguise.
    #[error("it has {links} names (hard links); a lock file has exactly one")]
    HardLinked {
        /// How many names it has.
        links: u64,
    },
    /// A symbolic link on the way is in procfs (`/proc/self`, `/proc/thread-self`,
    /// `/proc/PID/cwd`, `/proc/PID/root`...): it leads each process that follows it to its own
    /// place, so two copies given the same path would lock two different files.
    #[error("its way follows {}, a link in procfs (/proc) that leads each process to its own place, so two copies would lock different files; use a real directory instead", link.display())]
    Procfs {
        /// The link in procfs.
        link: PathBuf,
    },
    /// A per-user fallback directory does not have mode 0700.
    #[error("per-user directory {} has mode {mode:o}, expected 700", dir.display())]
    DirectoryMode {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The holder, for [`Error::AlreadyRunning`] and [`Error::TimedOut`].
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            Error::AlreadyRunning { holder, .. } | Error::TimedOut { holder, .. } => Some(holder),
            _ => None,
        }
    }

    /// The `sysexits(3)` status a program should exit with for this error, as the
    /// `unique-instance` tool does: 75 (`EX_TEMPFAIL`) already running or timed out, 64
    /// (`EX_USAGE`) invalid name, option or environment setting, or a lock path naming a file
    /// that is not a lock file, 77 (`EX_NOPERM`) not permitted, 69 (`EX_UNAVAILABLE`) no
    /// usable backend, 78 (`EX_CONFIG`) a lock path refused as unsafe or on a network file
    /// system (the setup's to fix: choose another path, or fix the file system), 70
    /// (`EX_SOFTWARE`) anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::AlreadyRunning { .. } | Error::TimedOut { .. } => 75,
            Error::InvalidName { .. }
            | Error::InvalidEnvironment { .. }
            | Error::InvalidOption { .. }
            | Error::NotALockFile { .. } => 64,
            Error::NotPermitted { .. } => 77,
            Error::NoUsableBackend { .. } | Error::LostBeforeRelease { .. } => 69,
            // Not a bug in the tool (70): a path it must not lock, which the setup chose.
            Error::UnsafeLockPath { .. } | Error::NetworkFilesystem { .. } => 78,
            _ => 70,
        }
    }

    /// This error naming `named` as the holder instead, for [`Error::AlreadyRunning`] and
    /// [`Error::TimedOut`]; any other error unchanged.
    pub(crate) fn naming(mut self, named: Holder) -> Self {
        if let Error::AlreadyRunning { holder, .. } | Error::TimedOut { holder, .. } = &mut self {
            **holder = named;
        }
        self
    }

    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn runtime(context: &'static str, name: &str, source: io::Error) -> Self {
        Error::Runtime {
            context,
            name: name.to_owned(),
            source,
        }
    }
}

pub(crate) fn already_running(name: &InstanceName, holder: Box<Holder>) -> Error {
    Error::AlreadyRunning {
        name: name.to_string(),
        holder,
    }
}

impl UnsafeLockPath {
    /// What to do about it. "Remove it" only where what is there is a stray lock file or link
    /// at the lock path itself: never for a device, a FIFO, a directory given as the lock file,
    /// procfs, or another user's directory or link on the way (which may well be theirs to
    /// keep: a service's data directory).
    fn advice(&self) -> &'static str {
        match self {
            UnsafeLockPath::NotRegularFile { .. } => "choose another lock path",
            // Its own message says it: "use a real directory".
            UnsafeLockPath::Procfs { .. } => "choose another lock path",
            UnsafeLockPath::ForeignSymlink { .. }
            | UnsafeLockPath::ForeignDirectory { .. }
            | UnsafeLockPath::InsecureDirectory { .. } => {
                "choose another lock path, or have its owner make the way safe"
            }
            _ => "remove it or choose another lock path",
        }
    }
}

/// A note for an owner shown as the kernel's overflow uid (65534 unless changed) inside a user
/// namespace: that is how the namespace shows an owner it does not map (the real root, for
/// `/` in `unshare --user --map-root-user` or a rootless container), and "remove it" would be no
/// advice. Nothing otherwise. Read only when the error is shown.
fn unmapped_owner_note(owner: u32) -> &'static str {
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|uid| uid.trim().parse().ok())
        .unwrap_or(65534);
    let initial_namespace = std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|map| map.split_whitespace().eq(["0", "0", "4294967295"]));
    if owner == overflow && !initial_namespace {
        " (in this user namespace, that is how an owner it does not map shows, such as the real \
         root of `/`: who it is cannot be checked from here; run outside the user namespace, or \
         in one that maps that owner)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime that could not start reads as it did when it was an `Io` error with the name
    /// in the path field, and still exits 70.
    #[test]
    fn runtime_errors_name_the_instance_as_before() {
        let source = || io::Error::other("out of threads");
        let now = Error::runtime(
            "cannot start the runtime for",
            "org.example.Server",
            source(),
        );
        let before = Error::io(
            "cannot start the runtime for",
            "org.example.Server",
            source(),
        );
        assert_eq!(now.to_string(), before.to_string());
        assert_eq!(
            now.to_string(),
            "cannot start the runtime for org.example.Server: out of threads"
        );
        assert_eq!(now.exit_code(), 70);
        assert!(std::error::Error::source(&now).is_some());
    }

    /// A lock path refused as unsafe, or on a network file system, is the setup's to fix (78,
    /// `EX_CONFIG`), not a bug in the tool (70, `EX_SOFTWARE`).
    #[test]
    fn refused_lock_paths_exit_78_not_70() {
        for e in [
            Error::UnsafeLockPath {
                path: "/run/x.lock".into(),
                problem: UnsafeLockPath::Symlink,
            },
            Error::UnsafeLockPath {
                path: "/run/x.lock".into(),
                problem: UnsafeLockPath::HardLinked { links: 2 },
            },
            Error::NetworkFilesystem {
                path: "/mnt/nfs".into(),
                fs_type: "nfs",
            },
        ] {
            assert_eq!(e.exit_code(), 78, "{e}");
        }
    }
}

//! Where the lock file goes: the scope's directory rules, the overrides, and the checks on a
//! deployed service's own directory.
//! It must not open, lock or create anything (it only reads the metadata of the directories).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::name::InstanceName;
use crate::options::InstanceOptions;
use crate::scope::{LOCK_DIR_ENV, Scope};

use super::Env;

/// The system scope's shared lock directory, for names whose deployment made them no directory
/// of their own under `/run/unique-instance/`.
pub(crate) const SYSTEM_LOCK_DIR: &str = "/run/lock/unique-instance";

/// Where the lock file lives and who may own it.
#[derive(Debug, Clone)]
pub(crate) struct LockPlan {
    /// The instance name, for errors (the file name may be anything `lock_file` was given).
    pub(crate) instance: String,
    pub(crate) dir: PathBuf,
    /// Byte-exact: a non-UTF-8 `lock_file` is locked under its own name, not a lossy one.
    pub(crate) file_name: OsString,
    /// Root may own the file and directory (system scope).
    pub(crate) root_may_own: bool,
    /// The directory is the shared [`SYSTEM_LOCK_DIR`], which only root may create.
    pub(crate) shared_system_dir: bool,
    /// The directory is created if missing, with this mode.
    pub(crate) create_dir_mode: Option<u32>,
    /// The directory must be exactly 0700 and ours (a per-user fallback in a shared place).
    pub(crate) private_dir: bool,
    /// The directory is a deployed service's own (`/run/unique-instance/NAME`): made by root,
    /// owned by root or the service's user, writable by no one else.
    pub(crate) service_dir: bool,
    pub(crate) file_mode: u32,
}

impl LockPlan {
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(&self.file_name)
    }

    /// The lock file was given by its path (`lock_file`, `--lock-file`): a file there may be a
    /// user's own. In a lock directory, the file at the name a copy derives is a lock file.
    pub(crate) fn file_given(&self) -> bool {
        self.create_dir_mode.is_none() && !self.service_dir
    }
}

/// The lock file of `name` in `scope`, for `options` in `env`: the file given, else in the
/// directory given (in code, else by [`LOCK_DIR_ENV`]), else in the scope's own directory.
pub(super) fn lock_plan(
    options: &InstanceOptions,
    name: &InstanceName,
    scope: Scope,
    env: &Env,
) -> Result<LockPlan> {
    let euid = (env.euid)();
    let system = lock_is_system(scope, euid);
    let file_mode = if system { 0o644 } else { 0o600 };
    let instance = name.to_string();
    if let Some(path) = &options.lock_file {
        let (dir, file_name) = split_lock_file(path)?;
        return Ok(LockPlan {
            instance,
            dir,
            file_name,
            root_may_own: system,
            shared_system_dir: false,
            create_dir_mode: None,
            private_dir: false,
            service_dir: false,
            file_mode,
        });
    }
    let explicit_dir = match &options.lock_dir {
        Some(dir) => Some(absolute("lock_dir", dir.clone())?),
        None => match (env.var)(LOCK_DIR_ENV).filter(|d| !d.is_empty()) {
            Some(dir) => Some(absolute(LOCK_DIR_ENV, PathBuf::from(dir))?),
            None => None,
        },
    };
    // A deployed service's own directory, when its deployment made one: only root and the
    // service's user can write it, so no local user can squat the lock file.
    let service_dir = match &explicit_dir {
        None if system => service_lock_dir(env.service_base, name.as_str())?,
        _ => None,
    };
    let shared_system_dir = explicit_dir.is_none() && service_dir.is_none() && system;
    let (dir, create_dir_mode, private_dir) = match (explicit_dir, &service_dir) {
        (Some(dir), _) => (dir, Some(0o755), false),
        (None, Some(dir)) => (dir.clone(), None, false),
        (None, None) if system => (PathBuf::from(SYSTEM_LOCK_DIR), Some(0o1777), false),
        (None, None) => (user_lock_dir(euid), Some(0o700), true),
    };
    Ok(LockPlan {
        instance,
        dir,
        file_name: name.lock_file_name().into(),
        root_may_own: system,
        shared_system_dir,
        create_dir_mode,
        private_dir,
        service_dir: service_dir.is_some(),
        file_mode,
    })
}

/// `path` when it is absolute; a relative one would name a different file from each working
/// directory, so two copies would not meet.
fn absolute(option: &'static str, path: PathBuf) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(Error::InvalidOption {
            option,
            value: path,
            reason: "a relative path names a different file from each working directory, so two \
                     copies would not meet; give an absolute path"
                .into(),
        })
    }
}

/// The directory and the file name of an explicit lock file, byte-exact. Refused: a relative
/// path, and one that names no file (`/`, or ending in `/`, `.` or `..`).
fn split_lock_file(path: &Path) -> Result<(PathBuf, OsString)> {
    use std::os::unix::ffi::OsStrExt;
    let path = absolute("lock_file", path.to_owned())?;
    let bytes = path.as_os_str().as_bytes();
    // `Path` ignores a trailing `/` or `/.`, which say "a directory": not a file to lock.
    let names_dir = bytes.ends_with(b"/") || bytes.ends_with(b"/.");
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(file)) if !names_dir => Ok((dir.to_owned(), file.to_owned())),
        _ => Err(Error::InvalidOption {
            option: "lock_file",
            value: path,
            reason: "it names a directory, not a file; give the path of a file to lock".into(),
        }),
    }
}

/// True when the lock file should follow the system rules.
pub(crate) fn lock_is_system(scope: Scope, euid: u32) -> bool {
    match scope {
        Scope::System => true,
        Scope::User => false,
        Scope::Auto => euid == 0,
    }
}

/// Where deployed services' own lock directories are (`generate` writes the tmpfiles line).
pub(crate) const SERVICE_LOCK_BASE: &str = "/run/unique-instance";

/// The per-service lock directory `BASE/NAME` when it exists: `Ok(None)` when it (or `BASE`)
/// does not; an error when it exists but anyone but root (and, for `NAME`, its owner) could
/// write it, or either is not a plain directory. A deployment that made it meant it to be used,
/// so a broken one is refused rather than silently replaced by the shared directory.
pub(crate) fn service_lock_dir(base: &Path, name: &str) -> Result<Option<PathBuf>, crate::Error> {
    use crate::error::UnsafeLockPath;
    let dir = base.join(name);
    for (path, root_only) in [(base, true), (dir.as_path(), false)] {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::Error::io("cannot examine", path, e)),
        };
        let problem = if meta.file_type().is_symlink() {
            Some(UnsafeLockPath::Symlink)
        } else if !meta.is_dir() {
            Some(UnsafeLockPath::NotRegularFile {
                kind: "non-directory",
            })
        } else if root_only && meta.uid() != 0 {
            Some(UnsafeLockPath::ForeignDirectory {
                dir: path.to_owned(),
                owner: meta.uid(),
            })
        } else if meta.mode() & 0o022 != 0 {
            Some(UnsafeLockPath::InsecureDirectory {
                dir: path.to_owned(),
                mode: meta.mode() & 0o7777,
            })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(crate::Error::UnsafeLockPath {
                path: path.to_owned(),
                problem,
            });
        }
    }
    Ok(Some(dir))
}

/// Where per-user lock directories go when it is fit for them (see [`user_lock_dir`]).
pub(crate) const USER_LOCK_BASE: &str = "/run/lock";
/// Where they go otherwise.
pub(crate) const USER_LOCK_FALLBACK_BASE: &str = "/tmp";

/// The per-user lock directory, from the UID alone: `/run/lock/unique-instance-UID` when
/// `/run/lock` is a root-owned sticky directory writable by all (Debian, Ubuntu), else
/// `/tmp/unique-instance-UID`. Never `XDG_RUNTIME_DIR` or `/run/user/UID`: they depend on the
/// environment and on a login session, so two copies of one user would meet at different files
/// (cron, ssh, `sudo -u`, after logout). The directory is made 0700 and verified (ours, 0700,
/// not a symlink) before use, since another user may pre-create the name: that is refused.
pub(crate) fn user_lock_dir(euid: u32) -> PathBuf {
    user_lock_dir_in(
        Path::new(USER_LOCK_BASE),
        Path::new(USER_LOCK_FALLBACK_BASE),
        euid,
    )
}

/// [`user_lock_dir`] with other bases, for tests.
pub(crate) fn user_lock_dir_in(run_lock: &Path, fallback: &Path, euid: u32) -> PathBuf {
    // Machine state, not environment: every copy on this machine sees the same answer.
    let shared_sticky = std::fs::symlink_metadata(run_lock)
        .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o1002 == 0o1002);
    let base = if shared_sticky { run_lock } else { fallback };
    base.join(format!("unique-instance-{euid}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn plan_in(options: &InstanceOptions, scope: Scope, base: &Path) -> Result<LockPlan> {
        let name = InstanceName::new(&options.name).expect("valid name");
        let env = Env {
            var: &|_| None,
            euid: &|| rustix::process::geteuid().as_raw(),
            service_base: base,
        };
        lock_plan(options, &name, scope, &env)
    }

    #[test]
    fn system_scope_uses_a_services_own_directory_only_when_it_is_safe() {
        let base = tempfile::tempdir().expect("tempdir");
        let services = base.path().join("unique-instance");
        let name = "org.example.Deployed";
        let options = InstanceOptions::new(name);
        // No per-service directory: the shared one.
        let plan = plan_in(&options, Scope::System, &services).expect("plan");
        assert_eq!(plan.dir, PathBuf::from(SYSTEM_LOCK_DIR));
        assert!(plan.shared_system_dir && !plan.service_dir);
        std::fs::create_dir(&services).expect("mkdir");
        std::fs::set_permissions(&services, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let plan = plan_in(&options, Scope::System, &services).expect("plan");
        assert_eq!(plan.dir, PathBuf::from(SYSTEM_LOCK_DIR));
        // Made by the deployment: used, and never created by us.
        let own = services.join(name);
        std::fs::create_dir(&own).expect("mkdir");
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let plan = plan_in(&options, Scope::System, &services).expect("plan");
        assert_eq!(plan.path(), own.join(format!("{name}.lock")));
        assert!(plan.service_dir && !plan.shared_system_dir && plan.root_may_own);
        assert_eq!(plan.create_dir_mode, None);
        // Not for the user scope, nor over an explicit directory.
        let plan = plan_in(&options, Scope::User, &services).expect("plan");
        assert!(!plan.service_dir && plan.private_dir);
        let explicit = InstanceOptions::new(name).lock_dir("/somewhere");
        let plan = plan_in(&explicit, Scope::System, &services).expect("plan");
        assert_eq!(plan.dir, PathBuf::from("/somewhere"));
        // Writable by others than root and its owner: refused, not silently replaced.
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        assert!(matches!(
            plan_in(&options, Scope::System, &services),
            Err(Error::UnsafeLockPath { .. })
        ));
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&services, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            plan_in(&options, Scope::System, &services),
            Err(Error::UnsafeLockPath { .. })
        ));
        // A symlink instead of the directory: refused.
        std::fs::set_permissions(&services, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::remove_dir(&own).expect("rmdir");
        std::os::unix::fs::symlink(base.path(), &own).expect("symlink");
        assert!(matches!(
            plan_in(&options, Scope::System, &services),
            Err(Error::UnsafeLockPath { .. })
        ));
    }

    #[test]
    fn lock_follows_who_you_are() {
        assert!(lock_is_system(Scope::Auto, 0));
        assert!(!lock_is_system(Scope::Auto, 1000));
        assert!(lock_is_system(Scope::System, 1000));
        assert!(!lock_is_system(Scope::User, 0));
    }

    #[test]
    fn user_dir_depends_on_the_uid_alone() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        let run_lock = base.path().join("run-lock");
        let fallback = base.path().join("tmp");
        // Missing /run/lock: the fallback.
        assert_eq!(
            user_lock_dir_in(&run_lock, &fallback, 4_000_000),
            fallback.join("unique-instance-4000000")
        );
        // Not sticky and world-writable: the fallback.
        std::fs::create_dir(&run_lock).expect("mkdir");
        std::fs::set_permissions(&run_lock, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            user_lock_dir_in(&run_lock, &fallback, 1000),
            fallback.join("unique-instance-1000")
        );
        std::fs::set_permissions(&run_lock, std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
        let root_owned = rustix::process::geteuid().is_root();
        let expected = if root_owned { &run_lock } else { &fallback };
        assert_eq!(
            user_lock_dir_in(&run_lock, &fallback, 1000),
            expected.join("unique-instance-1000")
        );
        // Nothing from the environment is consulted: the function takes none. On this machine:
        let here = user_lock_dir(1000);
        assert!(
            here == Path::new("/run/lock/unique-instance-1000")
                || here == Path::new("/tmp/unique-instance-1000"),
            "{here:?}"
        );
    }
}

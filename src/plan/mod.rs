//! What the options and the environment resolve to, before anything is touched: the name, the
//! scope in effect, the lock file's plan (see `lock`) and the bus's.
//! It must not open, lock or create anything, nor connect to a bus; it reads the environment
//! and the UID only through [`Env`], so unit tests give it theirs (what it looks at on the
//! machine is metadata: `$XDG_RUNTIME_DIR/bus`, `/run/lock`, a service's own directory).
//!
//! Over 400 lines: more than a third is its unit tests, each with a given environment.

mod lock;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::name::InstanceName;
use crate::options::InstanceOptions;
use crate::scope::{Backend, BackendSelection, BusKind, SCOPE_ENV, Scope};

pub(crate) use lock::{LockPlan, SERVICE_LOCK_BASE, SYSTEM_LOCK_DIR};

/// What [`InstanceOptions::plan`] decided, before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The validated name.
    pub name: String,
    /// The lock file that would be taken, if any.
    pub lock_file: Option<PathBuf>,
    /// The bus the name would be owned on, if any.
    pub bus: Option<BusKind>,
    /// The scope in effect: [`Scope::Auto`] resolved to [`Scope::User`] or [`Scope::System`]
    /// (the lock file's rule, or the bus's for the D-Bus backend alone).
    pub scope: Scope,
    /// Why that bus (or none) was chosen.
    pub bus_reason: &'static str,
}

/// Why a bus was chosen, for `Debug`, logs and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BusPlan {
    pub(crate) kind: BusKind,
    pub(crate) why: &'static str,
}

/// One backend to acquire, as planned: the acquisition walks them in order (see [`steps`]).
#[derive(Debug)]
pub(crate) enum Step {
    /// The lock file.
    LockFile(LockPlan),
    /// The bus name.
    Bus(BusPlan),
}

/// The steps of an acquisition, in order: the lock file first (cheap, local, and the ground
/// truth on this machine), then the bus name. The release goes the other way.
pub(crate) fn steps(lock: Option<LockPlan>, bus: Option<BusPlan>) -> Vec<Step> {
    let lock = lock.map(Step::LockFile);
    let bus = bus.map(Step::Bus);
    lock.into_iter().chain(bus).collect()
}

/// What planning reads besides the options: the environment, who we are, and where deployed
/// services' own lock directories are. [`Env::process`] is this process's; unit tests make
/// their own.
pub(crate) struct Env<'a> {
    /// An environment variable, bytes and all.
    pub(crate) var: &'a dyn Fn(&str) -> Option<OsString>,
    /// The effective UID; asked only when a lock file is planned.
    pub(crate) euid: &'a dyn Fn() -> u32,
    /// [`SERVICE_LOCK_BASE`], or another base in tests (a public way to move it would be a way
    /// to split copies).
    pub(crate) service_base: &'a Path,
}

impl Env<'static> {
    /// This process's environment and effective UID, and the real [`SERVICE_LOCK_BASE`].
    pub(crate) fn process() -> Self {
        fn var(k: &str) -> Option<OsString> {
            std::env::var_os(k)
        }
        fn euid() -> u32 {
            rustix::process::geteuid().as_raw()
        }
        Env {
            var: &var,
            euid: &euid,
            service_base: Path::new(SERVICE_LOCK_BASE),
        }
    }
}

/// What [`resolve`] decides: the name, the scope as asked (not yet resolved from Auto), the
/// lock file and the bus.
pub(crate) type Resolved = (InstanceName, Scope, Option<LockPlan>, Option<BusPlan>);

impl InstanceOptions {
    /// Decides the lock file and bus from the options and the environment, touching nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for an invalid name; [`Error::InvalidEnvironment`] for a bad
    /// [`SCOPE_ENV`](crate::SCOPE_ENV); [`Error::NoUsableBackend`] when the D-Bus backend was asked for and no
    /// bus is configured.
    pub fn plan(&self) -> Result<Plan> {
        plan(self, &Env::process())
    }

    /// [`resolve`] in this process's environment.
    pub(crate) fn resolve(&self) -> Result<Resolved> {
        resolve(self, &Env::process())
    }
}

/// [`InstanceOptions::plan`] in `env`.
pub(crate) fn plan(options: &InstanceOptions, env: &Env) -> Result<Plan> {
    let (name, scope, lock, bus) = resolve(options, env)?;
    let scope = effective_scope(scope, lock.as_ref(), bus.as_ref());
    Ok(Plan {
        name: name.to_string(),
        lock_file: lock.map(|l| l.path()),
        bus: bus.map(|b| b.kind),
        scope,
        bus_reason: bus.map_or(
            "no session bus is configured and this is not a system service",
            |b| b.why,
        ),
    })
}

/// The name, the scope as asked (not yet resolved from Auto), the lock file and the bus, for
/// `options` in `env`.
pub(crate) fn resolve(options: &InstanceOptions, env: &Env) -> Result<Resolved> {
    let name = InstanceName::new(&options.name).map_err(|rule| Error::InvalidName {
        name: options.name.clone(),
        rule,
    })?;
    // Settings that name files are read as they are, bytes and all: a value that is not
    // UTF-8 is either used exactly or refused, never taken for "unset". The bus's are
    // taken for unset unless they are UTF-8.
    let env_str = |k: &str| (env.var)(k).and_then(|v| v.into_string().ok());
    let scope = match options.scope {
        Some(scope) => scope,
        None => scope_from_env(env.var)?.unwrap_or(Scope::Auto),
    };
    let only_bus = options.backends == BackendSelection::Only(Backend::Dbus);
    let bus = if options.backends.uses(Backend::Dbus) {
        choose_bus(scope, &env_str)
    } else {
        None
    };
    if only_bus && bus.is_none() {
        return Err(Error::NoUsableBackend {
            name: name.to_string(),
            reason: "the D-Bus backend was asked for, but no session bus is configured \
                     (DBUS_SESSION_BUS_ADDRESS is unset and there is no $XDG_RUNTIME_DIR/bus); \
                     run inside a session, choose the system scope (Scope::System; --system on the \
                     command line), or use the lock-file backend"
                .into(),
            source: None,
        });
    }
    let lock = if options.backends.uses(Backend::LockFile) {
        Some(lock::lock_plan(options, &name, scope, env)?)
    } else {
        None
    };
    Ok((name, scope, lock, bus))
}

/// The scope in effect: [`Scope::Auto`] resolved by the lock file's rule (who you are), or by
/// the bus's for the D-Bus backend alone.
pub(crate) fn effective_scope(
    asked: Scope,
    lock: Option<&LockPlan>,
    bus: Option<&BusPlan>,
) -> Scope {
    match (asked, lock, bus) {
        (Scope::Auto, Some(lock), _) if lock.root_may_own => Scope::System,
        (Scope::Auto, None, Some(bus)) if bus.kind == BusKind::System => Scope::System,
        (Scope::Auto, _, _) => Scope::User,
        (explicit, _, _) => explicit,
    }
}

/// Reads [`SCOPE_ENV`]; `None` when it is unset or empty. A value that is not UTF-8 is an
/// error like any other unknown value, never taken for "unset".
pub(crate) fn scope_from_env(
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Option<Scope>, crate::Error> {
    let Some(value) = env(SCOPE_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.to_str() {
        Some("user") => Ok(Some(Scope::User)),
        Some("system") => Ok(Some(Scope::System)),
        Some("auto") => Ok(Some(Scope::Auto)),
        _ => Err(crate::Error::InvalidEnvironment {
            variable: SCOPE_ENV,
            value: value.to_string_lossy().into_owned(),
            expected: "one of user, system, auto",
        }),
    }
}

/// The bus for `scope`, from the environment, deterministically.
pub(crate) fn choose_bus(scope: Scope, env: &dyn Fn(&str) -> Option<String>) -> Option<BusPlan> {
    let session_configured = || {
        if env("DBUS_SESSION_BUS_ADDRESS").is_some_and(|a| !a.is_empty()) {
            return Some("DBUS_SESSION_BUS_ADDRESS is set");
        }
        let runtime = env("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute())?;
        Path::new(&runtime)
            .join("bus")
            .exists()
            .then_some("$XDG_RUNTIME_DIR/bus exists")
    };
    match scope {
        Scope::User => session_configured().map(|why| BusPlan {
            kind: BusKind::Session,
            why,
        }),
        Scope::System => Some(BusPlan {
            kind: BusKind::System,
            why: "system scope",
        }),
        Scope::Auto => {
            if let Some(why) = session_configured() {
                Some(BusPlan {
                    kind: BusKind::Session,
                    why,
                })
            } else if env("INVOCATION_ID").is_some() {
                Some(BusPlan {
                    kind: BusKind::System,
                    why: "started by systemd (INVOCATION_ID is set) with no session bus",
                })
            } else if env("DBUS_STARTER_BUS_TYPE").as_deref() == Some("system") {
                Some(BusPlan {
                    kind: BusKind::System,
                    why: "activated by the system bus (DBUS_STARTER_BUS_TYPE=system)",
                })
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn os_env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let env = env_of(pairs);
        move |k: &str| env(k).map(OsString::from)
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn auto_bus_prefers_session_then_systemd_then_activation_then_none() {
        let session = env_of(&[
            ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x"),
            ("INVOCATION_ID", "1"),
        ]);
        assert_eq!(
            choose_bus(Scope::Auto, &session).map(|b| b.kind),
            Some(BusKind::Session)
        );
        let unit = env_of(&[("INVOCATION_ID", "abc")]);
        assert_eq!(
            choose_bus(Scope::Auto, &unit).map(|b| b.kind),
            Some(BusKind::System)
        );
        let activated = env_of(&[("DBUS_STARTER_BUS_TYPE", "system")]);
        assert_eq!(
            choose_bus(Scope::Auto, &activated).map(|b| b.kind),
            Some(BusKind::System)
        );
        let session_activated = env_of(&[("DBUS_STARTER_BUS_TYPE", "session")]);
        assert_eq!(choose_bus(Scope::Auto, &session_activated), None);
        assert_eq!(choose_bus(Scope::Auto, &env_of(&[])), None);
    }

    #[test]
    fn explicit_scopes_pick_their_bus() {
        assert_eq!(choose_bus(Scope::User, &env_of(&[])), None);
        assert_eq!(
            choose_bus(Scope::System, &env_of(&[])).map(|b| b.kind),
            Some(BusKind::System)
        );
    }

    #[test]
    fn scope_from_the_environment_is_exact() {
        assert_eq!(scope_from_env(&os_env_of(&[])).ok(), Some(None));
        assert_eq!(
            scope_from_env(&os_env_of(&[(SCOPE_ENV, "")])).ok(),
            Some(None)
        );
        for (value, scope) in [
            ("user", Scope::User),
            ("system", Scope::System),
            ("auto", Scope::Auto),
        ] {
            assert_eq!(
                scope_from_env(&os_env_of(&[(SCOPE_ENV, value)])).ok(),
                Some(Some(scope))
            );
        }
        for bad in ["System", "machine", " system"] {
            match scope_from_env(&os_env_of(&[(SCOPE_ENV, bad)])) {
                Err(crate::Error::InvalidEnvironment {
                    variable, value, ..
                }) => {
                    assert_eq!((variable, value.as_str()), (SCOPE_ENV, bad));
                }
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
        }
        // Not UTF-8: an error, not "unset" (which would silently mean Auto).
        use std::os::unix::ffi::OsStringExt;
        let bytes = |k: &str| (k == SCOPE_ENV).then(|| OsString::from_vec(b"syst\xffem".to_vec()));
        assert!(matches!(
            scope_from_env(&bytes),
            Err(crate::Error::InvalidEnvironment {
                variable: SCOPE_ENV,
                ..
            })
        ));
    }

    /// Planning reads only the environment it is given: the same options plan differently in
    /// different environments, and the real one is not consulted.
    fn plan_for(options: &InstanceOptions, pairs: &[(&str, &str)], euid: u32) -> Result<Plan> {
        let var = os_env_of(pairs);
        let none = std::path::PathBuf::from("/nonexistent/unique-instance-unit");
        let who = move || euid;
        plan(
            options,
            &Env {
                var: &var,
                euid: &who,
                service_base: &none,
            },
        )
    }

    #[test]
    fn the_scope_and_the_lock_dir_come_from_the_environment_given() {
        let options = InstanceOptions::new("org.example.Planned");
        let env = [(SCOPE_ENV, "system"), (crate::LOCK_DIR_ENV, "/somewhere")];
        let planned = plan_for(&options, &env, 1000).expect("plan");
        assert_eq!(planned.scope, Scope::System);
        assert_eq!(planned.bus, Some(BusKind::System));
        assert_eq!(
            planned.lock_file,
            Some(PathBuf::from("/somewhere/org.example.Planned.lock"))
        );
        // A scope chosen in code wins over the environment's.
        let user = InstanceOptions::new("org.example.Planned").scope(Scope::User);
        let planned = plan_for(&user, &env, 1000).expect("plan");
        assert_eq!((planned.scope, planned.bus), (Scope::User, None));
        // Nothing set: Auto follows who we are, and no bus is configured.
        let planned = plan_for(&options, &[], 1000).expect("plan");
        assert_eq!((planned.scope, planned.bus), (Scope::User, None));
        assert_eq!(
            planned.lock_file,
            Some(lock::user_lock_dir(1000).join("org.example.Planned.lock"))
        );
        let planned = plan_for(&options, &[], 0).expect("plan");
        assert_eq!(planned.scope, Scope::System);
        assert_eq!(
            planned.lock_file,
            Some(Path::new(SYSTEM_LOCK_DIR).join("org.example.Planned.lock"))
        );
    }

    #[test]
    fn a_relative_lock_dir_in_the_environment_is_refused() {
        let options = InstanceOptions::new("org.example.Planned");
        match plan_for(&options, &[(crate::LOCK_DIR_ENV, "locks")], 1000) {
            Err(Error::InvalidOption { option, .. }) => assert_eq!(option, crate::LOCK_DIR_ENV),
            other => panic!("a relative directory was accepted: {other:?}"),
        }
    }

    #[test]
    fn the_dbus_backend_alone_needs_a_configured_bus() {
        let options = InstanceOptions::new("org.example.Planned")
            .scope(Scope::User)
            .backend(Backend::Dbus);
        assert!(matches!(
            plan_for(&options, &[], 1000),
            Err(Error::NoUsableBackend { .. })
        ));
        let session = [("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x")];
        let planned = plan_for(&options, &session, 1000).expect("plan");
        assert_eq!(planned.bus, Some(BusKind::Session));
        assert_eq!(planned.lock_file, None);
        // Auto resolved by the bus's rule when there is no lock file.
        let auto = InstanceOptions::new("org.example.Planned").backend(Backend::Dbus);
        let activated = [("DBUS_STARTER_BUS_TYPE", "system")];
        let planned = plan_for(&auto, &activated, 1000).expect("plan");
        assert_eq!(
            (planned.scope, planned.bus),
            (Scope::System, Some(BusKind::System))
        );
    }
}

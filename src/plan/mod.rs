//! What the options and the environment resolve to, before anything is touched: the name, the
//! scope in effect, the lock file's plan (see `lock`) and the bus's.
//! It must not open, lock or create anything, nor connect to a bus.

mod lock;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::name::InstanceName;
use crate::options::InstanceOptions;
use crate::scope::{Backend, BusKind, SCOPE_ENV, Scope};

pub(crate) use lock::LockPlan;
#[cfg(test)]
pub(crate) use lock::SYSTEM_LOCK_DIR;

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

impl InstanceOptions {
    /// Decides the lock file and bus from the options and the environment, touching nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for an invalid name; [`Error::InvalidEnvironment`] for a bad
    /// [`SCOPE_ENV`](crate::SCOPE_ENV); [`Error::NoUsableBackend`] when the D-Bus backend was asked for and no
    /// bus is configured.
    pub fn plan(&self) -> Result<Plan> {
        let (name, scope, lock, bus) = self.resolve()?;
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

    /// The name, the scope in effect (as asked, not yet resolved from Auto), the lock file and
    /// the bus.
    pub(crate) fn resolve(
        &self,
    ) -> Result<(InstanceName, Scope, Option<LockPlan>, Option<BusPlan>)> {
        let name = InstanceName::new(&self.name).map_err(|rule| Error::InvalidName {
            name: self.name.clone(),
            rule,
        })?;
        let env = |k: &str| std::env::var(k).ok();
        // Settings that name files are read as they are, bytes and all: a value that is not
        // UTF-8 is either used exactly or refused, never taken for "unset".
        let env_os = |k: &str| std::env::var_os(k);
        let scope = match self.scope {
            Some(scope) => scope,
            None => scope_from_env(&env_os)?.unwrap_or(Scope::Auto),
        };
        let bus = match self.backend {
            Backend::LockFile => None,
            Backend::Auto | Backend::Dbus => choose_bus(scope, &env),
        };
        if self.backend == Backend::Dbus && bus.is_none() {
            return Err(Error::NoUsableBackend {
                name: name.to_string(),
                reason: "the D-Bus backend was asked for, but no session bus is configured \
                         (DBUS_SESSION_BUS_ADDRESS is unset and there is no $XDG_RUNTIME_DIR/bus); \
                         run inside a session, use --system, or use the lock-file backend"
                    .into(),
                source: None,
            });
        }
        let lock = if self.backend == Backend::Dbus {
            None
        } else {
            Some(self.lock_plan(&name, scope, &env_os)?)
        };
        Ok((name, scope, lock, bus))
    }
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
}

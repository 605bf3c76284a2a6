//! What an instance holds: one part per backend, all of one shape ([`Held`]), kept in the order
//! they were acquired ([`Holding`]) and released in the reverse order, whether by a release or
//! by a drop (an acquisition that failed or was cancelled halfway).
//! Must not: acquire (`acquire`), or speak a backend's protocol (each part's module does).

use crate::dbus::HeldName;
use crate::error::Result;
use crate::lockfile::HeldFile;
use crate::loss::LossReason;
use crate::scope::Backend;

/// One backend's hold on the instance.
// One of each at most, made once per acquisition and kept in place: boxing would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Held {
    /// The lock file, locked, with its record and its watch.
    LockFile(HeldFile),
    /// The bus name, owned.
    Name(HeldName),
}

impl Held {
    /// The backend this part is.
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Held::LockFile(_) => Backend::LockFile,
            Held::Name(_) => Backend::Dbus,
        }
    }

    /// Gives this part up, from async code.
    /// `Some` when the bus name had stopped being ours before (see `NotOursAtRelease`).
    async fn release(self, name: &str) -> Result<Option<LossReason>> {
        match self {
            Held::LockFile(file) => file.release().map(|()| None),
            Held::Name(bus) => bus.release(name).await,
        }
    }

    /// Gives this part up without awaiting anything; `service` is the runtime of the guard's
    /// service thread, when it has one and this is not that thread.
    fn release_blocking(
        self,
        service: Option<&tokio::runtime::Handle>,
        name: &str,
    ) -> Result<Option<LossReason>> {
        match self {
            Held::LockFile(file) => file.release().map(|()| None),
            Held::Name(bus) => bus.release_blocking(service, name),
        }
    }
}

/// The parts held, in the order they were acquired (the lock file first: the ground truth on
/// this machine is taken first and let go last).
#[derive(Default)]
pub(crate) struct Holding(Vec<Held>);

impl Holding {
    /// Adds a part just acquired: it will be released before every part held already.
    pub(crate) fn push(&mut self, part: Held) {
        self.0.push(part);
    }

    /// The parts, in the order they were acquired.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Held> {
        self.0.iter()
    }

    /// The parts, in the order they were acquired.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        self.0.iter_mut()
    }

    /// The lock file held, if any.
    pub(crate) fn lock_file(&self) -> Option<&HeldFile> {
        self.0.iter().find_map(|part| match part {
            Held::LockFile(file) => Some(file),
            _ => None,
        })
    }

    /// The lock file held, if any, to complete its record.
    pub(crate) fn lock_file_mut(&mut self) -> Option<&mut HeldFile> {
        self.0.iter_mut().find_map(|part| match part {
            Held::LockFile(file) => Some(file),
            _ => None,
        })
    }

    /// The bus name owned, if any.
    pub(crate) fn name(&self) -> Option<&HeldName> {
        self.0.iter().find_map(|part| match part {
            Held::Name(bus) => Some(bus),
            _ => None,
        })
    }

    /// Releases every part, the last acquired first, from async code. Every part is released
    /// whatever failed before it; the first failure is reported.
    /// `Some` when the bus name had stopped being ours before the release (see
    /// `NotOursAtRelease`): the lock file, if held, says whether exclusion held all the same.
    pub(crate) async fn release(&mut self, name: &str) -> Result<Option<LossReason>> {
        let mut result = Ok(None);
        while let Some(part) = self.0.pop() {
            result = and_first(result, part.release(name).await);
        }
        result
    }

    /// [`Holding::release`] without awaiting anything (see [`Held::release_blocking`]).
    pub(crate) fn release_blocking(
        &mut self,
        service: Option<&tokio::runtime::Handle>,
        name: &str,
    ) -> Result<Option<LossReason>> {
        let mut result = Ok(None);
        while let Some(part) = self.0.pop() {
            result = and_first(result, part.release_blocking(service, name));
        }
        result
    }
}

/// The first failure of two releases, else the first loss either found.
fn and_first(
    before: Result<Option<LossReason>>,
    next: Result<Option<LossReason>>,
) -> Result<Option<LossReason>> {
    Ok(before?.or(next?))
}

impl Drop for Holding {
    /// The parts still held (an acquisition that failed or was cancelled halfway) are dropped
    /// the last acquired first, as a release would: the bus name is gone before the lock file.
    fn drop(&mut self) {
        while let Some(part) = self.0.pop() {
            drop(part);
        }
    }
}

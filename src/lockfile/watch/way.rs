//! The way a lock directory's path goes (`Way`): the directories it enters and the symlinks it
//! goes through as it resolves, which the watch watches; where it breaks when it leads nowhere.
//! Must not: decide a loss; it only describes the path as it resolves now.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::lockfile::walk::MAX_SYMLINKS;

/// The directories a lock directory's path goes through as it resolves (see [`way_to`]; and
/// the acquisition's walk, which finds the same on its way: `walk_dir`).
#[derive(Debug, Default)]
pub(in crate::lockfile) struct Way {
    /// Every directory the resolution enters, `/` aside (it can be neither renamed nor
    /// removed): the ancestors of the path as given and, through each symlink, the directories
    /// above its target, down to the lock directory itself.
    pub(in crate::lockfile) entered: Vec<PathBuf>,
    /// Each symlink on the way: the directory that holds it, and its name there.
    pub(in crate::lockfile) links: Vec<(PathBuf, OsString)>,
    /// Whether anyone but root and us may rename or remove entries of a directory on the way
    /// (one writable by its group or by all, without the sticky bit): then an overflowed
    /// event queue may hide what they did (see [`NameHistory::changed_behind_us`]). Known to
    /// the walk and to `way_to`, which look at each directory's mode; not part of what makes
    /// two ways the same.
    pub(in crate::lockfile) others_may_rename: bool,
    /// Where a path that leads nowhere breaks (see [`way_to`]): the directory the resolution
    /// was in and the name missing there, when that name is not the path's last (a copy would
    /// make the last, the lock directory itself, and lock in it). Not part of what makes two
    /// ways the same.
    pub(in crate::lockfile) breaks_at: Option<(PathBuf, OsString)>,
}

impl PartialEq for Way {
    fn eq(&self, other: &Self) -> bool {
        self.entered == other.entered && self.links == other.links
    }
}

impl Eq for Way {}

impl Way {
    /// Does this way (the path's now, after one link on `settled` was made anew) end in the
    /// same directory as `settled`, entering no directory and going through no link that
    /// `settled` did not? Those of `settled` are watched and were seen unchanged but for that
    /// link, so the path led to our directory or nowhere at every moment; one outside it was
    /// not watched, and may have been flipped away and back. Compared as sets, not in order: a
    /// link re-made with an absolute target (`ln -sfn /srv/v1 current` over `current -> v1`)
    /// enters `/srv`'s ancestors again, and goes the same way.
    pub(in crate::lockfile) fn within(&self, settled: &Way) -> bool {
        *self == *settled
            || (self.entered.last().is_some()
                && self.entered.last() == settled.entered.last()
                && self.entered.iter().all(|d| settled.entered.contains(d))
                && self.links.iter().all(|l| settled.links.contains(l)))
    }
}

/// May anyone but its owner (root or us: the walk's rule) and root rename or remove the
/// entries of a directory with this mode? Group- or other-writable, without the sticky bit.
pub(in crate::lockfile) fn others_may_rename_in(mode: u32) -> bool {
    mode & 0o022 != 0 && mode & 0o1000 == 0
}

/// Resolves `dir` one component at a time from `/`, as the kernel does (a symlink's target
/// takes its place, `..` goes up from where the resolution is), noting the directories it goes
/// through: renaming or removing any of them, or changing an entry of one that holds a symlink,
/// can make the path lead elsewhere; and whether others may rename on the way (from the modes
/// of `/` and of the directories entered, as they are now: see
/// [`NameHistory::note_others_may_rename`]). Best effort and unchecked, as it only adds
/// wake-ups: it stops where the path leads nowhere, and [`WatchHandle::check_path`] decides.
pub(in crate::lockfile) fn way_to(dir: &Path) -> Way {
    use std::collections::VecDeque;
    use std::os::unix::fs::PermissionsExt;
    let mut way = Way {
        others_may_rename: std::fs::metadata("/")
            .is_ok_and(|m| others_may_rename_in(m.permissions().mode())),
        ..Way::default()
    };
    let mut resolved = PathBuf::from("/");
    let mut pending: VecDeque<OsString> = names(dir).into();
    let mut links = 0;
    let mut complete = true;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let here = resolved.join(&name);
        // One `lstat` per name: whether it is a link, and a directory's mode.
        let meta = std::fs::symlink_metadata(&here);
        let target = match &meta {
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(&here),
            Ok(_) => Err(std::io::ErrorKind::InvalidInput.into()),
            Err(e) => Err(std::io::Error::from(e.kind())),
        };
        match target {
            Ok(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    complete = false;
                    break;
                }
                way.links.push((resolved.clone(), name.clone()));
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                // The rest of the path goes on from where the link points.
                for part in names(&target).into_iter().rev() {
                    pending.push_front(part);
                }
            }
            // Not a symlink: entered.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                if let Ok(m) = &meta
                    && m.file_type().is_dir()
                {
                    way.others_may_rename |= others_may_rename_in(m.permissions().mode());
                }
                way.entered.push(here.clone());
                resolved = here;
            }
            // Missing, or not ours to look at: the path leads nowhere from here.
            Err(e) => {
                if e.kind() == std::io::ErrorKind::NotFound && !pending.is_empty() {
                    way.breaks_at = Some((resolved.clone(), name));
                }
                complete = false;
                break;
            }
        }
    }
    // A path that ends in `..` resolves to a directory entered before: it is the last, as the
    // walk has it (`walk_dir`), so that both ways compare equal and the last is ours.
    if complete && resolved != Path::new("/") && way.entered.last() != Some(&resolved) {
        way.entered.push(resolved);
    }
    way
}

/// The names `path` is made of, `..` included, as a resolution takes them.
fn names(path: &Path) -> Vec<OsString> {
    use std::path::Component;
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A way is within the settled one when it ends in the same directory, entering no other
    /// directory and going through no other link, in any order: a link re-made with an absolute
    /// target is; one that enters another directory, goes through another link, or ends
    /// elsewhere is not.
    #[test]
    fn a_way_within_the_settled_one_ends_there_and_enters_nothing_new() {
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        for dir in ["v1/run", "v2/run", "other"] {
            std::fs::create_dir_all(b.join(dir)).expect("mkdir");
        }
        std::os::unix::fs::symlink("v1", b.join("current")).expect("symlink");
        let lock_dir = b.join("current/run");
        let settled = way_to(&lock_dir);
        let again = |target: &Path| {
            std::fs::remove_file(b.join("current")).expect("rm");
            std::os::unix::fs::symlink(target, b.join("current")).expect("symlink");
            way_to(&lock_dir)
        };
        assert!(again(&b.join("v1")).within(&settled), "absolute");
        assert!(again(Path::new("./v1")).within(&settled), "through `.`");
        assert!(
            !again(Path::new("other/../v1")).within(&settled),
            "enters `other`"
        );
        assert!(!again(Path::new("v2")).within(&settled), "ends elsewhere");
        std::os::unix::fs::symlink("v1", b.join("inner")).expect("symlink");
        assert!(!again(Path::new("inner")).within(&settled), "another link");
    }

    /// `srv/current -> ../data/rel/v1` (relative, through `..`) and `data/rel -> /abs/rel`
    /// (absolute): every directory entered is listed, those above each target included, and
    /// so is every directory holding a link.
    #[test]
    fn the_way_includes_the_directories_above_each_symlink_target() {
        let base = tempfile::tempdir().expect("tempdir");
        // Resolved, so that the expected paths hold no symlink of the machine's own.
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("abs/rel/v1/run")).expect("mkdir");
        std::fs::create_dir_all(b.join("data")).expect("mkdir");
        std::fs::create_dir_all(b.join("srv")).expect("mkdir");
        std::os::unix::fs::symlink(b.join("abs/rel"), b.join("data/rel")).expect("symlink");
        std::os::unix::fs::symlink("../data/rel/v1", b.join("srv/current")).expect("symlink");
        let way = way_to(&b.join("srv/current/run"));
        // As a set: the absolute link starts again from `/`, through `b`'s ancestors again.
        let entered: BTreeSet<&Path> = way.entered.iter().map(PathBuf::as_path).collect();
        let mut expected: BTreeSet<PathBuf> = b
            .ancestors()
            .filter(|a| a.parent().is_some())
            .map(Path::to_owned)
            .collect();
        expected.extend(
            [
                "srv",
                "data",
                "abs",
                "abs/rel",
                "abs/rel/v1",
                "abs/rel/v1/run",
            ]
            .map(|d| b.join(d)),
        );
        assert_eq!(
            entered,
            expected.iter().map(PathBuf::as_path).collect(),
            "{way:?}"
        );
        assert_eq!(
            way.links,
            [
                (b.join("srv"), OsString::from("current")),
                (b.join("data"), OsString::from("rel"))
            ],
            "{way:?}"
        );
    }

    /// The acquisition's walk goes the same way as [`way_to`], and says so (its watches are
    /// added along it, and the watch's thread adds them again along `way_to`'s).
    #[test]
    fn the_walk_goes_the_way_the_watch_follows() {
        use crate::lockfile::dir::{open_dir, tests::private_plan};
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("abs/rel/v1")).expect("mkdir");
        std::fs::create_dir_all(b.join("data")).expect("mkdir");
        std::fs::create_dir_all(b.join("srv")).expect("mkdir");
        std::os::unix::fs::symlink(b.join("abs/rel"), b.join("data/rel")).expect("symlink");
        std::os::unix::fs::symlink("../data/rel/v1", b.join("srv/current")).expect("symlink");
        std::fs::create_dir_all(b.join("abs/rel/v1/run/sub")).expect("mkdir");
        // A per-user directory, as the plan has it.
        std::fs::set_permissions(
            b.join("abs/rel/v1/run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("../abs/rel/v1/run/..", b.join("srv/up")).expect("symlink");
        for lock_dir in [
            b.join("srv/current/run"),
            b.join("srv/current/run/sub/.."),
            b.join("srv/up/run"),
            b.join("srv/current/run/"),
        ] {
            for round in ["made by the walk's caller", "there already"] {
                let dir = open_dir(&private_plan(&lock_dir), false).expect("open_dir");
                let way = way_to(&lock_dir);
                assert_eq!(*dir.way, way, "{}: {round}", lock_dir.display());
                assert_eq!(
                    way.entered.last(),
                    Some(&b.join("abs/rel/v1/run")),
                    "{}: the last is the lock directory",
                    lock_dir.display()
                );
            }
        }
    }

    /// Whether others may rename on the way is read from the modes as they are when the way is
    /// looked at: a directory made writable by its group since counts, a sticky one does not.
    #[test]
    fn the_way_says_whether_others_may_rename_on_it_now() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("a/run")).expect("mkdir");
        let lock_dir = b.join("a/run");
        let before = way_to(&lock_dir).others_may_rename;
        for (mode, others) in [(0o2775, true), (0o1777, before), (0o755, before)] {
            std::fs::set_permissions(b.join("a"), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
            assert_eq!(way_to(&lock_dir).others_may_rename, others, "{mode:o}");
        }
    }

    /// A path that leads nowhere stops where it does, with what it went through so far.
    #[test]
    fn the_way_stops_where_the_path_leads_nowhere() {
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        let way = way_to(&b.join("missing/run"));
        assert_eq!(way.entered.last(), Some(&b), "{way:?}");
        assert!(way.links.is_empty(), "{way:?}");
    }
}

//! What the generator looks up on the machine (or in the image being built): users, groups
//! and the executable.

use std::path::Path;

use super::check::valid_account_name;

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

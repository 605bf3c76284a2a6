//! `unique-instance generate`: validate, then write the deployment files of `deploy` into a
//! directory, atomically, never overwriting a different file unless asked.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use unique_instance::InstanceName;

use crate::cli::GenerateArgs;
use crate::deploy::{self, Callers, Deployment, GeneratedFile};
use crate::{EXIT_USAGE, ExitCode, fail};

/// An output file exists with other contents, and --force was not given (`EX_CANTCREAT`).
const EXIT_CONFLICT: u8 = 73;
/// Reading or writing a file failed (`EX_IOERR`).
const EXIT_IO: u8 = 74;

pub(crate) fn generate(args: GenerateArgs) -> ExitCode {
    let deployment = match validate(&args) {
        Ok(d) => d,
        Err(message) => return fail(EXIT_USAGE, format_args!("{message}")),
    };
    let files = deployment.files();
    if let Err(message) = deploy::check_line_lengths(
        files
            .iter()
            .map(|f| (f.path.as_path(), f.contents.as_str())),
    ) {
        return fail(EXIT_USAGE, format_args!("{message}"));
    }
    // Everything is checked before anything is written: a refusal leaves the directory as it was.
    let mut writes = Vec::new();
    let mut conflicts = Vec::new();
    for file in &files {
        let target = args.out_dir.join(&file.path);
        let (state, previous) = match read_existing(&target) {
            Ok(Some(existing)) if existing == file.contents.as_bytes() => (State::Unchanged, None),
            Ok(Some(existing)) if args.force => (State::Replaced, Some(existing)),
            Ok(Some(_)) => {
                conflicts.push(target);
                continue;
            }
            Ok(None) => (State::Wrote, None),
            Err(Existing::NotAFile(kind)) => {
                return fail(
                    EXIT_CONFLICT,
                    format_args!(
                        "{} is {kind}, not a regular file, so nothing was written; remove it or \
                         choose another --out-dir",
                        target.display()
                    ),
                );
            }
            Err(Existing::Io(e)) => {
                return fail(
                    EXIT_IO,
                    format_args!("cannot read {}: {e}; nothing was written", target.display()),
                );
            }
        };
        writes.push(Planned {
            file,
            target,
            state,
            previous,
        });
    }
    if !conflicts.is_empty() {
        return fail(
            EXIT_CONFLICT,
            format_args!(
                "these files exist with other contents, so nothing was written: {}; compare them \
                 with what you meant, then remove them or pass --force to replace them",
                conflicts
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if let Err((code, message)) = write_all_or_nothing(&writes) {
        return fail(code, format_args!("{message}"));
    }
    for planned in &writes {
        say!(
            stdout,
            "{:<9} {}  (install as {})",
            planned.state.as_str(),
            planned.target.display(),
            planned.file.install_as.display()
        );
    }
    ExitCode::SUCCESS
}

/// Why what is at an output path cannot be compared with the file meant for it.
enum Existing {
    /// Not a regular file: a symlink, a FIFO (reading it would block), a device (`/dev/zero`
    /// would never end), a directory. A write would replace it (a rename), which is not what
    /// whoever put it there meant.
    NotAFile(&'static str),
    Io(std::io::Error),
}

/// The contents of the regular file at `target`, `None` when there is nothing there. Looked at
/// before it is opened, and opened without following a link or blocking.
fn read_existing(target: &Path) -> Result<Option<Vec<u8>>, Existing> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let kind = |t: std::fs::FileType| match () {
        () if t.is_symlink() => "a symbolic link",
        () if t.is_dir() => "a directory",
        () if t.is_fifo() => "a FIFO",
        () if t.is_socket() => "a socket",
        () if t.is_char_device() || t.is_block_device() => "a device",
        () => "not a regular file",
    };
    match std::fs::symlink_metadata(target) {
        Ok(meta) if !meta.file_type().is_file() => {
            return Err(Existing::NotAFile(kind(meta.file_type())));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Existing::Io(e)),
    }
    let mut file = std::fs::File::options()
        .read(true)
        .custom_flags(
            (rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NONBLOCK
                | rustix::fs::OFlags::NOCTTY)
                .bits() as i32,
        )
        .open(target)
        .map_err(Existing::Io)?;
    let meta = file.metadata().map_err(Existing::Io)?;
    if !meta.file_type().is_file() {
        return Err(Existing::NotAFile(kind(meta.file_type())));
    }
    let mut contents = Vec::new();
    file.read_to_end(&mut contents).map_err(Existing::Io)?;
    Ok(Some(contents))
}

/// What happens to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// It exists with these contents: left alone.
    Unchanged,
    /// It exists with other contents, and --force replaces it.
    Replaced,
    /// It does not exist yet.
    Wrote,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Unchanged => "unchanged",
            State::Replaced => "replaced",
            State::Wrote => "wrote",
        }
    }
}

/// One file to put in place, with what was there before (to put back if another file fails).
struct Planned<'a> {
    file: &'a GeneratedFile,
    target: PathBuf,
    state: State,
    previous: Option<Vec<u8>>,
}

/// What a failed write undoes: the temporary files, the files already renamed into place (new
/// ones removed, replaced ones given their old contents back) and the directories it created.
#[derive(Default)]
struct Undo {
    temps: Vec<PathBuf>,
    created_dirs: Vec<PathBuf>,
}

impl Undo {
    fn roll_back(self, placed: &[&Planned<'_>]) {
        for planned in placed.iter().rev() {
            match &planned.previous {
                Some(previous) => {
                    let _ = write_atomically(&planned.target, previous);
                }
                None => {
                    let _ = std::fs::remove_file(&planned.target);
                }
            }
        }
        for temp in &self.temps {
            let _ = std::fs::remove_file(temp);
        }
        for dir in self.created_dirs.iter().rev() {
            // Only if still empty: never anything someone else put there meanwhile.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Writes every file or none. Each is written to a temporary file in its own directory and
/// flushed; only once all of them are, are they renamed into place (a reader sees each file
/// whole, old or new). Any failure undoes everything done so far, so the output directory is
/// left as it was, and the message says what failed.
fn write_all_or_nothing(writes: &[Planned<'_>]) -> Result<(), (u8, String)> {
    let to_write: Vec<&Planned<'_>> = writes
        .iter()
        .filter(|p| p.state != State::Unchanged)
        .collect();
    let mut undo = Undo::default();
    let mut temps = Vec::new();
    for (index, planned) in to_write.iter().enumerate() {
        match write_temp(
            &planned.target,
            index,
            planned.file.contents.as_bytes(),
            &mut undo,
        ) {
            Ok(temp) => temps.push(temp),
            Err(e) => {
                undo.roll_back(&[]);
                return Err((
                    EXIT_IO,
                    format!(
                        "cannot write {}: {e}; nothing was written",
                        planned.target.display()
                    ),
                ));
            }
        }
    }
    let mut placed = Vec::new();
    for (planned, temp) in to_write.iter().zip(&temps) {
        let renamed = if planned.state == State::Wrote {
            rename_no_replace(temp, &planned.target)
        } else {
            std::fs::rename(temp, &planned.target)
        };
        if let Err(e) = renamed {
            let code = if e.kind() == std::io::ErrorKind::AlreadyExists {
                EXIT_CONFLICT
            } else {
                EXIT_IO
            };
            undo.roll_back(&placed);
            return Err((
                code,
                format!(
                    "cannot put {} in place: {e}; the files already put in place were taken \
                     back, so nothing was written",
                    planned.target.display()
                ),
            ));
        }
        placed.push(planned);
    }
    // Durable: each directory's new entries reach the disk.
    let mut dirs: Vec<&Path> = to_write.iter().filter_map(|p| p.target.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                (
                    EXIT_IO,
                    format!(
                        "every file was written, but {} could not be flushed to disk: {e}",
                        dir.display()
                    ),
                )
            })?;
    }
    Ok(())
}

/// Creates `dir` and the missing directories above it (mode 0755 whatever the umask: the bus
/// daemon reads its files as an unprivileged user), recording each one it made.
fn create_dirs(dir: &Path, undo: &mut Undo) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(d) = current.filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(d),
            Err(e) => return Err(e),
        }
        current = d.parent();
    }
    for d in missing.into_iter().rev() {
        std::fs::DirBuilder::new().mode(0o755).create(d)?;
        undo.created_dirs.push(d.to_owned());
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Writes `contents` to a new temporary file in `target`'s directory, flushed to disk, mode
/// 0644 whatever the umask, and returns its path. Its name is short and fixed (not derived from
/// `target`'s, which may already be as long as a file name can be).
fn write_temp(
    target: &Path,
    index: usize,
    contents: &[u8],
    undo: &mut Undo,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dirs(dir, undo)?;
    let temp = dir.join(format!(
        ".unique-instance-generate.{}.{index}.tmp",
        std::process::id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&temp)?;
    undo.temps.push(temp.clone());
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(temp)
}

/// Renames `from` to `to` unless `to` exists (it appeared since it was checked): then
/// `AlreadyExists`, and nothing is replaced. Where the file system cannot rename that way, a
/// plain rename.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => std::fs::rename(from, to),
        other => other.map_err(std::io::Error::from),
    }
}

fn validate(args: &GenerateArgs) -> Result<Deployment, String> {
    let name = InstanceName::new(&args.name)
        .map_err(|rule| format!("invalid instance name {:?}: {rule}", args.name))?;
    deploy::check_deployable_name(&name)?;
    let unit = match &args.unit {
        Some(unit) => unit.strip_suffix(".service").unwrap_or(unit).to_owned(),
        None => name.to_string(),
    };
    deploy::check_unit_name(&unit)?;
    let description = args
        .description
        .clone()
        .unwrap_or_else(|| deploy::default_description(&name));
    deploy::check_description(&description)?;
    let root = args.root.as_deref();
    let executable = deploy::executable_text(&args.executable)?;
    deploy::check_executable(root, &args.executable)?;
    for arg in &args.args {
        deploy::check_one_line("the argument", arg)?;
    }
    let where_ = root.map_or_else(
        || "on this machine".to_owned(),
        |r| format!("in {}", r.join("etc/passwd").display()),
    );
    if !deploy::valid_account_name(&args.user) {
        return Err(format!(
            "{:?} is not a portable user name (lower case letters, digits, _ and -, at most 31 \
             characters, not starting with a digit)",
            args.user
        ));
    }
    if !deploy::account_exists(root, "passwd", &args.user)? {
        return Err(format!(
            "user {:?} does not exist {where_}. Create a system user for the service first, \
             e.g. `useradd --system --no-create-home --shell /usr/sbin/nologin {}` (or a \
             sysusers.d line). A DynamicUser= cannot be used: the bus policy must name the user \
             who may own the name, and dbus-daemon resolves it when it loads the policy, when a \
             dynamic user does not exist yet",
            args.user, args.user
        ));
    }
    let group = deploy::primary_group(root, &args.user)?;
    if let Callers::Group(group) = &args.callers
        && !deploy::account_exists(root, "group", group)?
    {
        return Err(format!(
            "group {group:?} (--callers) does not exist {where_}"
        ));
    }
    Ok(Deployment {
        name,
        unit,
        description,
        executable,
        args: args.args.clone(),
        user: args.user.clone(),
        group,
        readiness: args.readiness,
        callers: args.callers.clone(),
    })
}

/// Writes `contents` to a new file beside `target`, flushes it, then renames it over `target`:
/// a reader sees the old file or the new one, never half of one. (Puts a replaced file back.)
fn write_atomically(target: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut undo = Undo::default();
    let written = write_temp(target, usize::MAX, contents, &mut undo)
        .and_then(|temp| std::fs::rename(&temp, target));
    if written.is_err() {
        for temp in &undo.temps {
            let _ = std::fs::remove_file(temp);
        }
    }
    written
}

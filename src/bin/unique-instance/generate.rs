//! `unique-instance generate`: validate, then write the deployment files of `deploy` into a
//! directory, atomically, never overwriting a different file unless asked.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use unique_instance::InstanceName;

use crate::cli::GenerateArgs;
use crate::deploy::{self, Callers, Deployment};
use crate::{EXIT_USAGE, fail};

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
    // Everything is checked before anything is written: a refusal leaves the directory as it was.
    let mut writes = Vec::new();
    let mut conflicts = Vec::new();
    for file in &files {
        let target = args.out_dir.join(&file.path);
        let state = match std::fs::read(&target) {
            Ok(existing) if existing == file.contents.as_bytes() => "unchanged",
            Ok(_) if args.force => "replaced",
            Ok(_) => {
                conflicts.push(target);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "wrote",
            Err(e) => {
                return fail(
                    EXIT_IO,
                    format_args!("cannot read {}: {e}", target.display()),
                );
            }
        };
        writes.push((file, target, state));
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
    for (file, target, state) in writes {
        if state != "unchanged"
            && let Err(e) = write_atomically(&target, file.contents.as_bytes())
        {
            return fail(
                EXIT_IO,
                format_args!("cannot write {}: {e}", target.display()),
            );
        }
        println!(
            "{state:<9} {}  (install as {})",
            target.display(),
            file.install_as.display()
        );
    }
    ExitCode::SUCCESS
}

fn validate(args: &GenerateArgs) -> Result<Deployment, String> {
    let name = InstanceName::new(&args.name)
        .map_err(|rule| format!("invalid instance name {:?}: {rule}", args.name))?;
    let unit = match &args.unit {
        Some(unit) => unit.strip_suffix(".service").unwrap_or(unit).to_owned(),
        None => name.to_string(),
    };
    deploy::check_unit_name(&unit)?;
    let description = args
        .description
        .clone()
        .unwrap_or_else(|| deploy::default_description(&name));
    deploy::check_one_line("the description", &description)?;
    let root = args.root.as_deref();
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
        executable: args.executable.clone(),
        args: args.args.clone(),
        user: args.user.clone(),
        readiness: args.readiness,
        callers: args.callers.clone(),
    })
}

/// Writes `contents` to a new file beside `target`, flushes it to disk, then renames it over
/// `target`: a reader sees the old file or the new one, never half of one.
fn write_atomically(target: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    std::fs::create_dir_all(&dir)?;
    let file_name = target
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy();
    let temp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temp, target)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

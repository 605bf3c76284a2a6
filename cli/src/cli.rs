//! The command line, as clap sees it. Help texts double as the man page.
//!
//! Over 400 lines: most of it is those help texts, one per option, beside the option they
//! describe, and the parsers of their values.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::deploy::{Callers, Readiness};
use unique_instance::{Backend, InstanceOptions, Scope};

const EXIT_CODES: &str = "\
Exit status:
  0-255  run: COMMAND's own status; 128+N when COMMAND died of signal N
  0      status: the instance is running
  3      status: the instance is not running
  75     already running, or --wait timed out (-E changes it)
  64     usage error or invalid NAME
  77     not permitted (bus policy, file permissions)
  69     no usable backend (status: nothing could be checked), or the instance was lost
         while COMMAND ran
  78     the lock path is refused (unsafe, or on a network file system)
  70     internal error
  126    COMMAND could not be executed; 127 COMMAND not found";

const MAIN_EXAMPLES: &str = "\
Examples:
  # a cron job that must never overlap with itself
  */5 * * * *  unique-instance run -q -E 0 org.acme.Backup -- /usr/local/bin/backup
  # who is running it?
  unique-instance status org.acme.Backup
  # shell completions and the man page
  unique-instance completions bash > /etc/bash_completion.d/unique-instance
  unique-instance man --out-dir /usr/local/share/man/man1";

const RUN_EXAMPLES: &str = "\
Examples:
  unique-instance run org.acme.Backup -- rsync -a /data /backup
  unique-instance run --wait=60 org.acme.Backup -- ./backup.sh   # wait up to a minute
  unique-instance run --wait org.acme.Backup -- ./backup.sh      # wait as long as it takes
  unique-instance run -q -E 0 org.acme.Backup -- ./backup.sh     # a conflict is not a failure
  unique-instance run --system --backend lockfile org.acme.Sync -- sync-tool

COMMAND never runs unguarded. The wrapper starts a small keeper process (this program again,
`unique-instance internal-keeper` in ps), which starts COMMAND and holds the lock file until
COMMAND and every process it started are gone: they are re-parented to the keeper (a child
subreaper) whatever they do to their descriptors, credentials, process group or session. If the
wrapper dies, even by SIGKILL, the keeper stops them all (SIGTERM, then SIGKILL after
--kill-after) and the instance stays held until the last one is gone. COMMAND also inherits one
descriptor of the lock file, announced as UNIQUE_INSTANCE_LOCK_FD=N, and is killed if the keeper
dies (PR_SET_PDEATHSIG): should the keeper itself be killed by SIGKILL, the processes still
holding that descriptor keep the instance held, but one that closed it runs on unguarded. The bus
connection and every other descriptor of the wrapper are not inherited. With --backend dbus there
is no lock file: the keeper holds a duplicate of the bus socket instead, so the name stays owned
until the last process is gone, as the lock file would (only on a TCP bus, whose socket cannot be
handed over, does the name go with the wrapper: the keeper then kills the tree at once). SIGTERM,
SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the wrapper are passed on to COMMAND (a
terminal's Ctrl-C already reaches both, and is not sent twice; a hang-up of the terminal the
wrapper leads is passed on); a signal that was ignored when the wrapper started (nohup, a
script's background job) stays ignored, in COMMAND too. A lock file that its watch sees removed
(and nothing else made at its path) is re-created at once and COMMAND goes on. If the instance is lost while COMMAND runs (the lock file
replaced, or removed and not re-created, its directory moved away, the bus name taken over),
COMMAND gets SIGTERM, then SIGKILL after --kill-after, and the wrapper exits 69 saying why; a
loss seen only once COMMAND had ended (the wrapper was stopped meanwhile, or the loss came as it
ended) also makes it exit 69, whatever COMMAND's status, since another copy may have run beside
it. If only the bus connection is lost while the lock file is still held, COMMAND goes on and a
warning is printed. Processes COMMAND leaves
running when it exits are stopped the same way (SIGTERM, then SIGKILL) before the instance is
released, so do not wrap a command that daemonizes.";

const STATUS_EXAMPLES: &str = "\
Examples:
  unique-instance status org.acme.Backup
  unique-instance status --json org.acme.Backup | jq .pid

--json prints one object, with null for what is not known:
  {\"name\": \"org.acme.Backup\", \"running\": true, \"pid\": 4242, \"uid\": 1000,
   \"since\": \"2026-11-23T10:00:00Z\", \"scope\": \"user\", \"found_by\": \"dbus\",
   \"bus\": \"session\", \"bus_unique_name\": \":1.42\", \"executable\": \"/usr/bin/backup\",
   \"hostname\": \"host\", \"lock_file\": \"/run/lock/unique-instance-1000/org.acme.Backup.lock\"}
found_by is \"dbus\" or \"lock-file\"; scope is \"user\" or \"system\"; bus is \"session\",
\"system\" or null. bus_owner and lock_file_holder give each backend's holder on its own (the same
fields, or null), and holders_differ is true when two different processes hold them: the
top-level fields then describe the bus name's owner only.";

const GENERATE_HELP: &str = "\
Files written (relative to --out-dir), and where they are installed:
  systemd/UNIT.service                  /etc/systemd/system/        the system service
  systemd/user/UNIT.service             /etc/systemd/user/          the per-user service
  systemd/tmpfiles.d/NAME.conf          /etc/tmpfiles.d/            the service's lock directory
  dbus/NAME.conf                        /etc/dbus-1/system.d/       who may own and call NAME
  dbus/system-services/NAME.service     /usr/local/share/dbus-1/system-services/
  dbus/services/NAME.service            /usr/local/share/dbus-1/services/
(A package installs them under /usr/lib/systemd/..., /usr/lib/tmpfiles.d/ and
/usr/share/dbus-1/... instead.) All the files are written, or none: a failure midway takes
back what was done. A file that exists with other contents is never replaced without --force,
and then nothing is written. A value that systemd or dbus-daemon would not read back as given
(a description ending in a backslash, an executable path that is not UTF-8, ...) is refused.

Exit status: 0 written (or already identical); 64 invalid NAME, executable, user or other
input; 73 a file exists with other contents; 74 a file could not be read or written.

Example (the files shipped for unique-instance's example server):
  unique-instance generate --exec /usr/local/libexec/unique-instance/example-server \\
      --user example-server org.example.Server -- org.example.Server";

/// `--version`'s answer; a build for the test suite says so (the tests check it before they rely
/// on the test hooks).
#[cfg(not(feature = "test-hooks"))]
const VERSION: &str = env!("CARGO_PKG_VERSION");
#[cfg(feature = "test-hooks")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (with test hooks)");

/// Run a command as the only running copy of a name, or ask who is running it.
///
/// NAME is a D-Bus well-known name (org.acme.Backup). By default the instance is held through a
/// lock file and, when a bus is available, the bus name as well, so copies started from a
/// terminal, cron, systemd or CI exclude each other. Logging goes to stderr through RUST_LOG
/// (e.g. RUST_LOG=unique_instance=debug); it is off by default.
#[derive(Debug, Parser)]
#[command(name = "unique-instance", version = VERSION, after_long_help = format!("{EXIT_CODES}\n\n{MAIN_EXAMPLES}"))]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Acquire NAME, run COMMAND while holding it, release it when COMMAND ends.
    #[command(after_long_help = format!("{RUN_EXAMPLES}\n\n{EXIT_CODES}"))]
    Run(RunArgs),
    /// Tell whether NAME is running, and who holds it; exit 0 if running, 3 if not.
    #[command(after_long_help = format!("{STATUS_EXAMPLES}\n\n{EXIT_CODES}"))]
    Status(StatusArgs),
    /// Write the systemd units, system-bus policy, D-Bus activation files and tmpfiles.d line
    /// that deploy a server built on unique-instance, for NAME.
    #[command(after_long_help = GENERATE_HELP)]
    Generate(GenerateArgs),
    /// Print the man page (roff), or write one page per command into a directory.
    Man {
        /// Write unique-instance.1, unique-instance-run.1, ... into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

// What `run` tells its keeper process (see keeper/), which it starts as
// `unique-instance internal-keeper ...`: not a subcommand of `Cli`, so that no help, man page or
// completion offers it. It refuses to start without the descriptors `run` hands it.
/// Internal to `unique-instance run`, which starts it between itself and COMMAND: not for use
/// by hand.
#[derive(Debug, Parser)]
#[command(name = "unique-instance internal-keeper")]
pub(crate) struct KeeperArgs {
    /// The descriptor of the keeper's end of its control socket.
    #[arg(long, value_name = "FD")]
    pub(crate) control_fd: i32,
    /// How long COMMAND and what it left have between SIGTERM and SIGKILL when the wrapper dies.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub(crate) kill_after: Duration,
    /// The wrapper's process group, which COMMAND joins (the keeper has one of its own).
    #[arg(long, value_name = "PGID")]
    pub(crate) process_group: i32,
    /// The signals passed on to COMMAND that the wrapper's caller left ignored (numbers): COMMAND
    /// keeps them ignored.
    #[arg(long, value_name = "SIGNALS", value_delimiter = ',')]
    pub(crate) ignored_signals: Vec<i32>,
    /// The instance as the wrapper was given it: the keeper plans its lock file as the wrapper
    /// did, to keep it once the wrapper is gone (see keeper/).
    #[command(flatten)]
    pub(crate) instance: InstanceArgs,
    /// The command to run, and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

/// How to find the instance: shared by `run` and `status`.
#[derive(Debug, Args)]
pub(crate) struct InstanceArgs {
    /// One instance per user: the session bus, the user's own lock directory. Without --user or
    /// --system, the scope is UNIQUE_INSTANCE_SCOPE (user, system or auto), else auto.
    #[arg(long, conflicts_with = "system")]
    pub(crate) user: bool,
    /// One instance per machine: the system bus, /run/unique-instance/NAME if a deployment
    /// made it, else /run/lock/unique-instance.
    #[arg(long)]
    pub(crate) system: bool,
    /// What enforces exclusion: auto = the lock file, and the bus name when a bus is available.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub(crate) backend: BackendArg,
    /// Use this lock file instead of the one derived from NAME.
    #[arg(long, value_name = "PATH")]
    pub(crate) lock_file: Option<PathBuf>,
    /// The instance name, a D-Bus well-known name such as org.acme.Backup.
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
}

impl InstanceArgs {
    /// These arguments as given on a command line, for the keeper's (see keeper/); NAME last.
    pub(crate) fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if self.user {
            args.push("--user".into());
        }
        if self.system {
            args.push("--system".into());
        }
        if let Some(backend) = self.backend.to_possible_value() {
            args.push(format!("--backend={}", backend.get_name()).into());
        }
        if let Some(path) = &self.lock_file {
            let mut arg = std::ffi::OsString::from("--lock-file=");
            arg.push(path);
            args.push(arg);
        }
        args.push(self.name.clone().into());
        args
    }

    pub(crate) fn options(&self) -> InstanceOptions {
        let mut options = InstanceOptions::new(&self.name);
        match self.backend {
            // The library's default: every backend that applies.
            BackendArg::Auto => {}
            BackendArg::Dbus => options = options.backend(Backend::Dbus),
            BackendArg::Lockfile => options = options.backend(Backend::LockFile),
        }
        // Without --user/--system the library reads UNIQUE_INSTANCE_SCOPE, else uses auto: the
        // same rule a server built on the library follows, so the two always meet.
        match (self.user, self.system) {
            (true, _) => options = options.scope(Scope::User),
            (_, true) => options = options.scope(Scope::System),
            _ => {}
        }
        if let Some(path) = &self.lock_file {
            options = options.lock_file(path);
        }
        options
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendArg {
    /// The lock file always, and the bus name when a bus is available.
    Auto,
    /// The bus name only. It keeps out only copies that reach the same bus: one started where
    /// another bus is chosen (a login session's session bus, a service's system bus) runs too.
    Dbus,
    /// The lock file only.
    #[value(alias = "lock-file")]
    Lockfile,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) instance: InstanceArgs,
    /// Wait for the running copy to exit: for SECONDS (at most 1e9), or as long as it takes
    /// when no value is given.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, require_equals = true,
          default_missing_value = "forever", value_parser = parse_wait)]
    pub(crate) wait: Option<WaitFor>,
    /// Exit with N instead of 75 when the instance is already running or the wait timed out.
    #[arg(short = 'E', long, value_name = "N", default_value_t = 75)]
    pub(crate) conflict_exit_code: u8,
    /// Say nothing when the instance is already running, nor about a lost bus connection.
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// After the instance is lost, how long COMMAND has between SIGTERM and SIGKILL (0: SIGKILL
    /// at once; at most 1e9).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub(crate) kill_after: Duration,
    /// Also re-check every SECONDS that the lock file is still ours. Removal or replacement is
    /// already noticed at once through inotify; this is a belt for file systems where inotify
    /// does not see every change (a removal found only by it is a loss, never re-created). 0
    /// (the default) means no timer; otherwise at least 0.01.
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = parse_recheck)]
    pub(crate) recheck: Duration,
    /// Under a Type=notify systemd unit, tell systemd the service is ready (READY=1 and a
    /// STATUS= line naming the instance) once the instance is held and COMMAND has started;
    /// COMMAND then does not see NOTIFY_SOCKET. Without it nothing is sent for COMMAND, which
    /// may notify for itself if the unit says NotifyAccess=all (the wrapper is the main PID).
    #[arg(long)]
    pub(crate) notify: bool,
    /// The command to run, and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) instance: InstanceArgs,
    /// Print one JSON object (fields below) instead of a sentence.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    /// The server's executable: an absolute path to an installed program (inside --root, if
    /// given).
    #[arg(long = "exec", value_name = "PATH")]
    pub(crate) executable: PathBuf,
    /// The existing system user the system service runs as: the only one the bus policy lets
    /// own NAME.
    #[arg(long, value_name = "USER")]
    pub(crate) user: String,
    /// How systemd learns the service is ready: dbus (once NAME is owned) or notify (READY=1,
    /// sent by the library once the instance is held).
    #[arg(long = "type", value_enum, value_name = "TYPE", default_value_t = Readiness::Dbus)]
    pub(crate) readiness: Readiness,
    /// The systemd unit's name, without .service (default: NAME).
    #[arg(long, value_name = "UNIT")]
    pub(crate) unit: Option<String>,
    /// The units' Description= (default: "NAME, a single instance").
    #[arg(long, value_name = "TEXT")]
    pub(crate) description: Option<String>,
    /// Who may call NAME on the system bus: everyone, root, or group:GROUP.
    #[arg(long, value_name = "WHO", default_value = "everyone")]
    pub(crate) callers: Callers,
    /// Where to write the files (systemd/... and dbus/... below it).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub(crate) out_dir: PathBuf,
    /// Check the executable, the user and the group inside this root directory (an image or a
    /// package being built) instead of on this machine.
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Replace files that exist with other contents (without it, nothing is written then).
    #[arg(long)]
    pub(crate) force: bool,
    /// The instance name, a D-Bus well-known name such as org.acme.Server.
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
    /// Arguments the server is started with.
    #[arg(last = true, value_name = "ARGS")]
    pub(crate) args: Vec<String>,
}

/// What `--wait` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitFor {
    Forever,
    Up(Duration),
}

/// The longest duration any option takes: about 31 years, far below where adding it to the clock
/// could overflow (a panic, once), and far beyond any real wait or grace.
const MAX_SECONDS: f64 = 1e9;

/// The shortest `--recheck` interval: a shorter timer would keep a CPU busy re-checking.
const MIN_RECHECK: Duration = Duration::from_millis(10);

fn parse_wait(s: &str) -> Result<WaitFor, String> {
    if s == "forever" {
        return Ok(WaitFor::Forever);
    }
    parse_seconds(s)
        .map(WaitFor::Up)
        .map_err(|e| format!("{e}; --wait without a value waits as long as it takes"))
}

fn parse_recheck(s: &str) -> Result<Duration, String> {
    let interval = parse_seconds(s)?;
    // Judged on the number given: one too small for a `Duration` (`1e-10`) rounds to zero,
    // which would turn a request for a timer into "no timer" (a review).
    let given_zero = s.trim().parse::<f64>().is_ok_and(|secs| secs == 0.0);
    if !given_zero && interval < MIN_RECHECK {
        return Err(format!(
            "{s:?} is too short an interval: 0 (no timer) or at least {} seconds",
            MIN_RECHECK.as_secs_f64()
        ));
    }
    Ok(interval)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 5 or 0.5)"))?;
    if secs > MAX_SECONDS {
        return Err(format!(
            "{s:?} is too many seconds (at most {MAX_SECONDS:e}, about 31 years)"
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a usable number of seconds (0 or more)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// The keeper plans its lock file from the instance arguments the wrapper passes on: they
    /// read back as the wrapper was given them, whatever bytes a lock file's path holds.
    #[test]
    fn instance_arguments_reach_the_keeper_as_given() {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"/tmp/-x =\xff\n.lock");
        let lines: [Vec<std::ffi::OsString>; 5] = [
            vec!["org.acme.A".into()],
            vec!["--user".into(), "org.acme.A".into()],
            vec![
                "--system".into(),
                "--backend".into(),
                "dbus".into(),
                "org.acme.A".into(),
            ],
            vec!["--backend=lock-file".into(), "org.acme.A".into()],
            vec!["--lock-file".into(), odd.into(), "org.acme.A".into()],
        ];
        for given in lines {
            let run = ["unique-instance".into(), "run".into()]
                .into_iter()
                .chain(given.iter().cloned())
                .chain(["--".into(), "true".into()]);
            let Command::Run(run) = Cli::try_parse_from(run).expect("run").command else {
                panic!("not run");
            };
            let keeper = ["internal-keeper", "--control-fd", "3", "--kill-after", "1"]
                .into_iter()
                .chain(["--process-group", "1"])
                .map(std::ffi::OsString::from)
                .chain(run.instance.to_args())
                .chain(["--".into(), "true".into()]);
            let keeper = KeeperArgs::try_parse_from(keeper).expect("the keeper's arguments");
            assert_eq!(
                format!("{:?}", keeper.instance),
                format!("{:?}", run.instance),
                "{given:?}"
            );
        }
    }

    #[test]
    fn seconds_parse_and_refuse_nonsense() {
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert_eq!(parse_wait("forever"), Ok(WaitFor::Forever));
        assert_eq!(parse_wait("2"), Ok(WaitFor::Up(Duration::from_secs(2))));
    }

    #[test]
    fn seconds_too_large_or_too_short_are_refused_saying_why() {
        for huge in ["1e19", "1e300", "inf", "1000000001"] {
            let e = parse_seconds(huge).expect_err(huge);
            assert!(
                e.contains("too many seconds") || e.contains("not a usable"),
                "{e}"
            );
        }
        assert!(parse_wait("1e19").is_err_and(|e| e.contains("as long as it takes")));
        assert!(parse_seconds("nan").is_err());
        assert_eq!(parse_seconds("1e9"), Ok(Duration::from_secs(1_000_000_000)));
        assert!(parse_recheck("1e-9").is_err_and(|e| e.contains("too short")));
        for rounds_to_zero in ["0.0000000001", "1e-320"] {
            assert!(
                parse_recheck(rounds_to_zero).is_err_and(|e| e.contains("too short")),
                "{rounds_to_zero}"
            );
        }
        assert_eq!(parse_recheck("0.0"), Ok(Duration::ZERO));
        assert_eq!(parse_recheck("0"), Ok(Duration::ZERO));
        assert_eq!(parse_recheck("0.01"), Ok(Duration::from_millis(10)));
    }
}

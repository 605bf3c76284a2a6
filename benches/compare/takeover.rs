//! Take-over (benchmark 4): a holder SIGKILLed while a copy verifiably waits, until the
//! waiter's command runs; against flock(1).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use unique_instance::{Backend, InstanceOptions};

use crate::report::{Report, Row};
use crate::stats::Samples;
use crate::{Config, common};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Series {
    LockFile,
    Dbus,
    Auto,
    Flock,
}

impl Series {
    fn label(self) -> &'static str {
        match self {
            Series::LockFile => "unique-instance run --backend lockfile",
            Series::Dbus => "unique-instance run --backend dbus",
            Series::Auto => "unique-instance run (auto: lock file + bus)",
            Series::Flock => "flock(1) -w",
        }
    }

    fn backend_arg(self) -> &'static str {
        match self {
            Series::LockFile => "lockfile",
            Series::Dbus => "dbus",
            _ => "auto",
        }
    }
}

/// Kills the child (SIGKILL) and reaps it; for clean-up paths.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn takeover(config: &Config, report: &mut Report) -> Result<()> {
    let series = [Series::Flock, Series::LockFile, Series::Dbus, Series::Auto];
    let mut samples: Vec<Samples> = vec![Samples::default(); series.len()];
    let bus = BusProbe::new()?;
    for trial in 0..config.takeover_trials {
        for (i, s) in series.iter().enumerate() {
            let d = takeover_once(config, &bus, *s, trial)
                .with_context(|| format!("take-over trial {trial} of {s:?}"))?;
            samples[i].push(d);
        }
    }
    let flock = samples[0].clone();
    for (i, s) in series.iter().enumerate().skip(1) {
        let ours = samples[i].clone();
        let holds = ours.median() <= 1.5 * flock.median() && ours.p99() <= 10e6;
        report.rows.push(Row {
            section: "4. take-over",
            what: format!("{}: holder SIGKILLed → waiter runs its command", s.label()),
            reference: Some((Series::Flock.label().into(), flock.clone())),
            goal: Some(("p50 ≤ 1.5× flock(1), p99 ≤ 10 ms".into(), holds)),
            ours,
        });
    }
    for (i, s) in series.iter().enumerate() {
        report
            .takeover
            .push((s.label().to_owned(), samples[i].clone()));
    }
    Ok(())
}

/// Asks the bus who is queued for a name, to know that a D-Bus waiter is waiting.
struct BusProbe {
    rt: tokio::runtime::Runtime,
    proxy: zbus::fdo::DBusProxy<'static>,
}

impl BusProbe {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let proxy = rt.block_on(async {
            let conn = zbus::Connection::session().await?;
            zbus::fdo::DBusProxy::new(&conn).await
        })?;
        Ok(BusProbe { rt, proxy })
    }

    fn queued(&self, name: &str) -> usize {
        let Ok(name) = zbus::names::BusName::try_from(name) else {
            return 0;
        };
        self.rt
            .block_on(
                self.proxy
                    .list_queued_owners(name.try_into().expect("well-known")),
            )
            .map_or(0, |v| v.len())
    }
}

/// The system calls a waiter blocks in, as `/proc/PID/syscall` shows them: `flock` (flock(1))
/// and `fcntl(fd, F_OFD_SETLKW, ...)` (F_OFD_SETLKW is 38).
#[cfg(target_arch = "x86_64")]
const SYS_FLOCK: &str = "73";
#[cfg(target_arch = "x86_64")]
const SYS_FCNTL: &str = "72";
#[cfg(target_arch = "aarch64")]
const SYS_FLOCK: &str = "32";
#[cfg(target_arch = "aarch64")]
const SYS_FCNTL: &str = "25";

/// Is any thread of `pid` blocked waiting for a file lock?
fn blocked_on_lock(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let call = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        let mut fields = call.split_whitespace();
        match (fields.next(), fields.nth(1)) {
            (Some(SYS_FLOCK), _) => true,
            (Some(SYS_FCNTL), Some(cmd)) => cmd == "0x26",
            _ => false,
        }
    })
}

/// Does `pid` have an inotify watch on `file` (a unique-instance waiter: it sleeps until inotify
/// reports the lock's release, see `wait_for_release`)? Read from `/proc/PID/fdinfo`, where each
/// watch is a line `inotify wd:N ino:HEX sdev:HEX ...`.
fn watches_file(pid: u32, file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(file).map(|m| m.ino()) else {
        return false;
    };
    let needle = format!(" ino:{ino:x} ");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_to_string(fd.path()).is_ok_and(|info| {
            info.lines()
                .any(|l| l.starts_with("inotify") && l.contains(&needle))
        })
    })
}

/// Polls `ready` every 200 µs until it holds, for at most 30 s.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + common::TIMEOUT;
    while !ready() {
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

pub(crate) fn read_line(reader: &mut impl BufRead, what: &str) -> Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    ensure!(n > 0, "end of output while waiting for {what}");
    Ok(line.trim_end().to_owned())
}

/// One trial: a holder, a waiter that is verifiably waiting, SIGKILL to the holder, and the time
/// until the waiter's command prints.
fn takeover_once(
    config: &Config,
    bus: &BusProbe,
    series: Series,
    trial: usize,
) -> Result<Duration> {
    let name = format!("org.uibench.Takeover.{:?}.t{trial}", series);
    let flock_file = config.work.path().join(format!("{name}.flock"));
    let mut holder = match series {
        Series::Flock => {
            // The flock(1) idiom: the lock is on the shell's descriptor 9, which `sleep` keeps.
            let script = format!(
                "exec 9>>'{}'; {} 9; echo ready; exec sleep 600",
                flock_file.display(),
                config.flock.display()
            );
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        }
        _ => {
            let mut c = Command::new(&config.cli);
            c.args(["run", "--backend", series.backend_arg(), &name, "--"])
                .args(["sh", "-c", "echo ready; exec sleep 600"]);
            c
        }
    }
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()?;
    let mut holder_out = BufReader::new(holder.stdout.take().context("stdout")?);
    let result = (|| {
        ensure!(read_line(&mut holder_out, "the holder")? == "ready");
        let mut waiter = match series {
            Series::Flock => {
                let mut c = Command::new(&config.flock);
                c.args(["-w", "30"])
                    .arg(&flock_file)
                    .args(["echo", "acquired"]);
                c
            }
            _ => {
                let mut c = Command::new(&config.cli);
                c.args([
                    "run",
                    "--wait",
                    "--backend",
                    series.backend_arg(),
                    &name,
                    "--",
                ])
                .args(["echo", "acquired"]);
                c
            }
        }
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
        let mut waiter_out = BufReader::new(waiter.stdout.take().context("stdout")?);
        let waited = (|| {
            let pid = waiter.id();
            match series {
                Series::Dbus => {
                    wait_until("the waiter is queued on the bus", || bus.queued(&name) >= 2)?
                }
                Series::Flock => {
                    wait_until("the waiter blocks on the lock", || blocked_on_lock(pid))?
                }
                _ => {
                    let lock_file = InstanceOptions::new(&name)
                        .backend(Backend::LockFile)
                        .plan()?
                        .lock_file
                        .context("no lock file planned")?;
                    wait_until("the waiter watches the lock file", || {
                        watches_file(pid, &lock_file)
                    })?
                }
            }
            let start = Instant::now();
            holder.kill()?;
            let line = read_line(&mut waiter_out, "the waiter's command")?;
            let elapsed = start.elapsed();
            ensure!(line == "acquired", "unexpected waiter output {line:?}");
            let status = waiter.wait()?;
            ensure!(status.success(), "the waiter failed: {status}");
            Ok(elapsed)
        })();
        kill(&mut waiter);
        waited
    })();
    kill(&mut holder);
    result
}

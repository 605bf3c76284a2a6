//! Start-up storm (benchmark 5): 64 copies at once, until all have decided; exactly one runs its
//! command.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::report::{Report, Row};
use crate::stats::Samples;
use crate::{Config, EXIT_CONFLICT};

pub(crate) fn storm(config: &Config, report: &mut Report) -> Result<()> {
    let mut auto = Samples::default();
    let mut lockfile = Samples::default();
    let mut flock = Samples::default();
    let mut static_auto = Samples::default();
    for round in 0..config.storm_rounds {
        flock.push(storm_once(config, &config.cli, None, round)?);
        auto.push(storm_once(config, &config.cli, Some("auto"), round)?);
        lockfile.push(storm_once(config, &config.cli, Some("lockfile"), round)?);
        if let Some(static_cli) = &config.static_cli {
            static_auto.push(storm_once(config, static_cli, Some("static"), round)?);
        }
    }
    let reference = format!("{} × flock -n FILE CMD", config.storm_copies);
    let mut kinds = vec![("--backend auto", auto), ("--backend lockfile", lockfile)];
    if config.static_cli.is_some() {
        kinds.push(("(static-pie build) --backend auto", static_auto));
    }
    for (what, ours) in kinds {
        let holds = ours.median() <= 1.5 * flock.median();
        report.rows.push(Row {
            section: "5. storm",
            what: format!(
                "{} × unique-instance run {what} NAME CMD: until all decided",
                config.storm_copies
            ),
            reference: Some((reference.clone(), flock.clone())),
            goal: Some(("median ≤ 1.5× flock(1)".into(), holds)),
            ours,
        });
    }
    Ok(())
}

/// Launches the copies at once; returns the time until every loser has exited and the winner's
/// command has started. Checks that exactly one ran and every other was refused.
fn storm_once(config: &Config, cli: &Path, kind: Option<&str>, round: usize) -> Result<Duration> {
    let name = format!("org.uibench.Storm.{}.r{round}", kind.unwrap_or("flock"));
    // "static" is the static build with the default backends.
    let backend = kind.map(|k| if k == "static" { "auto" } else { k });
    let flock_file = config.work.path().join(format!("{name}.flock"));
    // The winner's command says so, then holds until we close its stdin: every copy is refused
    // for as long as the storm lasts, so "exactly one ran" is a real check.
    let (stdin_read, stdin_write) = std::io::pipe()?;
    let (mut out_read, out_write) = std::io::pipe()?;
    let command = ["sh", "-c", "echo ran; read _ || true"];
    let conflict = if backend.is_some() { EXIT_CONFLICT } else { 1 };
    let mut children = Vec::with_capacity(config.storm_copies);
    let start = Instant::now();
    for _ in 0..config.storm_copies {
        let mut cmd = match backend {
            Some(b) => {
                let mut c = Command::new(cli);
                c.args(["run", "-q", "--backend", b, &name, "--"]);
                c
            }
            None => {
                let mut c = Command::new(&config.flock);
                c.arg("-n").arg(&flock_file);
                c
            }
        };
        cmd.args(command)
            .stdin(stdin_read.try_clone()?)
            .stdout(out_write.try_clone()?)
            .stderr(Stdio::null());
        children.push(cmd.spawn()?);
    }
    drop((stdin_read, out_write));
    // Losers exit; the winner prints "ran". Reap in exit order (wait for any child).
    let mut ran_at = None;
    let mut out = BufReader::new(out_read.try_clone()?);
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let got = out.read_line(&mut line).ok().filter(|&n| n > 0);
        (got.map(|_| Instant::now()), line)
    });
    let mut refused = 0;
    let mut last_exit = start;
    while refused < config.storm_copies - 1 {
        let status = rustix::process::wait(rustix::process::WaitOptions::empty())?
            .context("no child left")?
            .1;
        let code = status.exit_status().context("a copy died of a signal")?;
        ensure!(
            code == conflict,
            "a copy exited {code} while the winner held the instance (expected {conflict})"
        );
        refused += 1;
        last_exit = Instant::now();
    }
    if let Ok((at, line)) = reader.join() {
        ensure!(line.trim() == "ran", "the winner printed {line:?}");
        ran_at = at;
    }
    let ran_at = ran_at.context("no copy ran")?;
    let decided = ran_at.max(last_exit) - start;
    // Let the winner go, and check that it was the only one that ran its command.
    drop(stdin_write);
    let status = rustix::process::wait(rustix::process::WaitOptions::empty())?
        .context("the winner is gone")?
        .1;
    ensure!(status.exit_status() == Some(0), "the winner failed");
    let mut rest = String::new();
    out_read.read_to_string(&mut rest)?;
    ensure!(rest.is_empty(), "more than one copy ran: {rest:?}");
    // Every child was reaped through wait(); the Child handles have nothing left to do.
    drop(children);
    Ok(decided)
}

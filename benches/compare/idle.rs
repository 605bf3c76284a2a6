//! Idle cost (benchmark 6: wake-ups, CPU time), peak memory and stripped sizes (7).

use std::io::BufReader;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::Config;
use crate::report::{Fact, Report};
use crate::takeover::read_line;

/// Context switches (voluntary + involuntary, all threads) and CPU time (user + system) so far.
fn activity(pid: u32) -> Result<(u64, Duration)> {
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>()?;
            }
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the 14th field overall.
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = rustix::param::clock_ticks_per_second();
    Ok((switches, Duration::from_secs_f64(ticks as f64 / hz as f64)))
}

/// Peak resident set size (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM")?
        .parse()?)
}

fn stripped_size(binary: &Path, work: &Path) -> Result<u64> {
    let copy = work.join(format!(
        "stripped-{}",
        binary
            .file_name()
            .context("no file name")?
            .to_string_lossy()
    ));
    let status = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(binary)
        .status()?;
    ensure!(status.success(), "strip failed on {}", binary.display());
    Ok(std::fs::metadata(&copy)?.len())
}

pub(crate) fn idle_and_memory(config: &Config, report: &mut Report) -> Result<()> {
    let flock_file = config.work.path().join("idle.flock");
    let ready_line = "echo ready; exec sleep 3600";
    let spawn = |mut c: Command| -> Result<(Child, BufReader<std::process::ChildStdout>)> {
        let mut child = c.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        Ok((child, out))
    };
    let mut wrapper_cmd = Command::new(&config.cli);
    wrapper_cmd.args([
        "run",
        "org.uibench.Idle.Wrapper",
        "--",
        "sh",
        "-c",
        ready_line,
    ]);
    let mut server_cmd = Command::new(&config.server);
    server_cmd.arg("org.uibench.Idle.Server");
    let mut flock_cmd = Command::new(&config.flock);
    flock_cmd.arg(&flock_file).args(["sh", "-c", ready_line]);
    let mut procs = vec![spawn(wrapper_cmd)?, spawn(server_cmd)?, spawn(flock_cmd)?];
    let result = (|| {
        for (_, out) in &mut procs {
            let line = read_line(out, "a ready line")?;
            ensure!(line.starts_with("ready"), "unexpected {line:?}");
        }
        // Let start-up finish (the wrapper's first records, the server's tracing output).
        std::thread::sleep(Duration::from_millis(300));
        let pids: Vec<u32> = procs.iter().map(|(c, _)| c.id()).collect();
        let before: Vec<_> = pids.iter().map(|&p| activity(p)).collect::<Result<_>>()?;
        std::thread::sleep(config.idle);
        let after: Vec<_> = pids.iter().map(|&p| activity(p)).collect::<Result<_>>()?;
        let rss: Vec<u64> = pids
            .iter()
            .map(|&p| peak_rss_kib(p))
            .collect::<Result<_>>()?;
        let secs = config.idle.as_secs();
        let describe = |i: usize| {
            format!(
                "{} wake-ups, {:.1} ms CPU",
                after[i].0 - before[i].0,
                (after[i].1 - before[i].1).as_secs_f64() * 1e3
            )
        };
        let flock_idle = describe(2);
        for (i, what) in [
            (0, "unique-instance run (auto)"),
            (1, "example server (auto, tokio)"),
        ] {
            report.facts.push(Fact {
                what: format!("6. idle {secs} s: {what}"),
                value: describe(i),
                reference: format!("flock(1): {flock_idle}"),
                goal: Some(("no periodic wake-ups".into(), after[i].0 == before[i].0)),
            });
        }
        report.facts.push(Fact {
            what: "7. peak RSS while holding: unique-instance run (auto)".into(),
            value: format!("{:.1} MiB", rss[0] as f64 / 1024.0),
            reference: format!("flock(1): {:.1} MiB", rss[2] as f64 / 1024.0),
            goal: Some(("≤ 8 MiB".into(), rss[0] <= 8 * 1024)),
        });
        report.facts.push(Fact {
            what: "7. peak RSS while holding: example server".into(),
            value: format!("{:.1} MiB", rss[1] as f64 / 1024.0),
            reference: String::new(),
            goal: None,
        });
        Ok(())
    })();
    for (child, _) in &mut procs {
        // SIGTERM first so that the holders release cleanly; then make sure.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).context("pid")?,
            rustix::process::Signal::TERM,
        );
    }
    for (child, _) in &mut procs {
        let _ = child.wait();
    }
    result?;
    let work = config.work.path();
    let cli_size = stripped_size(&config.cli, work)?;
    let server_size = stripped_size(&config.server, work)?;
    let flock_size = std::fs::metadata(&config.flock)?.len();
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0));
    report.facts.push(Fact {
        what: "7. stripped size: unique-instance (release profile)".into(),
        value: mib(cli_size),
        reference: format!("flock(1): {}", mib(flock_size)),
        goal: None,
    });
    if let Some(static_cli) = &config.static_cli {
        report.facts.push(Fact {
            what: "7. stripped size: unique-instance, static-pie build".into(),
            value: mib(stripped_size(static_cli, work)?),
            reference: format!("flock(1): {} (+ libc, shared)", mib(flock_size)),
            goal: None,
        });
    }
    report.facts.push(Fact {
        what: "7. stripped size: example server".into(),
        value: mib(server_size),
        reference: String::new(),
        goal: None,
    });
    Ok(())
}

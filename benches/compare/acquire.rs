//! Acquisition in process (benchmarks 1-3): D-Bus, Auto and the lock file, against sd-bus and
//! C, interleaved round by round.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use unique_instance::{Backend, InstanceOptions};

use crate::Config;
use crate::report::{Report, Row};
use crate::stats::Samples;

/// Runs a C reference for `n` iterations and collects its per-iteration times.
fn run_reference(program: &Path, args: &[&str]) -> Result<Samples> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "{} failed", program.display());
    let mut samples = Samples::default();
    for line in String::from_utf8(out.stdout)?.lines() {
        samples.push(Duration::from_nanos(line.trim().parse()?));
    }
    Ok(samples)
}

pub(crate) fn acquire(config: &Config, report: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut sdbus = Samples::default();
    let mut dbus_async = Samples::default();
    let mut dbus_blocking = Samples::default();
    let mut auto_async = Samples::default();
    let mut auto_blocking = Samples::default();
    let mut c_flock = Samples::default();
    let mut c_checked = Samples::default();
    let mut lock_blocking = Samples::default();
    let n = config.acquire_batch;
    let c_lock_path = config.work.path().join("c-reference.lock");
    let c_lock_path = c_lock_path.to_str().context("non-UTF-8 temp path")?;
    let c_lock_dir = config.work.path().to_str().context("non-UTF-8 temp path")?;
    // Untimed warm-up of every path, so that first-use costs (page faults, the dynamic
    // loader's lazy binding) are not charged to whichever kind runs first.
    for round in 0..=config.acquire_rounds {
        let sink = |samples: &mut Samples, s: Samples| {
            if round > 0 {
                samples.0.extend(s.0);
            }
        };
        let prefix = format!("org.uibench.Acquire.r{round}");
        sink(
            &mut sdbus,
            run_reference(&config.sdbus_ref, &[&n.to_string(), &format!("{prefix}.c")])?,
        );
        sink(
            &mut dbus_async,
            in_process(&rt, n, &format!("{prefix}.da"), Some(Backend::Dbus), false)?,
        );
        sink(
            &mut auto_async,
            in_process(&rt, n, &format!("{prefix}.aa"), None, false)?,
        );
        sink(
            &mut dbus_blocking,
            in_process(&rt, n, &format!("{prefix}.db"), Some(Backend::Dbus), true)?,
        );
        sink(
            &mut auto_blocking,
            in_process(&rt, n, &format!("{prefix}.ab"), None, true)?,
        );
        sink(
            &mut c_flock,
            run_reference(&config.flock_ref, &[&n.to_string(), c_lock_path])?,
        );
        sink(
            &mut lock_blocking,
            in_process(
                &rt,
                n,
                &format!("{prefix}.lb"),
                Some(Backend::LockFile),
                true,
            )?,
        );
        sink(
            &mut c_checked,
            run_reference(
                &config.flock_checked_ref,
                &[&n.to_string(), c_lock_dir, "c-checked.lock"],
            )?,
        );
    }
    let sd = "sd-bus (C): sd_bus_open_user + sd_bus_request_name";
    let ratio = |a: &Samples, b: &Samples| a.median() / b.median();
    let goal_dbus = ratio(&dbus_async, &sdbus) <= 1.0;
    report.rows.push(Row {
        section: "1. acquire, D-Bus",
        what: "acquire_async() (tokio current-thread runtime already running)".into(),
        reference: Some((sd.into(), sdbus.clone())),
        goal: Some(("median ≤ 1.0× sd-bus".into(), goal_dbus)),
        ours: dbus_async,
    });
    report.rows.push(Row {
        section: "1. acquire, D-Bus",
        what: "acquire() (blocking: starts the guard's runtime too)".into(),
        reference: Some((sd.into(), sdbus.clone())),
        goal: None,
        ours: dbus_blocking,
    });
    let goal_auto = ratio(&auto_async, &sdbus) <= 1.1;
    report.rows.push(Row {
        section: "2. acquire, Auto",
        what: "acquire_async(): lock file + bus name".into(),
        reference: Some((sd.into(), sdbus.clone())),
        goal: Some(("median ≤ 1.1× sd-bus".into(), goal_auto)),
        ours: auto_async,
    });
    report.rows.push(Row {
        section: "2. acquire, Auto",
        what: "acquire() (blocking)".into(),
        reference: Some((sd.into(), sdbus)),
        goal: None,
        ours: auto_blocking,
    });
    let goal_lock = ratio(&lock_blocking, &c_flock) <= 3.0 && lock_blocking.median() < 25_000.0;
    report.rows.push(Row {
        section: "3. acquire, lock file",
        what: "acquire() (no runtime is started for it)".into(),
        reference: Some(("C: open + flock + close".into(), c_flock)),
        goal: Some(("median ≤ 3× C and < 25 µs".into(), goal_lock)),
        ours: lock_blocking.clone(),
    });
    report.rows.push(Row {
        section: "3. acquire, lock file",
        what: "acquire(), against the same checks and record in C".into(),
        reference: Some((
            "C: the same system calls (flock_checked.c)".into(),
            c_checked,
        )),
        goal: None,
        ours: lock_blocking,
    });
    Ok(())
}

/// Acquires `n` distinct names in this process, timing each acquisition; releases untimed.
fn in_process(
    rt: &tokio::runtime::Runtime,
    n: usize,
    prefix: &str,
    // `None`: every backend that applies (the default).
    backend: Option<Backend>,
    blocking: bool,
) -> Result<Samples> {
    let mut samples = Samples::default();
    for i in 0..n {
        let mut options = InstanceOptions::new(format!("{prefix}.i{i}"));
        if let Some(backend) = backend {
            options = options.backend(backend);
        }
        if blocking {
            let start = Instant::now();
            let guard = options.acquire()?;
            samples.push(start.elapsed());
            ensure!(guard.backends().len() == expected_backends(backend));
            guard.release()?;
        } else {
            rt.block_on(async {
                let start = Instant::now();
                let guard = options.acquire_async().await?;
                samples.push(start.elapsed());
                ensure!(guard.backends().len() == expected_backends(backend));
                guard.release_async().await?;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(samples)
}

fn expected_backends(backend: Option<Backend>) -> usize {
    if backend.is_none() { 2 } else { 1 }
}

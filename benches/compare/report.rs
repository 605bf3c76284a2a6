//! The report: the tables of BENCHMARKS.md, the files it writes, and the machine it ran on.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::plot::plot_takeover;
use crate::stats::{Samples, fmt_ns};
use crate::{Config, fs_name};

/// One line of the table: a measured series, and the reference it is compared with.
pub(crate) struct Row {
    pub(crate) section: &'static str,
    pub(crate) what: String,
    pub(crate) ours: Samples,
    pub(crate) reference: Option<(String, Samples)>,
    /// The goal, as text, and whether it holds (None: reported only).
    pub(crate) goal: Option<(String, bool)>,
}

/// A line of the idle/memory/size tables: free text cells.
pub(crate) struct Fact {
    pub(crate) what: String,
    pub(crate) value: String,
    pub(crate) reference: String,
    pub(crate) goal: Option<(String, bool)>,
}

pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) facts: Vec<Fact>,
    pub(crate) takeover: Vec<(String, Samples)>,
    pub(crate) notes: Vec<String>,
    pub(crate) started: std::time::SystemTime,
    pub(crate) elapsed: Duration,
}

impl Report {
    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| measurement | ours: median | p99 | reference | ref: median | p99 | ratio (median) | goal |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let (ref_name, ref_med, ref_p99, ratio) = match &row.reference {
                Some((name, r)) => (
                    name.as_str(),
                    fmt_ns(r.median()),
                    fmt_ns(r.p99()),
                    format!("{:.2}×", row.ours.median() / r.median()),
                ),
                None => ("", "-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "| {}: {} (n={}) | {} | {} | {} | {} | {} | {} | {} |",
                row.section,
                row.what,
                row.ours.len(),
                fmt_ns(row.ours.median()),
                fmt_ns(row.ours.p99()),
                ref_name,
                ref_med,
                ref_p99,
                ratio,
                goal_cell(&row.goal),
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "| measurement | ours | reference | goal |");
        let _ = writeln!(s, "|---|---|---|---|");
        for f in &self.facts {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                f.what,
                f.value,
                f.reference,
                goal_cell(&f.goal)
            );
        }
        for note in &self.notes {
            let _ = writeln!(s, "\n{note}");
        }
        s
    }

    pub(crate) fn write_files(&self, config: &Config) -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let svg = plot_takeover(&self.takeover);
        std::fs::write(root.join("benches/takeover.svg"), svg)?;
        let template = std::fs::read_to_string(root.join("benches/BENCHMARKS.md.in"))?;
        let machine = machine_description();
        let text = template
            .replace("@DATE@", &rfc3339(self.started))
            .replace("@MACHINE@", &machine)
            .replace(
                "@DURATION@",
                &format!("{:.0} s", self.elapsed.as_secs_f64()),
            )
            .replace(
                "@SETTINGS@",
                &format!(
                    "{} rounds × {} in-process acquisitions per kind, {} take-over trials per \
                     series, {} storms of {} copies per tool, {} s idle; lock files on {}",
                    config.acquire_rounds,
                    config.acquire_batch,
                    config.takeover_trials,
                    config.storm_rounds,
                    config.storm_copies,
                    config.idle.as_secs(),
                    fs_name(config.work.path()),
                ),
            )
            .replace("@TABLE@", &self.table());
        std::fs::write(root.join("BENCHMARKS.md"), text)?;
        println!("wrote BENCHMARKS.md and benches/takeover.svg");
        Ok(())
    }
}

fn goal_cell(goal: &Option<(String, bool)>) -> String {
    match goal {
        Some((text, true)) => format!("{text}: **met**"),
        Some((text, false)) => format!("{text}: **not met**"),
        None => "-".into(),
    }
}

/// `2026-11-23T10:00:00Z`: the run's date as the library writes a holder's start time.
fn rfc3339(time: std::time::SystemTime) -> String {
    let mut holder = unique_instance::Holder::default();
    holder.since = Some(time);
    holder.since_rfc3339().unwrap_or_default()
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let uname = rustix::system::uname();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dbus = Command::new("dbus-daemon")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores; Linux {}; {dbus}; load average at the end: {}",
        uname.release().to_string_lossy(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

//! What is known of the running instance, whichever backend told it: [`Holder`], and the
//! process facts (start time, executable) both backends fill it with.
//! Must not: read or write a lock file (its record is `lockfile::record`'s).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::scope::{Backend, BusKind};

/// What is known of the process that holds an instance.
///
/// Every field is best effort: a lock file with an empty or unreadable record gives a holder
/// with nothing but [`Holder::found_by`] and [`Holder::lock_file`] set, and that still means
/// "running" — the kernel lock decides, never the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Holder {
    /// Process ID, as seen from this process's PID namespace when it came from the bus.
    pub pid: Option<u32>,
    /// User ID of the holder.
    pub uid: Option<u32>,
    /// When the holding process started.
    #[serde(serialize_with = "serialize_time")]
    pub since: Option<SystemTime>,
    /// The backend through which this holder was found.
    pub found_by: Option<Backend>,
    /// The bus the holder owns the name on, if known.
    pub bus: Option<BusKind>,
    /// The holder's unique bus name (`:1.42`), if known.
    pub bus_unique_name: Option<String>,
    /// The holder's executable, if known.
    pub executable: Option<PathBuf>,
    /// The host the holder runs on, from the lock file record.
    pub hostname: Option<String>,
    /// The lock file it holds, when it was found through one.
    pub lock_file: Option<PathBuf>,
    /// Set when the holder holds the lock file but only waits in this bus's queue for the name,
    /// behind a process that owned it when it queued (one that holds the name without this lock
    /// file: `--backend dbus`, say): the holder does not run as the instance yet. A refused copy
    /// names the name's owner instead when it can ask that bus.
    pub queued_on_bus: Option<BusKind>,
    /// Where on the bus the holder waits, from its record: how a refused copy tells the
    /// holder's bus and connection from others (see [`BusQueuePlace`]).
    #[serde(skip)]
    pub(crate) queue_place: Option<BusQueuePlace>,
}

/// Where the holder of a lock file waits in a bus's queue for the name: the bus, the holder's
/// unique name there, and the bus's GUID. The GUID tells the holder's bus from another one at
/// the same kind (another session's bus, or the same address after a restart, which gives out
/// the same unique names again): a refused copy on another bus must not compare unique names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BusQueuePlace {
    pub(crate) bus: BusKind,
    pub(crate) unique_name: String,
    pub(crate) server_guid: String,
}

fn serialize_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&format_rfc3339(*t)),
        None => s.serialize_none(),
    }
}

impl Holder {
    /// True when nothing identifying is known (an empty or garbled lock file record).
    pub fn is_unknown(&self) -> bool {
        self.pid.is_none() && self.bus_unique_name.is_none()
    }

    /// [`Holder::since`] in RFC 3339, whole seconds, UTC (`2026-11-23T10:00:00Z`): as the
    /// holder's message and its JSON (`serde`) give it.
    pub fn since_rfc3339(&self) -> Option<String> {
        self.since.map(format_rfc3339)
    }
}

impl fmt::Display for Holder {
    /// Reads like `pid 4242, since 2026-11-23T10:00:00Z, on the session bus`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        match self.pid {
            Some(pid) => parts.push(format!("pid {pid}")),
            // Also a bus name's owner whose PID is not known (see `dbus::owner_of`): its unique
            // name alone does not tell which process holds it.
            None => parts.push("holder unknown".to_owned()),
        }
        if let Some(since) = self.since {
            parts.push(format!("since {}", format_rfc3339(since)));
        }
        if let Some(bus) = self.bus {
            parts.push(format!("on the {bus} bus"));
        }
        if let Some(path) = &self.lock_file {
            parts.push(format!("lock file {}", path.display()));
        }
        if let Some(bus) = self.queued_on_bus {
            parts.push(format!(
                "it only waits in the {bus} bus's queue for the name"
            ));
        }
        if let Some(name) = &self.bus_unique_name
            && self.found_by == Some(Backend::Dbus)
        {
            parts.push(format!("as {name}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// When process `pid` started: its start time in `/proc/PID/stat` (clock ticks since boot) plus
/// the boot time, taken as `CLOCK_REALTIME - CLOCK_BOOTTIME` (as the kernel derives `btime`),
/// which spares reading `/proc/stat`: that file lists every interrupt and is slow to generate.
pub(crate) fn process_start_time(pid: u32) -> Option<SystemTime> {
    let stat = read_small_file(&format!("/proc/{pid}/stat"))?;
    let stat = std::str::from_utf8(&stat).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    // starttime is field 22 overall, the 20th after "pid (comm)".
    let ticks: u64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    // glibc's way (AT_CLKTCK, else 100), not rustix's: on kernels before 6.4 that reads
    // /proc/self/auxv, and panics if it cannot.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok())
        .unwrap_or(100)
        .max(1);
    let since_boot = Duration::from_millis(ticks.checked_mul(1000)? / hz);
    let as_duration = |t: rustix::time::Timespec| {
        Duration::new(
            u64::try_from(t.tv_sec).ok()?,
            u32::try_from(t.tv_nsec).ok()?,
        )
        .into()
    };
    let now = as_duration(rustix::time::clock_gettime(rustix::time::ClockId::Realtime))?;
    let up: Option<Duration> =
        as_duration(rustix::time::clock_gettime(rustix::time::ClockId::Boottime));
    let boot = now.checked_sub(up?)?;
    UNIX_EPOCH.checked_add(boot.checked_add(since_boot)?)
}

/// This process's start time in whole seconds since the epoch, as a record gives it: read from
/// `/proc` once per process (a child after `fork` reads its own), since every new lock file
/// gets it twice (its first record, then the holder's).
pub(crate) fn own_start_secs() -> Option<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    // The PID in the high half, the seconds in the low half (until 2106); 0: not read yet.
    static OWN: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let cached = OWN.load(Ordering::Relaxed);
    if cached != 0 && (cached >> 32) as u32 == pid {
        return Some(cached & u64::from(u32::MAX));
    }
    let secs = process_start_time(pid)?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs();
    if let Ok(low) = u32::try_from(secs) {
        OWN.store((u64::from(pid) << 32) | u64::from(low), Ordering::Relaxed);
    }
    Some(secs)
}

/// Reads a small file (a `/proc` entry) with one `open`, as few `read`s as it takes, one `close`.
fn read_small_file(path: &str) -> Option<Vec<u8>> {
    use rustix::fs::{Mode, OFlags};
    let file = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match rustix::io::read(&file, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    Some(buf)
}

/// The state of process `pid` as `/proc/PID/stat` shows it (`R`, `S`, `Z`...): the first field
/// after "pid (comm)", whose name may hold ')'. `None` when `/proc` cannot tell.
fn process_state(pid: u32) -> Option<u8> {
    let stat = read_small_file(&format!("/proc/{pid}/stat"))?;
    let end = stat.iter().rposition(|&b| b == b')')?;
    stat[end + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .copied()
}

/// Whether process `pid` runs and is not on its way out: not gone, not a zombie, and not
/// exiting (`PF_EXITING` in its `/proc/PID/stat` flags: set as `exit` begins, before the
/// kernel closes its descriptors, and with them its locks and its bus connection). False when
/// `/proc` cannot tell.
pub(crate) fn process_lives_on(pid: u32) -> bool {
    /// `PF_EXITING` of the kernel's `include/linux/sched.h`.
    const PF_EXITING: u64 = 0x4;
    let Some(stat) = read_small_file(&format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(end) = stat.iter().rposition(|&b| b == b')') else {
        return false;
    };
    let fields: Vec<&[u8]> = stat[end + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .collect();
    // After the command: state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let (Some(state), Some(flags)) = (fields.first(), fields.get(6)) else {
        return false;
    };
    let flags = std::str::from_utf8(flags)
        .ok()
        .and_then(|f| f.parse::<u64>().ok());
    !matches!(state, [b'Z' | b'X' | b'x']) && flags.is_some_and(|f| f & PF_EXITING == 0)
}

/// The user IDs of process `pid` (real, effective, saved, file system), from the `Uid:` line of
/// `/proc/PID/status`; `None` when `/proc` cannot tell.
pub(crate) fn process_uids(pid: u32) -> Option<Vec<u32>> {
    let status = read_small_file(&format!("/proc/{pid}/status"))?;
    let status = std::str::from_utf8(&status).ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace()
        .map(|uid| uid.parse().ok())
        .collect()
}

/// Whether process `pid` runs now, as `/proc` shows it: false when it is gone, a zombie (dead,
/// not yet reaped), or not visible from this PID namespace. Says nothing of whether it is the
/// process that once had that PID.
pub(crate) fn process_is_running(pid: u32) -> bool {
    !matches!(process_state(pid), None | Some(b'Z' | b'X' | b'x'))
}

/// Whether process `pid` is a zombie (dead, not yet reaped by its parent), as `/proc` shows it:
/// false when `/proc` cannot tell.
pub(crate) fn process_is_zombie(pid: u32) -> bool {
    matches!(process_state(pid), Some(b'Z' | b'X' | b'x'))
}

/// The executable of process `pid`, where `/proc` lets us see it.
pub(crate) fn process_executable(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// `2026-11-23T10:00:00Z`: whole seconds, UTC.
pub(crate) fn format_rfc3339(time: SystemTime) -> String {
    let secs = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs(),
        Err(_) => 0,
    };
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's published algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_428_000); // 2026-11-23T10:00:00Z
        assert_eq!(format_rfc3339(t), "2026-11-23T10:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_holders_start_time_reads_as_in_its_message_and_json() {
        let mut holder = Holder::default();
        assert_eq!(holder.since_rfc3339(), None);
        holder.since = Some(UNIX_EPOCH + Duration::from_secs(1_795_428_000));
        let since = holder.since_rfc3339().expect("a start time");
        assert_eq!(since, "2026-11-23T10:00:00Z");
        assert!(holder.to_string().contains(&format!("since {since}")));
        let json = serde_json::to_value(&holder).expect("json");
        assert_eq!(json["since"], since.as_str());
    }

    #[test]
    fn a_dead_unreaped_child_is_a_zombie_and_a_live_one_is_not() {
        let mut live = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        assert!(!process_is_zombie(live.id()), "a sleeping process");
        assert!(!process_is_zombie(std::process::id()), "ourselves");
        live.kill().expect("kill");
        // Not reaped yet: a zombie until `wait`. Its state is read until it shows (the kill is
        // delivered asynchronously), with a bound.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !process_is_zombie(live.id()) {
            assert!(
                std::time::Instant::now() < deadline,
                "never became a zombie"
            );
            std::thread::yield_now();
        }
        live.wait().expect("reap");
        assert!(!process_is_zombie(live.id()), "reaped: gone, not a zombie");
    }

    #[test]
    fn a_process_lives_on_until_it_exits() {
        assert!(process_lives_on(std::process::id()), "ourselves");
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        assert!(process_lives_on(child.id()), "a sleeping process");
        child.kill().expect("kill");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while process_lives_on(child.id()) {
            assert!(std::time::Instant::now() < deadline, "still lives");
            std::thread::yield_now();
        }
        // Seen exiting (`PF_EXITING`) before it is a zombie, or as one: either way no longer
        // living on, and a zombie until reaped.
        while !process_is_zombie(child.id()) {
            assert!(std::time::Instant::now() < deadline, "never a zombie");
            assert!(!process_lives_on(child.id()), "lives again");
            std::thread::yield_now();
        }
        child.wait().expect("reap");
        assert!(!process_lives_on(child.id()), "reaped");
    }

    #[test]
    fn own_start_time_is_in_the_past() {
        let start = process_start_time(std::process::id()).expect("/proc is mounted");
        assert!(start <= SystemTime::now());
    }

    #[test]
    fn holder_message_names_pid_time_and_bus() {
        let holder = Holder {
            pid: Some(4242),
            since: Some(UNIX_EPOCH + Duration::from_secs(1_795_428_000)),
            found_by: Some(Backend::Dbus),
            bus: Some(BusKind::Session),
            ..Holder::default()
        };
        assert_eq!(
            holder.to_string(),
            "pid 4242, since 2026-11-23T10:00:00Z, on the session bus"
        );
        let unknown = Holder {
            found_by: Some(Backend::LockFile),
            lock_file: Some("/run/x.lock".into()),
            ..Holder::default()
        };
        assert_eq!(unknown.to_string(), "holder unknown, lock file /run/x.lock");
    }
}

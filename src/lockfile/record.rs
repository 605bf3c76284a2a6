//! The lock file's record: the one-line JSON a holder writes into its lock file
//! ([`LockRecord`]), and its whole-file write and bounded read.
//! Must not: decide who holds the lock (the kernel lock decides), nor wait for a record.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::holder::{BusQueuePlace, Holder, own_start_secs};
use crate::scope::Backend;
use crate::scope::BusKind;

use super::ofd::retry_eintr;

/// How much of a lock file is ever read: a record is written shorter than this (see
/// [`LockRecord::to_line`]), and a file's size is chosen by whoever made it.
pub(crate) const MAX_RECORD_LEN: usize = 4096;

/// The one-line JSON record a holder writes into its lock file.
///
/// Unknown keys are refused: whether a file at the lock path is a crashed holder's (ours to
/// take over and remove) is decided by its content alone, so only what a holder writes counts.
///
/// The record earlier versions wrote into a file that is not ours to remove
/// ([`LockRecord::keep`]) is marked by a tab before its JSON: whitespace to JSON, so every
/// reader reads the same record, and a holder's writes never start a line with one otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LockRecord {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    /// Process start time, seconds since the Unix epoch.
    pub(crate) start_time: Option<u64>,
    pub(crate) backend: Vec<Backend>,
    pub(crate) bus: Option<BusKind>,
    pub(crate) bus_unique_name: Option<String>,
    pub(crate) executable: Option<PathBuf>,
    pub(crate) hostname: Option<String>,
    /// Set while the holder waits in a bus's queue for the name, behind another owner
    /// (see [`Holder::queued_on_bus`]); cleared once it owns the name, or the bus is gone.
    /// Written only when set: every other record is as earlier versions wrote it, which refuse
    /// keys they do not know (they would take the file for someone else's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) queued_on_bus: Option<BusQueuePlace>,
    /// The file was there, empty, before a holder took it (`touch keep.flag`, a shared
    /// `job.lock`): someone else's. Written by earlier versions, which wrote their record into
    /// such a file, as the mark [`KEEP_MARK`] before the JSON, not as a key; now only read: a
    /// copy that takes such a file over from a crashed holder empties it and keeps it (nothing
    /// of ours is written into someone else's file any more).
    #[serde(skip)]
    pub(crate) keep: bool,
}

/// The record a lock file of ours gets the moment it is made or taken over, before the
/// holder's own: this process's PID, user, start time and host. The start time tells this
/// process from a later one given its PID once it is gone (a review: a copy killed here left a
/// record naming, hours later, whatever process had its PID by then, as the one running). A
/// copy killed before it wrote its own leaves
/// this, never an empty file, which the next copy would take for someone else's (see
/// [`LockRecord::keep`]) and never remove: root's, in a shared directory, would then keep every
/// other user out for good (a review). At least `len` bytes long (padded with spaces before its
/// newline, as JSON allows), so that one write replaces a record of that length whole.
pub(super) fn placeholder(len: usize) -> Vec<u8> {
    let mut line = LockRecord {
        pid: std::process::id(),
        uid: rustix::process::geteuid().as_raw(),
        start_time: own_start_secs(),
        backend: vec![Backend::LockFile],
        bus: None,
        bus_unique_name: None,
        executable: None,
        hostname: Some(this_host()),
        queued_on_bus: None,
        keep: false,
    }
    .to_line();
    if line.len() < len {
        line.pop();
        line.resize(len - 1, b' ');
        line.push(b'\n');
    }
    line
}

/// What a copy puts at once into a crashed holder's file it takes over, whose record is
/// `previous`, `len` bytes long: a [`placeholder`] in a file of ours; nothing at all in a kept
/// one (someone else's, where earlier versions wrote a record marked kept), which is emptied,
/// as its owner left it.
pub(super) fn takeover_line(previous: &LockRecord, len: usize) -> Vec<u8> {
    if previous.keep {
        Vec::new()
    } else {
        placeholder(len)
    }
}

/// For the fuzz targets: [`takeover_line`] for a file whose whole content is `content`, and
/// whether a file's whole content is marked kept; `None` where `content` is not a whole record.
#[cfg(any(fuzzing, test))]
pub(crate) fn takeover_placeholder(content: &[u8]) -> Option<Vec<u8>> {
    LockRecord::parse_whole(content).map(|record| takeover_line(&record, content.len()))
}

#[cfg(any(fuzzing, test))]
pub(crate) fn is_kept(content: &[u8]) -> Option<bool> {
    LockRecord::parse_whole(content).map(|record| record.keep)
}

/// This host's name, as records give it.
fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// What starts the line of a record whose file is kept (see [`LockRecord::keep`]).
const KEEP_MARK: u8 = b'\t';

impl LockRecord {
    /// The record for this process.
    pub(crate) fn for_self(
        backend: Vec<Backend>,
        bus: Option<BusKind>,
        bus_unique_name: Option<String>,
    ) -> Self {
        LockRecord {
            pid: std::process::id(),
            uid: rustix::process::geteuid().as_raw(),
            start_time: own_start_secs(),
            backend,
            bus,
            bus_unique_name,
            executable: std::env::current_exe().ok(),
            hostname: Some(this_host()),
            queued_on_bus: None,
            keep: false,
        }
    }

    /// One line, newline-terminated, for a single `write`: always a record that
    /// [`LockRecord::parse`] reads back from the first [`MAX_RECORD_LEN`] bytes, because a lock
    /// file holding anything else is taken for someone else's file. So an executable path that
    /// is not UTF-8 (JSON cannot hold it) or too long is left out, and so, if still too long,
    /// are the other strings.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        let mark: &[u8] = if self.keep { &[KEEP_MARK] } else { &[] };
        let fits = |record: &LockRecord| {
            serde_json::to_vec(record)
                .ok()
                .filter(|line| mark.len() + line.len() < MAX_RECORD_LEN)
        };
        let mut line = fits(self)
            .or_else(|| {
                fits(&LockRecord {
                    executable: None,
                    ..self.clone()
                })
            })
            .or_else(|| {
                fits(&LockRecord {
                    executable: None,
                    hostname: None,
                    bus_unique_name: None,
                    ..self.clone()
                })
            })
            // Numbers and enums alone: always serialisable, and far shorter than the limit.
            .unwrap_or_else(|| {
                serde_json::to_vec(&LockRecord {
                    executable: None,
                    hostname: None,
                    bus_unique_name: None,
                    queued_on_bus: None,
                    ..self.clone()
                })
                .unwrap_or_default()
            });
        line.splice(0..0, mark.iter().copied());
        line.push(b'\n');
        line
    }

    /// The record `line` (one line, without its newline) holds, with its mark read.
    fn from_line(line: &[u8]) -> Option<Self> {
        serde_json::from_slice(line).ok().map(|record| LockRecord {
            keep: line.first() == Some(&KEEP_MARK),
            ..record
        })
    }

    /// Parses a record; `None` for empty or garbage content ("holder unknown", never "stale").
    pub(crate) fn parse(content: &[u8]) -> Option<Self> {
        let line = content.split(|&b| b == b'\n').next()?;
        Self::from_line(line)
    }

    /// Parses the whole content of a lock file (read with room for more than
    /// [`MAX_RECORD_LEN`] bytes) that is a record and nothing else: exactly one line, ended by
    /// its newline, at most [`MAX_RECORD_LEN`] bytes, as a holder leaves it (the spaces a
    /// shorter re-write is padded with before the newline are JSON whitespace). Only such a
    /// file, a crashed holder's, may be taken over and removed: a record followed by anything
    /// is someone's data that merely starts like one.
    pub(crate) fn parse_whole(content: &[u8]) -> Option<Self> {
        if content.len() > MAX_RECORD_LEN {
            return None;
        }
        let line = content.strip_suffix(b"\n")?;
        if line.contains(&b'\n') {
            return None;
        }
        Self::from_line(line)
    }

    pub(crate) fn into_holder(self, lock_file: PathBuf) -> Holder {
        Holder {
            pid: Some(self.pid),
            uid: Some(self.uid),
            // The record is anyone's to plant: a time past what `SystemTime` holds is unknown,
            // not a panic.
            since: self
                .start_time
                .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs))),
            found_by: Some(Backend::LockFile),
            bus: self.bus,
            bus_unique_name: self.bus_unique_name,
            executable: self.executable,
            hostname: self.hostname,
            lock_file: Some(lock_file),
            queued_on_bus: self.queued_on_bus.as_ref().map(|place| place.bus),
            queue_place: self.queued_on_bus,
        }
    }
}

/// `line`, a record line written, without its keep mark (see [`LockRecord::keep`]): the line
/// for a file of our own.
pub(super) fn without_keep_mark(line: &[u8]) -> &[u8] {
    line.strip_prefix(&[KEEP_MARK]).unwrap_or(line)
}

/// Writes `line` at offset 0 of `file` with one `pwrite` (see [`HeldLock::write_record`](super::held::HeldLock::write_record)).
pub(super) fn write_whole(file: impl AsFd, line: &[u8]) -> std::io::Result<()> {
    let n = retry_eintr(|| rustix::io::pwrite(&file, line, 0))?;
    if n != line.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// Writes `line` as [`write_whole`] does, unless the file system has no room for it (`ENOSPC`,
/// `EDQUOT`, or a write cut short): then the file is emptied instead, and `Ok(false)` says so.
/// An empty record is "holder unknown" to every reader, and the lock excludes all the same: a
/// full file system (any local user can fill a shared `/run` through `/run/lock`) must not stop
/// an instance from starting, nor make a lock file merely removed a loss. Emptying frees
/// blocks, so it works on a full file system; if it fails too, the first error is returned.
pub(super) fn write_or_unknown(
    file: impl AsFd,
    line: &[u8],
    path: &std::path::Path,
) -> std::io::Result<bool> {
    let no_room = |e: &std::io::Error| {
        e.kind() == std::io::ErrorKind::WriteZero
            || e.raw_os_error().is_some_and(|code| {
                code == rustix::io::Errno::NOSPC.raw_os_error()
                    || code == rustix::io::Errno::DQUOT.raw_os_error()
            })
    };
    // A record past the file size limit (`ulimit -f`) is refused before it is written: the write
    // would stop short at the limit, and the next one past it would kill the process with
    // SIGXFSZ, unless ignored (a review: `run` under `ulimit -f 0` died silently with status
    // 153, which reads as COMMAND's death by a signal; under a limit shorter than the record, a
    // short write was taken for a full disk and the holder left unknown, silently).
    let fsize = rustix::process::getrlimit(rustix::process::Resource::Fsize).current;
    if let Some(limit) = fsize.filter(|&limit| limit < line.len() as u64) {
        return Err(file_size_limit_error(limit, line.len()));
    }
    match write_whole(&file, line) {
        Ok(()) => Ok(true),
        // The limit lowered meanwhile, with SIGXFSZ ignored.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) => {
            let limit = rustix::process::getrlimit(rustix::process::Resource::Fsize).current;
            Err(limit.map_or(e, |limit| file_size_limit_error(limit, line.len())))
        }
        Err(e) if no_room(&e) => {
            if retry_eintr(|| rustix::fs::ftruncate(&file, 0)).is_err() {
                return Err(e);
            }
            tracing::warn!(path = %path.display(), error = %e,
                "no room to write the holder record: the lock is held, and copies refused are told the holder is unknown");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What a record of `needed` bytes past the file size limit of `bytes` is, said with what to do.
fn file_size_limit_error(bytes: u64, needed: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::FileTooLarge,
        format!(
            "the file size limit (RLIMIT_FSIZE, `ulimit -f`) is {bytes} bytes, too small for the \
             holder record ({needed} bytes): raise it (e.g. `ulimit -f unlimited`)"
        ),
    )
}

/// The start of the file: at most [`MAX_RECORD_LEN`] bytes and one more, however large the file
/// is (anyone who can create a file at the path chooses its size).
pub(super) fn read_content(file: impl AsFd) -> rustix::io::Result<Vec<u8>> {
    // One byte more than a record: to tell a whole record from one followed by more.
    let mut buf = vec![0u8; MAX_RECORD_LEN + 1];
    let n = retry_eintr(|| rustix::io::pread(&file, &mut buf, 0))?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_garbage_is_unknown() {
        let record = LockRecord::for_self(vec![Backend::LockFile], None, None);
        let line = record.to_line();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(LockRecord::parse(&line), Some(record));
        assert_eq!(LockRecord::parse(b""), None);
        assert_eq!(LockRecord::parse(b"\0\0garbage{"), None);
    }

    #[test]
    fn a_place_in_a_bus_queue_round_trips_and_older_records_have_none() {
        let mut record = LockRecord::for_self(vec![Backend::LockFile], None, None);
        record.queued_on_bus = Some(BusQueuePlace {
            bus: BusKind::Session,
            unique_name: ":1.7".into(),
            server_guid: "0123456789abcdef0123456789abcdef".into(),
        });
        let line = record.to_line();
        assert_eq!(LockRecord::parse_whole(&line), Some(record.clone()));
        let holder = record.into_holder(PathBuf::from("/x.lock"));
        assert_eq!(holder.queued_on_bus, Some(BusKind::Session));
        assert!(
            holder
                .to_string()
                .contains("only waits in the session bus's queue")
        );
        // Without a mark, as earlier versions write them, and as they read them.
        let unmarked = LockRecord::for_self(vec![Backend::LockFile], None, None).to_line();
        assert!(
            !String::from_utf8_lossy(&unmarked).contains("queued_on_bus"),
            "{unmarked:?}"
        );
        // As records written before the mark existed are.
        let older = br#"{"pid":1,"uid":0,"start_time":null,"backend":["lock-file"],"bus":null,"bus_unique_name":null,"executable":null,"hostname":null}"#;
        let older = LockRecord::parse(older).expect("an older record");
        assert_eq!(older.queued_on_bus, None);
        assert_eq!(
            older.into_holder(PathBuf::from("/x.lock")).queued_on_bus,
            None
        );
    }

    #[test]
    fn only_a_record_and_nothing_else_is_a_whole_record() {
        let record = LockRecord::for_self(vec![Backend::LockFile], None, Some(":1.7".into()));
        let line = record.to_line();
        assert_eq!(LockRecord::parse_whole(&line), Some(record.clone()));
        // Padded with spaces before its newline, as a shorter re-write leaves it.
        let mut padded = line[..line.len() - 1].to_vec();
        padded.extend_from_slice(b"     \n");
        assert_eq!(LockRecord::parse_whole(&padded), Some(record));
        let mut followed = line.clone();
        followed.extend_from_slice(b"DATA\n");
        let mut long = line[..line.len() - 1].to_vec();
        long.resize(MAX_RECORD_LEN, b' ');
        long.push(b'\n');
        for (what, content) in [
            ("no newline", &line[..line.len() - 1]),
            ("followed by data", &followed[..]),
            ("two newlines", &[&line[..], b"\n"].concat()[..]),
            ("longer than a record", &long[..]),
            (
                "unknown key",
                b"{\"pid\":1,\"uid\":0,\"backend\":[],\"x\":1}\n",
            ),
            ("empty", b""),
            ("newline only", b"\n"),
        ] {
            assert_eq!(LockRecord::parse_whole(content), None, "{what}");
        }
        assert_eq!(
            LockRecord::parse(b"{\"pid\":1,\"uid\":0,\"backend\":[],\"x\":1}"),
            None
        );
    }

    /// The keep mark reads back, is what marks a record (never a holder's own write), and is
    /// whitespace to every JSON reader, so a reader that knows nothing of it reads the record.
    #[test]
    fn the_keep_mark_reads_back_and_is_json_whitespace() {
        let own = LockRecord::for_self(vec![Backend::LockFile], None, Some(":1.7".into()));
        let kept = LockRecord {
            keep: true,
            ..own.clone()
        };
        let line = kept.to_line();
        assert_eq!(line.first(), Some(&KEEP_MARK));
        assert_eq!(LockRecord::parse_whole(&line), Some(kept.clone()));
        assert_eq!(LockRecord::parse(&line), Some(kept));
        assert_eq!(without_keep_mark(&line), own.to_line());
        assert_ne!(own.to_line().first(), Some(&KEEP_MARK));
        let plain: serde_json::Value = serde_json::from_slice(&line).expect("plain JSON");
        assert_eq!(plain["pid"], own.pid);
    }

    #[test]
    fn every_record_written_reads_back_within_the_limit() {
        use std::os::unix::ffi::OsStringExt;
        let own = LockRecord::for_self(vec![Backend::LockFile], None, None);
        for (keep, executable) in [false, true].into_iter().flat_map(|keep| {
            [
                PathBuf::from(std::ffi::OsString::from_vec(b"/opt/\xff\xfe/app".to_vec())),
                PathBuf::from(format!("/{}", "\u{1}".repeat(3000))),
            ]
            .map(|executable| (keep, executable))
        }) {
            let record = LockRecord {
                keep,
                executable: Some(executable),
                hostname: Some("\u{1}".repeat(3000)),
                ..own.clone()
            };
            let line = record.to_line();
            assert!(line.len() <= MAX_RECORD_LEN, "{}", line.len());
            let back = LockRecord::parse(&line).expect("reads back");
            assert_eq!((back.pid, back.keep), (own.pid, keep));
            assert_eq!(LockRecord::parse_whole(&line), Some(back));
        }
    }

    #[test]
    fn out_of_range_start_time_is_unknown_not_a_panic() {
        for secs in [u64::MAX, i64::MAX as u64, i64::MAX as u64 + 1] {
            let record = LockRecord {
                start_time: Some(secs),
                ..LockRecord::for_self(vec![Backend::LockFile], None, None)
            };
            // Whatever fits is formatted; whatever does not is left out.
            let holder = record.into_holder("/run/x.lock".into());
            let said = holder.to_string();
            if secs > i64::MAX as u64 {
                assert_eq!(holder.since, None, "{secs}");
                assert!(!said.contains("since"), "{secs}: {said}");
            }
            assert!(said.contains("/run/x.lock"), "{secs}: {said}");
        }
    }
}

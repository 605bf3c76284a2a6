//! Every line the tool prints goes through [`say!`]: to stderr (messages, warnings, errors) or
//! to stdout (`status`, `generate`'s summary).
//!
//! `println!` and `eprintln!` panic when the write fails: a full disk (`/dev/full`), a pipe
//! whose reader is gone (`2>&1 | logger`, and the logger died or was restarted), a dropped ssh
//! session. In the wrapper such a panic would end it while COMMAND's tree still runs (see
//! `run::abort_on_panic`), for a message nobody can read anyway. So a line that cannot be
//! written is dropped: what the tool does, and its exit status, never depend on it.
//!
//! Nor may a message ever hold up what the tool does. A write to stderr blocks while a pipe
//! is full and its reader does not read (a paused `| less`, a terminal after Ctrl-S, a stuck
//! logger): a wrapper that said "the instance was lost, stopping COMMAND" before stopping it
//! then never stopped it, and COMMAND ran on beside a new copy (a review). So stderr lines are
//! handed to a writer thread (one per process, started with the first line), which does the
//! blocking writes, in order; [`drain`] waits for it before the process exits, once the
//! instance is released and COMMAND's tree is gone: a blocked stderr then delays only the exit,
//! as it would any program's. `O_NONBLOCK` on stderr would do it without a thread, but the
//! open file description is COMMAND's too, whose writes would then fail.
//!
//! The keeper forks COMMAND while the writer thread may exist: fork copies only the calling
//! thread, and what runs in the child before exec (`run::spawn_guarded`'s `pre_exec`) makes
//! raw system calls only, never touching stderr, this queue or the allocator, so no lock the
//! writer thread held at the fork is ever waited for there.
//!
//! Stdout (`status`, `generate`) is written directly: nothing is enforced while it is written.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Prints one line (`say!("...", args)` to stderr, `say!(stdout, "...", args)` to stdout) as
/// `eprintln!` and `println!` do, but never panics: a failed write is ignored. The line is
/// written in one `write` (up to the pipe's atomic size), so that lines of the wrapper, its
/// keeper and COMMAND sharing one stderr do not interleave within a line. A line to stderr
/// never blocks the caller: it is written by a thread of its own (see the module's
/// documentation).
macro_rules! say {
    (stdout, $($arg:tt)*) => {
        $crate::say::line(&mut ::std::io::stdout(), ::std::format_args!($($arg)*))
    };
    ($($arg:tt)*) => {
        $crate::say::queue(::std::format_args!($($arg)*))
    };
}

/// Writes `text` and a newline to `out`, ignoring a failure (see the module's documentation).
pub(crate) fn line(out: &mut impl std::io::Write, text: std::fmt::Arguments<'_>) {
    let mut line = text.to_string();
    line.push('\n');
    // Stdout is line-buffered: the line is handed to it whole, and flushed with it.
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

/// The most lines waiting for the writer thread. The tool says a few lines in a run, and only a
/// stderr nobody reads lets them pile up: past this many, a line is dropped (and counted, and
/// the count said once there is room), so that a stuck reader costs bounded memory, however
/// long the run. Bounded this way rather than by blocking the caller, which is the point.
const MAX_QUEUED: usize = 256;

/// The lines waiting for the writer thread.
struct Queue {
    lines: VecDeque<String>,
    /// Lines dropped since the last one written, the queue being full.
    dropped: u64,
    /// The writer thread was asked for.
    started: bool,
    /// The writer thread runs (when it could not be started, [`drain`] writes the lines).
    running: bool,
    /// The writer thread is writing a line it took from the queue.
    writing: bool,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    lines: VecDeque::new(),
    dropped: 0,
    started: false,
    running: false,
    writing: false,
});
/// Signalled when a line is queued (for the writer) and when the queue empties (for [`drain`]).
static CHANGED: Condvar = Condvar::new();

/// The queue, even if a thread panicked holding it (no invariant of it can be broken halfway).
fn queue_lock() -> MutexGuard<'static, Queue> {
    QUEUE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Queues `text` and a newline for stderr, starting the writer thread with the first line.
/// Never waits for the write: only for the queue's lock, which no thread holds while writing.
pub(crate) fn queue(text: std::fmt::Arguments<'_>) {
    let mut line = text.to_string();
    line.push('\n');
    queue_text(line);
}

/// Queues `text` (whole lines) for stderr, as [`queue`] does. Also the log lines' way out (see
/// [`QueuedStderr`]): nothing here may log, which would come back here with the queue locked.
fn queue_text(line: String) {
    let mut queue = queue_lock();
    if queue.lines.len() >= MAX_QUEUED {
        queue.dropped += 1;
        return;
    }
    queue.lines.push_back(line);
    if !queue.started {
        queue.started = true;
        // Without a thread (none can be made: EAGAIN), the lines wait for `drain`, at the exit.
        let started = std::thread::Builder::new()
            .name("say".into())
            .spawn(write_queued);
        queue.running = started.is_ok();
    }
    CHANGED.notify_all();
}

/// The writer thread: writes each queued line to stderr, in order, for as long as the process
/// lives.
fn write_queued() {
    let mut queue = queue_lock();
    loop {
        queue.writing = false;
        CHANGED.notify_all();
        let Some(line) = next_line(&mut queue) else {
            queue = CHANGED
                .wait(queue)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        };
        queue.writing = true;
        drop(queue);
        write_line(&line);
        queue = queue_lock();
    }
}

/// The next line to write, said first of those dropped if any were.
fn next_line(queue: &mut Queue) -> Option<String> {
    if queue.dropped > 0 {
        let dropped = std::mem::take(&mut queue.dropped);
        return Some(format!(
            "unique-instance: {dropped} message(s) dropped: stderr was not being read\n"
        ));
    }
    queue.lines.pop_front()
}

/// Writes one whole line to stderr (blocking), ignoring a failure.
fn write_line(line: &str) {
    let mut stderr = std::io::stderr();
    let _ = stderr
        .write_all(line.as_bytes())
        .and_then(|()| stderr.flush());
}

/// Writes one line to stderr now, blocking, after every line queued before it: for a process
/// that holds nothing and has nothing left to do (a refused copy about to exit), which need not
/// start the writer thread for it (a start-up storm is made of refused copies).
pub(crate) fn now(text: std::fmt::Arguments<'_>) {
    drain();
    line(&mut std::io::stderr(), text);
}

/// Waits until every line queued so far is written, for a process about to exit: called once
/// the instance is released and COMMAND's tree is gone, so that a stderr nobody reads delays
/// only the exit. Writes them itself where no writer thread could be started.
pub(crate) fn drain() {
    let mut queue = queue_lock();
    loop {
        if !queue.running {
            while let Some(line) = next_line(&mut queue) {
                write_line(&line);
            }
            return;
        }
        if queue.lines.is_empty() && queue.dropped == 0 && !queue.writing {
            return;
        }
        queue = CHANGED
            .wait(queue)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

/// Stderr for the log lines (`RUST_LOG`, see logging.rs): each line handed to the writer thread
/// as `say!`'s are, never written where it is made. The library logs on its way to a loss (a
/// review: with `RUST_LOG` set and a stderr nobody read, the watch blocked in the log line
/// before the loss was told, and `run` never stopped COMMAND).
#[derive(Default)]
pub(crate) struct QueuedStderr {
    text: Vec<u8>,
}

impl Write for QueuedStderr {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.text.is_empty() {
            queue_text(String::from_utf8_lossy(&std::mem::take(&mut self.text)).into_owned());
        }
        Ok(())
    }
}

/// The subscriber writes a whole line, then drops the writer: that is when it is queued.
impl Drop for QueuedStderr {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

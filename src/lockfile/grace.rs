//! Short, bounded, event-driven waits for a file to change: a look is made again after every
//! inotify event until it gives an answer or the deadline passes. On the calling thread, or,
//! for async code in any runtime, on a thread of its own that dropping the future ends at once.
//! Used for the grace a just-started holder gets to write its record (`reader.rs`), and the one
//! a second name of the lock file gets to go away (`attempt.rs`).
//! Must not: decide anything from what it waited for: the caller looks, and decides.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use super::ofd::retry_eintr;
use super::watch::drain;

/// Calls `look` until it gives an answer, again after every event of `inotify` (whose watches
/// the caller set up before this call, so that nothing between them is missed), until
/// `deadline`, or until `cancel` becomes readable: `None` then.
pub(super) fn await_answer<T>(
    inotify: &OwnedFd,
    cancel: Option<&OwnedFd>,
    deadline: Instant,
    mut look: impl FnMut() -> Option<T>,
) -> Option<T> {
    use rustix::event::{PollFd, PollFlags};
    loop {
        if let Some(answer) = look() {
            return Some(answer);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fds = vec![PollFd::new(inotify, PollFlags::IN)];
        if let Some(cancel) = cancel {
            fds.push(PollFd::new(cancel, PollFlags::IN));
        }
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match retry_eintr(|| rustix::event::poll(&mut fds, Some(&ts))) {
            Ok(n) if n > 0 => {
                if fds.get(1).is_some_and(|c| !c.revents().is_empty()) {
                    return None;
                }
                drain(inotify);
            }
            // The deadline, or poll failed: one last look.
            _ => return look(),
        }
    }
}

/// [`await_answer`] for async code, in any runtime (no I/O or time driver needed): see
/// [`on_a_thread`]. `None` as well when that thread cannot be had.
pub(super) async fn await_answer_async<T: Send + 'static>(
    inotify: OwnedFd,
    deadline: Instant,
    mut look: impl FnMut() -> Option<T> + Send + 'static,
) -> Option<T> {
    on_a_thread(move |cancel| await_answer(&inotify, Some(cancel), deadline, &mut look))
        .await
        .flatten()
}

/// Runs `wait` on a thread of its own while the executor runs other tasks, for async code in
/// any runtime (no I/O or time driver needed): `wait` must return soon once its argument, an
/// eventfd, becomes readable, which dropping the future does. `None` when no thread (or
/// eventfd) can be had.
pub(super) async fn on_a_thread<T: Send + 'static>(
    wait: impl FnOnce(&OwnedFd) -> T + Send + 'static,
) -> Option<T> {
    /// Wakes the waiting thread when the future is done or dropped.
    struct CancelOnDrop(Arc<OwnedFd>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
        }
    }
    let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
    let cancel = Arc::new(rustix::event::eventfd(0, flags).ok()?);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_cancel = Arc::clone(&cancel);
    std::thread::Builder::new()
        .name("unique-instance-grace".into())
        .spawn(move || {
            let _ = tx.send(wait(&thread_cancel));
        })
        .ok()?;
    let _cancel = CancelOnDrop(cancel);
    rx.await.ok()
}

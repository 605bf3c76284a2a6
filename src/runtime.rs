//! Running async code for blocking callers: the thread that services a blocking guard's bus
//! connection, and waiting for a future on the calling thread without a runtime.

use std::time::Duration;

/// Runs `fut` on this thread until it completes or `timeout` passes (`None`: no limit), with no
/// runtime: a blocking call made inside a runtime must not start one (tokio panics), and
/// waiting on a channel needs none.
pub(crate) fn block_here<F: std::future::Future>(
    fut: F,
    timeout: Option<Duration>,
) -> Option<F::Output> {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    // Unconstrained: inside a task whose cooperative budget is spent, tokio's primitives would
    // answer "pending" for ever, and this loop never returns to the scheduler to refill it.
    let mut fut = std::pin::pin!(tokio::task::unconstrained(fut));
    // A timeout too large to add is no limit.
    let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return None;
                }
                std::thread::park_timeout(left);
            }
            None => std::thread::park(),
        }
    }
}

/// A current-thread runtime driven by a thread of its own: it services the bus connection of a
/// guard from the blocking API. Dropping it ends the thread and the runtime's tasks.
pub(crate) struct ServiceThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    /// The thread: a release made on it (from a method of an object it serves) must not wait
    /// for it.
    thread: std::thread::ThreadId,
}

impl ServiceThread {
    /// Hands `rt` to a new thread; gives it back if the thread cannot be started.
    pub(crate) fn start(
        rt: tokio::runtime::Runtime,
    ) -> std::result::Result<Self, (tokio::runtime::Runtime, std::io::Error)> {
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The runtime comes back through this slot if the spawn fails.
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(rt)));
        let thread_slot = std::sync::Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("unique-instance".into())
            .spawn(move || {
                let rt = thread_slot.lock().ok().and_then(|mut s| s.take());
                if let Some(rt) = rt {
                    // Ends when the guard drops its sender.
                    let _ = rt.block_on(stopped);
                    rt.shutdown_background();
                }
            });
        match spawned {
            Ok(thread) => Ok(ServiceThread {
                handle,
                _stop: stop,
                thread: thread.thread().id(),
            }),
            Err(e) => {
                let rt = slot.lock().ok().and_then(|mut s| s.take());
                match rt {
                    Some(rt) => Err((rt, e)),
                    None => unreachable!("the runtime is taken only by a thread that started"),
                }
            }
        }
    }

    /// A service thread already running `handle`'s runtime until `stop` is dropped.
    pub(crate) fn from_parts(
        handle: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::ThreadId,
    ) -> Self {
        ServiceThread {
            handle,
            _stop: stop,
            thread,
        }
    }

    /// Is this the service thread itself?
    pub(crate) fn is_current_thread(&self) -> bool {
        std::thread::current().id() == self.thread
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

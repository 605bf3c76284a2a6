//! `unique-instance run`: hold the instance while COMMAND runs, and never let COMMAND run
//! unguarded.
//!
//! Over 400 lines: the wrapper's one event loop (signals, the keeper's notices, losses, re-created
//! lock files, `--kill-after`) reads best whole, with starting COMMAND and its unit tests.
//!
//! COMMAND is started by a keeper process (keeper/) that this wrapper starts first: the keeper
//! holds the lock until every process COMMAND started is gone, even after the wrapper was
//! killed. This file decides (signals, the loss of the instance, the clean-up, exit statuses);
//! the keeper carries out what concerns COMMAND's processes.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::ExitStatus;
use std::task::Poll;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use rustix::process::{Pid, Signal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::{Cause, Origin};
use signal_hook_tokio::SignalsInfo;
use unique_instance::{Error, InstanceGuard, LockFileRecreations, Loss, LossWatcher, Wait};

use crate::cli::{BackendArg, RunArgs, WaitFor};
use crate::{EXIT_INTERNAL, ExitCode, fail, keeper};

/// The signals passed on to COMMAND.
pub(crate) const FORWARDED: [i32; 6] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// Exit status when the instance was lost while COMMAND ran, and COMMAND was stopped for it:
/// exclusion could no longer be enforced (`EX_UNAVAILABLE`, as for "no usable backend").
const EXIT_LOST: u8 = 69;
/// COMMAND exists but could not be executed (as shells, `env` and `timeout` say).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// COMMAND was not found.
const EXIT_NOT_FOUND: u8 = 127;

pub(crate) fn run(args: RunArgs) -> ExitCode {
    if let Some(missing) = proc_missing() {
        return missing;
    }
    let found_free = match look_early(&args) {
        Early::Refused(code) => return code,
        Early::Free => true,
        Early::Unknown => false,
    };
    let ignored = inherited_ignored();
    abort_on_panic();
    // One thread: the guard's bus connection, the signal stream, the child's exit and the
    // loss notifications are all served from here. It must be the main thread, because
    // PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_INTERNAL, format_args!("cannot start a runtime: {e}")),
    };
    let code = runtime.block_on(supervise(args, found_free, ignored));
    // A thread still blocked waiting for the lock (a wait we gave up on) must not hold up the exit.
    runtime.shutdown_background();
    code
}

/// From here on a panic (a bug) ends the wrapper at once, after printing it, without unwinding.
/// Unwinding would drop the [`InstanceGuard`], whose `Drop` removes the lock file and releases
/// the bus name, while the keeper may still be stopping COMMAND's tree: a new copy could start
/// beside it. An abort leaves all of that to the kernel, as a SIGKILL would: the keeper's
/// duplicates keep the lock file (which stays) and the bus name held, and the keeper, seeing
/// the wrapper gone, stops the tree and lets go only once it is gone. Before the keeper holds
/// anything, the kernel releases what the wrapper held as the process ends.
///
/// A hook rather than `panic = "abort"` in Cargo.toml: cargo takes `panic` only per profile,
/// for the whole workspace (the library, whose users choose their own, included), and builds
/// tests unwinding whatever the profile says. The hook covers exactly the wrapper (the keeper
/// holds nothing that unwinding would release early), in every build.
///
/// The message is written by the default hook, which blocks on a stderr nobody reads: a
/// wrapper stuck there would never end, so the keeper would never take over, and a later loss
/// would stop nothing (a review). A thread aborts the process a second after the panic,
/// whatever the write does; where no thread can be started, nothing is written.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let deadline = std::thread::Builder::new().spawn(|| {
            std::thread::sleep(PANIC_MESSAGE_GRACE);
            std::process::abort();
        });
        if deadline.is_ok() {
            // The default hook: it ignores a stderr it cannot write to.
            print(info);
        }
        std::process::abort();
    }));
}

/// How long a panic's message may take to write before the wrapper aborts all the same.
const PANIC_MESSAGE_GRACE: Duration = Duration::from_secs(1);

/// `found_free`: the early look found the lock file free (see [`look_early`]); `ignored`: the
/// forwarded signals our caller left ignored (see [`inherited_ignored`]).
async fn supervise(args: RunArgs, found_free: bool, ignored: u64) -> ExitCode {
    // Caught from the start: while we wait for the instance a signal ends the wait (as it would
    // have ended us); once COMMAND runs it is passed on. Not those our caller ignored: they stay
    // ignored, here and in COMMAND.
    let caught = FORWARDED
        .into_iter()
        .filter(|&signal| ignored & signal_bit(signal) == 0);
    let mut signals = match SignalsInfo::<WithOrigin>::new(caught) {
        Ok(signals) => signals,
        Err(e) => return fail(EXIT_INTERNAL, format_args!("cannot catch signals: {e}")),
    };
    let mut acquire = std::pin::pin!(options(&args).acquire_async());
    // A copy that will wait starts its keeper now, before acquiring, so that the keeper's
    // start-up (an exec, the dynamic loader, parsing) overlaps the wait rather than following
    // the take-over. One that found the lock file free when it looked (most likely the winner of
    // a start-up storm) starts it once its first step has taken the lock file and sent the bus
    // its requests, so that the start-up overlaps the bus's answer rather than following it
    // (and the moment it takes the lock file comes no later than before, so that no more copies
    // find it free). Either way the keeper starts nothing before it is told `go`, once the
    // instance is held; if the instance is not acquired after all (the bus name is held without
    // the lock file, a signal, a wait that ends), it is ended and reaped before we exit. Any
    // other copy starts it once it holds the instance: a copy refused by the early look (most
    // of a start-up storm) never pays for one.
    let mut prestarted = if args.wait.is_some() {
        match prestart(&args, ignored) {
            Ok(keeper) => Some(keeper),
            // Said now, not after the wait: the keeper would not start then either.
            Err(keeper::StartError::TooLong) => return arguments_too_long(&args),
            Err(_) => None,
        }
    } else {
        None
    };
    let mut first = None;
    if found_free && prestarted.is_none() {
        match std::future::poll_fn(|cx| Poll::Ready(acquire.as_mut().poll(cx))).await {
            Poll::Ready(acquired) => first = Some(acquired),
            // Any failure is met again, and answered, once the instance is held.
            Poll::Pending => prestarted = prestart(&args, ignored).ok(),
        }
    }
    let acquired = match first {
        Some(acquired) => acquired,
        None => tokio::select! {
            acquired = &mut acquire => acquired,
            Some(origin) = signals.next() => {
                tracing::debug!(signal = origin.signal, "signalled while acquiring; giving up");
                abandon(prestarted).await;
                return ExitCode::from(signal_exit_code(origin.signal));
            }
        },
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(e) => {
            abandon(prestarted).await;
            return refused(&args, &e);
        }
    };
    tracing::debug!(name = guard.name(), backends = ?guard.backends(), "acquired");
    if let Some(path) = guard.lock_file().filter(|_| !guard.lock_file_watched()) {
        // The library's own warning is a log line, off unless RUST_LOG asks.
        say!(
            "unique-instance: warning: cannot watch {} with inotify (its per-user limits, \
             fs.inotify.max_user_instances and max_user_watches, may be reached): it is \
             re-checked every second (or at --recheck, if shorter) instead, and a removal found so stops COMMAND as a loss, \
             since another copy may have run meanwhile",
            path.display()
        );
    }
    // Processes COMMAND leaves behind are re-parented to us rather than to init, so they can
    // be stopped before the instance is released (see `stop_leftovers`).
    let subreaper = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    if let Err(e) = subreaper {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    // A signal that came after the acquisition won the race above but before COMMAND exists
    // would be lost once COMMAND runs: a terminal's Ctrl-C is not passed on (see `forward`),
    // since it is taken to have reached COMMAND too. It ends us here, as it would have ended
    // the wait, and COMMAND is never started.
    #[cfg(feature = "test-hooks")]
    stop_for_test("UNIQUE_INSTANCE_TEST_STOP_BEFORE_SPAWN");
    if let Some(origin) = pending_signal(&mut signals).await {
        abandon(prestarted).await;
        release(guard).await;
        return fail(
            signal_exit_code(origin.signal),
            format_args!(
                "signal {} came before COMMAND started; COMMAND was not started",
                origin.signal
            ),
        );
    }
    // The last moment a signal ends the wrapper without COMMAND: a test stops it here to
    // signal it while COMMAND is being started.
    #[cfg(feature = "test-hooks")]
    stop_for_test("UNIQUE_INSTANCE_TEST_STOP_BEFORE_GO");
    // Made before the keeper gets its `go`: a re-creation from now on is handed to it (once
    // more if `go` already had the new file: harmless).
    let recreations = guard.lock_file_recreations();
    if prestarted.as_mut().is_some_and(keeper::Pending::has_ended) {
        // Killed while it waited: it never had the lock, and started nothing.
        tracing::debug!("the keeper started before acquiring has ended; starting another");
        abandon(prestarted.take()).await;
    }
    // The keeper holds duplicates of both, so that the instance stays held until everything
    // COMMAND started is gone, even if we are killed.
    let held = keeper::Handed {
        lock: guard.lock_file_descriptor(),
        // What the wrapper's watch has not read when it dies is read by the keeper from it.
        watch: guard.lock_file_watch_descriptor(),
        bus: guard.bus_socket_descriptor(),
    };
    let started = match prestarted {
        Some(keeper) => keeper.go(held).await,
        None => {
            keeper::start(
                &args.command,
                &args.instance,
                args.notify,
                held,
                args.kill_after,
                ignored,
            )
            .await
        }
    };
    let (mut keeper, command) = match started {
        Ok(started) => started,
        Err(keeper::StartError::Command(e)) => {
            let code = match e.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXECUTE,
            };
            release(guard).await;
            return fail(
                code,
                format_args!("cannot run {}: {e}", args.command[0].to_string_lossy()),
            );
        }
        Err(keeper::StartError::TooLong) => {
            release(guard).await;
            return arguments_too_long(&args);
        }
        Err(keeper::StartError::Keeper(message)) => {
            stop_own_children().await;
            release(guard).await;
            return fail(
                EXIT_INTERNAL,
                format_args!("cannot start COMMAND's keeper process: {message}"),
            );
        }
    };
    // A signal that came while the keeper and COMMAND were being started, after the last check
    // above, did not reach COMMAND: it did not exist yet, or was not in our process group yet, or
    // still ignored it. That holds for one the kernel sent to the whole group too (a terminal's
    // Ctrl-C), which `forward` would take to have reached COMMAND: each is passed on now, as
    // sent. (One the kernel sent just as COMMAND had its group and default actions reaches it
    // twice: better than never.)
    while let Some(origin) = pending_signal(&mut signals).await {
        #[cfg(feature = "test-hooks")]
        panic_for_test();
        if let Some(signal) = Signal::from_named_raw(origin.signal) {
            tracing::debug!(
                signal = origin.signal,
                "came while COMMAND was being started; passing it on"
            );
            send(&mut keeper, Some(command), signal);
        }
    }
    if args.notify
        && let Err(e) = guard.notify_ready()
    {
        say!("unique-instance: warning: {e}");
    }
    let mut lock = Relock {
        lock: guard.lock_file_descriptor(),
        recreations,
    };
    let (status, lost, kill_at) = watch_child(
        &mut keeper,
        command,
        &mut signals,
        guard.loss_watcher(),
        &mut lock,
        &args,
    )
    .await;
    if status.is_ok() {
        // After a loss the whole tree got SIGTERM with COMMAND, and what is left gets SIGKILL at
        // the same deadline; otherwise what is left gets its SIGTERM now, and its own grace.
        let grace = match lost {
            Some(_) => Grace::SinceLoss(kill_at),
            None => Grace::Fresh(args.kill_after),
        };
        stop_leftovers(grace, &mut signals, &mut keeper, &mut lock).await;
    }
    // The keeper holds a duplicate of the lock: it must be gone before the instance is released.
    let keeper_status = keeper.finish().await;
    tracing::debug!(?keeper_status, "the keeper has exited");
    // Had it ended before what it kept (something killed it), that was re-parented to us: we
    // are a child subreaper too.
    if !children().is_empty() {
        stop_own_children().await;
    }
    #[cfg(feature = "test-hooks")]
    stop_for_test("UNIQUE_INSTANCE_TEST_STOP_BEFORE_RELEASE");
    let unacted = release_reporting_unacted_loss(guard, lost.is_none()).await;
    match (status, lost, unacted) {
        (_, Some(loss), _) => fail(
            EXIT_LOST,
            format_args!(
                "{}: COMMAND was stopped because the instance was lost: {}",
                args.instance.name, loss.reason
            ),
        ),
        (Ok(status), None, Some(reason)) => fail(
            EXIT_LOST,
            format_args!(
                "{}: the instance was lost while COMMAND ran ({reason}), which was seen only once \
                 COMMAND had ended (it {}): another copy may have run beside it",
                args.instance.name,
                describe_status(status),
            ),
        ),
        (Ok(status), None, None) => ExitCode::from(exit_code_of(status)),
        // As a child subreaper we got all the keeper left behind, and `stop_own_children`
        // stopped and reaped it: none of it runs on. Still a failure (COMMAND did not end by
        // itself, and its status is unknown).
        (Err(e), None, _) if subreaper.is_ok() => fail(
            EXIT_INTERNAL,
            format_args!(
                "lost track of COMMAND: {e} (the keeper: {}); COMMAND and everything it started \
                 were stopped",
                match &keeper_status {
                    Ok(status) => status.to_string(),
                    Err(e) => e.to_string(),
                }
            ),
        ),
        (Err(e), None, _) => fail(
            EXIT_INTERNAL,
            format_args!("lost track of COMMAND: {e}; it may still be running"),
        ),
    }
}

fn options(args: &RunArgs) -> unique_instance::InstanceOptions {
    // Never READY=1 on acquiring: COMMAND has not even started then. With --notify it is sent
    // once COMMAND has been started (see `supervise`); without, COMMAND may speak for itself.
    let mut options = args
        .instance
        .options()
        .notify_ready(false)
        .wait(match args.wait {
            None => Wait::No,
            Some(WaitFor::Forever) => Wait::Forever,
            Some(WaitFor::Up(limit)) => Wait::Timeout(limit),
        });
    if args.instance.backend != BackendArg::Dbus {
        // A removed or replaced lock file is noticed at once (inotify), with no timer.
        options = options.watch_lock_file(true);
        if !args.recheck.is_zero() {
            options = options.recheck_lock_file(args.recheck);
        }
    }
    options
}

/// What the early look at the lock file found.
enum Early {
    /// Held: this copy is refused (the exit status).
    Refused(ExitCode),
    /// Free when looked at: this copy will most likely win, and starts its keeper while the bus
    /// answers its request (see `supervise`).
    Free,
    /// Not looked at (`--wait`, `--backend dbus`), or the look failed.
    Unknown,
}

/// A copy that will not wait, finding the lock file held, is refused before any runtime,
/// signal handler or bus connection is set up: in a storm of copies started at once (cron, CI)
/// nearly all of them are refused, and this is most of what each one costs. Only a refusal is
/// decided here: anything else (free, or an error) goes the normal way, where
/// `acquire_async` decides for real and reports errors.
fn look_early(args: &RunArgs) -> Early {
    if args.wait.is_some() || args.instance.backend == BackendArg::Dbus {
        return Early::Unknown;
    }
    match options(args).lock_file_holder() {
        Ok(None) => Early::Free,
        // Its holder only waits in a bus's queue for the name, behind a program that owns it
        // without the lock file: the acquisition asks that bus who runs, and names the owner
        // (see the library's refusal), where a bus is planned.
        Ok(Some(holder))
            if holder.queued_on_bus.is_some() && args.instance.backend != BackendArg::Lockfile =>
        {
            Early::Unknown
        }
        Ok(Some(holder)) => Early::Refused(refused(
            args,
            &Error::AlreadyRunning {
                name: args.instance.name.clone(),
                holder: Box::new(holder),
            },
        )),
        Err(_) => Early::Unknown,
    }
}

/// `run` needs `/proc`: it starts COMMAND's keeper by re-executing itself through
/// `/proc/self/exe` (no path that could name another binary by then), and it and the keeper find
/// the processes COMMAND leaves behind there. Without it (a container or chroot that did not
/// mount it) nothing could keep COMMAND's processes from outliving the instance: it fails
/// closed, before anything is acquired, saying what is missing and what to do. The same when
/// `/proc` is another PID namespace's (`unshare --pid --fork` without `--mount-proc`): the
/// children it lists would be numbers of that namespace, and signalling them here would hit
/// other processes (the wrapper's own threads among them). One `lstat` and one `readlink`.
fn proc_missing() -> Option<ExitCode> {
    const MOUNT_IT: &str = "mount it (`mount -t proc proc /proc`, or give the container its /proc)";
    let (why, remedy) = match std::fs::symlink_metadata("/proc/self/exe") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ("/proc is not mounted".to_owned(), MOUNT_IT)
        }
        Err(e) => (format!("cannot use /proc ({e})"), MOUNT_IT),
        Ok(_) => {
            let me = std::process::id();
            match std::fs::read_link("/proc/self") {
                Ok(its) if its.to_str().and_then(|p| p.parse::<u32>().ok()) == Some(me) => {
                    return None;
                }
                Ok(its) => (
                    format!(
                        "/proc is another PID namespace's (it calls this process {}, which is \
                         {me} here)",
                        its.display()
                    ),
                    "give this PID namespace a /proc of its own (`unshare --pid --fork \
                     --mount-proc`, or `mount -t proc proc /proc` in a mount namespace of its own)",
                ),
                Err(e) => (format!("cannot read /proc/self ({e})"), MOUNT_IT),
            }
        }
    };
    Some(fail(
        EXIT_INTERNAL,
        format_args!(
            "{why}: `run` needs it to start COMMAND's keeper (through /proc/self/exe) and to find \
             the processes COMMAND leaves behind; {remedy} and try again. Nothing was started."
        ),
    ))
}

/// COMMAND's arguments (with the environment) fit the kernel's limit for the wrapper, but not
/// for its keeper, executed with them and a few arguments of its own (`E2BIG`): COMMAND could
/// not be executed (126), and what to do about it.
fn arguments_too_long(args: &RunArgs) -> ExitCode {
    fail(
        EXIT_CANNOT_EXECUTE,
        format_args!(
            "cannot run {}: its arguments and the environment are too long for the system \
             (E2BIG; the limit is ARG_MAX, see `getconf ARG_MAX`): `run` starts COMMAND \
             through a keeper process, executed with COMMAND's arguments, NAME and its options, \
             and about 100 bytes of its own, and that did not fit. Pass fewer or shorter arguments (through a file, \
             stdin or `xargs`), shrink the environment, or raise the limit (a quarter of the \
             stack size limit, `ulimit -s`). COMMAND was not started.",
            args.command[0].to_string_lossy()
        ),
    )
}

/// The answer when the instance could not be acquired.
fn refused(args: &RunArgs, e: &Error) -> ExitCode {
    match e {
        Error::AlreadyRunning { .. } | Error::TimedOut { .. } => {
            // A refused copy holds nothing and has started nothing: its message is written at
            // once (a stderr nobody reads can hold up nothing), and it exits here, without
            // tearing down its runtime and signal handlers one by one (a start-up storm is made
            // of refused copies).
            if args.quiet {
                crate::say::drain();
            } else {
                crate::say::now(format_args!("unique-instance: {e}"));
            }
            std::process::exit(i32::from(args.conflict_exit_code))
        }
        _ => fail(e.exit_code(), format_args!("{e}")),
    }
}

/// The lock file, for as long as the keeper holds a duplicate of it: each file re-created after
/// someone removed it is handed to the keeper too, or a wrapper killed afterwards would leave
/// the new file unlocked while the keeper still stops COMMAND's tree.
struct Relock<'a> {
    /// The guard's descriptor of the lock file (`None` with `--backend dbus`).
    lock: Option<BorrowedFd<'a>>,
    recreations: LockFileRecreations,
}

impl Relock<'_> {
    /// Resolves when the lock file was re-created (never without one, or once it is released).
    async fn recreated(&mut self) {
        if self.lock.is_none() || self.recreations.next().await.is_none() {
            std::future::pending().await
        }
    }

    /// Hands the re-created file to the keeper.
    fn hand_over(&self, keeper: &mut keeper::Handle) {
        let Some(lock) = self.lock else { return };
        if let Err(e) = keeper.hand_lock(lock) {
            say!(
                "unique-instance: warning: cannot hand the re-created lock file to COMMAND's \
                 keeper ({e}); if this wrapper is killed, a new copy may start while COMMAND is \
                 being stopped"
            );
        }
    }
}

/// Runs until COMMAND ends: passes signals on, hands a re-created lock file to the keeper, and
/// stops COMMAND's whole tree if the instance is lost. Returns COMMAND's status, the loss that
/// stopped it, if one did, and then when the tree is (or was) sent SIGKILL (`None`: never, a
/// `--kill-after` too long to count).
async fn watch_child(
    keeper: &mut keeper::Handle,
    command: Pid,
    signals: &mut SignalsInfo<WithOrigin>,
    mut losses: LossWatcher,
    lock: &mut Relock<'_>,
    args: &RunArgs,
) -> (
    io::Result<ExitStatus>,
    Option<Loss>,
    Option<tokio::time::Instant>,
) {
    let child_pid = Some(command);
    let mut stopped_for: Option<Loss> = None;
    let mut kill_at = None;
    let kill_timer = tokio::time::sleep(Duration::MAX);
    tokio::pin!(kill_timer);
    let mut killed = false;
    loop {
        tokio::select! {
            event = keeper.next_event() => match event {
                keeper::Event::Exited(status) => return (Ok(status), stopped_for, kill_at),
                keeper::Event::Reaped => {}
                keeper::Event::Gone => {
                    let e = io::Error::other("its keeper process ended before it did");
                    return (Err(e), stopped_for, kill_at);
                }
            },
            Some(origin) = signals.next() => {
                #[cfg(feature = "test-hooks")]
                panic_for_test();
                if !manager_signals_command_too(&origin, child_pid).await {
                    forward(&origin, child_pid, keeper);
                } else if let Some(signal) = Signal::from_named_raw(origin.signal) {
                    keeper.delivered(signal);
                    tracing::debug!(signal = origin.signal, "the keeper knows COMMAND's tree has it");
                }
            }
            () = lock.recreated() => lock.hand_over(keeper),
            Some(loss) = losses.next(), if stopped_for.is_none() => {
                if loss.still_exclusive {
                    if !args.quiet {
                        say!(
                            "unique-instance: warning: {}: {}; the lock file still keeps other \
                             copies out, so COMMAND goes on",
                            args.instance.name, loss.reason
                        );
                    }
                    continue;
                }
                // Nothing excludes another copy any more: COMMAND and everything it started
                // get SIGTERM at once (not COMMAND alone, which would leave its children their
                // first SIGTERM, and a grace of their own, only once it is gone), and SIGKILL
                // `--kill-after` from now. Done before it is said: see say.rs.
                keeper.signal_tree(Signal::TERM);
                kill_at = tokio::time::Instant::now().checked_add(args.kill_after);
                if let Some(deadline) = kill_at {
                    kill_timer.as_mut().reset(deadline);
                }
                say!(
                    "unique-instance: {}: the instance was lost ({}); stopping COMMAND \
                     (SIGTERM now, SIGKILL in {:?})",
                    args.instance.name, loss.reason, args.kill_after
                );
                stopped_for = Some(loss);
            }
            () = &mut kill_timer, if stopped_for.is_some() && !killed => {
                keeper.signal_tree(Signal::KILL);
                killed = true;
            }
        }
    }
}

/// Passes a signal on to COMMAND, unless the kernel already delivered it to COMMAND too: a
/// terminal's Ctrl-C, Ctrl-\ or hang-up goes to the whole foreground process group, and
/// sending it again would make COMMAND see it twice. Not a hang-up when we lead the session
/// (`ssh -t host unique-instance run ...`, `script -c`, `xterm -e`): the kernel sends that one
/// to the session's leader alone (the foreground group would get it only once we exit), so it
/// is passed on.
fn forward(origin: &Origin, child: Option<Pid>, keeper: &mut keeper::Handle) {
    let Some(child) = child else { return };
    // nix's: rustix's take 0 (a group whose leader is outside our PID namespace) for impossible.
    let command = nix::unistd::Pid::from_raw(child.as_raw_nonzero().get());
    let same_group = nix::unistd::getpgid(Some(command)).ok() == Some(nix::unistd::getpgrp());
    let to_leader_alone = origin.signal == SIGHUP && leads_session();
    if origin.cause == Cause::Kernel && same_group && !to_leader_alone {
        tracing::debug!(
            signal = origin.signal,
            "sent to the process group: COMMAND has it"
        );
        return;
    }
    if let Some(signal) = Signal::from_named_raw(origin.signal) {
        tracing::debug!(signal = origin.signal, "passing the signal on to COMMAND");
        send(keeper, Some(child), signal);
    }
}

/// Whether this process leads its session (its session ID is its PID).
fn leads_session() -> bool {
    // nix's: rustix's `getsid` asserts (in a debug build) that the session is not 0, which it
    // is when the session's leader is outside our PID namespace (a container's CI job); the
    // assertion once killed the signal thread there, and with it the wrapper.
    let me = nix::unistd::getpid();
    nix::unistd::getsid(None).is_ok_and(|session| session == me)
}

/// The bit of `signal` in a set of signals, as `/proc/PID/status` shows them (bit N-1 for
/// signal N).
pub(crate) fn signal_bit(signal: i32) -> u64 {
    1u64 << (signal - 1)
}

/// The signals of [`FORWARDED`] our caller left ignored, as a set of [`signal_bit`]s: `nohup`
/// ignores SIGHUP, a shell script's background job SIGINT and SIGQUIT. Those stay ignored, as
/// they would for COMMAND run without us: we do not catch them (so never pass them on), and
/// COMMAND keeps them ignored. Read from `/proc/self/status` (`SigIgn`), which asks nothing of
/// the dispositions (a query through `sigaction` would have to set one); if it cannot be read,
/// none is taken to be ignored, as before.
fn inherited_ignored() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let ignored = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let forwarded = FORWARDED
        .into_iter()
        .map(signal_bit)
        .fold(0, |all, bit| all | bit);
    ignored & forwarded
}

/// Whether `origin` is systemd stopping our unit with `KillMode=control-group`: it then sends
/// the same signal to every process of the unit's cgroup, `child` (COMMAND, or what it left)
/// included, and passing it on would make it see the signal twice. Only then, verified: the
/// sender is our service manager (PID 1, or the user manager named by `MANAGERPID`), we run in a
/// unit (`INVOCATION_ID`), `child` is in our cgroup, and the manager itself says the unit is
/// deactivating with that kill mode. With `KillMode=mixed` or `process`, with `systemctl kill`,
/// or when anything cannot be verified, the signal is passed on: twice is better than never.
async fn manager_signals_command_too(origin: &Origin, child: Option<Pid>) -> bool {
    let (Cause::Sent(_), Some(sender), Some(child)) = (origin.cause, origin.process, child) else {
        return false;
    };
    if std::env::var_os("INVOCATION_ID").is_none() {
        return false;
    }
    let user_manager = std::env::var("MANAGERPID")
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    let system = match sender.pid {
        1 => true,
        pid if user_manager == Some(pid) => false,
        _ => return false,
    };
    let cgroup = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
    let ours = cgroup("self");
    if ours.is_none() || ours != cgroup(&child.as_raw_nonzero().to_string()) {
        return false;
    }
    let asked = tokio::time::timeout(Duration::from_secs(2), unit_kills_whole_cgroup(system)).await;
    let verdict = matches!(asked, Ok(Ok(true)));
    tracing::debug!(
        signal = origin.signal,
        sender = sender.pid,
        ?asked,
        "signal from the service manager; COMMAND gets it from the manager too: {verdict}"
    );
    verdict
}

/// Asks systemd (on the system bus, or the session bus for a user manager) whether the unit we
/// run in is being stopped with `KillMode=control-group`.
async fn unit_kills_whole_cgroup(system: bool) -> zbus::Result<bool> {
    const SYSTEMD: &str = "org.freedesktop.systemd1";
    let conn = if system {
        zbus::Connection::system().await?
    } else {
        zbus::Connection::session().await?
    };
    let unit: zbus::OwnedObjectPath = conn
        .call_method(
            Some(SYSTEMD),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "GetUnitByPID",
            &(std::process::id(),),
        )
        .await?
        .body()
        .deserialize()?;
    let property = async |interface: &str, name: &str| -> zbus::Result<String> {
        let value: zbus::OwnedVariant = conn
            .call_method(
                Some(SYSTEMD),
                &unit,
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(interface, name),
            )
            .await?
            .body()
            .deserialize()?;
        String::try_from(value)
    };
    if property("org.freedesktop.systemd1.Unit", "ActiveState").await? != "deactivating" {
        return Ok(false);
    }
    // A service, or a scope (`systemd-run --scope`).
    let kill_mode = match property("org.freedesktop.systemd1.Service", "KillMode").await {
        Ok(mode) => mode,
        Err(_) => property("org.freedesktop.systemd1.Scope", "KillMode").await?,
    };
    Ok(kill_mode == "control-group")
}

/// Starts the keeper before the instance is held (see `supervise`). On failure it is tried
/// again, the usual way, once the instance is held.
fn prestart(args: &RunArgs, ignored: u64) -> Result<keeper::Pending, keeper::StartError> {
    let started = keeper::spawn(
        &args.command,
        &args.instance,
        args.notify,
        args.kill_after,
        ignored,
    );
    match &started {
        Ok(keeper) => tracing::debug!(pid = ?keeper.pid(), "keeper started before acquiring"),
        Err(e) => tracing::debug!(error = %e, "cannot start the keeper before acquiring"),
    }
    started
}

/// Ends the keeper started before acquiring, if there is one: the wait or the acquisition ended
/// without the instance (or COMMAND is not to be started), and nothing of it may be left.
async fn abandon(prestarted: Option<keeper::Pending>) {
    let Some(keeper) = prestarted else { return };
    let pid = keeper.pid();
    keeper.abandon().await;
    tracing::debug!(?pid, "the keeper started before acquiring is gone");
    // Here the wrapper has no child left: a test looks at that moment.
    #[cfg(feature = "test-hooks")]
    stop_for_test("UNIQUE_INSTANCE_TEST_STOP_AFTER_ABANDON");
}

/// Has the keeper signal `child`, its child (it tells us when that child has exited).
fn send(keeper: &mut keeper::Handle, child: Option<Pid>, signal: Signal) {
    if let Some(pid) = child {
        keeper.signal(pid, signal);
    }
}

/// Has the keeper send `child` SIGTERM, then SIGCONT, as the keeper does when it stops the tree
/// itself: a stopped process (SIGSTOP, a Ctrl-Z) acts on SIGTERM only once continued, and would
/// otherwise hold the instance until SIGKILL after `--kill-after`. For the wrapper's own
/// SIGTERMs only: a signal passed on is passed on as it came.
fn terminate(keeper: &mut keeper::Handle, child: Option<Pid>) {
    send(keeper, child, Signal::TERM);
    send(keeper, child, Signal::CONT);
}

/// How long what COMMAND left is given between SIGTERM and SIGKILL (see [`stop_leftovers`]).
enum Grace {
    /// COMMAND ended by itself (or of a signal passed on): what it left gets SIGTERM now, and
    /// SIGKILL this long after.
    Fresh(Duration),
    /// COMMAND was stopped for a loss: the whole tree got SIGTERM then, and gets SIGKILL at
    /// this deadline (`None`: never), one `--kill-after` after the loss.
    SinceLoss(Option<tokio::time::Instant>),
}

/// COMMAND has exited. Anything it started and left running was re-parented to the keeper (a
/// child subreaper) and is still part of the guarded work: it gets SIGTERM (and SIGCONT, see
/// [`terminate`]), then SIGKILL once the `grace` ends, and the instance is released only once
/// all of it is gone (the keeper says so, and exits). Otherwise a background job of COMMAND
/// would go on unguarded while a new copy starts. After a loss, it got SIGTERM already, with
/// COMMAND: no second one (many programs take that as "stop now, skip the clean-up"), and
/// SIGKILL at the loss's deadline.
async fn stop_leftovers(
    grace: Grace,
    signals: &mut SignalsInfo<WithOrigin>,
    keeper: &mut keeper::Handle,
    lock: &mut Relock<'_>,
) {
    let mut told = false;
    let mut signal = Signal::TERM;
    let mut signalled = std::collections::HashSet::new();
    let (ends, term_sent) = match grace {
        Grace::Fresh(kill_after) => (tokio::time::Instant::now().checked_add(kill_after), false),
        Grace::SinceLoss(kill_at) => (kill_at, true),
    };
    let grace = async move {
        match ends {
            Some(ends) => tokio::time::sleep_until(ends).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(grace);
    loop {
        // Each process that ends may have handed its own children over to the keeper, so
        // every event is followed by a look at who is left.
        let leftovers = keeper.children();
        let tell = !told && !leftovers.is_empty();
        let listed = tell.then(|| {
            leftovers
                .iter()
                .map(|p| p.as_raw_nonzero().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        });
        let count = leftovers.len();
        for pid in leftovers {
            if signal == Signal::TERM && term_sent {
                continue;
            }
            if signalled.insert((pid, signal.as_raw())) {
                if signal == Signal::TERM {
                    terminate(keeper, Some(pid));
                } else {
                    send(keeper, Some(pid), signal);
                }
            }
        }
        // Said once they are signalled: see say.rs.
        if let Some(listed) = listed {
            told = true;
            say!(
                "unique-instance: COMMAND left {count} process(es) running ({listed}); stopping \
                 them before releasing the instance"
            );
        }
        tokio::select! {
            // Gone: no child of the keeper left, and so no descendant either.
            event = keeper.next_event() => if matches!(event, keeper::Event::Gone) { return },
            () = &mut grace, if signal == Signal::TERM => signal = Signal::KILL,
            // The keeper holds the instance until what COMMAND left is gone.
            () = lock.recreated() => lock.hand_over(keeper),
            // Still the guarded work: what would have been passed on to COMMAND is passed on to
            // what it left (a `systemctl stop` or a Ctrl-C is not ignored while they end).
            Some(origin) = signals.next() => {
                for pid in keeper.children() {
                    if !manager_signals_command_too(&origin, Some(pid)).await {
                        forward(&origin, Some(pid), keeper);
                    }
                }
            }
        }
    }
}

/// The keeper ended before what it kept did (something killed it): COMMAND died with it
/// (SIGKILL, through `PR_SET_PDEATHSIG`) unless it changed its credentials, and what the keeper
/// kept was re-parented to us. All of it gets SIGKILL at once (this is already a failure) and is reaped
/// before the instance is released. Returns when we have no child left.
///
/// On a thread of its own, so the runtime goes on meanwhile; where no thread can be started (a
/// task limit reached: `RLIMIT_NPROC`, a cgroup's `pids.max`, which may be why the keeper could
/// not start), right here, blocking: the children must be gone before the instance is, whatever
/// that costs (tokio's `spawn_blocking` would panic instead).
async fn stop_own_children() {
    fn kill_and_reap() {
        loop {
            for pid in children() {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
            match rustix::process::wait(rustix::process::WaitOptions::empty()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                // ECHILD: no child left, and so no descendant either.
                Err(_) => return,
            }
        }
    }
    let (done, stopped) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("stop-children".into())
        .spawn(move || {
            kill_and_reap();
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = stopped.await;
        }
        Err(_) => kill_and_reap(),
    }
}

/// Our children: after COMMAND has been reaped, exactly the processes it left behind.
fn children() -> Vec<Pid> {
    children_in(Path::new("/proc"), rustix::process::getpid())
}

/// The children of `me` (this process, or the keeper), from the `/proc` mounted at `proc`: each
/// thread's `task/TID/children` list, or, on kernels built without `CONFIG_PROC_CHILDREN` (no
/// such file), every process whose parent is `me`, from `/proc/PID/stat`. Without the fallback,
/// leftovers would silently not be found there, and would outlive the instance. A process that
/// is gone (reaped) has none.
pub(crate) fn children_in(proc: &Path, me: Pid) -> Vec<Pid> {
    let tasks = proc.join(me.as_raw_nonzero().to_string()).join("task");
    if !tasks.is_dir() && proc.join("self").is_dir() {
        return Vec::new();
    }
    children_from_lists(&tasks).unwrap_or_else(|| {
        tracing::debug!("no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN); scanning /proc");
        children_by_scan(proc, me)
    })
}

/// The children listed in each thread's `TID/children` under `tasks`; `None` when there is
/// no such list.
fn children_from_lists(tasks: &Path) -> Option<Vec<Pid>> {
    let mut pids = Vec::new();
    let mut lists = 0;
    for task in std::fs::read_dir(tasks).ok()?.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        lists += 1;
        pids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter_map(Pid::from_raw),
        );
    }
    (lists > 0).then_some(pids)
}

/// Every process under `proc` whose parent, by its `stat`, is `me`.
fn children_by_scan(proc: &Path, me: Pid) -> Vec<Pid> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        say!(
            "unique-instance: warning: cannot list {}: processes COMMAND left behind cannot be \
             found",
            proc.display()
        );
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        // Gone since the listing: not a child any more.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if parent_in_stat(&stat) == Some(me.as_raw_nonzero().get()) {
            pids.push(pid);
        }
    }
    pids
}

/// The parent PID in a `/proc/PID/stat` line: `PID (COMM) STATE PPID ...`, where COMM may
/// hold spaces and parentheses, so the fields are counted from the last `)`.
pub(crate) fn parent_in_stat(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Waits for the stream to take in what the signal handlers wrote, then returns a signal
/// that came and was not handled yet, if any, without waiting for one.
async fn pending_signal(signals: &mut SignalsInfo<WithOrigin>) -> Option<Origin> {
    // A yield lets the runtime poll its I/O driver, which marks the signal pipe readable.
    tokio::task::yield_now().await;
    signals.next().now_or_never().flatten()
}

/// Test hook (the `test-hooks` feature, for the test suite only): when the variable `var` is
/// set, stops this process (SIGSTOP) right there, so that a test can act at a moment it could
/// not otherwise reach.
#[cfg(feature = "test-hooks")]
fn stop_for_test(var: &str) {
    if std::env::var_os(var).is_some() {
        // What was said is written first: the writer thread stops with us (see say.rs), and a
        // test reads those lines before it looks at the stopped wrapper.
        crate::say::drain();
        let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::STOP);
    }
}

/// Test hook (the `test-hooks` feature, for the test suite only): when the variable
/// `UNIQUE_INSTANCE_TEST_PANIC_AT_SIGNAL` is set, a signal that comes while COMMAND runs makes
/// the wrapper panic, as a bug would, at a moment the test chooses (the keeper holds the
/// instance).
#[cfg(feature = "test-hooks")]
fn panic_for_test() {
    if std::env::var_os("UNIQUE_INSTANCE_TEST_PANIC_AT_SIGNAL").is_some() {
        panic!("UNIQUE_INSTANCE_TEST_PANIC_AT_SIGNAL: a panic on purpose, for a test");
    }
}

async fn release(guard: InstanceGuard) {
    if let Err(e) = guard.release_async().await {
        say!("unique-instance: warning: releasing the instance: {e}");
    }
}

/// Releases the instance once COMMAND's tree is gone, and returns a loss that left no backend
/// excluding other copies and that nothing acted on (`check`: COMMAND was not stopped for one):
/// one reported after COMMAND ended, or one only the release found (this copy was stopped, or
/// its watch had not seen it yet). COMMAND, or what it left, may then have run beside another
/// copy, so the run is not a clean one (exit 69), whatever COMMAND's own status.
async fn release_reporting_unacted_loss(
    guard: InstanceGuard,
    check: bool,
) -> Option<unique_instance::LossReason> {
    let mut losses = guard.loss_watcher();
    let found = match guard.release_async().await {
        Ok(()) => None,
        Err(Error::LostBeforeRelease { reason, .. }) => Some(reason),
        Err(e) => {
            say!("unique-instance: warning: releasing the instance: {e}");
            None
        }
    };
    if !check {
        return None;
    }
    // Every loss reported until the release ended, without waiting: a zero timeout still
    // polls the future once, and the log is already written.
    let mut reported = None;
    while let Ok(Some(loss)) = tokio::time::timeout(Duration::ZERO, losses.next()).await {
        if !loss.still_exclusive {
            reported.get_or_insert(loss.reason);
        }
    }
    reported.or(found)
}

/// "exited with status N" or "was killed by signal N", for a message.
fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended: {status}"),
    }
}

fn exit_code_of(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        // Truncation is what a shell does with exit statuses too.
        (Some(code), _) => code as u8,
        (None, Some(signal)) => signal_exit_code(signal),
        (None, None) => EXIT_INTERNAL,
    }
}

fn signal_exit_code(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(EXIT_INTERNAL)
}

/// The variable that tells COMMAND which of its descriptors holds the instance's lock.
pub(crate) const LOCK_FD_ENV: &str = "UNIQUE_INSTANCE_LOCK_FD";

/// The lowest number COMMAND's descriptor of the lock may get: above those programs use by
/// convention (stdio; systemd's `LISTEN_FDS` from 3; a script's `exec 3>file`), so that COMMAND
/// does not close it by accident.
const LOCK_FD_MIN: i32 = 100;

/// Where COMMAND goes in the session: the keeper has a process group of its own (see keeper/),
/// COMMAND the wrapper's.
pub(crate) struct Placement {
    /// The wrapper's process group (the terminal's foreground group when it runs in one), which
    /// COMMAND joins, so that a terminal's Ctrl-C, Ctrl-Z and hang-up reach it as they reach the
    /// wrapper; `None` when the keeper is in it already (it has no number in our PID namespace),
    /// and COMMAND is born in it.
    pub(crate) group: Option<Pid>,
    /// The terminal stop signals (SIGTTOU, SIGTTIN) the keeper ignores and COMMAND must not: they
    /// get their default action back (`None`: one that was ignored already, left so).
    pub(crate) tty_stops: [Option<i32>; 2],
    /// The signals of [`FORWARDED`] the wrapper's caller left ignored (a set of [`signal_bit`]s):
    /// COMMAND keeps them ignored, as the keeper does; every other one gets its default action.
    pub(crate) ignored: u64,
}

/// Starts COMMAND (in the keeper, see keeper/) so that it dies with the keeper:
/// `PR_SET_PDEATHSIG` = SIGKILL, set in the child between fork and exec. Its stdin, stdout and
/// stderr are the keeper's (the wrapper's), untouched; its environment is the keeper's (the
/// wrapper's, without `NOTIFY_SOCKET` when the wrapper speaks to systemd for COMMAND), plus
/// [`LOCK_FD_ENV`]. The signals the wrapper passes on, which the keeper ignores, get their
/// default action back, as they had when the wrapper started COMMAND itself; those the
/// wrapper's caller ignored (`placement.ignored`) stay ignored.
///
/// The kernel clears `PR_SET_PDEATHSIG` when COMMAND's credentials change (`setpriv`,
/// `runuser`, a daemon calling `setuid`, a setuid or file-capability executable), and COMMAND's
/// own children never had it. So COMMAND inherits one descriptor of the lock file (`lock`, the
/// guard's): the lock belongs to the open file description, so it stays held until the wrapper,
/// the keeper, COMMAND and everything that inherited it are gone. (The keeper, a child
/// subreaper, holds it until the last of COMMAND's descendants is gone, even those that closed
/// it.) That one descriptor is made inheritable in the child only; every other descriptor of
/// the keeper stays close-on-exec.
#[allow(unsafe_code)]
///
/// COMMAND joins `placement.group` (the wrapper's) before exec. Joining fails once that group
/// has no member left (the wrapper died meanwhile): COMMAND then does not start, as when the
/// keeper's parent died. A signal sent to that group before COMMAND joined it would be lost,
/// but until its defaults are back (after joining) COMMAND ignores those signals anyway, as it
/// did when it was born in the group.
pub(crate) fn spawn_guarded(
    command: &[OsString],
    lock: Option<BorrowedFd<'_>>,
    placement: Placement,
) -> io::Result<std::process::Child> {
    let (program, program_args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no COMMAND given"))?;
    let parent = rustix::process::getpid();
    let mut cmd = std::process::Command::new(program);
    cmd.args(program_args);
    // Ours may come from an outer `run`: COMMAND must never be told of a descriptor it does
    // not have.
    cmd.env_remove(LOCK_FD_ENV);
    // Close-on-exec in this process (it is closed when `cmd` is dropped, below); the child
    // clears the flag on its own copy.
    let lock_dup = lock.map(duplicate_high).transpose()?;
    let lock_raw = lock_dup.as_ref().map(AsRawFd::as_raw_fd);
    if let Some(fd) = lock_raw {
        cmd.env(LOCK_FD_ENV, fd.to_string());
    }
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed: it makes raw system calls (prctl, getppid, setpgid, fcntl,
    // sigaction), allocates nothing and takes no locks. `lock_raw` names `lock_dup`, which this
    // process keeps open until `spawn` has returned, so the child's copy of that number is the
    // lock's descriptor.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // We may have died between fork and prctl: then the signal will never come, and
            // COMMAND must not start at all.
            if rustix::process::getppid() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc_esrch()));
            }
            if let Some(group) = placement.group {
                rustix::process::setpgid(None, Some(group))?;
            }
            if let Some(fd) = lock_raw {
                rustix::io::fcntl_setfd(BorrowedFd::borrow_raw(fd), rustix::io::FdFlags::empty())?;
            }
            let tty_stops = placement.tty_stops.into_iter().flatten();
            let forwarded = FORWARDED
                .into_iter()
                .filter(|&signal| placement.ignored & signal_bit(signal) == 0);
            for signal in forwarded.chain(tty_stops) {
                let signal = nix::sys::signal::Signal::try_from(signal)?;
                nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl)?;
            }
            crate::restore_file_size_signal()?;
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(lock_dup);
    child
}

/// A close-on-exec duplicate of `fd` numbered [`LOCK_FD_MIN`] or above, or, under an
/// open-file limit lower than that, the lowest free number above stdio.
pub(crate) fn duplicate_high(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    match rustix::io::fcntl_dupfd_cloexec(fd, LOCK_FD_MIN) {
        Err(rustix::io::Errno::INVAL) => Ok(rustix::io::fcntl_dupfd_cloexec(fd, 3)?),
        dup => Ok(dup?),
    }
}

/// `ESRCH`, without a libc dependency.
fn libc_esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_after_the_last_parenthesis() {
        assert_eq!(parent_in_stat("42 (sleep) S 7 42 42 0 -1"), Some(7));
        // A command name may hold spaces and parentheses.
        assert_eq!(parent_in_stat("42 (a) b (c)) S 9 1 1"), Some(9));
        assert_eq!(parent_in_stat("42 (x)"), None);
        assert_eq!(parent_in_stat("garbage"), None);
        assert_eq!(parent_in_stat(""), None);
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn children_are_found_without_children_lists_too() {
        let proc = tempfile::tempdir().expect("tempdir");
        let me = Pid::from_raw(100).expect("pid");
        // A kernel without CONFIG_PROC_CHILDREN: tasks, but no `children` in them.
        std::fs::create_dir_all(proc.path().join("100/task/100")).expect("mkdir");
        write(
            &proc.path().join("100/stat"),
            "100 (unique-instance) S 1 100 100",
        );
        write(&proc.path().join("201/stat"), "201 (sleep) S 100 201 201");
        write(
            &proc.path().join("202/stat"),
            "202 (odd ) name) S 100 202 202",
        );
        write(&proc.path().join("300/stat"), "300 (other) S 1 300 300");
        write(
            &proc.path().join("self/stat"),
            "100 (unique-instance) S 1 100 100",
        );
        std::fs::create_dir_all(proc.path().join("400")).expect("a process gone mid-scan");
        let mut found: Vec<i32> = children_in(proc.path(), me)
            .into_iter()
            .map(|p| p.as_raw_nonzero().get())
            .collect();
        found.sort_unstable();
        assert_eq!(found, [201, 202]);

        // With the lists, they are the answer.
        write(&proc.path().join("100/task/100/children"), "555 556 ");
        let found: Vec<i32> = children_in(proc.path(), me)
            .into_iter()
            .map(|p| p.as_raw_nonzero().get())
            .collect();
        assert_eq!(found, [555, 556]);
    }

    #[test]
    fn a_real_child_is_found_by_the_scan() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32).expect("pid");
        // The scan alone, on the real /proc, as a kernel without children lists makes it.
        let me = rustix::process::getpid();
        let found = children_by_scan(Path::new("/proc"), me);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&pid), "{pid:?} not among {found:?}");
    }
}

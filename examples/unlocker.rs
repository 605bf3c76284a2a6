//! A COMMAND for `unique-instance run` that lets go of the lock it inherits
//! (`UNIQUE_INSTANCE_LOCK_FD`, an open-file-description lock it shares with `run`), for the CLI
//! tests (tests/cli_faults.rs).
//!
//! ```text
//! unlocker [--exit]
//! ```
//!
//! Unlocks (`F_OFD_SETLK` with `F_UNLCK`), prints `unlocked`, then waits until stdin closes;
//! with `--exit` it exits at once instead. Exits 0, or 70 when there is no descriptor to unlock.

use std::io::{BufRead, Write};
use std::os::fd::BorrowedFd;

fn main() {
    let Some(fd) = std::env::var("UNIQUE_INSTANCE_LOCK_FD")
        .ok()
        .and_then(|fd| fd.parse::<i32>().ok())
    else {
        eprintln!("unlocker: no UNIQUE_INSTANCE_LOCK_FD");
        std::process::exit(70);
    };
    // SAFETY: the descriptor `run` handed down, open for the life of this process.
    #[allow(unsafe_code)]
    let file = unsafe { BorrowedFd::borrow_raw(fd) };
    let unlock = nix::libc::flock {
        l_type: nix::libc::F_UNLCK as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    if let Err(e) = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_SETLK(&unlock)) {
        eprintln!("unlocker: {e}");
        std::process::exit(70);
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "unlocked");
        let _ = out.flush();
    }
    if std::env::args().nth(1).as_deref() != Some("--exit") {
        let _ = std::io::stdin().lock().lines().count();
    }
}

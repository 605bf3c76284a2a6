//! Read-locks every file made in a directory the moment inotify says it is there, as any local
//! user who may read those files can: the squatter of the lock-file tests
//! (tests/lockfile_safety.rs).
//!
//! ```text
//! squatter DIR
//! ```
//!
//! Prints `watching` once its watch is in place, keeps every lock it took until stdin closes,
//! then exits 0. A file it may not open (its mode keeps others out) is passed over; one held by
//! someone else is tried again until it is taken or has no name any more.

use std::io::{BufRead, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;

use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
use rustix::fs::{Mode, OFlags};

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: squatter DIR");
        std::process::exit(64);
    };
    let events = inotify::init(CreateFlags::CLOEXEC).expect("inotify");
    inotify::add_watch(&events, &dir, WatchFlags::CREATE | WatchFlags::MOVED_TO)
        .expect("watch the directory");
    let dir = rustix::fs::open(&dir, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .expect("open the directory");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "watching");
        let _ = out.flush();
    }
    std::thread::spawn(|| {
        let _ = std::io::stdin().lock().lines().count();
        std::process::exit(0);
    });
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut buf = [MaybeUninit::uninit(); 4096];
    let mut reader = inotify::Reader::new(&events, &mut buf);
    loop {
        let Ok(event) = reader.next() else { continue };
        let Some(name) = event.file_name() else {
            continue;
        };
        let Ok(file) = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        ) else {
            continue;
        };
        // Tried again and again while someone holds it (a copy: its release lets go of it for
        // a moment), until it is taken or the file no longer has a name.
        loop {
            if read_lock(&file) {
                held.push(file);
                break;
            }
            if rustix::fs::fstat(&file).map_or(true, |st| st.st_nlink == 0) {
                break;
            }
            std::thread::yield_now();
        }
    }
}

/// Takes a read lock on the whole of `file`, without waiting: `true` when taken.
fn read_lock(file: &OwnedFd) -> bool {
    let lock = nix::libc::flock {
        l_type: nix::libc::F_RDLCK as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)).is_ok()
}

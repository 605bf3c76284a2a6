//! systemd's readiness protocol, as a `Type=notify` unit sees it: a real datagram socket bound by
//! the test stands in for systemd's, and every datagram is read with its sender's credentials.

mod common;

use std::mem::MaybeUninit;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use common::{
    BusConfig, DbusDaemon, Proc, TIMEOUT, clean_command, cli_command, example_path, unique_name,
};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// One notification: its lines, and the PID the kernel says sent it.
#[derive(Debug)]
struct Notification {
    lines: Vec<String>,
    sender: u32,
}

/// Stands in for systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind");
        // As systemd does: have the kernel attach the sender's credentials to each datagram.
        rustix::net::sockopt::set_socket_passcred(&socket, true).expect("SO_PASSCRED");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next datagram, waiting up to `TIMEOUT`.
    fn next(&self, what: &str) -> Notification {
        self.socket.set_nonblocking(false).expect("blocking");
        self.socket
            .set_read_timeout(Some(TIMEOUT))
            .expect("timeout");
        self.receive()
            .unwrap_or_else(|e| panic!("no notification ({what}) within {TIMEOUT:?}: {e}"))
    }

    /// A datagram already queued, if any (never waits).
    fn queued(&self) -> Option<Notification> {
        self.socket.set_nonblocking(true).expect("nonblocking");
        match self.receive() {
            Ok(n) => Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("recvmsg: {e}"),
        }
    }

    fn receive(&self) -> std::io::Result<Notification> {
        let mut buf = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            &self.socket,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::empty(),
        )?;
        let mut sender = 0;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmCredentials(cred) = message {
                sender = cred.pid.as_raw_nonzero().get() as u32;
            }
        }
        let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
        Ok(Notification {
            lines: text.lines().map(str::to_owned).collect(),
            sender,
        })
    }
}

fn server(bus: &DbusDaemon, lock_dir: &Path, notify: &Path, name: &str) -> Proc {
    let mut cmd = clean_command(&example_path("server"), Some(&bus.address), lock_dir);
    cmd.arg(name).env("NOTIFY_SOCKET", notify);
    Proc::spawn(cmd)
}

#[test]
fn server_reports_ready_once_acquired_and_a_refused_copy_says_who_runs() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let notify = NotifySocket::bind();
    let name = unique_name("notify_server");

    let mut first = server(&bus, lock_dir.path(), &notify.path, &name);
    let ready = notify.next("READY=1 from the first copy");
    assert_eq!(
        ready.sender,
        first.pid(),
        "sent by the server itself: {ready:?}"
    );
    assert!(ready.lines.iter().any(|l| l == "READY=1"), "{ready:?}");
    let status = ready
        .lines
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= line: {ready:?}"));
    assert!(
        status.contains(&name),
        "the status names the instance: {status}"
    );
    assert!(status.contains(&format!("pid {}", first.pid())), "{status}");
    assert!(status.contains("session bus"), "{status}");
    // And it only said so once it was the instance: its own readiness line follows.
    first.line_starting("ready:");
    assert!(notify.queued().is_none(), "one notification only");

    let mut second = server(&bus, lock_dir.path(), &notify.path, &name);
    assert_eq!(second.exit_code(), 75);
    let refused = notify.next("STATUS= from the refused copy");
    assert_eq!(refused.sender, second.pid());
    assert!(
        !refused.lines.iter().any(|l| l.starts_with("READY=")),
        "a refused copy is not ready: {refused:?}"
    );
    assert!(
        refused.lines.iter().any(|l| l.starts_with("STATUS=")
            && l.contains("already running")
            && l.contains(&format!("pid {}", first.pid()))),
        "{refused:?}"
    );
    first.signal(rustix::process::Signal::TERM);
    assert_eq!(first.exit_code(), 0);
}

/// COMMAND prints whether it sees NOTIFY_SOCKET, then waits for stdin to close.
const REPORT_AND_WAIT: &str = r#"echo "notify_socket=${NOTIFY_SOCKET:-none}"; cat >/dev/null"#;

#[test]
fn run_sends_nothing_for_command_unless_told_to() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let notify = NotifySocket::bind();
    let name = unique_name("notify_run_quiet");
    let mut cmd = cli_command(
        None,
        lock_dir.path(),
        &[
            "run",
            "--backend",
            "lockfile",
            &name,
            "--",
            "sh",
            "-c",
            REPORT_AND_WAIT,
        ],
    );
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut run = Proc::spawn(cmd);
    // COMMAND inherits the socket, so it may speak for itself (NotifyAccess=all).
    assert_eq!(
        run.next_line("COMMAND's report"),
        format!("notify_socket={}", notify.path.display())
    );
    run.close_stdin();
    assert_eq!(run.exit_code(), 0);
    // The wrapper has exited: anything it had sent would be queued by now.
    assert!(
        notify.queued().is_none(),
        "the wrapper reported for a COMMAND it knows nothing about"
    );
}

#[test]
fn run_with_notify_reports_ready_after_starting_command_which_does_not_see_the_socket() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let notify = NotifySocket::bind();
    let name = unique_name("notify_run");
    let mut cmd = cli_command(
        None,
        lock_dir.path(),
        &[
            "run",
            "--notify",
            "--backend",
            "lockfile",
            &name,
            "--",
            "sh",
            "-c",
            REPORT_AND_WAIT,
        ],
    );
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut run = Proc::spawn(cmd);
    let ready = notify.next("READY=1 from the wrapper");
    assert_eq!(
        ready.sender,
        run.pid(),
        "the wrapper (the main PID) sends it"
    );
    assert!(ready.lines.iter().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains(&name)),
        "{ready:?}"
    );
    assert_eq!(run.next_line("COMMAND's report"), "notify_socket=none");
    run.close_stdin();
    assert_eq!(run.exit_code(), 0);
    assert!(notify.queued().is_none(), "READY=1 once");
}

//! Invalid names are rejected, each for the right reason, before anything is touched.

mod common;

use unique_instance::{Backend, Error, InstanceName, InstanceOptions, NameRule};

#[test]
fn invalid_names_are_rejected_with_the_rule_and_nothing_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let too_long = format!("org.{}", "x".repeat(252));
    let table: Vec<(&str, NameRule)> = vec![
        ("", NameRule::Empty),
        (&too_long, NameRule::TooLong { len: 256 }),
        (":1.7", NameRule::UniqueNamePrefix),
        (".org.example", NameRule::LeadingDot),
        ("example", NameRule::TooFewElements),
        ("org..example", NameRule::EmptyElement { index: 1 }),
        ("org.example.", NameRule::EmptyElement { index: 2 }),
        (
            "org.9lives",
            NameRule::ElementStartsWithDigit {
                element: "9lives".into(),
            },
        ),
        (
            "org/example.Server",
            NameRule::InvalidCharacter {
                character: '/',
                offset: 3,
            },
        ),
        ("../etc.passwd", NameRule::LeadingDot),
        ("org.freedesktop.DBus", NameRule::ReservedByBus),
        (
            "org.example.Ser ver",
            NameRule::InvalidCharacter {
                character: ' ',
                offset: 15,
            },
        ),
        (
            "org.example.Serv*",
            NameRule::InvalidCharacter {
                character: '*',
                offset: 16,
            },
        ),
    ];
    for (name, rule) in table {
        // The bus address points nowhere: reaching for it would be a different error.
        let result = InstanceOptions::new(name).lock_dir(dir.path()).acquire();
        match result {
            Err(Error::InvalidName { name: n, rule: r }) => {
                assert_eq!((n.as_str(), &r), (name, &rule));
                let message = Error::InvalidName { name: n, rule: r }.to_string();
                assert!(message.contains(&rule.to_string()), "{message}");
            }
            other => panic!("{name:?}: expected InvalidName({rule:?}), got {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "nothing may be created"
    );
}

#[test]
fn invalid_name_exits_64_from_a_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = common::holder(None, dir.path(), &["not-a-bus-name"]);
    let line = h.next_line("outcome");
    assert!(line.starts_with("invalid-name"), "{line}");
    assert!(line.contains("at least two"), "{line}");
    assert_eq!(h.exit_code(), 64);
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}

/// Found by the `name` fuzz target: a valid name of 251 to 255 characters made a lock file name
/// longer than a file name may be, so the library failed with "File name too long" and `run`
/// exited 70. Two such names sharing their first 233 characters still get a file each.
#[test]
fn the_longest_valid_names_work_each_with_a_lock_file_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let longest = |last: char| format!("org.example.{}{last}", "S".repeat(242));
    let (a, b, c) = (longest('A'), longest('B'), longest('C'));
    // The D-Bus limit.
    assert_eq!(a.len(), 255);
    let options = |name: &str| {
        InstanceOptions::new(name)
            .backend(Backend::LockFile)
            .lock_dir(dir.path())
    };
    let guard_a = options(&a).acquire().expect("the longest name acquires");
    let guard_b = options(&b)
        .acquire()
        .expect("a second long name has a file of its own");
    match options(&a).acquire() {
        Err(Error::AlreadyRunning { name, .. }) => assert_eq!(name, a),
        other => panic!("a second copy of {a} must be refused, got {other:?}"),
    }
    let mut refused = common::cli(
        None,
        dir.path(),
        &["run", "--backend", "lockfile", &a, "--", "true"],
    );
    assert_eq!(refused.exit_code(), 75, "run must see {a} held");
    let mut ran = common::cli(
        None,
        dir.path(),
        &["run", "--backend", "lockfile", &c, "--", "true"],
    );
    assert_eq!(
        ran.exit_code(),
        0,
        "run with a free 255-character name runs COMMAND"
    );
    guard_b.release().expect("release");
    guard_a.release().expect("release");
}

/// A name validated once (`InstanceName`) is given to the options as it is, by value or by
/// reference, and plans exactly as the same name given as a string.
#[test]
fn a_validated_name_is_given_to_the_options_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "org.example.Validated";
    let name = InstanceName::new(text).expect("a valid name");
    let plan = |options: InstanceOptions| {
        options
            .backend(Backend::LockFile)
            .lock_dir(dir.path())
            .plan()
            .expect("plan")
    };
    let from_str = plan(InstanceOptions::new(text));
    assert_eq!(from_str.name, text);
    assert_eq!(
        from_str.lock_file,
        Some(dir.path().join("org.example.Validated.lock"))
    );
    assert_eq!(plan(InstanceOptions::new(text.to_owned())), from_str);
    assert_eq!(plan(InstanceOptions::new(&name)), from_str);
    assert_eq!(plan(InstanceOptions::new(name)), from_str);
}

/// `org.freedesktop.DBus` is the bus's own name: valid by the grammar, but no client may own
/// it, so it is refused as an invalid name (64) before anything is touched, saying why, and
/// not found out on the bus as an internal error (70), nor held through the lock file alone.
#[test]
fn the_bus_s_own_name_is_an_invalid_name() {
    let bus = common::DbusDaemon::start(common::BusConfig::Open);
    let dir = tempfile::tempdir().expect("tempdir");
    for address in [Some(bus.address.as_str()), None] {
        let mut run = common::cli(
            address,
            dir.path(),
            &["run", "org.freedesktop.DBus", "--", "true"],
        );
        let code = run.exit_code();
        let stderr = run.stderr_until_closed().join("\n");
        assert_eq!(code, 64, "bus {address:?}: {stderr}");
        assert!(stderr.contains("reserved"), "{stderr}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}

/// The D-Bus backend alone with no bus: the advice names the system scope as the library and
/// the command line each spell it, not only the command line's flag.
#[test]
fn no_usable_backend_advice_names_the_scope_in_the_library_s_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = common::holder(
        None,
        dir.path(),
        &["org.example.NoBus", "--backend", "dbus"],
    );
    let line = h.next_line("outcome");
    assert!(line.starts_with("no-usable-backend"), "{line}");
    assert!(line.contains("Scope::System"), "{line}");
    assert_eq!(h.exit_code(), 69);
}

//! Unit tests of the generated files and of the checks of their input.

use std::path::Path;

use super::check::{DEPLOYABLE_NAME_MAX, FILE_NAME_MAX};
use super::*;

fn example() -> Deployment {
    let name = InstanceName::new("org.example.Server").expect("valid");
    Deployment {
        unit: name.to_string(),
        description: default_description(&name),
        name,
        executable: "/usr/local/libexec/unique-instance/example-server".into(),
        args: vec!["org.example.Server".into()],
        user: "example-server".into(),
        group: "example-server".into(),
        readiness: Readiness::Dbus,
        callers: Callers::Everyone,
    }
}

/// The generator's copy of the shared directory is where the library locks, in the system
/// scope, a name whose deployment made it no directory of its own.
#[test]
fn the_shared_system_lock_dir_is_the_one_the_library_locks_in() {
    use unique_instance::{Backend, InstanceOptions, LOCK_DIR_ENV, Scope};
    assert!(
        std::env::var_os(LOCK_DIR_ENV).is_none(),
        "unset {LOCK_DIR_ENV} to run this test: it moves the library's lock directory"
    );
    // No deployment made this name a directory under SERVICE_LOCK_ROOT.
    let name = "org.example.GeneratorSharedDirCheck";
    assert!(!Path::new(SERVICE_LOCK_ROOT).join(name).exists());
    let plan = InstanceOptions::new(name)
        .scope(Scope::System)
        .backend(Backend::LockFile)
        .plan()
        .expect("plan");
    assert_eq!(
        plan.lock_file,
        Some(Path::new(SYSTEM_LOCK_DIR).join(format!("{name}.lock")))
    );
}

#[test]
fn command_words_are_escaped_for_systemd_and_dbus() {
    assert_eq!(unit_word("/usr/bin/x"), "/usr/bin/x");
    assert_eq!(unit_word("50%"), "50%%");
    assert_eq!(unit_word("$HOME"), "$$HOME");
    assert_eq!(unit_word("a b"), "\"a b\"");
    assert_eq!(unit_word("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
    assert_eq!(unit_word(""), "\"\"");
    assert_eq!(dbus_word("a b"), "'a b'");
    assert_eq!(dbus_word("it's"), r"'it'\''s'");
}

/// The text of every XML comment in `xml`.
fn xml_comments(xml: &str) -> Vec<&str> {
    xml.split("<!--")
        .skip(1)
        .map(|c| c.split("-->").next().expect("closed"))
        .collect()
}

#[test]
fn policy_comments_stay_valid_xml_whatever_the_names() {
    // XML forbids "--" in a comment and a comment ending in "-"; names, units and groups
    // may contain both.
    let name = InstanceName::new("a--b.c-").expect("valid");
    let d = Deployment {
        unit: "x--y-".into(),
        callers: Callers::Group("g--h-".into()),
        name,
        ..example()
    };
    let policy = d.bus_policy();
    for comment in xml_comments(&policy) {
        assert!(
            !comment.contains("--") && !comment.ends_with('-'),
            "{comment:?}"
        );
    }
    assert!(policy.contains("<allow own=\"a--b.c-\"/>"), "{policy}");
    assert!(policy.contains("<policy group=\"g--h-\">"), "{policy}");
}

#[test]
fn descriptions_systemd_would_read_differently_are_refused() {
    for ok in [
        "100% \"quoted\" it's",
        "a \\ b",
        "x\\y",
        "ünïcode €",
        "a--b",
    ] {
        assert_eq!(check_description(ok), Ok(()), "{ok:?}");
    }
    for (bad, why) in [
        ("ends\\", "continuation"),
        ("", "empty"),
        (" lead", "space"),
        ("trail ", "space"),
        ("two\nlines", "control"),
    ] {
        let err = check_description(bad).expect_err(bad);
        assert!(err.contains(why), "{bad:?}: {err}");
    }
}

#[test]
fn names_too_long_for_their_files_are_refused() {
    let longest = format!("a.{}", "b".repeat(DEPLOYABLE_NAME_MAX - 2));
    let name = InstanceName::new(&longest).expect("valid");
    assert_eq!(check_deployable_name(&name), Ok(()));
    let d = Deployment {
        unit: longest.clone(),
        name,
        ..example()
    };
    for f in d.files() {
        let len = f.path.file_name().expect("file name").len();
        assert!(len <= FILE_NAME_MAX, "{}: {len}", f.path.display());
    }
    let too_long = InstanceName::new(&format!("{longest}b")).expect("valid");
    let err = check_deployable_name(&too_long).expect_err("too long");
    assert!(err.contains("at most 247"), "{err}");
}

#[test]
fn paths_that_are_not_utf8_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(b"/usr/bin/caf\xe9"));
    let err = executable_text(path).expect_err("not UTF-8");
    assert!(
        err.contains("not valid UTF-8") && err.contains("\\xE9"),
        "{err}"
    );
    assert_eq!(executable_text(Path::new("/a b/c%")), Ok("/a b/c%".into()));
    for c in ['"', '\'', '\\', '$'] {
        let path = format!("/usr/bin/a{c}b");
        let err = executable_text(Path::new(&path)).expect_err(&path);
        assert!(err.contains("systemd does not accept"), "{err}");
    }
}

#[test]
fn unit_names_follow_systemd_rules() {
    assert!(check_unit_name("org.example.Server").is_ok());
    assert!(check_unit_name("example-server").is_ok());
    assert!(check_unit_name("a@b").is_err());
    assert!(check_unit_name("a b").is_err());
    assert!(check_unit_name("").is_err());
    assert!(check_unit_name(&"a".repeat(247)).is_ok());
    let err = check_unit_name(&"a".repeat(248)).expect_err("too long with .service");
    assert!(err.contains("255"), "{err}");
}

#[test]
fn account_names_are_portable() {
    for ok in ["example-server", "_svc", "a1"] {
        assert!(valid_account_name(ok), "{ok}");
    }
    for bad in ["", "Root", "1abc", "a b", "a\"b", "<x>", &"a".repeat(32)] {
        assert!(!valid_account_name(bad), "{bad}");
    }
    assert_eq!("group:wheel".parse(), Ok(Callers::Group("wheel".into())));
    assert!("group:Bad Name".parse::<Callers>().is_err());
    assert!("anyone".parse::<Callers>().is_err());
}

#[test]
fn the_files_say_what_the_deployment_needs() {
    let d = example();
    let files = d.files();
    let text = |suffix: &str| {
        &files
            .iter()
            .find(|f| f.path.to_string_lossy().ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix}"))
            .contents
    };
    let system = text("systemd/org.example.Server.service");
    for line in [
        "Type=dbus",
        "BusName=org.example.Server",
        "User=example-server",
        "Environment=UNIQUE_INSTANCE_SCOPE=system",
        "ReadWritePaths=-/run/unique-instance/org.example.Server -/run/lock/unique-instance",
        "ProtectSystem=strict",
        "Restart=on-failure",
    ] {
        assert!(system.lines().any(|l| l == line), "missing {line}");
    }
    assert!(!system.lines().any(|l| l.trim() == "[Install]"));
    let policy = text("dbus/org.example.Server.conf");
    assert!(
        policy
            .contains("<policy user=\"example-server\">\n    <allow own=\"org.example.Server\"/>")
    );
    assert!(!policy.contains("own=\"*\""));
    // An XML comment may not contain "--", and the command line has some.
    let comments: Vec<&str> = policy.split("<!--").skip(1).collect();
    for c in comments {
        let body = c.split("-->").next().expect("closed");
        assert!(!body.contains("--"), "{body}");
    }
    let tmpfiles = text("tmpfiles.d/org.example.Server.conf");
    for line in [
        "d /run/unique-instance 0755 root root -",
        "d /run/unique-instance/org.example.Server 0755 example-server example-server -",
        "d /run/lock/unique-instance 1777 root root -",
    ] {
        assert!(tmpfiles.lines().any(|l| l == line), "missing {line}");
    }
    let system_bus = text("system-services/org.example.Server.service");
    assert!(system_bus.contains("User=example-server\nSystemdService=org.example.Server.service"));
    let notify = Deployment {
        readiness: Readiness::Notify,
        ..example()
    };
    assert!(notify.system_unit().lines().any(|l| l == "Type=notify"));
    assert!(notify.command_line().contains("--type notify"));
}

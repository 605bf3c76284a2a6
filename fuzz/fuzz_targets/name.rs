//! Instance names: validation never panics, agrees with zbus (which will request the name on
//! the bus), says truthfully which rule a name broke, and every valid name derives a lock file
//! name the file system accepts, a different one for each name.
//!
//! Input: one name, or two separated by a NUL byte (for the "different names, different lock
//! files" check).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use unique_instance::{Backend, InstanceName, InstanceOptions, NameRule, Scope};

/// The longest file name Linux file systems accept (`NAME_MAX`).
const NAME_MAX: usize = 255;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |&b| b == 0);
    let first = check(&String::from_utf8_lossy(parts.next().unwrap_or_default()));
    if let Some(second) = parts.next() {
        let second = check(&String::from_utf8_lossy(second));
        if let (Some(a), Some(b)) = (first, second)
            && a != b
        {
            assert_ne!(
                a.lock_file_name(),
                b.lock_file_name(),
                "two names share a lock file"
            );
        }
    }
});

fn check(s: &str) -> Option<InstanceName> {
    let ours = InstanceName::new(s);
    let zbus = zbus::names::WellKnownName::try_from(s);
    assert_eq!(
        ours.is_ok(),
        zbus.is_ok(),
        "{s:?}: we say {ours:?}, zbus says {zbus:?}"
    );
    // The library derives the lock file from the name the same way when it plans.
    let dir = Path::new("/nonexistent/fuzz");
    let plan = InstanceOptions::new(s)
        .scope(Scope::User)
        .backend(Backend::LockFile)
        .lock_dir(dir)
        .plan();
    match ours {
        Err(rule) => {
            assert!(plan.is_err(), "{s:?}: invalid, yet planned: {plan:?}");
            assert!(!rule.to_string().is_empty());
            check_rule(s, &rule);
            None
        }
        Ok(name) => {
            assert_eq!(name.as_str(), s);
            assert_eq!(name.to_string(), s);
            let file = name.lock_file_name();
            assert!(
                !file.is_empty()
                    && file.len() <= NAME_MAX
                    && !file.contains(['/', '\0'])
                    && file != "."
                    && file != "..",
                "{s:?} ({} bytes) derives an unusable lock file name {file:?} ({} bytes)",
                s.len(),
                file.len()
            );
            let plan = plan.unwrap_or_else(|e| panic!("{s:?}: valid, yet not planned: {e}"));
            assert_eq!(plan.name, s);
            let lock_file = plan
                .lock_file
                .expect("the lock-file backend has a lock file");
            assert_eq!(lock_file.parent(), Some(dir));
            assert_eq!(
                lock_file.file_name().and_then(|f| f.to_str()),
                Some(file.as_str())
            );
            Some(name)
        }
    }
}

/// The rule reported is one the name really breaks.
fn check_rule(s: &str, rule: &NameRule) {
    let elements: Vec<&str> = s.split('.').collect();
    let holds = match rule {
        NameRule::Empty => s.is_empty(),
        // 255: the D-Bus limit.
        NameRule::TooLong { len } => *len == s.len() && s.len() > 255,
        NameRule::UniqueNamePrefix => s.starts_with(':'),
        NameRule::LeadingDot => s.starts_with('.'),
        NameRule::TooFewElements => elements.len() < 2,
        NameRule::EmptyElement { index } => elements.get(*index) == Some(&""),
        NameRule::ElementStartsWithDigit { element } => {
            elements.contains(&element.as_str())
                && element.starts_with(|c: char| c.is_ascii_digit())
        }
        NameRule::InvalidCharacter { character, offset } => s
            .get(*offset..)
            .is_some_and(|rest| rest.starts_with(*character)),
        // A rule added later: its message is checked above.
        _ => true,
    };
    assert!(holds, "{s:?} is said to break a rule it does not: {rule:?}");
}

//! Instance names: D-Bus well-known names, validated before anything is touched.

use std::fmt;

/// The longest well-known name the D-Bus specification allows.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// A validated D-Bus well-known name, such as `org.example.Server`.
///
/// Holding one proves every rule of the D-Bus specification was checked, so it is also safe to
/// use as a file name (no `/`, no leading `.`, nothing but `[A-Za-z0-9_.-]`). It is given to
/// [`InstanceOptions::new`](crate::InstanceOptions::new) as it is, like a `&str`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct InstanceName(String);

/// Which rule of the D-Bus well-known-name grammar a name broke.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameRule {
    /// The name is empty.
    Empty,
    /// Longer than 255 characters (the D-Bus limit).
    TooLong {
        /// The length that was given.
        len: usize,
    },
    /// Starts with `:`, which marks bus-assigned unique names.
    UniqueNamePrefix,
    /// Starts with `.`.
    LeadingDot,
    /// Has fewer than two `.`-separated elements.
    TooFewElements,
    /// Has an empty element (`a..b`, or a trailing `.`).
    EmptyElement {
        /// Zero-based index of the empty element.
        index: usize,
    },
    /// An element starts with a digit.
    ElementStartsWithDigit {
        /// The offending element.
        element: String,
    },
    /// A character outside `[A-Za-z0-9_-]` appears in an element.
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// Its byte offset in the name.
        offset: usize,
    },
    /// The name is one the bus keeps for itself (`org.freedesktop.DBus`): no client may own it.
    ReservedByBus,
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameRule::Empty => write!(f, "the name is empty"),
            NameRule::TooLong { len } => {
                write!(
                    f,
                    "it is {len} characters long; the limit is {MAX_NAME_LEN}"
                )
            }
            NameRule::UniqueNamePrefix => write!(
                f,
                "it starts with ':', which is reserved for bus-assigned unique names"
            ),
            NameRule::LeadingDot => write!(f, "it starts with '.'"),
            NameRule::TooFewElements => write!(
                f,
                "it needs at least two '.'-separated elements, like org.example.Server"
            ),
            NameRule::EmptyElement { index } => {
                write!(f, "element {} is empty ('..' or a trailing '.')", index + 1)
            }
            NameRule::ElementStartsWithDigit { element } => {
                write!(f, "element '{element}' starts with a digit")
            }
            NameRule::InvalidCharacter { character, offset } => write!(
                f,
                "character {character:?} at offset {offset} is not one of A-Z a-z 0-9 _ -"
            ),
            NameRule::ReservedByBus => write!(
                f,
                "it is reserved: the message bus's own name ({BUS_NAME}), which no client may own"
            ),
        }
    }
}

impl InstanceName {
    /// Validates `name` against every D-Bus well-known-name rule, and refuses the bus's own
    /// name (`org.freedesktop.DBus`), which no client may own.
    ///
    /// # Errors
    ///
    /// Returns the first [`NameRule`] the name breaks.
    pub fn new(name: &str) -> Result<Self, NameRule> {
        validate(name)?;
        Ok(InstanceName(name.to_owned()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file name of this instance's lock file: `NAME.lock`.
    ///
    /// A file name holds at most 255 bytes, so a name of 251 to 255 characters (valid, but too
    /// long for `NAME.lock`) gets its first 233 characters, `~`, a 64-bit hash of the whole name
    /// in hex and `.lock`, as systemd shortens long unit names. `~` is never in a valid name, so
    /// such a file name is never another name's `NAME.lock`. Every copy, of any version, must
    /// derive the same file: never change this.
    pub fn lock_file_name(&self) -> String {
        const SUFFIX: &str = ".lock";
        if self.0.len() + SUFFIX.len() <= FILE_NAME_MAX {
            return format!("{}{SUFFIX}", self.0);
        }
        // 233 + "~" + 16 hex digits + ".lock" = 255. Valid names are ASCII: any byte is a char
        // boundary.
        let prefix = &self.0[..FILE_NAME_MAX - 1 - 16 - SUFFIX.len()];
        format!("{prefix}~{:016x}{SUFFIX}", fnv1a_64(self.0.as_bytes()))
    }
}

/// The longest file name Linux file systems take (`NAME_MAX`).
const FILE_NAME_MAX: usize = 255;

/// FNV-1a, 64 bits: small, and stable across Rust versions and platforms (unlike std's
/// `DefaultHasher`), which a file name that every copy must agree on needs.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn validate(name: &str) -> Result<(), NameRule> {
    if name.is_empty() {
        return Err(NameRule::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameRule::TooLong { len: name.len() });
    }
    if name.starts_with(':') {
        return Err(NameRule::UniqueNamePrefix);
    }
    if name.starts_with('.') {
        return Err(NameRule::LeadingDot);
    }
    // Characters first, so that "org/example" is reported as a bad character rather than as
    // having too few elements.
    if let Some((offset, character)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
    {
        return Err(NameRule::InvalidCharacter { character, offset });
    }
    let elements: Vec<&str> = name.split('.').collect();
    if elements.len() < 2 {
        return Err(NameRule::TooFewElements);
    }
    for (index, element) in elements.iter().enumerate() {
        if element.is_empty() {
            return Err(NameRule::EmptyElement { index });
        }
        if element.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(NameRule::ElementStartsWithDigit {
                element: (*element).to_owned(),
            });
        }
    }
    // The grammar allows it, but every bus refuses to let a client own it.
    if name == BUS_NAME {
        return Err(NameRule::ReservedByBus);
    }
    Ok(())
}

/// The name the message bus itself owns.
const BUS_NAME: &str = "org.freedesktop.DBus";

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for InstanceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// What lets `InstanceOptions::new` (`impl Into<String>`) take a validated name as well as a
// `&str` or `String`, with no second constructor.
impl From<InstanceName> for String {
    fn from(name: InstanceName) -> String {
        name.0
    }
}

impl From<&InstanceName> for String {
    fn from(name: &InstanceName) -> String {
        name.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "org.example.Server",
            "a.b",
            "org.example.with-dash_and_underscore",
            "x._1",
            "com.example.A1",
        ] {
            assert!(InstanceName::new(name).is_ok(), "{name} should be valid");
        }
        let longest = format!("a.{}", "b".repeat(MAX_NAME_LEN - 2));
        assert!(InstanceName::new(&longest).is_ok());
    }

    #[test]
    fn rejects_each_rule() {
        let too_long = format!("a.{}", "b".repeat(MAX_NAME_LEN - 1));
        let cases: Vec<(&str, NameRule)> = vec![
            ("", NameRule::Empty),
            (&too_long, NameRule::TooLong { len: 256 }),
            (":1.42", NameRule::UniqueNamePrefix),
            (".org.example", NameRule::LeadingDot),
            ("org", NameRule::TooFewElements),
            ("org..example", NameRule::EmptyElement { index: 1 }),
            ("org.example.", NameRule::EmptyElement { index: 2 }),
            (
                "org.1example",
                NameRule::ElementStartsWithDigit {
                    element: "1example".into(),
                },
            ),
            (
                "org/example.x",
                NameRule::InvalidCharacter {
                    character: '/',
                    offset: 3,
                },
            ),
            (
                "org.exämple",
                NameRule::InvalidCharacter {
                    character: 'ä',
                    offset: 6,
                },
            ),
            (
                "org.ex ample",
                NameRule::InvalidCharacter {
                    character: ' ',
                    offset: 6,
                },
            ),
        ];
        for (name, rule) in cases {
            assert_eq!(InstanceName::new(name), Err(rule), "for {name:?}");
        }
    }

    #[test]
    fn lock_file_name_is_a_plain_file_name() {
        let name = InstanceName::new("org.example.Server").expect("valid");
        assert_eq!(name.lock_file_name(), "org.example.Server.lock");
    }

    /// Found by the `name` fuzz target: valid names of 251 to 255 characters derived a lock
    /// file name longer than a file name may be, and `run`/`status` exited 70.
    #[test]
    fn every_valid_name_derives_a_usable_lock_file_name_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for len in 245..=MAX_NAME_LEN {
            for last in ['a', 'b'] {
                let name = format!("org.example.{}{last}", "S".repeat(len - 13));
                let file = InstanceName::new(&name).expect("valid").lock_file_name();
                assert!(file.len() <= FILE_NAME_MAX, "{len}: {} bytes", file.len());
                assert!(file.ends_with(".lock") && !file.contains('/'), "{file}");
                if len <= 250 {
                    // What every earlier version derived: copies of both meet.
                    assert_eq!(file, format!("{name}.lock"));
                }
                assert!(seen.insert(file), "{name}: a lock file name shared");
            }
        }
        // Pinned: a copy of any version must derive the same file for the same name.
        let longest = format!("org.example.{}", "S".repeat(243));
        assert_eq!(
            InstanceName::new(&longest).expect("valid").lock_file_name(),
            format!("{}~da88253751260058.lock", &longest[..233])
        );
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}

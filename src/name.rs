//! Instance names: D-Bus well-known names, validated before anything is touched.

use std::fmt;

/// The longest well-known name the D-Bus specification allows.
pub const MAX_NAME_LEN: usize = 255;

/// A validated D-Bus well-known name, such as `org.example.Server`.
///
/// Holding one proves every rule of the D-Bus specification was checked, so it is also safe to
/// use as a file name (no `/`, no leading `.`, nothing but `[A-Za-z0-9_.-]`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct InstanceName(String);

/// Which rule of the D-Bus well-known-name grammar a name broke.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameRule {
    /// The name is empty.
    Empty,
    /// Longer than [`MAX_NAME_LEN`] characters.
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
        }
    }
}

impl InstanceName {
    /// Validates `name` against every D-Bus well-known-name rule.
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
    pub fn lock_file_name(&self) -> String {
        format!("{}.lock", self.0)
    }
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
    Ok(())
}

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
}

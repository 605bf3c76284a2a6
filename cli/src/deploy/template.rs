//! Filling the deployment files' templates (`templates/`, read in at compile time): each
//! `{key}` is replaced by its value, in one pass, so a value is never read as a template (a
//! description may well contain `{name}`).

/// `template` with every `{key}` replaced by the value `values` gives it. A `{` that does not
/// start a known `{key}` is kept as it is; a key given but never used, or a `{key}`-shaped
/// word with no value, is a mistake in the generator, caught by its unit tests (which write
/// every template), so it panics rather than write a file with a hole in it.
pub(super) fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut used = vec![false; values.len()];
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let key_len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        if key_len > 0 && after[key_len..].starts_with('}') {
            let key = &after[..key_len];
            let Some(at) = values.iter().position(|(k, _)| *k == key) else {
                panic!("the template has {{{key}}} and no value is given for it");
            };
            used[at] = true;
            out.push_str(values[at].1);
            rest = &after[key_len + 1..];
        } else {
            out.push('{');
            rest = after;
        }
    }
    out.push_str(rest);
    if let Some(at) = used.iter().position(|used| !used) {
        panic!(
            "the value of {{{}}} is given, and the template never uses it",
            values[at].0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn keys_are_replaced_once_and_values_are_not_templates() {
        assert_eq!(
            fill("a {x} b {y}{x}", &[("x", "{y}"), ("y", "1")]),
            "a {y} b 1{y}"
        );
        assert_eq!(fill("{ not a key } {X} {}", &[]), "{ not a key } {X} {}");
    }

    #[test]
    #[should_panic(expected = "no value is given")]
    fn a_key_without_a_value_is_a_mistake() {
        fill("{x}", &[]);
    }

    #[test]
    #[should_panic(expected = "never uses it")]
    fn a_value_without_its_key_is_a_mistake() {
        fill("x", &[("x", "1")]);
    }
}

//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz` builds with `--cfg fuzzing`): thin
//! wrappers around the crate-private parsers. Not part of the API. Also compiled for the unit
//! tests, so that `cargo clippy --all-targets` keeps it building and the fuzzers' seeds and
//! regression inputs are replayed by `cargo test`.

use std::path::Path;

use crate::Holder;
use crate::lockfile::LockRecord;

/// How much of a lock file a reader reads: the record must fit in it.
pub const MAX_RECORD_LEN: usize = crate::lockfile::MAX_RECORD_LEN;

/// What a reader makes of a lock file holding `content`: its first [`MAX_RECORD_LEN`] bytes
/// (all a reader reads) parsed, then turned into the [`Holder`] that `status` and "already
/// running" report; `None` for "holder unknown".
pub fn holder_from_record(content: &[u8], lock_file: &Path) -> Option<Holder> {
    LockRecord::parse(&content[..content.len().min(MAX_RECORD_LEN)])
        .map(|record| record.into_holder(lock_file.to_owned()))
}

/// Whether `content`, as a whole file, is one holder record and nothing else: what a copy
/// requires of a file it finds at the lock path before taking it over (and removing it on
/// release). Every line a holder writes must pass.
pub fn is_whole_record(content: &[u8]) -> bool {
    LockRecord::parse_whole(content).is_some()
}

/// The line a holder would write for the record a reader finds in `content`, if it finds one.
pub fn record_line(content: &[u8]) -> Option<Vec<u8>> {
    LockRecord::parse(&content[..content.len().min(MAX_RECORD_LEN)]).map(|record| record.to_line())
}

/// What a copy writes at once into a crashed holder's file whose whole content is `content`,
/// before its own record (`None` unless `content` is a whole record): a whole record too, as
/// long at least, so that one write replaces the old one; or, where the old one is marked kept
/// (someone else's file), nothing: the file is emptied.
pub fn takeover_placeholder(content: &[u8]) -> Option<Vec<u8>> {
    crate::lockfile::takeover_placeholder(content)
}

/// Whether a whole record marks its file as kept (someone else's, never removed); `None`
/// unless `content` is a whole record.
pub fn is_kept(content: &[u8]) -> Option<bool> {
    crate::lockfile::is_kept(content)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Every file in `fuzz/DIR/record/`: the committed seeds and crash reproducers.
    fn inputs(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(dir)
            .join("record");
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.expect("directory entry").path();
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                (path, bytes)
            })
            .collect();
        inputs.sort();
        inputs
    }

    /// What the `record` fuzz target does with each input, minus its round-trip checks: every
    /// report made of a planted record must come out without a panic.
    fn report(content: &[u8]) -> Option<(String, String)> {
        let holder = holder_from_record(content, Path::new("/run/lock/x.lock"))?;
        let json = serde_json::to_string(&holder).expect("a holder serialises");
        Some((holder.to_string(), json))
    }

    #[test]
    fn record_seeds_parse_and_report() {
        let seeds = inputs("seeds");
        assert!(!seeds.is_empty());
        let parsed = seeds.iter().filter(|(_, s)| report(s).is_some()).count();
        // What a holder writes for each is a whole record: a crashed holder's file is taken over.
        for (path, seed) in &seeds {
            if let Some(line) = record_line(seed) {
                assert!(is_whole_record(&line), "{}", path.display());
            }
            // And what a copy taking a crashed holder's file over writes first (see the target).
            match (takeover_placeholder(seed), is_kept(seed)) {
                (Some(line), Some(true)) => assert!(line.is_empty(), "{}", path.display()),
                (Some(line), _) => {
                    assert!(line.len() >= seed.len(), "{}", path.display());
                    assert!(is_whole_record(&line), "{}", path.display());
                    assert_eq!(is_kept(&line), Some(false), "{}", path.display());
                }
                (None, _) => {}
            }
        }
        // The seeds are mostly real records: a parser that rejects them all is broken.
        assert!(
            parsed * 2 > seeds.len(),
            "only {parsed} of {} seeds parse",
            seeds.len()
        );
    }

    #[test]
    fn record_crash_reproducers_are_reported_without_panic() {
        for (path, content) in inputs("regressions") {
            let result = std::panic::catch_unwind(|| report(&content));
            assert!(result.is_ok(), "{} panics", path.display());
        }
    }
}

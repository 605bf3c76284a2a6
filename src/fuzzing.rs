//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz` builds with `--cfg fuzzing`): thin
//! wrappers around the crate-private parsers. Not part of the API. Also compiled for the unit
//! tests, so that `cargo clippy --all-targets` keeps it building and the fuzzers' seeds and
//! regression inputs are replayed by `cargo test`.

use std::path::Path;

use crate::Holder;
use crate::holder::LockRecord;

/// What a reader makes of a lock file's `content`: the record parsed, then turned into the
/// [`Holder`] that `status` and "already running" report; `None` for "holder unknown".
pub fn holder_from_record(content: &[u8], lock_file: &Path) -> Option<Holder> {
    LockRecord::parse(content).map(|record| record.into_holder(lock_file.to_owned()))
}

/// The line a holder would write for the record parsed from `content`, if it parses.
pub fn record_line(content: &[u8]) -> Option<Vec<u8>> {
    LockRecord::parse(content).map(|record| record.to_line())
}

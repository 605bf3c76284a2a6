//! Lock-file records: any bytes a planted or torn lock file holds are parsed, turned into a
//! holder and reported (the sentence, the "already running" error, the JSON of `status`) without
//! a panic; only what readers read is taken for a crashed holder's whole file; and what a holder
//! writes for it is such a file and reads back the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use unique_instance::Error;
use unique_instance::fuzzing::{
    MAX_RECORD_LEN, holder_from_record, is_kept, is_whole_record, record_line, takeover_placeholder,
};

fuzz_target!(|content: &[u8]| {
    let lock_file = Path::new("/run/lock/unique-instance/org.example.Server.lock");
    let whole = is_whole_record(content);
    check_takeover(content, whole);
    let Some(holder) = holder_from_record(content, lock_file) else {
        assert!(record_line(content).is_none());
        // A file taken for a crashed holder's (to take over and remove) is one a reader reads.
        assert!(!whole, "a whole record that readers cannot read");
        return;
    };
    let sentence = holder.to_string();
    assert!(!sentence.is_empty());
    let json = serde_json::to_string(&holder).expect("a holder serialises to JSON");
    serde_json::from_str::<serde_json::Value>(&json).expect("and that JSON parses");
    let refusal = Error::AlreadyRunning {
        name: "org.example.Server".into(),
        holder: Box::new(holder.clone()),
    };
    assert!(refusal.to_string().contains(&sentence));

    // What a holder would write for this record: one line that a reader reads whole, and reads
    // back as the same holder, except for the strings the writer leaves out to fit.
    let line = record_line(content).expect("a record that parses can be written");
    assert!(line.len() <= MAX_RECORD_LEN, "{} bytes", line.len());
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
    // A holder's own file is recognised as one, so a crashed holder's file is taken over.
    assert!(
        is_whole_record(&line),
        "not a whole record: {:?}",
        String::from_utf8_lossy(&line)
    );
    let again = holder_from_record(&line, lock_file)
        .unwrap_or_else(|| panic!("unreadable: {:?}", String::from_utf8_lossy(&line)));
    let dropped_or_same = |a: Option<&str>, b: Option<&str>| a.is_none() || a == b;
    assert!(
        again.pid == holder.pid
            && again.uid == holder.uid
            && again.since == holder.since
            && again.found_by == holder.found_by
            && again.bus == holder.bus
            && again.lock_file == holder.lock_file
            && dropped_or_same(
                again.bus_unique_name.as_deref(),
                holder.bus_unique_name.as_deref()
            )
            && dropped_or_same(again.hostname.as_deref(), holder.hostname.as_deref())
            && (again.executable.is_none() || again.executable == holder.executable)
            && (again.queued_on_bus.is_none() || again.queued_on_bus == holder.queued_on_bus),
        "read {holder:?}, wrote {:?}, read back {again:?}",
        String::from_utf8_lossy(&line)
    );
});

/// A crashed holder's file taken over gets at once, in one write, a record of the new holder:
/// a whole record itself (a copy killed next leaves a file the one after it takes over), at
/// least as long as the old one (nothing of it is left after its newline), and never marked
/// kept; unless the old one was marked kept (someone else's file, which earlier versions wrote
/// into): that file is emptied instead, and nothing of ours is written into it.
fn check_takeover(content: &[u8], whole: bool) {
    let Some(line) = takeover_placeholder(content) else {
        assert!(!whole, "a whole record with no placeholder");
        return;
    };
    assert!(whole, "a placeholder for a file that is not a whole record");
    if is_kept(content) == Some(true) {
        assert!(line.is_empty(), "a record written into a kept file");
        return;
    }
    assert!(
        line.len() >= content.len(),
        "{} < {}",
        line.len(),
        content.len()
    );
    assert!(
        is_whole_record(&line),
        "not a whole record: {:?}",
        String::from_utf8_lossy(&line)
    );
    assert_eq!(is_kept(&line), Some(false), "a record of ours marked kept");
}

//! Lock-file records: any bytes a planted or torn lock file holds are parsed, turned into a
//! holder and reported (the sentence, the "already running" error, the JSON of `status`) without
//! a panic, and what a holder writes back reads back the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use unique_instance::Error;
use unique_instance::fuzzing::{holder_from_record, record_line};

fuzz_target!(|content: &[u8]| {
    let lock_file = Path::new("/run/lock/unique-instance/org.example.Server.lock");
    let Some(holder) = holder_from_record(content, lock_file) else {
        assert!(record_line(content).is_none());
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

    // What a holder would write for this record: one line, which reads back as the same holder.
    let line = record_line(content).expect("a record that parses can be written");
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
    let again = holder_from_record(&line, lock_file);
    assert_eq!(
        again.as_ref(),
        Some(&holder),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
});

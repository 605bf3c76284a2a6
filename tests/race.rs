//! Many copies started at once: exactly one holds the instance; every other names it.

mod common;

use common::{BusConfig, DbusDaemon, field, holder, unique_name};

const COPIES: usize = 32;
const ROUNDS: usize = 20;

#[test]
fn thirty_two_copies_one_holder_every_round() {
    let bus = DbusDaemon::start(BusConfig::Open);
    for round in 0..ROUNDS {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("race");
        // All copies start, then block on stdin until every one exists: then they race.
        let mut copies: Vec<_> = (0..COPIES)
            .map(|_| {
                holder(
                    Some(&bus.address),
                    lock_dir.path(),
                    &[&name, "--go-on-stdin"],
                )
            })
            .collect();
        for copy in &mut copies {
            copy.send("go\n");
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for (i, copy) in copies.iter_mut().enumerate() {
            let line = copy.next_line("the outcome of acquiring");
            if line.starts_with("acquired") {
                winners.push(i);
            } else {
                assert!(
                    line.starts_with("already-running"),
                    "round {round}: unexpected {line:?}"
                );
                losers.push((i, line));
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: winners {winners:?}, losers {losers:?}"
        );
        let winner_pid = copies[winners[0]].pid().to_string();
        for (i, line) in &losers {
            assert_eq!(
                field(line, "holder_pid"),
                Some(winner_pid.as_str()),
                "round {round}: loser {i} did not name the holder: {line}"
            );
            assert_eq!(copies[*i].exit_code(), 75, "round {round}: loser {i}");
        }
        let winner = &mut copies[winners[0]];
        winner.close_stdin();
        assert_eq!(winner.line_starting("released"), "released");
        assert_eq!(winner.exit_code(), 0);
    }
}

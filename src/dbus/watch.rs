//! Watching the name once owned: `NameLost` means replaced, the connection ending means the bus
//! is gone; each is logged as a loss.
//! It must not request the name (that is `name`).

use zbus::message::Type as MessageType;

use super::DBUS_NAME;
use super::connect::BusMessages;
use crate::loss::{Loss, LossLog, LossReason};

/// A name-ownership signal about our name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameSignal {
    Acquired,
    Lost,
}

/// Reads the next `NameAcquired`/`NameLost` for `name`; `None` when the connection closed.
pub(crate) async fn next_name_signal(stream: &mut BusMessages, name: &str) -> Option<NameSignal> {
    while let Some(msg) = stream.next().await {
        if msg.message_type() != MessageType::Signal {
            continue;
        }
        let header = msg.header();
        if header.sender().map(|s| s.as_str()) != Some(DBUS_NAME)
            || header.interface().map(|i| i.as_str()) != Some(DBUS_NAME)
        {
            continue;
        }
        let signal = match header.member().map(|m| m.as_str()) {
            Some("NameAcquired") => NameSignal::Acquired,
            Some("NameLost") => NameSignal::Lost,
            _ => continue,
        };
        if msg.body().deserialize::<&str>().ok() == Some(name) {
            return Some(signal);
        }
    }
    None
}

/// Watches the connection: `NameLost` for our name means replaced; the stream ending (zbus sends
/// no `NameLost` when the bus dies) means the connection closed. Draining the stream also keeps
/// zbus's reader from stalling on a full queue.
///
/// When the connection closes, exclusion is claimed only if the lock file is re-verified right
/// then (`lock_still_held`, when one is held): see [`Loss::still_exclusive`]; and the lock
/// file's record is rewritten without the bus (`forget_bus`), before the loss is told, so that
/// it names no connection on a bus that is gone (a restarted bus gives out the same unique
/// names again, to others).
pub(crate) async fn watch_bus(
    mut stream: BusMessages,
    name: String,
    losses: LossLog,
    lock_still_held: Option<impl FnOnce() -> bool>,
    forget_bus: Option<impl FnOnce()>,
) {
    loop {
        match next_name_signal(&mut stream, &name).await {
            // Each loss told before it is said (see `report_lock_loss` in the lock file's watcher).
            Some(NameSignal::Lost) => {
                losses.send_modify(|log| {
                    log.push(Loss {
                        reason: LossReason::Replaced,
                        still_exclusive: false,
                    })
                });
                tracing::warn!(name = %name, "the bus name was taken over by another instance");
            }
            Some(NameSignal::Acquired) => {}
            None => {
                // Not what held at acquisition, but what holds now.
                let lock_verified = lock_still_held.is_some_and(|still_held| still_held());
                if let Some(forget_bus) = forget_bus {
                    forget_bus();
                }
                losses.send_modify(|log| {
                    // Judged inside the update, so a loss logged meanwhile counts.
                    let earlier_loss = log.iter().any(|l| !l.still_exclusive);
                    log.push(Loss {
                        reason: LossReason::BusConnectionClosed,
                        still_exclusive: lock_verified && !earlier_loss,
                    })
                });
                tracing::warn!(name = %name, lock_verified, "the bus connection closed");
                return;
            }
        }
    }
}

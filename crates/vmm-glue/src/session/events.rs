//! Event delivery that never blocks the session: bounded channels whose
//! subscriber is dropped when it falls behind, and callbacks that must not
//! block.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use parking_lot::Mutex;

use super::config::Event;

/// A callback subscriber: called on the thread that emits (a migration
/// thread, a vCPU thread): it must return at once.
pub type EventCallback = Box<dyn Fn(&Event) + Send + Sync>;

enum Subscriber {
    Channel(SyncSender<Event>),
    Callback(EventCallback),
}

/// The session's subscribers.
#[derive(Default)]
pub(crate) struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl EventHub {
    /// A bounded channel of `capacity` events.
    pub(crate) fn subscribe(&self, capacity: usize) -> Receiver<Event> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        self.subscribers.lock().push(Subscriber::Channel(tx));
        rx
    }

    pub(crate) fn on_event(&self, callback: EventCallback) {
        self.subscribers.lock().push(Subscriber::Callback(callback));
    }

    /// Delivers `event` to every subscriber without waiting: a channel that is
    /// full is dropped (its receiver then sees the channel closed) with a log
    /// line, one whose receiver is gone is forgotten.
    pub(crate) fn emit(&self, event: &Event) {
        self.subscribers.lock().retain(|s| match s {
            Subscriber::Channel(tx) => match tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    log::warn!("an event subscriber fell behind and was dropped");
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            },
            Subscriber::Callback(f) => {
                f(event);
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::session::MigrationStatus;

    #[test]
    fn a_full_subscriber_is_dropped_and_others_go_on() {
        let hub = EventHub::default();
        let slow = hub.subscribe(2);
        let fast = hub.subscribe(100);
        let seen = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&seen);
        hub.on_event(Box::new(move |_| {
            s.fetch_add(1, Ordering::Relaxed);
        }));
        for _ in 0..10 {
            hub.emit(&Event::Migration(MigrationStatus::Active));
        }
        // The slow one got what fit, then its channel closed.
        assert_eq!(slow.try_iter().count(), 2);
        assert!(matches!(slow.recv(), Err(mpsc::RecvError),));
        assert_eq!(fast.try_iter().count(), 10);
        assert_eq!(seen.load(Ordering::Relaxed), 10);
        drop(fast);
        hub.emit(&Event::Stop);
        assert_eq!(hub.subscribers.lock().len(), 1, "the callback stays");
    }
}

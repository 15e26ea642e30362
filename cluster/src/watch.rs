//! Recent events kept in memory for watchers, and the wake-up of waiting watchers.
//!
//! Watches are served by any member from its applied state: events are committed, so they are
//! never wrong, only possibly late on a lagging member. A watcher resumes anywhere from the
//! revision after the last event it saw.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::protocol::StoreError;
use crate::state_machine::{Event, Revision};

/// How many events are kept for watchers that fall behind...
pub const EVENT_HISTORY_LEN: usize = 100_000;
/// ...and how many bytes of keys and values at most (values can be up to 1 MiB each).
pub const EVENT_HISTORY_BYTES: usize = 64 * 1024 * 1024;

/// An answer stops after this many bytes of events (at a revision boundary).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

fn event_bytes(event: &Event) -> usize {
    event.kv.key.len() + event.kv.value.len() + 64
}

pub struct EventHistory {
    inner: Mutex<Inner>,
    revision_tx: tokio::sync::watch::Sender<Revision>,
}

struct Inner {
    events: VecDeque<Event>,
    bytes: usize,
    /// Every event with a revision >= this one is in `events` (or not yet happened).
    complete_from: Revision,
    revision: Revision,
}

impl EventHistory {
    /// A history that knows nothing before `revision` (the state was loaded from a snapshot).
    pub fn new(revision: Revision) -> Self {
        let (revision_tx, _) = tokio::sync::watch::channel(revision);
        EventHistory {
            inner: Mutex::new(Inner {
                events: VecDeque::new(),
                bytes: 0,
                complete_from: revision + 1,
                revision,
            }),
            revision_tx,
        }
    }

    /// After a snapshot install: events before it are unknown here.
    pub fn reset(&self, revision: Revision) {
        let mut inner = self.inner.lock().expect("history lock");
        inner.events.clear();
        inner.bytes = 0;
        inner.complete_from = revision + 1;
        inner.revision = revision;
        drop(inner);
        self.revision_tx.send_replace(revision);
    }

    pub fn push(&self, events: Vec<Event>, revision: Revision) {
        let mut inner = self.inner.lock().expect("history lock");
        inner.bytes += events.iter().map(event_bytes).sum::<usize>();
        inner.events.extend(events);
        while inner.events.len() > EVENT_HISTORY_LEN || inner.bytes > EVENT_HISTORY_BYTES {
            let dropped = inner
                .events
                .pop_front()
                .expect("over a limit, so non-empty");
            inner.bytes -= event_bytes(&dropped);
            inner.complete_from = inner.complete_from.max(dropped.revision + 1);
        }
        inner.revision = revision;
        drop(inner);
        self.revision_tx.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.revision_tx.subscribe()
    }

    /// Events with revision >= `from` whose key starts with `prefix`, and the current revision.
    /// `from == 0` means "from the next revision".
    pub fn since(
        &self,
        prefix: &str,
        from: Revision,
        limit: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError> {
        let inner = self.inner.lock().expect("history lock");
        let from = if from == 0 { inner.revision + 1 } else { from };
        if from < inner.complete_from {
            return Err(StoreError::Compacted {
                from,
                oldest: inner.complete_from,
            });
        }
        let start = inner.events.partition_point(|e| e.revision < from);
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        let mut bytes = 0;
        for event in inner.events.range(start..) {
            if out.len() >= limit || bytes >= MAX_ANSWER_BYTES {
                // Never split one revision across two answers.
                if out
                    .last()
                    .is_some_and(|l: &Event| l.revision != event.revision)
                {
                    break;
                }
            }
            if event.kv.key.starts_with(prefix) {
                bytes += event_bytes(event);
                out.push(event.clone());
            }
        }
        Ok((out, inner.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{EventKind, KeyValue};

    fn event(revision: Revision, key: &str) -> Event {
        Event {
            revision,
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.into(),
                value: vec![],
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: None,
            },
            expired_lease: None,
        }
    }

    #[test]
    fn serves_events_from_revision_by_prefix() {
        let h = EventHistory::new(10);
        h.push(vec![event(11, "/a/1"), event(11, "/b/1")], 11);
        h.push(vec![event(12, "/a/2")], 12);
        let (events, rev) = h.since("/a/", 11, 0).unwrap();
        assert_eq!(
            events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![11, 12]
        );
        assert_eq!(rev, 12);
        assert_eq!(h.since("/a/", 0, 0).unwrap().0.len(), 0);
        assert!(matches!(
            h.since("", 10, 0),
            Err(StoreError::Compacted { oldest: 11, .. })
        ));
        h.reset(20);
        assert!(h.since("", 12, 0).is_err());
        assert!(h.since("", 21, 0).unwrap().0.is_empty());
    }

    #[test]
    fn large_values_bound_the_history_by_bytes() {
        let h = EventHistory::new(0);
        let mut big = event(1, "/big");
        big.kv.value = vec![0; EVENT_HISTORY_BYTES / 2];
        h.push(vec![big.clone()], 1);
        big.revision = 2;
        h.push(vec![big.clone()], 2);
        big.revision = 3;
        h.push(vec![big], 3);
        assert!(matches!(
            h.since("", 1, 0),
            Err(StoreError::Compacted { oldest: 3, .. })
        ));
        assert_eq!(h.since("", 3, 0).unwrap().0.len(), 1);
    }
}

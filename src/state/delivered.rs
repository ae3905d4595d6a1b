//! Delivered-event keys: how Tencent's retries are recognised.

use std::collections::{HashMap, VecDeque};

use crate::callback::EventKind;

/// One delivered event: a push or disconnect of one session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub sequence: Box<str>,
    /// `true` for a push, `false` for a disconnect.
    pub push: bool,
}

impl DeliveryKey {
    pub fn new(sequence: &str, kind: EventKind) -> Self {
        DeliveryKey {
            sequence: sequence.into(),
            push: kind == EventKind::Push,
        }
    }

    /// The wire `event_type` this key stands for (how the store writes it).
    pub fn event_type(&self) -> i64 {
        if self.push {
            crate::callback::EVENT_PUSH
        } else {
            crate::callback::EVENT_DISCONNECT
        }
    }
}

/// Keys with their expiry, plus the order they expire in, so purging is proportional to what it
/// removes rather than to everything remembered.
#[derive(Debug, Default)]
pub struct Delivered {
    expiry: HashMap<DeliveryKey, i64>,
    /// Insertion order; with one dedup window for all, that is also expiry order (entries whose
    /// key was removed or re-inserted since are skipped when they come up).
    queue: VecDeque<(i64, DeliveryKey)>,
}

impl Delivered {
    pub fn contains(&self, key: &DeliveryKey, now_ms: i64) -> bool {
        self.expiry.get(key).is_some_and(|e| *e > now_ms)
    }

    pub fn expiry(&self, key: &DeliveryKey) -> Option<i64> {
        self.expiry.get(key).copied()
    }

    pub fn insert(&mut self, key: DeliveryKey, expires_ms: i64) {
        self.queue.push_back((expires_ms, key.clone()));
        self.expiry.insert(key, expires_ms);
    }

    pub fn remove(&mut self, key: &DeliveryKey) {
        self.expiry.remove(key);
    }

    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    /// Forgets every key expired at `now_ms`; returns how many.
    pub fn purge(&mut self, now_ms: i64) -> usize {
        let mut purged = 0;
        while let Some((expires, _)) = self.queue.front() {
            if *expires > now_ms {
                break;
            }
            let (expires, key) = self.queue.pop_front().expect("front exists");
            // Skip entries whose key was undone or delivered again since.
            if self.expiry.get(&key) == Some(&expires) {
                self.expiry.remove(&key);
                purged += 1;
            }
        }
        purged
    }
}

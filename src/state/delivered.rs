//! Delivered-event keys: how Tencent's retries are recognised.

use std::collections::HashMap;

use super::rules::Sequence;
use crate::callback::EventKind;

/// One delivered event: a push or disconnect of one session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub sequence: Sequence,
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

/// Keys with their expiry.
#[derive(Debug, Default)]
pub struct Delivered {
    expiry: HashMap<DeliveryKey, i64>,
}

impl Delivered {
    pub fn contains(&self, key: &DeliveryKey, now_ms: i64) -> bool {
        self.expiry.get(key).is_some_and(|e| *e > now_ms)
    }

    pub fn expiry(&self, key: &DeliveryKey) -> Option<i64> {
        self.expiry.get(key).copied()
    }

    pub fn insert(&mut self, key: DeliveryKey, expires_ms: i64) {
        self.expiry.insert(key, expires_ms);
    }

    pub fn remove(&mut self, key: &DeliveryKey) {
        self.expiry.remove(key);
    }

    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    /// Forgets every key expired at `now_ms`; returns how many. A full pass (a few milliseconds
    /// for a million keys, every few seconds) costs less than keeping a second, ordered copy of
    /// every key in memory.
    pub fn purge(&mut self, now_ms: i64) -> usize {
        let before = self.expiry.len();
        self.expiry.retain(|_, expires| *expires > now_ms);
        if self.expiry.capacity() > 4 * self.expiry.len().max(1024) {
            self.expiry.shrink_to_fit();
        }
        before - self.expiry.len()
    }
}

//! Where the state is kept: one interface, an in-memory and a SQLite implementation.
//!
//! A store only ever sees whole batches ([`Commit`]) and answers for them as one: either every
//! change of the batch is durable or none is, so the ledger can acknowledge or refuse the batch's
//! callbacks together.

mod memory;
mod sqlite;

use std::path::PathBuf;

pub use memory::MemoryStore;
pub use sqlite::{SqliteStore, SyncMode};

use crate::state::{Commit, Snapshot};

/// What a store failure says; the ledger answers 503 and reports it on `/readyz`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot create the folder of {path}: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store is closed: the exporter is stopping")]
    Closed,
    #[error("database {path} is in use by another exporter ({lock} is locked): stop it first, or give each exporter its own --storage.path (replicas share state through --storage.redis-url)")]
    InUse { path: PathBuf, lock: PathBuf },
}

/// The storage interface of the ledger.
pub trait Store: Send {
    /// Everything stored, read once at start.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Makes a batch durable, all or nothing. `now_ms` lets the store drop expired
    /// delivered-event keys as it goes.
    fn write(&mut self, commit: &Commit, now_ms: i64) -> Result<(), StoreError>;
    /// Deletes delivered-event keys expired at `now_ms`.
    fn purge(&mut self, now_ms: i64) -> Result<(), StoreError>;
    /// The store's own metrics for `/metrics` (SQLite: the WAL's size and failed checkpoints).
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        Vec::new()
    }
    /// Everything stored, read anew, with nothing taken from what the store kept in memory: for
    /// after a batch panicked midway, when memory may hold changes the database does not.
    /// `None` for a store that keeps nothing beyond the ledger's memory.
    fn reload(&mut self) -> Option<Result<Snapshot, StoreError>> {
        None
    }
    /// Brings the stored delivered-event keys' expiry down to `until_ms` at most, at start and
    /// before each purge: keys written under a longer dedup window, or under a clock that was
    /// ahead, would otherwise outlive the keys written after them and hold up their deletion,
    /// which goes from the oldest on (the table grew with every event meanwhile). Called every
    /// few seconds, so it must cost next to nothing when there is nothing to bring down.
    fn cap_expiry(&mut self, _until_ms: i64) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What the ledger holds once it has stored everything and stopped: nothing more is written.
pub struct Closed;

impl Store for Closed {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Err(StoreError::Closed)
    }
    fn write(&mut self, _: &Commit, _: i64) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn purge(&mut self, _: i64) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
}

/// `--storage.path` value that selects the in-memory store.
pub const MEMORY: &str = ":memory:";

/// Opens the store a `--storage.path` names.
pub fn open(path: &str, sync: SyncMode) -> Result<Box<dyn Store>, StoreError> {
    if path == MEMORY {
        return Ok(Box::new(MemoryStore));
    }
    Ok(Box::new(SqliteStore::open(PathBuf::from(path), sync)?))
}

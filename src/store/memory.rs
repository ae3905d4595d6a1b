//! The in-memory store: the state lives only in the ledger's memory and dies with the process.

use super::{Store, StoreError};
use crate::state::{Commit, Snapshot};

/// For throwaway runs and tests (`--storage.path :memory:`).
#[derive(Debug, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }

    fn write(&mut self, _: &Commit, _: i64) -> Result<(), StoreError> {
        Ok(())
    }

    fn purge(&mut self, _: i64) -> Result<(), StoreError> {
        Ok(())
    }
}

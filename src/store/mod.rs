//! Lease stores: where leases live, and how each command is applied atomically.
//!
//! A store holds one [`LeaseRecord`] per election, applies the lease engine's [`decide`] to it
//! atomically, and announces every change on a broadcast channel so `Observe` streams (on any
//! agent replica sharing the store) hear about it. The rules themselves are never re-implemented
//! here: a store only stores.
//!
//! [`LeaseRecord`]: crate::lease::LeaseRecord
//! [`decide`]: crate::lease::decide

mod memory;
pub mod redis;

use std::future::Future;

use tokio::sync::broadcast;

pub use memory::MemoryStore;
pub use redis::RedisStore;

use crate::lease::{ChangeCause, Command, ElectionKey, LeaderInfo, Name, Outcome};

/// Why a store could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backing servers could not be reached, or not enough of them agreed, in time.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

/// A change of leadership of one election, as announced to observers (renewals are not).
#[derive(Debug, Clone)]
pub struct LeaseChange {
    /// The election that changed.
    pub election: ElectionKey,
    /// What happened.
    pub cause: ChangeCause,
    /// The leader after the change; for [`ChangeCause::Resigned`], the one who resigned
    /// (with `ttl_ms` 0).
    pub leader: LeaderInfo,
}

/// The interface every backend implements; see the module documentation.
pub trait LeaseStore: Send + Sync {
    /// Applies `command` to `election` atomically and returns what it achieved.
    fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> impl Future<Output = Result<Outcome, StoreError>> + Send;

    /// The live leader of `election`, if any.
    fn leader(
        &self,
        election: &ElectionKey,
    ) -> impl Future<Output = Result<Option<LeaderInfo>, StoreError>> + Send;

    /// The live leaders of every election of `kind`, sorted by election name.
    fn leaders(
        &self,
        kind: &Name,
    ) -> impl Future<Output = Result<Vec<(Name, LeaderInfo)>, StoreError>> + Send;

    /// A receiver of every lease change made from now on.
    fn subscribe(&self) -> broadcast::Receiver<LeaseChange>;

    /// Succeeds when the store can serve requests right now (readiness).
    fn check(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store the agent was configured with.
///
/// An enum rather than a trait object: calls are dispatched statically, with no boxed future per
/// request on the hot path.
pub enum Store {
    /// The embedded, in-process store.
    Memory(MemoryStore),
    /// Redis: one server, a Redlock quorum, Sentinel or Cluster.
    Redis(RedisStore),
}

impl LeaseStore for Store {
    async fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> Result<Outcome, StoreError> {
        match self {
            Store::Memory(store) => store.execute(election, command).await,
            Store::Redis(store) => store.execute(election, command).await,
        }
    }

    async fn leader(&self, election: &ElectionKey) -> Result<Option<LeaderInfo>, StoreError> {
        match self {
            Store::Memory(store) => store.leader(election).await,
            Store::Redis(store) => store.leader(election).await,
        }
    }

    async fn leaders(&self, kind: &Name) -> Result<Vec<(Name, LeaderInfo)>, StoreError> {
        match self {
            Store::Memory(store) => store.leaders(kind).await,
            Store::Redis(store) => store.leaders(kind).await,
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<LeaseChange> {
        match self {
            Store::Memory(store) => store.subscribe(),
            Store::Redis(store) => store.subscribe(),
        }
    }

    async fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(store) => store.check().await,
            Store::Redis(store) => store.check().await,
        }
    }
}

#[cfg(test)]
pub(crate) mod contract;
#[cfg(test)]
pub(crate) mod faults;
#[cfg(test)]
pub(crate) mod safety;
#[cfg(test)]
pub(crate) mod servers;

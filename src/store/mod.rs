//! Lease stores: where leases live, and how each command is applied atomically.
//!
//! A store holds one [`LeaseRecord`] per election, applies the lease engine's [`decide`] to it
//! atomically, and announces every change on a broadcast channel so `Observe` streams (on any
//! agent replica sharing the store) hear about it. The rules themselves are never re-implemented
//! here: a store only stores.
//!
//! Announcements can be late, repeated or lost (a Redis subscription that dropped). Each carries a
//! [`Version`], so a listener ignores anything not newer than what it has; and whenever a store
//! cannot vouch that nothing was lost, it says so with [`StoreEvent::Resync`], after which a
//! listener reads the elections it follows again.
//!
//! [`LeaseRecord`]: crate::lease::LeaseRecord
//! [`decide`]: crate::lease::decide

mod memory;
pub mod redis;

use std::future::Future;

use tokio::sync::broadcast;

pub use memory::MemoryStore;
pub use redis::RedisStore;

use crate::lease::{
    ChangeCause, Command, ElectionKey, LeaderInfo, Leadership, Name, Outcome, Version,
};

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

impl LeaseChange {
    /// Its place in the election's history: a resignation ends the lease of its token, every
    /// other change starts the lease of its token.
    pub fn version(&self) -> Version {
        match self.cause {
            ChangeCause::Resigned => Version::ended(self.leader.token),
            _ => Version::leading(self.leader.token),
        }
    }
}

/// What a store's listeners hear.
#[derive(Debug, Clone)]
pub enum StoreEvent {
    /// Leadership of one election changed.
    Changed(LeaseChange),
    /// Changes may have been missed (a subscription to the store was lost and made again):
    /// whoever follows an election should read it again.
    Resync,
}

/// The interface every backend implements; see the module documentation.
pub trait LeaseStore: Send + Sync {
    /// Applies `command` to `election` atomically and returns what it achieved.
    fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> impl Future<Output = Result<Outcome, StoreError>> + Send;

    /// The live leader of `election`, if any, and the token of its last lease.
    fn leadership(
        &self,
        election: &ElectionKey,
    ) -> impl Future<Output = Result<Leadership, StoreError>> + Send;

    /// The live leaders of every election of `kind`, sorted by election name.
    fn leaders(
        &self,
        kind: &Name,
    ) -> impl Future<Output = Result<Vec<(Name, LeaderInfo)>, StoreError>> + Send;

    /// A receiver of every lease change made from now on, and of resynchronisation signals.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;

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

impl Store {
    /// Forgets what is no longer needed — records of leases that ended a retention ago (memory
    /// store), elections not announced for a while (Redis) — off the request path; says how many
    /// entries that removed. Call it every few seconds.
    pub fn housekeep(&self) -> usize {
        match self {
            Store::Memory(store) => store.housekeep(),
            Store::Redis(store) => store.housekeep(),
        }
    }
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

    async fn leadership(&self, election: &ElectionKey) -> Result<Leadership, StoreError> {
        match self {
            Store::Memory(store) => store.leadership(election).await,
            Store::Redis(store) => store.leadership(election).await,
        }
    }

    async fn leaders(&self, kind: &Name) -> Result<Vec<(Name, LeaderInfo)>, StoreError> {
        match self {
            Store::Memory(store) => store.leaders(kind).await,
            Store::Redis(store) => store.leaders(kind).await,
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
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

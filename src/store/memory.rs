//! The `memory` store: leases in this process, for a single replica, tests and the quick start.
//!
//! Time comes from the monotonic clock, so wall-clock jumps never lengthen or shorten a term.
//! Records are kept after their lease ends, because the fencing token must keep increasing.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use tokio::sync::broadcast;

use super::{LeaseChange, LeaseStore, StoreError, StoreEvent};
use crate::lease::{
    ChangeCause, Command, ElectionKey, FencingToken, LeaderInfo, Leadership, LeaseRecord, Name,
    Outcome, decide,
};

/// How many changes an observer may fall behind before it resynchronises from the store.
const CHANGE_BUFFER: usize = 1024;

/// Leases held in memory; see the module documentation.
pub struct MemoryStore {
    origin: Instant,
    /// Records by kind, then by election, so listing a kind does not scan the others.
    records: Mutex<HashMap<Name, HashMap<Name, LeaseRecord>>>,
    changes: broadcast::Sender<StoreEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            records: Mutex::default(),
            changes: broadcast::channel(CHANGE_BUFFER).0,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Name, HashMap<Name, LeaseRecord>>> {
        // Nothing panics while holding the lock, and every write is a whole record: a poisoned
        // map is still consistent.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LeaseStore for MemoryStore {
    async fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> Result<Outcome, StoreError> {
        let now = self.now();
        let mut records = self.records();
        let record = records
            .entry(election.kind.clone())
            .or_default()
            .entry(election.election.clone())
            .or_default();
        // Records are never lost or removed here, so the next number is always above every
        // token issued: no clock is needed as a floor.
        let decision = decide(record, &command, now, FencingToken(0));
        if let Some(next) = decision.next {
            let previous = std::mem::replace(record, next);
            if let Some(cause) = decision.change {
                let leader = match cause {
                    ChangeCause::Resigned => previous.lease.map(|lease| LeaderInfo {
                        leader: lease.holder,
                        token: previous.token,
                        ttl_ms: 0,
                    }),
                    _ => record.leader(now),
                };
                // Renewals are not announced (as by every store): the leader did not change,
                // and observers confirm a lease with a read when its term runs out.
                if let (Some(leader), false) = (leader, cause == ChangeCause::Renewed) {
                    // Sent under the lock, so observers see changes in the order they were made.
                    // An error only means nobody is observing.
                    let _ = self.changes.send(StoreEvent::Changed(LeaseChange {
                        election: election.clone(),
                        cause,
                        leader,
                    }));
                }
            }
        }
        Ok(decision.outcome)
    }

    async fn leadership(&self, election: &ElectionKey) -> Result<Leadership, StoreError> {
        let now = self.now();
        Ok(self
            .records()
            .get(&election.kind)
            .and_then(|elections| elections.get(&election.election))
            .map(|record| record.leadership(now))
            .unwrap_or_default())
    }

    async fn leaders(&self, kind: &Name) -> Result<Vec<(Name, LeaderInfo)>, StoreError> {
        let now = self.now();
        let mut leaders: Vec<_> = self
            .records()
            .get(kind)
            .into_iter()
            .flatten()
            .filter_map(|(election, record)| Some((election.clone(), record.leader(now)?)))
            .collect();
        leaders.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(leaders)
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.changes.subscribe()
    }

    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_meets_the_lease_store_contract() {
        super::super::contract::run(&MemoryStore::new()).await;
    }
}

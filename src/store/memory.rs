//! The `memory` store: leases in this process, for a single replica, tests and the quick start.
//!
//! Time comes from the monotonic clock, so wall-clock jumps never lengthen or shorten a term.
//! A record is removed once its lease ended at least a retention period ago, so the store holds
//! the elections in use, not every name ever sent. Fencing tokens still only increase: a new
//! lease's token is above the highest token of every record removed so far.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

use super::{LeaseChange, LeaseStore, StoreError, StoreEvent};
use crate::lease::{
    ChangeCause, Command, ElectionKey, FencingToken, LeaderInfo, Leadership, LeaseRecord, Name,
    Outcome, decide,
};

/// How many changes an observer may fall behind before it resynchronises from the store.
const CHANGE_BUFFER: usize = 1024;
/// How often, at most, records are looked through for ones to remove.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Leases held in memory; see the module documentation.
pub struct MemoryStore {
    origin: Instant,
    /// How long a record is kept after its lease ended, in ms.
    retention_ms: u64,
    state: Mutex<State>,
    changes: broadcast::Sender<StoreEvent>,
}

#[derive(Default)]
struct State {
    /// Records by kind, so listing a kind does not scan the others.
    kinds: HashMap<Name, Kind>,
    /// The highest token of any record removed so far: new leases get a higher one.
    retired: FencingToken,
    /// When to look for records to remove next (ms since `origin`).
    next_sweep: u64,
}

/// The records of one kind.
#[derive(Default)]
struct Kind {
    /// By election.
    records: HashMap<Name, Entry>,
    /// The leases as last written, by expiry — some may have ended since: a listing reads the
    /// live ones, not every record of the kind. Each write forgets a few ended ones, a listing
    /// and housekeeping the rest (as `lease.lua` and `live.lua` keep the Redis index).
    live: BTreeSet<(u64, Name)>,
}

/// How many ended leases each write forgets from its kind's index.
const FORGET_PER_WRITE: usize = 8;

/// Forgets up to `limit` leases of a kind's index that ended by `now`.
fn forget_ended(live: &mut BTreeSet<(u64, Name)>, now: u64, limit: usize) {
    for _ in 0..limit {
        match live.first() {
            Some((expires_at, _)) if *expires_at <= now => live.pop_first(),
            _ => break,
        };
    }
}

struct Entry {
    record: LeaseRecord,
    /// When the record last changed (ms since `origin`).
    changed: u64,
}

impl Entry {
    /// Whether the record's lease ended (or it never had one) at least `retention_ms` ago.
    fn expired(&self, now: u64, retention_ms: u64) -> bool {
        let ended = self
            .record
            .lease
            .as_ref()
            .map_or(self.changed, |lease| lease.expires_at.max(self.changed));
        now >= ended.saturating_add(retention_ms)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_retention(Duration::from_secs(86_400))
    }
}

impl MemoryStore {
    /// An empty store keeping records a day after their lease ended.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping records `retention` after their lease ended.
    pub fn with_retention(retention: Duration) -> Self {
        Self {
            origin: Instant::now(),
            retention_ms: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
            state: Mutex::default(),
            changes: broadcast::channel(CHANGE_BUFFER).0,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock, and every write is a whole record: a poisoned
        // map is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes the records whose lease ended a retention ago — a pass over the records at most
    /// every half retention (and every minute), off the request path; says how many it removed.
    pub fn housekeep(&self) -> usize {
        let now = self.now();
        let mut state = self.state();
        if now < state.next_sweep {
            return 0;
        }
        let interval = u64::try_from(MAX_SWEEP_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        state.next_sweep = now + (self.retention_ms / 2).clamp(1, interval);
        let State { kinds, retired, .. } = &mut *state;
        let mut removed = 0;
        kinds.retain(|_, kind| {
            kind.records.retain(|_, entry| {
                let remove = entry.expired(now, self.retention_ms);
                if remove {
                    *retired = (*retired).max(entry.record.token);
                    removed += 1;
                }
                !remove
            });
            // A burst of names must not keep its table after the names are gone.
            if kind.records.len() < kind.records.capacity() / 4 {
                kind.records.shrink_to_fit();
            }
            forget_ended(&mut kind.live, now, usize::MAX);
            !kind.records.is_empty()
        });
        if kinds.len() < kinds.capacity() / 4 {
            kinds.shrink_to_fit();
        }
        removed
    }

    /// How many records the store holds (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state()
            .kinds
            .values()
            .map(|kind| kind.records.len())
            .sum()
    }
}

impl LeaseStore for MemoryStore {
    async fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> Result<Outcome, StoreError> {
        let now = self.now();
        let mut state = self.state();
        let floor = FencingToken(state.retired.0 + 1);
        let kind = state.kinds.entry(election.kind.clone()).or_default();
        let entry = kind
            .records
            .entry(election.election.clone())
            .or_insert_with(|| Entry {
                record: LeaseRecord::default(),
                changed: now,
            });
        let decision = decide(&entry.record, &command, now, floor);
        if let Some(next) = decision.next {
            entry.changed = now;
            let previous = std::mem::replace(&mut entry.record, next);
            let record = &entry.record;
            let expiry = |record: &LeaseRecord| record.lease.as_ref().map(|lease| lease.expires_at);
            if expiry(&previous) != expiry(record) {
                if let Some(expires_at) = expiry(&previous) {
                    kind.live.remove(&(expires_at, election.election.clone()));
                }
                if let Some(expires_at) = expiry(record).filter(|at| *at > now) {
                    kind.live.insert((expires_at, election.election.clone()));
                }
            }
            forget_ended(&mut kind.live, now, FORGET_PER_WRITE);
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
            .state()
            .kinds
            .get(&election.kind)
            .and_then(|kind| kind.records.get(&election.election))
            .map(|entry| entry.record.leadership(now))
            .unwrap_or_default())
    }

    async fn leaders(&self, kind: &Name) -> Result<Vec<(Name, LeaderInfo)>, StoreError> {
        let now = self.now();
        let mut state = self.state();
        let Some(kind) = state.kinds.get_mut(kind) else {
            return Ok(Vec::new());
        };
        forget_ended(&mut kind.live, now, usize::MAX);
        let mut leaders: Vec<_> = kind
            .live
            .iter()
            .filter_map(|(_, election)| {
                let leader = kind.records.get(election)?.record.leader(now)?;
                Some((election.clone(), leader))
            })
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

    /// A listing costs the live leases of the kind, not every record ever written in it.
    #[tokio::test]
    async fn a_listing_reads_the_live_leases_not_every_record_of_the_kind() {
        let store = MemoryStore::new();
        let key = |name: &str| ElectionKey {
            kind: Name::parse("t", "flood").unwrap(),
            election: Name::parse("t", name).unwrap(),
        };
        let campaign = |term| Command::Campaign {
            candidate: Name::parse("t", "c").unwrap(),
            term: crate::lease::Term::from_millis(term),
        };
        for i in 0..1_000 {
            store
                .execute(&key(&format!("e{i}")), campaign(100))
                .await
                .unwrap();
        }
        store.execute(&key("live"), campaign(60_000)).await.unwrap();
        assert_eq!(store.leaders(&key("x").kind).await.unwrap().len(), 1_001);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let leaders = store.leaders(&key("x").kind).await.unwrap();
        assert_eq!(leaders.len(), 1);
        assert_eq!(leaders[0].0.as_str(), "live");
        let state = store.state();
        let kind = &state.kinds[&key("x").kind];
        assert_eq!(kind.records.len(), 1_001, "records stay for the retention");
        assert_eq!(kind.live.len(), 1, "the next listing reads one record");
    }

    /// Any client can send any number of election names: records of ended leases go after the
    /// retention, and a name used again gets a token above the one it had.
    #[tokio::test]
    async fn records_of_ended_leases_are_removed_after_the_retention_and_tokens_still_rise() {
        let store = MemoryStore::with_retention(Duration::from_millis(300));
        let election = |i: usize| ElectionKey {
            kind: Name::parse("t", "flood").unwrap(),
            election: Name::parse("t", &format!("e{i}")).unwrap(),
        };
        let campaign = |term| Command::Campaign {
            candidate: Name::parse("t", "c").unwrap(),
            term: crate::lease::Term::from_millis(term),
        };
        let mut tokens = Vec::new();
        for i in 0..1_000 {
            match store.execute(&election(i), campaign(100)).await.unwrap() {
                Outcome::Leading { token } => tokens.push(token),
                other => panic!("{other:?}"),
            }
        }
        let live = ElectionKey {
            kind: Name::parse("t", "flood").unwrap(),
            election: Name::parse("t", "live").unwrap(),
        };
        store.execute(&live, campaign(60_000)).await.unwrap();
        assert_eq!(store.len(), 1_001);

        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(store.housekeep(), 1_000);
        assert_eq!(store.len(), 1, "only the live lease's record is left");
        let again = match store.execute(&election(7), campaign(100)).await.unwrap() {
            Outcome::Leading { token } => token,
            other => panic!("{other:?}"),
        };
        assert_eq!(store.len(), 2, "the live lease and the new one");
        assert!(
            again > *tokens.iter().max().unwrap(),
            "{again:?} after {:?}",
            tokens[7]
        );
    }
}

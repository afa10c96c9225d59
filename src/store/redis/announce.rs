//! Announcements of leadership changes across agent replicas.
//!
//! Changes are published on `[prefix]/events`: with one server (single, Sentinel, Cluster) by
//! `lease.lua` itself, in the same step as the change, so every agent hears the changes of an
//! election in the order they were made; with Redlock, which has no such order, by the agent
//! that decided the change, on every server, after telling its own observers. Every agent
//! subscribes on every server, so each hears a change (N times with Redlock, and its own once
//! more as an echo). Every change carries its
//! [`Version`](crate::lease::Version): an agent passes on only a change newer than the last it
//! passed on for that election — never an echo, a copy or a late message of an older state.
//!
//! Messages published while a subscription is down are lost. So whenever a subscription is made
//! (again), or `rustis` dropped messages for a subscriber that fell behind, the agent cannot vouch
//! that it heard everything and signals [`StoreEvent::Resync`]: whoever follows an election reads
//! it again. A subscription that stops answering a heartbeat is replaced — a connection can hang
//! without failing, and a Cluster subscription must move off a master that died.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::sync::broadcast::{self, error::RecvError};

use super::Shared;
use crate::{
    lease::{ChangeCause, ElectionKey, FencingToken, LeaderInfo, Name, Version},
    store::{LeaseChange, StoreEvent},
};

/// How many events a listener may fall behind before it is told it lagged (and resynchronises).
const EVENT_BUFFER: usize = 1024;
/// How long a lost subscription waits before subscribing again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);
/// How often a subscription's connection must answer PING to be kept.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long the version last passed on for an election is remembered after it was: longer than
/// any copy or echo of a message takes to arrive. Forgetting it costs nothing else, as every
/// Observe stream also drops what is not newer than what it reported.
const REMEMBER_ANNOUNCED: Duration = Duration::from_secs(60);

/// Tells this agent's listeners about changes, each once and in version order.
pub(crate) struct Announcer {
    channel: Arc<str>,
    events: broadcast::Sender<StoreEvent>,
    /// The version of the last change passed on, per election, and when.
    announced: Mutex<Announced>,
}

/// What an [`Announcer`] remembers: elections changed within [`REMEMBER_ANNOUNCED`], so the map
/// holds the elections in use, not every name ever announced.
#[derive(Default)]
struct Announced {
    /// By the election's [`Fingerprint`]: an entry holds no name, so a burst of names leaves no
    /// small allocations behind once the table is gone.
    versions: HashMap<u128, (Version, Instant)>,
    fingerprint: Fingerprint,
}

/// A 128-bit keyed hash of an election: two elections share one only with a probability of
/// about 2⁻¹²⁸ per pair, far below that of a memory error.
#[derive(Default)]
struct Fingerprint(RandomState, RandomState);

impl Fingerprint {
    fn of(&self, election: &ElectionKey) -> u128 {
        u128::from(self.0.hash_one(election)) << 64 | u128::from(self.1.hash_one(election))
    }
}

impl Announcer {
    /// An announcer publishing on `[prefix]/events`.
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            channel: format!("{prefix}/events").into(),
            events: broadcast::channel(EVENT_BUFFER).0,
            announced: Mutex::default(),
        }
    }

    /// The Redis channel changes are published on.
    pub(crate) fn channel(&self) -> &Arc<str> {
        &self.channel
    }

    /// A receiver of every event from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    fn announced(&self) -> std::sync::MutexGuard<'_, Announced> {
        self.announced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Passes `change` on to this agent's listeners if it is newer than the last change passed on
    /// for its election; says whether it was.
    pub(crate) fn announce(&self, change: LeaseChange) -> bool {
        let version = change.version();
        let mut announced = self.announced();
        let fingerprint = announced.fingerprint.of(&change.election);
        match announced.versions.entry(fingerprint) {
            Entry::Occupied(last) if last.get().0 >= version => return false,
            Entry::Occupied(mut last) => {
                last.insert((version, Instant::now()));
            }
            Entry::Vacant(last) => {
                last.insert((version, Instant::now()));
            }
        }
        // Sent under the lock, so listeners hear changes in version order. An error only means
        // nobody is listening.
        let _ = self.events.send(StoreEvent::Changed(change));
        true
    }

    /// Forgets the elections not announced for [`REMEMBER_ANNOUNCED`]; says how many.
    pub(crate) fn prune(&self) -> usize {
        let now = Instant::now();
        let versions = &mut self.announced().versions;
        let before = versions.len();
        versions.retain(|_, (_, at)| now.duration_since(*at) < REMEMBER_ANNOUNCED);
        // A burst of names must not keep its table after the names are gone.
        if versions.len() < versions.capacity() / 4 {
            versions.shrink_to_fit();
        }
        before - versions.len()
    }

    /// Tells listeners that changes may have been missed.
    pub(crate) fn resync(&self) {
        let _ = self.events.send(StoreEvent::Resync);
    }
}

/// Keeps a subscription to the change channel on node `index`, forever.
pub(super) async fn listen(shared: Arc<Shared>, index: usize) {
    let node = &shared.nodes[index];
    let announcer = &shared.announcer;
    loop {
        match node.subscribe(announcer.channel()).await {
            Ok((client, mut messages)) => {
                let mut reconnected = client.on_reconnect();
                // Whatever was published before this subscription took effect was not heard.
                announcer.resync();
                let mut dropped = 0;
                let mut heartbeat = tokio::time::interval(HEARTBEAT);
                heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                heartbeat.tick().await;
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(Ok(message)) = message else { break };
                            match message.payload_as::<String>().ok().as_deref().and_then(decode) {
                                Some(change) => {
                                    announcer.announce(change);
                                }
                                None => tracing::warn!(
                                    node = node.label(),
                                    "ignoring a malformed lease change message"
                                ),
                            }
                            if messages.dropped_messages() > dropped {
                                dropped = messages.dropped_messages();
                                announcer.resync();
                            }
                        }
                        reconnect = reconnected.recv() => match reconnect {
                            // `rustis` connected again and subscribed anew: messages published
                            // meanwhile are lost.
                            Ok(()) | Err(RecvError::Lagged(_)) => announcer.resync(),
                            Err(RecvError::Closed) => break,
                        },
                        _ = heartbeat.tick() => {
                            if let Err(err) = node.ping_client(&client).await {
                                tracing::debug!(
                                    node = node.label(), error = %err,
                                    "change subscription does not answer; subscribing again"
                                );
                                break;
                            }
                        }
                    }
                }
                tracing::debug!(
                    node = node.label(),
                    "change subscription ended; subscribing again"
                );
            }
            Err(err) => tracing::debug!(error = %err, "cannot subscribe to lease changes yet"),
        }
        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
    }
}

fn cause_name(cause: ChangeCause) -> &'static str {
    match cause {
        ChangeCause::Elected => "elected",
        ChangeCause::Renewed => "renewed",
        ChangeCause::HandedOver => "handed_over",
        ChangeCause::Resigned => "resigned",
    }
}

/// The message published for a change: `<cause> <token> <ttl_ms> <kind> <name> <leader>`
/// (names never contain spaces). The version follows from the cause and the token, so agents of
/// the previous release, which send and read this same format, interoperate.
pub(crate) fn encode(change: &LeaseChange) -> String {
    format!(
        "{} {} {} {} {} {}",
        cause_name(change.cause),
        change.leader.token,
        change.leader.ttl_ms,
        change.election.kind,
        change.election.election,
        change.leader.leader
    )
}

/// The change a message describes, if it is well formed.
pub(crate) fn decode(message: &str) -> Option<LeaseChange> {
    let mut parts = message.split(' ');
    let cause = match parts.next()? {
        "elected" => ChangeCause::Elected,
        "renewed" => ChangeCause::Renewed,
        "handed_over" => ChangeCause::HandedOver,
        "resigned" => ChangeCause::Resigned,
        _ => return None,
    };
    let token = FencingToken(parts.next()?.parse().ok()?);
    let ttl_ms = parts.next()?.parse().ok()?;
    let kind = Name::parse("kind", parts.next()?).ok()?;
    let election = Name::parse("election", parts.next()?).ok()?;
    let leader = Name::parse("leader", parts.next()?).ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(LeaseChange {
        election: ElectionKey { kind, election },
        cause,
        leader: LeaderInfo {
            leader,
            token,
            ttl_ms,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(cause: ChangeCause, token: u64) -> LeaseChange {
        let name = |s| Name::parse("test", s).unwrap();
        LeaseChange {
            election: ElectionKey {
                kind: name("k"),
                election: name("e/1"),
            },
            cause,
            leader: LeaderInfo {
                leader: name("a@zone"),
                token: FencingToken(token),
                ttl_ms: 5_000,
            },
        }
    }

    #[test]
    fn messages_survive_encoding_and_refuse_garbage() {
        let sent = change(ChangeCause::HandedOver, 7);
        let received = decode(&encode(&sent)).unwrap();
        assert_eq!(
            (
                received.cause,
                received.leader.clone(),
                received.election.clone(),
                received.version()
            ),
            (sent.cause, sent.leader, sent.election, Version(14))
        );
        for bad in [
            "",
            "elected",
            "elected x 1 k e a",
            "won 1 1 k e a",
            "elected 1 1 k e a extra",
            "elected 1 1 k e a*",
        ] {
            assert!(decode(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn only_changes_newer_than_the_last_announced_are_passed_on() {
        let announcer = Announcer::new("test");
        let mut events = announcer.subscribe();
        assert!(announcer.announce(change(ChangeCause::Elected, 3)));
        assert!(
            !announcer.announce(change(ChangeCause::Elected, 3)),
            "an echo or a Redlock copy"
        );
        assert!(announcer.announce(change(ChangeCause::Resigned, 3)));
        assert!(
            !announcer.announce(change(ChangeCause::Elected, 3)),
            "a late message of an older state"
        );
        assert!(!announcer.announce(change(ChangeCause::HandedOver, 2)));
        assert!(announcer.announce(change(ChangeCause::HandedOver, 4)));
        let mut versions = Vec::new();
        while let Ok(StoreEvent::Changed(change)) = events.try_recv() {
            versions.push(change.version().0);
        }
        assert_eq!(versions, [6, 7, 8]);
    }

    #[test]
    fn elections_not_announced_for_a_while_are_forgotten() {
        let announcer = Announcer::new("test");
        for name in 0..1000 {
            let mut change = change(ChangeCause::Elected, 3);
            change.election.election = Name::parse("test", &format!("e{name}")).unwrap();
            assert!(announcer.announce(change));
        }
        assert_eq!(announcer.prune(), 0, "nothing is old enough yet");
        assert_eq!(announcer.announced().versions.len(), 1000);
        let long_ago = Instant::now() - REMEMBER_ANNOUNCED - Duration::from_secs(1);
        for (_, at) in announcer.announced().versions.values_mut() {
            *at = long_ago;
        }
        assert!(announcer.announce(change(ChangeCause::Elected, 3)));
        assert_eq!(announcer.prune(), 1000);
        let announced = announcer.announced();
        assert_eq!(
            announced.versions.len(),
            1,
            "only the election just announced"
        );
        assert!(
            announced.versions.capacity() < 100,
            "the burst's table is given back"
        );
    }
}

//! The election service: what every adapter (gRPC, HTTP, later the controller) calls.
//!
//! It validates raw request values into lease-engine types, runs commands on the lease store,
//! records metrics, and turns outcomes into results or [`ElectionError`]s. Adapters only translate
//! their wire formats to these calls and map [`ElectionError`] to their status codes, each in one
//! function.

use std::{sync::Arc, time::Duration};

use futures::Stream;
use tokio::{sync::broadcast::error::RecvError, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    discovery::{Discovery, DiscoveryError, PodList},
    lease::{
        ChangeCause, Command, ElectionKey, Expected, FencingToken, InvalidArgument, LeaderInfo,
        Leadership, Name, Outcome, Term, TermBounds, Version,
    },
    metrics::{Action, Metrics},
    store::{LeaseStore, Store, StoreError, StoreEvent},
};

/// Most retries an ExtendElectedTerm request may ask for.
pub const MAX_RETRIES: u64 = 10;
/// Longest pause between retries an ExtendElectedTerm request may ask for, in milliseconds.
pub const MAX_RETRY_INTERVAL_MS: u64 = 1_000;

/// How often an Observe stream of an election without a leader reads it again, in case an
/// announcement was lost without a trace (an agent that died between its write and its
/// announcement). Streams of a led election read it when its term runs out.
const IDLE_RECHECK: Duration = Duration::from_secs(10);
/// How soon an Observe stream tries again after a read failed (the store is unavailable): this,
/// doubling after each further failure up to [`MAX_RECHECK_AFTER_FAILURE`].
const RECHECK_AFTER_FAILURE: Duration = Duration::from_millis(100);
/// The longest an Observe stream waits between reads while the store stays unavailable.
const MAX_RECHECK_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// A request field is invalid; the message names it.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
    /// The election has no live leader (GetLeader, ExtendElectedTerm).
    #[error("election {election} has no leader")]
    NoLeader {
        /// The election.
        election: ElectionKey,
    },
    /// ExtendElectedTerm by a candidate while another one leads.
    #[error("election {election} is led by {holder}, not {caller}")]
    HeldByOther {
        /// The election.
        election: ElectionKey,
        /// Its leader.
        holder: Name,
        /// Who asked.
        caller: Name,
    },
    /// Resign by a candidate while another one leads (NOT_FOUND, as the Go service answers).
    #[error("{caller} is not the leader of election {election} ({holder} is)")]
    NotLeader {
        /// The election.
        election: ElectionKey,
        /// Its leader.
        holder: Name,
        /// Who asked.
        caller: Name,
    },
    /// A conditional Handover over a lease that is not the live one (FAILED_PRECONDITION / 409).
    #[error("election {election} is not led as the handover expects; {}", match holder {
        Some(holder) => format!("{holder} leads it"),
        None => "nobody leads it".to_owned(),
    })]
    NotAsExpected {
        /// The election.
        election: ElectionKey,
        /// Its live leader.
        holder: Option<Name>,
    },
    /// The lease store could not answer.
    #[error(transparent)]
    Unavailable(#[from] StoreError),
    /// The feature is not available in this agent.
    #[error("{0}")]
    Unimplemented(&'static str),
    /// Kubernetes discovery could not answer.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// The result of a campaign: elected or not, and who leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaigned {
    /// Whether the candidate leads now.
    pub elected: bool,
    /// Who leads (the candidate when elected).
    pub leader: Name,
    /// The election's kind.
    pub kind: Name,
    /// The leader's fencing token.
    pub token: FencingToken,
}

/// What an Observe stream reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Who leads right now, as read from the store: the first event of every stream, and a
    /// resynchronisation whenever the stream may have missed changes (it fell behind, or the
    /// agent's subscription to the store was lost) — what happened in between is not replayed.
    Current,
    /// A candidate took an election that had no live leader.
    Elected,
    /// Handover made a candidate the leader.
    HandedOver,
    /// The leader resigned.
    Resigned,
    /// The leader's term ran out.
    Expired,
}

/// One event of an Observe stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderEvent {
    /// What happened.
    pub kind: EventKind,
    /// The election.
    pub election: ElectionKey,
    /// The leader after the event; for Resigned and Expired, the one who stopped leading;
    /// `None` for Current when nobody leads.
    pub leader: Option<Name>,
    /// The fencing token of that leader's lease (0 when nobody leads).
    pub token: FencingToken,
    /// Where this state stands in the election's history: strictly increasing along a stream.
    pub version: Version,
}

/// The election service; cheap to clone (one `Arc` inside).
#[derive(Clone)]
pub struct ElectionService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    discovery: Option<Discovery>,
    terms: TermBounds,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl ElectionService {
    /// A service over `store` and, when Kubernetes features are on, `discovery`; `shutdown`
    /// ends Observe streams when cancelled.
    pub fn new(
        store: Store,
        discovery: Option<Discovery>,
        terms: TermBounds,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                discovery,
                terms,
                metrics,
                shutdown,
            }),
        }
    }

    /// The terms a request may ask for.
    pub fn term_bounds(&self) -> TermBounds {
        self.inner.terms
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Kubernetes discovery, when Kubernetes features are on.
    pub fn discovery(&self) -> Option<&Discovery> {
        self.inner.discovery.as_ref()
    }

    /// Every lease change made from now on, by this agent or (through the store) any other, and
    /// a [`StoreEvent::Resync`] whenever some may have been missed.
    pub fn lease_changes(&self) -> tokio::sync::broadcast::Receiver<StoreEvent> {
        self.inner.store.subscribe()
    }

    /// The typed core: commands on validated elections, names and terms, with no request
    /// metrics — what the controller calls. The request methods below validate a request's
    /// strings, then call it, timed as client requests.
    pub fn leases(&self) -> Leases<'_> {
        Leases {
            store: &self.inner.store,
        }
    }

    /// `term_ms` as a term within the agent's bounds (`field` names it in the error).
    pub fn term(&self, field: &'static str, term_ms: i64) -> Result<Term, InvalidArgument> {
        self.inner.terms.parse(field, term_ms)
    }

    /// Campaigns for `term_ms` milliseconds. Losing is not an error: `elected` is false and
    /// `leader` names the current holder.
    pub async fn campaign(
        &self,
        kind: &str,
        election: &str,
        candidate: &str,
        term_ms: i64,
    ) -> Result<Campaigned, ElectionError> {
        self.instrumented(Action::Campaign, async {
            let r = CampaignRequest::parse(self.term_bounds(), kind, election, candidate, term_ms)?;
            self.leases()
                .campaign(&r.election, &r.candidate, r.term)
                .await
        })
        .await
    }

    /// Renews the leader's lease; retries up to `retries` times, `retry_interval_ms` apart, while
    /// the store is unavailable.
    pub async fn extend(
        &self,
        kind: &str,
        election: &str,
        leader: &str,
        term_ms: i64,
        retries: i64,
        retry_interval_ms: i64,
    ) -> Result<FencingToken, ElectionError> {
        self.instrumented(Action::ExtendElectedTerm, async {
            let r = ExtendRequest::parse(
                self.term_bounds(),
                kind,
                election,
                leader,
                term_ms,
                retries,
                retry_interval_ms,
            )?;
            let mut attempt = 0;
            loop {
                match self.leases().extend(&r.election, &r.leader, r.term).await {
                    Err(ElectionError::Unavailable(_)) if attempt < r.retries => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(r.retry_interval_ms)).await;
                    }
                    result => break result,
                }
            }
        })
        .await
    }

    /// Gives up leadership at once. Succeeds when nobody leads; fails when someone else does.
    pub async fn resign(
        &self,
        kind: &str,
        election: &str,
        leader: &str,
    ) -> Result<(), ElectionError> {
        self.instrumented(Action::Resign, async {
            let r = ResignRequest::parse(kind, election, leader)?;
            self.leases().resign(&r.election, &r.leader).await
        })
        .await
    }

    /// Makes `leader` the leader for `term_ms` milliseconds — whoever led before, or only over
    /// the live lease of `expected_leader` and/or `expected_token` (empty and 0: any).
    pub async fn handover(
        &self,
        kind: &str,
        election: &str,
        leader: &str,
        term_ms: i64,
        expected_leader: &str,
        expected_token: u64,
    ) -> Result<FencingToken, ElectionError> {
        self.instrumented(Action::Handover, async {
            let r = HandoverRequest::parse(
                self.term_bounds(),
                kind,
                election,
                leader,
                term_ms,
                expected_leader,
                expected_token,
            )?;
            self.leases()
                .handover(&r.election, &r.leader, r.term, r.expected)
                .await
        })
        .await
    }

    /// The live leader of an election.
    pub async fn leader(&self, kind: &str, election: &str) -> Result<LeaderInfo, ElectionError> {
        self.instrumented(Action::GetLeader, async {
            self.leases().leader(&election_key(kind, election)?).await
        })
        .await
    }

    /// The live leaders of every election of a kind, sorted by election name.
    pub async fn leaders(
        &self,
        kind: &str,
    ) -> Result<(Name, Vec<(Name, LeaderInfo)>), ElectionError> {
        self.instrumented(Action::ListLeaders, async {
            let kind = public_kind(kind)?;
            let leaders = self.inner.store.leaders(&kind).await?;
            Ok((kind, leaders))
        })
        .await
    }

    /// The pods of a Deployment — or, when `pod_name` is set, of the Deployment owning that
    /// pod — from the Kubernetes caches.
    pub async fn pods(
        &self,
        namespace: &str,
        deployment: &str,
        pod_name: &str,
    ) -> Result<Arc<PodList>, ElectionError> {
        self.instrumented(Action::GetPods, async {
            let discovery = self
                .inner
                .discovery
                .as_ref()
                .ok_or(ElectionError::Unimplemented(
                    "Kubernetes features are off (EA_KUBE_ENABLE=false)",
                ))?;
            Ok(discovery.pods(namespace, deployment, pod_name)?)
        })
        .await
    }

    /// Forgets what the store no longer needs to remember; says how many entries that removed.
    /// See [`Store::housekeep`].
    pub fn housekeep(&self) -> usize {
        self.inner.store.housekeep()
    }

    /// Readiness: the agent is not shutting down, the store can serve and the Kubernetes caches
    /// (if any) have synced.
    pub async fn ready(&self) -> Result<(), ElectionError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(StoreError::Unavailable("the agent is shutting down".into()).into());
        }
        // The store first, so that a `Discovery` error means the store answered.
        self.inner.store.check().await?;
        if self.inner.discovery.as_ref().is_some_and(|d| !d.synced()) {
            return Err(DiscoveryError::NotSynced.into());
        }
        Ok(())
    }

    /// The current leader of an election at once, then every change of leadership, until the
    /// agent shuts down. Validation and the first read happen before the stream is returned, so
    /// their errors reach the caller as a plain error; later, while the store is unavailable,
    /// the stream stays open and reads the election again once it is back.
    pub async fn observe(
        &self,
        kind: &str,
        election: &str,
    ) -> Result<impl Stream<Item = LeaderEvent> + Send + use<>, ElectionError> {
        let key = election_key(kind, election)?;
        // Subscribe before reading, so no change can fall between the read and the subscription.
        let changes = self.inner.store.subscribe();
        let current = self.inner.store.leadership(&key).await?;
        Ok(observe(self.inner.clone(), key, changes, current))
    }

    async fn instrumented<T>(
        &self,
        action: Action,
        request: impl Future<Output = Result<T, ElectionError>>,
    ) -> Result<T, ElectionError> {
        let guard = self.inner.metrics.start(action);
        let result = request.await;
        if let Err(ElectionError::Unavailable(_)) = &result {
            self.inner.metrics.count_unavailable();
        }
        guard.finish(result.is_ok());
        result
    }
}

/// The kind of the lease the agent replicas campaign for to run the Election controller: out of
/// reach of the public API, so no client can take, hand over or resign it.
pub const CONTROLLER_KIND: &str = "election-agent.io";

/// A request's kind: any valid kind but the controller's.
pub fn public_kind(kind: &str) -> Result<Name, InvalidArgument> {
    let kind = Name::parse_kind("kind", kind)?;
    if kind.as_str() == CONTROLLER_KIND {
        return Err(InvalidArgument::new(
            "kind",
            format!("{CONTROLLER_KIND:?} is reserved for the agent's own controller lease"),
        ));
    }
    Ok(kind)
}

/// The election a request (or an Election object) names: refused when a name is invalid or the
/// kind is the controller's.
pub fn election_key(kind: &str, election: &str) -> Result<ElectionKey, InvalidArgument> {
    Ok(ElectionKey {
        kind: public_kind(kind)?,
        election: Name::parse("election", election)?,
    })
}

/// A Campaign request whose fields are valid: what [`ElectionService::campaign`] runs. Public, as
/// are the other requests', so that the fuzz targets (`fuzz/`) check decoded bodies and messages
/// against the very rules the service applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRequest {
    /// The election.
    pub election: ElectionKey,
    /// Who campaigns.
    pub candidate: Name,
    /// For how long.
    pub term: Term,
}

impl CampaignRequest {
    /// Validates a Campaign request's fields; `terms` are the agent's bounds.
    pub fn parse(
        terms: TermBounds,
        kind: &str,
        election: &str,
        candidate: &str,
        term_ms: i64,
    ) -> Result<Self, InvalidArgument> {
        Ok(Self {
            election: election_key(kind, election)?,
            candidate: Name::parse("candidate", candidate)?,
            term: terms.parse("term", term_ms)?,
        })
    }
}

/// An ExtendElectedTerm request whose fields are valid: what [`ElectionService::extend`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendRequest {
    /// The election.
    pub election: ElectionKey,
    /// Who claims to lead.
    pub leader: Name,
    /// For how long.
    pub term: Term,
    /// Retries while the store is unavailable, at most [`MAX_RETRIES`].
    pub retries: u64,
    /// Pause between retries, at most [`MAX_RETRY_INTERVAL_MS`].
    pub retry_interval_ms: u64,
}

impl ExtendRequest {
    /// Validates an ExtendElectedTerm request's fields; `terms` are the agent's bounds.
    pub fn parse(
        terms: TermBounds,
        kind: &str,
        election: &str,
        leader: &str,
        term_ms: i64,
        retries: i64,
        retry_interval_ms: i64,
    ) -> Result<Self, InvalidArgument> {
        Ok(Self {
            election: election_key(kind, election)?,
            leader: Name::parse("leader", leader)?,
            term: terms.parse("term", term_ms)?,
            retries: bounded("retries", retries, MAX_RETRIES)?,
            retry_interval_ms: bounded("retry_interval", retry_interval_ms, MAX_RETRY_INTERVAL_MS)?,
        })
    }
}

/// A Resign request whose fields are valid: what [`ElectionService::resign`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResignRequest {
    /// The election.
    pub election: ElectionKey,
    /// Who claims to lead.
    pub leader: Name,
}

impl ResignRequest {
    /// Validates a Resign request's fields.
    pub fn parse(kind: &str, election: &str, leader: &str) -> Result<Self, InvalidArgument> {
        Ok(Self {
            election: election_key(kind, election)?,
            leader: Name::parse("leader", leader)?,
        })
    }
}

/// A Handover request whose fields are valid: what [`ElectionService::handover`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverRequest {
    /// The election.
    pub election: ElectionKey,
    /// The new leader.
    pub leader: Name,
    /// For how long.
    pub term: Term,
    /// The live lease it must replace (nothing: any).
    pub expected: Expected,
}

impl HandoverRequest {
    /// Validates a Handover request's fields; `terms` are the agent's bounds. An empty
    /// `expected_leader` and an `expected_token` of 0 mean any.
    pub fn parse(
        terms: TermBounds,
        kind: &str,
        election: &str,
        leader: &str,
        term_ms: i64,
        expected_leader: &str,
        expected_token: u64,
    ) -> Result<Self, InvalidArgument> {
        Ok(Self {
            election: election_key(kind, election)?,
            leader: Name::parse("leader", leader)?,
            term: terms.parse("term", term_ms)?,
            expected: Expected {
                leader: match expected_leader {
                    "" => None,
                    name => Some(Name::parse("expected_leader", name)?),
                },
                token: (expected_token != 0).then_some(FencingToken(expected_token)),
            },
        })
    }
}

fn bounded(field: &'static str, value: i64, max: u64) -> Result<u64, InvalidArgument> {
    u64::try_from(value)
        .ok()
        .filter(|v| *v <= max)
        .ok_or_else(|| InvalidArgument {
            field,
            reason: format!("{value} is out of range; allowed 0..={max}"),
        })
}

/// The lease engine answers each command with one of a known set of outcomes; anything else is a
/// bug in a store.
/// The service's typed core; see [`ElectionService::leases`].
#[derive(Clone, Copy)]
pub struct Leases<'a> {
    store: &'a Store,
}

impl Leases<'_> {
    /// Campaigns for `term`. Losing is not an error: `elected` is false and `leader` names the
    /// current holder.
    pub async fn campaign(
        self,
        election: &ElectionKey,
        candidate: &Name,
        term: Term,
    ) -> Result<Campaigned, ElectionError> {
        let command = Command::Campaign {
            candidate: candidate.clone(),
            term,
        };
        let (elected, leader, token) = match self.store.execute(election, command).await? {
            Outcome::Leading { token } => (true, candidate.clone(), token),
            Outcome::Following { leader, token } => (false, leader, token),
            other => unreachable_outcome(&other),
        };
        Ok(Campaigned {
            elected,
            leader,
            kind: election.kind.clone(),
            token,
        })
    }

    /// Renews the leader's lease (once).
    pub async fn extend(
        self,
        election: &ElectionKey,
        leader: &Name,
        term: Term,
    ) -> Result<FencingToken, ElectionError> {
        let command = Command::Extend {
            leader: leader.clone(),
            term,
        };
        match self.store.execute(election, command).await? {
            Outcome::Leading { token } => Ok(token),
            Outcome::NotHolder { holder: None } => Err(ElectionError::NoLeader {
                election: election.clone(),
            }),
            Outcome::NotHolder {
                holder: Some(holder),
            } => Err(ElectionError::HeldByOther {
                election: election.clone(),
                holder,
                caller: leader.clone(),
            }),
            other => unreachable_outcome(&other),
        }
    }

    /// Gives up leadership at once. Succeeds when nobody leads; fails when someone else does.
    pub async fn resign(self, election: &ElectionKey, leader: &Name) -> Result<(), ElectionError> {
        let command = Command::Resign {
            leader: leader.clone(),
        };
        match self.store.execute(election, command).await? {
            Outcome::Resigned => Ok(()),
            Outcome::NotHolder {
                holder: Some(holder),
            } => Err(ElectionError::NotLeader {
                election: election.clone(),
                holder,
                caller: leader.clone(),
            }),
            other => unreachable_outcome(&other),
        }
    }

    /// Makes `leader` the leader for `term` — whoever led before, or only over the live lease
    /// `expected` names.
    pub async fn handover(
        self,
        election: &ElectionKey,
        leader: &Name,
        term: Term,
        expected: Expected,
    ) -> Result<FencingToken, ElectionError> {
        let command = Command::Handover {
            leader: leader.clone(),
            term,
            expected,
        };
        match self.store.execute(election, command).await? {
            Outcome::HandedOver { token } => Ok(token),
            Outcome::NotHolder { holder } => Err(ElectionError::NotAsExpected {
                election: election.clone(),
                holder,
            }),
            other => unreachable_outcome(&other),
        }
    }

    /// The live leader of an election.
    pub async fn leader(self, election: &ElectionKey) -> Result<LeaderInfo, ElectionError> {
        self.store
            .leadership(election)
            .await?
            .leader
            .ok_or_else(|| ElectionError::NoLeader {
                election: election.clone(),
            })
    }
}

fn unreachable_outcome(outcome: &Outcome) -> ! {
    unreachable!(
        "a lease store returned {outcome:?}, which the lease engine never decides for this command"
    )
}

/// A live leader as an observer tracks it: who, which token, and when it expires on our clock.
struct Tracked {
    leader: Name,
    token: FencingToken,
    deadline: Instant,
}

impl Tracked {
    fn from_info(info: LeaderInfo) -> Self {
        Self {
            deadline: Instant::now() + Duration::from_millis(info.ttl_ms),
            leader: info.leader,
            token: info.token,
        }
    }
}

/// What one Observe stream knows: the last version it reported, and the leader it tracks.
struct Observer {
    election: ElectionKey,
    seen: Version,
    current: Option<Tracked>,
    /// When to read the election again if nothing else happens.
    recheck: Instant,
    /// Reads that failed in a row.
    failures: u32,
}

impl Observer {
    fn event(&self, kind: EventKind, leader: Option<&Tracked>, version: Version) -> LeaderEvent {
        LeaderEvent {
            kind,
            election: self.election.clone(),
            leader: leader.map(|l| l.leader.clone()),
            token: leader.map(|l| l.token).unwrap_or_default(),
            version,
        }
    }

    fn tracking(&mut self, current: Option<Tracked>) {
        self.recheck = match &current {
            Some(tracked) => tracked.deadline,
            None => Instant::now() + IDLE_RECHECK.mul_f64(0.8 + 0.4 * fastrand::f64()),
        };
        self.current = current;
    }

    /// The first event of a stream: the state read just before it was returned.
    fn start(&mut self, now: Leadership) -> LeaderEvent {
        self.seen = now.version();
        self.tracking(now.leader.map(Tracked::from_info));
        self.event(EventKind::Current, self.current.as_ref(), self.seen)
    }

    /// A change announced by the store: reported only if newer than anything reported yet.
    fn changed(&mut self, change: crate::store::LeaseChange) -> Option<LeaderEvent> {
        let version = change.version();
        let kind = match change.cause {
            ChangeCause::Elected => EventKind::Elected,
            ChangeCause::HandedOver => EventKind::HandedOver,
            ChangeCause::Resigned => EventKind::Resigned,
            ChangeCause::Renewed => return None,
        };
        if version <= self.seen {
            return None; // an echo, a copy, or a late message of an older state
        }
        self.seen = version;
        let tracked = Tracked::from_info(change.leader);
        let event = self.event(kind, Some(&tracked), version);
        self.tracking((kind != EventKind::Resigned).then_some(tracked));
        Some(event)
    }

    /// The store could not be read: keep the stream and look again soon, then less often.
    fn read_failed(&mut self) {
        let backoff = RECHECK_AFTER_FAILURE
            .saturating_mul(1 << self.failures.min(5))
            .min(MAX_RECHECK_AFTER_FAILURE);
        self.failures += 1;
        self.recheck = Instant::now() + backoff;
    }

    /// The store says changes may have been missed — typically because a subscription was just
    /// made again, i.e. a server is back: if the read this calls for fails too (the other
    /// connections are still coming back), look again soon rather than after the long backoff
    /// the outage built up.
    fn resync(&mut self) {
        self.failures = 0;
    }

    /// The state read from the store now: what it tells that the stream has not reported yet.
    fn read(&mut self, now: Leadership) -> Option<LeaderEvent> {
        self.failures = 0;
        let version = now.version();
        let tracked = self.current.take();
        match (tracked, now.leader) {
            // The lease we tracked ran out, and nothing happened since.
            (Some(tracked), None) if version > self.seen && now.token == tracked.token => {
                self.seen = version;
                let event = self.event(EventKind::Expired, Some(&tracked), version);
                self.tracking(None);
                Some(event)
            }
            // Something happened that the stream was not told of: say how things stand now.
            (_, leader) if version > self.seen => {
                self.seen = version;
                self.tracking(leader.map(Tracked::from_info));
                Some(self.event(EventKind::Current, self.current.as_ref(), version))
            }
            // Renewed: track the new expiry.
            (Some(tracked), Some(info)) if info.leader == tracked.leader => {
                self.tracking(Some(Tracked::from_info(info)));
                None
            }
            // A majority says nobody, or another, leads — though the servers that answered vouch
            // for no newer token (they diverged): the lease we tracked is over all the same.
            (Some(tracked), leader) => {
                let ended = Version::ended(tracked.token);
                let event = (ended > self.seen).then(|| {
                    self.seen = ended;
                    self.event(EventKind::Expired, Some(&tracked), ended)
                });
                self.tracking(leader.map(Tracked::from_info));
                event
            }
            // Nothing newer than what the stream reported: follow what the store says.
            (None, leader) => {
                self.tracking(leader.map(Tracked::from_info));
                None
            }
        }
    }
}

fn observe(
    inner: Arc<Inner>,
    election: ElectionKey,
    mut changes: tokio::sync::broadcast::Receiver<StoreEvent>,
    current: Leadership,
) -> impl Stream<Item = LeaderEvent> + Send + 'static {
    async_stream::stream! {
        let _in_flight = inner.metrics.start(Action::Observe);
        let mut observer = Observer {
            election: election.clone(),
            seen: Version::default(),
            current: None,
            recheck: Instant::now(),
            failures: 0,
        };
        yield observer.start(current);
        loop {
            let read_now = tokio::select! {
                () = inner.shutdown.cancelled() => break,
                received = changes.recv() => match received {
                    Ok(StoreEvent::Changed(change)) => {
                        if change.election == election
                            && let Some(event) = observer.changed(change)
                        {
                            yield event;
                        }
                        false
                    }
                    // Changes may have been missed: read how things stand.
                    Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => {
                        observer.resync();
                        true
                    }
                    Err(RecvError::Closed) => break,
                },
                // The term ran out unless it was renewed without us hearing, or it is time to
                // look again at an election nobody leads: ask the store.
                () = tokio::time::sleep_until(observer.recheck) => true,
            };
            if read_now {
                match inner.store.leadership(&election).await {
                    Ok(now) => {
                        if let Some(event) = observer.read(now) {
                            yield event;
                        }
                    }
                    Err(err) => {
                        tracing::debug!(%election, error = %err, "Observe cannot read the election");
                        observer.read_failed();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::MemoryStore;

    fn service() -> ElectionService {
        ElectionService::new(
            Store::Memory(MemoryStore::new()),
            None,
            TermBounds::default(),
            Arc::new(Metrics::new("test", vec![1.0]).unwrap()),
            CancellationToken::new(),
        )
    }

    fn field(err: ElectionError) -> &'static str {
        match err {
            ElectionError::InvalidArgument(err) => err.field,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_invalid_field_is_refused_and_named() {
        let s = service();
        let long = "x".repeat(254);
        for bad in ["", "a*", "a?", "a[1]", "a b", long.as_str()] {
            assert_eq!(
                field(s.campaign("", bad, "c", 1000).await.unwrap_err()),
                "election"
            );
            assert_eq!(
                field(s.campaign("", "e", bad, 1000).await.unwrap_err()),
                "candidate"
            );
            assert_eq!(
                field(s.extend("", "e", bad, 1000, 0, 0).await.unwrap_err()),
                "leader"
            );
            assert_eq!(field(s.resign("", "e", bad).await.unwrap_err()), "leader");
            assert_eq!(
                field(s.handover("", "e", bad, 1000, "", 0).await.unwrap_err()),
                "leader"
            );
            assert_eq!(field(s.leader("", bad).await.unwrap_err()), "election");
            if !bad.is_empty() {
                assert_eq!(field(s.leaders(bad).await.unwrap_err()), "kind");
                assert_eq!(
                    field(s.campaign(bad, "e", "c", 1000).await.unwrap_err()),
                    "kind"
                );
            }
        }
        for term in [0, 999, 86_400_001, -5] {
            assert_eq!(
                field(s.campaign("", "e", "c", term).await.unwrap_err()),
                "term"
            );
            assert_eq!(
                field(s.extend("", "e", "c", term, 0, 0).await.unwrap_err()),
                "term"
            );
            assert_eq!(
                field(s.handover("", "e", "c", term, "", 0).await.unwrap_err()),
                "term"
            );
        }
        assert_eq!(
            field(s.extend("", "e", "c", 1000, 11, 0).await.unwrap_err()),
            "retries"
        );
        assert_eq!(
            field(s.extend("", "e", "c", 1000, -1, 0).await.unwrap_err()),
            "retries"
        );
        assert_eq!(
            field(s.extend("", "e", "c", 1000, 0, 1001).await.unwrap_err()),
            "retry_interval"
        );
        assert!(s.observe("", "a*").await.is_err());
    }

    #[tokio::test]
    async fn requests_are_counted_in_the_duration_histogram() {
        let s = service();
        s.campaign("", "e", "c", 1000).await.unwrap();
        s.leader("", "none").await.unwrap_err();
        let text = s.metrics().encode();
        assert!(text.contains(r#"election_agent_request_duration_seconds_count{action="campaign",status="success",agent="test"} 1"#));
        assert!(text.contains(r#"election_agent_request_duration_seconds_count{action="get_leader",status="fail",agent="test"} 1"#));
    }

    #[tokio::test]
    async fn errors_distinguish_no_leader_from_another_leader() {
        let s = service();
        assert!(matches!(
            s.extend("k", "e", "a", 1000, 0, 0).await,
            Err(ElectionError::NoLeader { .. })
        ));
        assert!(matches!(
            s.leader("k", "e").await,
            Err(ElectionError::NoLeader { .. })
        ));
        s.campaign("k", "e", "a", 5000).await.unwrap();
        assert!(matches!(
            s.extend("k", "e", "b", 1000, 0, 0).await,
            Err(ElectionError::HeldByOther { .. })
        ));
        assert!(matches!(
            s.resign("k", "e", "b").await,
            Err(ElectionError::NotLeader { .. })
        ));
        let lost = s.campaign("k", "e", "b", 5000).await.unwrap();
        assert!(!lost.elected);
        assert_eq!(lost.leader.as_str(), "a");
        assert_eq!(lost.kind.as_str(), "k");
        assert!(matches!(
            s.pods("ns", "d", "").await,
            Err(ElectionError::Unimplemented(_))
        ));
    }

    #[tokio::test]
    async fn observe_reports_current_leader_then_every_change_including_expiry() {
        let s = service();
        s.campaign("", "watched", "a", 5_000).await.unwrap();
        let mut events = Box::pin(s.observe("", "watched").await.unwrap());
        let mut next = async || {
            let event = tokio::time::timeout(Duration::from_secs(3), events.next())
                .await
                .expect("event in time")
                .expect("stream open");
            (
                event.kind,
                event.leader.map(|l| l.to_string()),
                event.token.0,
            )
        };
        assert_eq!(next().await, (EventKind::Current, Some("a".into()), 1));
        s.extend("", "watched", "a", 5_000, 0, 0).await.unwrap();
        s.handover("", "watched", "b", 5_000, "", 0).await.unwrap();
        assert_eq!(
            next().await,
            (EventKind::HandedOver, Some("b".into()), 2),
            "renewals are not reported"
        );
        s.resign("", "watched", "b").await.unwrap();
        assert_eq!(next().await, (EventKind::Resigned, Some("b".into()), 2));
        s.campaign("", "watched", "c", 1_000).await.unwrap();
        assert_eq!(next().await, (EventKind::Elected, Some("c".into()), 3));
        let started = std::time::Instant::now();
        assert_eq!(
            next().await,
            (EventKind::Expired, Some("c".into()), 3),
            "expiry with no request"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1_100),
            "{:?}",
            started.elapsed()
        );
    }

    fn leading(leader: &str, token: u64) -> Leadership {
        Leadership {
            leader: Some(LeaderInfo {
                leader: Name::parse("leader", leader).unwrap(),
                token: FencingToken(token),
                ttl_ms: 60_000,
            }),
            token: FencingToken(token),
        }
    }

    fn nobody(token: u64) -> Leadership {
        Leadership {
            leader: None,
            token: FencingToken(token),
        }
    }

    fn observer() -> Observer {
        Observer {
            election: election_key("", "e").unwrap(),
            seen: Version::default(),
            current: None,
            recheck: Instant::now(),
            failures: 0,
        }
    }

    fn summary(event: Option<LeaderEvent>) -> Option<(EventKind, Option<String>, u64)> {
        event.map(|e| (e.kind, e.leader.map(|l| l.to_string()), e.version.0))
    }

    #[tokio::test]
    async fn an_observer_reports_from_its_reads_only_what_is_newer_than_what_it_told() {
        let mut o = observer();
        o.start(leading("x", 5));
        assert_eq!(o.seen, Version(10));
        // Renewed: nothing to tell, a later deadline to watch.
        assert_eq!(summary(o.read(leading("x", 5))), None);
        assert!(o.recheck > Instant::now() + Duration::from_secs(50));
        // Its term ran out and nothing happened since.
        assert_eq!(
            summary(o.read(nobody(5))),
            Some((EventKind::Expired, Some("x".into()), 11))
        );
        // Changes it was not told of: how things stand now.
        assert_eq!(
            summary(o.read(leading("y", 7))),
            Some((EventKind::Current, Some("y".into()), 14))
        );
        // A majority names another holder at no newer token (diverged servers): the lease it
        // tracked is over all the same, and it follows the store without a busy loop.
        assert_eq!(
            summary(o.read(leading("z", 6))),
            Some((EventKind::Expired, Some("y".into()), 15))
        );
        assert!(o.recheck > Instant::now() + Duration::from_secs(50));
        assert_eq!(summary(o.read(leading("z", 6))), None, "nothing newer");
    }

    #[tokio::test]
    async fn an_observer_backs_off_while_the_store_is_down_and_looks_again_soon_once_it_is_back() {
        let mut o = observer();
        let soon = |o: &Observer| o.recheck.saturating_duration_since(Instant::now());
        o.read_failed();
        assert!(soon(&o) <= RECHECK_AFTER_FAILURE);
        for _ in 0..10 {
            o.read_failed();
        }
        assert!(soon(&o) > MAX_RECHECK_AFTER_FAILURE / 2, "backs off");
        assert!(soon(&o) <= MAX_RECHECK_AFTER_FAILURE, "bounded");
        // A subscription was made again: the read it calls for may still fail while the other
        // connections come back, and then the stream looks again within the first backoff.
        o.resync();
        o.read_failed();
        assert!(soon(&o) <= RECHECK_AFTER_FAILURE);
        o.read_failed();
        o.read(nobody(1));
        o.read_failed();
        assert!(
            soon(&o) <= RECHECK_AFTER_FAILURE,
            "a good read ends the backoff"
        );
    }

    #[tokio::test]
    async fn an_observer_reports_only_announcements_newer_than_what_it_told() {
        let mut o = observer();
        o.start(nobody(0));
        let change = |cause, token| crate::store::LeaseChange {
            election: election_key("", "e").unwrap(),
            cause,
            leader: LeaderInfo {
                leader: Name::parse("leader", "a").unwrap(),
                token: FencingToken(token),
                ttl_ms: 60_000,
            },
        };
        assert!(o.changed(change(ChangeCause::Elected, 3)).is_some());
        assert!(
            o.changed(change(ChangeCause::Elected, 3)).is_none(),
            "an echo"
        );
        assert!(o.changed(change(ChangeCause::Renewed, 3)).is_none());
        assert!(o.changed(change(ChangeCause::Resigned, 3)).is_some());
        assert!(o.changed(change(ChangeCause::Elected, 3)).is_none(), "late");
        assert!(
            o.changed(change(ChangeCause::HandedOver, 2)).is_none(),
            "older"
        );
        assert_eq!(o.seen, Version(7));
        assert!(o.current.is_none(), "resigned: nobody leads");
    }

    #[tokio::test]
    async fn an_observer_that_falls_behind_is_told_so_and_never_sees_an_older_state() {
        let s = service();
        let mut events = Box::pin(s.observe("", "burst").await.unwrap());
        let first = events.next().await.unwrap();
        // 20,000 handovers while the observer reads nothing: it falls far behind.
        for i in 0..20_000 {
            s.handover("", "burst", &format!("h{i}"), 60_000, "", 0)
                .await
                .unwrap();
        }
        let mut seen = vec![first];
        while seen.last().unwrap().leader.as_ref().map(Name::as_str) != Some("h19999") {
            let event = tokio::time::timeout(Duration::from_secs(3), events.next())
                .await
                .expect("the stream catches up")
                .unwrap();
            seen.push(event);
        }
        for pair in seen.windows(2) {
            assert!(pair[1].version > pair[0].version, "{pair:?}");
            // Handovers are numbered 1, 2, 3...: a step of more than one lease is a skip.
            if pair[1].version.0 > pair[0].version.0.max(1) + 2 {
                assert_eq!(pair[1].kind, EventKind::Current, "a silent skip: {pair:?}");
            }
        }
        assert!(
            seen.iter().skip(1).any(|e| e.kind == EventKind::Current),
            "the observer fell behind, so it must have been told"
        );
    }

    #[tokio::test]
    async fn observe_streams_end_when_the_agent_shuts_down() {
        let shutdown = CancellationToken::new();
        let s = ElectionService::new(
            Store::Memory(MemoryStore::new()),
            None,
            TermBounds::default(),
            Arc::new(Metrics::new("test", vec![1.0]).unwrap()),
            shutdown.clone(),
        );
        let mut events = Box::pin(s.observe("", "e").await.unwrap());
        assert_eq!(events.next().await.unwrap().kind, EventKind::Current);
        shutdown.cancel();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), events.next())
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.ready().await.is_err(), "not ready while shutting down");
    }
}

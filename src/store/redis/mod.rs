//! The Redis lease stores: `single` (one server, or a Redlock quorum of several), `failover`
//! (Sentinel) and `cluster`.
//!
//! Every mode is the same code: a fan-out over one or more [`Node`]s. `single` with one URL,
//! `failover` and `cluster` are one node each (the node follows the Sentinel master or routes by
//! Cluster slot); `single` with N URLs is Redlock over N independent servers, combined by the pure
//! rules of [`quorum`] as soon as the answers in hand settle a request ([`fanout`]).
//!
//! Each election is one hash at `[prefix]/lease/[kind]/[name]` — one key, so one Cluster slot —
//! holding the holder, the fencing token and the expiry on the server's clock. Every mutation is
//! one Lua script (`lease.lua`) carrying an id unique to the command, so that running it again
//! (a Cluster redirect, a timeout) answers what it did the first time, and a failed Redlock
//! command can take back exactly the leases it created (`release.lua`). Leadership changes are
//! announced ([`announce`]) — by the script itself where one server holds the lease, so
//! announcements follow the order of the changes; by the agent once a Redlock majority decided.
//! Expiry needs no message (observers time it and confirm with a read).
//!
//! The parts: [`endpoints`] (URLs to clients), [`node`] (one endpoint: connections, scripts),
//! [`cluster`] (slot routing), [`fanout`] and [`quorum`] (Redlock), [`announce`] (change
//! messages and subscriptions).

mod announce;
mod cluster;
mod endpoints;
mod fanout;
mod node;
pub(crate) mod quorum;
mod replicas;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all, stream::FuturesUnordered};
use prometheus::IntGauge;
use tokio::{sync::broadcast, task::JoinHandle};

pub use self::endpoints::EndpointError;
use self::{
    announce::Announcer,
    fanout::{Stragglers, gather},
    node::{ALIGN, INDEX, LEADER, LEASE, LIVE, Node, RELEASE},
    quorum::{Answer, Kind, Late, Reply, Verdict, combine, combine_leader, majority_answered},
};
use super::{LeaseChange, LeaseStore, StoreError, StoreEvent};
use crate::{
    config::StoreConfig,
    lease::{
        ChangeCause, Command, ElectionKey, FencingToken, LeaderInfo, Leadership, Name, Outcome,
    },
};

/// How often reachability is checked for the `election_agent_disconnected_redis_backends` gauge.
const MONITOR_INTERVAL: Duration = Duration::from_secs(1);

/// Leases in Redis; see the module documentation.
pub struct RedisStore {
    shared: Arc<Shared>,
    background: Vec<JoinHandle<()>>,
}

struct Shared {
    /// Every server (every member's, in sharding mode).
    nodes: Vec<Node>,
    /// The servers that hold a key, by its position (`shard`): all of them, except in sharding
    /// mode, where position `p` is the `p`-th server of every member.
    shards: Vec<Vec<usize>>,
    prefix: String,
    announcer: Announcer,
    /// Redlock: how long to wait for one server before deciding without it.
    server_timeout: Duration,
    /// How long any one call to a server may take.
    operation_timeout: Duration,
    /// How long a record is kept after its lease ended, in ms.
    retention_ms: u64,
    /// This agent process's number in command ids: random, so that two commands on one election
    /// from different agent replicas (or restarts) carry the same id with a chance of 2^-32 even
    /// if their counters meet — and only the last command on a record is ever compared.
    agent: u64,
    commands: AtomicU64,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

impl RedisStore {
    /// A store for `config` (mode `single`, `failover` or `cluster`). Nothing is connected yet:
    /// the agent starts, not ready, while Redis is down. `disconnected` is kept at the number of
    /// unreachable endpoints.
    pub fn new(config: &StoreConfig, disconnected: IntGauge) -> Result<Self, EndpointError> {
        let (endpoints, shards) = endpoints::endpoints(config)?;
        let nodes: Vec<Node> = endpoints
            .into_iter()
            .map(|(label, endpoint)| {
                let durability = (config.replica_acks, config.server_timeout);
                Node::new(label, endpoint, config.operation_timeout, durability)
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            server_timeout: config.server_timeout.min(config.operation_timeout),
            operation_timeout: config.operation_timeout,
            nodes,
            prefix: config.key_prefix.clone(),
            retention_ms: u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX),
            announcer: Announcer::new(&config.key_prefix),
            agent: u64::from(fastrand::u32(..)),
            commands: AtomicU64::new(0),
        });
        let mut background: Vec<JoinHandle<()>> = (0..shared.nodes.len())
            .map(|index| tokio::spawn(announce::listen(shared.clone(), index)))
            .collect();
        background.push(tokio::spawn(monitor(shared.clone(), disconnected)));
        Ok(Self { shared, background })
    }

    /// The Lua script every mutation runs (for the benchmark, which compares against it).
    pub fn lease_script() -> &'static str {
        LEASE.text()
    }
}

impl Shared {
    /// The record of `election`: `[prefix]/lease/[kind]/[name]`, each `/` of the kind written
    /// `%2F` (names never contain `%`), so the kind ends at the first `/` after `lease/` and no
    /// two (kind, name) pairs share a key or a kind's listing prefix. A kind without `/` keeps
    /// the key the Go service and earlier releases used.
    fn key(&self, election: &ElectionKey) -> String {
        let name = election.election.as_str();
        let mut key = self.key_start("lease", &election.kind, name.len() + 1);
        key.push('/');
        key.push_str(name);
        key
    }

    /// The index of `kind`'s live leases: `[prefix]/live/[kind]`, the kind written as in
    /// [`key`](Self::key).
    fn index_key(&self, kind: &Name) -> String {
        self.key_start("live", kind, 0)
    }

    /// `[prefix]/[what]/[kind]`, a `/` in the kind written `%2F`, with room for `more` bytes.
    /// (Built by hand: it is on every request's path, and `format!` with `replace` allocates
    /// three times.)
    fn key_start(&self, what: &str, kind: &Name, more: usize) -> String {
        let kind = kind.as_str();
        let mut key =
            String::with_capacity(self.prefix.len() + what.len() + kind.len() * 3 + 2 + more);
        key.push_str(&self.prefix);
        key.push('/');
        key.push_str(what);
        key.push('/');
        for (i, part) in kind.split('/').enumerate() {
            if i > 0 {
                key.push_str("%2F");
            }
            key.push_str(part);
        }
        key
    }

    /// Whether `lease.lua` keeps the index itself: everywhere but in a Cluster, where the index
    /// is in another slot than the record, and in sharding mode, where it may be on other servers.
    fn indexes_in_script(&self) -> bool {
        self.shards.len() == 1 && !self.nodes.iter().any(Node::is_cluster)
    }

    /// The position of the servers holding `key`: CRC16 (XMODEM, as Redis Cluster's) of the key
    /// modulo the servers per member, as the Go service's sharding mode; 0 in the other modes.
    fn shard(&self, key: &str) -> usize {
        match self.shards.len() {
            1 => 0,
            n => usize::from(cluster::crc16(key.as_bytes())) % n,
        }
    }

    /// The servers of position `shard`.
    fn shard_nodes(&self, shard: usize) -> Vec<&Node> {
        self.shards[shard].iter().map(|&i| &self.nodes[i]).collect()
    }

    /// A new command id: this agent's random number in the high half, a counter in the low one.
    fn command_id(&self) -> u64 {
        self.agent << 32 | (self.commands.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff)
    }

    /// How long a fan-out waits for one server: the configured per-server timeout, and for a
    /// command with a term at most a tenth of it, so that what is left of a granted lease (its
    /// validity) is always most of its term. (With one server the operation timeout applies.)
    fn per_server_timeout(&self, term: Option<Duration>) -> Duration {
        match term {
            Some(term) => self.server_timeout.min(term / 10),
            None => self.server_timeout,
        }
    }

    /// Runs `script` on `key` with `args` on every server, for the calls a command's verdict
    /// leaves to do; errors are ignored (a lease that cannot be released expires with its term).
    async fn on_servers(
        &self,
        shard: usize,
        servers: &[usize],
        script: &node::Script,
        key: &str,
        args: impl serde::Serialize + Clone,
    ) {
        join_all(servers.iter().map(|&i| {
            self.nodes[self.shards[shard][i]].write(
                script,
                std::slice::from_ref(&key),
                args.clone(),
                |_: &u64| true,
            )
        }))
        .await;
    }

    /// Sets the token of this command's grants on `servers` to exactly `token`; says how many
    /// servers now have it (those that already had it not included).
    async fn align(
        &self,
        shard: usize,
        servers: &[usize],
        key: &str,
        id: u64,
        token: FencingToken,
    ) -> usize {
        // Servers that just answered: bounded by the operation timeout only, as the first call
        // on a server also loads the script.
        let aligned = join_all(servers.iter().map(|&i| {
            self.nodes[self.shards[shard][i]].write(
                &ALIGN,
                std::slice::from_ref(&key),
                (id, token.0),
                |_: &u64| true,
            )
        }))
        .await;
        aligned
            .iter()
            .filter(|r| matches!(r, Ok(t) if *t == token.0))
            .count()
    }
}

impl Shared {
    /// Keeps the kind's index after a change where `lease.lua` cannot (Cluster, sharding): awaited
    /// when the lease began or ended, so a listing right after the answer shows it; sent without
    /// waiting for a renewal, which only moves the entry's expiry. A failure is left to the next
    /// renewal.
    async fn index_elsewhere(
        self: &Arc<Self>,
        args: &Arc<LeaseArgs>,
        cause: ChangeCause,
        term: Option<Duration>,
    ) {
        let ttl_ms = match cause {
            ChangeCause::Resigned => 0,
            _ => term.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        let (shared, args) = (self.clone(), args.clone());
        let update = async move {
            // On every server of the index's position (with several members, each keeps its
            // copy, and a listing reads a majority of them).
            let shard = shared.shard(&args.index);
            let index = [args.index.as_str()];
            let results = join_all(shared.shard_nodes(shard).into_iter().map(|node| {
                node.write(
                    &INDEX,
                    &index,
                    (args.name.as_str(), ttl_ms, shared.retention_ms),
                    |_: &u64| true,
                )
            }))
            .await;
            for err in results.into_iter().filter_map(Result::err) {
                tracing::debug!(index = args.index, error = %err, "cannot update a kind's index");
            }
        };
        match cause {
            ChangeCause::Renewed => drop(tokio::spawn(update)),
            _ => update.await,
        }
    }
}

/// What a command sends to `lease.lua`, shared by the calls of its fan-out.
struct LeaseArgs {
    key: String,
    /// The position of the servers holding it.
    shard: usize,
    /// The kind's index.
    index: String,
    /// Whether `lease.lua` keeps the index (not in a Cluster).
    indexed: bool,
    /// The election's name, the index's member.
    name: Name,
    operation: &'static str,
    who: Name,
    term_ms: u64,
    id: u64,
    /// Where the script announces a change (empty with Redlock: the agent announces what a
    /// majority decided), and the election's `kind name` for the message.
    channel: Arc<str>,
    election: String,
    /// A conditional handover's expected holder (empty: any) and token (0: any).
    expected_leader: String,
    expected_token: u64,
}

fn command_parts(command: &Command) -> (Kind, &'static str, &Name, Option<Duration>) {
    let term = |term: &crate::lease::Term| Some(Duration::from_millis(term.as_millis()));
    match command {
        Command::Campaign { candidate, term: t } => {
            (Kind::Campaign, "campaign", candidate, term(t))
        }
        Command::Extend { leader, term: t } => (Kind::Extend, "extend", leader, term(t)),
        Command::Resign { leader } => (Kind::Resign, "resign", leader, None),
        Command::Handover {
            leader, term: t, ..
        } => (Kind::Handover, "handover", leader, term(t)),
    }
}

/// What a late answer still needs: a new lease of a failed command released, a grant with
/// another token than the command's aligned to it; `None`: nothing.
fn late_follow_up(late: Late, reply: &Reply) -> Option<Late> {
    match late {
        Late::Release if quorum::is_new_lease(reply.code) => Some(Late::Release),
        Late::Align(token) if quorum::is_grant(reply.code) && reply.token != token.0 => {
            Some(Late::Align(token))
        }
        _ => None,
    }
}

/// Finishes what a decided command leaves to do: releases the new leases of a failed command
/// (`release`, and late grants), or aligns late grants of a new lease to its token.
///
/// The follow-up for a server that has not answered is sent at once, not when its answer comes:
/// queued on the same connection right behind the command, it runs there right after it, before
/// any later command of this agent (such as the holder's next renewal) can find a grant not yet
/// aligned or released. Both scripts act only on that command's own grant, so they are harmless
/// where it granted nothing. A late answer that still shows a grant to settle (its command was
/// retried after NOSCRIPT, behind the follow-up) is settled again when it arrives.
async fn settle_late<F>(
    shared: &Arc<Shared>,
    args: &Arc<LeaseArgs>,
    release: Vec<usize>,
    late: Late,
    answers: &[Answer<Reply>],
    stragglers: Stragglers<F>,
) where
    F: Future<Output = (usize, Result<Reply, StoreError>)> + Send + 'static,
{
    let mut stragglers = stragglers.filter(|s| late != Late::Ignore && !s.is_empty());
    let straggled = stragglers.is_some();
    // Answers that have arrived since the decision are settled as they say: with every server
    // healthy the last one has usually answered by now, and needs no follow-up sent blind. (A
    // failure that arrived says nothing of what the server did: it gets the follow-up.)
    let mut arrived = Vec::new();
    if let Some(running) = &mut stragglers {
        while let std::task::Poll::Ready(Some((i, answer))) = futures::poll!(running.next()) {
            if let Ok(reply) = answer {
                arrived.push((i, reply));
            }
        }
    }
    let stragglers = stragglers.filter(|s| !s.is_empty());
    let settled_now: Vec<(usize, Late)> = arrived
        .iter()
        .filter_map(|(i, reply)| late_follow_up(late, reply).map(|late| (*i, late)))
        .collect();
    let unanswered = answers
        .iter()
        .enumerate()
        .filter(|(i, answer)| {
            straggled && !matches!(answer, Some(Ok(_))) && !arrived.iter().any(|(j, _)| j == i)
        })
        .map(|(i, _)| i);
    let follow_ups: FuturesUnordered<_> = release
        .iter()
        .map(|&i| (i, Late::Release))
        .chain(settled_now)
        .chain(unanswered.map(|i| (i, late)))
        .map(|(i, late)| {
            let (shared, args) = (shared.clone(), args.clone());
            async move {
                let (key, id) = (args.key.as_str(), args.id);
                match late {
                    Late::Release => {
                        shared
                            .on_servers(args.shard, &[i], &RELEASE, key, (id,))
                            .await
                    }
                    Late::Align(token) => _ = shared.align(args.shard, &[i], key, id, token).await,
                    Late::Ignore => {}
                }
            }
        })
        .collect();
    if follow_ups.is_empty() && stragglers.is_none() {
        return;
    }
    // Polled once here, so each follow-up is queued on its connection before the outcome is
    // reported; the rest runs in the background.
    let mut follow_ups = follow_ups;
    while let std::task::Poll::Ready(Some(())) = futures::poll!(follow_ups.next()) {}
    let shared = shared.clone();
    let args = args.clone();
    tokio::spawn(async move {
        let (key, id) = (args.key.as_str(), args.id);
        let late_answers = async {
            let Some(mut stragglers) = stragglers else {
                return;
            };
            while let Some((i, answer)) = stragglers.next().await {
                let Ok(reply) = answer else { continue };
                match late_follow_up(late, &reply) {
                    Some(Late::Release) => {
                        shared
                            .on_servers(args.shard, &[i], &RELEASE, key, (id,))
                            .await;
                    }
                    Some(Late::Align(token)) => {
                        shared.align(args.shard, &[i], key, id, token).await;
                    }
                    _ => {}
                }
            }
        };
        futures::join!(follow_ups.collect::<()>(), late_answers);
    });
}

impl LeaseStore for RedisStore {
    async fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> Result<Outcome, StoreError> {
        let shared = &self.shared;
        let key = shared.key(election);
        let shard = shared.shard(&key);
        let nodes = shared.shard_nodes(shard);
        let servers = nodes.len();
        let (kind, operation, who, term) = command_parts(&command);
        // One server announces a change itself, in the order it makes them; N servers have no
        // such order, and the agent announces what a majority decided.
        let announced_by_server = servers == 1;
        let args = Arc::new(LeaseArgs {
            key,
            shard,
            index: shared.index_key(&election.kind),
            indexed: shared.indexes_in_script(),
            name: election.election.clone(),
            operation,
            who: who.clone(),
            term_ms: term.map_or(0, |t| t.as_millis() as u64),
            id: shared.command_id(),
            channel: match announced_by_server {
                true => shared.announcer.channel().clone(),
                false => Arc::from(""),
            },
            election: [election.kind.as_str(), " ", election.election.as_str()].concat(),
            expected_leader: match &command {
                Command::Handover { expected, .. } => expected
                    .leader
                    .as_ref()
                    .map(|leader| leader.as_str().to_owned())
                    .unwrap_or_default(),
                _ => String::new(),
            },
            expected_token: match &command {
                Command::Handover { expected, .. } => expected.token.map_or(0, |token| token.0),
                _ => 0,
            },
        });
        let started = Instant::now();
        let gathered = gather(
            &nodes,
            shared.per_server_timeout(term),
            |i| {
                let (shared, args) = (shared.clone(), args.clone());
                async move {
                    let a = &*args;
                    let both = [a.key.as_str(), a.index.as_str()];
                    let keys = if a.indexed { &both[..] } else { &both[..1] };
                    let reply = shared.nodes[shared.shards[a.shard][i]]
                        .write(
                            &LEASE,
                            keys,
                            (
                                a.operation,
                                a.who.as_str(),
                                a.term_ms,
                                a.id,
                                &*a.channel,
                                a.election.as_str(),
                                shared.retention_ms,
                                a.name.as_str(),
                                a.expected_leader.as_str(),
                                a.expected_token,
                            ),
                            |(code, ..): &(u8, String, u64, u64)| quorum::may_have_written(*code),
                        )
                        .await
                        .map(|(code, leader, token, ttl_ms)| Reply {
                            code,
                            leader,
                            token,
                            ttl_ms,
                        });
                    (i, reply)
                }
            },
            |answers| {
                let valid = term.is_none_or(|term| {
                    quorum::validity(servers, term, started.elapsed()).is_some()
                });
                combine(kind, answers, valid)
            },
        )
        .await;
        let Verdict {
            mut outcome,
            mut release,
            align,
            change,
            mut late,
        } = gathered.decision;

        if let (Ok(Outcome::Leading { token } | Outcome::HandedOver { token }), false) =
            (&outcome, align.is_empty())
        {
            // Made durable on a majority, and the same on every server that granted, before
            // anyone is told.
            let token = *token;
            let at_token = granted_at(&gathered.answers, who, token);
            let aligned = shared.align(shard, &align, &args.key, args.id, token).await;
            if at_token + aligned < quorum::quorum(servers) {
                outcome = Err(StoreError::Unavailable(
                    "could not make the new fencing token durable on a majority of Redis servers"
                        .into(),
                ));
                release = new_leases(&gathered.answers);
                late = Late::Release;
            }
        }
        settle_late(
            shared,
            &args,
            release,
            late,
            &gathered.answers,
            gathered.stragglers,
        )
        .await;

        if let (Some(cause), Ok(_), false) = (change, &outcome, args.indexed) {
            shared.index_elsewhere(&args, cause, term).await;
        }

        if let (Some(cause), Ok(result), false) = (change, &outcome, announced_by_server)
            && cause != ChangeCause::Renewed
        {
            let token = match result {
                Outcome::Leading { token } | Outcome::HandedOver { token } => *token,
                _ => resigned_token(&gathered.answers, who),
            };
            let change = LeaseChange {
                election: election.clone(),
                cause,
                leader: LeaderInfo {
                    leader: who.clone(),
                    token,
                    ttl_ms: match cause {
                        ChangeCause::Resigned => 0,
                        _ => term.map_or(0, |t| t.as_millis() as u64),
                    },
                },
            };
            let message = announce::encode(&change);
            shared.announcer.announce(change);
            // Other replicas hear it through Redis; a server that cannot take it now is skipped
            // (its subscribers resynchronise when they connect again).
            for node in &nodes {
                node.publish(shared.announcer.channel(), &message);
            }
        }
        outcome
    }

    async fn leadership(&self, election: &ElectionKey) -> Result<Leadership, StoreError> {
        match self.read(election).await? {
            Read::Settled(leadership) => Ok(leadership),
            Read::Contested(why) => Err(why),
        }
    }

    async fn leaders(&self, kind: &Name) -> Result<Vec<(Name, LeaderInfo)>, StoreError> {
        let shared = &self.shared;
        let index = shared.index_key(kind);
        // Any majority of indexes names every election a majority holds a lease of.
        let nodes = shared.shard_nodes(shared.shard(&index));
        let listed = gather(
            &nodes,
            shared.operation_timeout,
            |i| {
                let (node, index) = (nodes[i], &index);
                async move { (i, live_elections(node, index).await) }
            },
            majority_answered,
        )
        .await;
        if !listed.decision {
            return Err(first_error(listed.answers));
        }
        let elections: BTreeSet<Name> = listed
            .answers
            .into_iter()
            .flatten()
            .flatten()
            .flatten()
            .filter_map(|name| Name::parse("election", &name).ok())
            .collect();
        // Each confirmed by a read, a few at a time. An election whose lease no majority
        // confirms is not listed; one the servers cannot tell (a write in flight while a server
        // is down) is left out rather than failing the whole listing.
        let leaders: Vec<_> = futures::stream::iter(elections)
            .map(|election| async {
                let key = ElectionKey {
                    kind: kind.clone(),
                    election,
                };
                Ok::<_, StoreError>(match self.read(&key).await? {
                    Read::Settled(leadership) => leadership.leader.map(|info| (key.election, info)),
                    Read::Contested(_) => None,
                })
            })
            .buffered(LISTING_READS)
            .collect()
            .await;
        leaders.into_iter().filter_map(Result::transpose).collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.shared.announcer.subscribe()
    }

    async fn check(&self) -> Result<(), StoreError> {
        // Every position must have a majority of its servers answering.
        let shared = &self.shared;
        for shard in 0..shared.shards.len() {
            let nodes = shared.shard_nodes(shard);
            let pings = gather(
                &nodes,
                shared.operation_timeout,
                |i| {
                    let node = nodes[i];
                    async move { (i, node.ping().await) }
                },
                majority_answered,
            )
            .await;
            if !pings.decision {
                return Err(first_error(pings.answers));
            }
        }
        Ok(())
    }
}

/// How many index entries one call of `live.lua` returns (and removes) at most.
const LISTING_BATCH: usize = 1_000;
/// How many reads of listed elections run at once, so a listing of many live leases never
/// floods the connections other requests share.
const LISTING_READS: usize = 32;

/// The names in `index` (a kind's) of live leases, on one node, batch by batch.
async fn live_elections(node: &Node, index: &str) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    let (mut from, mut skip) = (0_u64, 0_usize);
    loop {
        // Name, expiry, name, expiry, ...
        let flat: Vec<String> = node
            .eval(&LIVE, &[index], (from, skip, LISTING_BATCH))
            .await?;
        let batch: Vec<(String, u64)> = flat
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].parse().unwrap_or_default()))
            .collect();
        let full = batch.len() == LISTING_BATCH;
        if let Some(&(_, last)) = batch.last() {
            let at_last = batch.iter().filter(|(_, at)| *at == last).count();
            skip = if last == from {
                skip + at_last
            } else {
                at_last
            };
            from = last;
        }
        names.extend(batch.into_iter().map(|(name, _)| name));
        if !full {
            return Ok(names);
        }
    }
}

/// How often a read whose servers disagree is made again before it says it cannot tell.
const READ_ATTEMPTS: u32 = 3;

/// What a read found.
enum Read {
    /// A majority settles who leads.
    Settled(Leadership),
    /// A majority answered but does not agree, and the servers that did not answer could tip it:
    /// a write is in flight (or servers diverged) while a server is down.
    Contested(StoreError),
}

impl RedisStore {
    /// Forgets what the agent no longer needs to remember (elections not announced for a
    /// while); says how many entries that removed.
    pub fn housekeep(&self) -> usize {
        self.shared.announcer.prune()
    }

    /// Reads `election`; servers that disagree are asked again after a few milliseconds, long
    /// enough for a write in flight to land everywhere it is going.
    async fn read(&self, election: &ElectionKey) -> Result<Read, StoreError> {
        let shared = &self.shared;
        let key = shared.key(election);
        let nodes = shared.shard_nodes(shared.shard(&key));
        let mut attempt = 1;
        loop {
            let gathered = gather(
                &nodes,
                shared.per_server_timeout(None),
                |i| {
                    let (node, key) = (nodes[i], &key);
                    async move {
                        let reply = node
                            .eval::<(String, u64, u64)>(&LEADER, &[key], ())
                            .await
                            .map(|(leader, token, ttl_ms)| Reply {
                                code: 0,
                                leader,
                                token,
                                ttl_ms,
                            });
                        (i, reply)
                    }
                },
                combine_leader,
            )
            .await;
            match gathered.decision {
                Ok(leadership) => return Ok(Read::Settled(leadership)),
                Err(why) if majority_answered(&gathered.answers) == Some(true) => {
                    if attempt == READ_ATTEMPTS {
                        return Ok(Read::Contested(why));
                    }
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(why) => return Err(why),
            }
        }
    }
}

/// How many servers granted `who` the lease with exactly `token`.
fn granted_at(answers: &[Answer<Reply>], who: &Name, token: FencingToken) -> usize {
    answers
        .iter()
        .filter(|a| {
            matches!(a, Some(Ok(r)) if quorum::is_grant(r.code) && r.token == token.0
                && r.leader == who.as_str())
        })
        .count()
}

/// The servers whose answer was a new lease (to release when the command fails after all).
fn new_leases(answers: &[Answer<Reply>]) -> Vec<usize> {
    answers
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Some(Ok(r)) if quorum::is_new_lease(r.code)))
        .map(|(i, _)| i)
        .collect()
}

/// The token of the lease `who` resigned: what most servers that dropped it say (a lower bound
/// when they disagree, so that the announcement cannot outrank a later election's).
fn resigned_token(answers: &[Answer<Reply>], who: &Name) -> FencingToken {
    let mut tokens: Vec<u64> = answers
        .iter()
        .filter_map(|a| match a {
            Some(Ok(r)) if r.code == quorum::code::RESIGNED && r.leader == who.as_str() => {
                Some(r.token)
            }
            _ => None,
        })
        .collect();
    tokens.sort_unstable_by(|a, b| b.cmp(a));
    let at = quorum::quorum(answers.len())
        .min(tokens.len())
        .saturating_sub(1);
    FencingToken(tokens.get(at).copied().unwrap_or_default())
}

fn first_error<T>(answers: Vec<Answer<T>>) -> StoreError {
    answers
        .into_iter()
        .flatten()
        .find_map(Result::err)
        .unwrap_or_else(|| StoreError::Unavailable("no Redis server answered".into()))
}

/// Keeps `disconnected` at the number of endpoints that do not answer PING.
async fn monitor(shared: Arc<Shared>, disconnected: IntGauge) {
    let mut was_down = vec![false; shared.nodes.len()];
    loop {
        let pings = join_all(shared.nodes.iter().map(Node::ping)).await;
        for ((node, ping), was_down) in shared.nodes.iter().zip(&pings).zip(&mut was_down) {
            match (ping, *was_down) {
                (Err(err), false) => {
                    tracing::warn!(node = node.label(), error = %err, "Redis unreachable")
                }
                (Ok(()), true) => tracing::info!(node = node.label(), "Redis reachable again"),
                _ => {}
            }
            *was_down = ping.is_err();
        }
        disconnected.set(was_down.iter().filter(|d| **d).count() as i64);
        tokio::time::sleep(MONITOR_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod under_faults;

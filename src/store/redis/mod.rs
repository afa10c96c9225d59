//! The Redis lease stores: `single` (one server, or a Redlock quorum of several), `failover`
//! (Sentinel) and `cluster`.
//!
//! Every mode is the same code: a quorum over one or more [`Node`]s. `single` with one URL,
//! `failover` and `cluster` are one node each (the `rustis` client follows the Sentinel master
//! or the Cluster's slots); `single` with N URLs is Redlock over N independent servers, combined
//! by the pure functions of [`quorum`].
//!
//! Each election is one hash at `[prefix]/lease/[kind]/[name]` — one key, so one Cluster slot —
//! holding the holder, the fencing token and the expiry on the server's clock. Every mutation is
//! one Lua script (`lease.lua`). Leadership changes are published on `[prefix]/events` once a
//! command's outcome is decided, so `Observe` streams on every agent replica hear them; expiry
//! needs no message (observers time it themselves and confirm with a read).

mod cluster;
mod node;
pub(crate) mod quorum;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use prometheus::IntGauge;
use rustis::client::{ClusterConfig, Config, SentinelConfig, ServerConfig};
use tokio::{sync::broadcast, task::JoinHandle};

use self::{
    node::{LEADER, LEASE, Node, RAISE, RELEASE},
    quorum::{Kind, Reply, Verdict, combine, combine_leader},
};
use super::{LeaseChange, LeaseStore, StoreError};
use crate::{
    config::{StoreConfig, StoreMode},
    lease::{ChangeCause, Command, ElectionKey, FencingToken, LeaderInfo, Name, Outcome},
};

/// How often reachability is checked for the `election_agent_disconnected_redis_backends` gauge.
const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// How long a lost subscription waits before subscribing again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);
/// How many changes an observer may fall behind before it resynchronises from the store.
const CHANGE_BUFFER: usize = 1024;

/// Why the store configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("EA_REDIS_URLS: {0}")]
pub struct EndpointError(String);

/// Leases in Redis; see the module documentation.
pub struct RedisStore {
    shared: Arc<Shared>,
    background: Vec<JoinHandle<()>>,
}

struct Shared {
    nodes: Vec<Node>,
    prefix: String,
    channel: String,
    changes: broadcast::Sender<LeaseChange>,
    /// The last change announced per election: N servers (and this replica itself) report the
    /// same change, observers must hear it once.
    announced: Mutex<HashMap<ElectionKey, (ChangeCause, FencingToken)>>,
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
        let nodes = endpoints(config)?
            .into_iter()
            .map(|(label, endpoint)| Node::new(label, endpoint, config.operation_timeout))
            .collect();
        let shared = Arc::new(Shared {
            nodes,
            prefix: config.key_prefix.clone(),
            channel: format!("{}/events", config.key_prefix),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            announced: Mutex::default(),
        });
        let mut background: Vec<JoinHandle<()>> = (0..shared.nodes.len())
            .map(|index| tokio::spawn(subscribe(shared.clone(), index)))
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
    fn key(&self, election: &ElectionKey) -> String {
        format!(
            "{}/lease/{}/{}",
            self.prefix, election.kind, election.election
        )
    }

    /// Tells local observers about a change, once.
    fn announce(&self, change: LeaseChange) {
        let mut announced = self
            .announced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let this = (change.cause, change.leader.token);
        if announced.get(&change.election) == Some(&this) {
            return;
        }
        announced.insert(change.election.clone(), this);
        let _ = self.changes.send(change);
    }

    async fn ping_all(&self) -> Vec<Result<(), StoreError>> {
        join_all(self.nodes.iter().map(Node::ping)).await
    }
}

fn command_parts(command: &Command) -> (Kind, &'static str, &Name, u64) {
    match command {
        Command::Campaign { candidate, term } => {
            (Kind::Campaign, "campaign", candidate, term.as_millis())
        }
        Command::Extend { leader, term } => (Kind::Extend, "extend", leader, term.as_millis()),
        Command::Resign { leader } => (Kind::Resign, "resign", leader, 0),
        Command::Handover { leader, term } => {
            (Kind::Handover, "handover", leader, term.as_millis())
        }
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
/// (names never contain spaces).
fn encode(change: &LeaseChange) -> String {
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

fn decode(message: &str) -> Option<LeaseChange> {
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

impl LeaseStore for RedisStore {
    async fn execute(
        &self,
        election: &ElectionKey,
        command: Command,
    ) -> Result<Outcome, StoreError> {
        let shared = &self.shared;
        let key = shared.key(election);
        let (kind, operation, who, term_ms) = command_parts(&command);
        let term = term_ms.to_string();
        let started = Instant::now();
        let args = [operation, who.as_str(), &term];
        let replies: Vec<Result<Reply, StoreError>> =
            join_all(shared.nodes.iter().map(|node| async {
                let (code, leader, token, ttl_ms) = node
                    .eval::<(u8, String, u64, u64)>(&LEASE, &key, args)
                    .await?;
                Ok(Reply {
                    code,
                    leader,
                    token,
                    ttl_ms,
                })
            }))
            .await;
        let valid = quorum::validity(
            shared.nodes.len(),
            Duration::from_millis(term_ms),
            started.elapsed(),
        )
        .is_some();
        let Verdict {
            mut outcome,
            release,
            raise,
            change,
        } = combine(kind, &replies, valid);

        if !release.is_empty() {
            let undo = release.iter().filter_map(|&i| {
                let reply = replies[i].as_ref().ok()?;
                let token = reply.token.to_string();
                let node = &shared.nodes[i];
                let key = &key;
                Some(async move { node.eval::<u8>(&RELEASE, key, [who.as_str(), &token]).await })
            });
            // Best effort: a grant that cannot be released expires with its term.
            join_all(undo).await;
        }
        if let (Ok(Outcome::Leading { token } | Outcome::HandedOver { token }), false) =
            (&outcome, raise.is_empty())
        {
            let target = token.0.to_string();
            let raised = join_all(raise.iter().map(|&i| {
                let node = &shared.nodes[i];
                let (key, target) = (&key, &target);
                async move {
                    node.eval::<u64>(&RAISE, key, [target.as_str(), who.as_str()])
                        .await
                }
            }))
            .await;
            let durable = replies
                .iter()
                .filter(|r| matches!(r, Ok(r) if r.token == token.0 && r.leader == who.as_str()))
                .count()
                + raised
                    .iter()
                    .filter(|r| matches!(r, Ok(t) if *t >= token.0))
                    .count();
            if durable < quorum::quorum(shared.nodes.len()) {
                outcome = Err(StoreError::Unavailable(
                    "could not make the new fencing token durable on a majority of Redis servers"
                        .into(),
                ));
            }
        }

        if let (Some(cause), Ok(result)) = (change, &outcome)
            && cause != ChangeCause::Renewed
        {
            let token = match result {
                Outcome::Leading { token } | Outcome::HandedOver { token } => *token,
                _ => replies
                    .iter()
                    .filter_map(|r| r.as_ref().ok().map(|r| FencingToken(r.token)))
                    .max()
                    .unwrap_or_default(),
            };
            let change = LeaseChange {
                election: election.clone(),
                cause,
                leader: LeaderInfo {
                    leader: who.clone(),
                    token,
                    ttl_ms: if cause == ChangeCause::Resigned {
                        0
                    } else {
                        term_ms
                    },
                },
            };
            let message = encode(&change);
            shared.announce(change);
            // Other replicas hear it through Redis; an error here only delays their observers
            // until they next read the lease.
            join_all(
                shared
                    .nodes
                    .iter()
                    .map(|node| node.publish(&shared.channel, &message)),
            )
            .await;
        }
        outcome
    }

    async fn leader(&self, election: &ElectionKey) -> Result<Option<LeaderInfo>, StoreError> {
        let key = self.shared.key(election);
        let replies: Vec<Result<Reply, StoreError>> =
            join_all(self.shared.nodes.iter().map(|node| async {
                let (leader, token, ttl_ms) =
                    node.eval::<(String, u64, u64)>(&LEADER, &key, ()).await?;
                Ok(Reply {
                    code: 0,
                    leader,
                    token,
                    ttl_ms,
                })
            }))
            .await;
        combine_leader(&replies)
    }

    async fn leaders(&self, kind: &Name) -> Result<Vec<(Name, LeaderInfo)>, StoreError> {
        // Kinds contain no glob character (see `Name`), so the pattern matches exactly one kind.
        let prefix = format!("{}/lease/{kind}/", self.shared.prefix);
        let pattern = format!("{prefix}*");
        let scans = join_all(self.shared.nodes.iter().map(|node| node.keys(&pattern))).await;
        let reached = scans.iter().filter(|s| s.is_ok()).count();
        if reached < quorum::quorum(self.shared.nodes.len()) {
            return Err(scans
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_else(|| StoreError::Unavailable("no Redis server answered".into())));
        }
        let elections: BTreeSet<Name> = scans
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|key| Name::parse("election", key.strip_prefix(&prefix)?).ok())
            .collect();
        let leaders = join_all(elections.into_iter().map(|election| async {
            let key = ElectionKey {
                kind: kind.clone(),
                election,
            };
            let leader = self.leader(&key).await?;
            Ok::<_, StoreError>(leader.map(|info| (key.election, info)))
        }))
        .await;
        leaders.into_iter().filter_map(Result::transpose).collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<LeaseChange> {
        self.shared.changes.subscribe()
    }

    async fn check(&self) -> Result<(), StoreError> {
        let pings = self.shared.ping_all().await;
        let up = pings.iter().filter(|p| p.is_ok()).count();
        if up >= quorum::quorum(pings.len()) {
            Ok(())
        } else {
            Err(pings
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_else(|| StoreError::Unavailable("no Redis server answered".into())))
        }
    }
}

/// Keeps a subscription to the change channel on node `index`, forever.
async fn subscribe(shared: Arc<Shared>, index: usize) {
    let node = &shared.nodes[index];
    loop {
        match node.subscribe(&shared.channel).await {
            Ok(mut messages) => {
                while let Some(Ok(message)) = messages.next().await {
                    match message
                        .payload_as::<String>()
                        .ok()
                        .as_deref()
                        .and_then(decode)
                    {
                        Some(change) => shared.announce(change),
                        None => tracing::warn!(
                            node = node.label(),
                            "ignoring a malformed lease change message"
                        ),
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

/// Keeps `disconnected` at the number of endpoints that do not answer PING.
async fn monitor(shared: Arc<Shared>, disconnected: IntGauge) {
    let mut was_down = vec![false; shared.nodes.len()];
    loop {
        let pings = shared.ping_all().await;
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

/// The endpoints of a configuration, each with a label free of credentials.
fn endpoints(config: &StoreConfig) -> Result<Vec<(String, Config)>, EndpointError> {
    let urls: Vec<url::Url> = config
        .urls
        .iter()
        .map(|raw| {
            let url = url::Url::parse(raw)
                .map_err(|err| EndpointError(format!("{:?} is not a URL: {err}", redact(raw))))?;
            match url.scheme() {
                "redis" | "rediss" => Ok(url),
                other => Err(EndpointError(format!(
                    "{:?}: scheme {other:?} is not supported; use redis://",
                    redact(raw)
                ))),
            }
        })
        .collect::<Result<_, _>>()?;
    let host_port = |url: &url::Url| -> Result<(String, u16), EndpointError> {
        let host = url
            .host_str()
            .ok_or_else(|| EndpointError(format!("{:?} has no host", redact(url.as_str()))))?;
        Ok((host.to_owned(), url.port().unwrap_or(6379)))
    };
    let credentials = |url: &url::Url, config: &mut Config| -> Result<(), EndpointError> {
        if !url.username().is_empty() {
            config.username = Some(url.username().to_owned());
        }
        config.password = url.password().map(str::to_owned);
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() {
            config.database = db.parse().map_err(|_| {
                EndpointError(format!(
                    "{:?}: database {db:?} is not a number",
                    redact(url.as_str())
                ))
            })?;
        }
        Ok(())
    };
    let first = urls
        .first()
        .ok_or_else(|| EndpointError("at least one Redis URL is needed".into()))?;
    match config.mode {
        StoreMode::Single => urls
            .iter()
            .map(|url| {
                let (host, port) = host_port(url)?;
                let mut endpoint = Config::default();
                endpoint.server = ServerConfig::Standalone {
                    host: host.clone(),
                    port,
                };
                credentials(url, &mut endpoint)?;
                Ok((format!("{host}:{port}"), endpoint))
            })
            .collect(),
        StoreMode::Failover => {
            let mut sentinel = SentinelConfig::default();
            sentinel.instances = urls.iter().map(host_port).collect::<Result<_, _>>()?;
            sentinel.service_name = config.master.clone();
            let mut endpoint = Config::default();
            credentials(first, &mut endpoint)?;
            endpoint.server = ServerConfig::Sentinel(sentinel);
            Ok(vec![(
                format!("sentinel master {}", config.master),
                endpoint,
            )])
        }
        StoreMode::Cluster => {
            let mut nodes = Vec::new();
            for url in &urls {
                nodes.push(host_port(url)?);
                for (name, value) in url.query_pairs() {
                    if name == "addr" {
                        let (host, port) = value.rsplit_once(':').ok_or_else(|| {
                            EndpointError(format!("addr={value:?} is not host:port"))
                        })?;
                        let port = port
                            .parse()
                            .map_err(|_| EndpointError(format!("addr={value:?}: bad port")))?;
                        nodes.push((host.to_owned(), port));
                    }
                }
            }
            let mut cluster = ClusterConfig::default();
            cluster.nodes = nodes;
            let mut endpoint = Config::default();
            credentials(first, &mut endpoint)?;
            endpoint.database = 0;
            endpoint.server = ServerConfig::Cluster(cluster);
            Ok(vec![("cluster".to_owned(), endpoint)])
        }
        StoreMode::Memory | StoreMode::Sharding => Err(EndpointError(format!(
            "EA_REDIS_MODE={} is not a Redis mode this agent serves",
            config.mode.as_str()
        ))),
    }
}

/// `raw` with any password replaced, for messages.
fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests;

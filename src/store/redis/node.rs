//! One Redis endpoint — a standalone server, a Sentinel-managed master, or a Cluster — reached
//! through one multiplexed `rustis` client.
//!
//! Clients are created on first use rather than at start-up, so the agent starts (not ready)
//! while Redis is down; once connected, `rustis` reconnects by itself (and follows a Sentinel
//! failover). Every call is bounded by the operation timeout; a call that merely ran out of time
//! leaves its connection alone — a paused or slow server is not helped by reconnecting, and the
//! calls still in flight on it would be lost. Scripts are called by SHA and loaded again when a
//! server answers NOSCRIPT (after a restart or a failover). A Cluster is reached through
//! [`ClusterRouter`]. Subscriptions get a connection of their own, so that losing one (e.g.
//! `CLIENT KILL TYPE pubsub`) costs no command in flight.

use std::{
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use rustis::{
    client::{Client, ClientPreparedCommand, Config, ReconnectionConfig, ServerConfig},
    commands::{ConnectionCommands, PubSubCommands, ScriptingCommands},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{cluster::ClusterRouter, replicas::ReplicaAcks};
use crate::store::StoreError;

/// A Lua script, identified on the servers by its SHA1 once loaded.
pub(crate) struct Script {
    name: &'static str,
    text: &'static str,
    sha: OnceLock<String>,
    /// Always sent with its text (EVAL), never by SHA: it must run on a server in the order it
    /// was sent there, which a retry after NOSCRIPT would break.
    in_order: bool,
}

impl Script {
    pub(crate) const fn new(name: &'static str, text: &'static str) -> Self {
        Self {
            name,
            text,
            sha: OnceLock::new(),
            in_order: false,
        }
    }

    /// A script that runs in the order it was sent; see [`Script::in_order`]. For small scripts
    /// called rarely: its text goes with every call.
    pub(crate) const fn in_order(name: &'static str, text: &'static str) -> Self {
        Self {
            name,
            text,
            sha: OnceLock::new(),
            in_order: true,
        }
    }

    /// The script's text (for tools such as the benchmark).
    pub(crate) fn text(&self) -> &'static str {
        self.text
    }
}

/// `lease.lua`: one command of the lease engine.
pub(crate) static LEASE: Script = Script::new("lease.lua", include_str!("lease.lua"));
/// `leader.lua`: the live leader of one election.
pub(crate) static LEADER: Script = Script::new("leader.lua", include_str!("leader.lua"));
/// `align.lua`: sets a granted lease's token to the one reported (Redlock). Queued behind the
/// grant on a server that has not answered, it must run right after it.
pub(crate) static ALIGN: Script = Script::in_order("align.lua", include_str!("align.lua"));
/// `live.lua`: a batch of a kind's live elections, from its index.
pub(crate) static LIVE: Script = Script::new("live.lua", include_str!("live.lua"));
/// `index.lua`: keeps a kind's index where `lease.lua` cannot (Cluster).
pub(crate) static INDEX: Script = Script::new("index.lua", include_str!("index.lua"));
/// `release.lua`: undoes a partial grant (Redlock); in order, as `align.lua`.
pub(crate) static RELEASE: Script = Script::in_order("release.lua", include_str!("release.lua"));

/// A client, and where writes must be acknowledged by replicas its group commit.
#[derive(Clone)]
pub(crate) struct Connection {
    /// The multiplexed client.
    pub(crate) client: Client,
    /// Group commit of its writes (Sentinel, Cluster).
    pub(crate) acks: Option<Arc<ReplicaAcks>>,
}

impl Connection {
    /// `client`, with a group commit when `durability` asks for replica acknowledgements.
    pub(crate) fn new(client: Client, durability: Option<(usize, Duration)>) -> Self {
        let acks =
            durability.map(|(replicas, wait)| ReplicaAcks::new(client.clone(), replicas, wait));
        Self { client, acks }
    }
}

/// One Redis endpoint; see the module documentation.
pub(crate) struct Node {
    label: String,
    timeout: Duration,
    /// How many replicas must acknowledge a write before it is reported, and how long to wait
    /// for them (Sentinel, Cluster); `None` for a standalone server.
    durability: Option<(usize, Duration)>,
    /// Held while a script is loaded on this endpoint, so that the calls that find it missing
    /// (the first ones, or all those in flight after a restart or a failover) load it once, not
    /// once each: thousands of copies of the text at once made the agent's memory peak.
    loading: tokio::sync::Mutex<()>,
    backend: Backend,
}

enum Backend {
    /// A standalone server, or the master a Sentinel set names: one client.
    Direct {
        config: Config,
        client: RwLock<Option<(Connection, Instant)>>,
        connecting: tokio::sync::Mutex<()>,
    },
    /// A Redis Cluster: one client per master, routed by slot.
    Cluster(ClusterRouter),
}

/// A client that failed (not merely ran out of time) is replaced by a new one, which finds the
/// Sentinel master afresh, at most this often.
const REPLACE_FAILED_CLIENT_AFTER: Duration = Duration::from_secs(2);
/// How long a lost connection waits before each attempt to connect again (`rustis`' default is
/// a second; a restarted server should be served again sooner).
const RECONNECT_DELAY_MS: u32 = 200;

impl Node {
    /// An endpoint named `label` in messages (never containing credentials). A write is reported
    /// only once `replicas` replicas acknowledged it (waiting `wait` at most), if that is > 0 and
    /// the endpoint is a Sentinel master or a Cluster.
    pub(crate) fn new(
        label: String,
        mut config: Config,
        timeout: Duration,
        (replicas, wait): (usize, Duration),
    ) -> Self {
        config.connect_timeout = timeout;
        config.connection_name = "election-agent".into();
        config.reconnection = ReconnectionConfig::new_constant(0, RECONNECT_DELAY_MS);
        let durability = match &config.server {
            ServerConfig::Sentinel(_) | ServerConfig::Cluster(_) if replicas > 0 => {
                Some((replicas, wait))
            }
            _ => None,
        };
        let backend = match &config.server {
            ServerConfig::Cluster(cluster) => Backend::Cluster(ClusterRouter::new(
                cluster.nodes.clone(),
                config.clone(),
                durability,
            )),
            _ => Backend::Direct {
                config,
                client: RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
            },
        };
        Self {
            label,
            timeout,
            durability,
            loading: tokio::sync::Mutex::new(()),
            backend,
        }
    }

    /// Whether this is a Redis Cluster, whose keys of one call must share a slot.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// The endpoint's name in messages.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn error(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("Redis {}: {what}: {err}", self.label))
    }

    /// The client for `key` (any master of a Cluster without a key).
    async fn client(&self, key: Option<&str>) -> Result<Client, StoreError> {
        Ok(self.connection(key).await?.client)
    }

    /// The connection for `key` (any master of a Cluster without a key).
    async fn connection(&self, key: Option<&str>) -> Result<Connection, StoreError> {
        let (config, client, connecting) = match &self.backend {
            Backend::Cluster(router) => {
                return router
                    .client(key)
                    .await
                    .map_err(|err| self.error("cluster", err));
            }
            Backend::Direct {
                config,
                client,
                connecting,
            } => (config, client, connecting),
        };
        let cached = || {
            client
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .filter(|(connection, _)| !connection.client.is_terminated())
                .map(|(connection, _)| connection.clone())
        };
        if let Some(client) = cached() {
            return Ok(client);
        }
        // One connection attempt at a time; the others wait for its result.
        let _connecting = connecting.lock().await;
        if let Some(client) = cached() {
            return Ok(client);
        }
        // Boxed: `rustis`' connect future is tens of KiB; inline, every command's future would
        // carry (and copy) it although it runs only when (re)connecting.
        let connected = Box::pin(Client::connect(config.clone()))
            .await
            .map_err(|err| self.error("cannot connect", err))?;
        load_scripts(&connected)
            .await
            .map_err(|err| self.error("cannot load the scripts", err))?;
        let connected = Connection::new(connected, self.durability);
        *client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((connected.clone(), Instant::now()));
        Ok(connected)
    }

    /// After a failure: a Cluster reads its slot map again; a direct client that has had time to
    /// prove itself is forgotten, so the next call connects afresh.
    fn after_failure(&self) {
        match &self.backend {
            Backend::Cluster(router) => router.invalidate(),
            Backend::Direct { client, .. } => {
                let mut client = client
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if client
                    .as_ref()
                    .is_some_and(|(_, since)| since.elapsed() >= REPLACE_FAILED_CLIENT_AFTER)
                {
                    *client = None;
                }
            }
        }
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(self.error(
                    "no answer",
                    format!("operation timeout of {:?} ran out", self.timeout),
                ))
            })
    }

    /// A command failed: when the connection failed, or reached a master that is one no more
    /// (`READONLY`, `UNBLOCKED` by a demotion), see [`after_failure`]; other error replies
    /// (`NOREPLICAS`, `LOADING`...) say nothing against the connection.
    ///
    /// [`after_failure`]: Self::after_failure
    fn failed(&self, what: &str, err: rustis::Error) -> StoreError {
        use rustis::RedisErrorKind::{Readonly, Unblocked};
        let demoted = matches!(
            err.kind(),
            rustis::ErrorKind::Redis(redis) if matches!(redis.kind, Readonly | Unblocked)
        );
        if err.is_connection_error() || demoted {
            self.after_failure();
        }
        self.error(what, err)
    }

    /// Runs `script`, which only reads, on `key` with `args`. In a Cluster, a command refused
    /// because the slot moved (or its master is gone) is routed again once, with a fresh slot map.
    pub(crate) async fn eval<R: DeserializeOwned>(
        &self,
        script: &Script,
        keys: &[&str],
        args: impl Serialize + Clone,
    ) -> Result<R, StoreError> {
        self.write(script, keys, args, |_: &R| false).await
    }

    /// Runs `script`, which may write, on `key` with `args`, as [`eval`](Self::eval) does — and
    /// on a Sentinel master or a Cluster, when its reply says it `wrote`, reports it only once the
    /// required replicas acknowledged it (see [`ReplicaAcks`]): an acknowledged write survives a
    /// failover.
    pub(crate) async fn write<R: DeserializeOwned>(
        &self,
        script: &Script,
        keys: &[&str],
        args: impl Serialize + Clone,
        wrote: impl Fn(&R) -> bool,
    ) -> Result<R, StoreError> {
        self.bounded(async {
            let mut rerouted = false;
            loop {
                // Keys of one call share a slot: the first routes it.
                let connection = self.connection(keys.first().copied()).await?;
                let reconnections = connection.acks.as_ref().map(|acks| acks.reconnections());
                match run(
                    &connection.client,
                    &self.loading,
                    script,
                    keys,
                    args.clone(),
                )
                .await
                {
                    Ok(reply) => {
                        if let (Some(acks), Some(reconnections), true) =
                            (&connection.acks, reconnections, wrote(&reply))
                        {
                            acks.after_write(reconnections)
                                .await
                                .map_err(|err| self.error(script.name, err))?;
                        }
                        return Ok(reply);
                    }
                    Err(err) => match &self.backend {
                        Backend::Cluster(router) if !rerouted && is_rerouting(&err) => {
                            router.invalidate();
                            rerouted = true;
                        }
                        _ => return Err(self.failed(script.name, err)),
                    },
                }
            }
        })
        .await
    }

    /// Publishes `message` on `channel` (a Cluster forwards it to every node) without waiting
    /// for the answer, when connected; a server that is not connected is skipped — its
    /// subscribers resynchronise when they connect again.
    pub(crate) fn publish(&self, channel: &str, message: &str) {
        let client = match &self.backend {
            Backend::Cluster(router) => router.connected(),
            Backend::Direct { client, .. } => client
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map(|(connection, _)| connection.client.clone()),
        };
        if let Some(client) = client.filter(|c| !c.is_terminated()) {
            // An error only means the connection is gone; nothing waits for the answer.
            let _ = client.publish(channel, message).forget();
        }
    }

    /// Succeeds when the endpoint (every master of a Cluster) answers PING within the timeout.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            for client in self.clients().await? {
                client
                    .ping::<()>(())
                    .await
                    .map_err(|err| self.failed("PING", err))?;
            }
            Ok(())
        })
        .await
    }

    /// Subscribes to `channel` on a connection of its own (to any master of a Cluster, which
    /// forwards every message to every node). The client is returned with the stream, to watch
    /// its reconnections and check that it still answers.
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<(Client, rustis::client::PubSubStream), StoreError> {
        self.bounded(async {
            let client = match &self.backend {
                Backend::Cluster(router) => router.connect_any().await,
                Backend::Direct { config, .. } => Box::pin(Client::connect(config.clone()))
                    .await
                    .map_err(|err| err.to_string()),
            }
            .map_err(|err| self.error("cannot connect to subscribe", err))?;
            let stream = client
                .subscribe(channel)
                .await
                .map_err(|err| self.error("SUBSCRIBE", err))?;
            Ok((client, stream))
        })
        .await
    }

    /// Succeeds when `client` (a subscription's) answers PING within the operation timeout.
    pub(crate) async fn ping_client(&self, client: &Client) -> Result<(), StoreError> {
        match tokio::time::timeout(self.timeout, client.ping::<()>(())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(self.error("PING", err)),
            Err(_) => Err(self.error("PING", "no answer")),
        }
    }

    /// The one client, or one per Cluster master.
    async fn clients(&self) -> Result<Vec<Client>, StoreError> {
        match &self.backend {
            Backend::Cluster(router) => router
                .masters()
                .await
                .map_err(|err| self.error("cluster", err)),
            Backend::Direct { .. } => Ok(vec![self.client(None).await?]),
        }
    }
}

/// The scripts called by SHA.
static CALLED_BY_SHA: [&Script; 4] = [&LEASE, &LEADER, &LIVE, &INDEX];

/// Loads every script called by SHA on a new connection, before any command can be sent on it.
///
/// Loading a script on first use let a command overtake an earlier one on the same server: the
/// first command waited for SCRIPT LOAD's answer before sending EVALSHA, while a command sent
/// meanwhile (its SHA already known from another server) went straight through — found when a
/// Redlock renewal, sent right after the campaign was answered, ran before that campaign on the
/// server whose first connection was slow, and was granted as a new lease. After a restart or a
/// failover the scripts are gone again and commands in flight load them (see [`run`]); lease
/// commands reordered then are settled by their late answers (`settle_late` in mod.rs).
pub(crate) async fn load_scripts(client: &Client) -> Result<(), rustis::Error> {
    futures::future::try_join_all(CALLED_BY_SHA.iter().map(|script| async move {
        let sha: String = client.script_load(script.text).await?;
        let _ = script.sha.set(sha);
        Ok::<_, rustis::Error>(())
    }))
    .await
    .map(drop)
}

/// Runs a script by SHA, loading it first where the server does not know it (after a restart or
/// a failover: a new connection has them all, see [`load_scripts`]) — one load at a time per
/// endpoint (`loading`).
async fn run<R: DeserializeOwned>(
    client: &Client,
    loading: &tokio::sync::Mutex<()>,
    script: &Script,
    keys: &[&str],
    args: impl Serialize + Clone,
) -> Result<R, rustis::Error> {
    if script.in_order {
        return client.eval::<R>(script.text, keys, args).await;
    }
    if let Some(sha) = script.sha.get() {
        match client.evalsha::<R>(sha.as_str(), keys, args.clone()).await {
            Err(err) if is_no_script(&err) => {}
            result => return result,
        }
    }
    // Boxed: the first call and NOSCRIPT are rare; the common path stays small.
    Box::pin(async {
        let _one_load_at_a_time = loading.lock().await;
        // Another call may have loaded it while this one waited.
        if let Some(sha) = script.sha.get() {
            match client.evalsha::<R>(sha.as_str(), keys, args.clone()).await {
                Err(err) if is_no_script(&err) => {}
                result => return result,
            }
        }
        let sha: String = client.script_load(script.text).await?;
        let reply = client.evalsha::<R>(sha.as_str(), keys, args).await;
        let _ = script.sha.set(sha);
        reply
    })
    .await
}

fn is_no_script(err: &rustis::Error) -> bool {
    matches!(
        err.kind(),
        rustis::ErrorKind::Redis(redis) if matches!(redis.kind, rustis::RedisErrorKind::NoScript)
    )
}

/// Whether a Cluster command failed because of where it was sent, so that another slot map may
/// route it right.
fn is_rerouting(err: &rustis::Error) -> bool {
    use rustis::RedisErrorKind::{Ask, ClusterDown, Moved, TryAgain};
    err.is_connection_error()
        || err.is_timeout()
        || matches!(
            err.kind(),
            rustis::ErrorKind::Redis(redis)
                if matches!(redis.kind, Moved { .. } | Ask { .. } | ClusterDown | TryAgain)
        )
}

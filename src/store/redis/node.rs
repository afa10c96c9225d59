//! One Redis endpoint — a standalone server, a Sentinel-managed master, or a Cluster — reached
//! through one multiplexed `rustis` client.
//!
//! The client is created on first use rather than at start-up, so the agent starts (not ready)
//! while Redis is down; once connected, `rustis` reconnects by itself. Every call is bounded by
//! the operation timeout. Scripts are called by SHA and loaded again when a server answers
//! NOSCRIPT (after a restart or a failover).

use std::{
    sync::{OnceLock, RwLock},
    time::{Duration, Instant},
};

use rustis::{
    client::{Client, Config, ServerConfig},
    commands::{ClusterCommands, ConnectionCommands, PubSubCommands, ScriptingCommands},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::store::StoreError;

/// A Lua script, identified on the servers by its SHA1 once loaded.
pub(crate) struct Script {
    name: &'static str,
    text: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    pub(crate) const fn new(name: &'static str, text: &'static str) -> Self {
        Self {
            name,
            text,
            sha: OnceLock::new(),
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
/// `raise.lua`: raises a fencing token (Redlock).
pub(crate) static RAISE: Script = Script::new("raise.lua", include_str!("raise.lua"));
/// `release.lua`: undoes a partial grant (Redlock).
pub(crate) static RELEASE: Script = Script::new("release.lua", include_str!("release.lua"));

/// One Redis endpoint; see the module documentation.
pub(crate) struct Node {
    label: String,
    config: Config,
    client: RwLock<Option<(Client, Instant)>>,
    connecting: tokio::sync::Mutex<()>,
    timeout: Duration,
}

/// A client that failed is replaced by a new one (which discovers the Sentinel master or the
/// Cluster topology afresh from the configured addresses) at most this often. `rustis`
/// reconnects by itself, but to the topology it knew: after a failover that can be a dead end.
const REPLACE_FAILED_CLIENT_AFTER: Duration = Duration::from_secs(2);

impl Node {
    /// An endpoint named `label` in messages (never containing credentials).
    pub(crate) fn new(label: String, mut config: Config, timeout: Duration) -> Self {
        config.connect_timeout = timeout;
        config.connection_name = "election-agent".into();
        Self {
            label,
            config,
            client: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            timeout,
        }
    }

    /// The endpoint's name in messages.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn error(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("Redis {}: {what}: {err}", self.label))
    }

    fn cached(&self) -> Option<Client> {
        self.client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(client, _)| !client.is_terminated())
            .map(|(client, _)| client.clone())
    }

    /// After a failure: forgets the client if it has had time to prove itself, so the next call
    /// connects afresh.
    fn replace_if_failing(&self) {
        let mut client = self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if client
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed() >= REPLACE_FAILED_CLIENT_AFTER)
        {
            *client = None;
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        if let Some(client) = self.cached() {
            return Ok(client);
        }
        // One connection attempt at a time; the others wait for its result.
        let _connecting = self.connecting.lock().await;
        if let Some(client) = self.cached() {
            return Ok(client);
        }
        let client = Client::connect(self.config.clone())
            .await
            .map_err(|err| self.error("cannot connect", err))?;
        *self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((client.clone(), Instant::now()));
        Ok(client)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(self.error(
                    "no answer",
                    format!("operation timeout of {:?} ran out", self.timeout),
                ))
            });
        if result.is_err() {
            self.replace_if_failing();
        }
        result
    }

    /// Runs `script` on `key` with `args`.
    pub(crate) async fn eval<R: DeserializeOwned>(
        &self,
        script: &Script,
        key: &str,
        args: impl Serialize + Clone,
    ) -> Result<R, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            if let Some(sha) = script.sha.get() {
                match client.evalsha::<R>(sha.as_str(), key, args.clone()).await {
                    Ok(reply) => return Ok(reply),
                    Err(err) if !is_no_script(&err) => return Err(self.error(script.name, err)),
                    Err(_) => {}
                }
            }
            // Not loaded on this server yet (first use, a restart, a failover): load and retry.
            let sha: String = client
                .script_load(script.text)
                .await
                .map_err(|err| self.error(script.name, err))?;
            let reply = client
                .evalsha::<R>(sha.as_str(), key, args)
                .await
                .map_err(|err| self.error(script.name, err));
            let _ = script.sha.set(sha);
            reply
        })
        .await
    }

    /// Publishes `message` on `channel`.
    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            client
                .publish(channel, message)
                .await
                .map(|_: usize| ())
                .map_err(|err| self.error("PUBLISH", err))
        })
        .await
    }

    /// Succeeds when the endpoint answers PING within the timeout.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            client
                .ping::<()>(())
                .await
                .map_err(|err| self.error("PING", err))
        })
        .await
    }

    /// Subscribes to `channel` (the subscription survives reconnections).
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<rustis::client::PubSubStream, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            client
                .subscribe(channel)
                .await
                .map_err(|err| self.error("SUBSCRIBE", err))
        })
        .await
    }

    /// Every key matching `pattern` (which must contain no glob character but a final `*`). In a
    /// Cluster every master is scanned, since each holds only its own slots.
    pub(crate) async fn keys(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            if !matches!(self.config.server, ServerConfig::Cluster(_)) {
                return scan(&client, pattern)
                    .await
                    .map_err(|err| self.error("SCAN", err));
            }
            let nodes: String = client
                .cluster_nodes()
                .await
                .map_err(|err| self.error("CLUSTER NODES", err))?;
            let mut keys = Vec::new();
            for (host, port) in cluster_masters(&nodes) {
                let mut config = self.config.clone();
                config.server = ServerConfig::Standalone { host, port };
                let master = Client::connect(config)
                    .await
                    .map_err(|err| self.error("cannot connect to a cluster master", err))?;
                let scanned = scan(&master, pattern).await;
                let _ = master.close().await;
                keys.extend(scanned.map_err(|err| self.error("SCAN", err))?);
            }
            Ok(keys)
        })
        .await
    }
}

async fn scan(client: &Client, pattern: &str) -> Result<Vec<String>, rustis::Error> {
    use rustis::commands::{GenericCommands, ScanOptions};
    let mut keys = Vec::new();
    let mut cursor = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = client
            .scan(
                cursor,
                ScanOptions::default().match_pattern(pattern).count(1_000),
            )
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The `(host, port)` of every live master in a `CLUSTER NODES` reply.
fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let is_live_master = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "fail?");
            let (host, port) = address.split(['@', ',']).next()?.rsplit_once(':')?;
            is_live_master.then(|| Some((host.to_owned(), port.parse().ok()?)))?
        })
        .collect()
}

fn is_no_script(err: &rustis::Error) -> bool {
    matches!(
        err.kind(),
        rustis::ErrorKind::Redis(redis) if matches!(redis.kind, rustis::RedisErrorKind::NoScript)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_masters_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master,fail - 0 1 3 disconnected
e7d1 127.0.0.1:30001@40001,host1 myself,master - 0 0 1 connected 0-5460
";
        assert_eq!(
            super::cluster_masters(nodes),
            [
                ("127.0.0.1".to_string(), 30002),
                ("127.0.0.1".to_string(), 30001)
            ]
        );
    }
}

//! Slot routing for Redis Cluster, over one standalone `rustis` client per master.
//!
//! `rustis`' own cluster client (0.27) cannot build a client while `CLUSTER SHARDS` still lists a
//! failed master that lost its slots — exactly the state right after a failover, until the dead
//! node is restarted or forgotten. Every command this store sends names one key (or none), so
//! routing is simple: the slot map comes from `CLUSTER SLOTS`, which lists only nodes that serve
//! slots, and is read again after MOVED, ASK or a connection failure.

use std::{collections::HashMap, sync::RwLock, time::Duration};

use rustis::{
    client::{Client, Config, ServerConfig},
    resp::{Value, cmd},
};

use super::node::{Connection, load_scripts};

/// A node address.
pub(crate) type Address = (String, u16);

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;
/// How long one node may take to answer `CLUSTER SLOTS` before the next one is asked.
const SLOTS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Routes keys to the masters of one Redis Cluster.
pub(crate) struct ClusterRouter {
    seeds: Vec<Address>,
    template: Config,
    /// Replica acknowledgements each master's writes need (see `Connection`).
    durability: Option<(usize, Duration)>,
    routing: RwLock<Routing>,
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Routing {
    /// `(first slot, last slot, master)`, sorted.
    ranges: Vec<(u16, u16, Address)>,
    clients: HashMap<Address, Connection>,
}

impl ClusterRouter {
    /// A router that discovers the cluster from `seeds`, connecting with `template`'s
    /// credentials and timeouts; writes need `durability` replica acknowledgements.
    pub(crate) fn new(
        seeds: Vec<Address>,
        template: Config,
        durability: Option<(usize, Duration)>,
    ) -> Self {
        Self {
            seeds,
            template,
            durability,
            routing: RwLock::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn routing(&self) -> std::sync::RwLockReadGuard<'_, Routing> {
        self.routing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The master serving `key`, or any master without a key.
    pub(crate) async fn client(&self, key: Option<&str>) -> Result<Connection, String> {
        if let Some(client) = self.lookup(key) {
            return Ok(client);
        }
        // Boxed: connecting is rare and its future large; inline, every command would carry it.
        Box::pin(self.refresh()).await?;
        self.lookup(key)
            .ok_or_else(|| "no master serves the slot".to_owned())
    }

    fn lookup(&self, key: Option<&str>) -> Option<Connection> {
        let routing = self.routing();
        let address = match key {
            Some(key) => {
                let slot = slot(key);
                &routing
                    .ranges
                    .iter()
                    .find(|(first, last, _)| (*first..=*last).contains(&slot))?
                    .2
            }
            None => &routing.ranges.first()?.2,
        };
        routing.clients.get(address).cloned()
    }

    /// A client for some master, if one is connected now (no slot map is read).
    pub(crate) fn connected(&self) -> Option<Client> {
        self.lookup(None).map(|connection| connection.client)
    }

    /// A new client (a connection of its own) to a master of the current slot map.
    pub(crate) async fn connect_any(&self) -> Result<Client, String> {
        if self.routing().ranges.is_empty() {
            Box::pin(self.refresh()).await?;
        }
        // Any master will do; a random one, so that retries after one that died try the others.
        let master = {
            let routing = self.routing();
            let at = fastrand::usize(..routing.ranges.len().max(1));
            routing
                .ranges
                .get(at)
                .map(|(_, _, master)| master.clone())
                .ok_or_else(|| "no master serves a slot".to_owned())?
        };
        self.connect(&master).await
    }

    /// A client for every master.
    pub(crate) async fn masters(&self) -> Result<Vec<Client>, String> {
        if self.routing().ranges.is_empty() {
            Box::pin(self.refresh()).await?;
        }
        Ok(self
            .routing()
            .clients
            .values()
            .map(|connection| connection.client.clone())
            .collect())
    }

    /// Forgets the slot map, so the next command reads it again.
    pub(crate) fn invalidate(&self) {
        self.routing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ranges
            .clear();
    }

    /// Reads the slot map from the first node that answers (known masters first, then the
    /// seeds) and connects to every master in it.
    async fn refresh(&self) -> Result<(), String> {
        let _refreshing = self.refreshing.lock().await;
        if !self.routing().ranges.is_empty() {
            return Ok(()); // Another caller refreshed it meanwhile.
        }
        let known: Vec<Address> = self.routing().clients.keys().cloned().collect();
        let mut last_error = "no cluster node configured".to_owned();
        for address in known.iter().chain(&self.seeds) {
            let client = match self.connect(address).await {
                Ok(client) => client,
                Err(err) => {
                    last_error = err;
                    continue;
                }
            };
            // Bounded: a paused node must not hold up the routing of every other slot.
            let asked = client.send(cmd("CLUSTER").arg("SLOTS"), None);
            let slots: Value = match tokio::time::timeout(SLOTS_TIMEOUT, asked).await {
                Ok(Ok(slots)) => slots,
                Ok(Err(err)) => {
                    last_error = format!("CLUSTER SLOTS on {}:{}: {err}", address.0, address.1);
                    continue;
                }
                Err(_) => {
                    last_error = format!("CLUSTER SLOTS on {}:{}: no answer", address.0, address.1);
                    continue;
                }
            };
            let ranges = parse_slots(&slots, &address.0);
            if !covers_every_slot(&ranges) {
                last_error = format!("{}:{} does not see every slot served", address.0, address.1);
                continue;
            }
            let mut clients = HashMap::new();
            for (_, _, master) in &ranges {
                if clients.contains_key(master) {
                    continue;
                }
                let existing = self.routing().clients.get(master).cloned();
                let connection = match existing {
                    Some(connection) if !connection.client.is_terminated() => connection,
                    _ => {
                        let client = self.connect(master).await?;
                        load_scripts(&client).await.map_err(|err| {
                            format!(
                                "cannot load the scripts on {}:{}: {err}",
                                master.0, master.1
                            )
                        })?;
                        Connection::new(client, self.durability)
                    }
                };
                clients.insert(master.clone(), connection);
            }
            *self
                .routing
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Routing { ranges, clients };
            return Ok(());
        }
        Err(last_error)
    }

    async fn connect(&self, (host, port): &Address) -> Result<Client, String> {
        let mut config = self.template.clone();
        config.server = ServerConfig::Standalone {
            host: host.clone(),
            port: *port,
        };
        Client::connect(config)
            .await
            .map_err(|err| format!("cannot connect to {host}:{port}: {err}"))
    }
}

/// The slot ranges of a `CLUSTER SLOTS` reply with their masters; `asked` stands in for an empty
/// IP (the node answering).
fn parse_slots(reply: &Value, asked: &str) -> Vec<(u16, u16, Address)> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    let mut ranges: Vec<_> = entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(fields) = entry else {
                return None;
            };
            let (
                Some(Value::Integer(first)),
                Some(Value::Integer(last)),
                Some(Value::Array(master)),
            ) = (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(ip) if !ip.is_empty() => String::from_utf8(ip.clone()).ok()?,
                Value::SimpleString(ip) if !ip.is_empty() => ip.clone(),
                _ => asked.to_owned(),
            };
            let Value::Integer(port) = master.get(1)? else {
                return None;
            };
            Some((
                u16::try_from(*first).ok()?,
                u16::try_from(*last).ok()?,
                (host, u16::try_from(*port).ok()?),
            ))
        })
        .collect();
    ranges.sort_unstable_by_key(|(first, _, _)| *first);
    ranges
}

fn covers_every_slot(ranges: &[(u16, u16, Address)]) -> bool {
    let mut next = 0u32;
    for (first, last, _) in ranges {
        if u32::from(*first) != next {
            return false;
        }
        next = u32::from(*last) + 1;
    }
    next == u32::from(SLOTS)
}

/// The hash slot of `key` (CRC16/XMODEM of the key, or of its `{hash tag}`, modulo 16384).
pub(crate) fn slot(key: &str) -> u16 {
    let key = key.as_bytes();
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

pub(crate) fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |mut crc, byte| {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
        crc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_computes() {
        assert_eq!(crc16(b"123456789"), 0x31c3, "the CRC16/XMODEM check value");
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(
            slot("{}x"),
            slot("{}x"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(slot("{}x"), slot(""));
    }

    #[test]
    fn the_slot_map_lists_only_masters_that_serve_slots() {
        let node = |ip: &str, port| {
            Value::Array(vec![
                Value::BulkString(ip.as_bytes().to_vec()),
                Value::Integer(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |first, last, master| {
            Value::Array(vec![Value::Integer(first), Value::Integer(last), master])
        };
        let reply = Value::Array(vec![
            range(5461, 16383, node("10.0.0.2", 7001)),
            range(0, 5460, node("", 7000)),
        ]);
        let ranges = parse_slots(&reply, "seed");
        assert_eq!(
            ranges,
            [
                (0, 5460, ("seed".to_string(), 7000)),
                (5461, 16383, ("10.0.0.2".to_string(), 7001))
            ]
        );
        assert!(covers_every_slot(&ranges));
        assert!(!covers_every_slot(&ranges[..1]));
    }
}

//! Writes acknowledged by replicas before they are reported (Sentinel, Cluster), by group commit.
//!
//! Sentinel and Cluster replicate asynchronously: a write the master acknowledged but had not yet
//! sent to its replica is lost when that replica is promoted — a lease nobody else knows of, a
//! fencing token handed out twice. So a write is reported only once `WAIT` says enough replicas
//! have it. `WAIT` blocks the connection it is sent on until then, and every request shares one
//! connection per master, so one `WAIT` per write would serialise them (measured: ~300 requests/s).
//! Instead a write, once answered, asks for the next `WAIT` sent on its connection: one `WAIT`
//! covers every write answered before it was sent (Redis waits for the connection's whole
//! replication offset), and writes answered meanwhile share the one after it.
//!
//! A `WAIT` vouches only for writes made on the same socket: if the client reconnected between a
//! write and the `WAIT` (`rustis` counts reconnections), the write is not vouched for.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustis::{client::Client, commands::GenericCommands};
use tokio::sync::watch;

/// The last `WAIT` answered on one connection.
#[derive(Debug, Clone)]
struct Answered {
    /// Which `WAIT` it was (they are numbered from 1 in the order sent).
    generation: u64,
    /// How many replicas acknowledged, and the client's reconnection count once it answered;
    /// or why it failed.
    result: Result<(usize, u64), String>,
}

/// Group commit of the writes made on one connection; see the module documentation.
pub(crate) struct ReplicaAcks {
    client: Client,
    replicas: usize,
    wait: Duration,
    /// The highest `WAIT` some write waits for.
    wanted: AtomicU64,
    /// `WAIT`s sent so far.
    sent: AtomicU64,
    /// Whether a task is sending `WAIT`s.
    running: Mutex<bool>,
    answered: watch::Sender<Answered>,
}

impl ReplicaAcks {
    /// Group commit on `client`'s connection: `replicas` must acknowledge, within `wait`.
    pub(crate) fn new(client: Client, replicas: usize, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            client,
            replicas,
            wait,
            wanted: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            running: Mutex::new(false),
            answered: watch::Sender::new(Answered {
                generation: 0,
                result: Ok((0, 0)),
            }),
        })
    }

    /// The client's reconnection count: read before a write, handed to [`after_write`].
    ///
    /// [`after_write`]: Self::after_write
    pub(crate) fn reconnections(&self) -> u64 {
        self.client.stats().reconnections
    }

    /// Waits for a `WAIT` sent after now to answer; succeeds if it vouches for a write answered
    /// before this call and made when the client had reconnected `reconnections` times.
    pub(crate) async fn after_write(self: &Arc<Self>, reconnections: u64) -> Result<(), String> {
        let mut answered = self.answered.subscribe();
        let needed = self.sent.load(Ordering::SeqCst) + 1;
        self.wanted.fetch_max(needed, Ordering::SeqCst);
        self.start();
        let last = answered
            .wait_for(|a| a.generation >= needed)
            .await
            .map_err(|_| "the connection is gone".to_owned())?
            .clone();
        match last.result {
            Ok((acknowledged, now)) if now != reconnections => Err(format!(
                "the connection was re-established before {acknowledged} replicas acknowledged \
                 the write"
            )),
            Ok((acknowledged, _)) if acknowledged < self.replicas => Err(format!(
                "the write reached {acknowledged} of the {} replicas that must have it within \
                 {:?} (EA_REDIS_REPLICA_ACKS); a failover could lose it",
                self.replicas, self.wait
            )),
            Ok(_) => Ok(()),
            Err(err) => Err(format!("WAIT: {err}")),
        }
    }

    /// Starts the task that sends `WAIT`s, unless it runs.
    fn start(self: &Arc<Self>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if !*running {
            *running = true;
            tokio::spawn(self.clone().send_waits());
        }
    }

    /// Sends one `WAIT` after another while writes wait for one not yet sent.
    async fn send_waits(self: Arc<Self>) {
        let wait_ms = u64::try_from(self.wait.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        loop {
            {
                // Checked under the lock `start` takes, so no write is left waiting unseen.
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                if self.answered.borrow().generation >= self.wanted.load(Ordering::SeqCst) {
                    *running = false;
                    return;
                }
            }
            let generation = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
            let result = self.client.wait(self.replicas, wait_ms).await;
            let result = result
                .map(|acknowledged| (acknowledged, self.reconnections()))
                .map_err(|err| err.to_string());
            self.answered.send_replace(Answered { generation, result });
        }
    }
}

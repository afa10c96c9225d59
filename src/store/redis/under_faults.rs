//! The Redis stores under real faults, in every mode.
//!
//! One agent runs the client-view safety checker ([`safety`]) while a fault is injected for real —
//! a paused server (SIGSTOP), a blackholed or slowed link (the harness's [`FaultProxy`]), a server
//! restarted with its data, killed pub/sub connections, a Sentinel or Cluster failover — and a
//! second agent replica observes every election through `Observe`. Every run must end with no two
//! leaders at once and fencing tokens rising (the checker), each Observe stream's versions
//! strictly increasing, and a change made after the fault reaching every stream within a second.
//! What each run did is printed (`cargo nextest run under_faults --no-capture`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use super::{RedisStore, quorum};
use crate::{
    config::{StoreConfig, StoreMode},
    election::{ElectionService, EventKind, LeaderEvent},
    lease::{Command, Name, Term, TermBounds},
    metrics::Metrics,
    store::{
        LeaseStore, Store,
        faults::{Fault, FaultProxy},
        safety::{self, Workload},
        servers::{RedisCluster, RedisServer, SentinelSet, kill_pubsub_clients, redis_cli},
    },
};

/// The term of the checker's leases.
const TERM: Duration = Duration::from_millis(500);
/// How long a run lasts, and when in it the fault starts and for how long.
const RUN: Duration = Duration::from_secs(4);
const FAULT_AT: Duration = Duration::from_secs(1);
const FAULT_FOR: Duration = Duration::from_secs(2);
/// How long a store call may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the store may take to serve again after a fault before the next run starts.
const RECOVERY: Duration = Duration::from_secs(40);

/// One way things go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    /// A server (one of three for Redlock, the master otherwise) stops, SIGSTOP, then resumes.
    Paused,
    /// The link to that server drops everything, then heals.
    Blackholed,
    /// The link to that server takes 200 ms each way.
    Slow,
    /// That server crashes (SIGKILL) and restarts at once with its data (AOF, fsync always).
    Restarted,
    /// Every pub/sub connection of every server is killed (`CLIENT KILL TYPE pubsub`).
    PubSubKilled,
    /// Sentinel or Cluster: the master is killed and its replica takes over; the old master
    /// comes back as a replica.
    FailedOver,
}

/// Servers of one mode, every client link behind a [`FaultProxy`], with data kept across
/// restarts.
enum Deployment {
    Single(RedisServer, FaultProxy),
    Redlock(Vec<RedisServer>, Vec<FaultProxy>),
    /// Sharding: three members of two servers each; server `2m + p` is member `m`'s at
    /// position `p`.
    Sharded(Vec<RedisServer>, Vec<FaultProxy>),
    Sentinel(SentinelSet),
    Cluster(RedisCluster),
}

impl Deployment {
    async fn start(mode: &str) -> Self {
        match mode {
            "single" => {
                let server = RedisServer::start_persistent().await;
                let proxy = FaultProxy::start(server.port()).await;
                Self::Single(server, proxy)
            }
            "redlock" => {
                let servers =
                    futures::future::join_all((0..3).map(|_| RedisServer::start_persistent()))
                        .await;
                let proxies =
                    futures::future::join_all(servers.iter().map(|s| FaultProxy::start(s.port())))
                        .await;
                Self::Redlock(servers, proxies)
            }
            "sharding" => {
                let servers =
                    futures::future::join_all((0..6).map(|_| RedisServer::start_persistent()))
                        .await;
                let proxies =
                    futures::future::join_all(servers.iter().map(|s| FaultProxy::start(s.port())))
                        .await;
                Self::Sharded(servers, proxies)
            }
            "sentinel" => Self::Sentinel(SentinelSet::start_proxied_persistent().await),
            "cluster" => Self::Cluster(RedisCluster::start_proxied_persistent().await),
            other => panic!("no such mode {other}"),
        }
    }

    fn config(&self) -> StoreConfig {
        let (mode, urls, master) = match self {
            Self::Single(_, proxy) => (StoreMode::Single, vec![proxy.url()], ""),
            Self::Redlock(_, proxies) => (
                StoreMode::Single,
                proxies.iter().map(FaultProxy::url).collect(),
                "",
            ),
            Self::Sharded(_, proxies) => (
                StoreMode::Sharding,
                proxies
                    .chunks(2)
                    .map(|member| {
                        format!("{}?addr=127.0.0.1:{}", member[0].url(), member[1].port())
                    })
                    .collect(),
                "",
            ),
            Self::Sentinel(set) => (StoreMode::Failover, set.sentinel_urls(), set.master_name()),
            Self::Cluster(cluster) => (StoreMode::Cluster, cluster.urls(), ""),
        };
        StoreConfig {
            mode,
            urls,
            master: master.to_owned(),
            operation_timeout: OPERATION_TIMEOUT,
            server_timeout: Duration::from_millis(100),
            replica_acks: 1,
            key_prefix: "faults".to_owned(),
            retention: Duration::from_secs(86_400),
            tls: Default::default(),
        }
    }

    /// The clock-drift allowance a client of this mode subtracts from its term.
    fn drift(&self) -> Duration {
        match self {
            Self::Redlock(..) | Self::Sharded(..) => quorum::drift(TERM),
            _ => Duration::ZERO,
        }
    }

    /// The troubles this mode is run under.
    fn troubles(&self) -> Vec<Trouble> {
        use Trouble::*;
        match self {
            Self::Single(..) | Self::Redlock(..) | Self::Sharded(..) => {
                vec![PubSubKilled, Slow, Paused, Blackholed, Restarted]
            }
            Self::Sentinel(_) | Self::Cluster(_) => {
                vec![
                    Paused,
                    PubSubKilled,
                    Slow,
                    Restarted,
                    Blackholed,
                    FailedOver,
                ]
            }
        }
    }

    /// The election whose master the Cluster faults hit.
    fn target_key(run: &str) -> String {
        format!("faults/lease/{run}/e0")
    }

    /// Sentinel: which of the two data servers is the master now (as the sentinels say).
    async fn sentinel_master(set: &mut SentinelSet) -> (u16, bool) {
        let sentinel = set.sentinel_ports()[0];
        let reply = redis_cli(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", set.master_name()],
        )
        .await
        .expect("a sentinel answers");
        let announced: u16 = reply
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected master address {reply:?}"));
        let started_as_master = announced == set.master_proxy().port();
        let port = if started_as_master {
            set.master().port()
        } else {
            set.replica().port()
        };
        (port, started_as_master)
    }

    /// The proxy in front of the server the faults hit: the second of three Redlock servers, the
    /// second member's first server in sharding mode,
    /// the master (of `run`'s first election, for a Cluster).
    async fn target_proxy(&mut self, run: &str) -> &FaultProxy {
        match self {
            Self::Single(_, proxy) => proxy,
            Self::Redlock(_, proxies) => &proxies[1],
            Self::Sharded(_, proxies) => &proxies[2],
            Self::Sentinel(set) => {
                if Self::sentinel_master(set).await.1 {
                    set.master_proxy()
                } else {
                    set.replica_proxy()
                }
            }
            Self::Cluster(cluster) => cluster.proxy_for_key(&Self::target_key(run)).await,
        }
    }

    /// The server the faults hit (see [`target_proxy`](Self::target_proxy)).
    async fn target_server(&mut self, run: &str) -> &mut RedisServer {
        match self {
            Self::Single(server, _) => server,
            Self::Redlock(servers, _) => &mut servers[1],
            Self::Sharded(servers, _) => &mut servers[2],
            Self::Sentinel(set) => {
                if Self::sentinel_master(set).await.1 {
                    set.master()
                } else {
                    set.replica()
                }
            }
            Self::Cluster(cluster) => cluster.master_for_key(&Self::target_key(run)).await,
        }
    }

    /// The data server listening on `port`.
    fn server_on(&mut self, port: u16) -> &mut RedisServer {
        let server = match self {
            Self::Single(server, _) => Some(server),
            Self::Redlock(servers, _) | Self::Sharded(servers, _) => {
                servers.iter_mut().find(|s| s.port() == port)
            }
            Self::Sentinel(set) => set.server_on(port),
            Self::Cluster(cluster) => cluster.nodes().iter_mut().find(|s| s.port() == port),
        };
        server.unwrap_or_else(|| panic!("no server on port {port}"))
    }

    /// Every data server's own port.
    fn data_ports(&mut self) -> Vec<u16> {
        match self {
            Self::Single(server, _) => vec![server.port()],
            Self::Redlock(servers, _) | Self::Sharded(servers, _) => {
                servers.iter().map(RedisServer::port).collect()
            }
            Self::Sentinel(set) => vec![set.master().port(), set.replica().port()],
            Self::Cluster(cluster) => cluster.ports(),
        }
    }

    /// Injects `trouble` for [`FAULT_FOR`] (or until a failover is over) and heals it.
    async fn inject(&mut self, trouble: Trouble, run: &str) {
        match trouble {
            Trouble::Paused => {
                // Resumed by port: finding the target asks the servers, and one is paused.
                let server = self.target_server(run).await;
                let port = server.port();
                server.pause().await;
                tokio::time::sleep(FAULT_FOR).await;
                self.server_on(port).resume().await;
            }
            Trouble::Blackholed | Trouble::Slow => {
                let fault = match trouble {
                    Trouble::Slow => Fault::Latency(Duration::from_millis(200)),
                    _ => Fault::Blackhole,
                };
                let proxy = self.target_proxy(run).await;
                proxy.set(fault);
                tokio::time::sleep(FAULT_FOR).await;
                proxy.set(Fault::None);
            }
            Trouble::Restarted => self.target_server(run).await.restart().await,
            Trouble::PubSubKilled => {
                let mut killed = 0;
                for port in self.data_ports() {
                    killed += kill_pubsub_clients(port).await;
                }
                assert!(killed > 0, "no subscription to kill");
            }
            Trouble::FailedOver => match self {
                Self::Sentinel(set) => {
                    let (port, _) = Self::sentinel_master(set).await;
                    set.server_on(port).expect("a data server").stop().await;
                    // The sentinels name the other server (an earlier fault may have swapped the
                    // roles already, so this waits for "not the one stopped").
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while Self::sentinel_master(set).await.0 == port {
                        assert!(Instant::now() < deadline, "{run}: no failover within 30 s");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    set.server_on(port).expect("a data server").restart().await;
                }
                Self::Cluster(cluster) => {
                    let key = Self::target_key(run);
                    cluster.master_for_key(&key).await.stop().await;
                    cluster.wait_until_ok(Duration::from_secs(30)).await;
                    cluster.restart_stopped().await;
                }
                _ => unreachable!("only Sentinel and Cluster fail over"),
            },
        }
    }
}

fn store(config: &StoreConfig) -> RedisStore {
    RedisStore::new(
        config,
        IntGauge::new("disconnected", "test").expect("gauge"),
    )
    .expect("valid configuration")
}

/// An agent replica observing every election of a run, recording what each stream reports.
struct Observers {
    shutdown: CancellationToken,
    streams: Vec<Arc<Mutex<Vec<LeaderEvent>>>>,
}

impl Observers {
    async fn start(config: &StoreConfig, workload: &Workload, run: &str) -> Self {
        let shutdown = CancellationToken::new();
        let service = ElectionService::new(
            Store::Redis(store(config)),
            None,
            TermBounds {
                min: Term::from_millis(1),
                max: Term::from_millis(86_400_000),
            },
            Arc::new(Metrics::new("observer", vec![1.0]).expect("metrics")),
            shutdown.clone(),
        );
        let mut streams = Vec::new();
        for key in workload.keys(run) {
            let events = Box::pin(
                service
                    .observe(key.kind.as_str(), key.election.as_str())
                    .await
                    .expect("observe before the faults"),
            );
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = seen.clone();
            tokio::spawn(events.for_each(move |event| {
                sink.lock().unwrap().push(event);
                async {}
            }));
            streams.push(seen);
        }
        // The streams keep the agent alive until `shutdown` ends them.
        Self { shutdown, streams }
    }

    /// Every stream's versions strictly increase; returns how many events and resynchronisations
    /// (`Current` events after the first) there were.
    fn check_versions(&self) -> (usize, usize) {
        let (mut events, mut resyncs) = (0, 0);
        for (e, stream) in self.streams.iter().enumerate() {
            let stream = stream.lock().unwrap();
            for pair in stream.windows(2) {
                assert!(
                    pair[1].version > pair[0].version,
                    "stream of e{e} went from {:?} to {:?}",
                    pair[0],
                    pair[1]
                );
            }
            events += stream.len();
            resyncs += stream
                .iter()
                .skip(1)
                .filter(|event| event.kind == EventKind::Current)
                .count();
        }
        (events, resyncs)
    }

    /// Waits until every stream's last event names `leader` as leading.
    async fn wait_for_leader(&self, leader: &str, within: Duration) {
        let deadline = Instant::now() + within;
        for (e, stream) in self.streams.iter().enumerate() {
            loop {
                let last = stream.lock().unwrap().last().cloned();
                let leads = last.as_ref().is_some_and(|event| {
                    !matches!(event.kind, EventKind::Resigned | EventKind::Expired)
                        && event.leader.as_ref().map(Name::as_str) == Some(leader)
                });
                if leads {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the stream of e{e} did not report {leader} within {within:?}; last: {last:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Drop for Observers {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Retries a campaign on a probe election until the store serves again.
async fn wait_until_served(store: &RedisStore, run: &str) {
    let probe = crate::lease::ElectionKey {
        kind: Name::parse("kind", run).expect("valid"),
        election: Name::parse("election", "probe").expect("valid"),
    };
    let deadline = Instant::now() + RECOVERY;
    loop {
        let command = Command::Campaign {
            candidate: Name::parse("candidate", "probe").expect("valid"),
            term: Term::from_millis(1_000),
        };
        match store.execute(&probe, command).await {
            Ok(_) => return,
            Err(err) => assert!(
                Instant::now() < deadline,
                "{run}: not served again within {RECOVERY:?}: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the checker and the observers in `mode` under each of its troubles, one at a time.
async fn run_mode(mode: &str) {
    let mut deployment = Deployment::start(mode).await;
    let config = deployment.config();
    let agent = Arc::new(store(&config));
    let workload = Workload::new(TERM, RUN, deployment.drift());
    for trouble in deployment.troubles() {
        let run = format!("{mode}-{trouble:?}").to_lowercase();
        wait_until_served(&agent, &run).await;
        let observers = Observers::start(&config, &workload, &run).await;
        let started = Instant::now();
        let report = safety::check(agent.clone(), &run, workload, async {
            tokio::time::sleep(FAULT_AT).await;
            deployment.inject(trouble, &run).await;
        })
        .await;
        wait_until_served(&agent, &run).await;

        // A change made after the fault reaches every stream.
        for key in workload.keys(&run) {
            let handover = Command::Handover {
                leader: Name::parse("leader", "after").expect("valid"),
                term: Term::from_millis(30_000),
                expected: Default::default(),
            };
            let deadline = Instant::now() + RECOVERY;
            while let Err(err) = agent.execute(&key, handover.clone()).await {
                assert!(Instant::now() < deadline, "{run}: handover failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        observers
            .wait_for_leader("after", Duration::from_secs(1))
            .await;
        let (events, resyncs) = observers.check_versions();
        eprintln!(
            "{mode:>8} {:<13} {report}; observers: {events} events, {resyncs} resynchronisations, \
             versions strictly increasing; {:.1} s",
            format!("{trouble:?}"),
            started.elapsed().as_secs_f64()
        );
        assert!(report.new_leases > 0, "{run}: nobody was ever elected");
        drop(observers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_redis_keeps_one_leader_under_every_fault() {
    run_mode("single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_keeps_one_leader_under_every_fault() {
    run_mode("redlock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharding_keeps_one_leader_under_every_fault() {
    run_mode("sharding").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_keeps_one_leader_under_every_fault() {
    run_mode("sentinel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_one_leader_under_every_fault() {
    run_mode("cluster").await;
}

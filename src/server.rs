//! Runs the agent: builds the store, the service and its adapters from a [`Config`], binds the
//! listeners, and shuts everything down in order.
//!
//! Shutdown (SIGTERM/SIGINT in `main`, or [`RunningAgent::shutdown`]): readiness and gRPC health
//! flip to NOT_SERVING, both servers stop accepting and drain the requests in flight, Observe and
//! watch streams end, and [`RunningAgent::wait`] returns — within `EA_SHUTDOWN_TIMEOUT` at most.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use futures::{FutureExt, Stream, StreamExt};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tonic_health::{
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};
use tower::Layer;

use crate::{
    auth::{self, AuthLayer, Authentication},
    config::{Config, StoreMode},
    discovery::{Discovery, DiscoveryError},
    election::{ElectionError, ElectionService},
    grpc::{self, ElectionGrpc},
    http,
    lease::{Name, Term},
    metrics::Metrics,
    operator::{self, OperatorMetrics},
    store::{MemoryStore, RedisStore, Store, redis::EndpointError},
    transport::{self, Churn, Protocol, Tls, TlsError},
};

/// Health service names reported besides the `Election` service: the overall status (`""`) and
/// the names the Go service's probes use.
const HEALTH_NAMES: [&str; 3] = ["", "liveness", "readiness"];

/// Health names that follow the lease store's readiness; `""` and `liveness` stay SERVING while
/// the process serves, so a liveness probe never restarts the agent over a Redis outage.
const READINESS_NAMES: [&str; 2] = ["readiness", grpc::SERVICE_NAME];

/// How often readiness is checked for the gRPC health service.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the store forgets what it no longer needs.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// How many entries housekeeping must have forgotten at once for the heap to be trimmed.
const TRIM_AFTER_FORGETTING: usize = 1_000;
/// How many connections must have closed, or Observe/watch streams ended, since the last look
/// for the heap to be trimmed.
const TRIM_AFTER_CLOSING: usize = 1_000;

/// The health reporter, and a lock that keeps readiness updates from landing after shutdown
/// has reported NOT_SERVING.
#[derive(Clone)]
struct HealthState {
    reporter: HealthReporter,
    updating: Arc<tokio::sync::Mutex<()>>,
}

/// How long a health Watch stream stays open once shutdown has begun: long enough to deliver
/// NOT_SERVING, short enough not to hold the drain up.
const HEALTH_WATCH_GRACE: Duration = Duration::from_secs(1);

/// Why the agent could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {address}: {source}")]
    Bind {
        /// gRPC or HTTP.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The metrics registry refused a metric.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Redis URLs cannot be used.
    #[error(transparent)]
    Endpoints(#[from] EndpointError),
    /// Kubernetes discovery could not start.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// Authentication could not be set up (a tokens or policy file).
    #[error(transparent)]
    Auth(#[from] auth::LoadError),
    /// The TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A server failed while serving.
    #[error("{what} server failed: {message}")]
    Serve {
        /// gRPC or HTTP.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// Requests were still in flight when the shutdown timeout ran out.
    #[error("requests still in flight after the shutdown timeout of {0:?}")]
    ShutdownTimeout(Duration),
}

/// A started agent.
pub struct RunningAgent {
    /// Where gRPC listens, if enabled.
    pub grpc_address: Option<SocketAddr>,
    /// Where HTTP listens, if enabled.
    pub http_address: Option<SocketAddr>,
    shutdown: CancellationToken,
    health: HealthState,
    servers: JoinSet<Result<(), ServerError>>,
    shutdown_timeout: Duration,
}

/// Builds the store named by the configuration.
fn store(config: &Config, metrics: &Metrics) -> Result<Store, ServerError> {
    match config.store.mode {
        StoreMode::Memory => Ok(Store::Memory(MemoryStore::with_retention(
            config.store.retention,
        ))),
        StoreMode::Single | StoreMode::Failover | StoreMode::Cluster | StoreMode::Sharding => {
            Ok(Store::Redis(RedisStore::new(
                &config.store,
                metrics.disconnected_backends(),
            )?))
        }
    }
}

/// Who this agent is when it campaigns to run the controller: its pod name (`HOSTNAME` in
/// Kubernetes), else `EA_NAME`, with a random suffix — unique to this process, so a restarted
/// agent never takes itself for the replica that held the lease before.
fn controller_identity(name: &str) -> Name {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| name.to_owned());
    let unique = |base: &str| format!("{base}-{:08x}", fastrand::u32(..));
    Name::parse("identity", &unique(&host))
        .or_else(|_| Name::parse("identity", &unique("election-agent")))
        .expect("a valid name")
}

/// Starts the agent: binds every enabled listener and serves until shut down. With
/// `EA_KUBE_ENABLE`, it connects to Kubernetes and starts watching first.
pub async fn start(config: &Config) -> Result<RunningAgent, ServerError> {
    if !config.kube_enabled {
        // TokenReviews need the API server, even without the Kubernetes features.
        let reviews = if config.auth.kubernetes {
            Some(Discovery::connect(config.kube_in_cluster).await?)
        } else {
            None
        };
        return start_with(config, None, None, reviews).await;
    }
    let client = Discovery::connect(config.kube_in_cluster).await?;
    start_with_kubernetes(config, client).await
}

/// Starts the agent over the given Kubernetes client instead of connecting as `EA_KUBE_*` say:
/// discovery watches, and the Election controller if `EA_CONTROLLER_ENABLE` — for tests that
/// record every call the agent makes to the API server.
pub async fn start_with_kubernetes(
    config: &Config,
    client: kube::Client,
) -> Result<RunningAgent, ServerError> {
    let discovery = Discovery::start(&client, &config.kube_namespaces);
    let reviews = config.auth.kubernetes.then(|| client.clone());
    let controller = config.controller_enabled.then_some(client);
    start_with(config, Some(discovery), controller, reviews).await
}

/// Starts the agent over the given discovery instead of connecting to Kubernetes as
/// `EA_KUBE_*` say — for tests and benchmarks over caches of their own.
pub async fn start_with_discovery(
    config: &Config,
    discovery: Discovery,
) -> Result<RunningAgent, ServerError> {
    start_with(config, Some(discovery), None, None).await
}

/// Starts the agent; with `controller`, also the Election controller (through that client);
/// `reviews` is the client bearer tokens are reviewed through (`EA_AUTH_KUBERNETES`).
async fn start_with(
    config: &Config,
    discovery: Option<Discovery>,
    controller: Option<kube::Client>,
    reviews: Option<kube::Client>,
) -> Result<RunningAgent, ServerError> {
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new(
        &config.name,
        config.request_duration_buckets.clone(),
    )?);
    let store = store(config, &metrics)?;
    let service = ElectionService::new(store, discovery, config.terms, metrics, shutdown.clone());
    let authentication =
        Authentication::load(&config.auth, reviews, service.metrics().registry())?.map(Arc::new);
    let (reporter, _) = tonic_health::server::health_reporter();
    let health_service = HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        shutdown: shutdown.clone(),
    });
    let health = HealthState {
        reporter,
        updating: Arc::default(),
    };
    let mut servers = JoinSet::new();

    if let Some(client) = controller {
        let metrics = OperatorMetrics::register(service.metrics().registry())?;
        servers.spawn(
            operator::run(
                client,
                service.clone(),
                metrics,
                controller_identity(&config.name),
                config.kube_namespaces.clone(),
                Term::from_millis(
                    u64::try_from(config.controller_term.as_millis()).unwrap_or(u64::MAX),
                ),
                shutdown.clone(),
            )
            .map(Ok),
        );
    }

    let churn = Arc::new(Churn::default());
    warn_if_descriptors_short(config);
    servers.spawn(housekeeping(
        service.clone(),
        Arc::clone(&churn),
        shutdown.clone(),
    ));
    servers.spawn(follow_readiness(
        service.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let grpc_address = if config.grpc.enable {
        let listener = bind(
            "gRPC",
            SocketAddr::new(config.bind_address, config.grpc.port),
        )
        .await?;
        let address = local_address("gRPC", &listener)?;
        for name in HEALTH_NAMES.into_iter().chain([grpc::SERVICE_NAME]) {
            health
                .reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        // Both reflection versions: older tools (grpcurl < 1.8.8 among them) only speak v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(grpc::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_error = |err: tonic_reflection::server::Error| ServerError::Serve {
            what: "gRPC",
            message: err.to_string(),
        };
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection().build_v1().map_err(reflection_error)?)
            .add_service(reflection().build_v1alpha().map_err(reflection_error)?)
            .add_service(ElectionGrpc::new(service.clone()))
            .prepare();
        let routes = AuthLayer::grpc(authentication.clone()).layer(routes);
        let server = transport::Server::new(
            Protocol::Grpc,
            config.grpc_limits,
            config.timeouts,
            Arc::clone(&churn),
        )
        .with_tls(tls(config, Protocol::Grpc)?);
        servers.spawn(server.serve(listener, routes, shutdown.clone()).map(Ok));
        tracing::info!(%address, tls = config.tls.is_some(), "gRPC API listening");
        Some(address)
    } else {
        None
    };

    let http_address = if config.http.enable {
        let listener = bind(
            "HTTP",
            SocketAddr::new(config.bind_address, config.http.port),
        )
        .await?;
        let address = local_address("HTTP", &listener)?;
        let router = http::router(service.clone(), config.metrics_enabled)
            .layer(AuthLayer::http(authentication));
        let server = transport::Server::new(
            Protocol::Http,
            config.http_limits,
            config.timeouts,
            Arc::clone(&churn),
        )
        .with_tls(tls(config, Protocol::Http)?);
        servers.spawn(server.serve(listener, router, shutdown.clone()).map(Ok));
        tracing::info!(%address, tls = config.tls.is_some(), "HTTP API listening");
        Some(address)
    } else {
        None
    };

    Ok(RunningAgent {
        grpc_address,
        http_address,
        shutdown,
        health,
        servers,
        shutdown_timeout: config.shutdown_timeout,
    })
}

impl RunningAgent {
    /// Starts the shutdown: NOT_SERVING, stop accepting, drain. Returns at once; see [`wait`].
    ///
    /// [`wait`]: RunningAgent::wait
    pub async fn shutdown(&self) {
        let _updating = self.health.updating.lock().await;
        self.shutdown.cancel();
        for name in HEALTH_NAMES.into_iter().chain([grpc::SERVICE_NAME]) {
            self.health
                .reporter
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
    }

    /// Waits until both servers have stopped: after [`shutdown`] once in-flight requests are
    /// done (bounded by the shutdown timeout), or earlier if a server fails.
    ///
    /// [`shutdown`]: RunningAgent::shutdown
    pub async fn wait(self) -> Result<(), ServerError> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `stop` resolves (e.g. on SIGTERM), then shuts down as [`shutdown`] does and
    /// waits as [`wait`] does.
    ///
    /// [`shutdown`]: RunningAgent::shutdown
    /// [`wait`]: RunningAgent::wait
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> Result<(), ServerError> {
        tokio::pin!(stop);
        let mut result = Ok(());
        while !self.shutdown.is_cancelled() {
            tokio::select! {
                () = &mut stop => self.shutdown().await,
                () = self.shutdown.cancelled() => {}
                next = self.servers.join_next() => match next {
                    None => return result,
                    Some(joined) => {
                        if let Err(err) = flatten(joined) {
                            // One server failed: stop the other too, and report the failure.
                            result = Err(err);
                            self.shutdown().await;
                        }
                    }
                },
            }
        }
        let drain = async {
            while let Some(joined) = self.servers.join_next().await {
                if let (Err(err), Ok(())) = (flatten(joined), &result) {
                    result = Err(err);
                }
            }
        };
        tokio::time::timeout(self.shutdown_timeout, drain)
            .await
            .map_err(|_| ServerError::ShutdownTimeout(self.shutdown_timeout))?;
        result
    }
}

fn flatten(
    joined: Result<Result<(), ServerError>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    joined.unwrap_or_else(|err| {
        Err(ServerError::Serve {
            what: "agent",
            message: err.to_string(),
        })
    })
}

/// Keeps the readiness health names at SERVING while the agent is ready (lease store reachable,
/// Kubernetes caches synced once), NOT_SERVING while it is not, until shutdown; and the store's
/// availability gauge at what the store answered.
async fn follow_readiness(
    service: ElectionService,
    health: HealthState,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let mut serving = true;
    while !shutdown.is_cancelled() {
        let ready = service.ready().await;
        // The store is asked first: unsynced caches say nothing about it. When shutting down,
        // `Unavailable` is about the agent, not the store.
        match &ready {
            Ok(()) | Err(ElectionError::Discovery(_)) => {
                service.metrics().set_store_available(true)
            }
            Err(ElectionError::Unavailable(_)) if !shutdown.is_cancelled() => {
                service.metrics().set_store_available(false);
            }
            Err(_) => {}
        }
        let updating = health.updating.lock().await;
        if ready.is_ok() != serving && !shutdown.is_cancelled() {
            serving = ready.is_ok();
            let status = if serving {
                tracing::info!("ready");
                tonic_health::ServingStatus::Serving
            } else {
                tracing::warn!(error = %ready.err().map(|e| e.to_string()).unwrap_or_default(), "not ready");
                tonic_health::ServingStatus::NotServing
            };
            for name in READINESS_NAMES {
                health.reporter.set_service_status(name, status).await;
            }
        }
        drop(updating);

        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(READINESS_INTERVAL) => {}
        }
    }
    Ok(())
}

/// Every [`HOUSEKEEPING_INTERVAL`], makes the store forget what it no longer needs (records of
/// ended leases, old announcements) — and after a burst of names went, or of connections or
/// streams closed (`churn`), hands the memory they took back to the system, which the allocator
/// would otherwise keep.
async fn housekeeping(
    service: ElectionService,
    churn: Arc<Churn>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let forgotten = service.housekeep();
        let closed = churn.take();
        if forgotten >= TRIM_AFTER_FORGETTING || closed >= TRIM_AFTER_CLOSING {
            tracing::debug!(
                forgotten,
                closed,
                "forgot old elections or closed connections; trimming the heap"
            );
            // It takes the allocator's locks for a moment: not on a runtime thread.
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// Returns the free memory of glibc's heaps to the system: glibc returns only the top of each
/// heap by itself, so a burst of small allocations would keep its pages after it was freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: `malloc_trim` has no preconditions; it only releases pages of free chunks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return freed memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// The standard health service, except that Watch streams end after shutdown has begun (once
/// NOT_SERVING had a moment to reach them): an open Watch would otherwise hold the graceful
/// drain up until its timeout.
struct DrainingHealth {
    inner: HealthService,
    shutdown: CancellationToken,
}

type HealthWatchStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthWatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let shutdown = self.shutdown.clone();
        let closing = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(HEALTH_WATCH_GRACE).await;
        };
        Ok(tonic::Response::new(Box::pin(statuses.take_until(closing))))
    }
}

/// A port's TLS, from `EA_TLS_*` (none without).
fn tls(config: &Config, protocol: Protocol) -> Result<Option<Arc<Tls>>, ServerError> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    Ok(Some(Arc::new(Tls::load(files.clone(), protocol.alpn())?)))
}

/// Warns when the process may open fewer files than both ports' connection caps and what the
/// agent needs besides: a flood would then end in failed accepts (each closing an idle
/// connection) instead of meeting the cap.
fn warn_if_descriptors_short(config: &Config) {
    let caps = [
        (config.grpc.enable, config.grpc_limits.max_connections),
        (config.http.enable, config.http_limits.max_connections),
    ];
    let needed = caps
        .iter()
        .filter(|(enabled, _)| *enabled)
        .map(|(_, cap)| transport::descriptors_at_cap(*cap))
        .sum::<usize>()
        + transport::DESCRIPTOR_RESERVE;
    if let Some(limit) = transport::descriptor_limit()
        && limit < needed
    {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what EA_GRPC_MAX_CONNECTIONS and \
             EA_HTTP_MAX_CONNECTIONS may take: raise it (ulimit -n) or lower them"
        );
    }
}

async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, ServerError> {
    transport::listen(address).map_err(|source| ServerError::Bind {
        what,
        address,
        source,
    })
}

fn local_address(what: &'static str, listener: &TcpListener) -> Result<SocketAddr, ServerError> {
    listener.local_addr().map_err(|err| ServerError::Serve {
        what,
        message: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::transport::Channel;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    use super::*;
    use crate::{
        config::Sources,
        grpc::pb::{self, election_client::ElectionClient},
        store::servers::RedisServer,
    };

    /// `GET path` over plain HTTP/1.1: (status, body).
    async fn get(address: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    async fn health(channel: &Channel, service: &str) -> i32 {
        HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition().await {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Unsynced Kubernetes caches make the agent unready, but say nothing about the store: the
    /// store-availability gauge (which an alert watches) follows the store alone — 1 for a store
    /// that answers, 0 for one that does not.
    #[tokio::test]
    async fn unsynced_caches_leave_the_store_available_gauge_to_the_store() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for (store, available) in [
            (vec![("EA_REDIS_MODE", "memory".to_owned())], 1),
            (
                vec![
                    ("EA_REDIS_MODE", "single".to_owned()),
                    ("EA_REDIS_URLS", format!("redis://{closed}")),
                ],
                0,
            ),
        ] {
            let mut sources = Sources::default()
                .flag("EA_BIND_ADDRESS", "127.0.0.1")
                .flag("EA_GRPC_PORT", "0")
                .flag("EA_HTTP_PORT", "0")
                .flag("EA_CONTROLLER_ENABLE", "false");
            for (key, value) in store {
                sources = sources.flag(key, value);
            }
            // An API server that never answers: the caches never sync.
            let (mock, _api) = tower_test::mock::pair::<
                ::http::Request<kube::client::Body>,
                ::http::Response<kube::client::Body>,
            >();
            let agent = start_with_kubernetes(
                &sources.resolve().unwrap(),
                kube::Client::new(mock, "default"),
            )
            .await
            .unwrap();
            let http = agent.http_address.unwrap();
            let gauge =
                format!("election_agent_store_available{{agent=\"election-agent\"}} {available}");
            // Past the first readiness checks.
            tokio::time::sleep(READINESS_INTERVAL * 2).await;
            eventually(&gauge, async || {
                get(http, "/metrics").await.1.contains(&gauge)
            })
            .await;
            let (status, body) = get(http, "/readyz").await;
            assert_eq!(status, 503, "{body}");
            agent.shutdown().await;
            agent.wait().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_redis_outage_makes_the_agent_unready_and_fail_fast_until_redis_returns() {
        let mut redis = RedisServer::start().await;
        let config = Sources::default()
            .flag("EA_BIND_ADDRESS", "127.0.0.1")
            .flag("EA_GRPC_PORT", "0")
            .flag("EA_HTTP_PORT", "0")
            .flag("EA_REDIS_URLS", redis.url())
            .flag("EA_REDIS_OPERATION_TIMEOUT", "500ms")
            .flag("EA_KUBE_ENABLE", "false")
            .resolve()
            .unwrap();
        let agent = start(&config).await.unwrap();
        let http = agent.http_address.unwrap();
        let channel = Channel::from_shared(format!("http://{}", agent.grpc_address.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ElectionClient::new(channel.clone());
        let campaign = pb::CampaignRequest {
            election: "outage".into(),
            candidate: "a".into(),
            term: 5_000,
            kind: String::new(),
        };
        assert!(
            client
                .campaign(campaign.clone())
                .await
                .unwrap()
                .into_inner()
                .elected
        );
        assert_eq!(get(http, "/readyz").await.0, 200);

        redis.stop().await;
        let started = Instant::now();
        let refused = client.campaign(campaign.clone()).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(550),
            "{:?}",
            started.elapsed()
        );
        eventually("/readyz 503", async || get(http, "/readyz").await.0 == 503).await;
        eventually("readiness NOT_SERVING", async || {
            health(&channel, "readiness").await == ServingStatus::NotServing as i32
        })
        .await;
        assert_eq!(
            health(&channel, "liveness").await,
            ServingStatus::Serving as i32
        );
        assert_eq!(get(http, "/livez").await.0, 200);
        eventually("disconnected gauge", async || {
            get(http, "/metrics")
                .await
                .1
                .contains("election_agent_disconnected_redis_backends{agent=\"election-agent\"} 1")
        })
        .await;
        eventually("store unavailable gauge", async || {
            get(http, "/metrics")
                .await
                .1
                .contains("election_agent_store_available{agent=\"election-agent\"} 0")
        })
        .await;
        let metrics = get(http, "/metrics").await.1;
        assert!(
            !metrics.contains("election_agent_unavailable_total{agent=\"election-agent\"} 0"),
            "{metrics}"
        );

        redis.restart().await;
        eventually("/readyz 200", async || get(http, "/readyz").await.0 == 200).await;
        eventually("readiness SERVING", async || {
            health(&channel, "readiness").await == ServingStatus::Serving as i32
        })
        .await;
        eventually("store available gauge", async || {
            get(http, "/metrics")
                .await
                .1
                .contains("election_agent_store_available{agent=\"election-agent\"} 1")
        })
        .await;
        eventually("campaigns served again", async || {
            client.campaign(campaign.clone()).await.is_ok()
        })
        .await;

        agent.shutdown().await;
        agent.wait().await.unwrap();
    }
}

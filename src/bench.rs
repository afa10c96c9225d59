//! `election-agent bench`: a load generator for a running agent, and for `GetPods` over
//! synthetic caches; and `soak`, hours of use in minutes while the agents restart (`soak.rs`).
//!
//! `grpc` and `http` run the Go service's benchmark workload: every client wins one
//! election of its own with one successful campaign, then per iteration its leader extends the
//! term and another candidate campaigns and loses. `names` campaigns on a new election with every
//! request, as a flood of names would. `pods` asks `GetPods` for one Deployment; without
//! `--address` it starts an agent in this process over caches holding a synthetic Deployment, so
//! it needs no cluster.
//!
//! Each client keeps its own latency histogram (merged at the end), so measuring does not contend;
//! a shared counter only feeds the progress display.

use std::{
    collections::BTreeMap,
    future::Future,
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::http::{Method, Request, StatusCode, header};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde::Serialize;

use crate::{
    config::Sources,
    discovery::{Caches, Discovery},
    grpc::pb::{self, election_client::ElectionClient},
    server::{self, ServerError},
};

mod soak;

pub use soak::SoakArgs;

/// Options of `election-agent bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub target: BenchTarget,
}

/// One benchmark.
#[derive(Debug, clap::Subcommand)]
pub enum BenchTarget {
    /// The campaign/extend workload over gRPC.
    Grpc(WorkloadArgs),
    /// The campaign/extend workload over the REST API.
    Http(WorkloadArgs),
    /// A flood of names over gRPC: every request campaigns on an election never used before —
    /// what the agent's and the store's state must stay bounded under.
    Names(WorkloadArgs),
    /// GetPods of one Deployment over gRPC; without --address, from an in-process agent over a
    /// synthetic Deployment.
    Pods(PodsArgs),
    /// Steady leadership traffic and Observe/watch streams for a while, kept going while the
    /// agents and their store are restarted (scripts/soak.sh does): failures by kind, fencing
    /// tokens that must never go backwards, and the agents' memory trend. Exits 1 when a check
    /// fails.
    Soak(SoakArgs),
}

/// Options every benchmark has.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Concurrent clients.
    #[arg(short = 'c', long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Iterations per client.
    #[arg(short = 'i', long, default_value_t = 100)]
    pub iterations: u32,
    /// Connections the clients share (gRPC: HTTP/2 connections, the clients spread over them;
    /// HTTP/1.1: most connections kept open). 0: one per client.
    #[arg(long, default_value_t = 0)]
    pub connections: u32,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of the campaign/extend workload.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// The agent's endpoint (gRPC default http://127.0.0.1:50051, HTTP default
    /// http://127.0.0.1:8080).
    #[arg(long, env = "EA_BENCH_ADDRESS")]
    pub address: Option<String>,
    /// Term of every lease, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub term: i32,
    /// Election kind the benchmark's elections belong to.
    #[arg(long, default_value = "bench")]
    pub kind: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
}

/// Options of the GetPods benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct PodsArgs {
    /// An agent's gRPC endpoint with Kubernetes discovery; without it, an agent is started in
    /// this process over a synthetic Deployment.
    #[arg(long, env = "EA_BENCH_ADDRESS")]
    pub address: Option<String>,
    /// Namespace of the Deployment.
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// The Deployment.
    #[arg(long, default_value = "bench")]
    pub deployment: String,
    /// Pods of the synthetic Deployment (in-process agent only).
    #[arg(long, default_value_t = 50)]
    pub pods: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
}

/// Why a benchmark could not run (failed requests are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The endpoint is malformed or unreachable.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The endpoint.
        address: String,
        /// Why.
        reason: String,
    },
    /// The in-process agent could not start.
    #[error("cannot start the in-process agent: {0}")]
    Agent(#[from] ServerError),
    /// The in-process agent's configuration was refused.
    #[error("cannot configure the in-process agent: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The report could not be printed as JSON.
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Latency figures of a run, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest request.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// What a benchmark measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `grpc`, `http` or `pods`.
    pub benchmark: &'static str,
    /// The endpoint (or `in-process`).
    pub address: String,
    /// Concurrent clients.
    pub clients: u32,
    /// Iterations per client.
    pub iterations: u32,
    /// Connections the clients shared.
    pub connections: u32,
    /// Requests sent (answered or failed).
    pub requests: u64,
    /// Requests that failed or answered something the workload did not expect.
    pub errors: u64,
    /// Failed requests by kind: the gRPC code or HTTP status, `transport`, or `unexpected` for an
    /// answer the workload did not expect (e.g. the second candidate elected).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Wall-clock time of the run, in seconds.
    pub elapsed_seconds: f64,
    /// Requests per second.
    pub requests_per_second: f64,
    /// Latency of single requests.
    pub latency_ms: Latency,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency_ms;
        writeln!(
            f,
            "{} {}: {} clients x {} iterations over {} connections",
            self.benchmark, self.address, self.clients, self.iterations, self.connections
        )?;
        writeln!(
            f,
            "requests   {} in {:.2} s = {:.0} requests/s",
            self.requests, self.elapsed_seconds, self.requests_per_second
        )?;
        writeln!(
            f,
            "latency    p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  (mean {:.3} ms)",
            l.p50, l.p90, l.p99, l.max, l.mean
        )?;
        if self.errors_by_kind.is_empty() {
            write!(f, "errors     none")
        } else {
            let kinds: Vec<String> = self
                .errors_by_kind
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            write!(f, "errors     {} ({})", self.errors, kinds.join(", "))
        }
    }
}

/// Runs one benchmark and prints its report (text, or JSON with `--json`); false when a soak
/// failed its checks.
pub async fn run(args: BenchArgs) -> Result<bool, BenchError> {
    let json = args.target.json();
    let report = match args.target {
        BenchTarget::Grpc(args) => grpc(args).await?,
        BenchTarget::Http(args) => http(args).await?,
        BenchTarget::Names(args) => names(args).await?,
        BenchTarget::Pods(args) => pods(args).await?,
        BenchTarget::Soak(args) => return soak::run(args).await,
    };
    print(&report, json)?;
    Ok(true)
}

/// Prints `report` as `election-agent bench` does.
pub fn print(report: &Report, json: bool) -> Result<(), BenchError> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

impl BenchTarget {
    /// Whether the report should be JSON.
    pub fn json(&self) -> bool {
        match self {
            BenchTarget::Grpc(args) | BenchTarget::Http(args) | BenchTarget::Names(args) => {
                args.load.json
            }
            BenchTarget::Pods(args) => args.load.json,
            BenchTarget::Soak(args) => args.json,
        }
    }
}

/// What one client measured.
struct ClientResult {
    latencies: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits (slower requests count as 10
/// minutes).
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Times requests and counts their failures, for one client.
struct Recorder {
    result: ClientResult,
    done: Arc<AtomicU64>,
}

impl Recorder {
    fn new(done: Arc<AtomicU64>) -> Self {
        Self {
            result: ClientResult {
                latencies: latency_histogram(),
                errors: BTreeMap::new(),
            },
            done,
        }
    }

    /// Sends one request; `call` answers `Err(kind)` when it failed.
    async fn time<F: Future<Output = Result<(), String>>>(&mut self, call: F) {
        let started = Instant::now();
        let outcome = call.await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.result.latencies.saturating_record(micros.max(1));
        if let Err(kind) = outcome {
            *self.result.errors.entry(kind).or_default() += 1;
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `clients` tasks made by `client(index, recorder)`, with a progress display, and
/// summarises them.
async fn measure<F, Fut>(
    benchmark: &'static str,
    address: String,
    load: &LoadArgs,
    connections: u32,
    requests_per_client: u64,
    client: F,
) -> Report
where
    F: Fn(u32, Recorder) -> Fut,
    Fut: Future<Output = ClientResult> + Send + 'static,
{
    let total = requests_per_client * u64::from(load.clients);
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(benchmark, total, done.clone(), load.json);
    let started = Instant::now();
    let tasks: Vec<_> = (0..load.clients)
        .map(|index| tokio::spawn(client(index, Recorder::new(done.clone()))))
        .collect();
    let mut latencies = latency_histogram();
    let mut errors_by_kind = BTreeMap::new();
    for task in tasks {
        match task.await {
            Ok(result) => {
                let _ = latencies.add(&result.latencies);
                for (kind, n) in result.errors {
                    *errors_by_kind.entry(kind).or_default() += n;
                }
            }
            Err(err) => {
                *errors_by_kind
                    .entry(format!("client task failed: {err}"))
                    .or_default() += 1
            }
        }
    }
    let elapsed = started.elapsed();
    progress.finish();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let requests = latencies.len();
    Report {
        benchmark,
        address,
        clients: load.clients,
        iterations: load.iterations,
        connections,
        requests,
        errors: errors_by_kind.values().sum(),
        errors_by_kind,
        elapsed_seconds: elapsed.as_secs_f64(),
        requests_per_second: requests as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        latency_ms: Latency {
            p50: ms(latencies.value_at_quantile(0.5)),
            p90: ms(latencies.value_at_quantile(0.9)),
            p99: ms(latencies.value_at_quantile(0.99)),
            max: ms(latencies.max()),
            mean: latencies.mean() / 1000.0,
        },
    }
}

/// A progress bar on a terminal; otherwise a plain line every few seconds (none with `--json`,
/// whose reader wants the report alone — progress goes to stderr anyway).
struct Progress {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn start(benchmark: &'static str, total: u64, done: Arc<AtomicU64>, quiet: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {pos}/{len} requests ({per_sec}, {eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(benchmark);
            bar
        });
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            let period = if shown.is_some() {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(5)
            };
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let now = done.load(Ordering::Relaxed);
                match &shown {
                    Some(bar) => bar.set_position(now),
                    None if !quiet => eprintln!("{benchmark}: {now}/{total} requests"),
                    None => {}
                }
            }
        });
        Self { task, bar }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `connections`, or one per client when 0.
fn connection_count(load: &LoadArgs) -> u32 {
    if load.connections == 0 {
        load.clients
    } else {
        load.connections.min(load.clients)
    }
}

/// A name unique to this run, so runs against the same store do not meet each other's leases.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{}-{:x}", std::process::id(), nanos % 0xffff_ffff)
}

/// One HTTP/2 connection as the transport of a tonic client: hyper's `SendRequest` itself.
///
/// tonic's `Channel` puts a request buffer (a queue and a task of its own) in front of the
/// connection, a hand-off between tasks for every request; on a machine where the load generator
/// shares the cores with the agent it measures, that CPU is taken from the agent.
#[derive(Clone)]
struct GrpcConnection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<Request<tonic::body::Body>> for GrpcConnection {
    type Response = axum::http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// Opens `count` gRPC connections (plain HTTP/2) to `address`, with the origin the clients'
/// requests name.
async fn grpc_connections(
    address: &str,
    count: u32,
) -> Result<(Vec<GrpcConnection>, axum::http::Uri), BenchError> {
    let connect_error = |reason: String| BenchError::Connect {
        address: address.to_owned(),
        reason,
    };
    let origin: axum::http::Uri = address
        .parse()
        .map_err(|err: axum::http::uri::InvalidUri| connect_error(err.to_string()))?;
    if origin.scheme_str() != Some("http") {
        return Err(connect_error(
            "the benchmark speaks plain HTTP/2: the address must start with http://".into(),
        ));
    }
    let host = origin
        .host()
        .ok_or_else(|| connect_error("the address names no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = origin.port_u16().unwrap_or(80);
    let mut connections = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|err| connect_error(err.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|err| connect_error(err.to_string()))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|err| connect_error(err.to_string()))?;
        tokio::spawn(connection);
        connections.push(GrpcConnection(sender));
    }
    Ok((connections, origin))
}

fn grpc_error(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

async fn grpc(args: WorkloadArgs) -> Result<Report, BenchError> {
    let address = args
        .address
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let connections = connection_count(&args.load);
    let (channels, origin) = grpc_connections(&address, connections).await?;
    let run = run_id();
    let requests = 1 + 2 * u64::from(args.load.iterations);
    let report = measure(
        "grpc",
        address,
        &args.load,
        connections,
        requests,
        |index, mut recorder| {
            let mut client = ElectionClient::with_origin(
                channels[index as usize % channels.len()].clone(),
                origin.clone(),
            );
            let (kind, term, iterations) = (args.kind.clone(), args.term, args.load.iterations);
            let election = format!("bench-{run}-{index}");
            let (leader, other) = (format!("leader-{index}"), format!("other-{index}"));
            async move {
                let campaign = |candidate: &str| pb::CampaignRequest {
                    election: election.clone(),
                    candidate: candidate.to_owned(),
                    term,
                    kind: kind.clone(),
                };
                let extend = pb::ExtendElectedTermRequest {
                    election: election.clone(),
                    leader: leader.clone(),
                    term,
                    kind: kind.clone(),
                    retries: 0,
                    retry_interval: 0,
                };
                let (win, lose) = (campaign(&leader), campaign(&other));
                let expect = |elected: bool| {
                    move |r: Result<tonic::Response<pb::CampaignResult>, tonic::Status>| match r {
                        Ok(r) if r.get_ref().elected == elected => Ok(()),
                        Ok(_) => Err("unexpected".to_owned()),
                        Err(status) => Err(grpc_error(&status)),
                    }
                };
                recorder
                    .time(async { expect(true)(client.campaign(win).await) })
                    .await;
                for _ in 0..iterations {
                    recorder
                        .time(async {
                            client
                                .extend_elected_term(extend.clone())
                                .await
                                .map(drop)
                                .map_err(|status| grpc_error(&status))
                        })
                        .await;
                    recorder
                        .time(async { expect(false)(client.campaign(lose.clone()).await) })
                        .await;
                }
                recorder.result
            }
        },
    )
    .await;
    Ok(report)
}

async fn names(args: WorkloadArgs) -> Result<Report, BenchError> {
    let address = args
        .address
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let connections = connection_count(&args.load);
    let (channels, origin) = grpc_connections(&address, connections).await?;
    let run = run_id();
    let report = measure(
        "names",
        address,
        &args.load,
        connections,
        u64::from(args.load.iterations),
        |index, mut recorder| {
            let mut client = ElectionClient::with_origin(
                channels[index as usize % channels.len()].clone(),
                origin.clone(),
            );
            let (kind, term, iterations) = (args.kind.clone(), args.term, args.load.iterations);
            let run = run.clone();
            async move {
                for i in 0..iterations {
                    let campaign = pb::CampaignRequest {
                        election: format!("names-{run}-{index}-{i}"),
                        candidate: "flood".to_owned(),
                        term,
                        kind: kind.clone(),
                    };
                    recorder
                        .time(async {
                            match client.campaign(campaign).await {
                                Ok(r) if r.get_ref().elected => Ok(()),
                                Ok(_) => Err("unexpected".to_owned()),
                                Err(status) => Err(grpc_error(&status)),
                            }
                        })
                        .await;
                }
                recorder.result
            }
        },
    )
    .await;
    Ok(report)
}

/// The answer of a campaign over HTTP, as far as the benchmark reads it.
#[derive(serde::Deserialize)]
struct CampaignAnswer {
    elected: bool,
}

async fn http(args: WorkloadArgs) -> Result<Report, BenchError> {
    let address = args
        .address
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let base = address.trim_end_matches('/').to_owned();
    let connections = connection_count(&args.load);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient<HttpConnector, Full<Bytes>> = HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections as usize)
        .build(connector);
    // Fail early, with one clear message, when nothing listens there.
    let probe = Request::get(format!("{base}/livez"))
        .body(Full::default())
        .map_err(|err| BenchError::Connect {
            address: address.clone(),
            reason: err.to_string(),
        })?;
    client
        .request(probe)
        .await
        .map_err(|err| BenchError::Connect {
            address: address.clone(),
            reason: format!("{err}: {:?}", std::error::Error::source(&err)),
        })?;
    let run = run_id();
    let requests = 1 + 2 * u64::from(args.load.iterations);
    let report = measure(
        "http",
        address,
        &args.load,
        connections,
        requests,
        |index, mut recorder| {
            let client = client.clone();
            let uri = format!("{base}/election/{}/bench-{run}-{index}", args.kind);
            let term = args.term;
            let iterations = args.load.iterations;
            let body = |value: serde_json::Value| Bytes::from(value.to_string());
            let leader = format!("leader-{index}");
            let win = body(serde_json::json!({"candidate": leader, "term": term}));
            let lose = body(serde_json::json!({"candidate": format!("other-{index}"), "term": term}));
            let extend = body(
                serde_json::json!({"leader": leader, "term": term, "retries": 0, "retry_interval": 0}),
            );
            async move {
                let send = |method: Method, body: &Bytes| {
                    let request = Request::builder()
                        .method(method)
                        .uri(uri.as_str())
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(body.clone()));
                    let client = &client;
                    async move {
                        let request = request.map_err(|_| "invalid request".to_owned())?;
                        let response = client
                            .request(request)
                            .await
                            .map_err(|_| "transport".to_owned())?;
                        let status = response.status();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|_| "transport".to_owned())?
                            .to_bytes();
                        if status == StatusCode::OK {
                            Ok(body)
                        } else {
                            Err(format!("HTTP {}", status.as_u16()))
                        }
                    }
                };
                let campaign = |body: &Bytes, elected: bool| {
                    let sent = send(Method::POST, body);
                    async move {
                        let answer = sent.await?;
                        match serde_json::from_slice::<CampaignAnswer>(&answer) {
                            Ok(a) if a.elected == elected => Ok(()),
                            _ => Err("unexpected".to_owned()),
                        }
                    }
                };
                recorder.time(campaign(&win, true)).await;
                for _ in 0..iterations {
                    recorder
                        .time(async { send(Method::PATCH, &extend).await.map(drop) })
                        .await;
                    recorder.time(campaign(&lose, false)).await;
                }
                recorder.result
            }
        },
    )
    .await;
    Ok(report)
}

async fn pods(args: PodsArgs) -> Result<Report, BenchError> {
    // Keep the in-process agent alive for the run; it is shut down at the end.
    let (address, agent, expected) = match &args.address {
        Some(address) => (address.clone(), None, None),
        None => {
            let config = Sources::default()
                .flag("EA_BIND_ADDRESS", "127.0.0.1")
                .flag("EA_GRPC_PORT", "0")
                .flag("EA_HTTP_ENABLE", "false")
                .flag("EA_METRIC_ENABLE", "false")
                .flag("EA_LOG_LEVEL", "warning")
                .resolve()?;
            let caches = synthetic_deployment(&args.namespace, &args.deployment, args.pods);
            let agent = server::start_with_discovery(&config, Discovery::fixed(caches)).await?;
            let address = agent
                .grpc_address
                .map(|a| format!("http://{a}"))
                .unwrap_or_default();
            (address, Some(agent), Some(args.pods as usize))
        }
    };
    let connections = connection_count(&args.load);
    let (channels, origin) = grpc_connections(&address, connections).await?;
    let shown = if agent.is_some() {
        format!("in-process ({address})")
    } else {
        address.clone()
    };
    let report = measure(
        "pods",
        shown,
        &args.load,
        connections,
        u64::from(args.load.iterations),
        |index, mut recorder| {
            let mut client = tonic::client::Grpc::with_origin(
                channels[index as usize % channels.len()].clone(),
                origin.clone(),
            );
            let request = pb::GetPodsRequest {
                namespace: args.namespace.clone(),
                deployment: args.deployment.clone(),
                pod_name: String::new(),
            };
            let iterations = args.load.iterations;
            async move {
                for _ in 0..iterations {
                    recorder
                        .time(async {
                            match get_pod_count(&mut client, request.clone()).await {
                                Ok(pods) if expected.is_none_or(|n| pods.items.len() == n) => {
                                    Ok(())
                                }
                                Ok(_) => Err("unexpected".to_owned()),
                                Err(status) => Err(grpc_error(&status)),
                            }
                        })
                        .await;
                }
                recorder.result
            }
        },
    )
    .await;
    if let Some(agent) = agent {
        agent.shutdown().await;
        let _ = agent.wait().await;
    }
    Ok(report)
}

/// A `Pods` answer with each pod left encoded: the benchmark only counts them, and decoding 50
/// pods per answer would take CPU from the agent it measures on the same machine.
#[derive(Clone, PartialEq, prost::Message)]
struct PodCount {
    /// The encoded `Pod` messages.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    items: Vec<Bytes>,
}

/// `GetPods`, answered as a [`PodCount`].
async fn get_pod_count(
    client: &mut tonic::client::Grpc<GrpcConnection>,
    request: pb::GetPodsRequest,
) -> Result<PodCount, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let path =
        axum::http::uri::PathAndQuery::from_static("/grpc.election_agent.v1.Election/GetPods");
    let codec = tonic_prost::ProstCodec::<pb::GetPodsRequest, PodCount>::default();
    Ok(client
        .unary(tonic::Request::new(request), path, codec)
        .await?
        .into_inner())
}

/// Caches holding one Deployment `namespace/name` with one ReplicaSet (revision 1) and `pods`
/// ready pods, as a cluster's watch caches would.
pub fn synthetic_deployment(namespace: &str, name: &str, pods: u32) -> Caches {
    use k8s_openapi::{
        api::{
            apps::v1::{Deployment, DeploymentSpec, ReplicaSet, ReplicaSetStatus},
            core::v1::{Pod, PodCondition, PodStatus},
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
    };
    let labels = || Some([("app".to_owned(), name.to_owned())].into());
    let owner = |kind: &str, name: &str| {
        Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("{name}-uid"),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }])
    };
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        uid: Some(format!("{name}-uid")),
        ..Default::default()
    };
    let replica_set_name = format!("{name}-1");
    let deployment = Deployment {
        metadata: meta(name),
        spec: Some(DeploymentSpec {
            replicas: Some(pods as i32),
            selector: LabelSelector {
                match_labels: labels(),
                ..Default::default()
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let replicas = i32::try_from(pods).unwrap_or(i32::MAX);
    let replica_set = ReplicaSet {
        metadata: ObjectMeta {
            labels: labels(),
            annotations: Some(
                [
                    ("deployment.kubernetes.io/revision", "1".to_owned()),
                    (
                        "deployment.kubernetes.io/desired-replicas",
                        pods.to_string(),
                    ),
                    (
                        "deployment.kubernetes.io/max-replicas",
                        (pods + 1).to_string(),
                    ),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            ),
            owner_references: owner("Deployment", name),
            ..meta(&replica_set_name)
        },
        status: Some(ReplicaSetStatus {
            replicas,
            ready_replicas: Some(replicas),
            available_replicas: Some(replicas),
            fully_labeled_replicas: Some(replicas),
            ..Default::default()
        }),
        ..Default::default()
    };
    let condition = |kind: &str| PodCondition {
        type_: kind.into(),
        status: "True".into(),
        ..Default::default()
    };
    let pods = (0..pods).map(|i| Pod {
        metadata: ObjectMeta {
            labels: labels(),
            owner_references: owner("ReplicaSet", &replica_set_name),
            ..meta(&format!("{replica_set_name}-{i:05}"))
        },
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(format!("10.0.{}.{}", i / 250, i % 250 + 1)),
            conditions: Some(
                ["PodScheduled", "Initialized", "Ready", "ContainersReady"]
                    .map(condition)
                    .into(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    });
    Caches::from_objects(pods, [replica_set], [deployment])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_synthetic_deployment_lists_all_its_pods_ready() {
        let discovery = Discovery::fixed(synthetic_deployment("ns", "web", 7));
        let pods = &discovery.pods("ns", "web", "").unwrap().items;
        assert_eq!(pods.len(), 7);
        assert!(
            pods.iter()
                .all(|p| p.status.pod_ready && p.deployment == "web")
        );
        assert_eq!(pods[0].replica_set.revision, 1);
        let by_pod = discovery.pods("ns", "", &pods[3].name).unwrap();
        assert_eq!(&by_pod.items, pods);
        // The caches never change: every lookup shares the first answer.
        assert!(Arc::ptr_eq(
            &by_pod,
            &discovery.pods("ns", "web", "").unwrap()
        ));
    }

    #[test]
    fn latencies_of_milliseconds_and_minutes_are_kept_to_three_digits() {
        let mut latencies = latency_histogram();
        for micros in [2_500, 3_000, 3_000, 120_000_000] {
            latencies.saturating_record(micros);
        }
        assert!(latencies.value_at_quantile(0.5).abs_diff(3_000) <= 3);
        assert!(latencies.max().abs_diff(120_000_000) < 120_000);
    }

    #[test]
    fn the_report_names_every_error_kind() {
        let report = Report {
            benchmark: "grpc",
            address: "http://x".into(),
            clients: 2,
            iterations: 3,
            connections: 1,
            requests: 14,
            errors: 3,
            errors_by_kind: [("AlreadyExists".into(), 2), ("unexpected".into(), 1)].into(),
            elapsed_seconds: 2.0,
            requests_per_second: 7.0,
            latency_ms: Latency {
                p50: 1.0,
                p90: 2.0,
                p99: 3.0,
                max: 4.0,
                mean: 1.5,
            },
        };
        let text = report.to_string();
        assert!(text.contains("14 in 2.00 s = 7 requests/s"), "{text}");
        assert!(
            text.contains("errors     3 (AlreadyExists 2, unexpected 1)"),
            "{text}"
        );
    }
}

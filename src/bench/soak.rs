//! `election-agent bench soak`: steady leadership traffic that keeps going while the agents and
//! their Redis are restarted under it (by `scripts/soak.sh`), and what it saw.
//!
//! Candidates campaign, keep their leases, resign and hand over across a set of elections, over
//! gRPC and REST; Observe (gRPC) and watch (SSE) streams follow the same elections and open again
//! whenever they end. Nothing stops the run: a failed request is counted by kind and retried after
//! a backoff. At the end it reports requests and failures by kind, whether any fencing token went
//! backwards, and the trend of the agents' memory (read from `/proc` through pid files the script
//! keeps, so a restarted agent is followed too) — and fails when tokens regressed, memory grew, or
//! a minute passed without a single successful request.
//!
//! Its parts: `api` (the two protocols), `failure` (kinds and classes of failures), `tokens` (the
//! monotonicity check), `memory` (RSS samples and their trend), `sse` (the watch streams' format).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;
use tonic::transport::Endpoint;

use super::{BenchError, run_id};
use crate::grpc::pb::election_client::ElectionClient;

mod api;
mod failure;
mod memory;
mod sse;
mod tokens;

use api::{Api, Http, Seat};
use failure::{Class, Failure};
use memory::{RssSample, RssSummary, read_rss};
use tokens::{Sighting, TokenLedger, TokenSummary};

/// Options of `election-agent bench soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// gRPC endpoints of the agents, comma-separated; clients and streams are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    pub grpc_address: Vec<String>,
    /// REST endpoints of the same agents, comma-separated, in the same order; none: gRPC only.
    #[arg(long, value_delimiter = ',')]
    pub http_address: Vec<String>,
    /// How long to run.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Elections the candidates compete for.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub elections: u32,
    /// Candidates per election over gRPC.
    #[arg(long, default_value_t = 2)]
    pub grpc_candidates: u32,
    /// Candidates per election over REST (with --http-address).
    #[arg(long, default_value_t = 1)]
    pub http_candidates: u32,
    /// Observe streams (gRPC) per election.
    #[arg(long, default_value_t = 1)]
    pub observers: u32,
    /// Watch streams (SSE, with --http-address) per election.
    #[arg(long, default_value_t = 1)]
    pub watchers: u32,
    /// Term of every lease, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub term: i32,
    /// A candidate's pause between two requests.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// Election kind the soak's elections belong to.
    #[arg(long, default_value = "soak")]
    pub kind: String,
    /// NAME=PIDFILE: follow the RSS of the process whose pid the file holds; the file is read
    /// again at every sample, so a restarted process is followed too. Repeatable.
    #[arg(long = "watch-rss", value_name = "NAME=PIDFILE", value_parser = rss_target)]
    pub watch_rss: Vec<(String, PathBuf)>,
    /// Time between two RSS samples.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub rss_interval: Duration,
    /// The first part of the run, left out of the memory trend of a process never restarted.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub warm_up: Duration,
    /// A restarted process is compared across its incarnations at the same age: from this one…
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub phase_from: Duration,
    /// …to this one.
    #[arg(long, default_value = "28s", value_parser = humantime::parse_duration)]
    pub phase_to: Duration,
    /// Most memory growth allowed after the warm-up, in MB (10^6 bytes) per minute.
    #[arg(long, default_value_t = 0.5)]
    pub max_rss_slope: f64,
    /// Also write the report, as JSON, to this file.
    #[arg(long, value_name = "FILE")]
    pub json_file: Option<PathBuf>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn rss_target(value: &str) -> Result<(String, PathBuf), String> {
    match value.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err("expected NAME=PIDFILE".to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// Counting.

/// Requests of one operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OperationCount {
    /// Answered with success (a lost campaign is a success: it answered who leads).
    pub ok: u64,
    /// Failed, by kind.
    pub failed: u64,
}

/// Failures of one kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureCount {
    /// What it says about the agent.
    pub class: Class,
    /// How many.
    pub count: u64,
}

/// Requests of one minute of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MinuteCount {
    /// Minute of the run, from 0.
    pub minute: u32,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// Stream events received.
    pub events: u64,
}

/// The streams of one kind (gRPC Observe, SSE watch).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamCount {
    /// Connection attempts.
    pub attempts: u64,
    /// Streams that delivered their first event.
    pub opened: u64,
    /// Events received.
    pub events: u64,
    /// How streams ended (or failed to open), by kind: `ended by the agent` is a clean end.
    pub ended: BTreeMap<String, u64>,
    /// Longest time from a stream's end to the first event of the next, in ms.
    pub longest_reconnect_ms: u64,
    /// Versions that did not increase along a stream (the contract says they strictly do).
    pub version_regressions: u64,
}

/// What the candidates did with leadership.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LeadershipCount {
    /// Campaigns won.
    pub elected: u64,
    /// Terms extended.
    pub extended: u64,
    /// Leases given up.
    pub resigned: u64,
    /// Leases handed to another candidate (conditional on the caller's own live lease).
    pub handed_over: u64,
    /// Leases a leader found gone when it extended or handed over (taken, or lost with the
    /// store's data).
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Tally {
    requests: BTreeMap<String, OperationCount>,
    failures: BTreeMap<String, FailureCount>,
    minutes: Vec<MinuteCount>,
    streams: BTreeMap<String, StreamCount>,
    leadership: LeadershipCount,
    longest_without_success_ms: u64,
}

impl Tally {
    fn minute(&mut self, at: f64) -> &mut MinuteCount {
        let minute = (at / 60.0) as u32;
        while self.minutes.len() <= minute as usize {
            let next = self.minutes.len() as u32;
            self.minutes.push(MinuteCount {
                minute: next,
                ..Default::default()
            });
        }
        &mut self.minutes[minute as usize]
    }

    fn failed(&mut self, operation: &str, failure: &Failure, at: f64) {
        self.requests
            .entry(operation.to_owned())
            .or_default()
            .failed += 1;
        self.count_failure(failure);
        self.minute(at).failed += 1;
    }

    fn count_failure(&mut self, failure: &Failure) {
        self.failures
            .entry(failure.kind.clone())
            .or_insert(FailureCount {
                class: failure.class,
                count: 0,
            })
            .count += 1;
    }

    fn succeeded(&mut self, operation: &str, at: f64) {
        self.requests.entry(operation.to_owned()).or_default().ok += 1;
        self.minute(at).ok += 1;
    }
}

/// State every task of the run shares.
struct Shared {
    started: Instant,
    deadline: tokio::time::Instant,
    ledger: Mutex<TokenLedger>,
    tally: Mutex<Tally>,
}

impl Shared {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, TokenLedger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn floor(&self, election: &str) -> u64 {
        self.ledger().floor(election)
    }

    fn saw(&self, election: &str, floor: u64, token: u64, by: &str, client: &str) {
        let at = self.now();
        let regression = self.ledger().saw(
            election,
            floor,
            token,
            || Sighting {
                by: by.to_owned(),
                client: client.to_owned(),
            },
            at,
        );
        if let Some(r) = regression {
            eprintln!(
                "soak: TOKEN REGRESSION at {:.1} s: {} saw {} on {} after {} had been seen ({})",
                r.at_seconds, r.seen.client, r.token, r.election, r.floor, r.seen.by
            );
        }
    }

    fn over(&self) -> bool {
        tokio::time::Instant::now() >= self.deadline
    }

    /// Sleeps `pause`, or until the run's end; false when the run is over.
    async fn sleep(&self, pause: Duration) -> bool {
        tokio::time::sleep_until(self.deadline.min(tokio::time::Instant::now() + pause)).await;
        !self.over()
    }
}

/// Exponential backoff with jitter: 50 ms doubling to 2 s, reset by a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause before the next attempt.
    pub fn next(&mut self) -> Duration {
        let base = Duration::from_millis(50).saturating_mul(1 << self.failures.min(6));
        self.failures += 1;
        base.min(Duration::from_secs(2))
            .mul_f64(0.5 + 0.5 * fastrand::f64())
    }

    /// A success: the next failure starts again from the shortest pause.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// One request of a candidate: counted, its token checked, a backoff on failure.
struct Candidate {
    shared: Arc<Shared>,
    api: Api,
    seat: Seat,
    others: Vec<String>,
    term: i32,
    pause: Duration,
    backoff: Backoff,
    last_success: Instant,
}

/// What a candidate believes of its election.
enum Role {
    Follower,
    Leader {
        token: u64,
        /// When the last successful renewal was sent: the lease is surely gone a term later.
        renewed: Instant,
        /// Extensions before it lets go.
        extensions_left: u32,
    },
}

impl Candidate {
    fn operation(&self, what: &str) -> String {
        format!("{} {what}", self.api.protocol())
    }

    /// Counts the outcome of one request; answers the pause before the next.
    fn record<T>(&mut self, what: &str, result: &Result<T, Failure>) -> Duration {
        let at = self.shared.now();
        let operation = self.operation(what);
        match result {
            Ok(_) => {
                let gap = self.last_success.elapsed().as_millis() as u64;
                self.last_success = Instant::now();
                self.backoff.reset();
                let mut tally = self.shared.tally();
                tally.succeeded(&operation, at);
                tally.longest_without_success_ms = tally.longest_without_success_ms.max(gap);
                self.pause.mul_f64(0.5 + fastrand::f64())
            }
            Err(failure) => {
                self.shared.tally().failed(&operation, failure, at);
                match failure.class {
                    Class::Contention => self.pause,
                    Class::Outage | Class::Unexpected => self.backoff.next(),
                }
            }
        }
    }

    fn check(&self, what: &str, floor: u64, token: u64) {
        let by = self.operation(what);
        self.shared
            .saw(&self.seat.election, floor, token, &by, &self.seat.candidate);
    }

    async fn run(mut self) {
        let mut role = Role::Follower;
        let term = Duration::from_millis(self.term as u64);
        loop {
            let floor = self.shared.floor(&self.seat.election);
            let sent = Instant::now();
            let pause = match role {
                Role::Follower => {
                    let result = self.api.campaign(&self.seat, self.term).await;
                    if let Ok(answer) = &result {
                        self.check("campaign", floor, answer.fencing_token);
                        if answer.elected {
                            self.shared.tally().leadership.elected += 1;
                            role = Role::Leader {
                                token: answer.fencing_token,
                                renewed: sent,
                                extensions_left: fastrand::u32(2..10),
                            };
                        }
                    }
                    self.record("campaign", &result)
                }
                Role::Leader {
                    renewed,
                    extensions_left,
                    ..
                } if extensions_left > 0 => {
                    let result = self.api.extend(&self.seat, self.term).await;
                    match &result {
                        Ok(new_token) => {
                            self.check("extend", floor, *new_token);
                            self.shared.tally().leadership.extended += 1;
                            role = Role::Leader {
                                token: *new_token,
                                renewed: sent,
                                extensions_left: extensions_left - 1,
                            };
                        }
                        Err(f) if f.class == Class::Contention => {
                            self.shared.tally().leadership.lost += 1;
                            role = Role::Follower;
                        }
                        // Out of reach (outage): it may still hold the lease until its term is up.
                        Err(_) if renewed.elapsed() > term => role = Role::Follower,
                        Err(_) => {}
                    }
                    self.record("extend", &result)
                }
                Role::Leader { token, renewed, .. } => {
                    let to = self.others.get(fastrand::usize(..self.others.len().max(1)));
                    match to {
                        Some(to) if fastrand::bool() => {
                            let to = to.clone();
                            let result = self.api.handover(&self.seat, &to, self.term, token).await;
                            match &result {
                                Ok(new_token) => {
                                    self.check("handover", floor, *new_token);
                                    self.shared.tally().leadership.handed_over += 1;
                                    role = Role::Follower;
                                }
                                Err(f) if f.class == Class::Contention => {
                                    self.shared.tally().leadership.lost += 1;
                                    role = Role::Follower;
                                }
                                Err(_) if renewed.elapsed() > term => role = Role::Follower,
                                Err(_) => {}
                            }
                            self.record("handover", &result)
                        }
                        _ => {
                            let result = self.api.resign(&self.seat).await;
                            match &result {
                                Ok(()) => {
                                    self.shared.tally().leadership.resigned += 1;
                                    role = Role::Follower;
                                }
                                Err(f) if f.class == Class::Contention => role = Role::Follower,
                                Err(_) if renewed.elapsed() > term => role = Role::Follower,
                                Err(_) => {}
                            }
                            self.record("resign", &result)
                        }
                    }
                }
            };
            if !self.shared.sleep(pause).await {
                return;
            }
        }
    }
}

/// A stream that follows one election and opens again whenever it ends.
async fn follower(shared: Arc<Shared>, mut api: Api, seat: Seat) {
    let name = match api {
        Api::Grpc(_) => "gRPC Observe",
        Api::Http { .. } => "SSE watch",
    };
    let mut backoff = Backoff::default();
    let mut ended: Option<Instant> = None;
    let end_with = |shared: &Shared, kind: &str| {
        *shared
            .tally()
            .streams
            .entry(name.to_owned())
            .or_default()
            .ended
            .entry(kind.to_owned())
            .or_default() += 1;
    };
    while !shared.over() {
        let mut floor = shared.floor(&seat.election);
        shared
            .tally()
            .streams
            .entry(name.to_owned())
            .or_default()
            .attempts += 1;
        let opened = tokio::select! {
            opened = api.follow(&seat) => opened,
            () = tokio::time::sleep_until(shared.deadline) => return,
        };
        let mut events = match opened {
            Ok(events) => events,
            Err(failure) => {
                shared.tally().count_failure(&failure);
                end_with(&shared, &format!("not opened: {}", failure.kind));
                if !shared.sleep(backoff.next()).await {
                    return;
                }
                continue;
            }
        };
        let mut version = None;
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                () = tokio::time::sleep_until(shared.deadline) => return,
            };
            match next {
                Some(Ok(event)) => {
                    let at = shared.now();
                    let mut tally = shared.tally();
                    let count = tally.streams.entry(name.to_owned()).or_default();
                    count.events += 1;
                    if version.is_none() {
                        count.opened += 1;
                        if let Some(ended) = ended.take() {
                            count.longest_reconnect_ms = count
                                .longest_reconnect_ms
                                .max(ended.elapsed().as_millis() as u64);
                        }
                        backoff.reset();
                    }
                    if version.is_some_and(|v| event.version <= v) {
                        count.version_regressions += 1;
                    }
                    version = Some(event.version);
                    tally.minute(at).events += 1;
                    drop(tally);
                    shared.saw(
                        &seat.election,
                        floor,
                        event.fencing_token,
                        name,
                        &seat.candidate,
                    );
                    floor = floor.max(event.fencing_token);
                }
                Some(Err(failure)) => {
                    shared.tally().count_failure(&failure);
                    end_with(&shared, &failure.kind);
                    break;
                }
                None => {
                    end_with(&shared, "ended by the agent");
                    break;
                }
            }
        }
        ended.get_or_insert_with(Instant::now);
        if !shared.sleep(backoff.next()).await {
            return;
        }
    }
}

/// Samples the RSS of every watched process until the run's end.
async fn sample_rss(
    shared: Arc<Shared>,
    targets: Vec<(String, PathBuf)>,
    every: Duration,
) -> Vec<Vec<RssSample>> {
    let mut samples = vec![Vec::new(); targets.len()];
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = tokio::time::sleep_until(shared.deadline) => return samples,
        }
        let at_seconds = shared.now();
        for ((_, pidfile), samples) in targets.iter().zip(&mut samples) {
            if let Some((pid, rss_kb)) = read_rss(pidfile) {
                samples.push(RssSample {
                    at_seconds,
                    pid,
                    rss_kb,
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run and its report.

/// What a soak saw.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoakReport {
    /// Always `soak`.
    pub benchmark: &'static str,
    /// gRPC endpoints.
    pub grpc_addresses: Vec<String>,
    /// REST endpoints.
    pub http_addresses: Vec<String>,
    /// How long it ran, in seconds.
    pub elapsed_seconds: f64,
    /// Elections.
    pub elections: u32,
    /// Candidates over gRPC.
    pub grpc_candidates: u32,
    /// Candidates over REST.
    pub http_candidates: u32,
    /// Observe streams.
    pub observe_streams: u32,
    /// Watch streams.
    pub watch_streams: u32,
    /// Requests sent.
    pub requests: u64,
    /// Requests answered with success.
    pub ok: u64,
    /// Requests by operation (`gRPC campaign`, `HTTP extend`, …).
    pub requests_by_operation: BTreeMap<String, OperationCount>,
    /// Failures of requests and streams by kind.
    pub failures_by_kind: BTreeMap<String, FailureCount>,
    /// Failures by class.
    pub failures_by_class: BTreeMap<Class, u64>,
    /// Requests and events per minute.
    pub per_minute: Vec<MinuteCount>,
    /// Longest time one candidate went without a successful request, in ms.
    pub longest_without_success_ms: u64,
    /// What the candidates did with leadership.
    pub leadership: LeadershipCount,
    /// Streams by kind.
    pub streams: BTreeMap<String, StreamCount>,
    /// Fencing tokens.
    pub tokens: TokenSummary,
    /// Memory of the watched processes.
    pub rss: Vec<RssSummary>,
    /// Most memory growth allowed, MB per minute.
    pub max_rss_slope_mb_per_minute: f64,
    /// Whether the soak passed, and why not.
    pub verdict: Verdict,
}

/// The soak's judgement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// No token regression, no memory growth, a success in every minute, no unexpected failure.
    pub passed: bool,
    /// What failed (empty when it passed).
    pub failures: Vec<String>,
    /// What could not be judged.
    pub notes: Vec<String>,
}

impl SoakReport {
    fn judge(&mut self) {
        let mut failures = Vec::new();
        let mut notes = Vec::new();
        if self.tokens.regressions > 0 {
            failures.push(format!(
                "{} fencing token regression(s)",
                self.tokens.regressions
            ));
        }
        for rss in &self.rss {
            match rss.trend.slope_mb_per_minute {
                Some(s) if s > self.max_rss_slope_mb_per_minute => failures.push(format!(
                    "{}: RSS grows {s:.3} MB/min after the warm-up (limit {})",
                    rss.name, self.max_rss_slope_mb_per_minute
                )),
                Some(_) => {}
                None => notes.push(format!("{}: too few RSS points for a trend", rss.name)),
            }
        }
        let full_minutes = (self.elapsed_seconds / 60.0).floor() as usize;
        for minute in self.per_minute.iter().take(full_minutes) {
            if minute.ok == 0 {
                failures.push(format!("minute {}: no successful request", minute.minute));
            }
        }
        if let Some(n) = self.failures_by_class.get(&Class::Unexpected) {
            failures.push(format!("{n} unexpected failure(s)"));
        }
        let versions: u64 = self.streams.values().map(|s| s.version_regressions).sum();
        if versions > 0 {
            failures.push(format!("{versions} stream version(s) did not increase"));
        }
        self.verdict = Verdict {
            passed: failures.is_empty(),
            failures,
            notes,
        };
    }
}

/// Runs the soak, prints its report; false when it failed its checks.
pub async fn run(args: SoakArgs) -> Result<bool, BenchError> {
    let report = soak(&args).await?;
    let json = serde_json::to_string(&report)?;
    if let Some(path) = &args.json_file {
        std::fs::write(path, format!("{json}\n")).map_err(|err| BenchError::Connect {
            address: path.display().to_string(),
            reason: format!("cannot write the report: {err}"),
        })?;
    }
    if args.json {
        println!("{json}");
    } else {
        println!("{report}");
    }
    Ok(report.verdict.passed)
}

async fn soak(args: &SoakArgs) -> Result<SoakReport, BenchError> {
    let connect_error = |address: &str, reason: String| BenchError::Connect {
        address: address.to_owned(),
        reason,
    };
    // Two HTTP/2 connections per agent, shared by its gRPC clients as one process's would be;
    // each reconnects by itself after the agent restarts.
    let mut channels = Vec::new();
    for address in &args.grpc_address {
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|err| connect_error(address, err.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(1));
        channels.push([endpoint.connect_lazy(), endpoint.connect_lazy()]);
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    let http: Http = HttpClient::builder(TokioExecutor::new()).build(connector);
    let bases: Vec<String> = args
        .http_address
        .iter()
        .map(|a| a.trim_end_matches('/').to_owned())
        .collect();
    let http_candidates = if bases.is_empty() {
        0
    } else {
        args.http_candidates
    };
    let watchers = if bases.is_empty() { 0 } else { args.watchers };

    let started = Instant::now();
    let shared = Arc::new(Shared {
        started,
        deadline: tokio::time::Instant::now() + args.duration,
        ledger: Mutex::default(),
        tally: Mutex::default(),
    });
    let run = run_id();
    // An election's candidates and streams are spread over the agents, and each role evenly
    // across elections (the n-th client of election e goes to agent e + n), so that the agents
    // serve the same elections and both protocols and streams meet every one of them.
    let grpc_api = |e: u32, n: u32| {
        let agent = &channels[(e + n) as usize % channels.len()];
        Api::Grpc(ElectionClient::new(
            agent[(e as usize / channels.len()) % agent.len()].clone(),
        ))
    };
    let http_api = |e: u32, n: u32| Api::Http {
        client: http.clone(),
        base: bases[(e + n) as usize % bases.len()].clone(),
    };
    let mut tasks = Vec::new();
    for e in 0..args.elections {
        let election = format!("soak-{run}-{e}");
        let seat = |candidate: String| Seat {
            kind: args.kind.clone(),
            election: election.clone(),
            candidate,
        };
        let mut candidates: Vec<(String, Api)> = Vec::new();
        for c in 0..args.grpc_candidates {
            candidates.push((format!("grpc-{e}-{c}"), grpc_api(e, c)));
        }
        for c in 0..http_candidates {
            candidates.push((
                format!("http-{e}-{c}"),
                http_api(e, args.grpc_candidates + c),
            ));
        }
        let names: Vec<String> = candidates.iter().map(|(n, _)| n.clone()).collect();
        for (name, api) in candidates {
            let candidate = Candidate {
                shared: shared.clone(),
                api,
                others: names.iter().filter(|n| **n != name).cloned().collect(),
                seat: seat(name),
                term: args.term,
                pause: args.pause,
                backoff: Backoff::default(),
                last_success: Instant::now(),
            };
            tasks.push(tokio::spawn(candidate.run()));
        }
        for o in 0..args.observers {
            let seat = seat(format!("observe-{e}-{o}"));
            tasks.push(tokio::spawn(follower(shared.clone(), grpc_api(e, o), seat)));
        }
        // Watchers start on the other agent than the election's first observer.
        for w in 0..watchers {
            let seat = seat(format!("watch-{e}-{w}"));
            tasks.push(tokio::spawn(follower(
                shared.clone(),
                http_api(e, w + 1),
                seat,
            )));
        }
    }
    let sampler = tokio::spawn(sample_rss(
        shared.clone(),
        args.watch_rss.clone(),
        args.rss_interval,
    ));
    for task in tasks {
        // A task that panicked is a bug of the soak itself: let it show.
        if let Err(err) = task.await {
            eprintln!("soak: a client task failed: {err}");
        }
    }
    let samples = sampler.await.unwrap_or_default();
    let elapsed_seconds = started.elapsed().as_secs_f64();

    let tally = std::mem::take(&mut *shared.tally());
    let tokens = shared.ledger().summary();
    let ok = tally.requests.values().map(|c| c.ok).sum::<u64>();
    let mut failures_by_class = BTreeMap::new();
    for f in tally.failures.values() {
        *failures_by_class.entry(f.class).or_default() += f.count;
    }
    let mut report = SoakReport {
        benchmark: "soak",
        grpc_addresses: args.grpc_address.clone(),
        http_addresses: args.http_address.clone(),
        elapsed_seconds,
        elections: args.elections,
        grpc_candidates: args.elections * args.grpc_candidates,
        http_candidates: args.elections * http_candidates,
        observe_streams: args.elections * args.observers,
        watch_streams: args.elections * watchers,
        requests: ok + tally.requests.values().map(|c| c.failed).sum::<u64>(),
        ok,
        requests_by_operation: tally.requests,
        failures_by_kind: tally.failures,
        failures_by_class,
        per_minute: tally.minutes,
        longest_without_success_ms: tally.longest_without_success_ms,
        leadership: tally.leadership,
        streams: tally.streams,
        tokens,
        rss: args
            .watch_rss
            .iter()
            .zip(&samples)
            .map(|((name, _), samples)| {
                let phase = (args.phase_from.as_secs_f64(), args.phase_to.as_secs_f64());
                RssSummary::of(name, samples, args.warm_up.as_secs_f64(), phase)
            })
            .collect(),
        max_rss_slope_mb_per_minute: args.max_rss_slope,
        verdict: Verdict {
            passed: false,
            failures: Vec::new(),
            notes: Vec::new(),
        },
    };
    report.judge();
    Ok(report)
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "soak: {:.0} s; {} elections; {} gRPC + {} HTTP candidates; {} Observe + {} watch streams",
            self.elapsed_seconds,
            self.elections,
            self.grpc_candidates,
            self.http_candidates,
            self.observe_streams,
            self.watch_streams
        )?;
        writeln!(
            f,
            "requests     {} ({} ok, {} failed); longest a candidate went without success: {} ms",
            self.requests,
            self.ok,
            self.requests - self.ok,
            self.longest_without_success_ms
        )?;
        for (operation, n) in &self.requests_by_operation {
            writeln!(f, "  {operation:<18} {:>8} ok {:>6} failed", n.ok, n.failed)?;
        }
        let l = &self.leadership;
        writeln!(
            f,
            "leadership   {} elected, {} extended, {} resigned, {} handed over, {} lost",
            l.elected, l.extended, l.resigned, l.handed_over, l.lost
        )?;
        writeln!(f, "failures by kind (requests and streams)")?;
        for (kind, n) in &self.failures_by_kind {
            let class = format!("{:?}", n.class).to_lowercase();
            writeln!(f, "  {kind:<48} {:>7}  {class}", n.count)?;
        }
        for (name, s) in &self.streams {
            let ended: Vec<String> = s.ended.iter().map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(
                f,
                "{name:<12} {} attempts, {} opened, {} events; longest reconnect {} ms; ended: {}",
                s.attempts,
                s.opened,
                s.events,
                s.longest_reconnect_ms,
                ended.join(", ")
            )?;
        }
        writeln!(f, "per minute (ok / failed requests, events)")?;
        let minutes: Vec<String> = self
            .per_minute
            .iter()
            .map(|m| format!("{}: {}/{}, {}", m.minute, m.ok, m.failed, m.events))
            .collect();
        writeln!(f, "  {}", minutes.join("; "))?;
        let t = &self.tokens;
        writeln!(
            f,
            "tokens       {} checked over {} elections: {} regressions ({} lower than the highest \
             seen, all from requests that overlapped the one that saw it)",
            t.checked, t.elections, t.regressions, t.overlapping_lower
        )?;
        for r in &t.examples {
            writeln!(
                f,
                "  REGRESSION at {:.1} s: {} ({}) saw {} on {} after {}",
                r.at_seconds, r.seen.client, r.seen.by, r.token, r.election, r.floor
            )?;
        }
        for rss in &self.rss {
            let minutes: Vec<String> = rss
                .per_minute
                .iter()
                .map(|m| format!("{}: {:.1}", m.minute, m.median_mb))
                .collect();
            writeln!(
                f,
                "RSS {:<8} {} samples, {} incarnation(s), {:.1}-{:.1} MB; per-minute medians (MB) {}",
                rss.name,
                rss.samples,
                rss.incarnations,
                rss.min_mb,
                rss.max_mb,
                minutes.join(", ")
            )?;
            let slope = rss
                .trend
                .slope_mb_per_minute
                .map_or("n/a".to_owned(), |s| format!("{s:+.3} MB/min"));
            writeln!(f, "  trend {slope} — {}", rss.trend.method)?;
        }
        if self.verdict.passed {
            write!(f, "verdict      passed")?;
        } else {
            write!(
                f,
                "verdict      FAILED: {}",
                self.verdict.failures.join("; ")
            )?;
        }
        for note in &self.verdict.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;
    use memory::RssTrend;

    #[test]
    fn backoff_doubles_to_two_seconds_and_starts_again_after_a_success() {
        let mut backoff = Backoff::default();
        let first = backoff.next();
        assert!(first <= Duration::from_millis(50) && first >= Duration::from_millis(25));
        for _ in 0..20 {
            assert!(backoff.next() <= Duration::from_secs(2));
        }
        assert!(backoff.next() >= Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(50));
    }

    #[test]
    fn rss_targets_are_name_equals_pidfile() {
        assert_eq!(
            rss_target("agent=/tmp/a.pid").unwrap(),
            ("agent".to_owned(), PathBuf::from("/tmp/a.pid"))
        );
        assert!(rss_target("agent").is_err());
        assert!(rss_target("=x").is_err());
    }

    #[test]
    fn the_verdict_fails_on_a_regression_growth_a_silent_minute_or_an_unexpected_failure() {
        let mut report = SoakReport {
            benchmark: "soak",
            grpc_addresses: vec![],
            http_addresses: vec![],
            elapsed_seconds: 120.5,
            elections: 1,
            grpc_candidates: 1,
            http_candidates: 0,
            observe_streams: 0,
            watch_streams: 0,
            requests: 10,
            ok: 10,
            requests_by_operation: BTreeMap::new(),
            failures_by_kind: BTreeMap::new(),
            failures_by_class: BTreeMap::new(),
            per_minute: vec![
                MinuteCount {
                    minute: 0,
                    ok: 5,
                    ..Default::default()
                },
                MinuteCount {
                    minute: 1,
                    ok: 5,
                    ..Default::default()
                },
                MinuteCount {
                    minute: 2,
                    ok: 0,
                    ..Default::default()
                },
            ],
            longest_without_success_ms: 0,
            leadership: LeadershipCount::default(),
            streams: BTreeMap::new(),
            tokens: TokenLedger::default().summary(),
            rss: vec![],
            max_rss_slope_mb_per_minute: 0.5,
            verdict: Verdict {
                passed: false,
                failures: vec![],
                notes: vec![],
            },
        };
        report.judge();
        assert!(
            report.verdict.passed,
            "{:?}; the last, partial minute is not judged",
            report.verdict
        );

        let mut failing = report.clone();
        failing.per_minute[1].ok = 0;
        failing.tokens.regressions = 1;
        failing.failures_by_class.insert(Class::Unexpected, 2);
        failing.rss.push(RssSummary {
            name: "agent".into(),
            samples: 10,
            incarnations: 1,
            min_mb: 10.0,
            max_mb: 20.0,
            per_minute: vec![],
            trend: RssTrend {
                method: String::new(),
                points: vec![],
                slope_mb_per_minute: Some(0.8),
            },
        });
        failing.judge();
        assert!(!failing.verdict.passed);
        assert_eq!(
            failing.verdict.failures.len(),
            4,
            "{:?}",
            failing.verdict.failures
        );
    }
}

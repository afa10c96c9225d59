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

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::{Method, Request, StatusCode, header};
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{BenchError, run_id};
use crate::grpc::pb::{self, election_client::ElectionClient};

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
// Failures, by kind and class.

/// What a failure says about the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// The agent or its store was down or going down: refused connections, a store unavailable.
    Outage,
    /// The lease was not the caller's (any more): another candidate took it, or it was lost with
    /// the store's data. Normal among competing candidates.
    Contention,
    /// Anything else: a bug, or a case the soak does not know.
    Unexpected,
}

/// A failed request (or a stream that ended), as the soak counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// e.g. `connection refused`, `gRPC NotFound`, `HTTP 412`.
    pub kind: String,
    /// What it says about the agent.
    pub class: Class,
}

impl Failure {
    fn new(kind: impl Into<String>, class: Class) -> Self {
        Self {
            kind: kind.into(),
            class,
        }
    }

    fn timeout() -> Self {
        Self::new("timeout", Class::Outage)
    }
}

/// A failure of the connection itself (nothing the agent answered), from an error's chain.
pub fn transport_failure(err: &(dyn std::error::Error + 'static)) -> Failure {
    use std::io::ErrorKind;
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => {
                    return Failure::new("connection refused", Class::Outage);
                }
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => {
                    return Failure::new("connection closed", Class::Outage);
                }
                ErrorKind::TimedOut => return Failure::timeout(),
                _ => {}
            }
        }
        next = err.source();
    }
    // The connection went away in a way without an I/O error (h2 GOAWAY, a stream refused or
    // reset, a pooled connection found closed): what an agent stopping does.
    Failure::new("connection closed", Class::Outage)
}

/// A gRPC status: the agent's answer, or (when it has a source) the client's transport failing.
pub fn grpc_failure(status: &tonic::Status) -> Failure {
    use tonic::Code;
    if let Some(source) = std::error::Error::source(status) {
        return transport_failure(source);
    }
    let kind = |detail: &str| format!("gRPC {:?}{detail}", status.code());
    match status.code() {
        // The agent answers FAILED_PRECONDITION both when its store is unavailable (as the Go
        // service did) and when a conditional handover meets another lease; the message tells.
        Code::FailedPrecondition if status.message().starts_with("lease store unavailable") => {
            Failure::new(kind(" (store unavailable)"), Class::Outage)
        }
        Code::FailedPrecondition => Failure::new(kind(" (not as expected)"), Class::Contention),
        Code::NotFound | Code::AlreadyExists => Failure::new(kind(""), Class::Contention),
        // Refused by an agent going down, or not answered in its deadline while the store was.
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            Failure::new(kind(""), Class::Outage)
        }
        _ => Failure::new(kind(""), Class::Unexpected),
    }
}

/// An HTTP status other than 200.
pub fn http_failure(status: StatusCode) -> Failure {
    let class = match status.as_u16() {
        // 412: the store is unavailable (the Go service's status); 503: not ready, shutting down.
        412 | 503 => Class::Outage,
        // 404: nobody leads, or another candidate does (resign); 409: another candidate leads.
        404 | 409 => Class::Contention,
        _ => Class::Unexpected,
    };
    Failure::new(format!("HTTP {}", status.as_u16()), class)
}

// ---------------------------------------------------------------------------------------------
// Fencing tokens.

/// Where a token was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sighting {
    /// e.g. `gRPC campaign`, `SSE watch`.
    pub by: String,
    /// The client (candidate or stream).
    pub client: String,
}

/// A token lower than one seen before the observation that saw it began.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regression {
    /// The election.
    pub election: String,
    /// The token seen.
    pub token: u64,
    /// The highest token seen before the observation began.
    pub floor: u64,
    /// Where.
    pub seen: Sighting,
    /// Seconds into the run.
    pub at_seconds: f64,
}

/// The fencing tokens every client has seen, per election.
///
/// "Seen earlier" means: by an observation that ended before this one began. A request takes
/// [`TokenLedger::floor`] when it is sent and hands it back with the token its answer carried;
/// a stream takes it when it connects, then raises it with every event. A token below its floor
/// is a regression. A token below the highest seen so far but not below its floor came from a
/// request that overlapped the one that saw the higher token — its answer may have been decided
/// first — and is only counted (`overlapping_lower` of the summary).
#[derive(Debug, Default)]
pub struct TokenLedger {
    highest: HashMap<String, u64>,
    checked: u64,
    overlapping_lower: u64,
    regressions: u64,
    examples: Vec<Regression>,
}

/// Regressions kept in full for the report.
const REGRESSION_EXAMPLES: usize = 20;

impl TokenLedger {
    /// The highest token seen on `election` so far: no later observation may see less.
    pub fn floor(&self, election: &str) -> u64 {
        self.highest.get(election).copied().unwrap_or(0)
    }

    /// `token` was seen on `election` by an observation that began when its floor was `floor`;
    /// 0 (nobody leads; a resign's answer) carries no token. Answers the regression, if it is one.
    pub fn saw(
        &mut self,
        election: &str,
        floor: u64,
        token: u64,
        seen: impl FnOnce() -> Sighting,
        at_seconds: f64,
    ) -> Option<Regression> {
        if token == 0 {
            return None;
        }
        self.checked += 1;
        let highest = self.highest.entry(election.to_owned()).or_default();
        let regression = if token < floor {
            self.regressions += 1;
            let regression = Regression {
                election: election.to_owned(),
                token,
                floor,
                seen: seen(),
                at_seconds,
            };
            if self.examples.len() < REGRESSION_EXAMPLES {
                self.examples.push(regression.clone());
            }
            Some(regression)
        } else {
            if token < *highest {
                self.overlapping_lower += 1;
            }
            None
        };
        *highest = (*highest).max(token);
        regression
    }

    fn summary(&self) -> TokenSummary {
        TokenSummary {
            elections: self.highest.len(),
            checked: self.checked,
            regressions: self.regressions,
            overlapping_lower: self.overlapping_lower,
            examples: self.examples.clone(),
        }
    }
}

/// The token check's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenSummary {
    /// Elections with at least one token seen.
    pub elections: usize,
    /// Tokens checked (answers of campaign, extend and handover; stream events naming a leader).
    pub checked: u64,
    /// Tokens lower than one seen before the observation began: must be 0.
    pub regressions: u64,
    /// Tokens lower than the highest seen when they arrived, from overlapping requests.
    pub overlapping_lower: u64,
    /// The first regressions, in full.
    pub examples: Vec<Regression>,
}

// ---------------------------------------------------------------------------------------------
// Memory.

/// One reading of a process's resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RssSample {
    /// Seconds into the run.
    pub at_seconds: f64,
    /// The process (a new pid: a new incarnation).
    pub pid: u32,
    /// VmRSS, in kB.
    pub rss_kb: u64,
}

/// The median of `values` (none when empty).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The least-squares slope of `points` (x, y); none with fewer than three points or one x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

/// The median RSS of one minute of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteMedian {
    /// Minute of the run, from 0.
    pub minute: u32,
    /// Median of its samples, MB.
    pub median_mb: f64,
    /// Samples in it.
    pub samples: usize,
}

/// How a process's memory moved after the warm-up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RssTrend {
    /// Which points the slope is drawn through.
    pub method: String,
    /// (minute of the run, MB).
    pub points: Vec<(f64, f64)>,
    /// Least-squares slope through `points`, MB per minute.
    pub slope_mb_per_minute: Option<f64>,
}

/// The trend of `samples`. A process that lived through the run after `warm_up` (seconds) is
/// judged on every sample after it. A process restarted during the run starts afresh each time, so
/// a slope through all its samples would only draw the saw of its restarts: each incarnation is
/// taken at the same age instead — the median of its samples aged `phase` (seconds) — and the
/// slope drawn through those, one point per incarnation.
pub fn rss_trend(samples: &[RssSample], warm_up: f64, phase: (f64, f64)) -> RssTrend {
    // Incarnations in order, each with the time of its first sample (its start, to a sample).
    let mut incarnations: Vec<(u32, f64)> = Vec::new();
    for s in samples {
        if !incarnations.iter().any(|(pid, _)| *pid == s.pid) {
            incarnations.push((s.pid, s.at_seconds));
        }
    }
    let after_warm_up: Vec<&RssSample> =
        samples.iter().filter(|s| s.at_seconds >= warm_up).collect();
    let restarted = after_warm_up.iter().any(|s| s.pid != after_warm_up[0].pid);
    if !restarted {
        let points: Vec<(f64, f64)> = after_warm_up
            .iter()
            .map(|s| (s.at_seconds / 60.0, mb(s.rss_kb)))
            .collect();
        return RssTrend {
            method: format!(
                "every sample after the warm-up ({:.0} s), one incarnation",
                warm_up
            ),
            slope_mb_per_minute: slope(&points),
            points,
        };
    }
    let mut points = Vec::new();
    for (pid, start) in &incarnations {
        let mut at_phase: Vec<f64> = samples
            .iter()
            .filter(|s| s.pid == *pid && (phase.0..=phase.1).contains(&(s.at_seconds - start)))
            .map(|s| mb(s.rss_kb))
            .collect();
        if let Some(m) = median(&mut at_phase) {
            points.push(((start + (phase.0 + phase.1) / 2.0) / 60.0, m));
        }
    }
    RssTrend {
        method: format!(
            "restarted ({} incarnations): the median of each incarnation aged {:.0}-{:.0} s",
            incarnations.len(),
            phase.0,
            phase.1
        ),
        slope_mb_per_minute: slope(&points),
        points,
    }
}

/// Median RSS per minute of the run.
pub fn minute_medians(samples: &[RssSample]) -> Vec<MinuteMedian> {
    let mut minutes: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for s in samples {
        minutes
            .entry((s.at_seconds / 60.0) as u32)
            .or_default()
            .push(mb(s.rss_kb));
    }
    minutes
        .into_iter()
        .filter_map(|(minute, mut values)| {
            let samples = values.len();
            median(&mut values).map(|median_mb| MinuteMedian {
                minute,
                median_mb,
                samples,
            })
        })
        .collect()
}

/// What the soak saw of one process's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RssSummary {
    /// The name given with --watch-rss.
    pub name: String,
    /// Samples read.
    pub samples: usize,
    /// Distinct pids seen.
    pub incarnations: usize,
    /// Lowest and highest sample, MB.
    pub min_mb: f64,
    /// Highest sample, MB.
    pub max_mb: f64,
    /// Median per minute.
    pub per_minute: Vec<MinuteMedian>,
    /// After the warm-up.
    pub trend: RssTrend,
}

fn rss_summary(name: &str, samples: &[RssSample], args: &SoakArgs) -> RssSummary {
    let mut pids: Vec<u32> = samples.iter().map(|s| s.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let values = samples.iter().map(|s| mb(s.rss_kb));
    RssSummary {
        name: name.to_owned(),
        samples: samples.len(),
        incarnations: pids.len(),
        min_mb: values.clone().fold(f64::INFINITY, f64::min),
        max_mb: values.fold(0.0, f64::max),
        per_minute: minute_medians(samples),
        trend: rss_trend(
            samples,
            args.warm_up.as_secs_f64(),
            (args.phase_from.as_secs_f64(), args.phase_to.as_secs_f64()),
        ),
    }
}

/// VmRSS of the process whose pid `pidfile` holds, in kB (none while it is being restarted).
fn read_rss(pidfile: &std::path::Path) -> Option<(u32, u64)> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((pid, kb))
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events.

/// Splits a Server-Sent Events byte stream into the `data` of its events (the only field the
/// soak reads: a watch event's JSON repeats its type and id).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Takes the next bytes of the stream; answers the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                done.extend(self.data.take());
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = String::from_utf8_lossy(value.strip_prefix(b" ").unwrap_or(value));
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.data = Some(value.into_owned()),
                }
            }
            // `event:`, `id:`, `retry:` and `:` comments (the keep-alives) are not needed.
        }
        done
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

/// Requests and streams give up after this long (an agent stopped mid-answer, a lost packet).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The two protocols.

type Http = HttpClient<HttpConnector, Full<Bytes>>;

/// One client's way to an agent.
#[derive(Clone)]
enum Api {
    Grpc(ElectionClient<Channel>),
    Http { client: Http, base: String },
}

/// A campaign's answer, as far as the soak reads it.
#[derive(serde::Deserialize)]
struct Campaigned {
    elected: bool,
    fencing_token: u64,
}

/// The answer of extend and handover.
#[derive(serde::Deserialize)]
struct Value {
    fencing_token: u64,
}

/// One event of a stream, as far as the soak reads it.
#[derive(Debug, serde::Deserialize)]
struct Event {
    fencing_token: u64,
    version: u64,
}

impl Api {
    fn protocol(&self) -> &'static str {
        match self {
            Api::Grpc(_) => "gRPC",
            Api::Http { .. } => "HTTP",
        }
    }

    async fn grpc<T>(
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(grpc_failure(&status)),
            Err(_) => Err(Failure::timeout()),
        }
    }

    async fn http<T: serde::de::DeserializeOwned>(
        client: &Http,
        method: Method,
        uri: &str,
        body: serde_json::Value,
    ) -> Result<T, Failure> {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| Failure::new("invalid request", Class::Unexpected))?;
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|err| transport_failure(&err))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|err| transport_failure(&err))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(http_failure(status));
            }
            serde_json::from_slice(&body)
                .map_err(|_| Failure::new("unreadable answer", Class::Unexpected))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(Failure::timeout()))
    }

    async fn campaign(&mut self, seat: &Seat, term: i32) -> Result<Campaigned, Failure> {
        match self {
            Api::Grpc(client) => {
                let answer = Self::grpc(client.campaign(pb::CampaignRequest {
                    election: seat.election.clone(),
                    candidate: seat.candidate.clone(),
                    term,
                    kind: seat.kind.clone(),
                }))
                .await?;
                Ok(Campaigned {
                    elected: answer.elected,
                    fencing_token: answer.fencing_token,
                })
            }
            Api::Http { client, base } => {
                let body = serde_json::json!({"candidate": seat.candidate, "term": term});
                Self::http(client, Method::POST, &seat.uri(base), body).await
            }
        }
    }

    async fn extend(&mut self, seat: &Seat, term: i32) -> Result<u64, Failure> {
        match self {
            Api::Grpc(client) => {
                Self::grpc(client.extend_elected_term(pb::ExtendElectedTermRequest {
                    election: seat.election.clone(),
                    leader: seat.candidate.clone(),
                    term,
                    kind: seat.kind.clone(),
                    retries: 0,
                    retry_interval: 0,
                }))
                .await
                .map(|answer| answer.fencing_token)
            }
            Api::Http { client, base } => {
                let body = serde_json::json!({"leader": seat.candidate, "term": term});
                Self::http::<Value>(client, Method::PATCH, &seat.uri(base), body)
                    .await
                    .map(|answer| answer.fencing_token)
            }
        }
    }

    async fn resign(&mut self, seat: &Seat) -> Result<(), Failure> {
        match self {
            Api::Grpc(client) => Self::grpc(client.resign(pb::ResignRequest {
                election: seat.election.clone(),
                leader: seat.candidate.clone(),
                kind: seat.kind.clone(),
            }))
            .await
            .map(drop),
            Api::Http { client, base } => {
                let body = serde_json::json!({"leader": seat.candidate});
                Self::http::<Value>(client, Method::DELETE, &seat.uri(base), body)
                    .await
                    .map(drop)
            }
        }
    }

    /// Hands the caller's own live lease (`token`) to `to`, and nothing else.
    async fn handover(
        &mut self,
        seat: &Seat,
        to: &str,
        term: i32,
        token: u64,
    ) -> Result<u64, Failure> {
        match self {
            Api::Grpc(client) => Self::grpc(client.handover(pb::HandoverRequest {
                election: seat.election.clone(),
                leader: to.to_owned(),
                term,
                kind: seat.kind.clone(),
                expected_leader: seat.candidate.clone(),
                expected_fencing_token: token,
            }))
            .await
            .map(|answer| answer.fencing_token),
            Api::Http { client, base } => {
                let body = serde_json::json!({
                    "leader": to, "term": term,
                    "expected_leader": seat.candidate, "expected_fencing_token": token,
                });
                Self::http::<Value>(client, Method::PUT, &seat.uri(base), body)
                    .await
                    .map(|answer| answer.fencing_token)
            }
        }
    }

    /// Opens a stream of the election's events: Observe over gRPC, watch (SSE) over HTTP.
    async fn follow(
        &mut self,
        seat: &Seat,
    ) -> Result<BoxStream<'static, Result<Event, Failure>>, Failure> {
        match self {
            Api::Grpc(client) => {
                let events = Self::grpc(client.observe(pb::ObserveRequest {
                    election: seat.election.clone(),
                    kind: seat.kind.clone(),
                }))
                .await?;
                Ok(events
                    .map(|event| match event {
                        Ok(e) => Ok(Event {
                            fencing_token: e.fencing_token,
                            version: e.version,
                        }),
                        Err(status) => Err(grpc_failure(&status)),
                    })
                    .boxed())
            }
            Api::Http { client, base } => {
                let request = Request::get(format!("{}/watch", seat.uri(base)))
                    .header(header::ACCEPT, "text/event-stream")
                    .body(Full::default())
                    .map_err(|_| Failure::new("invalid request", Class::Unexpected))?;
                let response = tokio::time::timeout(REQUEST_TIMEOUT, client.request(request))
                    .await
                    .map_err(|_| Failure::timeout())?
                    .map_err(|err| transport_failure(&err))?;
                if response.status() != StatusCode::OK {
                    return Err(http_failure(response.status()));
                }
                let mut body = response.into_body();
                Ok(async_stream::stream! {
                    let mut parser = SseParser::default();
                    while let Some(frame) = body.frame().await {
                        let data = match frame {
                            Ok(frame) => match frame.into_data() {
                                Ok(data) => data,
                                Err(_) => continue, // trailers
                            },
                            Err(err) => {
                                yield Err(transport_failure(&err));
                                return;
                            }
                        };
                        for event in parser.push(&data) {
                            yield serde_json::from_str::<Event>(&event)
                                .map_err(|_| Failure::new("unreadable event", Class::Unexpected));
                        }
                    }
                }
                .boxed())
            }
        }
    }
}

/// A candidate's (or a stream's) place: which election, under which name.
#[derive(Debug, Clone)]
struct Seat {
    kind: String,
    election: String,
    candidate: String,
}

impl Seat {
    fn uri(&self, base: &str) -> String {
        format!("{base}/election/{}/{}", self.kind, self.election)
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
            .map(|((name, _), samples)| rss_summary(name, samples, args))
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
mod tests {
    use super::*;

    fn sighting() -> Sighting {
        Sighting {
            by: "gRPC campaign".into(),
            client: "c".into(),
        }
    }

    #[test]
    fn a_token_below_one_seen_before_the_request_was_sent_is_a_regression() {
        let mut ledger = TokenLedger::default();
        let floor = ledger.floor("e");
        assert_eq!(ledger.saw("e", floor, 10, sighting, 1.0), None);
        let floor = ledger.floor("e");
        assert_eq!(floor, 10);
        let regression = ledger
            .saw("e", floor, 9, sighting, 2.0)
            .expect("a regression");
        assert_eq!((regression.token, regression.floor), (9, 10));
        assert_eq!(ledger.summary().regressions, 1);
        assert_eq!(ledger.summary().examples, vec![regression]);
    }

    #[test]
    fn a_lower_token_from_a_request_that_overlapped_the_higher_one_is_not_a_regression() {
        let mut ledger = TokenLedger::default();
        // Both sent before either answered: the one decided first may be read last.
        let (first, second) = (ledger.floor("e"), ledger.floor("e"));
        assert_eq!(ledger.saw("e", first, 11, sighting, 1.0), None);
        assert_eq!(ledger.saw("e", second, 10, sighting, 1.0), None);
        assert_eq!(ledger.summary().overlapping_lower, 1);
        assert_eq!(ledger.summary().regressions, 0);
        assert_eq!(ledger.floor("e"), 11, "the highest stays the floor");
    }

    #[test]
    fn no_token_and_other_elections_do_not_count() {
        let mut ledger = TokenLedger::default();
        ledger.saw("a", 0, 100, sighting, 1.0);
        assert_eq!(
            ledger.saw("a", 100, 0, sighting, 1.0),
            None,
            "0: nobody leads"
        );
        assert_eq!(ledger.saw("b", ledger.floor("b"), 5, sighting, 1.0), None);
        let summary = ledger.summary();
        assert_eq!(
            (summary.checked, summary.elections, summary.regressions),
            (2, 2, 0)
        );
    }

    #[test]
    fn only_the_first_regressions_are_kept_in_full() {
        let mut ledger = TokenLedger::default();
        ledger.saw("e", 0, 1_000, sighting, 0.0);
        for token in 1..=50 {
            ledger.saw("e", 1_000, token, sighting, 0.0);
        }
        let summary = ledger.summary();
        assert_eq!(summary.regressions, 50);
        assert_eq!(summary.examples.len(), REGRESSION_EXAMPLES);
    }

    #[test]
    fn grpc_statuses_from_the_agent_are_classified_by_what_they_mean() {
        let class = |status: tonic::Status| grpc_failure(&status);
        assert_eq!(
            class(tonic::Status::failed_precondition(
                "lease store unavailable: timed out"
            )),
            Failure::new("gRPC FailedPrecondition (store unavailable)", Class::Outage)
        );
        assert_eq!(
            class(tonic::Status::failed_precondition(
                "election soak/x is not led as the handover expects; b leads it"
            )),
            Failure::new(
                "gRPC FailedPrecondition (not as expected)",
                Class::Contention
            )
        );
        assert_eq!(
            class(tonic::Status::not_found("nobody")).class,
            Class::Contention
        );
        assert_eq!(
            class(tonic::Status::already_exists("b")).class,
            Class::Contention
        );
        assert_eq!(
            class(tonic::Status::unavailable("bye")).class,
            Class::Outage
        );
        assert_eq!(
            class(tonic::Status::internal("boom")),
            Failure::new("gRPC Internal", Class::Unexpected)
        );
        assert_eq!(
            class(tonic::Status::invalid_argument("x")).class,
            Class::Unexpected
        );
    }

    #[test]
    fn http_statuses_are_classified_by_what_they_mean() {
        assert_eq!(
            http_failure(StatusCode::PRECONDITION_FAILED),
            Failure::new("HTTP 412", Class::Outage)
        );
        assert_eq!(
            http_failure(StatusCode::SERVICE_UNAVAILABLE).class,
            Class::Outage
        );
        assert_eq!(http_failure(StatusCode::CONFLICT).class, Class::Contention);
        assert_eq!(http_failure(StatusCode::NOT_FOUND).class, Class::Contention);
        assert_eq!(
            http_failure(StatusCode::BAD_REQUEST).class,
            Class::Unexpected
        );
        assert_eq!(
            http_failure(StatusCode::INTERNAL_SERVER_ERROR).class,
            Class::Unexpected
        );
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport error")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn transport_failures_are_found_down_the_error_chain() {
        use std::io::{Error, ErrorKind};
        let failure = |kind| transport_failure(&Wrapped(Error::from(kind)));
        assert_eq!(
            failure(ErrorKind::ConnectionRefused).kind,
            "connection refused"
        );
        assert_eq!(
            failure(ErrorKind::ConnectionReset).kind,
            "connection closed"
        );
        assert_eq!(failure(ErrorKind::TimedOut).kind, "timeout");
        assert!(
            [ErrorKind::ConnectionRefused, ErrorKind::Other]
                .into_iter()
                .all(|kind| failure(kind).class == Class::Outage)
        );
        // A status with a source is the client's transport, not the agent's answer.
        let status =
            tonic::Status::from_error(Box::new(Wrapped(Error::from(ErrorKind::ConnectionRefused))));
        assert_eq!(grpc_failure(&status).kind, "connection refused");
    }

    #[tokio::test]
    async fn a_call_to_a_port_nobody_listens_on_counts_as_connection_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("http://127.0.0.1:{port}");
        let channel = Endpoint::from_shared(address.clone())
            .unwrap()
            .connect_lazy();
        let mut grpc = Api::Grpc(ElectionClient::new(channel));
        let mut http = Api::Http {
            client: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
            base: address,
        };
        let seat = Seat {
            kind: "soak".into(),
            election: "e".into(),
            candidate: "c".into(),
        };
        for api in [&mut grpc, &mut http] {
            let failure = api.campaign(&seat, 1000).await.err().unwrap();
            assert_eq!(failure.kind, "connection refused", "{}", api.protocol());
        }
    }

    #[test]
    fn sse_events_are_split_across_chunks_and_keep_alives_skipped() {
        let mut parser = SseParser::default();
        assert!(
            parser
                .push(b": keep-alive\n\nevent: current\nid: 4\ndata: {\"a\"")
                .is_empty()
        );
        assert_eq!(
            parser.push(b":1}\r\n\r\ndata: x\ndata: y\n"),
            vec!["{\"a\":1}"]
        );
        assert_eq!(parser.push(b"\n"), vec!["x\ny"]);
        assert!(parser.push(b"\n\n").is_empty(), "no data: no event");
    }

    #[test]
    fn median_and_slope_of_small_sets() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(
            slope(&[(0.0, 1.0), (1.0, 3.0)]),
            None,
            "two points: no trend"
        );
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]), None);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]).unwrap();
        assert!((s - 2.0).abs() < 1e-9, "{s}");
    }

    fn sample(at_seconds: f64, pid: u32, mb: f64) -> RssSample {
        RssSample {
            at_seconds,
            pid,
            rss_kb: (mb * 1e6 / 1024.0).round() as u64,
        }
    }

    #[test]
    fn a_process_never_restarted_is_judged_on_every_sample_after_the_warm_up() {
        // Grows fast during the warm-up, then 0.1 MB a minute.
        let samples: Vec<RssSample> = (0..600)
            .step_by(2)
            .map(|t| {
                let t = t as f64;
                let mb = if t < 120.0 {
                    10.0 + t / 12.0
                } else {
                    20.0 + (t - 120.0) / 600.0
                };
                sample(t, 7, mb)
            })
            .collect();
        let trend = rss_trend(&samples, 120.0, (20.0, 28.0));
        assert!(trend.method.contains("one incarnation"), "{}", trend.method);
        assert!(trend.points.iter().all(|p| p.0 >= 2.0));
        let s = trend.slope_mb_per_minute.unwrap();
        assert!((s - 0.1).abs() < 0.01, "{s}");
    }

    #[test]
    fn a_restarted_process_is_compared_across_incarnations_at_the_same_age() {
        // Restarted every minute at :30; each incarnation grows from 15 MB over its life, and
        // each starts 0.3 MB higher than the one before: that is the trend, not the saw.
        let mut samples = Vec::new();
        for t in (0..600).step_by(2) {
            let t = t as f64;
            let incarnation = ((t + 30.0) / 60.0).floor();
            let start = (incarnation * 60.0 - 30.0).max(0.0);
            let age = t - start;
            samples.push(sample(
                t,
                100 + incarnation as u32,
                15.0 + age / 10.0 + 0.3 * incarnation,
            ));
        }
        let trend = rss_trend(&samples, 120.0, (20.0, 28.0));
        assert!(trend.method.contains("11 incarnations"), "{}", trend.method);
        assert_eq!(trend.points.len(), 11);
        let s = trend.slope_mb_per_minute.unwrap();
        assert!((s - 0.3).abs() < 0.05, "{s}");
    }

    #[test]
    fn minute_medians_group_samples_by_minute_of_the_run() {
        let samples = [
            sample(1.0, 1, 10.0),
            sample(59.0, 1, 12.0),
            sample(61.0, 2, 20.0),
        ];
        let minutes = minute_medians(&samples);
        assert_eq!(minutes.len(), 2);
        assert_eq!((minutes[0].minute, minutes[0].samples), (0, 2));
        assert!((minutes[0].median_mb - 11.0).abs() < 0.01);
        assert!((minutes[1].median_mb - 20.0).abs() < 0.01);
    }

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

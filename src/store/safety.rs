//! The safety checker: many concurrent candidates with short terms and random delays hammer a
//! store while faults are injected, and every leadership interval *as a client sees it* is
//! recorded. The run fails on any overlap of two holders' intervals or any fencing token that does
//! not rise in the order of those intervals.
//!
//! The client's view: a candidate that got a grant believes it leads from the moment the answer
//! arrives until the term — counted from when it *sent* the request, less the documented
//! clock-drift allowance — runs out. It stops believing the moment it sends a resignation
//! (whatever the answer), and an operator's Handover deposes every other holder from the moment
//! it is sent, whether or not it is acknowledged: a Handover that failed may still have been
//! applied on some servers, like any write whose answer was lost.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::LeaseStore;
use crate::lease::{Command, ElectionKey, FencingToken, Name, Outcome, Term};

/// A lease as one candidate was told it holds it.
#[derive(Debug, Clone)]
struct Interval {
    election: usize,
    holder: usize,
    token: FencingToken,
    /// When the request that granted it was sent.
    sent: Instant,
    from: Instant,
    until: Instant,
}

/// A request that ends leases: a resign ends its caller's, a handover everyone else's.
#[derive(Debug, Clone, Copy)]
struct Ending {
    election: usize,
    holder: usize,
    handover: bool,
    sent: Instant,
    answered: Instant,
}

/// What a run saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    /// Requests sent.
    pub operations: usize,
    /// Grants (campaigns and extends that led, handovers), i.e. leadership intervals.
    pub intervals: usize,
    /// Grants that began a new lease (a token the candidate did not hold before).
    pub new_leases: usize,
    /// Requests that failed (store unavailable).
    pub failures: usize,
    /// How many failed for each reason (server names and numbers left out).
    pub reasons: std::collections::BTreeMap<String, usize>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} operations, {} grants ({} new leases), {} failed",
            self.operations, self.intervals, self.new_leases, self.failures
        )?;
        for (reason, count) in &self.reasons {
            write!(f, "\n    {count} x {reason}")?;
        }
        Ok(())
    }
}

/// How a run is shaped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    /// Concurrent candidates.
    pub candidates: usize,
    /// Elections they compete for.
    pub elections: usize,
    /// The term of every lease.
    pub term: Duration,
    /// How long the run lasts.
    pub duration: Duration,
    /// The clock-drift allowance a client subtracts from its term (Redlock's; none for a store
    /// that grants a lease atomically on one clock).
    pub drift: Duration,
}

impl Workload {
    /// 50 candidates on 10 elections.
    pub(crate) fn new(term: Duration, duration: Duration, drift: Duration) -> Self {
        Self {
            candidates: 50,
            elections: 10,
            term,
            duration,
            drift,
        }
    }

    /// The election keys of a run named `run`.
    pub(crate) fn keys(&self, run: &str) -> Vec<ElectionKey> {
        (0..self.elections)
            .map(|e| ElectionKey {
                kind: Name::parse("kind", run).expect("valid kind"),
                election: Name::parse("election", &format!("e{e}")).expect("valid name"),
            })
            .collect()
    }
}

struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[derive(Default)]
struct Log {
    intervals: Vec<Interval>,
    endings: Vec<Ending>,
    report: Report,
}

/// Runs `workload` against `store` under the kind `run` while `faults` runs alongside; panics on
/// any violation, and returns what happened.
pub(crate) async fn check<S: LeaseStore + 'static>(
    store: Arc<S>,
    run: &str,
    workload: Workload,
    faults: impl Future<Output = ()>,
) -> Report {
    let log = Arc::new(Mutex::new(Log::default()));
    let end = Instant::now() + workload.duration;
    let keys = workload.keys(run);
    let mut tasks = tokio::task::JoinSet::new();
    for holder in 0..workload.candidates {
        let (store, log, keys) = (store.clone(), log.clone(), keys.clone());
        let name = Name::parse("candidate", &format!("c{holder}")).expect("valid name");
        tasks.spawn(async move {
            let mut random = Lcg(holder as u64 + 1);
            let term = Term::from_millis(workload.term.as_millis() as u64);
            let mut held: Vec<Option<FencingToken>> = vec![None; keys.len()];
            while Instant::now() < end {
                let election = random.below(keys.len() as u64) as usize;
                let command = match random.below(10) {
                    0..=5 => Command::Campaign {
                        candidate: name.clone(),
                        term,
                    },
                    6..=7 => Command::Extend {
                        leader: name.clone(),
                        term,
                    },
                    8 => Command::Resign {
                        leader: name.clone(),
                    },
                    _ => Command::Handover {
                        leader: name.clone(),
                        term,
                        expected: Default::default(),
                    },
                };
                let ends = match command {
                    Command::Resign { .. } => Some(false),
                    Command::Handover { .. } => Some(true),
                    _ => None,
                };
                let sent = Instant::now();
                let result = store.execute(&keys[election], command).await;
                let answered = Instant::now();
                record(
                    &log, election, holder, ends, sent, answered, result, &mut held, &workload,
                );
                tokio::time::sleep(Duration::from_millis(random.below(30))).await;
            }
        });
    }
    faults.await;
    while let Some(task) = tasks.join_next().await {
        task.expect("candidate task");
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    verify(log.intervals, &log.endings, workload.elections);
    log.report
}

/// Records one request's outcome in the log.
#[allow(clippy::too_many_arguments)]
fn record(
    log: &Mutex<Log>,
    election: usize,
    holder: usize,
    ends: Option<bool>,
    sent: Instant,
    answered: Instant,
    result: Result<Outcome, super::StoreError>,
    held: &mut [Option<FencingToken>],
    workload: &Workload,
) {
    let mut log = log.lock().unwrap();
    log.report.operations += 1;
    if let Some(handover) = ends {
        log.endings.push(Ending {
            election,
            holder,
            handover,
            sent,
            answered,
        });
    }
    match result {
        Ok(Outcome::Leading { token } | Outcome::HandedOver { token }) => {
            log.report.intervals += 1;
            if held[election] != Some(token) {
                log.report.new_leases += 1;
            }
            held[election] = Some(token);
            log.intervals.push(Interval {
                election,
                holder,
                token,
                sent,
                from: answered,
                until: sent + workload.term - workload.drift,
            });
        }
        Ok(_) => {}
        Err(err) => {
            log.report.failures += 1;
            let reason: String = err
                .to_string()
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect();
            *log.report.reasons.entry(reason).or_default() += 1;
        }
    }
}

/// Panics on two holders' intervals overlapping, or on a token that does not rise with them.
fn verify(mut intervals: Vec<Interval>, endings: &[Ending], elections: usize) {
    // A resignation ends the caller's lease when it is sent; a handover deposes every other
    // holder whose lease may have been granted before it (requested before it was answered).
    for end in endings {
        for interval in intervals.iter_mut().filter(|i| i.election == end.election) {
            let affected = if end.handover {
                interval.holder != end.holder
            } else {
                interval.holder == end.holder
            };
            if affected && interval.sent <= end.answered {
                interval.until = interval.until.min(end.sent.max(interval.from));
            }
        }
    }
    for election in 0..elections {
        // An empty interval (deposed as it began, or answered after its term) cannot overlap.
        let mut mine: Vec<&Interval> = intervals
            .iter()
            .filter(|i| i.election == election && i.from < i.until)
            .collect();
        mine.sort_by_key(|i| i.from);
        for (n, a) in mine.iter().enumerate() {
            for b in &mine[n + 1..] {
                if a.holder != b.holder && b.from < a.until && a.from < b.until {
                    panic!("two leaders of e{election} at once: {a:?} and {b:?}");
                }
            }
        }
        // Tokens follow real time: a lease requested after another was acknowledged has a higher
        // token if its holder differs (and no lower one if it is the same). Concurrent requests
        // may be ordered either way.
        for a in &mine {
            for b in mine.iter().filter(|b| a.from < b.sent) {
                if a.holder != b.holder {
                    assert!(
                        b.token > a.token,
                        "fencing token did not increase on e{election}: {a:?} then {b:?}"
                    );
                } else {
                    assert!(
                        b.token >= a.token,
                        "fencing token went down on e{election}: {a:?} then {b:?}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memory_store_never_has_two_leaders_or_a_token_going_down() {
        let workload = Workload::new(
            Duration::from_millis(200),
            Duration::from_secs(2),
            Duration::ZERO,
        );
        let report = check(Arc::new(MemoryStore::new()), "safety", workload, async {}).await;
        assert!(report.intervals > 500, "too little happened: {report}");
        assert_eq!(report.failures, 0);
    }

    fn interval(holder: usize, token: u64, sent: Instant, from_ms: u64, until_ms: u64) -> Interval {
        Interval {
            election: 0,
            holder,
            token: FencingToken(token),
            sent,
            from: sent + Duration::from_millis(from_ms),
            until: sent + Duration::from_millis(until_ms),
        }
    }

    #[test]
    #[should_panic(expected = "two leaders of e0 at once")]
    fn the_checker_finds_two_overlapping_leaders() {
        let t = Instant::now();
        verify(
            vec![interval(0, 1, t, 0, 100), interval(1, 2, t, 50, 150)],
            &[],
            1,
        );
    }

    #[test]
    #[should_panic(expected = "fencing token did not increase")]
    fn the_checker_finds_a_token_that_does_not_rise() {
        let t = Instant::now();
        let later = t + Duration::from_millis(200);
        verify(
            vec![interval(0, 5, t, 0, 100), interval(1, 5, later, 10, 100)],
            &[],
            1,
        );
    }

    #[test]
    fn a_resignation_ends_the_belief_when_sent_and_a_handover_deposes_the_others() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        // Holder 0 resigns at 40 ms (the answer does not matter); holder 1 leads from 50 ms.
        verify(
            vec![interval(0, 1, t, 0, 100), interval(1, 2, at(45), 5, 100)],
            &[Ending {
                election: 0,
                holder: 0,
                handover: false,
                sent: at(40),
                answered: at(41),
            }],
            1,
        );
        // A handover to holder 1 sent at 30 ms deposes holder 0.
        verify(
            vec![interval(0, 1, t, 0, 100), interval(1, 2, at(30), 5, 100)],
            &[Ending {
                election: 0,
                holder: 1,
                handover: true,
                sent: at(30),
                answered: at(35),
            }],
            1,
        );
    }
}

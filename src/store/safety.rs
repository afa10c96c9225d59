//! The safety checker (SPEC §9): many concurrent candidates with short terms and random delays
//! hammer a store while faults are injected; every acknowledged leadership interval and fencing
//! token is recorded, and the run fails on any overlap of two holders' live terms or any token
//! that does not increase.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::LeaseStore;
use crate::lease::{Command, ElectionKey, FencingToken, Name, Outcome, Term};

/// A lease as one candidate was told it holds it: from the acknowledgement until the term,
/// counted from when the request was sent, less the clock-drift allowance, runs out — or until it
/// resigned, or an operator's handover deposed it.
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
    acked: Instant,
}

/// What a run saw.
pub(crate) struct Report {
    /// Acknowledged leadership intervals.
    pub intervals: usize,
    /// Requests that failed (store unavailable).
    pub failures: usize,
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

/// Runs `candidates` candidates over `elections` elections for `duration`, with `term`-long
/// leases, while `faults` runs alongside; panics on any violation.
pub(crate) async fn check<S: LeaseStore + 'static>(
    store: Arc<S>,
    run: &str,
    candidates: usize,
    elections: usize,
    term: Duration,
    duration: Duration,
    faults: impl Future<Output = ()>,
) -> Report {
    let intervals = Arc::new(Mutex::new(Vec::new()));
    let endings = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(0));
    let drift = term / 100 + Duration::from_millis(2);
    let end = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for holder in 0..candidates {
        let (store, intervals, failures) = (store.clone(), intervals.clone(), failures.clone());
        let endings = endings.clone();
        let name = Name::parse("candidate", &format!("c{holder}")).expect("valid name");
        let keys: Vec<ElectionKey> = (0..elections)
            .map(|e| ElectionKey {
                kind: Name::parse("kind", run).expect("valid kind"),
                election: Name::parse("election", &format!("e{e}")).expect("valid name"),
            })
            .collect();
        tasks.spawn(async move {
            let mut random = Lcg(holder as u64 + 1);
            let term_ms = Term::from_millis(term.as_millis() as u64);
            while Instant::now() < end {
                let election = random.below(keys.len() as u64) as usize;
                let key = &keys[election];
                let command = match random.below(10) {
                    0..=5 => Command::Campaign {
                        candidate: name.clone(),
                        term: term_ms,
                    },
                    6..=7 => Command::Extend {
                        leader: name.clone(),
                        term: term_ms,
                    },
                    8 => Command::Resign {
                        leader: name.clone(),
                    },
                    _ => Command::Handover {
                        leader: name.clone(),
                        term: term_ms,
                    },
                };
                let sent = Instant::now();
                let result = store.execute(key, command).await;
                let acked = Instant::now();
                let ending = |handover| Ending {
                    election,
                    holder,
                    handover,
                    sent,
                    acked,
                };
                let granted = |token, handover| {
                    if handover {
                        endings.lock().unwrap().push(ending(true));
                    }
                    intervals.lock().unwrap().push(Interval {
                        election,
                        holder,
                        token,
                        sent,
                        from: acked,
                        until: sent + term - drift,
                    });
                };
                match result {
                    Ok(Outcome::Leading { token }) => granted(token, false),
                    Ok(Outcome::HandedOver { token }) => granted(token, true),
                    Ok(Outcome::Resigned) => endings.lock().unwrap().push(ending(false)),
                    Ok(_) => {}
                    Err(_) => *failures.lock().unwrap() += 1,
                }
                tokio::time::sleep(Duration::from_millis(random.below(30))).await;
            }
        });
    }
    faults.await;
    while let Some(task) = tasks.join_next().await {
        task.expect("candidate task");
    }

    let mut intervals = intervals.lock().unwrap().clone();
    // A lease ends when its holder asks to resign; an operator's handover deposes every other
    // holder whose lease may have been granted before it (requested before it was acknowledged).
    for end in endings.lock().unwrap().iter() {
        for interval in intervals.iter_mut().filter(|i| i.election == end.election) {
            let affected = if end.handover {
                interval.holder != end.holder
            } else {
                interval.holder == end.holder
            };
            if affected && interval.sent <= end.acked {
                interval.until = interval.until.min(end.sent.max(interval.from));
            }
        }
    }
    for election in 0..elections {
        // An empty interval (deposed as it began) cannot overlap anything.
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
    let failures = *failures.lock().unwrap();
    Report {
        intervals: intervals.len(),
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memory_store_never_has_two_leaders_or_a_token_going_down() {
        let report = check(
            Arc::new(MemoryStore::new()),
            "safety",
            50,
            10,
            Duration::from_millis(200),
            Duration::from_secs(2),
            async {},
        )
        .await;
        assert!(
            report.intervals > 500,
            "too little happened: {}",
            report.intervals
        );
        assert_eq!(report.failures, 0);
    }
}

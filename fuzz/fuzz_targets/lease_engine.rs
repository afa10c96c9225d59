//! The lease engine (`lease::decide`, pure) driven through an arbitrary history: campaigns,
//! extensions, resignations and handovers (unconditional or expecting a leader and/or token,
//! right or wrong) by three candidates, with varied terms, time moving on and the store's token
//! floor moving about, from an arbitrary starting record. After every step:
//!
//! * no panic, and each outcome is one the command can have;
//! * fencing tokens never decrease, and every new lease gets a higher one than the last;
//! * at most one live holder: a campaign or extension never takes a live lease from another
//!   holder, and whoever is told it leads holds a higher token than any lease it replaced that
//!   is still running on its holder's clock (those holders are fenced off);
//! * an extension or resignation is granted only to the holder;
//! * a conditional handover whose expectation is not met changes nothing;
//! * the version observers are told never goes back.
#![no_main]

use std::collections::HashMap;

use arbitrary::{Arbitrary, Unstructured};
use election_agent::lease::{
    ChangeCause, Command, Expected, FencingToken, Lease, LeaseRecord, Name, Outcome, Term, decide,
};
use libfuzzer_sys::fuzz_target;

/// Tokens and floors (a store's clock in ms) stay below this, far from where a token would
/// saturate: a history of a few hundred steps cannot reach `u64::MAX`.
const TOKEN_RANGE: u64 = 1 << 48;
/// Longest history run (longer inputs are cut).
const MAX_STEPS: usize = 512;

/// The record a history starts from (the steps follow it, one after another, until the input
/// runs out: a history is as long as its input, however the fuzzer mutates it).
#[derive(Arbitrary, Debug)]
struct Start {
    token: u64,
    /// Who holds a lease, and for how much longer.
    holder: Option<(u8, u16)>,
    now: u32,
}

#[derive(Arbitrary, Debug)]
struct Step {
    /// How far the clock moves first, in ms.
    advance: u16,
    /// The store's token floor (0 for a store that keeps every record).
    floor: Option<u64>,
    op: Op,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Campaign {
        who: u8,
        term: TermMs,
    },
    Extend {
        who: u8,
        term: TermMs,
    },
    Resign {
        who: u8,
    },
    Handover {
        who: u8,
        term: TermMs,
        leader: Option<u8>,
        token: Option<TokenGuess>,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum TermMs {
    /// Comparable to the clock's steps, so that leases run out.
    Short(u16),
    /// Anything, up to never expiring.
    Any(u64),
}

/// The fencing token a conditional handover expects, relative to the record's.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum TokenGuess {
    Current,
    Previous,
    Next,
    Exactly(u64),
}

fn candidate(who: u8) -> Name {
    let name = ["a", "b", "c"][usize::from(who % 3)];
    Name::parse("candidate", name).expect("a valid name")
}

/// At least 1 ms, as every term the engine is given (the configured bounds start at 1 ms).
fn term(term: TermMs) -> Term {
    Term::from_millis(
        match term {
            TermMs::Short(ms) => u64::from(ms),
            TermMs::Any(ms) => ms,
        }
        .max(1),
    )
}

impl Op {
    fn command(&self, record: &LeaseRecord) -> Command {
        match *self {
            Op::Campaign { who, term: t } => Command::Campaign {
                candidate: candidate(who),
                term: term(t),
            },
            Op::Extend { who, term: t } => Command::Extend {
                leader: candidate(who),
                term: term(t),
            },
            Op::Resign { who } => Command::Resign {
                leader: candidate(who),
            },
            Op::Handover {
                who,
                term: t,
                leader,
                token,
            } => Command::Handover {
                leader: candidate(who),
                term: term(t),
                expected: Expected {
                    leader: leader.map(candidate),
                    token: token.map(|guess| {
                        let current = record.token.0;
                        FencingToken(match guess {
                            TokenGuess::Current => current,
                            TokenGuess::Previous => current.saturating_sub(1),
                            TokenGuess::Next => current + 1,
                            TokenGuess::Exactly(token) => token,
                        })
                    }),
                },
            },
        }
    }
}

/// What each candidate was last told: the token of the lease it leads with, and when that lease
/// ends on its clock.
type Told = HashMap<Name, (FencingToken, u64)>;

fuzz_target!(|data: &[u8]| {
    let mut input = Unstructured::new(data);
    let Ok(start) = Start::arbitrary(&mut input) else {
        return;
    };
    let mut now = u64::from(start.now);
    let mut record = LeaseRecord {
        token: FencingToken(start.token % TOKEN_RANGE),
        lease: start.holder.map(|(who, ttl)| Lease {
            holder: candidate(who),
            expires_at: now + u64::from(ttl),
        }),
    };
    let mut told = Told::new();
    if let Some(lease) = &record.lease {
        told.insert(lease.holder.clone(), (record.token, lease.expires_at));
    }
    let mut version = record.leadership(now).version();

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let Ok(step) = Step::arbitrary(&mut input) else {
            break;
        };
        now += u64::from(step.advance);
        let floor = FencingToken(step.floor.unwrap_or(0) % TOKEN_RANGE);
        assert!(
            record.leadership(now).version() >= version,
            "time going by took the version back"
        );

        let command = step.op.command(&record);
        let decision = decide(&record, &command, now, floor);
        let live = record.live(now).map(|lease| lease.holder.clone());
        let after = decision.next.clone().unwrap_or_else(|| record.clone());

        assert!(
            after.token >= record.token,
            "the token went down: {command:?}"
        );
        assert!(
            decision.change.is_none() || decision.next.is_some(),
            "a change announced but nothing written"
        );
        if decision.next.is_some() && decision.change.is_none() {
            // The one silent write: a resignation dropping the caller's own expired lease.
            assert!(matches!(command, Command::Resign { .. }) && live.is_none());
            assert_eq!(after.lease, None);
            assert_eq!(after.token, record.token);
        }
        // A new lease (new token) is above the last one and the floor.
        let new_lease = matches!(
            decision.change,
            Some(ChangeCause::Elected | ChangeCause::HandedOver)
        );
        if new_lease {
            assert!(after.token > record.token && after.token >= floor);
        } else {
            assert_eq!(
                after.token, record.token,
                "a token changed without a new lease"
            );
        }

        match (&command, &decision.outcome) {
            (Command::Campaign { candidate, .. }, Outcome::Leading { token }) => {
                assert!(
                    live.is_none() || live.as_ref() == Some(candidate),
                    "a campaign took a live lease"
                );
                assert_eq!(
                    decision.change,
                    Some(if live.is_some() {
                        ChangeCause::Renewed
                    } else {
                        ChangeCause::Elected
                    })
                );
                assert_leads(&after, now, candidate, *token);
            }
            (Command::Campaign { candidate, .. }, Outcome::Following { leader, token }) => {
                assert!(live.as_ref() == Some(leader) && leader != candidate);
                assert_eq!(*token, record.token);
                assert!(decision.next.is_none());
            }
            (Command::Extend { leader, .. }, Outcome::Leading { token }) => {
                let expired_own = live.is_none()
                    && record
                        .lease
                        .as_ref()
                        .is_some_and(|lease| lease.holder == *leader);
                assert!(
                    live.as_ref() == Some(leader) || expired_own,
                    "an extension granted to {leader} while {live:?} leads"
                );
                assert_leads(&after, now, leader, *token);
            }
            (Command::Extend { leader, .. }, Outcome::NotHolder { holder }) => {
                assert_eq!(*holder, live.clone().filter(|live| live != leader));
                assert!(decision.next.is_none());
            }
            (Command::Resign { leader }, Outcome::Resigned) => {
                assert!(
                    live.is_none() || live.as_ref() == Some(leader),
                    "{leader} resigned another's lease"
                );
                assert!(after.live(now).is_none());
                told.remove(leader);
            }
            (Command::Resign { leader }, Outcome::NotHolder { holder }) => {
                assert!(holder.is_some() && *holder == live && live.as_ref() != Some(leader));
                assert!(decision.next.is_none());
            }
            (
                Command::Handover {
                    leader, expected, ..
                },
                Outcome::HandedOver { token },
            ) => {
                assert!(
                    met(expected, live.as_ref(), record.token),
                    "handed over against {expected:?}"
                );
                assert_eq!(decision.change, Some(ChangeCause::HandedOver));
                assert_leads(&after, now, leader, *token);
            }
            (Command::Handover { expected, .. }, Outcome::NotHolder { holder }) => {
                assert!(
                    !met(expected, live.as_ref(), record.token),
                    "refused though {expected:?} was met"
                );
                assert_eq!(*holder, live);
                assert_eq!(decision.next, None, "a refused handover changed the record");
                assert_eq!(decision.change, None);
            }
            (command, outcome) => panic!("{command:?} cannot end in {outcome:?}"),
        }

        // Whoever is told it leads holds a higher token than every other lease still running on
        // its holder's clock.
        if let Outcome::Leading { token } | Outcome::HandedOver { token } = decision.outcome {
            let (holder, expires_at) = after
                .lease
                .as_ref()
                .map(|lease| (lease.holder.clone(), lease.expires_at))
                .expect("a lease was granted");
            for (other, (their_token, their_end)) in &told {
                if *other != holder && *their_end > now {
                    assert!(
                        *their_token < token,
                        "{holder} leads with {token} while {other} still runs with {their_token}"
                    );
                }
            }
            told.insert(holder, (token, expires_at));
        }
        // The live holder is the one that was told its token.
        if let Some(lease) = after.live(now) {
            assert_eq!(
                told.get(&lease.holder).map(|(token, _)| *token),
                Some(after.token)
            );
            assert!(after.leader(now).is_some_and(|info| info.ttl_ms >= 1));
        }

        let next_version = after.leadership(now).version();
        assert!(
            next_version >= version,
            "the version went back: {command:?}"
        );
        version = next_version;
        record = after;
    }
});

/// `leader` holds the live lease of `record` at `now`, with `token`.
fn assert_leads(record: &LeaseRecord, now: u64, leader: &Name, token: FencingToken) {
    let lease = record.live(now).expect("the granted lease is live");
    assert_eq!(lease.holder, *leader);
    assert_eq!(record.token, token);
}

/// Whether a live lease of `live` with `token` is what `expected` asks for.
fn met(expected: &Expected, live: Option<&Name>, token: FencingToken) -> bool {
    let leader = expected
        .leader
        .as_ref()
        .is_none_or(|leader| live == Some(leader));
    let token = expected
        .token
        .is_none_or(|expected| live.is_some() && expected == token);
    leader && token
}

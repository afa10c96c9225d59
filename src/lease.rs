//! The lease engine: the rules of leadership, written once, as pure code.
//!
//! Everything here is a value or a pure function: no clock, no I/O, no locks. A lease store reads
//! the [`LeaseRecord`] of an election, asks [`decide`] what a [`Command`] does to it at a given
//! instant, and atomically writes the result back. Every backend therefore behaves identically, and
//! the rules are tested exhaustively in this module (every command × every lease state).
//!
//! Instants are milliseconds on a monotonic clock chosen by the store; only differences matter.

use std::{fmt, sync::Arc};

/// Longest election, kind or candidate name accepted.
pub const MAX_NAME_LEN: usize = 253;

/// The kind used when a request leaves it empty.
pub const DEFAULT_KIND: &str = "default";

/// Why an argument was refused; `field` names the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidArgument {
    /// The request field (wire name) that was refused.
    pub field: &'static str,
    /// What is wrong with it and what is allowed.
    pub reason: String,
}

impl InvalidArgument {
    /// `field` refused for `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// An election, kind or candidate name: 1..=253 characters of `[A-Za-z0-9._:/@-]`.
///
/// The alphabet keeps every glob character (`*`, `?`, `[`, `]`, `\`) out, so a name can never turn
/// into a pattern when a store scans keys, and keeps names printable in logs, metrics and URLs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    /// Validates `value` as the request field `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, InvalidArgument> {
        if value.is_empty() {
            return Err(InvalidArgument::new(field, "must not be empty"));
        }
        if value.len() > MAX_NAME_LEN {
            return Err(InvalidArgument::new(
                field,
                format!(
                    "is {} characters long; at most {MAX_NAME_LEN} are allowed",
                    value.len()
                ),
            ));
        }
        if let Some(bad) = value.chars().find(|c| !is_name_char(*c)) {
            return Err(InvalidArgument::new(
                field,
                format!("contains {bad:?}; only letters, digits and . _ : / @ - are allowed"),
            ));
        }
        Ok(Self(value.into()))
    }

    /// Validates a kind: empty means [`DEFAULT_KIND`].
    pub fn parse_kind(field: &'static str, value: &str) -> Result<Self, InvalidArgument> {
        Self::parse(
            field,
            if value.is_empty() {
                DEFAULT_KIND
            } else {
                value
            },
        )
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '@' | '-')
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Identifies one election: its kind and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ElectionKey {
    /// Groups elections (`default` unless given).
    pub kind: Name,
    /// The election's name within its kind.
    pub election: Name,
}

impl fmt::Display for ElectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.election)
    }
}

/// How long a lease lasts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Term(u64);

impl Term {
    /// A term of `ms` milliseconds, not checked against any bounds (see [`TermBounds::parse`]).
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// The term in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

/// The shortest and longest term a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermBounds {
    /// Shortest allowed term.
    pub min: Term,
    /// Longest allowed term.
    pub max: Term,
}

impl Default for TermBounds {
    /// 1 second .. 1 day.
    fn default() -> Self {
        Self {
            min: Term(1_000),
            max: Term(86_400_000),
        }
    }
}

impl TermBounds {
    /// Validates a term of `ms` milliseconds given in the request field `field`.
    pub fn parse(&self, field: &'static str, ms: i64) -> Result<Term, InvalidArgument> {
        match u64::try_from(ms) {
            Ok(ms) if (self.min.0..=self.max.0).contains(&ms) => Ok(Term(ms)),
            _ => Err(InvalidArgument::new(
                field,
                format!(
                    "{ms} ms is out of range; allowed {}..={} ms",
                    self.min.0, self.max.0
                ),
            )),
        }
    }
}

/// A number that strictly increases every time leadership of an election changes hands.
///
/// Leaders pass it to the resources they guard, which reject writes carrying a token lower than the
/// highest they have seen — so a deposed leader's late writes are refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token of the lease after one with this token: the next number, or `floor` if that is
    /// higher.
    fn next(self, floor: FencingToken) -> Self {
        Self(self.0.saturating_add(1).max(floor.0))
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Orders the states one election's leadership goes through, so that an observer can tell a
/// newer announcement from an older or repeated one — in every store, Redlock included.
///
/// It is derived from the fencing token, which only ever increases and which Redlock already
/// makes durable on a majority before reporting it: `2·token` while the lease that token was
/// issued for is live, `2·token + 1` once that lease has ended (resigned or expired). A per-server
/// counter would not do: N Redlock servers count differently. Renewals keep the version, as they
/// change nothing an observer is told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

impl Version {
    /// The version of the lease issued with `token`, while it is live.
    pub const fn leading(token: FencingToken) -> Self {
        Self(token.0.saturating_mul(2))
    }

    /// The version once the lease issued with `token` has ended, or of an election that never
    /// had a leader (token 0).
    pub const fn ended(token: FencingToken) -> Self {
        Self(token.0.saturating_mul(2).saturating_add(1))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who holds an election's lease and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The leader.
    pub holder: Name,
    /// The instant (store clock, ms) from which the lease is no longer live.
    pub expires_at: u64,
}

/// Everything a store keeps for one election.
///
/// The fencing token outlives the lease: it is kept after a resign and after expiry, so the next
/// leader always gets a higher one. A lease whose term ran out is kept too (until replaced), so its
/// holder can take it back with `ExtendElectedTerm` if nobody else did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The token of the current (or last) lease; 0 before the first.
    pub token: FencingToken,
    /// The current lease, live or expired; `None` when there never was one or it was resigned.
    pub lease: Option<Lease>,
}

impl LeaseRecord {
    /// The lease if it is live at `now`.
    pub fn live(&self, now: u64) -> Option<&Lease> {
        self.lease.as_ref().filter(|lease| now < lease.expires_at)
    }

    /// The leader at `now`, if any.
    pub fn leader(&self, now: u64) -> Option<LeaderInfo> {
        self.live(now).map(|lease| LeaderInfo {
            leader: lease.holder.clone(),
            token: self.token,
            ttl_ms: lease.expires_at - now,
        })
    }

    /// What a read at `now` reports.
    pub fn leadership(&self, now: u64) -> Leadership {
        Leadership {
            leader: self.leader(now),
            token: self.token,
        }
    }

    fn granted(&self, holder: &Name, token: FencingToken, term: Term, now: u64) -> Self {
        Self {
            token,
            lease: Some(Lease {
                holder: holder.clone(),
                expires_at: now.saturating_add(term.0),
            }),
        }
    }

    /// A lease for `holder` until `now + term` with `token` — except that the live lease of that
    /// same holder is never shortened: asking for less than what is left keeps the later expiry.
    /// A renewal whose answer is lost (a timeout, a server that applies it late) must not end a
    /// term its holder still counts on.
    fn extended(&self, holder: &Name, token: FencingToken, term: Term, now: u64) -> Self {
        let mut next = self.granted(holder, token, term, now);
        if let (Some(next), Some(current)) = (next.lease.as_mut(), self.live(now))
            && current.holder == *holder
        {
            next.expires_at = next.expires_at.max(current.expires_at);
        }
        next
    }
}

/// What a read of one election finds: its live leader, if any, and the fencing token of the
/// last lease (the leader's own while one leads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The live leader.
    pub leader: Option<LeaderInfo>,
    /// The fencing token of the current or last lease; 0 before the first.
    pub token: FencingToken,
}

impl Leadership {
    /// The version of this state (see [`Version`]).
    pub fn version(&self) -> Version {
        match self.leader {
            Some(_) => Version::leading(self.token),
            None => Version::ended(self.token),
        }
    }
}

/// A live leader as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader's name.
    pub leader: Name,
    /// The fencing token of its lease.
    pub token: FencingToken,
    /// Milliseconds until the lease expires unless renewed (at least 1).
    pub ttl_ms: u64,
}

/// A request to change an election's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Become leader for `term`, or renew if already leader.
    Campaign {
        /// Who campaigns.
        candidate: Name,
        /// For how long.
        term: Term,
    },
    /// Renew the lease of the current leader (or take it back after expiry if nobody else did).
    Extend {
        /// Who claims to lead.
        leader: Name,
        /// For how long.
        term: Term,
    },
    /// Give up leadership at once.
    Resign {
        /// Who claims to lead.
        leader: Name,
    },
    /// Make `leader` the leader — unconditionally (an operator's tool), or only if the lease it
    /// replaces is the one `expected` names.
    Handover {
        /// The new leader.
        leader: Name,
        /// For how long.
        term: Term,
        /// What the live lease must be for the handover to happen (nothing: unconditional).
        expected: Expected,
    },
}

/// What a conditional handover requires of the live lease it replaces; refused otherwise (the
/// outcome names the live holder, if any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    /// The live lease's holder.
    pub leader: Option<Name>,
    /// The live lease's fencing token.
    pub token: Option<FencingToken>,
}

impl Expected {
    /// Whether the handover is conditional at all.
    pub fn is_unconditional(&self) -> bool {
        self.leader.is_none() && self.token.is_none()
    }

    /// Whether a record whose live lease is `live` (and token `token`) is what is expected.
    fn met_by(&self, live: Option<&Lease>, token: FencingToken) -> bool {
        let leader = self
            .leader
            .as_ref()
            .is_none_or(|expected| live.is_some_and(|lease| lease.holder == *expected));
        let token = self
            .token
            .is_none_or(|expected| live.is_some() && token == expected);
        leader && token
    }
}

/// What a command achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The caller leads (Campaign or Extend succeeded).
    Leading {
        /// The lease's fencing token.
        token: FencingToken,
    },
    /// Campaign lost: somebody else holds a live lease.
    Following {
        /// The current leader.
        leader: Name,
        /// Its fencing token.
        token: FencingToken,
    },
    /// The caller does not lead any more (it resigned, or nobody led).
    Resigned,
    /// Handover made the requested candidate the leader.
    HandedOver {
        /// The new lease's fencing token.
        token: FencingToken,
    },
    /// Extend by someone who does not hold the lease, Resign while somebody else holds it, or a
    /// conditional Handover whose expected lease is not the live one.
    NotHolder {
        /// The live leader, if there is one.
        holder: Option<Name>,
    },
}

/// Why a lease changed, as announced to observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeCause {
    /// A new lease was granted to a candidate (new fencing token).
    Elected,
    /// The holder renewed its live lease (same token).
    Renewed,
    /// Handover granted a new lease (new fencing token).
    HandedOver,
    /// The holder gave up its lease.
    Resigned,
}

/// The effect of a command on one election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to tell the caller.
    pub outcome: Outcome,
    /// The record to store, when the command changes it.
    pub next: Option<LeaseRecord>,
    /// What observers are told, when the lease changed.
    pub change: Option<ChangeCause>,
}

impl Decision {
    fn unchanged(outcome: Outcome) -> Self {
        Self {
            outcome,
            next: None,
            change: None,
        }
    }

    fn changed(outcome: Outcome, next: LeaseRecord, change: ChangeCause) -> Self {
        Self {
            outcome,
            next: Some(next),
            change: Some(change),
        }
    }
}

/// Decides what `command` does to an election whose stored state is `record`, at instant `now`.
///
/// A new lease's token is the record's last one plus one, or `floor` if that is higher. A store
/// whose records can be lost or removed (a failover that loses a write, records of ended leases
/// removed after a while) passes a clock as `floor` — the Redis stores the server's clock in
/// milliseconds — so that tokens issued later are higher than any issued before, whatever record
/// they came from. A store that keeps every record passes 0.
pub fn decide(record: &LeaseRecord, command: &Command, now: u64, floor: FencingToken) -> Decision {
    let live = record.live(now);
    match command {
        Command::Campaign { candidate, term } => match live {
            Some(lease) if lease.holder == *candidate => renew(record, candidate, *term, now),
            Some(lease) => Decision::unchanged(Outcome::Following {
                leader: lease.holder.clone(),
                token: record.token,
            }),
            None => elect(record, candidate, *term, now, floor),
        },
        Command::Extend { leader, term } => match (live, &record.lease) {
            (Some(lease), _) if lease.holder == *leader => renew(record, leader, *term, now),
            (Some(lease), _) => Decision::unchanged(Outcome::NotHolder {
                holder: Some(lease.holder.clone()),
            }),
            // Its own lease ran out and nobody took it: the leader gets it back, as a new lease.
            (None, Some(expired)) if expired.holder == *leader => {
                elect(record, leader, *term, now, floor)
            }
            (None, _) => Decision::unchanged(Outcome::NotHolder { holder: None }),
        },
        Command::Resign { leader } => match live {
            Some(lease) if lease.holder == *leader => Decision::changed(
                Outcome::Resigned,
                LeaseRecord {
                    token: record.token,
                    lease: None,
                },
                ChangeCause::Resigned,
            ),
            Some(lease) => Decision::unchanged(Outcome::NotHolder {
                holder: Some(lease.holder.clone()),
            }),
            // Nobody leads: the caller is not the leader, which is what it asked for (the Go
            // service answers the same). Its own expired lease is dropped, so that a later
            // Extend cannot revive what it gave up; observers heard of the expiry already.
            None => Decision {
                outcome: Outcome::Resigned,
                next: record
                    .lease
                    .as_ref()
                    .filter(|expired| expired.holder == *leader)
                    .map(|_| LeaseRecord {
                        token: record.token,
                        lease: None,
                    }),
                change: None,
            },
        },
        Command::Handover { expected, .. } if !expected.met_by(live, record.token) => {
            Decision::unchanged(Outcome::NotHolder {
                holder: live.map(|lease| lease.holder.clone()),
            })
        }
        // To the live holder itself, a handover is a renewal with a new token.
        Command::Handover { leader, term, .. } => {
            let token = record.token.next(floor);
            Decision::changed(
                Outcome::HandedOver { token },
                record.extended(leader, token, *term, now),
                ChangeCause::HandedOver,
            )
        }
    }
}

fn renew(record: &LeaseRecord, holder: &Name, term: Term, now: u64) -> Decision {
    Decision::changed(
        Outcome::Leading {
            token: record.token,
        },
        record.extended(holder, record.token, term, now),
        ChangeCause::Renewed,
    )
}

fn elect(
    record: &LeaseRecord,
    holder: &Name,
    term: Term,
    now: u64,
    floor: FencingToken,
) -> Decision {
    let token = record.token.next(floor);
    Decision::changed(
        Outcome::Leading { token },
        record.granted(holder, token, term, now),
        ChangeCause::Elected,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 10_000;
    const TERM: Term = Term(5_000);

    fn name(s: &str) -> Name {
        Name::parse("test", s).unwrap()
    }

    fn record(token: u64, lease: Option<(&str, u64)>) -> LeaseRecord {
        LeaseRecord {
            token: FencingToken(token),
            lease: lease.map(|(holder, expires_at)| Lease {
                holder: name(holder),
                expires_at,
            }),
        }
    }

    /// The lease states every command is tested against; "a" is always the caller.
    fn states() -> Vec<(&'static str, LeaseRecord)> {
        vec![
            ("never held", record(0, None)),
            ("resigned", record(7, None)),
            ("live, held by caller", record(7, Some(("a", NOW + 1)))),
            ("expired, held by caller", record(7, Some(("a", NOW)))),
            ("live, held by other", record(7, Some(("b", NOW + 1)))),
            ("expired, held by other", record(7, Some(("b", NOW - 1)))),
        ]
    }

    fn granted(token: u64, holder: &str) -> Option<LeaseRecord> {
        Some(record(token, Some((holder, NOW + TERM.0))))
    }

    fn leading(token: u64) -> Outcome {
        Outcome::Leading {
            token: FencingToken(token),
        }
    }

    fn not_holder(holder: Option<&str>) -> Outcome {
        Outcome::NotHolder {
            holder: holder.map(name),
        }
    }

    /// Runs `command` (issued by "a") against every state and compares with `expected`, given in
    /// the order of [`states`].
    fn check(command: Command, expected: [(Outcome, Option<LeaseRecord>, Option<ChangeCause>); 6]) {
        for ((state, before), (outcome, next, change)) in states().into_iter().zip(expected) {
            let decision = decide(&before, &command, NOW, FencingToken(0));
            assert_eq!(
                decision,
                Decision {
                    outcome,
                    next,
                    change
                },
                "{command:?} on a lease that is {state}"
            );
        }
    }

    #[test]
    fn campaign_in_every_lease_state() {
        use ChangeCause::*;
        check(
            Command::Campaign {
                candidate: name("a"),
                term: TERM,
            },
            [
                (leading(1), granted(1, "a"), Some(Elected)),
                (leading(8), granted(8, "a"), Some(Elected)),
                (leading(7), granted(7, "a"), Some(Renewed)),
                (leading(8), granted(8, "a"), Some(Elected)),
                (
                    Outcome::Following {
                        leader: name("b"),
                        token: FencingToken(7),
                    },
                    None,
                    None,
                ),
                (leading(8), granted(8, "a"), Some(Elected)),
            ],
        );
    }

    #[test]
    fn extend_in_every_lease_state() {
        use ChangeCause::*;
        check(
            Command::Extend {
                leader: name("a"),
                term: TERM,
            },
            [
                (not_holder(None), None, None),
                (not_holder(None), None, None),
                (leading(7), granted(7, "a"), Some(Renewed)),
                (leading(8), granted(8, "a"), Some(Elected)),
                (not_holder(Some("b")), None, None),
                (not_holder(None), None, None),
            ],
        );
    }

    #[test]
    fn resign_in_every_lease_state() {
        check(
            Command::Resign { leader: name("a") },
            [
                (Outcome::Resigned, None, None),
                (Outcome::Resigned, None, None),
                (
                    Outcome::Resigned,
                    Some(record(7, None)),
                    Some(ChangeCause::Resigned),
                ),
                (Outcome::Resigned, Some(record(7, None)), None),
                (not_holder(Some("b")), None, None),
                (Outcome::Resigned, None, None),
            ],
        );
    }

    #[test]
    fn a_conditional_handover_happens_only_over_the_expected_lease() {
        let name = |n: &str| Name::parse("leader", n).unwrap();
        let term = Term::from_millis(1_000);
        let record = LeaseRecord {
            token: FencingToken(7),
            lease: Some(Lease {
                holder: name("a"),
                expires_at: 2_000,
            }),
        };
        let handover = |leader: Option<&str>, token: Option<u64>| Command::Handover {
            leader: name("b"),
            term,
            expected: Expected {
                leader: leader.map(name),
                token: token.map(FencingToken),
            },
        };
        let refused_naming = |holder: Option<&str>| {
            Decision::unchanged(Outcome::NotHolder {
                holder: holder.map(name),
            })
        };
        // Met: a live lease of a, token 7.
        for expected in [
            handover(Some("a"), None),
            handover(None, Some(7)),
            handover(Some("a"), Some(7)),
        ] {
            let decision = decide(&record, &expected, 1_000, FencingToken(0));
            assert_eq!(
                decision.outcome,
                Outcome::HandedOver {
                    token: FencingToken(8)
                }
            );
        }
        // Not met: another holder, another token.
        for expected in [
            handover(Some("c"), None),
            handover(None, Some(6)),
            handover(Some("a"), Some(8)),
        ] {
            assert_eq!(
                decide(&record, &expected, 1_000, FencingToken(0)),
                refused_naming(Some("a"))
            );
        }
        // Not met: a's lease has expired, nobody leads.
        assert_eq!(
            decide(&record, &handover(Some("a"), None), 2_000, FencingToken(0)),
            refused_naming(None)
        );
        assert_eq!(
            decide(&record, &handover(None, Some(7)), 2_000, FencingToken(0)),
            refused_naming(None)
        );
        // Unconditional: always.
        assert_eq!(
            decide(&record, &handover(None, None), 2_000, FencingToken(0)).outcome,
            Outcome::HandedOver {
                token: FencingToken(8)
            }
        );
    }

    #[test]
    fn handover_in_every_lease_state() {
        let handed = |token| {
            (
                Outcome::HandedOver {
                    token: FencingToken(token),
                },
                granted(token, "a"),
                Some(ChangeCause::HandedOver),
            )
        };
        check(
            Command::Handover {
                leader: name("a"),
                term: TERM,
                expected: Default::default(),
            },
            [
                handed(1),
                handed(8),
                handed(8),
                handed(8),
                handed(8),
                handed(8),
            ],
        );
    }

    #[test]
    fn a_renewal_never_shortens_a_live_lease() {
        let long = record(7, Some(("a", NOW + 60_000)));
        for command in [
            Command::Campaign {
                candidate: name("a"),
                term: TERM,
            },
            Command::Extend {
                leader: name("a"),
                term: TERM,
            },
        ] {
            let decision = decide(&long, &command, NOW, FencingToken(0));
            assert_eq!(decision.outcome, leading(7), "{command:?}");
            assert_eq!(
                decision.next,
                Some(long.clone()),
                "{command:?} kept the expiry"
            );
        }
        let to_self = decide(
            &long,
            &Command::Handover {
                leader: name("a"),
                term: TERM,
                expected: Default::default(),
            },
            NOW,
            FencingToken(0),
        );
        assert_eq!(
            to_self.next,
            Some(record(8, Some(("a", NOW + 60_000)))),
            "a handover to the live holder renews with a new token, never shorter"
        );
        let to_other = decide(
            &long,
            &Command::Handover {
                leader: name("b"),
                term: TERM,
                expected: Default::default(),
            },
            NOW,
            FencingToken(0),
        );
        assert_eq!(
            to_other.next,
            granted(8, "b"),
            "another holder gets its own term"
        );
        // A longer term extends it, as always.
        let short = record(7, Some(("a", NOW + 10)));
        let decision = decide(
            &short,
            &Command::Extend {
                leader: name("a"),
                term: TERM,
            },
            NOW,
            FencingToken(0),
        );
        assert_eq!(decision.next, granted(7, "a"));
    }

    #[test]
    fn a_new_lease_takes_the_floor_when_it_is_above_the_next_token() {
        let campaign = Command::Campaign {
            candidate: name("a"),
            term: TERM,
        };
        let resigned = record(7, None);
        let at = |floor| decide(&resigned, &campaign, NOW, FencingToken(floor)).outcome;
        assert_eq!(at(0), leading(8), "no floor: the next number");
        assert_eq!(at(8), leading(8));
        assert_eq!(
            at(1_700_000),
            leading(1_700_000),
            "a clock above the record"
        );
        let renewal = decide(
            &record(7, Some(("a", NOW + 1))),
            &campaign,
            NOW,
            FencingToken(1_700_000),
        );
        assert_eq!(renewal.outcome, leading(7), "a renewal keeps its token");
    }

    #[test]
    fn versions_order_every_announced_state_of_an_election() {
        let t = FencingToken;
        assert!(Version::leading(t(3)) < Version::ended(t(3)));
        assert!(Version::ended(t(3)) < Version::leading(t(4)));
        assert_eq!(Version::ended(t(0)), Version(1), "never led");
        let read = |leader: Option<&str>, token| Leadership {
            leader: leader.map(|l| LeaderInfo {
                leader: name(l),
                token: t(token),
                ttl_ms: 1,
            }),
            token: t(token),
        };
        assert_eq!(read(Some("a"), 3).version(), Version::leading(t(3)));
        assert_eq!(read(None, 3).version(), Version::ended(t(3)));
    }

    #[test]
    fn lease_is_live_until_the_instant_it_expires() {
        let lease = record(1, Some(("a", NOW)));
        assert!(lease.live(NOW - 1).is_some());
        assert!(lease.live(NOW).is_none());
        assert_eq!(lease.leader(NOW - 1).map(|l| l.ttl_ms), Some(1));
    }

    #[test]
    fn fencing_token_strictly_increases_on_every_change_of_holder() {
        // A long random-looking walk over all commands by three candidates and moving time.
        let candidates = [name("a"), name("b"), name("c")];
        let mut state = LeaseRecord::default();
        let mut now = 0;
        let mut last_holder: Option<(Name, FencingToken)> = None;
        for step in 0u64..5_000 {
            let who = candidates[(step * 7 % 3) as usize].clone();
            let command = match step * 13 % 5 {
                0 | 1 => Command::Campaign {
                    candidate: who,
                    term: Term(30),
                },
                2 => Command::Extend {
                    leader: who,
                    term: Term(30),
                },
                3 => Command::Resign { leader: who },
                _ => Command::Handover {
                    leader: who,
                    term: Term(30),
                    expected: Default::default(),
                },
            };
            now += step * 11 % 17;
            let decision = decide(&state, &command, now, FencingToken(0));
            if let Some(next) = decision.next {
                assert!(next.token >= state.token, "token went down at step {step}");
                state = next;
            }
            if let Some(info) = state.leader(now) {
                if let Some((holder, token)) = &last_holder
                    && *holder != info.leader
                {
                    assert!(
                        info.token > *token,
                        "new holder kept an old token at {step}"
                    );
                }
                last_holder = Some((info.leader, info.token));
            }
        }
    }

    #[test]
    fn names_outside_the_alphabet_or_too_long_are_refused_naming_the_field() {
        for bad in ["", "a*", "a?", "a[0]", "a b", "ü", "a\\b", &"x".repeat(254)] {
            let err = Name::parse("election", bad).unwrap_err();
            assert_eq!(err.field, "election", "{bad:?}");
            assert!(err.to_string().starts_with("invalid election: "), "{err}");
        }
        for good in ["a", "my-app.v1", "ns/app:leader@zone_1", &"x".repeat(253)] {
            assert_eq!(Name::parse("election", good).unwrap().as_str(), good);
        }
        assert_eq!(Name::parse_kind("kind", "").unwrap().as_str(), DEFAULT_KIND);
    }

    #[test]
    fn terms_outside_the_bounds_are_refused() {
        let bounds = TermBounds::default();
        for bad in [-1, 0, 999, 86_400_001, i64::MAX] {
            let err = bounds.parse("term", bad).unwrap_err();
            assert_eq!(err.field, "term");
            assert!(err.reason.contains("1000..=86400000"), "{err}");
        }
        assert_eq!(bounds.parse("term", 1_000), Ok(Term(1_000)));
        assert_eq!(bounds.parse("term", 86_400_000), Ok(Term(86_400_000)));
    }
}

//! Combines the answers of N Redis servers into one outcome (Redlock), as pure functions.
//!
//! With one server this is the identity. With N independent servers a lease exists only where a
//! majority granted it within its validity time (term − time from sending to the deciding answer
//! − a clock-drift allowance). Each function takes the answers received so far — `None` for a
//! server that has not answered yet — and decides as soon as the missing ones can no longer
//! change the outcome, so one slow or hung server never delays a request that a majority settles.
//!
//! After a failed command only what that command itself created is rolled back: a grant that
//! made its candidate the new holder on a server (`release.lua` checks this on the server),
//! never a renewal and never another holder's lease — the live lease a failed handover replaced
//! is put back as it was. A reported fencing token is first made
//! durable on a majority (aligned where a granting server had a lower one), so any later majority
//! — which shares at least one server with this one — can only hand out higher tokens.

use std::time::Duration;

use crate::lease::{ChangeCause, FencingToken, LeaderInfo, Leadership, Name, Outcome};
use crate::store::StoreError;

/// One server's answer to `lease.lua` or `leader.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// `lease.lua`'s outcome code (0 for `leader.lua`).
    pub code: u8,
    /// The leader it names (empty when none).
    pub leader: String,
    /// The token it reports.
    pub token: u64,
    /// Milliseconds left of the lease it reports.
    pub ttl_ms: u64,
}

/// One server's answer, if it has given one yet.
pub(crate) type Answer<T> = Option<Result<T, StoreError>>;

/// `lease.lua` outcome codes.
pub(crate) mod code {
    /// The caller leads; its live lease was renewed (same token).
    pub const RENEWED: u8 = 1;
    /// Somebody else holds a live lease.
    pub const FOLLOWING: u8 = 2;
    /// The caller does not lead any more.
    pub const RESIGNED: u8 = 3;
    /// Handover granted a new lease.
    pub const HANDED_OVER: u8 = 4;
    /// Extend/resign by a non-holder.
    pub const NOT_HOLDER: u8 = 5;
    /// The caller was granted a new lease (new token).
    pub const ELECTED: u8 = 6;
}

/// Whether an answer to `lease.lua` grants the caller the lease.
pub(crate) fn is_grant(code: u8) -> bool {
    matches!(code, code::RENEWED | code::ELECTED | code::HANDED_OVER)
}

/// Whether `lease.lua` may have changed the record when it answered `code` (a lost campaign or a
/// refused extend or resign changes nothing).
pub(crate) fn may_have_written(code: u8) -> bool {
    !matches!(code, code::FOLLOWING | code::NOT_HOLDER)
}

/// Whether a grant may have created a new lease (which a failed command takes back).
pub(crate) fn is_new_lease(code: u8) -> bool {
    matches!(code, code::ELECTED | code::HANDED_OVER)
}

/// What to do with answers that arrive after the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Late {
    /// Nothing: they cannot matter.
    Ignore,
    /// The command failed: a late grant of a new lease is released.
    Release,
    /// The command granted a new lease with this token: any grant with another one (answered
    /// late, or in time but not needed for durability) is aligned to it.
    Align(FencingToken),
}

/// What the store must do once a command's answers settle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The command's outcome, or why it failed.
    pub outcome: Result<Outcome, StoreError>,
    /// Servers whose new lease must be released (the command failed).
    pub release: Vec<usize>,
    /// Servers whose token must be aligned to the reported one before it is reported.
    pub align: Vec<usize>,
    /// The change to announce, if leadership changed.
    pub change: Option<ChangeCause>,
    /// What answers arriving after this verdict call for.
    pub late: Late,
}

/// The kind of command whose replies are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Campaign,
    Extend,
    Resign,
    Handover,
}

/// Smallest majority of `n` servers.
pub(crate) fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// How much of a lease of `term` is left after `elapsed`, less the clock-drift allowance
/// (1 % of the term + 2 ms, as Redlock prescribes); `None` when nothing is left. With one server
/// the lease is granted atomically by the server itself and no allowance is needed.
pub(crate) fn validity(servers: usize, term: Duration, elapsed: Duration) -> Option<Duration> {
    if servers == 1 {
        return Some(term);
    }
    term.checked_sub(elapsed + drift(term))
        .filter(|v| !v.is_zero())
}

/// The clock-drift allowance of a lease of `term` over several servers.
pub(crate) fn drift(term: Duration) -> Duration {
    term / 100 + Duration::from_millis(2)
}

/// The answers of one fan-out, counted.
struct Tally<'a> {
    servers: usize,
    quorum: usize,
    /// `(server, reply)` of every server that answered.
    answered: Vec<(usize, &'a Reply)>,
    /// Servers that have not answered yet.
    pending: usize,
    /// The first error, if any server failed.
    error: Option<&'a StoreError>,
}

impl<'a> Tally<'a> {
    fn new(answers: &'a [Answer<Reply>]) -> Self {
        let mut answered = Vec::with_capacity(answers.len());
        let (mut pending, mut error) = (0, None);
        for (i, answer) in answers.iter().enumerate() {
            match answer {
                None => pending += 1,
                Some(Ok(reply)) => answered.push((i, reply)),
                Some(Err(err)) => error = error.or(Some(err)),
            }
        }
        Self {
            servers: answers.len(),
            quorum: quorum(answers.len()),
            answered,
            pending,
            error,
        }
    }

    fn failed(&self) -> usize {
        self.servers - self.answered.len() - self.pending
    }

    /// Not enough servers answered; the first server error says why.
    fn unavailable(&self) -> StoreError {
        match (self.servers, self.error) {
            (1, Some(cause)) => cause.clone(),
            (servers, cause) => StoreError::Unavailable(format!(
                "only {} of {servers} Redis servers answered in time, {} needed{}",
                self.answered.len(),
                self.quorum,
                cause.map(|c| format!(" ({c})")).unwrap_or_default()
            )),
        }
    }

    /// Whether `quorum` answers can still be had.
    fn answers_possible(&self) -> bool {
        self.answered.len() + self.pending >= self.quorum
    }

    fn replies(&self) -> impl Iterator<Item = &'a Reply> + Clone + '_ {
        self.answered.iter().map(|(_, r)| *r)
    }

    /// How many answered replies with one of `codes` name `leader`.
    fn votes(&self, leader: &str, codes: &[u8]) -> usize {
        self.replies()
            .filter(|r| codes.contains(&r.code) && r.leader == leader)
            .count()
    }

    /// The holder named by at least a quorum of replies with one of `codes`, if any.
    fn majority_holder(&self, codes: &[u8]) -> Option<&'a str> {
        self.replies()
            .filter(|r| codes.contains(&r.code) && !r.leader.is_empty())
            .find(|r| self.votes(&r.leader, codes) >= self.quorum)
            .map(|r| r.leader.as_str())
    }

    /// The most votes any holder named by replies with one of `codes` has.
    fn most_votes(&self, codes: &[u8]) -> usize {
        self.replies()
            .filter(|r| codes.contains(&r.code) && !r.leader.is_empty())
            .map(|r| self.votes(&r.leader, codes))
            .max()
            .unwrap_or(0)
    }

    /// The highest token a quorum of the answering servers vouches for (each has it or a higher
    /// one): a token a minority raised or granted past the others is not reported as durable.
    fn durable_token(&self) -> FencingToken {
        let mut tokens: Vec<u64> = self.replies().map(|r| r.token).collect();
        tokens.sort_unstable_by(|a, b| b.cmp(a));
        let at = self.quorum.min(tokens.len()).saturating_sub(1);
        FencingToken(tokens.get(at).copied().unwrap_or_default())
    }
}

fn name(leader: &str) -> Result<Name, StoreError> {
    Name::parse("leader", leader).map_err(|err| {
        StoreError::Unavailable(format!("a Redis server returned an invalid leader: {err}"))
    })
}

/// Combines the answers received so far to a command; `valid` says whether any validity time is
/// left now. `None` while the missing answers could still change the outcome.
pub(crate) fn combine(kind: Kind, answers: &[Answer<Reply>], valid: bool) -> Option<Verdict> {
    let tally = Tally::new(answers);
    let quorum = tally.quorum;
    let granted: Vec<(usize, &Reply)> = tally
        .answered
        .iter()
        .copied()
        .filter(|(_, r)| is_grant(r.code))
        .collect();
    let failed = |outcome| Verdict {
        outcome,
        release: granted
            .iter()
            .filter(|(_, r)| is_new_lease(r.code))
            .map(|(i, _)| *i)
            .collect(),
        align: Vec::new(),
        change: None,
        late: Late::Release,
    };

    if kind == Kind::Resign {
        return resign(&tally);
    }
    if granted.len() >= quorum {
        if !valid {
            return Some(failed(Err(StoreError::Unavailable(
                "the lease's validity time ran out before a majority of Redis servers granted it"
                    .into(),
            ))));
        }
        if granted.iter().all(|(_, r)| r.code == code::RENEWED) {
            // The holder's own lease, renewed: its token is the one a majority of its servers
            // hold exactly (it was aligned on them when granted). A server can lag behind (a
            // late grant not aligned yet): then the last answer tips it, and without one the
            // renewal cannot say which token is the lease's.
            return match agreed_token(&granted, quorum) {
                Some(token) => Some(renewed(token)),
                None if tally.pending > 0 => None,
                None => Some(failed(Err(StoreError::Unavailable(
                    "the Redis servers that renewed the lease disagree on its fencing token".into(),
                )))),
            };
        }
        return Some(granted_by_majority(kind, &granted));
    }
    // Not (yet) granted by a majority: wait while the missing answers could still make one, or
    // could still make a majority of answers that tells what happened instead, or could still
    // show which holder a majority names (answers that disagree: a write in flight).
    let can_win = granted.len() + tally.pending >= quorum;
    let named = [code::FOLLOWING, code::NOT_HOLDER];
    let holder_unsettled = tally.majority_holder(&named).is_none()
        && tally.most_votes(&named) + tally.pending >= quorum;
    if can_win
        || (tally.answered.len() < quorum && tally.answers_possible())
        || (tally.pending > 0 && holder_unsettled)
    {
        return None;
    }
    if tally.answered.len() < quorum {
        return Some(failed(Err(tally.unavailable())));
    }
    Some(match kind {
        Kind::Campaign => {
            // Lost. Report the holder a majority agrees on, else the most named one: with a
            // split vote nobody leads, and this candidate did not win either.
            let holder = tally.majority_holder(&[code::FOLLOWING]).or_else(|| {
                tally
                    .replies()
                    .filter(|r| r.code == code::FOLLOWING)
                    .max_by_key(|r| tally.votes(&r.leader, &[code::FOLLOWING]))
                    .map(|r| r.leader.as_str())
            });
            let Some(leader) = holder else {
                return Some(failed(Err(tally.unavailable())));
            };
            // The holder's token as a majority of its servers hold it: servers that disagree (a
            // late grant whose alignment is on its way) leave it to the last answer, and
            // without one the lower token is the one a majority vouches for.
            let mut tokens: Vec<u64> = tally
                .replies()
                .filter(|r| r.code == code::FOLLOWING && r.leader == leader)
                .map(|r| r.token)
                .collect();
            tokens.sort_unstable_by(|a, b| b.cmp(a));
            if tally.pending > 0 && tokens.first() != tokens.last() {
                return None;
            }
            let token = tokens[quorum.min(tokens.len()) - 1];
            failed(name(leader).map(|leader| Outcome::Following {
                leader,
                token: FencingToken(token),
            }))
        }
        Kind::Extend => failed(match tally.majority_holder(&[code::NOT_HOLDER]) {
            Some(leader) => name(leader).map(|h| Outcome::NotHolder { holder: Some(h) }),
            None => Ok(Outcome::NotHolder { holder: None }),
        }),
        // A conditional handover a majority refused (its expected lease is not the live one
        // there) is refused, naming the holder they agree on; minority grants are released.
        // Anything less than a majority either way is unavailable.
        Kind::Handover => match tally
            .replies()
            .filter(|r| r.code == code::NOT_HOLDER)
            .count()
            >= quorum
        {
            true => failed(match tally.majority_holder(&[code::NOT_HOLDER]) {
                Some(leader) => name(leader).map(|h| Outcome::NotHolder { holder: Some(h) }),
                None => Ok(Outcome::NotHolder { holder: None }),
            }),
            false => failed(Err(tally.unavailable())),
        },
        Kind::Resign => failed(Err(tally.unavailable())),
    })
}

/// The token at least `quorum` of the grants hold exactly, if any.
fn agreed_token(granted: &[(usize, &Reply)], quorum: usize) -> Option<FencingToken> {
    granted
        .iter()
        .map(|(_, r)| r.token)
        .find(|token| granted.iter().filter(|(_, r)| r.token == *token).count() >= quorum)
        .map(FencingToken)
}

fn renewed(token: FencingToken) -> Verdict {
    Verdict {
        outcome: Ok(Outcome::Leading { token }),
        release: Vec::new(),
        align: Vec::new(),
        change: Some(ChangeCause::Renewed),
        late: Late::Ignore,
    }
}

fn granted_by_majority(kind: Kind, granted: &[(usize, &Reply)]) -> Verdict {
    // A new lease: the highest token granted (above every token any earlier majority vouched
    // for, as this majority shares a server with it), made durable on a majority.
    let token = granted
        .iter()
        .map(|(_, r)| r.token)
        .max()
        .unwrap_or_default();
    // Every granting server that answered with another token (a clock a millisecond behind or
    // ahead) is aligned to it before it is reported: then a majority holds exactly this token, and
    // the holder's renewals find them agreeing.
    let align = granted
        .iter()
        .filter(|(_, r)| r.token != token)
        .map(|(i, _)| *i)
        .collect();
    let token = FencingToken(token);
    let (outcome, change) = match kind {
        Kind::Handover => (Outcome::HandedOver { token }, ChangeCause::HandedOver),
        _ => (Outcome::Leading { token }, ChangeCause::Elected),
    };
    Verdict {
        outcome: Ok(outcome),
        release: Vec::new(),
        align,
        change: Some(change),
        late: Late::Align(token),
    }
}

/// Resign succeeds unless another candidate holds a majority; a resignation cannot be taken back,
/// so nothing is released.
fn resign(tally: &Tally<'_>) -> Option<Verdict> {
    let verdict = |outcome, change| Verdict {
        outcome,
        release: Vec::new(),
        align: Vec::new(),
        change,
        late: Late::Ignore,
    };
    if let Some(leader) = tally.majority_holder(&[code::NOT_HOLDER]) {
        return Some(verdict(
            name(leader).map(|h| Outcome::NotHolder { holder: Some(h) }),
            None,
        ));
    }
    if !tally.answers_possible() {
        return Some(verdict(Err(tally.unavailable()), None));
    }
    // Wait while a majority of answers is missing, or the missing ones could still show another
    // holder with a majority.
    let another_could_lead = tally.most_votes(&[code::NOT_HOLDER]) + tally.pending >= tally.quorum;
    if tally.answered.len() < tally.quorum || another_could_lead {
        return None;
    }
    let resigned_live = tally
        .replies()
        .any(|r| r.code == code::RESIGNED && !r.leader.is_empty());
    Some(verdict(
        Ok(Outcome::Resigned),
        resigned_live.then_some(ChangeCause::Resigned),
    ))
}

/// Combines the answers received so far to `leader.lua`: the leader a majority agrees on, with
/// the time until fewer than a majority still hold it, and the token level a majority vouches
/// for. `None` while the missing answers could still change the result. When the servers that
/// answered disagree and the missing ones could have tipped it, the store cannot tell who leads:
/// that is an error, not "nobody".
pub(crate) fn combine_leader(answers: &[Answer<Reply>]) -> Option<Result<Leadership, StoreError>> {
    let tally = Tally::new(answers);
    let quorum = tally.quorum;
    let token = tally.durable_token();
    if let Some(leader) = tally.majority_holder(&[0]) {
        let holding: Vec<(usize, &Reply)> = tally
            .answered
            .iter()
            .copied()
            .filter(|(_, r)| r.leader == leader)
            .collect();
        // The lease's token is the one a majority of its servers hold exactly (it was aligned on
        // them before it was reported). Servers that disagree — a late grant whose alignment is
        // still on its way — leave it to the last answer; without one the read cannot tell.
        let Some(token) = agreed_token(&holding, quorum) else {
            if tally.pending > 0 {
                return None;
            }
            return Some(Err(StoreError::Unavailable(
                "the Redis servers that name the leader disagree on its fencing token".into(),
            )));
        };
        let mut ttls: Vec<u64> = holding.iter().map(|(_, r)| r.ttl_ms).collect();
        ttls.sort_unstable_by(|a, b| b.cmp(a));
        return Some(name(leader).map(|leader| Leadership {
            leader: Some(LeaderInfo {
                leader,
                token,
                ttl_ms: ttls[quorum - 1].max(1),
            }),
            token,
        }));
    }
    if !tally.answers_possible() {
        return Some(Err(tally.unavailable()));
    }
    // Nobody can lead when no holder could reach a majority, even if every server that has not
    // answered (or failed to) named it.
    let unknown = tally.pending + tally.failed();
    if tally.answered.len() >= quorum && tally.most_votes(&[0]) + unknown < quorum {
        return Some(Ok(Leadership {
            leader: None,
            token,
        }));
    }
    if tally.pending > 0 {
        return None;
    }
    Some(Err(StoreError::Unavailable(format!(
        "the Redis servers that answered disagree on the leader and {unknown} of {} did not \
         answer in time",
        tally.servers
    ))))
}

/// Combines the answers received so far to a request that needs a majority of servers to answer
/// (a ping, a scan): `Some(true)` once a majority has, `Some(false)` once it no longer can.
pub(crate) fn majority_answered<T>(answers: &[Answer<T>]) -> Option<bool> {
    let quorum = quorum(answers.len());
    let ok = answers.iter().filter(|a| matches!(a, Some(Ok(_)))).count();
    let pending = answers.iter().filter(|a| a.is_none()).count();
    if ok >= quorum {
        Some(true)
    } else if ok + pending < quorum {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(code: u8, leader: &str, token: u64) -> Answer<Reply> {
        Some(Ok(Reply {
            code,
            leader: leader.into(),
            token,
            ttl_ms: 1_000,
        }))
    }

    fn down() -> Answer<Reply> {
        Some(Err(StoreError::Unavailable("down".into())))
    }

    fn leading(token: u64) -> Result<Outcome, StoreError> {
        Ok(Outcome::Leading {
            token: FencingToken(token),
        })
    }

    fn decided(kind: Kind, answers: &[Answer<Reply>]) -> Verdict {
        combine(kind, answers, true).expect("decided")
    }

    #[test]
    fn a_majority_of_grants_wins_and_one_server_down_changes_nothing() {
        let v = decided(Kind::Campaign, &[ok(6, "a", 4), ok(6, "a", 4), down()]);
        assert_eq!(v.outcome, leading(4));
        assert_eq!(
            (v.release, v.align, v.change, v.late),
            (
                vec![],
                vec![],
                Some(ChangeCause::Elected),
                Late::Align(FencingToken(4))
            )
        );
    }

    #[test]
    fn a_majority_of_grants_decides_without_waiting_for_the_last_server() {
        let v = decided(Kind::Campaign, &[ok(6, "a", 4), None, ok(6, "a", 4)]);
        assert_eq!(v.outcome, leading(4));
        let v = decided(Kind::Extend, &[None, ok(1, "a", 4), ok(1, "a", 4)]);
        assert_eq!((v.outcome, v.late), (leading(4), Late::Ignore));
    }

    #[test]
    fn a_split_waits_for_the_server_that_can_tip_it() {
        assert_eq!(
            combine(Kind::Campaign, &[ok(6, "a", 4), ok(2, "b", 3), None], true),
            None
        );
        assert_eq!(
            combine(Kind::Campaign, &[ok(6, "a", 4), down(), None], true),
            None
        );
        // One answer that cannot win, one down: a third answer would still tell who leads.
        assert_eq!(
            combine(Kind::Campaign, &[ok(2, "b", 4), down(), None], true),
            None
        );
    }

    #[test]
    fn a_lost_command_waits_for_the_answer_that_tells_who_holds_the_lease() {
        // Two answers name different holders (one server has not run an earlier command yet).
        assert_eq!(
            combine(Kind::Extend, &[ok(5, "a", 3), ok(5, "", 3), None], true),
            None
        );
        let v = decided(Kind::Extend, &[ok(5, "a", 3), ok(5, "", 3), ok(5, "a", 3)]);
        assert_eq!(
            v.outcome,
            Ok(Outcome::NotHolder {
                holder: Some(Name::parse("t", "a").unwrap())
            })
        );
        // Without it, the majority's answer: nobody holds a majority.
        let v = decided(Kind::Extend, &[ok(5, "a", 3), ok(5, "", 3), down()]);
        assert_eq!(v.outcome, Ok(Outcome::NotHolder { holder: None }));
    }

    #[test]
    fn a_campaign_that_can_no_longer_win_is_decided_at_once() {
        let v = decided(Kind::Campaign, &[ok(2, "b", 3), ok(2, "b", 3), None]);
        assert_eq!(
            v.outcome,
            Ok(Outcome::Following {
                leader: Name::parse("t", "b").unwrap(),
                token: FencingToken(3)
            })
        );
        assert_eq!(
            v.late,
            Late::Release,
            "a late grant of the loser is released"
        );
    }

    #[test]
    fn two_servers_down_of_three_is_unavailable_at_once_and_the_lone_grant_is_released() {
        let v = decided(Kind::Campaign, &[ok(6, "a", 4), down(), down()]);
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
        assert_eq!(v.release, [0]);
        let v = decided(Kind::Campaign, &[None, down(), down()]);
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
        assert_eq!(v.late, Late::Release);
    }

    #[test]
    fn grants_after_the_validity_time_are_released() {
        let v = combine(
            Kind::Campaign,
            &[ok(6, "a", 4), ok(6, "a", 4), ok(6, "a", 4)],
            false,
        )
        .unwrap();
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
        assert_eq!(v.release, [0, 1, 2]);
    }

    #[test]
    fn a_failed_extend_releases_no_renewal() {
        // Two servers hung: the renewal on the third stands, the previous term with it.
        let v = decided(Kind::Extend, &[ok(1, "a", 4), down(), down()]);
        assert!(v.outcome.is_err());
        assert_eq!(
            v.release,
            Vec::<usize>::new(),
            "renewals are never released"
        );
        // A re-election of an expired lease is a new lease: that one is taken back.
        let v = decided(Kind::Extend, &[ok(6, "a", 5), down(), down()]);
        assert_eq!(v.release, [0]);
    }

    #[test]
    fn a_lost_campaign_reports_the_token_a_majority_of_the_holders_servers_hold() {
        // The third server's grant (a clock 2 ms later) is not aligned yet.
        assert_eq!(
            combine(
                Kind::Campaign,
                &[ok(2, "a", 617), None, ok(2, "a", 615)],
                true
            ),
            None,
            "the last answer tells"
        );
        let following = |token| {
            Ok(Outcome::Following {
                leader: Name::parse("t", "a").unwrap(),
                token: FencingToken(token),
            })
        };
        let v = decided(
            Kind::Campaign,
            &[ok(2, "a", 617), ok(2, "a", 615), ok(2, "a", 615)],
        );
        assert_eq!(v.outcome, following(615));
        let v = decided(Kind::Campaign, &[ok(2, "a", 617), down(), ok(2, "a", 615)]);
        assert_eq!(v.outcome, following(615));
    }

    #[test]
    fn a_lost_campaign_names_the_majority_holder_and_releases_minority_grants() {
        let v = decided(
            Kind::Campaign,
            &[ok(6, "a", 9), ok(2, "b", 3), ok(2, "b", 4)],
        );
        assert_eq!(
            v.outcome,
            Ok(Outcome::Following {
                leader: Name::parse("t", "b").unwrap(),
                token: FencingToken(3)
            }),
            "b's servers diverged (an alignment that failed): the token both vouch for"
        );
        assert_eq!(v.release, [0]);
    }

    #[test]
    fn diverged_tokens_are_aligned_on_the_granting_servers_before_being_reported() {
        // Server 0 saw more elections (e.g. it was the only one up for a while).
        let v = decided(
            Kind::Campaign,
            &[ok(6, "a", 9), ok(6, "a", 4), ok(2, "b", 3)],
        );
        assert_eq!(v.outcome, leading(9));
        assert_eq!(
            v.align,
            [1],
            "9 must reach a majority before it is reported"
        );
        let v = decided(
            Kind::Campaign,
            &[ok(6, "a", 9), ok(6, "a", 9), ok(6, "a", 4)],
        );
        assert_eq!(v.align, [2], "every grant ends with the same token");
    }

    #[test]
    fn renewals_on_a_majority_keep_the_token_and_announce_no_change() {
        let v = decided(Kind::Extend, &[ok(1, "a", 5), ok(1, "a", 5), down()]);
        assert_eq!(v.outcome, leading(5));
        assert_eq!(v.change, Some(ChangeCause::Renewed));
        // One server lags (a late grant not aligned yet): the last answer tips it.
        assert_eq!(
            combine(Kind::Campaign, &[ok(1, "a", 5), ok(1, "a", 6), None], true),
            None
        );
        let v = decided(
            Kind::Campaign,
            &[ok(1, "a", 6), ok(1, "a", 5), ok(1, "a", 5)],
        );
        assert_eq!((v.outcome, v.align), (leading(5), vec![]));
        let v = decided(
            Kind::Campaign,
            &[ok(1, "a", 4), ok(1, "a", 5), ok(1, "a", 5)],
        );
        assert_eq!(
            v.outcome,
            leading(5),
            "never a lower token than the lease's"
        );
        // Without it, the renewal cannot say which token is the lease's.
        let v = decided(Kind::Campaign, &[ok(1, "a", 5), ok(1, "a", 6), down()]);
        assert!(v.outcome.is_err());
        assert_eq!(
            v.release,
            Vec::<usize>::new(),
            "a renewal is never released"
        );
    }

    #[test]
    fn extend_by_a_non_holder_names_the_majority_holder_or_nobody() {
        let v = decided(Kind::Extend, &[ok(5, "b", 5), ok(5, "b", 5), ok(1, "a", 5)]);
        assert_eq!(
            v.outcome,
            Ok(Outcome::NotHolder {
                holder: Some(Name::parse("t", "b").unwrap())
            })
        );
        assert_eq!(v.release, Vec::<usize>::new(), "a renewal is not released");
        let v = decided(Kind::Extend, &[ok(5, "", 5), ok(5, "", 5), down()]);
        assert_eq!(v.outcome, Ok(Outcome::NotHolder { holder: None }));
    }

    #[test]
    fn resign_succeeds_unless_another_candidate_holds_a_majority() {
        let v = decided(Kind::Resign, &[ok(3, "a", 5), ok(3, "a", 5), down()]);
        assert_eq!(
            (v.outcome, v.change),
            (Ok(Outcome::Resigned), Some(ChangeCause::Resigned))
        );
        let v = decided(Kind::Resign, &[ok(3, "", 5), ok(3, "", 5), None]);
        assert_eq!((v.outcome, v.change), (Ok(Outcome::Resigned), None));
        let v = decided(Kind::Resign, &[ok(5, "b", 5), ok(5, "b", 5), ok(3, "a", 5)]);
        assert!(matches!(
            v.outcome,
            Ok(Outcome::NotHolder { holder: Some(_) })
        ));
        assert_eq!(
            combine(Kind::Resign, &[ok(5, "b", 5), ok(3, "a", 5), None], true),
            None,
            "the last server decides whether b holds a majority"
        );
        let v = decided(Kind::Resign, &[ok(3, "a", 5), down(), down()]);
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
    }

    #[test]
    fn handover_needs_a_majority() {
        let v = decided(Kind::Handover, &[ok(4, "c", 7), ok(4, "c", 7), None]);
        assert_eq!(
            v.outcome,
            Ok(Outcome::HandedOver {
                token: FencingToken(7)
            })
        );
        assert_eq!(v.change, Some(ChangeCause::HandedOver));
        let v = decided(Kind::Handover, &[ok(4, "c", 7), down(), down()]);
        assert!(v.outcome.is_err());
        assert_eq!(v.release, [0]);
    }

    #[test]
    fn a_conditional_handover_a_majority_refused_is_refused_and_its_minority_grant_released() {
        // Two servers say the live lease is b's, not the expected one; the third handed over.
        let v = decided(
            Kind::Handover,
            &[ok(5, "b", 5), ok(4, "c", 7), ok(5, "b", 5)],
        );
        assert_eq!(
            v.outcome,
            Ok(Outcome::NotHolder {
                holder: Some(Name::parse("leader", "b").unwrap())
            })
        );
        assert_eq!((v.release, v.change), (vec![1], None));
        // One refusal, one grant, one server down: neither side has a majority.
        let v = decided(Kind::Handover, &[ok(5, "b", 5), ok(4, "c", 7), down()]);
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
        assert_eq!(v.release, [1]);
        // Refused by a majority where nobody leads.
        let v = decided(Kind::Handover, &[ok(5, "", 5), ok(5, "", 5), None]);
        assert_eq!(v.outcome, Ok(Outcome::NotHolder { holder: None }));
    }

    fn live(leader: &str, token: u64, ttl_ms: u64) -> Answer<Reply> {
        Some(Ok(Reply {
            code: 0,
            leader: leader.into(),
            token,
            ttl_ms,
        }))
    }

    fn read(answers: &[Answer<Reply>]) -> Result<Leadership, StoreError> {
        combine_leader(answers).expect("decided")
    }

    #[test]
    fn reads_need_a_majority_agreeing_on_one_live_leader() {
        let info = read(&[live("a", 4, 900), live("a", 4, 500), live("", 2, 0)])
            .unwrap()
            .leader
            .unwrap();
        assert_eq!(
            (info.leader.as_str(), info.token.0, info.ttl_ms),
            ("a", 4, 500)
        );
        assert_eq!(
            read(&[live("a", 3, 900), live("b", 4, 500), live("", 2, 0)]).unwrap(),
            Leadership {
                leader: None,
                token: FencingToken(3)
            },
            "no majority: no leader"
        );
        assert!(read(&[live("a", 3, 900), down(), down()]).is_err());
        assert_eq!(
            read(&[live("a", 3, 900)]).unwrap().leader.unwrap().ttl_ms,
            900,
            "a single server is its own majority"
        );
    }

    #[test]
    fn reads_report_only_a_token_a_majority_vouches_for() {
        // Server 0 holds a token the others never got (a grant not aligned yet).
        let info = read(&[live("a", 9, 900), live("a", 4, 900), live("a", 4, 900)])
            .unwrap()
            .leader
            .unwrap();
        assert_eq!(info.token, FencingToken(4));
        // Two answers that disagree on the leader's token: the third tells which one a
        // majority holds; without it the read cannot tell (and is made again).
        assert_eq!(
            combine_leader(&[live("a", 807, 900), None, live("a", 806, 900)]),
            None
        );
        let info = read(&[
            live("a", 807, 900),
            live("a", 807, 900),
            live("a", 806, 900),
        ])
        .unwrap()
        .leader
        .unwrap();
        assert_eq!(info.token, FencingToken(807));
        assert!(read(&[live("a", 807, 900), down(), live("a", 806, 900)]).is_err());
        let nobody = read(&[live("", 9, 0), live("", 4, 0), live("", 4, 0)]).unwrap();
        assert_eq!(nobody.token, FencingToken(4));
    }

    #[test]
    fn reads_decide_at_a_majority_and_say_unknown_rather_than_nobody() {
        assert_eq!(
            read(&[live("a", 4, 900), None, live("a", 4, 800)])
                .unwrap()
                .leader
                .map(|l| l.leader.to_string()),
            Some("a".into()),
            "two agreeing servers need not wait for the third"
        );
        assert_eq!(
            read(&[live("", 4, 0), None, live("", 4, 0)])
                .unwrap()
                .leader,
            None
        );
        assert_eq!(
            combine_leader(&[live("a", 4, 900), None, live("", 4, 0)]),
            None,
            "the third server decides"
        );
        assert!(
            read(&[live("a", 4, 900), down(), live("", 4, 0)]).is_err(),
            "a server that did not answer might have named a: cannot tell"
        );
    }

    #[test]
    fn requests_needing_a_majority_decide_as_soon_as_it_is_there_or_gone() {
        let up: Answer<()> = Some(Ok(()));
        let failed: Answer<()> = Some(Err(StoreError::Unavailable("down".into())));
        assert_eq!(
            majority_answered(&[up.clone(), None, up.clone()]),
            Some(true)
        );
        assert_eq!(majority_answered(&[up.clone(), None, failed.clone()]), None);
        assert_eq!(
            majority_answered(&[failed.clone(), None, failed]),
            Some(false)
        );
    }

    #[test]
    fn validity_leaves_room_for_clock_drift_on_several_servers_only() {
        let term = Duration::from_millis(1_000);
        assert_eq!(validity(1, term, Duration::from_millis(999)), Some(term));
        assert_eq!(
            validity(3, term, Duration::from_millis(100)),
            Some(Duration::from_millis(888))
        );
        assert_eq!(validity(3, term, Duration::from_millis(988)), None);
    }
}

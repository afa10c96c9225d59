//! Combines the answers of N Redis servers into one outcome (Redlock), as pure functions.
//!
//! With one server this is the identity; with N independent servers a lease exists only where a
//! majority granted it within its validity time (term − elapsed − clock-drift allowance). Partial
//! grants are released, and a reported fencing token is first made durable on a majority (raised
//! where a granting server had a lower one), so any later majority — which shares at least one
//! server with this one — can only hand out higher tokens.

use std::time::Duration;

use crate::lease::{ChangeCause, FencingToken, LeaderInfo, Name, Outcome};
use crate::store::StoreError;

/// One server's answer to `lease.lua`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct Reply {
    /// `lease.lua`'s outcome code.
    pub code: u8,
    /// The leader it names (empty when none).
    pub leader: String,
    /// The token it reports.
    pub token: u64,
    /// Milliseconds left of the lease it reports.
    pub ttl_ms: u64,
}

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

/// What the store must do after a command ran on every server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The command's outcome, or why it failed.
    pub outcome: Result<Outcome, StoreError>,
    /// Servers whose grant must be released (the command failed to reach a quorum).
    pub release: Vec<usize>,
    /// Servers whose token must be raised to the reported one before it is reported.
    pub raise: Vec<usize>,
    /// The change to announce, if leadership changed.
    pub change: Option<ChangeCause>,
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
    let drift = term / 100 + Duration::from_millis(2);
    term.checked_sub(elapsed + drift).filter(|v| !v.is_zero())
}

/// Not enough servers answered; the first server error says why.
fn unavailable<T>(replies: &[Result<T, StoreError>]) -> StoreError {
    let answered = replies.iter().filter(|r| r.is_ok()).count();
    let cause = replies.iter().find_map(|r| r.as_ref().err());
    match (replies.len(), cause) {
        (1, Some(cause)) => cause.clone(),
        (servers, cause) => StoreError::Unavailable(format!(
            "only {answered} of {servers} Redis servers answered, {} needed{}",
            quorum(servers),
            cause.map(|c| format!(" ({c})")).unwrap_or_default()
        )),
    }
}

/// The holder named by at least a quorum of replies with one of `codes`, if any.
fn majority_holder<'a>(
    replies: impl Iterator<Item = &'a Reply> + Clone,
    codes: &[u8],
    quorum: usize,
) -> Option<(&'a str, u64)> {
    let named = replies.filter(|r| codes.contains(&r.code) && !r.leader.is_empty());
    named.clone().find_map(|candidate| {
        let votes: Vec<_> = named
            .clone()
            .filter(|r| r.leader == candidate.leader)
            .collect();
        (votes.len() >= quorum).then(|| {
            let token = votes.iter().map(|r| r.token).max().unwrap_or_default();
            (candidate.leader.as_str(), token)
        })
    })
}

fn name(leader: &str) -> Result<Name, StoreError> {
    Name::parse("leader", leader).map_err(|err| {
        StoreError::Unavailable(format!("a Redis server returned an invalid leader: {err}"))
    })
}

/// Combines the replies of every server to a command issued by `caller`; `valid` says whether
/// any validity time was left when the last reply arrived.
pub(crate) fn combine(kind: Kind, results: &[Result<Reply, StoreError>], valid: bool) -> Verdict {
    let replies = results;
    let servers = replies.len();
    let quorum = quorum(servers);
    let answered: Vec<(usize, &Reply)> = replies
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|r| (i, r)))
        .collect();
    let granted: Vec<(usize, &Reply)> = answered
        .iter()
        .copied()
        .filter(|(_, r)| matches!(r.code, code::RENEWED | code::ELECTED | code::HANDED_OVER))
        .collect();
    let failed = |outcome| Verdict {
        outcome,
        release: granted.iter().map(|(i, _)| *i).collect(),
        raise: Vec::new(),
        change: None,
    };

    if kind != Kind::Resign && granted.len() >= quorum && valid {
        let token = granted
            .iter()
            .map(|(_, r)| r.token)
            .max()
            .unwrap_or_default();
        let at_max = granted.iter().filter(|(_, r)| r.token == token).count();
        let raise = if at_max >= quorum {
            Vec::new()
        } else {
            granted
                .iter()
                .filter(|(_, r)| r.token < token)
                .map(|(i, _)| *i)
                .collect()
        };
        let fresh = granted
            .iter()
            .any(|(_, r)| r.token == token && r.code != code::RENEWED);
        let (outcome, change) = match kind {
            Kind::Handover => (
                Outcome::HandedOver {
                    token: FencingToken(token),
                },
                ChangeCause::HandedOver,
            ),
            _ if fresh => (
                Outcome::Leading {
                    token: FencingToken(token),
                },
                ChangeCause::Elected,
            ),
            _ => (
                Outcome::Leading {
                    token: FencingToken(token),
                },
                ChangeCause::Renewed,
            ),
        };
        return Verdict {
            outcome: Ok(outcome),
            release: Vec::new(),
            raise,
            change: Some(change),
        };
    }
    if answered.len() < quorum {
        return failed(Err(unavailable(replies)));
    }
    if granted.len() >= quorum {
        return failed(Err(StoreError::Unavailable(
            "the lease's validity time ran out before a majority of Redis servers granted it"
                .into(),
        )));
    }
    let replies = answered.iter().map(|(_, r)| *r);
    match kind {
        Kind::Campaign => {
            // Lost. Report the holder a majority agrees on, else the most named one: with a
            // split vote nobody leads, and this candidate did not win either.
            let holder =
                majority_holder(replies.clone(), &[code::FOLLOWING], quorum).or_else(|| {
                    replies
                        .clone()
                        .filter(|r| r.code == code::FOLLOWING)
                        .max_by_key(|r| replies.clone().filter(|o| o.leader == r.leader).count())
                        .map(|r| (r.leader.as_str(), r.token))
                });
            match holder {
                Some((leader, token)) => failed(name(leader).map(|leader| Outcome::Following {
                    leader,
                    token: FencingToken(token),
                })),
                None => failed(Err(unavailable(results))),
            }
        }
        Kind::Extend => {
            let holder = majority_holder(replies, &[code::NOT_HOLDER], quorum);
            failed(match holder {
                Some((leader, _)) => name(leader).map(|h| Outcome::NotHolder { holder: Some(h) }),
                None => Ok(Outcome::NotHolder { holder: None }),
            })
        }
        Kind::Resign => {
            if let Some((leader, _)) = majority_holder(replies, &[code::NOT_HOLDER], quorum) {
                return failed(name(leader).map(|h| Outcome::NotHolder { holder: Some(h) }));
            }
            let resigned_live = answered
                .iter()
                .any(|(_, r)| r.code == code::RESIGNED && !r.leader.is_empty());
            Verdict {
                outcome: Ok(Outcome::Resigned),
                release: Vec::new(),
                raise: Vec::new(),
                change: resigned_live.then_some(ChangeCause::Resigned),
            }
        }
        Kind::Handover => failed(Err(unavailable(results))),
    }
}

/// Combines every server's answer to `leader.lua`: the leader a majority agrees on, with the
/// highest token among them and the time until fewer than a majority still hold it.
pub(crate) fn combine_leader(
    replies: &[Result<Reply, StoreError>],
) -> Result<Option<LeaderInfo>, StoreError> {
    let servers = replies.len();
    let quorum = quorum(servers);
    let answered: Vec<&Reply> = replies.iter().filter_map(|r| r.as_ref().ok()).collect();
    if answered.len() < quorum {
        return Err(unavailable(replies));
    }
    let Some((leader, token)) = majority_holder(answered.iter().copied(), &[0], quorum) else {
        return Ok(None);
    };
    let mut ttls: Vec<u64> = answered
        .iter()
        .filter(|r| r.leader == leader)
        .map(|r| r.ttl_ms)
        .collect();
    ttls.sort_unstable_by(|a, b| b.cmp(a));
    Ok(Some(LeaderInfo {
        leader: name(leader)?,
        token: FencingToken(token),
        ttl_ms: ttls[quorum - 1].max(1),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(code: u8, leader: &str, token: u64) -> Result<Reply, StoreError> {
        Ok(Reply {
            code,
            leader: leader.into(),
            token,
            ttl_ms: 1_000,
        })
    }

    fn down() -> Result<Reply, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }

    fn leading(token: u64) -> Result<Outcome, StoreError> {
        Ok(Outcome::Leading {
            token: FencingToken(token),
        })
    }

    #[test]
    fn a_majority_of_grants_wins_and_one_server_down_changes_nothing() {
        let v = combine(
            Kind::Campaign,
            &[ok(6, "a", 4), ok(6, "a", 4), down()],
            true,
        );
        assert_eq!(v.outcome, leading(4));
        assert_eq!(
            (v.release, v.raise, v.change),
            (vec![], vec![], Some(ChangeCause::Elected))
        );
    }

    #[test]
    fn two_servers_down_of_three_is_unavailable_and_the_lone_grant_is_released() {
        let v = combine(Kind::Campaign, &[ok(6, "a", 4), down(), down()], true);
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
        assert_eq!(v.release, [0]);
    }

    #[test]
    fn grants_after_the_validity_time_are_released() {
        let v = combine(
            Kind::Campaign,
            &[ok(6, "a", 4), ok(6, "a", 4), ok(6, "a", 4)],
            false,
        );
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
        assert_eq!(v.release, [0, 1, 2]);
    }

    #[test]
    fn a_lost_campaign_names_the_majority_holder_and_releases_minority_grants() {
        let v = combine(
            Kind::Campaign,
            &[ok(6, "a", 9), ok(2, "b", 3), ok(2, "b", 4)],
            true,
        );
        assert_eq!(
            v.outcome,
            Ok(Outcome::Following {
                leader: Name::parse("t", "b").unwrap(),
                token: FencingToken(4)
            })
        );
        assert_eq!(v.release, [0]);
    }

    #[test]
    fn diverged_tokens_are_raised_on_the_granting_servers_before_being_reported() {
        // Server 0 saw more elections (e.g. it was the only one up for a while).
        let v = combine(
            Kind::Campaign,
            &[ok(6, "a", 9), ok(6, "a", 4), ok(2, "b", 3)],
            true,
        );
        assert_eq!(v.outcome, leading(9));
        assert_eq!(
            v.raise,
            [1],
            "9 must reach a majority before it is reported"
        );
        let v = combine(
            Kind::Campaign,
            &[ok(6, "a", 9), ok(6, "a", 9), ok(6, "a", 4)],
            true,
        );
        assert_eq!(v.raise, Vec::<usize>::new(), "already on a majority");
    }

    #[test]
    fn renewals_on_a_majority_keep_the_token_and_announce_no_change() {
        let v = combine(Kind::Extend, &[ok(1, "a", 5), ok(1, "a", 5), down()], true);
        assert_eq!(v.outcome, leading(5));
        assert_eq!(v.change, Some(ChangeCause::Renewed));
    }

    #[test]
    fn extend_by_a_non_holder_names_the_majority_holder_or_nobody() {
        let v = combine(
            Kind::Extend,
            &[ok(5, "b", 5), ok(5, "b", 5), ok(1, "a", 5)],
            true,
        );
        assert_eq!(
            v.outcome,
            Ok(Outcome::NotHolder {
                holder: Some(Name::parse("t", "b").unwrap())
            })
        );
        assert_eq!(v.release, [2]);
        let v = combine(Kind::Extend, &[ok(5, "", 5), ok(5, "", 5), down()], true);
        assert_eq!(v.outcome, Ok(Outcome::NotHolder { holder: None }));
    }

    #[test]
    fn resign_succeeds_unless_another_candidate_holds_a_majority() {
        let v = combine(Kind::Resign, &[ok(3, "a", 5), ok(3, "a", 5), down()], true);
        assert_eq!(
            (v.outcome, v.change),
            (Ok(Outcome::Resigned), Some(ChangeCause::Resigned))
        );
        let v = combine(
            Kind::Resign,
            &[ok(3, "", 5), ok(3, "", 5), ok(3, "", 5)],
            true,
        );
        assert_eq!((v.outcome, v.change), (Ok(Outcome::Resigned), None));
        let v = combine(
            Kind::Resign,
            &[ok(5, "b", 5), ok(5, "b", 5), ok(3, "a", 5)],
            true,
        );
        assert!(matches!(
            v.outcome,
            Ok(Outcome::NotHolder { holder: Some(_) })
        ));
        let v = combine(Kind::Resign, &[ok(3, "a", 5), down(), down()], true);
        assert!(matches!(v.outcome, Err(StoreError::Unavailable(_))));
    }

    #[test]
    fn handover_needs_a_majority() {
        let v = combine(
            Kind::Handover,
            &[ok(4, "c", 7), ok(4, "c", 7), down()],
            true,
        );
        assert_eq!(
            v.outcome,
            Ok(Outcome::HandedOver {
                token: FencingToken(7)
            })
        );
        assert_eq!(v.change, Some(ChangeCause::HandedOver));
        let v = combine(Kind::Handover, &[ok(4, "c", 7), down(), down()], true);
        assert!(v.outcome.is_err());
        assert_eq!(v.release, [0]);
    }

    #[test]
    fn reads_need_a_majority_agreeing_on_one_live_leader() {
        let live = |leader: &str, token, ttl_ms| {
            Ok(Reply {
                code: 0,
                leader: leader.into(),
                token,
                ttl_ms,
            })
        };
        let info = combine_leader(&[live("a", 3, 900), live("a", 4, 500), live("", 2, 0)])
            .unwrap()
            .unwrap();
        assert_eq!(
            (info.leader.as_str(), info.token.0, info.ttl_ms),
            ("a", 4, 500)
        );
        assert_eq!(
            combine_leader(&[live("a", 3, 900), live("b", 4, 500), live("", 2, 0)]).unwrap(),
            None,
            "no majority: no leader"
        );
        assert!(combine_leader(&[live("a", 3, 900), down(), down()]).is_err());
        assert_eq!(
            combine_leader(&[live("a", 3, 900)])
                .unwrap()
                .unwrap()
                .ttl_ms,
            900,
            "a single server is its own majority"
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

//! What the controller decides, as pure functions over what it read: candidate ranking, the
//! managed-mode lease action, the leader-label moves, conflicts between Elections, and the
//! status to publish. No client, no store — table-tested below.

use std::{borrow::Borrow, collections::BTreeMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{self, Timestamp};

use super::crd::{CandidatePod, Election, ElectionStatus, LabelledPods, RevisionStatus};
use crate::discovery::mapping::PodInfo;

/// A pod of the Deployment as the controller sees it: the wire view plus what ranking and
/// labelling need.
#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    /// Name, IP, status and ReplicaSet.
    pub info: PodInfo,
    /// When the pod was created (older pods are preferred).
    pub created: Option<Timestamp>,
    /// The value of the Election's leader label on the pod, if set.
    pub leader_label: Option<String>,
}

impl PodState {
    /// Ready and not terminating: it may lead.
    pub fn is_candidate(&self) -> bool {
        self.info.status.pod_ready && !self.info.status.terminating
    }
}

/// The candidates, best first: newest ReplicaSet revision first when `prefer_newest_revision`,
/// then the oldest pod, then by name (so the order is total and stable).
pub fn ranked_candidates(pods: &[PodState], prefer_newest_revision: bool) -> Vec<&PodState> {
    let mut candidates: Vec<&PodState> = pods.iter().filter(|p| p.is_candidate()).collect();
    candidates.sort_by(|a, b| {
        let revision = if prefer_newest_revision {
            b.info
                .replica_set
                .revision
                .cmp(&a.info.replica_set.revision)
        } else {
            std::cmp::Ordering::Equal
        };
        // A pod without a creation time sorts last among equals.
        let created = |p: &PodState| (p.created.is_none(), p.created);
        revision
            .then_with(|| created(a).cmp(&created(b)))
            .then_with(|| a.info.name.cmp(&b.info.name))
    });
    candidates
}

/// What managed mode does to the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// The leader is still the best choice it can be: renew its lease.
    Extend(String),
    /// Make this pod the leader (nobody leads, or the leader stopped being a candidate, or a
    /// newer revision is preferred and the leader is of an older one).
    Handover(String),
    /// Nobody may lead (no candidate): give the lease up.
    Resign(String),
    /// Nobody leads and nobody can.
    Nothing,
}

impl LeaseAction {
    /// The store command the action takes (the `command` label of the controller's metrics).
    pub fn command(&self) -> Option<&'static str> {
        match self {
            Self::Extend(_) => Some("extend"),
            Self::Handover(_) => Some("handover"),
            Self::Resign(_) => Some("resign"),
            Self::Nothing => None,
        }
    }
}

/// Managed mode's decision. The leader keeps the lease while it is a candidate — except that,
/// with `prefer_newest_revision`, a leader of an older revision hands over to a pod of the newest
/// one, so a rolling update moves leadership once, to the new revision, rather than at the last
/// moment when the old pod terminates.
pub fn lease_action(
    leader: Option<&str>,
    pods: &[PodState],
    prefer_newest_revision: bool,
) -> LeaseAction {
    let ranked = ranked_candidates(pods, prefer_newest_revision);
    let current = leader.and_then(|l| ranked.iter().find(|p| p.info.name == l));
    let Some(best) = ranked.first() else {
        return match leader {
            Some(leader) => LeaseAction::Resign(leader.to_owned()),
            None => LeaseAction::Nothing,
        };
    };
    match current {
        Some(current)
            if !(prefer_newest_revision
                && best.info.replica_set.revision > current.info.replica_set.revision) =>
        {
            LeaseAction::Extend(current.info.name.clone())
        }
        _ => LeaseAction::Handover(best.info.name.clone()),
    }
}

/// One change of the leader label on one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelMove {
    /// Remove the label from this pod.
    Remove(String),
    /// Set the label to "true" on this pod.
    Add(String),
}

/// The label changes that leave `"true"` on exactly the leader pod, removals first: a Service
/// selecting the label must never see two leaders, so the old one loses it before the new one
/// gets it. Pods carrying the label with another value are cleaned up too.
pub fn label_moves(pods: &[PodState], leader: Option<&str>) -> Vec<LabelMove> {
    let mut moves: Vec<LabelMove> = pods
        .iter()
        .filter(|p| p.leader_label.is_some() && Some(p.info.name.as_str()) != leader)
        .map(|p| LabelMove::Remove(p.info.name.clone()))
        .collect();
    if let Some(leader) = leader
        && let Some(pod) = pods.iter().find(|p| p.info.name == leader)
        && pod.leader_label.as_deref() != Some("true")
    {
        moves.push(LabelMove::Add(leader.to_owned()));
    }
    moves
}

/// Elections that map to the same lease (kind, election name) as `election`, other than itself.
/// The oldest of a group (creation time, then namespace/name) owns the lease; the others report
/// a `Conflict` and do not act on it.
pub fn conflicting<'a>(election: &Election, all: &'a [impl Borrow<Election>]) -> Vec<&'a Election> {
    let key = (&election.spec.kind, election.lease_name());
    all.iter()
        .map(Borrow::borrow)
        .filter(|other| other.metadata.uid != election.metadata.uid)
        .filter(|other| (&other.spec.kind, other.lease_name()) == key)
        .collect()
}

/// Whether `election` owns its lease among those it conflicts with.
pub fn owns_lease(election: &Election, conflicts: &[&Election]) -> bool {
    let rank = |e: &Election| {
        (
            e.metadata.creation_timestamp.clone().map(|t| t.0),
            e.metadata.namespace.clone(),
            e.metadata.name.clone(),
        )
    };
    conflicts.iter().all(|other| rank(election) < rank(other))
}

/// The live lease as the controller read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// Who leads.
    pub leader: String,
    /// Its fencing token.
    pub token: u64,
    /// Milliseconds until it expires unless renewed.
    pub ttl_ms: u64,
}

/// Everything the status is computed from.
pub struct Observed<'a> {
    /// The Election.
    pub election: &'a Election,
    /// The lease, if the store answered (`Ok(None)`: nobody leads).
    pub lease: Result<Option<LeaseView>, String>,
    /// The Deployment's pods (empty without a Deployment).
    pub pods: &'a [PodState],
    /// Why the pods could not be read, if they could not.
    pub pods_error: Option<String>,
    /// Why the spec cannot be acted on, if it cannot.
    pub spec_error: Option<String>,
    /// Other Elections on the same lease.
    pub conflicts: &'a [&'a Election],
    /// Where the leader label is kept now (see [`ElectionStatus::labelled`]).
    pub labelled: Option<LabelledPods>,
    /// Now.
    pub now: Timestamp,
}

/// The status to publish. Keeps `leaderSince`, `transitions` and condition transition times from
/// the previous status where nothing changed.
pub fn status(observed: &Observed<'_>) -> ElectionStatus {
    let election = observed.election;
    let previous = election.status.clone().unwrap_or_default();
    let now = observed.now;
    let lease = observed.lease.as_ref().ok().cloned().flatten();
    // The first leader a new Election sees is where counting starts, not a transition.
    let first_sight = election.status.is_none();
    let store_error = observed.lease.as_ref().err();
    // While the store cannot be read, keep reporting what was last known about the leader.
    let (leader, token, leader_since, renew_time, expire_time, transitions) =
        match (&lease, store_error) {
            (_, Some(_)) => (
                previous.leader.clone(),
                previous.fencing_token,
                previous.leader_since.clone(),
                previous.renew_time.clone(),
                previous.expire_time.clone(),
                previous.transitions,
            ),
            (Some(lease), None) => {
                let token = i64::try_from(lease.token).unwrap_or(i64::MAX);
                let same = previous.fencing_token == Some(token)
                    && previous.leader.as_deref() == Some(&lease.leader);
                let expires = now
                    .checked_add(jiff::SignedDuration::from_millis(
                        i64::try_from(lease.ttl_ms).unwrap_or(i64::MAX),
                    ))
                    .unwrap_or(now);
                (
                    Some(lease.leader.clone()),
                    Some(token),
                    if same {
                        previous.leader_since.clone().or(Some(Time(now)))
                    } else {
                        Some(Time(now))
                    },
                    Some(Time(now)),
                    Some(Time(expires)),
                    previous.transitions + i64::from(!same && !first_sight),
                )
            }
            (None, None) => (None, None, None, None, None, previous.transitions),
        };
    let pods: Vec<CandidatePod> = observed
        .pods
        .iter()
        .map(|p| CandidatePod {
            name: p.info.name.clone(),
            ip: p.info.ip.clone(),
            phase: p.info.status.phase.clone(),
            ready: p.info.status.pod_ready,
            terminating: p.info.status.terminating,
            replica_set: p.info.replica_set.name.clone(),
            revision: p.info.replica_set.revision,
            leader: leader.as_deref() == Some(p.info.name.as_str()),
        })
        .collect();
    let mut revisions: BTreeMap<(i32, String), RevisionStatus> = BTreeMap::new();
    for p in observed.pods {
        let rs = &p.info.replica_set;
        let entry = revisions
            .entry((rs.revision, rs.name.clone()))
            .or_insert_with(|| RevisionStatus {
                replica_set: rs.name.clone(),
                revision: rs.revision,
                replicas: 0,
                ready: 0,
            });
        entry.replicas += 1;
        entry.ready += i32::from(p.is_candidate());
    }
    let has_deployment = election.spec.deployment.is_some();
    let leader_revision = pods.iter().find(|p| p.leader).map(|p| p.revision);
    let ready = has_deployment.then(|| {
        let candidates = observed.pods.iter().filter(|p| p.is_candidate()).count();
        format!("{candidates}/{}", observed.pods.len())
    });

    let generation = election.metadata.generation;
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last = previous
            .conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map(|c| c.last_transition_time.clone());
        Condition {
            type_: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: last.unwrap_or(Time(now)),
        }
    };
    let conflict = !observed.conflicts.is_empty();
    let mut conditions = vec![
        match store_error {
            None => condition(
                "StoreAvailable",
                true,
                "Reachable",
                "the lease store answered".into(),
            ),
            Some(err) => condition("StoreAvailable", false, "Unavailable", err.clone()),
        },
        match &leader {
            Some(l) => condition(
                "LeaderElected",
                true,
                "Elected",
                format!("{l} leads with fencing token {}", token.unwrap_or_default()),
            ),
            None => condition("LeaderElected", false, "NoLeader", "nobody leads".into()),
        },
    ];
    if conflict {
        let names: Vec<String> = observed
            .conflicts
            .iter()
            .map(|e| {
                format!(
                    "{}/{}",
                    e.metadata.namespace.as_deref().unwrap_or_default(),
                    e.metadata.name.as_deref().unwrap_or_default()
                )
            })
            .collect();
        conditions.push(condition(
            "Conflict",
            true,
            "SameLease",
            format!(
                "lease {}/{} is also claimed by {}",
                election.spec.kind,
                election.lease_name(),
                names.join(", ")
            ),
        ));
    }
    let (ready_ok, reason, message) = if let Some(err) = &observed.spec_error {
        (false, "InvalidSpec", err.clone())
    } else if let Some(err) = store_error {
        (false, "StoreUnavailable", err.clone())
    } else if let Some(err) = &observed.pods_error {
        (false, "PodsUnavailable", err.clone())
    } else if conflict && election.spec.managed && !owns_lease(election, observed.conflicts) {
        (
            false,
            "Conflict",
            "another Election manages the same lease".into(),
        )
    } else {
        (true, "Reconciled", "the election is reconciled".into())
    };
    conditions.insert(0, condition("Ready", ready_ok, reason, message));

    ElectionStatus {
        leader,
        fencing_token: token,
        leader_since,
        renew_time,
        expire_time,
        transitions,
        leader_revision,
        ready,
        pods,
        revisions: revisions.into_values().collect(),
        conditions,
        observed_generation: generation,
        labelled: observed.labelled.clone(),
    }
}

/// Whether publishing `next` over `current` would tell a reader anything new. Renewal times
/// alone do not count — every renewal would otherwise be a status write — unless the published
/// expiry has already passed (then the status would claim an expired lease).
pub fn worth_writing(
    current: Option<&ElectionStatus>,
    next: &ElectionStatus,
    now: Timestamp,
) -> bool {
    let Some(current) = current else {
        return true;
    };
    let without_times = |s: &ElectionStatus| ElectionStatus {
        renew_time: None,
        expire_time: None,
        ..s.clone()
    };
    if without_times(current) != without_times(next) {
        return true;
    }
    let stale = current.expire_time.as_ref().is_some_and(|t| t.0 <= now);
    stale && next.expire_time.is_some()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::discovery::mapping::{PodStatusInfo, ReplicaSetInfo};
    use crate::operator::crd::ElectionSpec;

    fn pod(name: &str, revision: i32, age_s: i64, ready: bool, terminating: bool) -> PodState {
        PodState {
            info: PodInfo {
                name: name.into(),
                deployment: "web".into(),
                ip: format!("10.0.0.{revision}"),
                status: PodStatusInfo {
                    phase: "Running".into(),
                    pod_ready: ready,
                    terminating,
                    ..Default::default()
                },
                replica_set: ReplicaSetInfo {
                    name: format!("web-{revision}"),
                    revision,
                    ..Default::default()
                },
            },
            created: Some(Timestamp::from_second(1_000_000 - age_s).unwrap()),
            leader_label: None,
        }
    }

    fn labelled(mut pod: PodState, value: &str) -> PodState {
        pod.leader_label = Some(value.into());
        pod
    }

    fn election(name: &str, lease: Option<&str>, created_s: i64) -> Election {
        let mut e = Election::new(
            name,
            ElectionSpec {
                kind: "default".into(),
                election: lease.map(Into::into),
                term: "15s".into(),
                deployment: Some("web".into()),
                managed: true,
                leader_label: "election-agent.io/leader".into(),
                prefer_newest_revision: true,
            },
        );
        e.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(format!("{name}-uid")),
            generation: Some(3),
            creation_timestamp: Some(Time(Timestamp::from_second(created_s).unwrap())),
            ..Default::default()
        };
        e
    }

    fn names(pods: Vec<&PodState>) -> Vec<&str> {
        pods.into_iter().map(|p| p.info.name.as_str()).collect()
    }

    #[test]
    fn candidates_are_ready_live_pods_newest_revision_first_then_oldest() {
        let pods = [
            pod("old-young", 1, 10, true, false),
            pod("old-old", 1, 100, true, false),
            pod("new-young", 2, 5, true, false),
            pod("new-old", 2, 50, true, false),
            pod("new-unready", 2, 500, false, false),
            pod("new-terminating", 2, 600, true, true),
        ];
        assert_eq!(
            names(ranked_candidates(&pods, true)),
            ["new-old", "new-young", "old-old", "old-young"]
        );
        assert_eq!(
            names(ranked_candidates(&pods, false)),
            ["old-old", "new-old", "old-young", "new-young"]
        );
    }

    #[test]
    fn managed_mode_keeps_a_good_leader_and_moves_away_from_a_bad_one() {
        use LeaseAction::*;
        let steady = [pod("a", 1, 100, true, false), pod("b", 1, 50, true, false)];
        let rolling = [
            pod("a", 1, 100, true, true),
            pod("b", 1, 50, true, false),
            pod("c", 2, 5, true, false),
        ];
        let new_not_ready = [pod("a", 1, 100, true, false), pod("c", 2, 5, false, false)];
        let none_ready = [pod("a", 1, 100, false, false)];
        type Case<'a> = (&'a str, Option<&'a str>, &'a [PodState], bool, LeaseAction);
        let cases: [Case; 9] = [
            (
                "nobody leads: the best",
                None,
                &steady,
                true,
                Handover("a".into()),
            ),
            (
                "a good leader is kept",
                Some("b"),
                &steady,
                true,
                Extend("b".into()),
            ),
            (
                "leader terminating",
                Some("a"),
                &rolling,
                true,
                Handover("c".into()),
            ),
            (
                "newer revision preferred",
                Some("b"),
                &rolling,
                true,
                Handover("c".into()),
            ),
            (
                "no preference: kept",
                Some("b"),
                &rolling,
                false,
                Extend("b".into()),
            ),
            (
                "leader gone",
                Some("zed"),
                &steady,
                true,
                Handover("a".into()),
            ),
            (
                "new revision not ready yet",
                Some("a"),
                &new_not_ready,
                true,
                Extend("a".into()),
            ),
            (
                "nobody can lead",
                Some("a"),
                &none_ready,
                true,
                Resign("a".into()),
            ),
            ("nobody leads or can", None, &none_ready, true, Nothing),
        ];
        for (story, leader, pods, prefer, expected) in cases {
            assert_eq!(lease_action(leader, pods, prefer), expected, "{story}");
        }
    }

    #[test]
    fn the_label_leaves_the_old_leader_before_it_reaches_the_new_one() {
        use LabelMove::*;
        let pods = [
            labelled(pod("a", 1, 100, true, true), "true"),
            pod("b", 2, 10, true, false),
            labelled(pod("c", 2, 5, true, false), "false"),
        ];
        assert_eq!(
            label_moves(&pods, Some("b")),
            [Remove("a".into()), Remove("c".into()), Add("b".into())]
        );
        let settled = [
            labelled(pod("b", 2, 10, true, false), "true"),
            pod("c", 2, 5, true, false),
        ];
        assert_eq!(label_moves(&settled, Some("b")), []);
        assert_eq!(label_moves(&settled, None), [Remove("b".into())]);
        assert_eq!(
            label_moves(&pods[..2], Some("gone")),
            [Remove("a".into())],
            "a leader that is not a pod of the Deployment gets no label"
        );
    }

    #[test]
    fn two_elections_on_one_lease_conflict_and_the_oldest_owns_it() {
        let first = election("first", Some("jobs"), 100);
        let second = election("second", Some("jobs"), 200);
        let other = election("jobs", None, 50);
        let unrelated = election("unrelated", None, 10);
        let all = [
            first.clone(),
            second.clone(),
            other.clone(),
            unrelated.clone(),
        ];
        let conflicts = conflicting(&second, &all);
        let names: Vec<_> = conflicts
            .iter()
            .map(|e| e.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["first", "jobs"],
            "the object name is the default lease name"
        );
        assert!(!owns_lease(&second, &conflicts));
        assert!(owns_lease(&other, &conflicting(&other, &all)));
        assert!(conflicting(&unrelated, &all).is_empty());
    }

    #[test]
    fn status_reports_leader_pods_revisions_and_conditions() {
        let mut e = election("jobs", None, 100);
        let now = Timestamp::from_second(2_000_000).unwrap();
        let pods = [
            pod("a", 1, 100, true, true),
            pod("b", 2, 50, true, false),
            pod("c", 2, 5, false, false),
        ];
        let observed = Observed {
            election: &e,
            lease: Ok(Some(LeaseView {
                leader: "b".into(),
                token: 7,
                ttl_ms: 15_000,
            })),
            pods: &pods,
            pods_error: None,
            spec_error: None,
            conflicts: &[],
            labelled: None,
            now,
        };
        let s = status(&observed);
        assert_eq!(s.leader.as_deref(), Some("b"));
        assert_eq!(s.fencing_token, Some(7));
        assert_eq!(s.leader_revision, Some(2));
        assert_eq!(s.ready.as_deref(), Some("1/3"));
        assert_eq!(s.leader_since, Some(Time(now)));
        assert_eq!(
            s.expire_time,
            Some(Time(now + jiff::SignedDuration::from_secs(15)))
        );
        assert_eq!(
            s.transitions, 0,
            "the first leader seen is not a transition"
        );
        assert_eq!(s.observed_generation, Some(3));
        let leaders: Vec<_> = s
            .pods
            .iter()
            .filter(|p| p.leader)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(leaders, ["b"]);
        assert_eq!(
            s.revisions,
            [
                RevisionStatus {
                    replica_set: "web-1".into(),
                    revision: 1,
                    replicas: 1,
                    ready: 0
                },
                RevisionStatus {
                    replica_set: "web-2".into(),
                    revision: 2,
                    replicas: 2,
                    ready: 1
                },
            ]
        );
        let conditions: Vec<_> = s
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            conditions,
            [
                ("Ready", "True"),
                ("StoreAvailable", "True"),
                ("LeaderElected", "True")
            ]
        );

        // Same leader a little later: nothing worth a write but the renewal.
        e.status = Some(s.clone());
        let later = now + jiff::SignedDuration::from_secs(5);
        let again = status(&Observed {
            election: &e,
            now: later,
            ..observed_with(&e, &pods, "b", 7)
        });
        assert_eq!(again.leader_since, s.leader_since);
        assert_eq!(again.conditions, s.conditions, "transition times kept");
        assert!(!worth_writing(Some(&s), &again, later));
        assert!(worth_writing(
            Some(&s),
            &again,
            now + jiff::SignedDuration::from_secs(16)
        ));

        // A new leader: a transition, a new leaderSince.
        let moved = status(&Observed {
            election: &e,
            now: later,
            ..observed_with(&e, &pods, "a", 8)
        });
        assert_eq!(moved.transitions, 1);
        assert_eq!(moved.leader_since, Some(Time(later)));
        assert!(worth_writing(Some(&s), &moved, later));
    }

    fn observed_with<'a>(
        e: &'a Election,
        pods: &'a [PodState],
        leader: &str,
        token: u64,
    ) -> Observed<'a> {
        Observed {
            election: e,
            lease: Ok(Some(LeaseView {
                leader: leader.into(),
                token,
                ttl_ms: 15_000,
            })),
            pods,
            pods_error: None,
            spec_error: None,
            conflicts: &[],
            labelled: None,
            now: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn an_unreachable_store_keeps_the_last_known_leader_and_says_why() {
        let mut e = election("jobs", None, 100);
        let pods = [pod("b", 2, 50, true, false)];
        let known = status(&observed_with(&e, &pods, "b", 7));
        e.status = Some(known.clone());
        let s = status(&Observed {
            lease: Err("no quorum".into()),
            ..observed_with(&e, &pods, "b", 7)
        });
        assert_eq!((s.leader.as_deref(), s.fencing_token), (Some("b"), Some(7)));
        let find = |kind: &str| s.conditions.iter().find(|c| c.type_ == kind).unwrap();
        assert_eq!(find("StoreAvailable").status, "False");
        assert_eq!(find("StoreAvailable").message, "no quorum");
        assert_eq!(
            (find("Ready").status.as_str(), find("Ready").reason.as_str()),
            ("False", "StoreUnavailable")
        );
    }

    #[test]
    fn a_conflict_is_reported_on_both_and_blocks_the_younger_managed_one() {
        let first = election("first", Some("jobs"), 100);
        let second = election("second", Some("jobs"), 200);
        let all = [first.clone(), second.clone()];
        for (e, ready) in [(&first, "True"), (&second, "False")] {
            let conflicts = conflicting(e, &all);
            let s = status(&Observed {
                election: e,
                lease: Ok(None),
                pods: &[],
                pods_error: None,
                spec_error: None,
                conflicts: &conflicts,
                labelled: None,
                now: Timestamp::UNIX_EPOCH,
            });
            let find = |kind: &str| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == kind)
                    .unwrap()
                    .clone()
            };
            assert_eq!(find("Conflict").status, "True");
            assert!(
                find("Conflict")
                    .message
                    .contains("lease default/jobs is also claimed by shop/")
            );
            assert_eq!(find("Ready").status, ready, "{:?}", e.metadata.name);
        }
    }
}

//! One reconcile of an Election: read (lease from the store, pods from the shared discovery
//! caches, other Elections from the controller's cache) → decide ([`plan`], pure) → act (lease
//! command, label moves, status by server-side apply, events), behind the finalizer that lets
//! the lease and the label be given up before the Election goes. Every write first asks whether
//! this process still holds the controller lease ([`Leading::check`](super::Leading::check)).

use std::{sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        finalizer::{self, finalizer},
    },
};
use serde_json::json;

use super::{
    Context, FIELD_MANAGER, FINALIZER, OperatorError,
    crd::{Election, ElectionStatus, term_ms},
    labels,
    plan::{self, LeaseAction, LeaseView, Observed, PodState},
};
use crate::{
    election::{ElectionError, election_key},
    lease::{ElectionKey, Expected, FencingToken, Name, Term},
};

/// Reconciles one Election (a free function wrapping the finalizer, as kube-runtime expects).
pub async fn reconcile(
    election: Arc<Election>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    // Not even the finalizer is added by a controller that may have been replaced.
    ctx.leading.check()?;
    let namespace = election.namespace().unwrap_or_default();
    let api: Api<Election> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, election, |event| async {
        match event {
            finalizer::Event::Apply(election) => apply(&election, &ctx).await,
            finalizer::Event::Cleanup(election) => cleanup(&election, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => OperatorError::Finalizer(Box::new(other)),
    });
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let managed = ctx
        .elections
        .state()
        .iter()
        .filter(|e| e.spec.managed)
        .count();
    ctx.metrics
        .managed
        .set(i64::try_from(managed).unwrap_or(i64::MAX));
    result
}

/// The longest note of a Warning Event (the API server refuses more than 1 KiB).
const EVENT_NOTE_MAX: usize = 1_000;

/// Short, jittered backoff: leases are measured in seconds, so errors are retried in about one.
/// The error is also recorded as a Warning Event on the Election (`kubectl describe` shows it),
/// unless it is that this process no longer holds the controller lease.
pub fn error_policy(election: Arc<Election>, err: &OperatorError, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.with_label_values(&[err.label()]).inc();
    tracing::warn!(election = %election.name_any(), namespace = ?election.namespace(), error = %err, "reconcile failed; retrying");
    if ctx.leading.check().is_ok() {
        let mut note = err.to_string();
        if note.len() > EVENT_NOTE_MAX {
            let mut end = EVENT_NOTE_MAX;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "ReconcileFailed".into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        let reference = election.object_ref(&());
        tokio::spawn(async move {
            if let Err(err) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %err, "cannot record a Kubernetes Event");
            }
        });
    }
    Action::requeue(Duration::from_millis(500 + fastrand::u64(0..1_000)))
}

/// What `apply` read about an Election before deciding.
struct Reading {
    pods: Vec<PodState>,
    pods_error: Option<String>,
}

fn read_pods(election: &Election, ctx: &Context) -> Reading {
    let Some(deployment) = &election.spec.deployment else {
        return Reading {
            pods: Vec::new(),
            pods_error: None,
        };
    };
    let namespace = election.namespace().unwrap_or_default();
    let Some(discovery) = ctx.service.discovery() else {
        return Reading {
            pods: Vec::new(),
            pods_error: Some("Kubernetes discovery is off".into()),
        };
    };
    match discovery.pod_objects(&namespace, deployment, "") {
        Ok(found) => Reading {
            pods: found
                .into_iter()
                .map(|(info, pod)| PodState {
                    info,
                    created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    leader_label: pod.labels().get(&election.spec.leader_label).cloned(),
                })
                .collect(),
            pods_error: None,
        },
        Err(err) => Reading {
            pods: Vec::new(),
            pods_error: Some(err.to_string()),
        },
    }
}

/// The live lease, `Ok(None)` when nobody leads, `Err` when the store cannot say.
async fn read_lease(key: &ElectionKey, ctx: &Context) -> Result<Option<LeaseView>, String> {
    ctx.metrics.command("read");
    match ctx.service.leases().leader(key).await {
        Ok(info) => Ok(Some(LeaseView {
            leader: info.leader.as_str().to_owned(),
            token: info.token.0,
            ttl_ms: info.ttl_ms,
        })),
        Err(ElectionError::NoLeader { .. }) => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// The lease an Election keeps, as the store names it — or why the spec names none.
fn lease_key(election: &Election) -> Result<ElectionKey, String> {
    election_key(&election.spec.kind, &election.lease_name()).map_err(|err| format!("spec: {err}"))
}

/// The Election's term, within the agent's bounds — or why it is not.
fn lease_term(election: &Election, ctx: &Context) -> Result<Term, String> {
    let term_ms = term_ms(&election.spec.term).ok_or_else(|| {
        format!(
            "term {:?} is not a duration such as 15s",
            election.spec.term
        )
    })?;
    ctx.service
        .term("term", term_ms)
        .map_err(|err| format!("spec: {err}"))
}

async fn apply(election: &Election, ctx: &Context) -> Result<Action, OperatorError> {
    let namespace = election.namespace().unwrap_or_default();
    let key = lease_key(election);
    let term = lease_term(election, ctx);
    let mut spec_error = match (&key, &term) {
        (Err(err), _) | (_, Err(err)) => Some(err.clone()),
        _ if election.spec.managed && election.spec.deployment.is_none() => {
            Some("managed mode needs spec.deployment".into())
        }
        _ => None,
    };
    let all = ctx.elections.state();
    let conflicts = plan::conflicting(election, &all);
    let Reading { pods, pods_error } = read_pods(election, ctx);

    // Managed mode: decide and act on the lease, then on the labels.
    let acts = election.spec.managed
        && spec_error.is_none()
        && pods_error.is_none()
        && plan::owns_lease(election, &conflicts);
    let mut action_error = None;
    let mut lease = match &key {
        Ok(key) => read_lease(key, ctx).await,
        Err(err) => Err(err.clone()),
    };
    if acts && let (Ok(key), Ok(term), Ok(current)) = (&key, &term, &lease) {
        let (key, term) = (key, *term);
        let leader = current.as_ref().map(|l| l.leader.as_str());
        let decided = plan::lease_action(leader, &pods, election.spec.prefer_newest_revision);
        // The command's answer says what the lease is now: no second read of the store.
        let leading = |pod: &Name, token: FencingToken| {
            Some(LeaseView {
                leader: pod.as_str().to_owned(),
                token: token.0,
                ttl_ms: term.as_millis(),
            })
        };
        let leases = ctx.service.leases();
        let parse_pod = |pod: &str| Name::parse("pod", pod).map_err(ElectionError::from);
        if let Some(command) = decided.command() {
            ctx.leading.check()?;
            ctx.metrics.command(command);
        }
        let done = async {
            match &decided {
                LeaseAction::Extend(name) => {
                    let pod = parse_pod(name)?;
                    let token = leases.extend(key, &pod, term).await?;
                    Ok(leading(&pod, token))
                }
                LeaseAction::Handover(name) => {
                    let pod = parse_pod(name)?;
                    // Only over the lease decided on: if it moved meanwhile, read it again.
                    let expected = Expected {
                        leader: current
                            .as_ref()
                            .map(|lease| parse_pod(&lease.leader))
                            .transpose()?,
                        token: current.as_ref().map(|lease| FencingToken(lease.token)),
                    };
                    let token = leases.handover(key, &pod, term, expected).await?;
                    Ok(leading(&pod, token))
                }
                LeaseAction::Resign(name) => {
                    leases.resign(key, &parse_pod(name)?).await.map(|()| None)
                }
                LeaseAction::Nothing => Ok(current.clone()),
            }
        }
        .await;
        match done {
            Ok(now) => lease = Ok(now),
            // Someone else changed the lease in between: read what it is now (the change also
            // triggers a new round).
            Err(
                ElectionError::HeldByOther { .. }
                | ElectionError::NoLeader { .. }
                | ElectionError::NotAsExpected { .. },
            ) => {
                lease = read_lease(key, ctx).await;
            }
            // Nothing to retry until the spec (or the pod) changes.
            Err(ElectionError::InvalidArgument(err)) => spec_error = Some(err.to_string()),
            Err(err) => action_error = Some(err),
        }
    }

    // The label goes where the spec says now: off the pods it was on when that changed, then
    // on the leader pod.
    let target = labels::target(election).filter(|_| spec_error.is_none());
    let mut labelled = election.status.as_ref().and_then(|s| s.labelled.clone());
    if let Some(previous) = &labelled
        && Some(previous) != target.as_ref()
    {
        labels::take_off(election, ctx, &namespace, previous).await?;
        labelled = None;
    }
    if acts && let Ok(lease) = &lease {
        let leader = lease.as_ref().map(|l| l.leader.as_str());
        labels::settle(election, ctx, &namespace, &pods, leader).await?;
        labelled = target;
    }
    let now = Timestamp::now();
    let status = plan::status(&Observed {
        election,
        lease: lease.clone(),
        pods: &pods,
        pods_error,
        spec_error,
        conflicts: &conflicts,
        labelled,
        now,
    });
    publish(election, ctx, &namespace, status, now).await?;
    if let Some(err) = action_error {
        return Err(err.into());
    }

    // Managed leases are renewed every third of their term; otherwise look again when the
    // lease would expire (expiry is not announced), and at least every five minutes.
    let requeue = match (&lease, term) {
        (_, Ok(term)) if acts => Duration::from_millis((term.as_millis() / 3).max(200)),
        (Ok(Some(lease)), _) => Duration::from_millis(lease.ttl_ms + 50),
        _ => Duration::from_secs(300),
    };
    Ok(Action::requeue(requeue.min(Duration::from_secs(300))))
}

/// Applies the status when it tells something new, and records a leader change as an Event.
async fn publish(
    election: &Election,
    ctx: &Context,
    namespace: &str,
    status: ElectionStatus,
    now: Timestamp,
) -> Result<(), OperatorError> {
    // What the controller saw, whether or not it is new enough to write.
    ctx.metrics.observe_election(election, &status);
    let previous = election.status.as_ref();
    if !plan::worth_writing(previous, &status, now) {
        return Ok(());
    }
    ctx.leading.check()?;
    let api: Api<Election> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": Election::api_version(&()),
        "kind": Election::kind(&()),
        "status": status,
    });
    api.patch_status(
        &election.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;

    let before = previous.and_then(|s| s.leader.clone());
    if before != status.leader && (previous.is_some() || status.leader.is_some()) {
        ctx.metrics.leader_changed(election);
        let (reason, note) = match &status.leader {
            Some(leader) => (
                "LeaderElected",
                format!(
                    "{leader} leads with fencing token {}",
                    status.fencing_token.unwrap_or_default()
                ),
            ),
            None => ("NoLeader", "nobody leads".to_owned()),
        };
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event is a courtesy: failing to record one does not fail the reconcile.
        if let Err(err) = ctx
            .recorder
            .publish(&event, &election.object_ref(&()))
            .await
        {
            tracing::warn!(error = %err, "cannot record a Kubernetes Event");
        }
    }
    Ok(())
}

/// How often cleanup reads and resigns a lease that keeps moving before it tries again later.
const RESIGN_ATTEMPTS: usize = 5;

/// Before the Election goes: take the leader label off the pods it was put on (where the status
/// says, and where the spec says), then give up its lease (unless another Election owns that
/// lease). The finalizer is removed only once both are done: when the caches cannot say which
/// pods belong to the Deployment, or the store fails, the reconcile fails and is retried.
async fn cleanup(election: &Election, ctx: &Context) -> Result<Action, OperatorError> {
    let namespace = election.namespace().unwrap_or_default();
    let previous = election.status.as_ref().and_then(|s| s.labelled.clone());
    let current = labels::target(election).filter(|now| previous.as_ref() != Some(now));
    for labelled in previous.iter().chain(&current) {
        labels::take_off(election, ctx, &namespace, labelled).await?;
    }
    let all = ctx.elections.state();
    let conflicts = plan::conflicting(election, &all);
    if plan::owns_lease(election, &conflicts)
        && let Ok(key) = lease_key(election)
    {
        resign_whoever_leads(&key, ctx).await?;
    }
    // The finalizer is removed next.
    ctx.leading.check()?;
    ctx.metrics.forget_election(election);
    Ok(Action::await_change())
}

/// Ends the lease of `key`, whoever holds it: resigns the holder it read, and reads again if the
/// lease moved in between (a resign names its holder, so it never ends a lease it did not read).
async fn resign_whoever_leads(key: &ElectionKey, ctx: &Context) -> Result<(), OperatorError> {
    let leases = ctx.service.leases();
    for _ in 0..RESIGN_ATTEMPTS {
        ctx.metrics.command("read");
        let holder = match leases.leader(key).await {
            Ok(info) => info.leader,
            Err(ElectionError::NoLeader { .. }) => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        ctx.leading.check()?;
        ctx.metrics.command("resign");
        match leases.resign(key, &holder).await {
            Ok(()) => return Ok(()),
            Err(ElectionError::NotLeader { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Err(OperatorError::NotReady(format!(
        "the lease of {key} moved each of {RESIGN_ATTEMPTS} times it was given up"
    )))
}

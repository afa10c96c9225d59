//! The `Election` operator: a kube-runtime controller, in the same process as the API, that keeps
//! each Election's lease in the store and its status on the object — and in managed mode elects
//! among a Deployment's pods itself and labels the leader pod.
//!
//! Reconciling is a pipeline of small steps: read (lease from the store, pods from the shared
//! discovery caches, other Elections from the controller's cache) → decide ([`plan`], pure) →
//! act (lease command, label moves, status by server-side apply, events). It is triggered by
//! changes of the Election, by pod/ReplicaSet/Deployment changes in its namespace, and by lease
//! changes from any agent replica, and requeued to renew managed leases.
//!
//! With several agent replicas, exactly one runs the controller: they campaign for the lease
//! `election-agent.io/controller` in the agent's own store ([`run`]).

pub mod crd;
pub mod plan;

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{self, finalizer},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::json;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;

use self::{
    crd::{Election, ElectionStatus, term_ms},
    plan::{LabelMove, LeaseAction, LeaseView, Observed, PodState},
};
use crate::{
    election::{CONTROLLER_KIND, ElectionError, ElectionService, election_key},
    lease::{ElectionKey, FencingToken, Name, Term},
    store::StoreEvent,
};

/// The finalizer that lets the controller give up an Election's lease before it is deleted.
pub const FINALIZER: &str = "election-agent.io/lease";
/// The field manager of the status the controller applies.
const FIELD_MANAGER: &str = "election-agent";
/// The election (of kind [`CONTROLLER_KIND`]) the agent replicas campaign for to run the
/// controller.
const CONTROLLER_ELECTION: &str = "controller";
/// How long the controller waits for more triggers of the same Election before reconciling.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The lease store failed a command.
    #[error("lease store: {0}")]
    Store(#[from] ElectionError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<OperatorError>>),
    /// What the step needs is not there yet (caches not synced, a lease that keeps moving).
    #[error("not ready: {0}")]
    NotReady(String),
}

impl OperatorError {
    /// The `error` label of the reconcile error metric.
    fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Store(_) => "store",
            Self::Finalizer(_) => "finalizer",
            Self::NotReady(_) => "not_ready",
        }
    }
}

/// The controller's metrics (reconciles, errors, durations, leader changes, elections managed),
/// registered with the agent's.
#[derive(Clone)]
pub struct OperatorMetrics {
    reconciles: IntCounter,
    errors: IntCounterVec,
    duration: Histogram,
    leader_changes: IntCounterVec,
    managed: IntGauge,
    lease_commands: IntCounterVec,
}

impl OperatorMetrics {
    /// Registers the controller's metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            reconciles: IntCounter::new(
                "election_agent_controller_reconciles_total",
                "Reconciles of Election objects.",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "election_agent_controller_reconcile_errors_total",
                    "Failed reconciles, by error (kube|store|finalizer|not_ready).",
                ),
                &["error"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "election_agent_controller_reconcile_duration_seconds",
                    "Duration of reconciles in seconds.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )?,
            leader_changes: IntCounterVec::new(
                Opts::new(
                    "election_agent_controller_leader_changes_total",
                    "Leader changes the controller saw, by election kind.",
                ),
                &["kind"],
            )?,
            managed: IntGauge::new(
                "election_agent_controller_elections_managed",
                "Elections in managed mode that this controller keeps.",
            )?,
            lease_commands: IntCounterVec::new(
                Opts::new(
                    "election_agent_controller_lease_commands_total",
                    "Lease store commands of the controller (its own lease and the Elections'), \
                     by command (campaign|extend|handover|resign|read); they are not client \
                     requests, so election_agent_request_duration_seconds leaves them out.",
                ),
                &["command"],
            )?,
        };
        registry.register(Box::new(metrics.reconciles.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.leader_changes.clone()))?;
        registry.register(Box::new(metrics.managed.clone()))?;
        registry.register(Box::new(metrics.lease_commands.clone()))?;
        Ok(metrics)
    }

    /// Counts one lease store command of the controller.
    fn command(&self, command: &str) {
        self.lease_commands.with_label_values(&[command]).inc();
    }
}

/// What every reconcile gets.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The election service (lease store and discovery caches).
    pub service: ElectionService,
    /// Every Election the controller watches (for conflict detection).
    pub elections: Store<Election>,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The controller's metrics.
    pub metrics: OperatorMetrics,
}

/// Runs the controller — over the Elections of `namespace`, or of the whole cluster — while this
/// agent holds the controller lease, until `shutdown`: campaigns every third of `term`, renews while leading, and stops the controller (and lets another
/// replica take over within one term) when renewal fails.
pub async fn run(
    client: Client,
    service: ElectionService,
    metrics: OperatorMetrics,
    identity: Name,
    namespace: Option<String>,
    term: Term,
    shutdown: CancellationToken,
) {
    let key = controller_lease();
    let leases = service.leases();
    let beat = Duration::from_millis(term.as_millis()) / 3;
    while !shutdown.is_cancelled() {
        metrics.command("campaign");
        match leases.campaign(&key, &identity, term).await {
            Ok(won) if won.elected => {
                tracing::info!(%identity, "leading: running the Election controller");
                let leading = shutdown.child_token();
                let controller = tokio::spawn(run_controller(
                    client.clone(),
                    service.clone(),
                    metrics.clone(),
                    identity.to_string(),
                    namespace.clone(),
                    leading.clone(),
                ));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(beat) => {}
                    }
                    metrics.command("extend");
                    if let Err(err) = leases.extend(&key, &identity, term).await {
                        tracing::warn!(%identity, error = %err, "lost the controller lease: stopping the controller");
                        break;
                    }
                }
                leading.cancel();
                let _ = controller.await;
                if shutdown.is_cancelled() {
                    // Let another replica take over at once rather than after the term.
                    metrics.command("resign");
                    let _ = leases.resign(&key, &identity).await;
                    return;
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot campaign for the controller lease"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(beat) => {}
        }
    }
}

/// The lease the agent replicas campaign for to run the controller, of a kind the public API
/// refuses.
pub fn controller_lease() -> ElectionKey {
    ElectionKey {
        kind: Name::parse("kind", CONTROLLER_KIND).expect("a valid kind"),
        election: Name::parse("election", CONTROLLER_ELECTION).expect("a valid name"),
    }
}

/// The controller itself, over the Elections of `namespace` (all when `None`), until `stop`.
async fn run_controller(
    client: Client,
    service: ElectionService,
    metrics: OperatorMetrics,
    identity: String,
    namespace: Option<String>,
    stop: CancellationToken,
) {
    let elections: Api<Election> = match &namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    // A short debounce folds the bursts of pod events of a rolling update into one reconcile,
    // well inside the one second a leader change may take to show.
    let controller = Controller::new(elections, watcher::Config::default().any_semantic())
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE));
    let store = controller.store();
    let triggers = triggers(&service, store.clone());
    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "election-agent".into(),
                instance: Some(identity),
            },
        ),
        client,
        service,
        elections: store.clone(),
        metrics,
    });
    let graceful = stop.clone();
    let running = controller
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move { graceful.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile");
            }
        });
    // A controller whose cache never filled (no CRD installed, no API server) ran no reconcile,
    // and kube-runtime would wait for that cache forever before it stops: drop it at once.
    let never_synced = async {
        stop.cancelled().await;
        if store.wait_until_ready().now_or_never().is_none() {
            return;
        }
        futures::future::pending::<()>().await;
    };
    tokio::select! {
        () = running => {}
        () = never_synced => tracing::info!("Election controller stopped before its cache synced"),
    }
}

/// The Elections to reconcile when a lease changes (those on that lease) or when pods,
/// ReplicaSets or Deployments of a namespace change (those there with a Deployment). When the
/// notifications lag, every Election is reconciled.
fn triggers(
    service: &ElectionService,
    elections: Store<Election>,
) -> impl futures::Stream<Item = ObjectRef<Election>> + Send + 'static {
    let all = {
        let elections = elections.clone();
        move || {
            elections
                .state()
                .iter()
                .map(|e| ObjectRef::from_obj(&**e))
                .collect::<Vec<_>>()
        }
    };
    let leases = {
        let (elections, all) = (elections.clone(), all.clone());
        BroadcastStream::new(service.lease_changes()).map(move |event| match event {
            Ok(StoreEvent::Changed(change)) => elections
                .state()
                .iter()
                .filter(|e| {
                    e.spec.kind == change.election.kind.as_str()
                        && e.lease_name() == change.election.election.as_str()
                })
                .map(|e| ObjectRef::from_obj(&**e))
                .collect(),
            // Changes may have been missed: look at every Election again.
            Ok(StoreEvent::Resync) | Err(BroadcastStreamRecvError::Lagged(_)) => all(),
        })
    };
    let pods = match service.discovery() {
        Some(discovery) => BroadcastStream::new(discovery.changes())
            .map(move |change| match change {
                Ok(namespace) => elections
                    .state()
                    .iter()
                    .filter(|e| e.spec.deployment.is_some())
                    .filter(|e| e.namespace().as_deref() == Some(namespace.as_str()))
                    .map(|e| ObjectRef::from_obj(&**e))
                    .collect(),
                Err(BroadcastStreamRecvError::Lagged(_)) => all(),
            })
            .boxed(),
        None => stream::empty().boxed(),
    };
    stream::select(leases, pods).flat_map(stream::iter)
}

/// Reconciles one Election (a free function wrapping the finalizer, as kube-runtime expects).
pub async fn reconcile(
    election: Arc<Election>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
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

/// Short, jittered backoff: leases are measured in seconds, so errors are retried in about one.
pub fn error_policy(election: Arc<Election>, err: &OperatorError, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.with_label_values(&[err.label()]).inc();
    tracing::warn!(election = %election.name_any(), namespace = ?election.namespace(), error = %err, "reconcile failed; retrying");
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
        let pod = |pod: &str| Name::parse("pod", pod).map_err(ElectionError::from);
        if let Some(command) = decided.command() {
            ctx.metrics.command(command);
        }
        let done = async {
            match &decided {
                LeaseAction::Extend(name) => {
                    let pod = pod(name)?;
                    let token = leases.extend(key, &pod, term).await?;
                    Ok(leading(&pod, token))
                }
                LeaseAction::Handover(name) => {
                    let pod = pod(name)?;
                    let token = leases.handover(key, &pod, term).await?;
                    Ok(leading(&pod, token))
                }
                LeaseAction::Resign(name) => leases.resign(key, &pod(name)?).await.map(|()| None),
                LeaseAction::Nothing => Ok(current.clone()),
            }
        }
        .await;
        match done {
            Ok(now) => lease = Ok(now),
            // Someone else changed the lease in between: read what it is now (the change also
            // triggers a new round).
            Err(ElectionError::HeldByOther { .. } | ElectionError::NoLeader { .. }) => {
                lease = read_lease(key, ctx).await;
            }
            // Nothing to retry until the spec (or the pod) changes.
            Err(ElectionError::InvalidArgument(err)) => spec_error = Some(err.to_string()),
            Err(err) => action_error = Some(err),
        }
    }

    if acts && let Ok(lease) = &lease {
        let leader = lease.as_ref().map(|l| l.leader.as_str());
        move_labels(election, ctx, &namespace, &pods, leader).await?;
    }
    let now = Timestamp::now();
    let status = plan::status(&Observed {
        election,
        lease: lease.clone(),
        pods: &pods,
        pods_error,
        spec_error,
        conflicts: &conflicts,
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

/// Puts the leader label on exactly the leader pod, removing it from others first.
async fn move_labels(
    election: &Election,
    ctx: &Context,
    namespace: &str,
    pods: &[PodState],
    leader: Option<&str>,
) -> Result<(), OperatorError> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let label = &election.spec.leader_label;
    for change in plan::label_moves(pods, leader) {
        let (pod, value) = match &change {
            LabelMove::Remove(pod) => (pod, serde_json::Value::Null),
            LabelMove::Add(pod) => (pod, json!("true")),
        };
        let patch = json!({"metadata": {"labels": {label: value}}});
        match api
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // The pod is gone: nothing to label or unlabel.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Applies the status when it tells something new, and records a leader change as an Event.
async fn publish(
    election: &Election,
    ctx: &Context,
    namespace: &str,
    status: ElectionStatus,
    now: Timestamp,
) -> Result<(), OperatorError> {
    let previous = election.status.as_ref();
    if !plan::worth_writing(previous, &status, now) {
        return Ok(());
    }
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
        ctx.metrics
            .leader_changes
            .with_label_values(&[&election.spec.kind])
            .inc();
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

/// Before the Election goes: in managed mode, take the leader label off its pods; then give up
/// its lease (unless another Election owns that lease). The finalizer is removed only once both
/// are done: when the caches cannot say which pods are labelled, or the store fails, the
/// reconcile fails and is retried.
async fn cleanup(election: &Election, ctx: &Context) -> Result<Action, OperatorError> {
    if election.spec.managed {
        let namespace = election.namespace().unwrap_or_default();
        let Reading { pods, pods_error } = read_pods(election, ctx);
        if let Some(why) = pods_error {
            return Err(OperatorError::NotReady(format!(
                "cannot take the leader label off the pods yet: {why}"
            )));
        }
        move_labels(election, ctx, &namespace, &pods, None).await?;
    }
    let all = ctx.elections.state();
    let conflicts = plan::conflicting(election, &all);
    if plan::owns_lease(election, &conflicts)
        && let Ok(key) = lease_key(election)
    {
        resign_whoever_leads(&key, ctx).await?;
    }
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

#[cfg(test)]
mod tests {
    use axum::http::{Request, Response};
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
    use kube::{client::Body, runtime::reflector};
    use serde_json::Value;
    use tower_test::mock::{self, Handle};

    use super::*;
    use crate::{
        discovery::{Caches, Discovery},
        lease::TermBounds,
        metrics::Metrics,
        operator::crd::ElectionSpec,
        store::{MemoryStore, Store},
    };

    type ApiServer = Handle<Request<Body>, Response<Body>>;

    fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    fn owner(kind: &str, name: &str) -> Value {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
            "uid": format!("{name}-uid"), "controller": true}])
    }

    /// A rolling update of Deployment `web`: the leader `web-1-a` (revision 1, labelled) and
    /// `web-2-a` (revision 2, ready), `web-2-b` (revision 2, not ready yet).
    fn caches() -> Caches {
        let pod = |name: &str, rs: &str, ready: &str, labelled: bool, age: u32| {
            let mut labels = json!({"app": "web"});
            if labelled {
                labels["election-agent.io/leader"] = json!("true");
            }
            object::<Pod>(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": labels,
                    "creationTimestamp": format!("2026-01-01T00:{age:02}:00Z"),
                    "ownerReferences": owner("ReplicaSet", rs)},
                "status": {"phase": "Running", "podIP": "10.0.0.1",
                    "conditions": [{"type": "Ready", "status": ready}]}
            }))
        };
        let rs = |name: &str, revision: &str| {
            object::<ReplicaSet>(json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("{name}-uid"),
                    "annotations": {"deployment.kubernetes.io/revision": revision},
                    "ownerReferences": owner("Deployment", "web")}
            }))
        };
        let deployment = object::<Deployment>(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "web-uid"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}}}
        }));
        Caches::from_objects(
            [
                pod("web-1-a", "web-1", "True", true, 1),
                pod("web-2-a", "web-2", "True", false, 30),
                pod("web-2-b", "web-2", "False", false, 20),
            ],
            [rs("web-1", "1"), rs("web-2", "2")],
            [deployment],
        )
    }

    fn election(deleting: bool) -> Election {
        let mut e = Election::new(
            "jobs",
            ElectionSpec {
                kind: "default".into(),
                election: None,
                term: "15s".into(),
                deployment: Some("web".into()),
                managed: true,
                leader_label: crd::DEFAULT_LEADER_LABEL.into(),
                prefer_newest_revision: true,
            },
        );
        e.metadata.namespace = Some("shop".into());
        e.metadata.uid = Some("jobs-uid".into());
        e.metadata.generation = Some(1);
        e.metadata.resource_version = Some("7".into());
        e.metadata.finalizers = Some(vec![FINALIZER.into()]);
        if deleting {
            e.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
            );
        }
        e
    }

    fn context(client: Client, service: ElectionService, election: &Election) -> Arc<Context> {
        let (elections, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Apply(election.clone()));
        Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "election-agent".into(),
                    instance: Some("test".into()),
                },
            ),
            client,
            service,
            elections,
            metrics: OperatorMetrics::register(&Registry::new()).unwrap(),
        })
    }

    /// Waits for the next request, checks its method and path, answers it with its own body
    /// (or `answer`), and returns the body it carried.
    async fn expect(api: &mut ApiServer, method: &str, path: &str, answer: Option<Value>) -> Value {
        let (request, respond) = tokio::time::timeout(Duration::from_secs(5), api.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {method} {path} within 5 s"))
            .expect("the client is alive");
        assert_eq!(request.method().as_str(), method, "{}", request.uri());
        assert_eq!(request.uri().path(), path);
        let query = request.uri().query().unwrap_or_default().to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let mut body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        respond.send_response(
            Response::builder()
                .body(Body::from(
                    serde_json::to_vec(&answer.unwrap_or(body.clone())).unwrap(),
                ))
                .unwrap(),
        );
        if let Value::Object(map) = &mut body {
            map.insert("query".into(), json!(query));
        }
        body
    }

    fn service() -> ElectionService {
        ElectionService::new(
            Store::Memory(MemoryStore::new()),
            Some(Discovery::from_caches(caches())),
            TermBounds::default(),
            Arc::new(Metrics::new("test", vec![1.0]).unwrap()),
            CancellationToken::new(),
        )
    }

    /// `web-1-a` leads; a reconcile of Election `jobs` (being deleted, or not) is started
    /// against the mock API server.
    async fn reconciling(
        deleting: bool,
    ) -> (
        ApiServer,
        ElectionService,
        Election,
        tokio::task::JoinHandle<Result<Action, OperatorError>>,
        OperatorMetrics,
    ) {
        let (mock, api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "default");
        let service = service();
        service
            .campaign("default", "jobs", "web-1-a", 15_000)
            .await
            .unwrap();
        let election = election(deleting);
        let ctx = context(client, service.clone(), &election);
        let metrics = ctx.metrics.clone();
        let reconciling = tokio::spawn(reconcile(Arc::new(election.clone()), ctx));
        (api, service, election, reconciling, metrics)
    }

    async fn expect_label_removed(api: &mut ApiServer, pod: &str) {
        let path = format!("/api/v1/namespaces/shop/pods/{pod}");
        let removed = expect(api, "PATCH", &path, Some(json!({}))).await;
        assert_eq!(
            removed["metadata"]["labels"],
            json!({"election-agent.io/leader": null})
        );
    }

    #[tokio::test]
    async fn managed_mode_moves_leadership_and_the_label_to_the_new_revision() {
        let (mut api, service, election, reconciling, metrics) = reconciling(false).await;

        // The old leader loses the label before the new one gets it.
        expect_label_removed(&mut api, "web-1-a").await;
        let added = expect(
            &mut api,
            "PATCH",
            "/api/v1/namespaces/shop/pods/web-2-a",
            Some(json!({})),
        )
        .await;
        assert_eq!(
            added["metadata"]["labels"],
            json!({"election-agent.io/leader": "true"})
        );

        // Status by server-side apply on the status subresource.
        let applied = expect(
            &mut api,
            "PATCH",
            "/apis/election-agent.io/v1/namespaces/shop/elections/jobs/status",
            Some(serde_json::to_value(&election).unwrap()),
        )
        .await;
        let query = applied["query"].as_str().unwrap();
        assert!(
            query.contains("fieldManager=election-agent") && query.contains("force=true"),
            "{query}"
        );
        let status = &applied["status"];
        assert_eq!(status["leader"], "web-2-a");
        assert_eq!(status["fencingToken"], 2);
        assert_eq!(status["leaderRevision"], 2);
        assert_eq!(status["ready"], "2/3");
        assert_eq!(status["observedGeneration"], 1);
        let leaders: Vec<&str> = status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["leader"] == true)
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(leaders, ["web-2-a"]);

        // And an Event saying so.
        let event = expect(
            &mut api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            None,
        )
        .await;
        assert_eq!(event["reason"], "LeaderElected");
        assert_eq!(event["regarding"]["name"], "jobs");

        let action = reconciling.await.unwrap().unwrap();
        assert_eq!(
            action,
            Action::requeue(Duration::from_secs(5)),
            "renewed every third of the term"
        );
        let commands = |command: &str| metrics.lease_commands.with_label_values(&[command]).get();
        assert_eq!(
            (commands("read"), commands("handover")),
            (1, 1),
            "one read of the lease per reconcile; the handover's answer tells the rest"
        );
        let requests: u64 = service
            .metrics()
            .encode()
            .lines()
            .filter(|l| l.starts_with("election_agent_request_duration_seconds_count"))
            .filter(|l| !l.contains("action=\"campaign\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(
            requests, 0,
            "the controller's commands are not client requests (the test's campaign is)"
        );
        let lease = service.leader("default", "jobs").await.unwrap();
        assert_eq!((lease.leader.as_str(), lease.token.0), ("web-2-a", 2));
    }

    #[tokio::test]
    async fn deleting_an_election_gives_up_its_lease_and_label_then_releases_the_object() {
        let (mut api, service, election, reconciling, _) = reconciling(true).await;

        expect_label_removed(&mut api, "web-1-a").await;
        let mut released = election.clone();
        released.metadata.finalizers = None;
        let finalizer_patch = expect(
            &mut api,
            "PATCH",
            "/apis/election-agent.io/v1/namespaces/shop/elections/jobs",
            Some(serde_json::to_value(&released).unwrap()),
        )
        .await;
        let ops = finalizer_patch.as_array().expect("a JSON patch");
        assert!(
            ops.iter()
                .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
            "{finalizer_patch}"
        );

        reconciling.await.unwrap().unwrap();
        assert!(matches!(
            service.leader("default", "jobs").await,
            Err(ElectionError::NoLeader { .. })
        ));
    }

    /// Caches that never synced cannot say which pods carry the label: the finalizer stays, the
    /// lease too, and the reconcile fails (to be retried) without a request to the API server.
    #[tokio::test]
    async fn deleting_with_unsynced_caches_keeps_the_finalizer_and_retries() {
        let (mock, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let unsynced = Caches {
            pods: reflector::store().0,
            replica_sets: reflector::store().0,
            deployments: reflector::store().0,
        };
        let service = ElectionService::new(
            Store::Memory(MemoryStore::new()),
            Some(Discovery::from_caches(unsynced)),
            TermBounds::default(),
            Arc::new(Metrics::new("test", vec![1.0]).unwrap()),
            CancellationToken::new(),
        );
        service
            .campaign("default", "jobs", "web-1-a", 15_000)
            .await
            .unwrap();
        let election = election(true);
        let ctx = context(Client::new(mock, "default"), service.clone(), &election);
        let result = reconcile(Arc::new(election), ctx).await;
        assert!(
            matches!(&result, Err(OperatorError::NotReady(why)) if why.contains("label")),
            "{result:?}"
        );
        let request = tokio::time::timeout(Duration::from_millis(100), api.next_request()).await;
        assert!(
            !matches!(request, Ok(Some(_))),
            "no finalizer removed, no label touched"
        );
        assert_eq!(
            service
                .leader("default", "jobs")
                .await
                .unwrap()
                .leader
                .as_str(),
            "web-1-a",
            "the lease stays until the labels are gone"
        );
    }
}

#[cfg(test)]
mod leadership_tests {
    use axum::http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;
    use crate::{
        lease::TermBounds,
        metrics::Metrics,
        store::{MemoryStore, Store},
    };

    async fn holder(service: &ElectionService) -> Option<String> {
        service
            .leases()
            .leader(&controller_lease())
            .await
            .ok()
            .map(|info| info.leader.as_str().to_owned())
    }

    async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !check().await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within 5 s"));
    }

    /// Two replicas over one lease store: one runs the controller; when it stops, the other
    /// takes over; a replica that loses the lease stops its controller.
    #[tokio::test]
    async fn exactly_one_replica_runs_the_controller_and_another_takes_over() {
        let service = ElectionService::new(
            Store::Memory(MemoryStore::new()),
            None,
            TermBounds::default(),
            Arc::new(Metrics::new("test", vec![1.0]).unwrap()),
            CancellationToken::new(),
        );
        // The controllers talk to an API server that never answers: leadership is the point.
        let (mock, _api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "default");
        let metrics = OperatorMetrics::register(&Registry::new()).unwrap();
        let replica = |name: &str, stop: &CancellationToken| {
            tokio::spawn(run(
                client.clone(),
                service.clone(),
                metrics.clone(),
                Name::parse("identity", name).unwrap(),
                None,
                Term::from_millis(1_000),
                stop.clone(),
            ))
        };
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let a = replica("replica-a", &stop_a);
        eventually("replica-a leads", async || {
            holder(&service).await.as_deref() == Some("replica-a")
        })
        .await;
        let b = replica("replica-b", &stop_b);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            holder(&service).await.as_deref(),
            Some("replica-a"),
            "renewed, not taken"
        );

        // replica-a shuts down: it resigns, and replica-b takes over within one term.
        stop_a.cancel();
        tokio::time::timeout(Duration::from_secs(5), a)
            .await
            .expect("replica-a stops within 5 s")
            .unwrap();
        eventually("replica-b leads", async || {
            holder(&service).await.as_deref() == Some("replica-b")
        })
        .await;

        // No client can hand the lease over (or resign it, or campaign for it).
        let refused = service
            .handover(CONTROLLER_KIND, CONTROLLER_ELECTION, "intruder", 60_000)
            .await;
        assert!(
            matches!(&refused, Err(ElectionError::InvalidArgument(err)) if err.field == "kind"),
            "{refused:?}"
        );
        assert!(
            service
                .resign(CONTROLLER_KIND, CONTROLLER_ELECTION, "replica-b")
                .await
                .is_err()
        );
        assert_eq!(holder(&service).await.as_deref(), Some("replica-b"));

        // Another replica takes the lease from under replica-b (its renewals were late, say):
        // replica-b notices at its next renewal.
        service
            .leases()
            .handover(
                &controller_lease(),
                &Name::parse("identity", "intruder").unwrap(),
                Term::from_millis(60_000),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(holder(&service).await.as_deref(), Some("intruder"));
        stop_b.cancel();
        tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .expect("replica-b stops within 5 s")
            .unwrap();
    }
}

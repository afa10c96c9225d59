//! The `Election` operator: a kube-runtime controller, in the same process as the API, that keeps
//! each Election's lease in the store and its status on the object — and in managed mode elects
//! among a Deployment's pods itself and labels the leader pod.
//!
//! By role: this module wires the controller and what triggers it (changes of the Election, of
//! pods/ReplicaSets/Deployments in its namespace, of leases from any agent replica); [`role`]
//! runs it in exactly one agent replica, the holder of the controller lease; `reconcile` is one
//! round for one Election (read → decide with [`plan`], pure → act), `labels` the leader label.

pub mod crd;
mod labels;
pub mod plan;
mod reconcile;
pub mod role;

pub use self::{
    reconcile::{error_policy, reconcile},
    role::{Leading, controller_lease, run},
};

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, stream};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller,
        events::{Recorder, Reporter},
        finalizer,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;

use self::crd::{Election, ElectionStatus, term_ms};
use crate::{
    election::{ElectionError, ElectionService},
    store::StoreEvent,
};

/// The finalizer that lets the controller give up an Election's lease before it is deleted.
pub const FINALIZER: &str = "election-agent.io/lease";
/// The field manager of the status the controller applies.
const FIELD_MANAGER: &str = "election-agent";
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
    /// This process no longer holds the controller lease (or may not, by its own clock): it
    /// writes nothing more.
    #[error("this agent no longer holds the controller lease")]
    NotLeading,
}

impl OperatorError {
    /// Every value of [`OperatorError::label`].
    const LABELS: [&'static str; 5] = ["kube", "store", "finalizer", "not_ready", "not_leading"];

    /// The `error` label of the reconcile error metric.
    fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Store(_) => "store",
            Self::Finalizer(_) => "finalizer",
            Self::NotReady(_) => "not_ready",
            Self::NotLeading => "not_leading",
        }
    }
}

/// The labels of the per-Election series: the Election object's namespace and name. Not
/// `namespace`: a ServiceMonitor sets that on every scraped series (to the agent's namespace),
/// and would rename this one `exported_namespace`.
const ELECTION_LABELS: [&str; 2] = ["election_namespace", "election"];

/// The lease store commands of the controller, the `command` label of its metric.
const LEASE_COMMANDS: [&str; 5] = ["campaign", "extend", "handover", "resign", "read"];

/// The controller's metrics (reconciles, errors, durations, leader changes, elections managed,
/// whether this replica runs the controller, and per Election object whether it has a leader),
/// registered with the agent's.
#[derive(Clone)]
pub struct OperatorMetrics {
    reconciles: IntCounter,
    errors: IntCounterVec,
    duration: Histogram,
    leader_changes: IntCounterVec,
    managed: IntGauge,
    lease_commands: IntCounterVec,
    leading: IntGauge,
    has_leader: IntGaugeVec,
    term: GaugeVec,
    leaderless_since: GaugeVec,
    election_leader_changes: IntCounterVec,
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
                    "Failed reconciles, by error (kube|store|finalizer|not_ready|not_leading).",
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
            leading: IntGauge::new(
                "election_agent_controller_leading",
                "1 while this agent replica holds the controller lease and runs the Election \
                 controller, else 0.",
            )?,
            has_leader: IntGaugeVec::new(
                Opts::new(
                    "election_agent_election_has_leader",
                    "1 when the Election's lease had a live leader at the controller's last \
                     reconcile, else 0; one series per Election object, exported by the replica \
                     running the controller only.",
                ),
                &ELECTION_LABELS,
            )?,
            term: GaugeVec::new(
                Opts::new(
                    "election_agent_election_term_seconds",
                    "The Election's spec.term in seconds.",
                ),
                &ELECTION_LABELS,
            )?,
            leaderless_since: GaugeVec::new(
                Opts::new(
                    "election_agent_election_leaderless_since_timestamp_seconds",
                    "Unix time since which the Election has had no leader (its LeaderElected \
                     condition's last transition to False); 0 while it has one.",
                ),
                &ELECTION_LABELS,
            )?,
            election_leader_changes: IntCounterVec::new(
                Opts::new(
                    "election_agent_election_leader_changes_total",
                    "Leader changes of the Election the controller published (to another \
                     leader or to none), counted by the replica running the controller.",
                ),
                &ELECTION_LABELS,
            )?,
        };
        // Every known label value from the start, so that the first error or command is an
        // increase Prometheus sees, not the appearance of a series.
        for error in OperatorError::LABELS {
            metrics.errors.with_label_values(&[error]);
        }
        for command in LEASE_COMMANDS {
            metrics.lease_commands.with_label_values(&[command]);
        }
        registry.register(Box::new(metrics.reconciles.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.leader_changes.clone()))?;
        registry.register(Box::new(metrics.managed.clone()))?;
        registry.register(Box::new(metrics.lease_commands.clone()))?;
        registry.register(Box::new(metrics.leading.clone()))?;
        registry.register(Box::new(metrics.has_leader.clone()))?;
        registry.register(Box::new(metrics.term.clone()))?;
        registry.register(Box::new(metrics.leaderless_since.clone()))?;
        registry.register(Box::new(metrics.election_leader_changes.clone()))?;
        Ok(metrics)
    }

    /// Records whether this replica runs the controller. A replica that stops running it also
    /// drops every Election's series and counts no managed Election: only the controller's
    /// replica exports them, so a standby never shows stale values.
    pub fn set_leading(&self, leading: bool) {
        self.leading.set(i64::from(leading));
        if !leading {
            self.managed.set(0);
            self.has_leader.reset();
            self.term.reset();
            self.leaderless_since.reset();
            self.election_leader_changes.reset();
        }
    }

    /// Records what the controller publishes of `election`: whether it has a leader, its term,
    /// and since when it has had no leader.
    pub fn observe_election(&self, election: &Election, status: &ElectionStatus) {
        let labels = election_labels(election);
        let since = match &status.leader {
            Some(_) => 0.0,
            None => {
                status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "LeaderElected" && c.status == "False")
                    .map_or_else(k8s_openapi::jiff::Timestamp::now, |c| {
                        c.last_transition_time.0
                    })
                    .as_millisecond() as f64
                    / 1_000.0
            }
        };
        self.has_leader
            .with_label_values(&labels)
            .set(i64::from(status.leader.is_some()));
        self.leaderless_since.with_label_values(&labels).set(since);
        match term_ms(&election.spec.term) {
            Some(ms) => self
                .term
                .with_label_values(&labels)
                .set(ms as f64 / 1_000.0),
            None => {
                let _ = self.term.remove_label_values(&labels);
            }
        }
        // From 0, so that the first change is an increase Prometheus sees.
        self.election_leader_changes.with_label_values(&labels);
    }

    /// Counts a leader change of `election` (by its kind, and by the Election object).
    pub fn leader_changed(&self, election: &Election) {
        self.leader_changes
            .with_label_values(&[&election.spec.kind])
            .inc();
        self.election_leader_changes
            .with_label_values(&election_labels(election))
            .inc();
    }

    /// Drops the series of an Election that is being deleted.
    pub fn forget_election(&self, election: &Election) {
        let labels = election_labels(election);
        // An Election never reconciled by this replica has no series: nothing to remove.
        let _ = self.has_leader.remove_label_values(&labels);
        let _ = self.term.remove_label_values(&labels);
        let _ = self.leaderless_since.remove_label_values(&labels);
        let _ = self.election_leader_changes.remove_label_values(&labels);
    }

    /// Counts one lease store command of the controller.
    fn command(&self, command: &str) {
        self.lease_commands.with_label_values(&[command]).inc();
    }
}

/// The values of [`ELECTION_LABELS`] for `election`.
fn election_labels(election: &Election) -> [&str; 2] {
    [
        election.metadata.namespace.as_deref().unwrap_or_default(),
        election.metadata.name.as_deref().unwrap_or_default(),
    ]
}

/// What every reconcile gets.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The election service (lease store and discovery caches).
    pub service: ElectionService,
    /// Every Election the controller watches (for conflict detection).
    pub elections: Elections,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The controller's metrics.
    pub metrics: OperatorMetrics,
    /// Until when this process holds the controller lease.
    pub leading: Leading,
    /// The leader pods this controller last labelled.
    labelled: labels::Labelled,
}
/// Every Election the controller watches: one cache per watched namespace, or one of the whole
/// cluster. Leases are shared by all namespaces, so conflicts are looked for across all of them.
#[derive(Clone)]
pub struct Elections(Vec<Store<Election>>);

impl Elections {
    /// Every Election in the caches.
    pub fn state(&self) -> Vec<Arc<Election>> {
        self.0.iter().flat_map(Store::state).collect()
    }
}

impl From<Store<Election>> for Elections {
    fn from(store: Store<Election>) -> Self {
        Self(vec![store])
    }
}

/// The controller itself, over the Elections of `namespaces` (all when empty), until `stop`.
/// With namespaces, it runs one watch per namespace, so that namespaced Roles there are all the
/// access it needs; the controllers share one context, so they see one another's Elections.
async fn run_controller(
    client: Client,
    service: ElectionService,
    metrics: OperatorMetrics,
    identity: String,
    namespaces: Vec<String>,
    leading: Leading,
    stop: CancellationToken,
) {
    let apis: Vec<Api<Election>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|namespace| Api::namespaced(client.clone(), namespace))
            .collect()
    };
    // A short debounce folds the bursts of pod events of a rolling update into one reconcile,
    // well inside the one second a leader change may take to show.
    let controllers: Vec<Controller<Election>> = apis
        .into_iter()
        .map(|api| {
            Controller::new(api, watcher::Config::default().any_semantic())
                .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE))
        })
        .collect();
    let stores: Vec<Store<Election>> = controllers.iter().map(Controller::store).collect();
    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "election-agent".into(),
                instance: Some(identity),
            },
        ),
        client,
        service: service.clone(),
        elections: Elections(stores.clone()),
        metrics,
        leading,
        labelled: labels::Labelled::default(),
    });
    let running = controllers.into_iter().zip(stores).map(|(controller, store)| {
        let graceful = stop.clone();
        let running = controller
            .reconcile_on(triggers(&service, store.clone()))
            .graceful_shutdown_on(async move { graceful.cancelled().await })
            .run(reconcile, error_policy, context.clone())
            .for_each(|result| async move {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "reconcile");
                }
            });
        // A controller whose cache never filled (no CRD installed, no API server, no access)
        // ran no reconcile, and kube-runtime would wait for that cache forever before it stops:
        // drop it at once.
        let stop = stop.clone();
        let never_synced = async move {
            stop.cancelled().await;
            if store.wait_until_ready().now_or_never().is_none() {
                return;
            }
            futures::future::pending::<()>().await;
        };
        async move {
            tokio::select! {
                () = running => {}
                () = never_synced => tracing::info!("Election controller stopped before its cache synced"),
            }
        }
    });
    futures::future::join_all(running).await;
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

#[cfg(test)]
mod tests;

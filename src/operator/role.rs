//! The controller role: with several agent replicas, exactly one runs the Election controller —
//! the holder of the lease `election-agent.io/controller` in the agent's own store, a kind the
//! public API refuses, so no client can hand it over or resign it. Its identity is unique per
//! process (the pod name and a random suffix, see `server.rs`).
//!
//! A controller that lost its lease must stop writing before another replica starts: every write
//! asks [`Leading::check`] first, which answers from this process's own clock — the lease it
//! last renewed, less a margin — not from a store that may be hanging.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use kube::Client;
use tokio_util::sync::CancellationToken;

use super::{OperatorError, OperatorMetrics, run_controller};
use crate::{
    election::{CONTROLLER_KIND, ElectionService},
    lease::{ElectionKey, Name, Term},
};

/// The election (of kind [`CONTROLLER_KIND`]) the agent replicas campaign for to run the
/// controller.
const CONTROLLER_ELECTION: &str = "controller";

/// The controller lease as this process holds it: the instant until which it may still write.
#[derive(Clone, Debug)]
pub struct Leading(Arc<Mutex<Instant>>);

impl Leading {
    /// Held until `deadline` (then renewed with [`Leading::renewed`]).
    pub fn until(deadline: Instant) -> Self {
        Self(Arc::new(Mutex::new(deadline)))
    }

    /// The lease was renewed by a command sent at `sent`, for `term`: held until then plus the
    /// term, less a tenth of it — so that a write let through just before the deadline has that
    /// long to land before another replica can be elected, and clocks that run at slightly
    /// different rates do not matter.
    fn renewed(&self, sent: Instant, term: Term) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = deadline(sent, term);
    }

    /// Ends it now (renewal failed, or shutting down).
    fn lost(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// `Ok` while the lease is held; asked before every write of the controller.
    pub fn check(&self) -> Result<(), OperatorError> {
        let until = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if Instant::now() < until {
            Ok(())
        } else {
            Err(OperatorError::NotLeading)
        }
    }
}

fn deadline(sent: Instant, term: Term) -> Instant {
    let term = Duration::from_millis(term.as_millis());
    sent + term - term / 10
}

/// Runs the controller — over the Elections of `namespaces`, or of the whole cluster when empty —
/// while this agent holds the controller lease, until `shutdown`: campaigns every third of `term`,
/// renews while leading, and stops the controller (and lets another replica take over within one term)
/// when renewal fails; on shutdown it resigns, so another replica takes over at once.
pub async fn run(
    client: Client,
    service: ElectionService,
    metrics: OperatorMetrics,
    identity: Name,
    namespaces: Vec<String>,
    term: Term,
    shutdown: CancellationToken,
) {
    let key = controller_lease();
    let leases = service.leases();
    let beat = Duration::from_millis(term.as_millis()) / 3;
    while !shutdown.is_cancelled() {
        metrics.command("campaign");
        let sent = Instant::now();
        match leases.campaign(&key, &identity, term).await {
            Ok(won) if won.elected => {
                tracing::info!(%identity, "leading: running the Election controller");
                metrics.set_leading(true);
                let leading = Leading::until(deadline(sent, term));
                let stop = shutdown.child_token();
                let controller = tokio::spawn(run_controller(
                    client.clone(),
                    service.clone(),
                    metrics.clone(),
                    identity.to_string(),
                    namespaces.clone(),
                    leading.clone(),
                    stop.clone(),
                ));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(beat) => {}
                    }
                    metrics.command("extend");
                    let sent = Instant::now();
                    match leases.extend(&key, &identity, term).await {
                        Ok(_) => leading.renewed(sent, term),
                        Err(err) => {
                            tracing::warn!(%identity, error = %err, "lost the controller lease: stopping the controller");
                            break;
                        }
                    }
                }
                leading.lost();
                stop.cancel();
                let _ = controller.await;
                // Only now: a reconcile still running could otherwise set an Election's series
                // again after they were dropped.
                metrics.set_leading(false);
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

#[cfg(test)]
mod tests {
    use axum::http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use prometheus::Registry;

    use super::*;
    use crate::{
        election::ElectionError,
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

    /// A replica that loses the controller lease says so, and drops every Election's series:
    /// a standby must not export what it no longer watches.
    #[tokio::test]
    async fn losing_the_controller_lease_drops_every_elections_series() {
        let service = ElectionService::new(
            Store::Memory(MemoryStore::new()),
            None,
            TermBounds::default(),
            Arc::new(Metrics::new("test", vec![1.0]).unwrap()),
            CancellationToken::new(),
        );
        let (mock, _api) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = OperatorMetrics::register(&Registry::new()).unwrap();
        let stop = CancellationToken::new();
        let replica = tokio::spawn(run(
            Client::new(mock, "default"),
            service.clone(),
            metrics.clone(),
            Name::parse("identity", "replica-a").unwrap(),
            Default::default(),
            Term::from_millis(1_000),
            stop.clone(),
        ));
        eventually("replica-a leads", async || metrics.leading.get() == 1).await;
        let spec = serde_json::from_value(serde_json::json!({})).unwrap();
        let mut election = crate::operator::crd::Election::new("jobs", spec);
        election.metadata.namespace = Some("shop".into());
        metrics.observe_election(&election, &Default::default());
        assert_eq!(
            metrics
                .has_leader
                .with_label_values(&["shop", "jobs"])
                .get(),
            0
        );

        service
            .leases()
            .handover(
                &controller_lease(),
                &Name::parse("identity", "intruder").unwrap(),
                Term::from_millis(60_000),
                Default::default(),
            )
            .await
            .unwrap();
        eventually("replica-a stops leading", async || {
            metrics.leading.get() == 0
        })
        .await;
        assert!(
            metrics
                .has_leader
                .remove_label_values(&["shop", "jobs"])
                .is_err(),
            "no series left"
        );
        assert!(
            metrics
                .election_leader_changes
                .remove_label_values(&["shop", "jobs"])
                .is_err()
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), replica)
            .await
            .expect("replica-a stops within 5 s")
            .unwrap();
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
                Vec::new(),
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
            .handover(
                CONTROLLER_KIND,
                CONTROLLER_ELECTION,
                "intruder",
                60_000,
                "",
                0,
            )
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
                Default::default(),
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

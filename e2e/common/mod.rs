//! Shared by the e2e tests: a namespace of the test's own (with a kubelet stand-in when the
//! cluster has no kubelet), an agent started against the cluster, a Deployment whose pods linger
//! in Terminating, bounded waits, and plain HTTP.
#![allow(dead_code)] // each e2e test binary uses its own subset

pub mod kubelet;
pub mod processes;

use std::time::{Duration, Instant};

use election_agent::{
    config::Sources,
    server::{self, RunningAgent},
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use self::kubelet::StandIn;

/// The grace period of `deployment()`'s pods: they ignore SIGTERM, so a deleted pod stays
/// Terminating this long (a real kubelet kills it then; the stand-in deletes it then). Long
/// enough to watch terminating pods in the middle of a rollout, short enough that a real
/// cluster empties the namespace soon after the test.
pub const GRACE_PERIOD_SECONDS: i64 = 30;
/// How long the cleanup of a test namespace may take before the test gives up waiting for it.
const CLEANUP_LIMIT: Duration = Duration::from_secs(30);

/// A namespace of this test's own, deleted (with everything in it) when the test ends; with a
/// kubelet stand-in for its pods when the cluster has no kubelet. Declare it before the test's
/// agents, so that they are dropped (stopped) before it cleans up.
pub struct TestNamespace {
    /// Its name: `ea-e2e-<test>-<pid>`.
    pub name: String,
    /// Plays kubelet for this namespace's pods, on a cluster without one.
    stand_in: Option<StandIn>,
}

impl TestNamespace {
    /// Creates `ea-e2e-<test>-<pid>`, labelled as an e2e namespace, and starts the kubelet
    /// stand-in for it when the cluster has no kubelet (saying so loudly).
    pub async fn create(client: &Client, test: &str) -> Self {
        let name = format!("ea-e2e-{test}-{}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = serde_json::from_value(json!({"metadata": {
            "name": name, "labels": {"election-agent.io/e2e": "true"}}}))
        .unwrap();
        within(
            "create the test namespace",
            Duration::from_secs(30),
            namespaces.create(&PostParams::default(), &namespace),
        )
        .await
        .expect("create the test namespace");
        let stand_in = if within(
            "list nodes",
            Duration::from_secs(30),
            kubelet::needed(client),
        )
        .await
        {
            kubelet::banner(&name);
            Some(StandIn::start(client, &name))
        } else {
            None
        };
        Self { name, stand_in }
    }
}

impl Drop for TestNamespace {
    /// Deletes the namespace, without ever hanging the test: the cleanup runs on a thread with
    /// a runtime and a client of its own (a client of the test's runtime could not make
    /// progress while `drop` blocks that runtime's thread waiting for it), and is waited for at
    /// most [`CLEANUP_LIMIT`].
    fn drop(&mut self) {
        // Stop playing kubelet first: from here on the cleanup finishes the pods off itself.
        drop(self.stand_in.take());
        let name = self.name.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cleaned = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| err.to_string())
                .and_then(|runtime| {
                    runtime.block_on(async {
                        tokio::time::timeout(CLEANUP_LIMIT, clean_up(&name))
                            .await
                            .map_err(|_| format!("not gone within {CLEANUP_LIMIT:?}"))?
                    })
                });
            let _ = done.send(cleaned);
        });
        let outcome = finished
            .recv_timeout(CLEANUP_LIMIT + Duration::from_secs(5))
            .unwrap_or_else(|_| Err("the cleanup thread did not answer".into()));
        if let Err(err) = outcome {
            eprintln!("e2e: cleanup of namespace {}: {err}", self.name);
        }
    }
}

/// Deletes namespace `name` and waits until it is gone. The agents of the test have stopped by
/// now, so nothing will take the finalizer off its Elections: that is done here. Its pods are
/// deleted at once too (grace period 0): they ignore SIGTERM, so they would stay Terminating for
/// their whole grace period — and for ever on the stand-in's node, now that the stand-in has
/// stopped — and the namespace with them.
async fn clean_up(name: &str) -> Result<(), String> {
    election_agent::transport::crypto_provider();
    let client = Client::try_default().await.map_err(|e| e.to_string())?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(err) => return Err(err.to_string()),
    }
    let elections: Api<election_agent::operator::crd::Election> =
        Api::namespaced(client.clone(), name);
    let pods: Api<Pod> = Api::namespaced(client, name);
    loop {
        match namespaces.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => {}
            Err(err) => return Err(err.to_string()),
        }
        // Errors are fine here (no CRD installed, already gone): the loop looks again.
        if let Ok(list) = elections.list(&ListParams::default()).await {
            for election in list.items.iter().filter(|e| !e.finalizers().is_empty()) {
                let patch = json!({"metadata": {"finalizers": null}});
                let _ = elections
                    .patch(
                        &election.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
        }
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for pod in &list.items {
                let _ = pods
                    .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The cluster of `KUBECONFIG` / `~/.kube/config`.
pub async fn cluster() -> Client {
    // The TLS provider kube's configuration takes (see `crypto_provider`).
    election_agent::transport::crypto_provider();
    within("connect", Duration::from_secs(30), Client::try_default())
        .await
        .expect("a cluster from KUBECONFIG (these tests are run by scripts/e2e.sh)")
}

/// An agent on loopback ports of its own, watching `namespace` of the cluster of `KUBECONFIG`,
/// with the Election controller on.
pub async fn agent(namespace: &str) -> RunningAgent {
    let config = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_IN_CLUSTER", "false")
        .flag("EA_KUBE_NAMESPACES", namespace)
        .flag("EA_CONTROLLER_TERM", "3s")
        .resolve()
        .unwrap();
    within(
        "the agent starts",
        Duration::from_secs(30),
        server::start(&config),
    )
    .await
    .expect("agent starts")
}

/// Deployment `web` of 3 pods that ignore SIGTERM (so they stay Terminating for the grace
/// period) and are Ready once started.
pub fn deployment(image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": GRACE_PERIOD_SECONDS,
                    "containers": [{
                        "name": "main",
                        "image": image,
                        "command": ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
                        "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}
                    }]
                }
            }
        }
    }))
    .unwrap()
}

/// Rolls Deployment `web` to `image`.
pub async fn roll(deployments: &Api<Deployment>, image: &str) {
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": image}]}}}});
    within(
        "roll the Deployment",
        Duration::from_secs(30),
        deployments.patch("web", &PatchParams::default(), &Patch::Strategic(&patch)),
    )
    .await
    .expect("roll the Deployment");
}

/// Whether `pod` is Ready and not terminating: a pod that may lead.
pub fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Awaits `future`, failing the test (naming `what`) if it takes longer than `limit`: no step
/// of a test may hang it.
pub async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// Polls `check` every 100 ms until it holds; fails after `limit`, showing `what`. A check that
/// does not answer counts as not holding, so a hung request cannot outlast the limit either.
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    until(what, limit, async || {
        check().await.then_some(()).ok_or_else(String::new)
    })
    .await;
}

/// Like [`eventually`], for a check that says what it saw when it does not hold (`Err`): the
/// last of those is shown when the limit passes.
pub async fn until(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let left = left.max(Duration::from_millis(100));
        let seen = match tokio::time::timeout(left, check()).await {
            Ok(Ok(())) => return,
            Ok(Err(seen)) => seen,
            Err(_) => format!("no answer within {left:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `url` over a plain TCP connection (HTTP/1.0, so the server closes when done): the
/// status code and the body as JSON. Fails the test after 10 s.
pub async fn http_get(url: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = async {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = within(&format!("GET {url}"), Duration::from_secs(10), request)
        .await
        .unwrap_or_else(|err| panic!("GET {url}: {err}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (code, serde_json::from_str(body).unwrap_or_default())
}

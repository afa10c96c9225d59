//! Shared by the e2e tests: a namespace of the test's own, an agent started against the
//! cluster, a Deployment whose pods linger in Terminating, and plain HTTP.
#![allow(dead_code)] // each e2e test binary uses its own subset

use std::time::{Duration, Instant};

use election_agent::{
    config::Sources,
    server::{self, RunningAgent},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Namespace};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// A namespace of this test's own, deleted (with everything in it) when the test ends.
pub struct TestNamespace {
    client: Client,
    /// Its name: `ea-e2e-<test>-<pid>`.
    pub name: String,
}

impl TestNamespace {
    /// Creates `ea-e2e-<test>-<pid>`, labelled as an e2e namespace.
    pub async fn create(client: &Client, test: &str) -> Self {
        let name = format!("ea-e2e-{test}-{}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = serde_json::from_value(json!({"metadata": {
            "name": name, "labels": {"election-agent.io/e2e": "true"}}}))
        .unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create the test namespace");
        Self {
            client: client.clone(),
            name,
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        // Best effort, off the (possibly panicking) test's runtime.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    let namespaces: Api<Namespace> = Api::all(client);
                    let _ = namespaces.delete(&name, &DeleteParams::background()).await;
                })
        })
        .join();
    }
}

/// The cluster of `KUBECONFIG` / `~/.kube/config`.
pub async fn cluster() -> Client {
    Client::try_default()
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
    server::start(&config).await.expect("agent starts")
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
                    "terminationGracePeriodSeconds": 60,
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
    deployments
        .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("roll the Deployment");
}

/// Polls `check` every 100 ms until it holds; fails after `limit`, showing `what`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `url` over a plain TCP connection (HTTP/1.0, so the server closes when done): the
/// status code and the body as JSON.
pub async fn http_get(url: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (code, serde_json::from_str(body).unwrap_or_default())
}

//! End to end against a real Kubernetes cluster (the one `KUBECONFIG` or `~/.kube/config`
//! names): a Deployment rolled to a new image, seen through the agent's `GetPods` (gRPC and REST)
//! exactly as the API server lists it, within a second of each change.
//!
//! Needs a cluster, so every test here is `#[ignore]`d: `scripts/e2e.sh` runs them when a cluster
//! is configured and says loudly that they were skipped when none is.

mod common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use common::{TestNamespace, deployment, http_get, within};
use election_agent::{
    grpc::pb::{self, election_client::ElectionClient},
    server::RunningAgent,
};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::Pod,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};

/// How a pod looks in both the API server's listing and the agent's answer.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
struct PodView {
    revision: i32,
    name: String,
    replica_set: String,
    ip: String,
    phase: String,
    ready: bool,
    terminating: bool,
}

/// What `kubectl get pods,rs -o yaml` shows for Deployment `web`, as views.
async fn listed(client: &Client, namespace: &str) -> Vec<PodView> {
    within(
        "list the Deployment's pods",
        Duration::from_secs(20),
        list(client, namespace),
    )
    .await
}

async fn list(client: &Client, namespace: &str) -> Vec<PodView> {
    let deployment: Deployment = Api::namespaced(client.clone(), namespace)
        .get("web")
        .await
        .unwrap();
    let replica_sets: Vec<ReplicaSet> = Api::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let pods: Vec<Pod> = Api::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    let owner_uid = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone())
    };
    let mut views: Vec<PodView> = pods
        .iter()
        .filter_map(|pod| {
            let uid = owner_uid(&pod.metadata)?;
            let rs = replica_sets
                .iter()
                .find(|rs| rs.metadata.uid.as_deref() == Some(uid.as_str()))?;
            (owner_uid(&rs.metadata) == deployment.metadata.uid).then_some(())?;
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Some(PodView {
                revision: rs
                    .annotations()
                    .get("deployment.kubernetes.io/revision")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or_default(),
                name: pod.name_any(),
                replica_set: rs.name_any(),
                ip: status.pod_ip.unwrap_or_default(),
                phase: status.phase.unwrap_or_default(),
                ready,
                terminating: pod.metadata.deletion_timestamp.is_some(),
            })
        })
        .collect();
    views.sort();
    views
}

/// What the agent answers over gRPC, as views (in the agent's own order).
async fn answered(agent: &RunningAgent, namespace: &str) -> Vec<PodView> {
    let url = format!("http://{}", agent.grpc_address.unwrap());
    let mut client = within(
        "connect",
        Duration::from_secs(10),
        ElectionClient::connect(url),
    )
    .await
    .unwrap();
    let request = pb::GetPodsRequest {
        namespace: namespace.into(),
        deployment: "web".into(),
        pod_name: String::new(),
    };
    let pods = within("GetPods", Duration::from_secs(10), client.get_pods(request))
        .await
        .expect("GetPods")
        .into_inner();
    pods.items
        .into_iter()
        .map(|pod| {
            let status = pod.status.unwrap_or_default();
            let rs = pod.replica_set.unwrap_or_default();
            PodView {
                revision: rs.revision,
                name: pod.name,
                replica_set: rs.name,
                ip: pod.ip,
                phase: status.phase,
                ready: status.pod_ready,
                terminating: status.terminating,
            }
        })
        .collect()
}

/// Waits until the agent answers what the API server lists; fails if that takes longer than
/// a second after a listing (the cluster may move on in between, so each listing is compared
/// with the agent's answers for up to a second, then listed again).
async fn agrees(agent: &RunningAgent, client: &Client, namespace: &str, deadline: Duration) {
    let started = Instant::now();
    loop {
        let truth = listed(client, namespace).await;
        let listed_at = Instant::now();
        while listed_at.elapsed() < Duration::from_secs(1) {
            let answer = answered(agent, namespace).await;
            let mut sorted = answer.clone();
            sorted.sort();
            if sorted == truth {
                assert_eq!(answer, sorted, "sorted by revision, then name");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            started.elapsed() < deadline,
            "the agent did not catch up with the API server:\nlisted {truth:#?}\nanswered {:#?}",
            answered(agent, namespace).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn get_pods_follows_a_rolling_update_with_both_revisions_and_terminating_pods() {
    let client = common::cluster().await;
    let namespace = TestNamespace::create(&client, "discovery").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    within(
        "create the Deployment",
        Duration::from_secs(10),
        deployments.create(&PostParams::default(), &deployment("busybox:1.36.0")),
    )
    .await
    .unwrap();
    // Every pod of revision 1 ready.
    let started = Instant::now();
    loop {
        let views = listed(&client, ns).await;
        if views.len() == 3 && views.iter().all(|v| v.ready && v.revision == 1) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "rollout 1: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agrees(&agent, &client, ns, Duration::from_secs(30)).await;

    // Roll to a new image; old pods hang in Terminating for their grace period.
    common::roll(&deployments, "busybox:1.36.1").await;
    let started = Instant::now();
    loop {
        let views = listed(&client, ns).await;
        let revisions: BTreeMap<i32, usize> = views.iter().fold(BTreeMap::new(), |mut m, v| {
            *m.entry(v.revision).or_default() += 1;
            m
        });
        if revisions.len() == 2 && views.iter().any(|v| v.terminating) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "rollout 2: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agrees(&agent, &client, ns, Duration::from_secs(30)).await;
    let answer = answered(&agent, ns).await;
    assert!(
        answer.iter().any(|v| v.revision == 1 && v.terminating),
        "{answer:#?}"
    );
    assert!(answer.iter().any(|v| v.revision == 2), "{answer:#?}");

    // The REST route tells the same, with the gRPC field names.
    let url = format!("http://{}/kube/{ns}/web/pods", agent.http_address.unwrap());
    let (code, body) = http_get(&url).await;
    assert_eq!(code, 200, "{body}");
    let items = body["items"].as_array().expect("items");
    assert!(!items.is_empty());
    for item in items {
        for field in ["name", "deployment", "ip", "status", "replicaSet"] {
            assert!(item.get(field).is_some(), "{field} missing in {item}");
        }
    }
    agent.shutdown().await;
}

/// What the other tests stand on, whether a real kubelet or the harness's stand-in runs the
/// pods: each pod becomes Running and Ready with an IP of its own, and a deleted pod stays
/// Terminating for its grace period (its container ignores SIGTERM), then goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn pods_become_ready_and_a_deleted_pod_terminates_after_its_grace_period() {
    const GRACE: Duration = Duration::from_secs(3);
    let client = common::cluster().await;
    let namespace = TestNamespace::create(&client, "pods").await;
    let ns = namespace.name.as_str();
    let mut web = deployment("busybox:1.36.0");
    let template = web.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    template.termination_grace_period_seconds = Some(GRACE.as_secs() as i64);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    within(
        "create the Deployment",
        Duration::from_secs(10),
        deployments.create(&PostParams::default(), &web),
    )
    .await
    .unwrap();
    let mut views = Vec::new();
    common::eventually("3 pods Ready", Duration::from_secs(180), async || {
        views = listed(&client, ns).await;
        views.len() == 3 && views.iter().all(|v| v.ready && v.phase == "Running")
    })
    .await;
    let ips: std::collections::BTreeSet<&str> = views.iter().map(|v| v.ip.as_str()).collect();
    assert!(
        ips.len() == 3 && !ips.contains(""),
        "an IP of its own each: {views:#?}"
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let victim = views[0].name.clone();
    within(
        "delete a pod",
        Duration::from_secs(10),
        pods.delete(&victim, &DeleteParams::default()),
    )
    .await
    .unwrap();
    let deleted_at = Instant::now();
    let terminating = |pod: &Option<Pod>| {
        pod.as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
    };
    let first = within(
        "read the pod",
        Duration::from_secs(10),
        pods.get_opt(&victim),
    )
    .await
    .unwrap();
    assert!(terminating(&first), "Terminating at first: {first:#?}");
    common::eventually(
        "the pod goes",
        GRACE + Duration::from_secs(10),
        async || matches!(pods.get_opt(&victim).await, Ok(None)),
    )
    .await;
    // The deletion timestamp is written in whole seconds, so it may fall up to a second early.
    let lasted = deleted_at.elapsed();
    assert!(
        lasted >= GRACE - Duration::from_secs(1),
        "gone after {lasted:?}, before its grace period of {GRACE:?} ran out"
    );
    eprintln!("deleted pod gone after {lasted:?} (grace period {GRACE:?})");
}

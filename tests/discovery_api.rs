//! `GetPods` wired end to end over in-process reflector stores: the gRPC server and the REST
//! routes answer from the caches (which the test fills and changes the way a watcher would),
//! with every field, both lookups (by Deployment, by pod name), and each error status.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use election_agent::{
    config::Sources,
    discovery::{Caches, Discovery},
    election::ElectionService,
    grpc::pb::{self, election_client::ElectionClient},
    http,
    lease::TermBounds,
    metrics::Metrics,
    server,
    store::{MemoryStore, Store},
};
use http_body_util::BodyExt;
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::Pod,
};
use kube::runtime::{reflector, watcher::Event};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tower::ServiceExt;

/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(5);

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("{name}-uid")},
        "spec": {
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {"metadata": {"labels": {"app": "shop"}}}
        }
    }))
    .unwrap()
}

fn replica_set(name: &str, deployment: &str, revision: &str, ready: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "shop", "uid": format!("{name}-uid"),
            "annotations": {
                "deployment.kubernetes.io/revision": revision,
                "deployment.kubernetes.io/desired-replicas": "2",
                "deployment.kubernetes.io/max-replicas": "3"
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                "uid": format!("{deployment}-uid"), "controller": true
            }]
        },
        "status": {
            "replicas": 2, "readyReplicas": ready, "availableReplicas": ready,
            "fullyLabeledReplicas": 2
        }
    }))
    .unwrap()
}

fn pod(name: &str, replica_set: &str, ip: &str, ready: bool, terminating: bool) -> Pod {
    let ready = if ready { "True" } else { "False" };
    let mut pod = json!({
        "metadata": {
            "name": name, "namespace": "shop", "labels": {"app": "shop"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set,
                "uid": format!("{replica_set}-uid"), "controller": true
            }]
        },
        "status": {
            "phase": "Running", "podIP": ip,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": ready},
                {"type": "ContainersReady", "status": ready}
            ]
        }
    });
    if terminating {
        pod["metadata"]["deletionTimestamp"] = json!("2026-11-21T10:00:00Z");
    }
    serde_json::from_value(pod).unwrap()
}

/// A rolling update half-way: revision 1 has one pod terminating and one still serving,
/// revision 2 has one ready pod and one starting; a second Deployment shares the labels.
fn rolling_update() -> (Vec<Pod>, Vec<ReplicaSet>, Vec<Deployment>) {
    (
        vec![
            pod("web-2-b", "web-2", "", false, false),
            pod("web-1-b", "web-1", "10.0.0.2", true, false),
            pod("web-2-a", "web-2", "10.0.0.3", true, false),
            pod("web-1-a", "web-1", "10.0.0.1", true, true),
            pod("canary-1-a", "canary-1", "10.0.0.9", true, false),
        ],
        vec![
            replica_set("web-1", "web", "1", 1),
            replica_set("web-2", "web", "2", 1),
            replica_set("canary-1", "canary", "1", 1),
        ],
        vec![deployment("web"), deployment("canary")],
    )
}

fn service(discovery: Discovery) -> ElectionService {
    ElectionService::new(
        Store::Memory(MemoryStore::new()),
        Some(discovery),
        TermBounds::default(),
        Arc::new(Metrics::new("test", vec![0.1, 1.0]).unwrap()),
        CancellationToken::new(),
    )
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    let response = tokio::time::timeout(
        WAIT,
        app.clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap()),
    )
    .await
    .expect("answers")
    .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).expect("JSON body"))
}

/// What the REST routes must answer for the rolling update, field for field.
fn expected_items() -> Value {
    let rs = |name: &str, revision: i32| {
        json!({
            "name": name, "revision": revision, "availableReplicas": 1,
            "fullyLabeledReplicas": 2, "readyReplicas": 1, "replicas": 2,
            "desiredReplicas": 2, "maxReplicas": 3
        })
    };
    let status = |ready: bool, terminating: bool| {
        json!({
            "phase": "Running", "reason": "", "terminating": terminating,
            "podScheduled": true, "podInitialized": true, "podReady": ready,
            "containersReady": ready
        })
    };
    json!([
        {"name": "web-1-a", "deployment": "web", "ip": "10.0.0.1",
         "status": status(true, true), "replicaSet": rs("web-1", 1)},
        {"name": "web-1-b", "deployment": "web", "ip": "10.0.0.2",
         "status": status(true, false), "replicaSet": rs("web-1", 1)},
        {"name": "web-2-a", "deployment": "web", "ip": "10.0.0.3",
         "status": status(true, false), "replicaSet": rs("web-2", 2)},
        {"name": "web-2-b", "deployment": "web", "ip": "",
         "status": status(false, false), "replicaSet": rs("web-2", 2)},
    ])
}

#[tokio::test]
async fn rest_lists_a_deployments_pods_by_name_or_by_one_of_its_pods() {
    let (pods, replica_sets, deployments) = rolling_update();
    let app = http::router(
        service(Discovery::from_caches(Caches::from_objects(
            pods,
            replica_sets,
            deployments,
        ))),
        false,
    );
    assert_eq!(get(&app, "/readyz").await.0, StatusCode::OK);

    let (status, body) = get(&app, "/kube/shop/web/pods").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"items": expected_items()}));
    let (status, by_pod) = get(&app, "/kube/shop/pod/web-2-b/pods").await;
    assert_eq!(status, StatusCode::OK, "{by_pod}");
    assert_eq!(by_pod, body);

    for (uri, status, message) in [
        (
            "/kube/shop/api/pods",
            StatusCode::NOT_FOUND,
            "deployment shop/api not found",
        ),
        (
            "/kube/elsewhere/web/pods",
            StatusCode::NOT_FOUND,
            "deployment elsewhere/web not found",
        ),
        (
            "/kube/shop/pod/web-9-z/pods",
            StatusCode::NOT_FOUND,
            "pod shop/web-9-z not found",
        ),
        (
            "/kube/shop/Web_App/pods",
            StatusCode::BAD_REQUEST,
            "invalid deployment",
        ),
        (
            "/kube/Shop/web/pods",
            StatusCode::BAD_REQUEST,
            "invalid namespace",
        ),
    ] {
        let (got, body) = get(&app, uri).await;
        assert_eq!(got, status, "{uri}: {body}");
        let text = body["message"].as_str().expect("a message");
        assert!(text.starts_with(message), "{uri}: {text}");
    }
}

#[tokio::test]
async fn nothing_is_served_and_the_agent_is_unready_until_the_caches_sync() {
    let (pods, mut pod_writer) = reflector::store::<Pod>();
    let (replica_sets, mut rs_writer) = reflector::store::<ReplicaSet>();
    let (deployments, mut deployment_writer) = reflector::store::<Deployment>();
    let app = http::router(
        service(Discovery::from_caches(Caches {
            pods,
            replica_sets,
            deployments,
        })),
        false,
    );
    let (status, body) = get(&app, "/kube/shop/web/pods").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not synced"));
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // The watchers' initial lists arrive.
    let (initial_pods, initial_rs, initial_deployments) = rolling_update();
    pod_writer.apply_watcher_event(&Event::Init);
    for p in initial_pods {
        pod_writer.apply_watcher_event(&Event::InitApply(p));
    }
    pod_writer.apply_watcher_event(&Event::InitDone);
    rs_writer.apply_watcher_event(&Event::Init);
    for rs in initial_rs {
        rs_writer.apply_watcher_event(&Event::InitApply(rs));
    }
    rs_writer.apply_watcher_event(&Event::InitDone);
    deployment_writer.apply_watcher_event(&Event::Init);
    for d in initial_deployments {
        deployment_writer.apply_watcher_event(&Event::InitApply(d));
    }
    deployment_writer.apply_watcher_event(&Event::InitDone);

    tokio::time::timeout(WAIT, async {
        while get(&app, "/readyz").await.0 != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("ready once the caches synced");
    let (status, body) = get(&app, "/kube/shop/web/pods").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"], expected_items());

    // A watch event (the terminating pod is gone) shows in the very next answer.
    pod_writer.apply_watcher_event(&Event::Delete(pod(
        "web-1-a", "web-1", "10.0.0.1", true, true,
    )));
    let (_, body) = get(&app, "/kube/shop/web/pods").await;
    let names: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web-1-b", "web-2-a", "web-2-b"]);
}

/// An agent serving gRPC only, over `caches` that no longer change, and a client of it.
async fn grpc_agent(
    caches: Caches,
) -> (
    server::RunningAgent,
    ElectionClient<tonic::transport::Channel>,
) {
    let config = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_ENABLE", "false")
        .flag("EA_METRIC_ENABLE", "false")
        .resolve()
        .unwrap();
    let agent = server::start_with_discovery(&config, Discovery::fixed(caches))
        .await
        .unwrap();
    let client = ElectionClient::connect(format!("http://{}", agent.grpc_address.unwrap()))
        .await
        .unwrap();
    (agent, client)
}

#[tokio::test]
async fn grpc_get_pods_answers_from_the_caches_with_every_field() {
    let (pods, replica_sets, deployments) = rolling_update();
    let (agent, mut client) =
        grpc_agent(Caches::from_objects(pods, replica_sets, deployments)).await;
    let request = |deployment: &str, pod_name: &str| pb::GetPodsRequest {
        namespace: "shop".into(),
        deployment: deployment.into(),
        pod_name: pod_name.into(),
    };

    let by_deployment = client
        .get_pods(request("web", ""))
        .await
        .unwrap()
        .into_inner();
    let first = &by_deployment.items[0];
    assert_eq!(
        *first,
        pb::Pod {
            name: "web-1-a".into(),
            deployment: "web".into(),
            ip: "10.0.0.1".into(),
            status: Some(pb::PodStatus {
                phase: "Running".into(),
                reason: String::new(),
                terminating: true,
                pod_scheduled: true,
                pod_initialized: true,
                pod_ready: true,
                containers_ready: true,
            }),
            replica_set: Some(pb::ReplicaSet {
                name: "web-1".into(),
                revision: 1,
                available_replicas: 1,
                fully_labeled_replicas: 2,
                ready_replicas: 1,
                replicas: 2,
                desired_replicas: 2,
                max_replicas: 3,
            }),
        }
    );
    let names: Vec<&str> = by_deployment
        .items
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["web-1-a", "web-1-b", "web-2-a", "web-2-b"]);

    // pod_name wins over deployment.
    let by_pod = client
        .get_pods(request("canary", "web-1-b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_pod, by_deployment);

    for (req, code, message) in [
        (request("api", ""), Code::NotFound, "deployment shop/api"),
        (request("", "web-9-z"), Code::NotFound, "pod shop/web-9-z"),
        (request("", ""), Code::InvalidArgument, "invalid deployment"),
    ] {
        let status = client.get_pods(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    agent.shutdown().await;
}

#[test]
fn an_agent_that_cannot_reach_kubernetes_refuses_to_start_and_says_what_to_set() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_election-agent"))
        .env_clear()
        .env("EA_BIND_ADDRESS", "127.0.0.1")
        .env("EA_GRPC_PORT", "0")
        .env("EA_HTTP_PORT", "0")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "election-agent: cannot connect to Kubernetes: no in-cluster service account"
        ) && last.contains("EA_KUBE_IN_CLUSTER=false")
            && last.contains("EA_KUBE_ENABLE=false"),
        "{stderr}"
    );
}

/// The gRPC codec starts its buffers at 1 KiB: an answer many times that size (200 pods, some
/// 40 KiB) still arrives whole, and a request that large is read whole.
#[tokio::test]
async fn grpc_messages_larger_than_the_codecs_buffers_arrive_whole() {
    let (agent, mut client) = grpc_agent(election_agent::bench::synthetic_deployment(
        "big", "web", 200,
    ))
    .await;
    let pods = client
        .get_pods(pb::GetPodsRequest {
            namespace: "big".into(),
            deployment: "web".into(),
            pod_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pods.items.len(), 200);
    let size = prost::Message::encoded_len(&pods);
    assert!(size > 8 * 1024, "{size} bytes");

    let status = client
        .get_pods(pb::GetPodsRequest {
            namespace: "big".into(),
            deployment: "w".repeat(4096),
            pod_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

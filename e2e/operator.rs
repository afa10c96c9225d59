//! The Election operator end to end against a real cluster (`KUBECONFIG`): the CRD installs and
//! refuses bad objects, `kubectl get elections` shows the leader a client campaigned for within
//! a second, managed mode carries the leader label through a rolling update without ever
//! labelling two pods, and deleting an Election gives its lease up.
//!
//! Every test is `#[ignore]`d: `scripts/e2e.sh` runs them when a cluster is configured.

mod common;

use std::time::{Duration, Instant};

use common::{TestNamespace, eventually};
use election_agent::{
    grpc::pb::{self, election_client::ElectionClient},
    operator::crd::Election,
    server::RunningAgent,
};
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tonic::Code;

/// Installs (or updates) the CRD from the code and waits until the API server serves it.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Election::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("election-agent-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the CRD is accepted");
    eventually("CRD Established", Duration::from_secs(30), async || {
        crds.get(&crd.name_any())
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True")
    })
    .await;
}

/// Waits until Election `jobs` shows `leader` with `token`.
async fn shows_leader(elections: &Api<Election>, leader: &str, token: u64) {
    eventually(
        &format!("status shows {leader}"),
        Duration::from_secs(10),
        async || {
            elections
                .get_status("jobs")
                .await
                .ok()
                .and_then(|e| e.status)
                .is_some_and(|s| {
                    s.leader.as_deref() == Some(leader)
                        && s.fencing_token == i64::try_from(token).ok()
                })
        },
    )
    .await;
}

async fn grpc(agent: &RunningAgent) -> ElectionClient<tonic::transport::Channel> {
    ElectionClient::connect(format!("http://{}", agent.grpc_address.unwrap()))
        .await
        .unwrap()
}

/// Creates an Election from raw JSON the way `kubectl apply` does (strict field validation),
/// returning the API server's error status and message when it refuses.
async fn create_raw(client: &Client, namespace: &str, object: &Value) -> Result<(), (u16, String)> {
    let request = axum::http::Request::post(format!(
        "/apis/election-agent.io/v1/namespaces/{namespace}/elections?fieldValidation=Strict"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(object).unwrap())
    .unwrap();
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err((status.code, status.message)),
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn the_api_server_refuses_invalid_elections() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "invalid").await;
    let ns = namespace.name.as_str();
    let election = |name: &str, spec: Value| {
        json!({"apiVersion": "election-agent.io/v1", "kind": "Election",
            "metadata": {"name": name}, "spec": spec})
    };
    create_raw(&client, ns, &election("good", json!({"term": "5s"})))
        .await
        .expect("a valid Election is accepted");
    for (object, field) in [
        (election("negative", json!({"term": "-5s"})), "spec.term"),
        (election("unitless", json!({"term": "5"})), "spec.term"),
        (election("glob", json!({"kind": "a*"})), "spec.kind"),
        (
            election("deployment", json!({"deployment": "Web_App"})),
            "spec.deployment",
        ),
        (
            election("label", json!({"leaderLabel": "not a label"})),
            "spec.leaderLabel",
        ),
        (
            election("unknown", json!({"term": "5s", "colour": "red"})),
            "colour",
        ),
    ] {
        let name = object["metadata"]["name"].clone();
        let (code, message) = create_raw(&client, ns, &object)
            .await
            .expect_err(&format!("{name} must be refused"));
        assert!((400..500).contains(&code), "{name}: {code} {message}");
        assert!(message.contains(field), "{name}: {message}");
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn kubectl_get_elections_shows_the_leader_a_client_campaigned_for_and_delete_resigns() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "status").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;
    let elections: Api<Election> = Api::namespaced(client.clone(), ns);
    let object: Election = serde_json::from_value(json!({
        "apiVersion": "election-agent.io/v1", "kind": "Election",
        "metadata": {"name": "jobs"}, "spec": {"term": "30s"}
    }))
    .unwrap();
    elections
        .create(&PostParams::default(), &object)
        .await
        .unwrap();

    let mut grpc = grpc(&agent).await;
    let won = grpc
        .campaign(pb::CampaignRequest {
            election: "jobs".into(),
            candidate: "alice".into(),
            term: 30_000,
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(won.elected);
    let elected_at = Instant::now();
    shows_leader(&elections, "alice", won.fencing_token).await;
    assert!(
        elected_at.elapsed() < Duration::from_secs(1),
        "status within 1 s of the election: {:?}",
        elected_at.elapsed()
    );

    // What `kubectl get elections` prints: the API server's Table of the printer columns.
    let request = axum::http::Request::get(format!(
        "/apis/election-agent.io/v1/namespaces/{ns}/elections"
    ))
    .header(
        "accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .unwrap();
    let table: Value = serde_json::from_str(&client.request_text(request).await.unwrap()).unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Leader", "Token", "Revision", "Ready", "Age"]
    );
    let row = &table["rows"][0]["cells"];
    assert_eq!((&row[0], &row[1]), (&json!("jobs"), &json!("alice")));
    assert_eq!(row[2], json!(won.fencing_token));

    // A handover shows within a second too.
    let handed = grpc
        .handover(pb::HandoverRequest {
            election: "jobs".into(),
            leader: "bob".into(),
            term: 30_000,
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let changed_at = Instant::now();
    shows_leader(&elections, "bob", handed.fencing_token).await;
    let status = elections.get_status("jobs").await.unwrap().status.unwrap();
    assert!(status.transitions >= 1, "{status:#?}");
    assert!(
        changed_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        changed_at.elapsed()
    );

    // Deleting the Election gives the lease up (finalizer), then the object goes.
    elections
        .delete("jobs", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Election gone", Duration::from_secs(10), async || {
        elections.get_opt("jobs").await.unwrap().is_none()
    })
    .await;
    let gone = grpc
        .get_leader(pb::GetLeaderRequest {
            election: "jobs".into(),
            kind: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    agent.shutdown().await;
}

/// The pods carrying the leader label, and the revision of each pod's ReplicaSet.
async fn labelled_pods(client: &Client, namespace: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.list(&ListParams::default().labels("app=web,election-agent.io/leader=true"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect()
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn managed_mode_carries_the_leader_label_through_a_rolling_update() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "managed").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(
            &PostParams::default(),
            &common::deployment("busybox:1.36.0"),
        )
        .await
        .unwrap();
    let elections: Api<Election> = Api::namespaced(client.clone(), ns);
    let object: Election = serde_json::from_value(json!({
        "apiVersion": "election-agent.io/v1", "kind": "Election",
        "metadata": {"name": "web-leader"},
        "spec": {"term": "5s", "deployment": "web", "managed": true}
    }))
    .unwrap();
    elections
        .create(&PostParams::default(), &object)
        .await
        .unwrap();

    eventually(
        "a labelled revision-1 leader",
        Duration::from_secs(180),
        async || {
            let status = elections
                .get_status("web-leader")
                .await
                .ok()
                .and_then(|e| e.status);
            let labelled = labelled_pods(&client, ns).await;
            status.is_some_and(|s| {
                s.leader_revision == Some(1)
                    && s.leader.as_ref().is_some_and(|l| labelled == [l.clone()])
            })
        },
    )
    .await;

    // Roll to a new image and watch the label the whole way: never on two pods.
    common::roll(&deployments, "busybox:1.36.1").await;
    let started = Instant::now();
    loop {
        let labelled = labelled_pods(&client, ns).await;
        assert!(labelled.len() <= 1, "two leaders labelled: {labelled:?}");
        let status = elections
            .get_status("web-leader")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let moved = status.leader_revision == Some(2)
            && status
                .leader
                .as_ref()
                .is_some_and(|l| labelled == [l.clone()]);
        if moved {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "leadership did not move to revision 2: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deleting the Election takes the label off and gives the lease up.
    elections
        .delete("web-leader", &DeleteParams::default())
        .await
        .unwrap();
    eventually("label removed", Duration::from_secs(10), async || {
        labelled_pods(&client, ns).await.is_empty()
    })
    .await;
    let gone = grpc(&agent)
        .await
        .get_leader(pb::GetLeaderRequest {
            election: "web-leader".into(),
            kind: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    agent.shutdown().await;
}

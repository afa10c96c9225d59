//! The Election operator end to end against a real cluster (`KUBECONFIG`): the CRD installs and
//! refuses bad objects; `kubectl get elections` shows the leader a client campaigned for within
//! a second, and deleting an Election gives its lease up; managed mode carries the leader label
//! through a rolling update without ever labelling two pods, moves it off a deleted leader pod
//! within two seconds, gives the lease up when no pod is left, follows a change of the label's
//! name and takes the label off when the Election stops being managed; and of two agent
//! processes sharing one Redis store, exactly one runs the controller, the other taking over
//! within the controller's term when it dies, and at once when it shuts down. The Helm chart's
//! scenario (`operator/chart.rs`) installs the chart and runs the agent as its ServiceAccount.
//!
//! Every test is `#[ignore]`d: `scripts/e2e.sh` runs them when a cluster is configured.

mod common;
// The Helm chart's scenario, over this file's helpers.
#[path = "operator/chart.rs"]
mod chart;

use std::time::{Duration, Instant};

use common::{
    TestNamespace, eventually, http_get,
    processes::{AgentProcess, RedisServer},
    until, within,
};
use election_agent::{
    election::CONTROLLER_KIND,
    grpc::pb::{self, election_client::ElectionClient},
    operator::crd::{Election, ElectionStatus},
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
use tonic::{Code, transport::Channel};

/// The label managed mode puts on the leader pod unless `spec.leaderLabel` says otherwise.
const LEADER_LABEL: &str = "election-agent.io/leader";
/// The Redis key of the lease the agent replicas campaign for to run the controller: kind
/// `election-agent.io`, election `controller`, under the default key prefix `ela` (the record
/// of an election is the hash `[prefix]/lease/[kind]/[name]`; its field `h` is the holder).
fn controller_lease_key() -> String {
    format!("ela/lease/{CONTROLLER_KIND}/controller")
}
/// What an agent logs when it starts running the controller.
const LEADING: &str = "leading: running the Election controller";

/// Installs (or updates) the CRD from the code and waits until the API server serves it.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Election::crd();
    within(
        "install the CRD",
        Duration::from_secs(30),
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("election-agent-e2e").force(),
            &Patch::Apply(&crd),
        ),
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

/// The status of Election `name` (empty when it has none yet).
async fn status(elections: &Api<Election>, name: &str) -> ElectionStatus {
    within(
        "read the Election",
        Duration::from_secs(10),
        elections.get_status(name),
    )
    .await
    .expect("read the Election")
    .status
    .unwrap_or_default()
}

/// The status of condition `kind` ("True"/"False"), if the status has it.
fn condition(status: &ElectionStatus, kind: &str) -> Option<String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// Waits at most `limit` until Election `name` shows `leader` with `token`.
async fn shows_leader(
    elections: &Api<Election>,
    name: &str,
    leader: &str,
    token: u64,
    limit: Duration,
) {
    eventually(&format!("status shows {leader}"), limit, async || {
        let status = status(elections, name).await;
        status.leader.as_deref() == Some(leader)
            && status.fencing_token == i64::try_from(token).ok()
    })
    .await;
}

/// A gRPC client of the agent at `url`.
async fn grpc_at(url: String) -> ElectionClient<Channel> {
    within(
        "connect over gRPC",
        Duration::from_secs(10),
        ElectionClient::connect(url),
    )
    .await
    .expect("connect over gRPC")
}

async fn grpc(agent: &RunningAgent) -> ElectionClient<Channel> {
    grpc_at(format!("http://{}", agent.grpc_address.unwrap())).await
}

/// The leader of election `name` (kind `default`) over gRPC, or the error status.
async fn leader_of(grpc: &mut ElectionClient<Channel>, name: &str) -> Result<String, Code> {
    let request = pb::GetLeaderRequest {
        election: name.into(),
        kind: String::new(),
    };
    within(
        "GetLeader",
        Duration::from_secs(10),
        grpc.get_leader(request),
    )
    .await
    .map(|answer| answer.into_inner().value)
    .map_err(|status| status.code())
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
    match within(
        "create an Election",
        Duration::from_secs(10),
        client.request_text(request),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err((status.code, status.message)),
        Err(other) => panic!("{other}"),
    }
}

/// Creates Election `name` of `spec`.
async fn create_election(elections: &Api<Election>, name: &str, spec: Value) {
    let object: Election = serde_json::from_value(json!({
        "apiVersion": "election-agent.io/v1", "kind": "Election",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    within(
        "create the Election",
        Duration::from_secs(10),
        elections.create(&PostParams::default(), &object),
    )
    .await
    .expect("create the Election");
}

/// Merge-patches the spec of Election `name`.
async fn patch_spec(elections: &Api<Election>, name: &str, spec: Value) {
    within(
        "patch the Election",
        Duration::from_secs(10),
        elections.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": spec})),
        ),
    )
    .await
    .expect("patch the Election");
}

/// The pods of Deployment `web` that match the label `selector` (e.g. `key=true`, or `key` for
/// any value), by name.
async fn pods_labelled(client: &Client, namespace: &str, selector: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut names: Vec<String> = within(
        "list pods",
        Duration::from_secs(10),
        pods.list(&ListParams::default().labels(&format!("app=web,{selector}"))),
    )
    .await
    .expect("list pods")
    .items
    .iter()
    .map(|p| p.name_any())
    .collect();
    names.sort();
    names
}

/// Deployment `web` (3 pods) and the managed Election `web-leader` over it.
async fn managed_web(client: &Client, namespace: &str) -> (Api<Deployment>, Api<Election>) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    within(
        "create the Deployment",
        Duration::from_secs(10),
        deployments.create(
            &PostParams::default(),
            &common::deployment("busybox:1.36.0"),
        ),
    )
    .await
    .expect("create the Deployment");
    let elections: Api<Election> = Api::namespaced(client.clone(), namespace);
    create_election(
        &elections,
        "web-leader",
        json!({"term": "5s", "deployment": "web", "managed": true}),
    )
    .await;
    (deployments, elections)
}

/// Waits until the status of `web-leader` names a leader of `revision` that is the one pod
/// labelled `label=true`; its name.
async fn labelled_leader(
    client: &Client,
    elections: &Api<Election>,
    namespace: &str,
    label: &str,
    revision: i32,
) -> String {
    let mut leader = String::new();
    until(
        &format!("a revision-{revision} leader labelled {label}"),
        Duration::from_secs(180),
        async || {
            let status = status(elections, "web-leader").await;
            let labelled = pods_labelled(client, namespace, &format!("{label}=true")).await;
            match status.leader {
                Some(name)
                    if status.leader_revision == Some(revision) && labelled == [name.as_str()] =>
                {
                    leader = name;
                    Ok(())
                }
                other => Err(format!(
                    "leader {other:?} of revision {:?}, labelled {labelled:?}",
                    status.leader_revision
                )),
            }
        },
    )
    .await;
    leader
}

/// Deletes pod `leader` (which lingers in Terminating) and waits at most `limit` until the
/// leader label is on another Ready pod — never on two pods meanwhile; that pod's name.
async fn label_moves_off_deleted(
    client: &Client,
    elections: &Api<Election>,
    ns: &str,
    leader: &str,
    limit: Duration,
) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    within(
        "delete the leader pod",
        Duration::from_secs(10),
        pods.delete(leader, &DeleteParams::default()),
    )
    .await
    .expect("delete the leader pod");
    let deleted_at = Instant::now();
    let next = loop {
        let labelled = pods_labelled(client, ns, LEADER_LABEL).await;
        assert!(labelled.len() <= 1, "two pods labelled: {labelled:?}");
        if let [pod] = labelled.as_slice()
            && pod != leader
        {
            let pod = within("read the pod", Duration::from_secs(10), pods.get(pod))
                .await
                .expect("the labelled pod");
            assert!(
                common::ready(&pod),
                "labelled a pod that may not lead: {pod:#?}"
            );
            break pod.name_any();
        }
        assert!(
            deleted_at.elapsed() < limit,
            "the label did not move off the deleted leader {leader} within {limit:?}: \
             {labelled:?}\n{:#?}",
            status(elections, "web-leader").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "leader pod {leader} deleted: label on {next} after {:?}",
        deleted_at.elapsed()
    );
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    ] {
        let name = object["metadata"]["name"].clone();
        let (code, message) = create_raw(&client, ns, &object)
            .await
            .expect_err(&format!("{name} must be refused"));
        assert!((400..500).contains(&code), "{name}: {code} {message}");
        assert!(message.contains(field), "{name}: {message}");
    }

    // An unknown field: refused by the API server's strict field validation where it has it
    // (on by default from Kubernetes 1.25; before, `?fieldValidation=Strict` is ignored and
    // `kubectl apply` refuses the field itself, from the schema the API server publishes) —
    // and either way never stored, as the CRD's structural schema prunes it.
    let unknown = election("unknown", json!({"term": "5s", "colour": "red"}));
    let version = within(
        "the API server's version",
        Duration::from_secs(10),
        client.apiserver_version(),
    )
    .await
    .expect("the API server's version");
    let minor: u32 = version
        .minor
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .expect("a numeric minor version");
    match create_raw(&client, ns, &unknown).await {
        Err((code, message)) => {
            assert!((400..500).contains(&code), "unknown: {code} {message}");
            assert!(message.contains("colour"), "unknown: {message}");
        }
        Ok(()) => {
            assert!(
                version.major == "1" && minor < 25,
                "Kubernetes {}.{minor} validates fields strictly by default, yet accepted an \
                 unknown field",
                version.major
            );
            // Read as the API server stores it (not through the typed spec, which would drop
            // an unknown field itself).
            let request = axum::http::Request::get(format!(
                "/apis/election-agent.io/v1/namespaces/{ns}/elections/unknown"
            ))
            .body(Vec::new())
            .unwrap();
            let stored = within(
                "read the Election",
                Duration::from_secs(10),
                client.request_text(request),
            )
            .await
            .expect("the accepted Election");
            let stored: Value = serde_json::from_str(&stored).unwrap();
            assert_eq!(stored["spec"]["term"], json!("5s"), "{stored}");
            assert_eq!(stored["spec"].get("colour"), None, "pruned: {stored}");
            eprintln!(
                "Kubernetes 1.{minor} has no strict field validation by default: the unknown \
                 field was accepted and pruned (kubectl refuses it client-side)"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn kubectl_get_elections_shows_the_leader_a_client_campaigned_for_and_delete_resigns() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "status").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;
    let elections: Api<Election> = Api::namespaced(client.clone(), ns);
    create_election(&elections, "jobs", json!({"term": "30s"})).await;

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
    shows_leader(
        &elections,
        "jobs",
        "alice",
        won.fencing_token,
        Duration::from_secs(10),
    )
    .await;
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
    let table = within(
        "kubectl get elections",
        Duration::from_secs(10),
        client.request_text(request),
    )
    .await
    .unwrap();
    let table: Value = serde_json::from_str(&table).unwrap();
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
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let changed_at = Instant::now();
    shows_leader(
        &elections,
        "jobs",
        "bob",
        handed.fencing_token,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        changed_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        changed_at.elapsed()
    );
    let status = status(&elections, "jobs").await;
    assert!(status.transitions >= 1, "{status:#?}");

    // Deleting the Election gives the lease up (finalizer), then the object goes.
    within(
        "delete the Election",
        Duration::from_secs(10),
        elections.delete("jobs", &DeleteParams::default()),
    )
    .await
    .unwrap();
    eventually("Election gone", Duration::from_secs(10), async || {
        matches!(elections.get_opt("jobs").await, Ok(None))
    })
    .await;
    assert_eq!(leader_of(&mut grpc, "jobs").await, Err(Code::NotFound));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn managed_mode_carries_the_leader_label_through_a_rolling_update() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "managed").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;
    let (deployments, elections) = managed_web(&client, ns).await;
    labelled_leader(&client, &elections, ns, LEADER_LABEL, 1).await;

    // Roll to a new image and watch the label the whole way: never on two pods.
    common::roll(&deployments, "busybox:1.36.1").await;
    let started = Instant::now();
    loop {
        let labelled = pods_labelled(&client, ns, LEADER_LABEL).await;
        assert!(labelled.len() <= 1, "two leaders labelled: {labelled:?}");
        let status = status(&elections, "web-leader").await;
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
    within(
        "delete the Election",
        Duration::from_secs(10),
        elections.delete("web-leader", &DeleteParams::default()),
    )
    .await
    .unwrap();
    eventually("label removed", Duration::from_secs(10), async || {
        pods_labelled(&client, ns, LEADER_LABEL).await.is_empty()
    })
    .await;
    assert_eq!(
        leader_of(&mut grpc(&agent).await, "web-leader").await,
        Err(Code::NotFound)
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn managed_mode_moves_the_label_off_a_deleted_leader_within_2_s_and_resigns_when_no_pod_is_left()
 {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "leader-gone").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;
    let (deployments, elections) = managed_web(&client, ns).await;
    let first = labelled_leader(&client, &elections, ns, LEADER_LABEL, 1).await;

    // The leader pod is deleted (it lingers in Terminating): the label moves to another Ready
    // pod within 2 s, and is never on two pods meanwhile.
    let next =
        label_moves_off_deleted(&client, &elections, ns, &first, Duration::from_secs(2)).await;
    eventually(
        "the status names the new leader",
        Duration::from_secs(5),
        async || status(&elections, "web-leader").await.leader.as_deref() == Some(next.as_str()),
    )
    .await;

    // No pod left (all terminating, then gone): nobody may lead, so the lease is given up.
    within(
        "scale the Deployment to 0",
        Duration::from_secs(10),
        deployments.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 0}})),
        ),
    )
    .await
    .expect("scale the Deployment to 0");
    until(
        "LeaderElected False, no pod labelled",
        Duration::from_secs(20),
        async || {
            let status = status(&elections, "web-leader").await;
            let elected = condition(&status, "LeaderElected");
            let labelled = pods_labelled(&client, ns, LEADER_LABEL).await;
            if elected.as_deref() == Some("False") && status.leader.is_none() && labelled.is_empty()
            {
                Ok(())
            } else {
                Err(format!(
                    "LeaderElected {elected:?}, leader {:?}, labelled {labelled:?}",
                    status.leader
                ))
            }
        },
    )
    .await;
    assert_eq!(
        leader_of(&mut grpc(&agent).await, "web-leader").await,
        Err(Code::NotFound),
        "the lease is given up"
    );
    let url = format!(
        "http://{}/election/default/web-leader",
        agent.http_address.unwrap()
    );
    let (code, body) = http_get(&url).await;
    assert_eq!(code, 404, "{body}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn a_renamed_leader_label_leaves_no_pod_with_the_old_one_and_unmanaging_removes_it() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "relabel").await;
    let ns = namespace.name.as_str();
    let agent = common::agent(ns).await;
    let (_deployments, elections) = managed_web(&client, ns).await;
    labelled_leader(&client, &elections, ns, LEADER_LABEL, 1).await;

    // Another label: the leader carries the new one, and no pod keeps the old one (a Service
    // still selecting the old label must not keep routing to a pod as if it led).
    const NEW_LABEL: &str = "example.com/primary";
    patch_spec(&elections, "web-leader", json!({"leaderLabel": NEW_LABEL})).await;
    until(
        "the new label on the leader only, the old one on no pod",
        Duration::from_secs(15),
        async || {
            let leader = status(&elections, "web-leader").await.leader;
            let new = pods_labelled(&client, ns, &format!("{NEW_LABEL}=true")).await;
            let old = pods_labelled(&client, ns, LEADER_LABEL).await;
            match &leader {
                Some(leader) if old.is_empty() && new == [leader.as_str()] => Ok(()),
                _ => Err(format!(
                    "leader {leader:?}, old label on {old:?}, new label on {new:?}"
                )),
            }
        },
    )
    .await;

    // Not managed any more: no pod keeps a leader label, old or new.
    patch_spec(&elections, "web-leader", json!({"managed": false})).await;
    until(
        "no leader label on any pod",
        Duration::from_secs(15),
        async || {
            let old = pods_labelled(&client, ns, LEADER_LABEL).await;
            let new = pods_labelled(&client, ns, NEW_LABEL).await;
            if old.is_empty() && new.is_empty() {
                Ok(())
            } else {
                Err(format!("old label on {old:?}, new label on {new:?}"))
            }
        },
    )
    .await;
    agent.shutdown().await;
}

/// The holder of the controller lease in `redis`, if anyone holds it.
async fn controller_holder(redis: &RedisServer) -> Option<String> {
    redis
        .command(&["HGET", &controller_lease_key(), "h"])
        .await
        .unwrap_or_else(|err| panic!("read the controller lease: {err}"))
}

/// Whether `agent` holds the controller lease (its holder is the agent's `HOSTNAME` with a
/// random suffix).
fn holds(holder: Option<&str>, agent: &AgentProcess) -> bool {
    holder.is_some_and(|h| {
        h.strip_prefix(&agent.hostname)
            .is_some_and(|suffix| suffix.starts_with('-'))
    })
}

/// Waits until `agent` holds the controller lease and logs that it runs the controller; how long
/// that took from `since`. Fails after `limit`.
async fn takes_over(
    redis: &RedisServer,
    agent: &AgentProcess,
    since: Instant,
    limit: Duration,
) -> Duration {
    loop {
        let holder = controller_holder(redis).await;
        if holds(holder.as_deref(), agent) {
            let took = since.elapsed();
            eventually(
                &format!("{} logs that it leads", agent.hostname),
                Duration::from_secs(2),
                async || agent.log_text().contains(LEADING),
            )
            .await;
            return took;
        }
        assert!(
            since.elapsed() < limit,
            "{} did not take the controller over within {limit:?}; holder {holder:?}",
            agent.hostname
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Hands election `jobs` over to `leader` through `agent`'s API; the new token.
async fn hand_over(agent: &AgentProcess, leader: &str) -> u64 {
    let mut grpc = grpc_at(agent.grpc_url()).await;
    let request = pb::HandoverRequest {
        election: "jobs".into(),
        leader: leader.into(),
        term: 30_000,
        kind: String::new(),
        ..Default::default()
    };
    within("Handover", Duration::from_secs(10), grpc.handover(request))
        .await
        .expect("Handover")
        .into_inner()
        .fencing_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn of_two_agents_on_one_store_the_other_runs_the_controller_when_its_holder_dies_or_stops() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "replicas").await;
    let ns = namespace.name.as_str();
    // Declared after the namespace, so they are stopped before it is cleaned up.
    let redis = RedisServer::start().await;
    let mut agents = [
        AgentProcess::start("agent-a", &redis.url(), ns).await,
        AgentProcess::start("agent-b", &redis.url(), ns).await,
    ];
    let elections: Api<Election> = Api::namespaced(client.clone(), ns);
    create_election(&elections, "jobs", json!({"term": "30s"})).await;

    // One of them holds the controller lease; the status follows a campaign made through the
    // other one's API (the store announces it to the holder).
    let mut holder = None;
    eventually(
        "an agent holds the controller lease",
        Duration::from_secs(10),
        async || {
            let current = controller_holder(&redis).await;
            holder = agents.iter().position(|a| holds(current.as_deref(), a));
            holder.is_some()
        },
    )
    .await;
    let holder = holder.unwrap();
    let survivor = 1 - holder;
    let mut grpc = grpc_at(agents[survivor].grpc_url()).await;
    let won = within(
        "Campaign",
        Duration::from_secs(10),
        grpc.campaign(pb::CampaignRequest {
            election: "jobs".into(),
            candidate: "alice".into(),
            term: 30_000,
            kind: String::new(),
        }),
    )
    .await
    .expect("Campaign")
    .into_inner();
    assert!(won.elected);
    shows_leader(
        &elections,
        "jobs",
        "alice",
        won.fencing_token,
        Duration::from_secs(5),
    )
    .await;

    // SIGKILL: the holder cannot resign, so the other takes over once the lease runs out —
    // within the controller term (3 s) and the campaign interval (a third of it), with slack.
    agents[holder].kill();
    let took = takes_over(
        &redis,
        &agents[survivor],
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "{} killed: {} runs the controller after {took:?}",
        agents[holder].hostname, agents[survivor].hostname
    );
    let token = hand_over(&agents[survivor], "bob").await;
    shows_leader(&elections, "jobs", "bob", token, Duration::from_secs(5)).await;

    // A third agent joins; SIGTERM the holder: it resigns as it shuts down, so the newcomer
    // takes over at its next campaign (a third of the term), not after a whole term.
    let mut newcomer = AgentProcess::start("agent-c", &redis.url(), ns).await;
    assert!(
        holds(
            controller_holder(&redis).await.as_deref(),
            &agents[survivor]
        ),
        "a newcomer does not take a live controller lease"
    );
    agents[survivor].terminate();
    let took = takes_over(
        &redis,
        &newcomer,
        Instant::now(),
        Duration::from_millis(1_500),
    )
    .await;
    eprintln!(
        "{} terminated: {} runs the controller after {took:?}",
        agents[survivor].hostname, newcomer.hostname
    );
    let exit = agents[survivor].exited(Duration::from_secs(15)).await;
    assert!(exit.success(), "a clean shutdown: {exit}");
    let token = hand_over(&newcomer, "carol").await;
    shows_leader(&elections, "jobs", "carol", token, Duration::from_secs(5)).await;
    newcomer.terminate();
    newcomer.exited(Duration::from_secs(15)).await;
}

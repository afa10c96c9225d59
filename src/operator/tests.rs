//! The controller against kube-rs' mock API server (`tower_test`): each test states the requests a
//! reconcile makes, in order, and answers them.

use axum::http::{Request, Response};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        core::v1::Pod,
    },
    jiff::Timestamp,
};
use kube::{
    client::Body,
    runtime::{controller::Action, reflector},
};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use std::time::Instant;

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
    caches_showing_label(true)
}

/// [`caches`], with `web-1-a` showing the leader label or not (a label added a moment ago, that
/// the watch has not shown yet).
fn caches_showing_label(label_shown: bool) -> Caches {
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
            pod("web-1-a", "web-1", "True", label_shown, 1),
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
        e.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::now(),
        ));
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
        elections: elections.into(),
        metrics: OperatorMetrics::register(&Registry::new()).unwrap(),
        leading: Leading::until(Instant::now() + Duration::from_secs(3_600)),
        labelled: labels::Labelled::default(),
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
    if body.is_null() {
        body = json!({}); // a GET: only its query to show
    }
    if let Value::Object(map) = &mut body {
        map.insert("query".into(), json!(query));
    }
    body
}

fn service() -> ElectionService {
    service_over(caches())
}

fn service_over(caches: Caches) -> ElectionService {
    ElectionService::new(
        Store::Memory(MemoryStore::new()),
        Some(Discovery::from_caches(caches)),
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
    expect_relabelled(api, pod, "election-agent.io/leader", Value::Null).await;
}

async fn expect_relabelled(api: &mut ApiServer, pod: &str, label: &str, value: Value) {
    let path = format!("/api/v1/namespaces/shop/pods/{pod}");
    let patched = expect(api, "PATCH", &path, Some(json!({}))).await;
    assert_eq!(patched["metadata"]["labels"], json!({label: value}));
}

/// Expects the status of `election` applied, and returns the patch.
async fn expect_status_applied(api: &mut ApiServer, election: &Election) -> Value {
    let path = "/apis/election-agent.io/v1/namespaces/shop/elections/jobs/status";
    let answer = serde_json::to_value(election).unwrap();
    expect(api, "PATCH", path, Some(answer)).await
}

/// Expects an Event recorded, and returns it.
async fn expect_event(api: &mut ApiServer) -> Value {
    expect(
        api,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/shop/events",
        None,
    )
    .await
}

/// Expects the list of the pods carrying `label`, and answers that `carrying` do.
async fn expect_label_listed(api: &mut ApiServer, label: &str, carrying: &[&str]) {
    let items: Vec<Value> = carrying
        .iter()
        .map(|pod| json!({"metadata": {"name": pod, "namespace": "shop", "labels": {label: "true"}}}))
        .collect();
    let list = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
        "metadata": {"resourceVersion": "9"}, "items": items});
    let asked = expect(api, "GET", "/api/v1/namespaces/shop/pods", Some(list)).await;
    let query = asked["query"].as_str().unwrap_or_default().to_owned();
    let selector = format!("labelSelector={}", label.replace('/', "%2F"));
    assert!(query.contains(&selector), "{query}");
}

#[tokio::test]
async fn managed_mode_moves_leadership_and_the_label_to_the_new_revision() {
    let (mut api, service, election, reconciling, metrics) = reconciling(false).await;

    // The old leader loses the label before the new one gets it, as the API server has them.
    expect_label_listed(&mut api, "election-agent.io/leader", &["web-1-a"]).await;
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
    let applied = expect_status_applied(&mut api, &election).await;
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
    assert_eq!(
        status["labelled"],
        json!({"label": "election-agent.io/leader", "deployment": "web"}),
        "where the label is, to take it off when that changes"
    );
    let leaders: Vec<&str> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["leader"] == true)
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(leaders, ["web-2-a"]);

    // And an Event saying so.
    let event = expect_event(&mut api).await;
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
    let (mut api, service, election, reconciling, metrics) = reconciling(true).await;
    // What an earlier reconcile exported about it.
    let leading = crd::ElectionStatus {
        leader: Some("web-1-a".into()),
        ..Default::default()
    };
    metrics.observe_election(&election, &leading);

    expect_label_listed(&mut api, "election-agent.io/leader", &["web-1-a"]).await;
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
    assert!(
        metrics
            .has_leader
            .remove_label_values(&["shop", "jobs"])
            .is_err(),
        "a deleted Election's series are gone"
    );
}

/// The gauges of an Election not in managed mode follow its lease: a leader, then none once the
/// lease ended — seen without any other trigger, as the controller looks again when the lease
/// would expire — and since when it has had none.
#[tokio::test]
async fn an_elections_gauges_say_whether_it_has_a_leader_and_since_when_not() {
    let (mock, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let service = service();
    service
        .campaign("default", "jobs", "alice", 15_000)
        .await
        .unwrap();
    let mut election = election(false);
    election.spec.deployment = None;
    election.spec.managed = false;
    let ctx = context(client, service.clone(), &election);
    let metrics = ctx.metrics.clone();
    let labels = ["shop", "jobs"];
    let gauges = || {
        (
            metrics.has_leader.with_label_values(&labels).get(),
            metrics.leaderless_since.with_label_values(&labels).get(),
            metrics.term.with_label_values(&labels).get(),
            metrics
                .election_leader_changes
                .with_label_values(&labels)
                .get(),
        )
    };

    let reconciling = tokio::spawn(reconcile(Arc::new(election.clone()), ctx.clone()));
    let applied = expect_status_applied(&mut api, &election).await;
    assert_eq!(applied["status"]["leader"], "alice");
    expect_event(&mut api).await;
    let action = reconciling.await.unwrap().unwrap();
    let (has_leader, since, term, changes) = gauges();
    assert_eq!((has_leader, since, term, changes), (1, 0.0, 15.0, 1));
    // The lease's time to live as the store answered, plus 50 ms.
    assert!(
        (14_000..=15_050).any(|ms| action == Action::requeue(Duration::from_millis(ms))),
        "looks again when the lease would expire: {action:?}"
    );

    // The lease ends (here by resigning; expiring is the same to the controller).
    service.resign("default", "jobs", "alice").await.unwrap();
    election.status = Some(serde_json::from_value(applied["status"].clone()).unwrap());
    let before = Timestamp::now().as_second() as f64;
    let reconciling = tokio::spawn(reconcile(Arc::new(election.clone()), ctx));
    let applied = expect_status_applied(&mut api, &election).await;
    assert_eq!(applied["status"].get("leader"), None);
    assert_eq!(expect_event(&mut api).await["reason"], "NoLeader");
    reconciling.await.unwrap().unwrap();
    let (has_leader, since, term, changes) = gauges();
    assert_eq!((has_leader, term, changes), (0, 15.0, 2));
    assert!(
        since >= before && since <= Timestamp::now().as_second() as f64 + 1.0,
        "no leader since the reconcile that saw the lease end: {since} (from {before})"
    );
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

/// Starts a reconcile of `election` over `caches`, `leader` leading its lease.
async fn start_reconcile(
    caches: Caches,
    election: &Election,
    leader: &str,
    leading: Leading,
) -> (
    ApiServer,
    ElectionService,
    tokio::task::JoinHandle<Result<Action, OperatorError>>,
) {
    let (mock, api) = mock::pair::<Request<Body>, Response<Body>>();
    let service = service_over(caches);
    service
        .campaign("default", "jobs", leader, 15_000)
        .await
        .unwrap();
    let ctx = Arc::new(Context {
        leading,
        ..Arc::into_inner(context(
            Client::new(mock, "default"),
            service.clone(),
            election,
        ))
        .unwrap()
    });
    let reconciling = tokio::spawn(reconcile(Arc::new(election.clone()), ctx));
    (api, service, reconciling)
}

fn held() -> Leading {
    Leading::until(Instant::now() + Duration::from_secs(3_600))
}

/// The race of the operator review: the controller labelled `web-1-a` a moment ago, the watch
/// has not shown it yet, and leadership moves on to `web-2-a`. Moving the label by the cache
/// alone would only add it to `web-2-a` — two labelled pods. The pods carrying it are listed
/// from the API server first, and `web-1-a` loses it before `web-2-a` gets it.
#[tokio::test]
async fn a_second_leader_change_racing_a_stale_cache_leaves_one_label() {
    let election = election(false);
    let (mut api, _, reconciling) =
        start_reconcile(caches_showing_label(false), &election, "web-1-a", held()).await;
    expect_label_listed(&mut api, "election-agent.io/leader", &["web-1-a"]).await;
    expect_label_removed(&mut api, "web-1-a").await;
    expect_relabelled(
        &mut api,
        "web-2-a",
        "election-agent.io/leader",
        json!("true"),
    )
    .await;
    let applied = expect_status_applied(&mut api, &election).await;
    assert_eq!(applied["status"]["leader"], "web-2-a");
    expect_event(&mut api).await;
    reconciling.await.unwrap().unwrap();
}

/// `spec.leaderLabel` changed, and then managed mode switched off: the label the status says was
/// put on is taken off the Deployment's pods, as the API server lists them, and the status
/// forgets it.
#[tokio::test]
async fn a_changed_label_or_managed_mode_switched_off_takes_the_old_label_off() {
    let mut election = election(false);
    election.spec.leader_label = "example.com/primary".into();
    election.status = Some(crd::ElectionStatus {
        labelled: Some(crd::LabelledPods {
            label: crd::DEFAULT_LEADER_LABEL.into(),
            deployment: "web".into(),
        }),
        ..Default::default()
    });
    let (mut api, _, reconciling) = start_reconcile(caches(), &election, "web-2-a", held()).await;
    // The old label, off the pods the API server says carry it (not only those the cache shows).
    expect_label_listed(&mut api, crd::DEFAULT_LEADER_LABEL, &["web-1-a", "web-2-b"]).await;
    expect_label_removed(&mut api, "web-1-a").await;
    expect_label_removed(&mut api, "web-2-b").await;
    // The new one, on the leader.
    expect_label_listed(&mut api, "example.com/primary", &[]).await;
    expect_relabelled(&mut api, "web-2-a", "example.com/primary", json!("true")).await;
    let applied = expect_status_applied(&mut api, &election).await;
    assert_eq!(
        applied["status"]["labelled"],
        json!({"label": "example.com/primary", "deployment": "web"})
    );
    expect_event(&mut api).await;
    reconciling.await.unwrap().unwrap();

    // Managed mode off: the label comes off, and nothing is labelled again.
    election.spec.managed = false;
    election.status = Some(crd::ElectionStatus {
        labelled: Some(crd::LabelledPods {
            label: "example.com/primary".into(),
            deployment: "web".into(),
        }),
        ..Default::default()
    });
    let (mut api, _, reconciling) = start_reconcile(caches(), &election, "web-2-a", held()).await;
    expect_label_listed(&mut api, "example.com/primary", &["web-2-a"]).await;
    expect_relabelled(&mut api, "web-2-a", "example.com/primary", Value::Null).await;
    let applied = expect_status_applied(&mut api, &election).await;
    assert_eq!(applied["status"].get("labelled"), None);
    assert_eq!(
        applied["status"]["leader"], "web-2-a",
        "the lease itself is left alone"
    );
    expect_event(&mut api).await;
    reconciling.await.unwrap().unwrap();
}

/// A controller whose lease ran out by its own clock (its renewal hangs, say) writes nothing:
/// no lease command, no label, no status — another replica may be in charge already.
#[tokio::test]
async fn a_controller_past_its_lease_deadline_writes_nothing() {
    let election = election(false);
    let expired = Leading::until(Instant::now());
    let (mut api, service, reconciling) =
        start_reconcile(caches(), &election, "web-1-a", expired).await;
    let result = reconciling.await.unwrap();
    assert!(
        matches!(result, Err(OperatorError::NotLeading)),
        "{result:?}"
    );
    let request = tokio::time::timeout(Duration::from_millis(100), api.next_request()).await;
    assert!(
        !matches!(request, Ok(Some(_))),
        "no request to the API server"
    );
    let lease = service.leader("default", "jobs").await.unwrap();
    assert_eq!(lease.leader.as_str(), "web-1-a", "no handover");
}

/// A failed reconcile is also a Warning Event on the Election, for `kubectl describe`.
#[tokio::test]
async fn a_failed_reconcile_is_recorded_as_a_warning_event() {
    let (mock, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let election = election(false);
    let ctx = context(Client::new(mock, "default"), service(), &election);
    let error = OperatorError::NotReady("the caches have not synced".into());
    let action = error_policy(Arc::new(election), &error, ctx);
    assert_ne!(action, Action::await_change(), "retried");
    let event = expect_event(&mut api).await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!("ReconcileFailed"))
    );
    assert!(
        event["note"].as_str().unwrap().contains("have not synced"),
        "{event}"
    );
}

//! The chart's RBAC rules are exactly the Kubernetes API calls the agent makes — derived from a
//! recorded run, not written down by hand.
//!
//! The agent runs (discovery watches, the controller lease, the Election controller, the Event
//! recorder — everything `server::start` wires) against a fake API server that records every
//! request as scope × API group × resource × verb and answers from a small fixture per
//! namespace. The fixture drives every path that talks to the API server: the watches, adding a
//! finalizer (`fresh`), electing a pod, labelling it and applying a status (`running`), taking a
//! label off and removing the finalizer of a deleted Election (`gone`), and a reconcile that
//! keeps failing, which records a Warning Event and then patches it as a series (`failing`).
//! The rules `helm template` renders must grant every recorded call and nothing more; the last
//! test shows that the comparison catches a verb taken out of the chart or put in.
//!
//! Needs the `helm` binary: `scripts/test.sh` installs one into `target/tools/bin` and puts it on
//! PATH; `HELM` names another.

mod tools;

use std::{
    collections::BTreeSet,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use election_agent::{config::Sources, server};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use kube::client::Body;
use serde_json::{Value, json};

const FINALIZER: &str = "election-agent.io/lease";

/// One call, or one grant: `namespace` `None` is cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    namespace: Option<String>,
    group: String,
    /// With its subresource: `elections/status`.
    resource: String,
    verb: String,
}

impl Access {
    /// Verb, group and resource: `patch core/pods`.
    fn what(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        format!("{} {group}/{}", self.verb, self.resource)
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = self.namespace.as_deref().unwrap_or("cluster-wide");
        write!(f, "{} ({scope})", self.what())
    }
}

/// The request log of the fake API server: what was called, and each request line.
#[derive(Default)]
struct Recording {
    calls: BTreeSet<Access>,
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Recording>>;

/// `/api/v1/namespaces/shop/pods/x` → ("", Some("shop"), "pods", Some("x"), None).
fn parse_path(
    path: &str,
) -> (
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => panic!("not an API path: {path}"),
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some((*namespace).to_owned()), rest)
        }
        rest => (None, rest),
    };
    let own = |i: usize| rest.get(i).map(|s| (*s).to_owned());
    (group, namespace, own(0).unwrap_or_default(), own(1), own(2))
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The objects of one namespace: a Deployment `web` with a ReplicaSet and two Ready pods, and
/// four Elections (see the module documentation). Lease names carry the namespace, so Elections
/// of different namespaces never contend for one lease.
fn fixture(namespace: &str) -> Vec<Value> {
    let meta = |name: &str, uid: &str| {
        json!({"name": name, "namespace": namespace, "uid": format!("{namespace}-{uid}"),
               "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"})
    };
    let owner = |kind: &str, name: &str, uid: &str| {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": format!("{namespace}-{uid}"), "controller": true}])
    };
    let selector = json!({"matchLabels": {"app": "web"}});
    let template = json!({"metadata": {"labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "web", "image": "web"}]}});
    let mut deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta("web", "d"),
        "spec": {"replicas": 2, "selector": selector, "template": template}});
    deployment["metadata"]["annotations"] = json!({"deployment.kubernetes.io/revision": "1"});
    let mut replica_set = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": meta("web-1", "rs"),
        "spec": {"replicas": 2, "selector": selector, "template": template},
        "status": {"replicas": 2}});
    replica_set["metadata"]["ownerReferences"] = owner("Deployment", "web", "d");
    replica_set["metadata"]["annotations"] = json!({"deployment.kubernetes.io/revision": "1"});
    let pod = |name: &str, ip: &str, labels: Value| {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta(name, name),
            "spec": {"containers": [{"name": "web", "image": "web"}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"}]}});
        pod["metadata"]["labels"] = labels;
        pod["metadata"]["ownerReferences"] = owner("ReplicaSet", "web-1", "rs");
        pod
    };
    let election = |name: &str, spec: Value| {
        let mut spec = spec;
        spec["election"] = json!(format!("{namespace}-{name}"));
        let mut election = json!({"apiVersion": "election-agent.io/v1", "kind": "Election",
            "metadata": meta(name, name), "spec": spec});
        election["metadata"]["generation"] = json!(1);
        if name != "fresh" {
            election["metadata"]["finalizers"] = json!([FINALIZER]);
        }
        election
    };
    let mut gone = election(
        "gone",
        json!({"deployment": "web", "managed": true, "leaderLabel": "example.com/gone"}),
    );
    gone["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    gone["status"] = json!({"labelled": {"label": "example.com/gone", "deployment": "web"}});
    vec![
        deployment,
        replica_set,
        pod("web-1-a", "10.0.0.1", json!({"app": "web"})),
        pod(
            "web-1-b",
            "10.0.0.2",
            json!({"app": "web", "example.com/gone": "true"}),
        ),
        election("fresh", json!({"deployment": "web", "managed": true})),
        election("running", json!({"deployment": "web", "managed": true})),
        gone,
        election("failing", json!({})),
    ]
}

fn resource_of(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Deployment") => "deployments",
        Some("ReplicaSet") => "replicasets",
        Some("Pod") => "pods",
        Some("Election") => "elections",
        other => panic!("no resource for {other:?}"),
    }
}

/// Whether `labels` match a selector of `key` and `key=value` terms, comma-separated.
fn selects(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((key, value)) => labels[key].as_str() == Some(value.trim_start_matches('=')),
            None => !labels[term].is_null(),
        })
}

type Reply = http::Response<BoxBody<Bytes, Infallible>>;

fn reply(status: u16, body: &Value) -> Reply {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn failure(code: u16, message: &str) -> Reply {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "code": code}),
    )
}

/// Answers one request from the objects and records it.
async fn serve(request: http::Request<Body>, objects: Arc<Vec<Value>>, recording: Shared) -> Reply {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (group, namespace, resource, name, subresource) = parse_path(parts.uri.path());
    let watch = query(&parts.uri, "watch").as_deref() == Some("true");
    let verb = match (&parts.method, &name) {
        (&http::Method::GET, _) if watch => "watch",
        (&http::Method::GET, None) => "list",
        (&http::Method::GET, Some(_)) => "get",
        (&http::Method::POST, _) => "create",
        (&http::Method::PUT, _) => "update",
        (&http::Method::PATCH, _) => "patch",
        (&http::Method::DELETE, None) => "deletecollection",
        (&http::Method::DELETE, Some(_)) => "delete",
        (method, _) => panic!("unexpected method {method}"),
    };
    {
        let mut recording = recording.lock().unwrap();
        recording.calls.insert(Access {
            namespace: namespace.clone(),
            group: group.clone(),
            resource: match &subresource {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.clone(),
            },
            verb: verb.to_owned(),
        });
        recording
            .requests
            .push(format!("{} {}", parts.method, parts.uri));
    }
    let in_scope = |o: &&Value| {
        resource_of(o) == resource
            && namespace
                .as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"] == ns)
    };
    let named = |wanted: &str| {
        objects
            .iter()
            .filter(in_scope)
            .find(|o| o["metadata"]["name"] == wanted)
            .cloned()
    };
    match verb {
        // A watch that stays open and quiet: the lists said everything.
        "watch" => http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(
                StreamBody::new(futures::stream::pending::<
                    Result<http_body::Frame<Bytes>, Infallible>,
                >())
                .boxed(),
            )
            .unwrap(),
        "list" => {
            let selector = query(&parts.uri, "labelSelector").unwrap_or_default();
            let metadata_only = parts
                .headers
                .get("accept")
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("as=PartialObjectMetadataList"));
            let items: Vec<Value> = objects
                .iter()
                .filter(in_scope)
                .filter(|o| selects(&selector, &o["metadata"]["labels"]))
                .map(|o| {
                    if metadata_only {
                        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                               "metadata": o["metadata"]})
                    } else {
                        o.clone()
                    }
                })
                .collect();
            reply(
                200,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        "create" => reply(201, &serde_json::from_slice(&body).unwrap_or(json!({}))),
        // The failing Election: every status write fails, so every reconcile of it does.
        "patch" if name.as_deref() == Some("failing") && subresource.is_some() => {
            failure(500, "the fake API server fails this Election's status")
        }
        "patch" if resource == "events" => {
            reply(200, &serde_json::from_slice(&body).unwrap_or(json!({})))
        }
        _ => match name.as_deref().and_then(named) {
            Some(object) => reply(200, &object),
            None => failure(404, "not found"),
        },
    }
}

/// Runs the agent with `settings` against the fake API server serving `namespaces`' fixtures
/// until `done` says the scenario has run through; returns every call it made.
async fn record(
    settings: &[(&'static str, &str)],
    namespaces: &[&str],
    done: impl Fn(&[String]) -> bool,
) -> BTreeSet<Access> {
    record_with_token(settings, namespaces, None, done).await
}

/// [`record`], with a client that sends a request with `bearer` as its token once the agent
/// runs (the fake API server does not authenticate it: the call is what counts).
async fn record_with_token(
    settings: &[(&'static str, &str)],
    namespaces: &[&str],
    bearer: Option<&str>,
    done: impl Fn(&[String]) -> bool,
) -> BTreeSet<Access> {
    let objects = Arc::new(namespaces.iter().flat_map(|ns| fixture(ns)).collect());
    let recording = Shared::default();
    let service = {
        let recording = recording.clone();
        tower::service_fn(move |request| {
            let (objects, recording) = (Arc::clone(&objects), recording.clone());
            async move { Ok::<_, Infallible>(serve(request, objects, recording).await) }
        })
    };
    let client = kube::Client::new(service, "default");
    let mut sources = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_CONTROLLER_TERM", "3s");
    for (key, value) in settings {
        sources = sources.flag(key, *value);
    }
    let config = sources.resolve().expect("valid test configuration");
    let agent = server::start_with_kubernetes(&config, client)
        .await
        .expect("agent starts");
    if let Some(token) = bearer {
        let address = agent.http_address.expect("HTTP enabled");
        let request = format!(
            "GET /election/default/x HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        );
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let _ = stream.read_to_end(&mut Vec::new()).await;
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let requests = recording.lock().unwrap().requests.clone();
        if done(&requests) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scenario did not run through within 30 s; requests so far:\n{}",
            requests.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.shutdown().await;
    agent.wait().await.expect("agent stops cleanly");
    let calls = std::mem::take(&mut recording.lock().unwrap().calls);
    let listed: Vec<String> = calls.iter().map(ToString::to_string).collect();
    eprintln!("the agent called:\n  {}", listed.join("\n  "));
    calls
}

/// Whether the controller went through every step in every namespace of the fixture.
fn controller_ran_through(namespaces: &'static [&'static str]) -> impl Fn(&[String]) -> bool {
    move |requests: &[String]| {
        let saw = |method: &str, part: &str| {
            requests
                .iter()
                .any(|r| r.starts_with(method) && r.contains(part))
        };
        namespaces.iter().all(|ns| {
            let at = |rest: &str| format!("/namespaces/{ns}/{rest}");
            saw("PATCH", &at("elections/fresh?"))
                && saw("PATCH", &at("elections/running/status"))
                && saw("PATCH", &at("pods/web-1-a"))
                && saw("PATCH", &at("pods/web-1-b"))
                && saw("PATCH", &at("elections/gone?"))
                && saw("POST", &at("events"))
                && saw("PATCH", &at("events/"))
        })
    }
}

/// Whether discovery watches pods, ReplicaSets and Deployments.
fn discovery_watches(requests: &[String]) -> bool {
    ["/pods?", "/replicasets?", "/deployments?"]
        .iter()
        .all(|kind| {
            requests
                .iter()
                .any(|r| r.contains(kind) && r.contains("watch=true"))
        })
}

/// The rules of the Roles and ClusterRoles the chart renders with `values`.
fn chart_rules(values: &[&str]) -> BTreeSet<Access> {
    let printed = tools::template(
        &[
            &["--show-only", "templates/rbac.yaml"][..],
            &tools::set(values),
        ]
        .concat(),
    );
    let mut rules = BTreeSet::new();
    for document in tools::documents(&printed) {
        let namespace = match document["kind"].as_str() {
            Some("Role") => Some(
                document["metadata"]["namespace"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ),
            Some("ClusterRole") => None,
            _ => continue,
        };
        for rule in document["rules"].as_array().into_iter().flatten() {
            let strings = |field: &str| -> Vec<String> {
                rule[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for verb in strings("verbs") {
                        rules.insert(Access {
                            namespace: namespace.clone(),
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                        });
                    }
                }
            }
        }
    }
    rules
}

/// What `granted` lacks for `calls` (a cluster-wide grant covers every namespace), and what it
/// grants that no call used. Empty both: exactly right.
fn compare(granted: &BTreeSet<Access>, calls: &BTreeSet<Access>) -> Result<(), String> {
    let covers = |grant: &Access, call: &Access| {
        (grant.namespace.is_none() || grant.namespace == call.namespace)
            && grant.group == call.group
            && grant.resource == call.resource
            && grant.verb == call.verb
    };
    let missing: Vec<String> = calls
        .iter()
        .filter(|call| !granted.iter().any(|grant| covers(grant, call)))
        .map(ToString::to_string)
        .collect();
    let extra: Vec<String> = granted
        .iter()
        .filter(|grant| !calls.iter().any(|call| covers(grant, call)))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the chart's RBAC (helm/election-agent/templates/rbac.yaml) is not what the agent \
         calls.\nmissing (the agent gets Forbidden): {missing:?}\ngranted but never used: {extra:?}"
    ))
}

#[tokio::test]
async fn the_cluster_role_grants_exactly_what_the_agent_calls() {
    const NAMESPACES: &[&str] = &["shop"];
    let calls = record(&[], NAMESPACES, controller_ran_through(NAMESPACES)).await;
    let granted = chart_rules(&[]);
    assert!(granted.iter().all(|grant| grant.namespace.is_none()));
    compare(&granted, &calls).unwrap();
}

#[tokio::test]
async fn the_roles_of_watched_namespaces_grant_exactly_what_the_agent_calls_there() {
    const NAMESPACES: &[&str] = &["shop", "stock"];
    let calls = record(
        &[("EA_KUBE_NAMESPACES", "shop,stock")],
        NAMESPACES,
        controller_ran_through(NAMESPACES),
    )
    .await;
    let granted = chart_rules(&["watchNamespaces={shop,stock}"]);
    assert!(granted.iter().all(|grant| grant.namespace.is_some()));
    compare(&granted, &calls).unwrap();
}

#[tokio::test]
async fn without_the_controller_the_rules_grant_exactly_what_discovery_calls() {
    let calls = record(
        &[("EA_CONTROLLER_ENABLE", "false")],
        &["shop"],
        discovery_watches,
    )
    .await;
    compare(&chart_rules(&["controller.enabled=false"]), &calls).unwrap();
}

/// With `auth.kubernetes`, the agent reviews bearer tokens: `create` on the cluster-scoped
/// tokenreviews, granted by a ClusterRole of its own even where the rest are namespaced Roles.
#[tokio::test]
async fn reviewing_kubernetes_tokens_adds_exactly_a_cluster_wide_token_review_grant() {
    const NAMESPACES: &[&str] = &["shop"];
    let ran_through = controller_ran_through(NAMESPACES);
    let calls = record_with_token(
        &[
            ("EA_KUBE_NAMESPACES", "shop"),
            ("EA_AUTH_KUBERNETES", "true"),
        ],
        NAMESPACES,
        Some("a-service-account-token"),
        |requests| ran_through(requests) && requests.iter().any(|r| r.contains("/tokenreviews")),
    )
    .await;
    let review = Access {
        namespace: None,
        group: "authentication.k8s.io".into(),
        resource: "tokenreviews".into(),
        verb: "create".into(),
    };
    assert!(calls.contains(&review), "{calls:?}");
    let granted = chart_rules(&["watchNamespaces={shop}", "auth.kubernetes.enabled=true"]);
    compare(&granted, &calls).unwrap();
    let mut without = granted.clone();
    without.remove(&review);
    assert!(compare(&without, &calls).is_err());
}

#[tokio::test]
async fn a_verb_taken_out_of_the_chart_or_put_in_fails_the_comparison() {
    const NAMESPACES: &[&str] = &["shop"];
    let calls = record(&[], NAMESPACES, controller_ran_through(NAMESPACES)).await;
    let granted = chart_rules(&[]);
    compare(&granted, &calls).unwrap();
    for taken_out in &granted {
        let mut fewer = granted.clone();
        fewer.remove(taken_out);
        let refused = compare(&fewer, &calls).expect_err("a missing verb is noticed");
        assert!(
            refused.contains(&taken_out.what()),
            "{taken_out} not named: {refused}"
        );
    }
    for (group, resource, verb) in [
        ("", "secrets", "get"),
        ("", "pods", "delete"),
        ("apps", "deployments", "patch"),
        ("election-agent.io", "elections", "get"),
        // Only with auth.kubernetes.
        ("authentication.k8s.io", "tokenreviews", "create"),
    ] {
        let put_in = Access {
            namespace: None,
            group: group.into(),
            resource: resource.into(),
            verb: verb.into(),
        };
        let mut more = granted.clone();
        more.insert(put_in.clone());
        let refused = compare(&more, &calls).expect_err("an extra verb is noticed");
        assert!(
            refused.contains(&put_in.what()),
            "{put_in} not named: {refused}"
        );
    }
}

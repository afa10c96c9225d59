//! Authentication and authorization over real servers on loopback: with a tokens file and a
//! policy, no or a wrong token is 401 / UNAUTHENTICATED, an action outside the policy 403 /
//! PERMISSION_DENIED naming the verb and the election, one inside it 200 / OK — over HTTP and
//! gRPC; without a policy, everything but handover; probes stay open; Kubernetes tokens are
//! reviewed by the API server. With authentication off nothing changes (the other API tests).

mod common;

use common::{grpc_endpoint, with_token};

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use election_agent::{
    config::Sources,
    grpc::pb::{self, election_client::ElectionClient},
    server::{self, RunningAgent},
};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const TOKENS: &str = "alice-token,alice,uid-a\n\
                      ops-token,olga,uid-o,\"ops,system:authenticated\"\n";

/// alice may work on the `jobs-*` elections of kind default, but not hand them over nor list
/// them; the ops group may do anything.
const POLICY: &str = r#"
rules:
  - subjects: [alice]
    kinds: [default]
    elections: ["jobs-*"]
    verbs: [get, watch, campaign, extend, resign]
  - subjects: ["group:ops"]
    kinds: ["*"]
    elections: ["*"]
    verbs: ["*"]
"#;

/// A file of its own for each test, in the system's temporary directory.
fn file(contents: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "election-agent-auth-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

fn sources(settings: &[(&'static str, String)]) -> Sources {
    let mut sources = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_ENABLE", "false");
    for (key, value) in settings {
        sources = sources.flag(key, value.clone());
    }
    sources
}

/// An agent with the tokens file and, if given, a policy file.
async fn agent(policy: Option<&str>, extra: &[(&'static str, &str)]) -> RunningAgent {
    let mut settings = vec![("EA_AUTH_TOKENS_FILE", file(TOKENS).display().to_string())];
    if let Some(policy) = policy {
        settings.push(("EA_AUTH_POLICY_FILE", file(policy).display().to_string()));
    }
    settings.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let config = sources(&settings).resolve().expect("valid configuration");
    server::start(&config).await.expect("agent starts")
}

/// An HTTP/1.1 answer: status, headers (lower-case names) and body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("{} {:?}: {err}", self.status, self.body))
    }

    /// The status, and the message of an error body.
    fn refusal(&self) -> (u16, String) {
        let body = self.json();
        let object = body.as_object().expect("an object");
        assert_eq!(object.len(), 1, "only `message`: {body}");
        (self.status, object["message"].as_str().unwrap().to_owned())
    }
}

/// One request over a connection of its own; `token` goes as `Authorization: Bearer`.
async fn http(
    agent: &RunningAgent,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Answer {
    http_with(
        agent.http_address.unwrap(),
        method,
        path,
        token.map(|t| format!("Bearer {t}")),
        body,
    )
    .await
}

async fn http_with(
    address: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<String>,
    body: Option<Value>,
) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("content-type: application/json\r\n");
    }
    if let Some(authorization) = authorization {
        request.push_str(&format!("authorization: {authorization}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .expect("an answer within 5 s");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head[9..12].parse().unwrap();
    Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

async fn grpc(agent: &RunningAgent) -> ElectionClient<Channel> {
    ElectionClient::connect(grpc_endpoint(agent))
        .await
        .expect("connects")
}

fn campaign(election: &str, candidate: &str) -> pb::CampaignRequest {
    pb::CampaignRequest {
        election: election.into(),
        candidate: candidate.into(),
        term: 60_000,
        kind: String::new(),
    }
}

fn handover(election: &str, leader: &str) -> pb::HandoverRequest {
    pb::HandoverRequest {
        election: election.into(),
        leader: leader.into(),
        term: 60_000,
        ..Default::default()
    }
}

/// The value of `election_agent_auth_decisions_total{verb, result}`, read from `/metrics`.
async fn decisions(agent: &RunningAgent, verb: &str, result: &str) -> u64 {
    let metrics = http(agent, "GET", "/metrics", None, None).await.body;
    let labels = [format!("verb=\"{verb}\""), format!("result=\"{result}\"")];
    metrics
        .lines()
        .filter(|line| line.starts_with("election_agent_auth_decisions_total{"))
        .find(|line| labels.iter().all(|label| line.contains(label.as_str())))
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no decisions {labels:?} in:\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn over_http_no_or_a_wrong_token_is_401_and_the_policy_decides_403_or_200() {
    let agent = agent(Some(POLICY), &[]).await;
    let campaign = |candidate: &str| Some(json!({"candidate": candidate, "term": 60_000}));

    for (authorization, message) in [
        (
            None,
            "authentication required: send the header Authorization: Bearer TOKEN",
        ),
        (Some("Bearer wrong-token"), "invalid bearer token"),
        (
            Some("Basic YWxpY2U6YWxpY2U="),
            "the Authorization header must be Bearer TOKEN",
        ),
    ] {
        let answer = http_with(
            agent.http_address.unwrap(),
            "POST",
            "/election/default/jobs-1",
            authorization.map(str::to_owned),
            campaign("mallory"),
        )
        .await;
        assert_eq!(
            answer.refusal(),
            (401, message.to_owned()),
            "{authorization:?}"
        );
        assert!(
            answer.headers.contains("www-authenticate: bearer"),
            "{}",
            answer.headers
        );
    }

    let won = http(
        &agent,
        "POST",
        "/election/default/jobs-1",
        Some("alice-token"),
        campaign("alice"),
    )
    .await;
    assert_eq!(won.status, 200, "{}", won.body);
    assert_eq!(won.json()["elected"], true);
    let read = http(
        &agent,
        "GET",
        "/election/default/jobs-1",
        Some("alice-token"),
        None,
    )
    .await;
    assert_eq!(
        (read.status, read.json()["leader"].clone()),
        (200, json!("alice"))
    );
    let extended = http(
        &agent,
        "PATCH",
        "/election/default/jobs-1",
        Some("alice-token"),
        Some(json!({"leader": "alice", "term": 60_000})),
    )
    .await;
    assert_eq!(extended.status, 200, "{}", extended.body);

    for (method, path, body, message) in [
        (
            "PUT",
            "/election/default/jobs-1",
            Some(json!({"leader": "mallory", "term": 60_000})),
            "alice may not handover election default/jobs-1",
        ),
        (
            "POST",
            "/election/default/web",
            campaign("alice"),
            "alice may not campaign election default/web",
        ),
        (
            "POST",
            "/election/batch/jobs-1",
            campaign("alice"),
            "alice may not campaign election batch/jobs-1",
        ),
        (
            "GET",
            "/election/default",
            None,
            "alice may not list the elections of kind default",
        ),
        (
            "GET",
            "/kube/shop/web/pods",
            None,
            "alice may not get the pods of namespace shop",
        ),
    ] {
        let answer = http(&agent, method, path, Some("alice-token"), body).await;
        assert_eq!(
            answer.refusal(),
            (403, message.to_owned()),
            "{method} {path}"
        );
    }
    // The refused handover changed nothing.
    let read = http(
        &agent,
        "GET",
        "/election/default/jobs-1",
        Some("alice-token"),
        None,
    )
    .await;
    assert_eq!(read.json()["leader"], "alice");

    // The ops group may do what alice may not.
    let handed = http(
        &agent,
        "PUT",
        "/election/default/jobs-1",
        Some("ops-token"),
        Some(json!({"leader": "bob", "term": 60_000})),
    )
    .await;
    assert_eq!(handed.status, 200, "{}", handed.body);
    let listed = http(&agent, "GET", "/election/default", Some("ops-token"), None).await;
    assert_eq!(listed.json()["leaders"][0]["name"], "bob");
    // alice may resign, but she does not lead: the service says so.
    let resigned = http(
        &agent,
        "DELETE",
        "/election/default/jobs-1",
        Some("alice-token"),
        Some(json!({"leader": "alice"})),
    )
    .await;
    assert_eq!(resigned.status, 404, "{}", resigned.body);

    assert_eq!(decisions(&agent, "campaign", "unauthenticated").await, 3);
    assert_eq!(decisions(&agent, "campaign", "allowed").await, 1);
    assert_eq!(decisions(&agent, "campaign", "denied").await, 2);
    assert_eq!(decisions(&agent, "handover", "denied").await, 1);
    assert_eq!(decisions(&agent, "handover", "allowed").await, 1);
    assert_eq!(decisions(&agent, "list", "denied").await, 1);

    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn probes_metrics_and_the_openapi_document_stay_open_and_unknown_routes_do_not() {
    let agent = agent(Some(POLICY), &[]).await;
    for path in ["/livez", "/readyz", "/openapi.json", "/metrics"] {
        let answer = http(&agent, "GET", path, None, None).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    }
    // Which routes exist is not told to a caller without credentials.
    assert_eq!(
        http(&agent, "GET", "/nowhere", None, None).await.status,
        401
    );
    assert_eq!(
        http(&agent, "GET", "/nowhere", Some("alice-token"), None)
            .await
            .status,
        404
    );
    let mut health = HealthClient::new(
        Channel::from_shared(grpc_endpoint(&agent))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let serving = health
        .check(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .expect("health needs no token");
    assert_eq!(serving.into_inner().status, 1);
    agent.shutdown().await;
    agent.wait().await.unwrap();

    let agent = self::agent(None, &[("EA_AUTH_METRICS", "true")]).await;
    assert_eq!(
        http(&agent, "GET", "/metrics", None, None).await.status,
        401
    );
    assert_eq!(http(&agent, "GET", "/livez", None, None).await.status, 200);
    let metrics = http(&agent, "GET", "/metrics", Some("alice-token"), None).await;
    assert_eq!(metrics.status, 200);
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn over_grpc_no_or_a_wrong_token_is_unauthenticated_and_the_policy_decides() {
    let agent = agent(Some(POLICY), &[]).await;
    let mut client = grpc(&agent).await;

    for token in [None, Some("wrong-token")] {
        let refused = client
            .campaign(with_token(campaign("jobs-1", "mallory"), token))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{token:?}: {refused:?}"
        );
    }
    let won = client
        .campaign(with_token(campaign("jobs-1", "alice"), Some("alice-token")))
        .await
        .expect("alice may campaign for jobs-1")
        .into_inner();
    assert!(won.elected);

    let refused = client
        .handover(with_token(
            handover("jobs-1", "mallory"),
            Some("alice-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "alice may not handover election default/jobs-1"
    );
    let refused = client
        .list_leaders(with_token(
            pb::ListLeadersRequest {
                kind: String::new(),
            },
            Some("alice-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::PermissionDenied,
            "alice may not list the elections of kind default"
        )
    );
    let refused = client
        .get_pods(with_token(
            pb::GetPodsRequest {
                namespace: "shop".into(),
                deployment: "web".into(),
                pod_name: String::new(),
            },
            Some("alice-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Observe is `watch`: alice may watch jobs-1, not web.
    let observe = |election: &str| pb::ObserveRequest {
        election: election.into(),
        kind: String::new(),
    };
    let mut events = client
        .observe(with_token(observe("jobs-1"), Some("alice-token")))
        .await
        .expect("alice may watch jobs-1")
        .into_inner();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first.leader, "alice");
    let refused = client
        .observe(with_token(observe("web"), Some("alice-token")))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::PermissionDenied,
            "alice may not watch election default/web"
        )
    );

    let handed = client
        .handover(with_token(handover("jobs-1", "bob"), Some("ops-token")))
        .await
        .expect("ops may hand over")
        .into_inner();
    assert!(handed.value);
    drop(events);

    assert_eq!(decisions(&agent, "campaign", "unauthenticated").await, 2);
    assert_eq!(decisions(&agent, "watch", "allowed").await, 1);
    assert_eq!(decisions(&agent, "watch", "denied").await, 1);
    assert_eq!(decisions(&agent, "get", "denied").await, 1);
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn without_a_policy_an_authenticated_caller_may_do_everything_but_hand_over() {
    let agent = agent(None, &[]).await;
    let campaign_body = Some(json!({"candidate": "alice", "term": 60_000}));
    assert_eq!(
        http(
            &agent,
            "POST",
            "/election/batch/anything",
            None,
            campaign_body.clone()
        )
        .await
        .status,
        401
    );
    for (method, path, body) in [
        ("POST", "/election/batch/anything", campaign_body),
        ("GET", "/election/batch/anything", None),
        ("GET", "/election/batch", None),
        (
            "PATCH",
            "/election/batch/anything",
            Some(json!({"leader": "alice", "term": 60_000})),
        ),
    ] {
        let answer = http(&agent, method, path, Some("alice-token"), body).await;
        assert_eq!(answer.status, 200, "{method} {path}: {}", answer.body);
    }
    let refused = http(
        &agent,
        "PUT",
        "/election/batch/anything",
        Some("ops-token"),
        Some(json!({"leader": "mallory", "term": 60_000})),
    )
    .await;
    assert_eq!(
        refused.refusal(),
        (
            403,
            "olga may not handover election batch/anything".to_owned()
        )
    );

    let mut client = grpc(&agent).await;
    let refused = client
        .handover(with_token(
            handover("anything", "mallory"),
            Some("alice-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let resigned = client
        .resign(with_token(
            pb::ResignRequest {
                election: "anything".into(),
                leader: "alice".into(),
                kind: "batch".into(),
            },
            Some("alice-token"),
        ))
        .await
        .expect("resign is allowed");
    assert!(resigned.into_inner().value);
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn a_bad_tokens_or_policy_file_stops_start_up_in_one_line_naming_the_file() {
    let tokens = file("alice-token,alice,uid-a\nbob-token,bob\n");
    let err = server::start(
        &sources(&[("EA_AUTH_TOKENS_FILE", tokens.display().to_string())])
            .resolve()
            .unwrap(),
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert_eq!(
        err,
        format!(
            "invalid tokens file {}, line 2: expected at least 3 columns (token, user name, user uid), found 2",
            tokens.display()
        )
    );
    let policy =
        file("rules:\n  - {subjects: [a], kinds: [x], elections: [y], verbs: [takeover]}\n");
    let err = server::start(
        &sources(&[
            ("EA_AUTH_TOKENS_FILE", file(TOKENS).display().to_string()),
            ("EA_AUTH_POLICY_FILE", policy.display().to_string()),
        ])
        .resolve()
        .unwrap(),
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.starts_with(&format!(
            "invalid policy file {}: rule 1: unknown verb \"takeover\"",
            policy.display()
        )),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    let missing = std::env::temp_dir().join("election-agent-auth-no-such-file");
    let err = server::start(
        &sources(&[("EA_AUTH_TOKENS_FILE", missing.display().to_string())])
            .resolve()
            .unwrap(),
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.starts_with(&format!(
            "cannot read the tokens file {}: ",
            missing.display()
        )),
        "{err}"
    );
}

/// A fake API server that reviews tokens — `sa-token` is ServiceAccount `shop/web` for the
/// `election-agent` audience, anything else is not authenticated — and answers the discovery
/// watches with nothing.
fn api_server(reviews: std::sync::Arc<AtomicUsize>) -> kube::Client {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let reviews = reviews.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let reply = |value: Value| {
                http::Response::builder()
                    .status(if parts.method == http::Method::POST {
                        201
                    } else {
                        200
                    })
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(value.to_string())).boxed())
                    .unwrap()
            };
            if parts.uri.path() == "/apis/authentication.k8s.io/v1/tokenreviews" {
                reviews.fetch_add(1, Ordering::SeqCst);
                let mut review: Value = serde_json::from_slice(&body).unwrap();
                let spec = review["spec"].clone();
                review["status"] = if spec["token"] == "sa-token"
                    && spec["audiences"] == json!(["election-agent"])
                {
                    json!({"authenticated": true, "audiences": ["election-agent"],
                           "user": {"username": "system:serviceaccount:shop:web", "uid": "u",
                                    "groups": ["system:serviceaccounts:shop"]}})
                } else {
                    json!({"authenticated": false})
                };
                return Ok::<_, Infallible>(reply(review));
            }
            if parts.uri.query().unwrap_or_default().contains("watch=true") {
                return Ok(http::Response::builder()
                    .status(200)
                    .body(BodyExt::boxed(StreamBody::new(futures::stream::pending::<
                        Result<http_body::Frame<Bytes>, Infallible>,
                    >())))
                    .unwrap());
            }
            Ok(reply(json!({"apiVersion": "v1", "kind": "List",
                             "metadata": {"resourceVersion": "1"}, "items": []})))
        }
    });
    kube::Client::new(service, "default")
}

#[tokio::test]
async fn kubernetes_service_account_tokens_are_reviewed_by_the_api_server_and_cached() {
    let reviews = std::sync::Arc::new(AtomicUsize::new(0));
    let config = sources(&[
        ("EA_AUTH_KUBERNETES", "true".into()),
        ("EA_KUBE_ENABLE", "true".into()),
        ("EA_CONTROLLER_ENABLE", "false".into()),
        (
            "EA_AUTH_POLICY_FILE",
            file("rules:\n  - {subjects: [\"group:system:serviceaccounts:shop\"], kinds: [default], elections: [\"*\"], verbs: [\"*\"]}\n")
                .display()
                .to_string(),
        ),
    ])
    .resolve()
    .unwrap();
    let agent = server::start_with_kubernetes(&config, api_server(reviews.clone()))
        .await
        .expect("agent starts");
    let campaign = Some(json!({"candidate": "web-1", "term": 60_000}));
    for _ in 0..3 {
        let answer = http(
            &agent,
            "POST",
            "/election/default/web",
            Some("sa-token"),
            campaign.clone(),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(
        reviews.load(Ordering::SeqCst),
        1,
        "one review, then the cache"
    );
    let refused = http(
        &agent,
        "POST",
        "/election/other/web",
        Some("sa-token"),
        campaign.clone(),
    )
    .await;
    assert_eq!(
        refused.refusal(),
        (
            403,
            "system:serviceaccount:shop:web may not campaign election other/web".to_owned()
        )
    );
    let refused = http(
        &agent,
        "POST",
        "/election/default/web",
        Some("stolen"),
        campaign,
    )
    .await;
    assert_eq!(refused.refusal(), (401, "invalid bearer token".to_owned()));
    assert_eq!(reviews.load(Ordering::SeqCst), 2);

    let mut client = grpc(&agent).await;
    let won = client
        .campaign(with_token(
            campaign_in("default", "grpc", "web-1"),
            Some("sa-token"),
        ))
        .await
        .expect("the same token over gRPC");
    assert!(won.into_inner().elected);
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

fn campaign_in(kind: &str, election: &str, candidate: &str) -> pb::CampaignRequest {
    pb::CampaignRequest {
        kind: kind.into(),
        ..campaign(election, candidate)
    }
}

#[tokio::test]
async fn the_command_line_client_sends_its_token() {
    use election_agent::client::{self, ClientArgs, ClientCommand, ClientError};
    let agent = agent(Some(POLICY), &[]).await;
    let args = |token: Option<&str>| ClientArgs {
        address: grpc_endpoint(&agent),
        token: token.map(str::to_owned),
        tls: Default::default(),
        kind: String::new(),
        command: ClientCommand::Leaders,
    };
    match client::run(args(None)).await {
        Err(ClientError::Rpc(status)) => assert_eq!(status.code(), Code::Unauthenticated),
        other => panic!("{other:?}"),
    }
    match client::run(args(Some("alice-token"))).await {
        Err(ClientError::Rpc(status)) => assert_eq!(status.code(), Code::PermissionDenied),
        other => panic!("{other:?}"),
    }
    client::run(args(Some("ops-token")))
        .await
        .expect("ops may list");
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

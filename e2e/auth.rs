//! Kubernetes ServiceAccount tokens end to end, against a real API server (`KUBECONFIG`): the
//! agent reviews a client's token with the TokenReview API and the policy decides — a token
//! issued for the agent's audience is accepted over HTTP and gRPC, a token for the API server's
//! own audience is not, another ServiceAccount's token is authenticated but denied, and a
//! deleted ServiceAccount's token stops working once the cached answer expires.
//!
//! Needs a cluster, so every test here is `#[ignore]`d: `scripts/e2e.sh` runs them.

mod common;

use std::time::Duration;

use common::{TestNamespace, eventually, within};
use election_agent::{
    auth::token_review::AUTHENTICATED_FOR,
    config::Sources,
    grpc::pb::{self, election_client::ElectionClient},
    server::{self, RunningAgent},
};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use tonic::Code;

/// Creates ServiceAccount `name` in `namespace`.
async fn service_account(client: &Client, namespace: &str, name: &str) {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    within(
        "create a ServiceAccount",
        Duration::from_secs(30),
        accounts.create(&PostParams::default(), &account),
    )
    .await
    .expect("create a ServiceAccount");
}

/// A token of ServiceAccount `name` for `audience` (none: the API server's own), as
/// `kubectl create token` makes one.
async fn token(client: &Client, namespace: &str, name: &str, audience: Option<&str>) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]).unwrap_or_default(),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    within(
        "request a token",
        Duration::from_secs(30),
        accounts.create_token_request(name, &PostParams::default(), &request),
    )
    .await
    .expect("request a token")
    .status
    .expect("a token")
    .token
}

/// An agent reviewing tokens through the cluster of `KUBECONFIG` (its Kubernetes features
/// off: it connects for the reviews alone), where ServiceAccount `web` of `namespace` may do
/// anything to the elections of kind `namespace`.
async fn agent(namespace: &str) -> RunningAgent {
    let policy = std::env::temp_dir().join(format!("{namespace}-policy.yaml"));
    std::fs::write(
        &policy,
        format!(
            "rules:\n  - subjects: [\"system:serviceaccount:{namespace}:web\"]\n    \
             kinds: [{namespace}]\n    elections: [\"*\"]\n    verbs: [\"*\"]\n"
        ),
    )
    .unwrap();
    let config = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_ENABLE", "false")
        .flag("EA_KUBE_IN_CLUSTER", "false")
        .flag("EA_AUTH_KUBERNETES", "true")
        .flag("EA_AUTH_POLICY_FILE", policy.display().to_string())
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

/// `method path` with `token` and a JSON `body`: the status and the body.
async fn http(
    agent: &RunningAgent,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = agent.http_address.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nAuthorization: Bearer \
         {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = within(
        &format!("{method} {path}"),
        Duration::from_secs(10),
        exchange,
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn service_account_tokens_for_the_agents_audience_are_reviewed_by_the_api_server() {
    let client = common::cluster().await;
    let namespace = TestNamespace::create(&client, "auth").await;
    let ns = namespace.name.as_str();
    service_account(&client, ns, "web").await;
    service_account(&client, ns, "other").await;
    let web = token(&client, ns, "web", Some("election-agent")).await;
    let web_for_the_api_server = token(&client, ns, "web", None).await;
    let other = token(&client, ns, "other", Some("election-agent")).await;
    let agent = agent(ns).await;
    let path = format!("/election/{ns}/jobs");
    let campaign = r#"{"candidate":"web-1","term":60000}"#;

    let (status, body) = http(&agent, "POST", &path, &web, campaign).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""elected":true"#), "{body}");
    let (status, body) = http(&agent, "POST", &path, &web_for_the_api_server, campaign).await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"message":"invalid bearer token"}"#)
    );
    let (status, body) = http(&agent, "POST", &path, &other, campaign).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!(
            "system:serviceaccount:{ns}:other may not campaign election {ns}/jobs"
        )),
        "{body}"
    );

    let mut grpc = ElectionClient::connect(format!("http://{}", agent.grpc_address.unwrap()))
        .await
        .unwrap();
    let read = |token: &str| {
        let mut request = tonic::Request::new(pb::GetLeaderRequest {
            election: "jobs".into(),
            kind: ns.to_owned(),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let leader = grpc.get_leader(read(&web)).await.expect("web may read");
    assert_eq!(leader.into_inner().value, "web-1");
    let refused = grpc.get_leader(read(&other)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A deleted ServiceAccount's token is refused once the cached answer has expired.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    within(
        "delete the ServiceAccount",
        Duration::from_secs(30),
        accounts.delete("web", &DeleteParams::default()),
    )
    .await
    .expect("delete the ServiceAccount");
    eventually(
        "the deleted ServiceAccount's token is refused",
        AUTHENTICATED_FOR + Duration::from_secs(5),
        async || http(&agent, "GET", &path, &web, "").await.0 == 401,
    )
    .await;

    agent.shutdown().await;
    agent.wait().await.unwrap();
}

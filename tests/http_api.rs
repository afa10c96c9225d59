//! The REST adapter end to end, driven in-process through the axum router: every route,
//! every error shape (`{"message": ...}`, naming the field at fault), the SSE watch, the probes and
//! metrics, and the OpenAPI document (served == generated == checked in, and every documented
//! operation is routed).

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderMap, Method, Request, StatusCode, header},
};
use election_agent::{
    election::ElectionService,
    http,
    lease::{Term, TermBounds},
    metrics::Metrics,
    store::{MemoryStore, Store},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a test waits for a response or an SSE frame before failing.
const WAIT: Duration = Duration::from_secs(5);

/// A term every campaign of these tests can use (a minute: nothing expires during a test).
const TERM: i64 = 60_000;

fn service() -> ElectionService {
    ElectionService::new(
        Store::Memory(MemoryStore::new()),
        None,
        TermBounds::default(),
        Arc::new(Metrics::new("test", vec![0.1, 1.0]).unwrap()),
        CancellationToken::new(),
    )
}

/// The router under test, with metrics enabled, over a fresh memory store.
fn app() -> Router {
    http::router(service(), true)
}

/// A response, its body read whole.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    /// The body as JSON; fails the test (showing the body) when it is not JSON.
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "{} response body is not JSON ({err}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts the status and that the body is exactly `{"message": ...}` served as JSON;
    /// returns the message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert!(
            self.content_type().starts_with("application/json"),
            "error content type is {:?}",
            self.content_type()
        );
        let body = self.json();
        let object = body.as_object().expect("error body is a JSON object");
        assert_eq!(object.len(), 1, "error body has only `message`: {body}");
        object["message"]
            .as_str()
            .unwrap_or_else(|| panic!("`message` is a string: {body}"))
            .to_owned()
    }
}

/// Sends `request` to a clone of `router` and reads the whole response.
async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = tokio::time::timeout(WAIT, router.clone().oneshot(request))
        .await
        .expect("router answers in time")
        .expect("router is infallible");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body is read in time")
        .expect("body can be read")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A request without a body.
async fn call(router: &Router, method: Method, uri: &str) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    send(router, request).await
}

/// A request with a JSON body (`Content-Type: application/json`).
async fn call_json(router: &Router, method: Method, uri: &str, body: Value) -> Reply {
    call_raw(
        router,
        method,
        uri,
        Some("application/json"),
        body.to_string(),
    )
    .await
}

/// A request with any body and content type (none when `content_type` is `None`).
async fn call_raw(
    router: &Router,
    method: Method,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    send(router, request.body(body.into()).unwrap()).await
}

async fn campaign(router: &Router, kind: &str, name: &str, candidate: &str) -> Reply {
    call_json(
        router,
        Method::POST,
        &format!("/election/{kind}/{name}"),
        json!({"candidate": candidate, "term": TERM}),
    )
    .await
}

/// Asserts `message` names `field` the way the service does (`invalid <field>: ...`).
fn assert_names_field(message: &str, field: &str, request: &str) {
    assert!(
        message.contains(&format!("invalid {field}")),
        "{request}: message {message:?} does not name `{field}`"
    );
}

// ---------------------------------------------------------------------------------------------
// Campaign, get leader, extend, handover, resign
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn first_campaign_wins_and_gets_fencing_token_one() {
    let app = app();
    let reply = campaign(&app, "k", "e", "alice").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"elected": true, "leader": "alice", "kind": "k", "fencing_token": 1})
    );
}

#[tokio::test]
async fn campaign_by_other_candidate_returns_current_leader() {
    let app = app();
    assert_eq!(
        campaign(&app, "k", "e", "alice").await.status,
        StatusCode::OK
    );

    let reply = campaign(&app, "k", "e", "bob").await;
    assert_eq!(reply.status, StatusCode::OK, "losing is not an error");
    assert_eq!(
        reply.json(),
        json!({"elected": false, "leader": "alice", "kind": "k", "fencing_token": 1})
    );
}

#[tokio::test]
async fn campaign_again_by_the_leader_renews_with_the_same_token() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;
    let reply = campaign(&app, "k", "e", "alice").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({"elected": true, "leader": "alice", "kind": "k", "fencing_token": 1})
    );
}

#[tokio::test]
async fn get_leader_returns_the_elected_candidate_and_its_token() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let reply = call(&app, Method::GET, "/election/k/e").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"leader": "alice", "fencing_token": 1}));
}

#[tokio::test]
async fn get_leader_of_an_election_nobody_leads_is_404_with_message() {
    let app = app();
    let message = call(&app, Method::GET, "/election/k/e")
        .await
        .error(StatusCode::NOT_FOUND);
    assert!(
        message.contains("k/e"),
        "message names the election: {message}"
    );
    assert!(message.contains("no leader"), "{message}");
}

#[tokio::test]
async fn elections_of_different_kinds_are_independent() {
    let app = app();
    campaign(&app, "k1", "e", "alice").await;
    let reply = campaign(&app, "k2", "e", "bob").await;
    assert_eq!(
        reply.json(),
        json!({"elected": true, "leader": "bob", "kind": "k2", "fencing_token": 1})
    );
    let reply = call(&app, Method::GET, "/election/k1/e").await;
    assert_eq!(reply.json(), json!({"leader": "alice", "fencing_token": 1}));
}

#[tokio::test]
async fn extend_by_the_holder_keeps_its_token() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let reply = call_json(
        &app,
        Method::PATCH,
        "/election/k/e",
        json!({"leader": "alice", "term": TERM, "retries": 3, "retry_interval": 100}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"value": true, "fencing_token": 1}));
}

#[tokio::test]
async fn extend_without_retry_fields_uses_defaults() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let reply = call_json(
        &app,
        Method::PATCH,
        "/election/k/e",
        json!({"leader": "alice", "term": TERM}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"value": true, "fencing_token": 1}));
}

#[tokio::test]
async fn extend_by_another_candidate_is_409_naming_the_holder() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let message = call_json(
        &app,
        Method::PATCH,
        "/election/k/e",
        json!({"leader": "bob", "term": TERM}),
    )
    .await
    .error(StatusCode::CONFLICT);
    assert!(
        message.contains("alice") && message.contains("bob"),
        "message names holder and caller: {message}"
    );
    // The holder still leads.
    let reply = call(&app, Method::GET, "/election/k/e").await;
    assert_eq!(reply.json(), json!({"leader": "alice", "fencing_token": 1}));
}

#[tokio::test]
async fn extend_when_nobody_leads_is_404() {
    let app = app();
    let message = call_json(
        &app,
        Method::PATCH,
        "/election/k/e",
        json!({"leader": "alice", "term": TERM}),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    assert!(message.contains("no leader"), "{message}");
}

#[tokio::test]
async fn handover_makes_the_new_leader_lead_with_a_higher_fencing_token() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let reply = call_json(
        &app,
        Method::PUT,
        "/election/k/e",
        json!({"leader": "bob", "term": TERM}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"value": true, "fencing_token": 2}));

    let reply = call(&app, Method::GET, "/election/k/e").await;
    assert_eq!(reply.json(), json!({"leader": "bob", "fencing_token": 2}));
    // The old leader lost the election.
    let reply = campaign(&app, "k", "e", "alice").await;
    assert_eq!(
        reply.json(),
        json!({"elected": false, "leader": "bob", "kind": "k", "fencing_token": 2})
    );
}

#[tokio::test]
async fn resign_by_a_non_holder_is_404_and_the_leader_stays() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let message = call_json(
        &app,
        Method::DELETE,
        "/election/k/e",
        json!({"leader": "bob"}),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    assert!(
        message.contains("bob") && message.contains("alice"),
        "message names caller and holder: {message}"
    );
    let reply = call(&app, Method::GET, "/election/k/e").await;
    assert_eq!(reply.json(), json!({"leader": "alice", "fencing_token": 1}));
}

#[tokio::test]
async fn resign_by_the_holder_leaves_the_election_without_leader() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;

    let reply = call_json(
        &app,
        Method::DELETE,
        "/election/k/e",
        json!({"leader": "alice"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"value": true, "fencing_token": 0}));

    call(&app, Method::GET, "/election/k/e")
        .await
        .error(StatusCode::NOT_FOUND);
    // The next leader gets a higher token than the one who resigned.
    let reply = campaign(&app, "k", "e", "bob").await;
    assert_eq!(
        reply.json(),
        json!({"elected": true, "leader": "bob", "kind": "k", "fencing_token": 2})
    );
}

#[tokio::test]
async fn names_with_a_percent_encoded_slash_are_one_election() {
    let app = app();
    let reply = campaign(&app, "k", "ns%2Fapp", "alice").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let reply = call(&app, Method::GET, "/election/k/ns%2Fapp").await;
    assert_eq!(reply.json(), json!({"leader": "alice", "fencing_token": 1}));
    let reply = call(&app, Method::GET, "/election/k").await;
    assert_eq!(
        reply.json(),
        json!({"kind": "k", "leaders": [{"election": "ns/app", "name": "alice", "fencing_token": 1}]})
    );
}

// ---------------------------------------------------------------------------------------------
// List leaders
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_leaders_returns_only_that_kind_sorted_by_election() {
    let app = app();
    campaign(&app, "k", "charlie", "c1").await;
    campaign(&app, "k", "alpha", "a1").await;
    campaign(&app, "k", "bravo", "b1").await;
    campaign(&app, "other", "aardvark", "x1").await;
    // A resigned election is not listed.
    campaign(&app, "k", "delta", "d1").await;
    call_json(
        &app,
        Method::DELETE,
        "/election/k/delta",
        json!({"leader": "d1"}),
    )
    .await;

    let reply = call(&app, Method::GET, "/election/k").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({
            "kind": "k",
            "leaders": [
                {"election": "alpha", "name": "a1", "fencing_token": 1},
                {"election": "bravo", "name": "b1", "fencing_token": 1},
                {"election": "charlie", "name": "c1", "fencing_token": 1},
            ]
        })
    );
}

#[tokio::test]
async fn list_leaders_of_a_kind_without_elections_is_empty() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;
    let reply = call(&app, Method::GET, "/election/nothing-here").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"kind": "nothing-here", "leaders": []}));
}

// ---------------------------------------------------------------------------------------------
// Watch (Server-Sent Events)
// ---------------------------------------------------------------------------------------------

/// Reads an SSE body frame by frame and splits it into events.
struct EventReader {
    body: Body,
    buffer: String,
}

impl EventReader {
    /// The next event's `event` field and `data` as JSON; keep-alive comments are skipped, and
    /// the SSE `id` must be the event's version.
    /// Fails the test when no event arrives within [`WAIT`] or the stream ends.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = None;
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        event = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if event.is_none() && data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                let event =
                    event.unwrap_or_else(|| panic!("SSE event without `event:`: {block:?}"));
                let data: Value = serde_json::from_str(&data)
                    .unwrap_or_else(|err| panic!("SSE data is not JSON ({err}): {block:?}"));
                assert_eq!(
                    id,
                    Some(data["version"].to_string()),
                    "the SSE id is the event's version: {block:?}"
                );
                return (event, data);
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an SSE frame arrives in time")
                .expect("the SSE stream does not end")
                .expect("the SSE body can be read");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("SSE is UTF-8"));
            }
        }
    }
}

async fn watch(app: &Router, kind: &str, name: &str) -> EventReader {
    let request = Request::builder()
        .uri(format!("/election/{kind}/{name}/watch"))
        .body(Body::empty())
        .unwrap();
    let response = tokio::time::timeout(WAIT, app.clone().oneshot(request))
        .await
        .expect("watch answers in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("text/event-stream"),
        "watch content type is {content_type:?}"
    );
    EventReader {
        body: response.into_body(),
        buffer: String::new(),
    }
}

#[tokio::test]
async fn watch_says_nobody_leads_then_reports_the_election_made_through_the_router() {
    let app = app();
    let mut events = watch(&app, "k", "e").await;

    let (event, data) = events.next().await;
    assert_eq!(event, "current");
    assert_eq!(
        data,
        json!({"type": "current", "kind": "k", "election": "e", "leader": "", "fencing_token": 0, "version": 1})
    );

    // Campaigns in another election and kind are not reported.
    campaign(&app, "k", "other", "mallory").await;
    campaign(&app, "k2", "e", "mallory").await;
    assert_eq!(
        campaign(&app, "k", "e", "alice").await.status,
        StatusCode::OK
    );

    let (event, data) = events.next().await;
    assert_eq!(event, "elected");
    assert_eq!(
        data,
        json!({"type": "elected", "kind": "k", "election": "e", "leader": "alice", "fencing_token": 1, "version": 2})
    );
}

#[tokio::test]
async fn watch_of_a_led_election_starts_with_the_leader_then_reports_handover_and_resignation() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;
    let mut events = watch(&app, "k", "e").await;

    let (event, data) = events.next().await;
    assert_eq!(event, "current");
    assert_eq!(
        data,
        json!({"type": "current", "kind": "k", "election": "e", "leader": "alice", "fencing_token": 1, "version": 2})
    );

    // A renewal is no change of leadership: nothing is reported for it.
    campaign(&app, "k", "e", "alice").await;
    call_json(
        &app,
        Method::PUT,
        "/election/k/e",
        json!({"leader": "bob", "term": TERM}),
    )
    .await;
    let (event, data) = events.next().await;
    assert_eq!(event, "handed_over");
    assert_eq!(
        data,
        json!({"type": "handed_over", "kind": "k", "election": "e", "leader": "bob", "fencing_token": 2, "version": 4})
    );

    call_json(
        &app,
        Method::DELETE,
        "/election/k/e",
        json!({"leader": "bob"}),
    )
    .await;
    let (event, data) = events.next().await;
    assert_eq!(event, "resigned");
    assert_eq!(
        data,
        json!({"type": "resigned", "kind": "k", "election": "e", "leader": "bob", "fencing_token": 2, "version": 5})
    );
}

// ---------------------------------------------------------------------------------------------
// Invalid inputs: 400 (or 413/415) with a JSON message naming the field; never a 500
// ---------------------------------------------------------------------------------------------

/// Names refused by the alphabet or the length limit, as they appear in a URL path.
fn bad_path_names() -> Vec<(String, &'static str)> {
    vec![
        ("a*".to_owned(), "`*`"),
        ("a%2A".to_owned(), "percent-encoded `*`"),
        ("a%3F".to_owned(), "percent-encoded `?`"),
        ("a%5B0%5D".to_owned(), "percent-encoded `[`"),
        ("a%20b".to_owned(), "percent-encoded space"),
        ("x".repeat(254), "254 characters"),
    ]
}

#[tokio::test]
async fn invalid_election_names_in_the_path_are_400_naming_election_on_every_route() {
    let app = app();
    for (bad, what) in bad_path_names() {
        let uri = format!("/election/k/{bad}");
        let requests = [
            call(&app, Method::GET, &uri).await,
            call_json(
                &app,
                Method::POST,
                &uri,
                json!({"candidate": "c", "term": TERM}),
            )
            .await,
            call_json(
                &app,
                Method::PATCH,
                &uri,
                json!({"leader": "c", "term": TERM}),
            )
            .await,
            call_json(
                &app,
                Method::PUT,
                &uri,
                json!({"leader": "c", "term": TERM}),
            )
            .await,
            call_json(&app, Method::DELETE, &uri, json!({"leader": "c"})).await,
            call(&app, Method::GET, &format!("{uri}/watch")).await,
        ];
        for (i, reply) in requests.iter().enumerate() {
            let request = format!("request #{i} to {uri} ({what})");
            let message = reply.error(StatusCode::BAD_REQUEST);
            assert_names_field(&message, "election", &request);
        }
    }
}

#[tokio::test]
async fn invalid_kinds_in_the_path_are_400_naming_kind() {
    let app = app();
    for (bad, what) in bad_path_names() {
        for uri in [
            format!("/election/{bad}"),
            format!("/election/{bad}/e"),
            format!("/election/{bad}/e/watch"),
        ] {
            let message = call(&app, Method::GET, &uri)
                .await
                .error(StatusCode::BAD_REQUEST);
            assert_names_field(&message, "kind", &format!("GET {uri} ({what})"));
        }
        let uri = format!("/election/{bad}/e");
        let message = call_json(
            &app,
            Method::POST,
            &uri,
            json!({"candidate": "c", "term": TERM}),
        )
        .await
        .error(StatusCode::BAD_REQUEST);
        assert_names_field(&message, "kind", &format!("POST {uri} ({what})"));
    }
}

#[tokio::test]
async fn a_name_of_exactly_253_characters_is_accepted() {
    let app = app();
    let name = "x".repeat(253);
    let reply = campaign(&app, "k", &name, &name).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["leader"], json!(name));
}

#[tokio::test]
async fn invalid_body_fields_are_400_naming_the_field() {
    let app = app();
    let long = "x".repeat(254);
    let cases = [
        (
            Method::POST,
            json!({"candidate": "", "term": TERM}),
            "candidate",
        ),
        (
            Method::POST,
            json!({"candidate": "a*", "term": TERM}),
            "candidate",
        ),
        (
            Method::POST,
            json!({"candidate": "a b", "term": TERM}),
            "candidate",
        ),
        (
            Method::POST,
            json!({"candidate": long, "term": TERM}),
            "candidate",
        ),
        (Method::POST, json!({"candidate": "c", "term": 999}), "term"),
        (
            Method::POST,
            json!({"candidate": "c", "term": 86_400_001}),
            "term",
        ),
        (Method::POST, json!({"candidate": "c", "term": -1}), "term"),
        (Method::PATCH, json!({"leader": "", "term": TERM}), "leader"),
        (Method::PATCH, json!({"leader": "c", "term": 999}), "term"),
        (
            Method::PATCH,
            json!({"leader": "c", "term": 86_400_001}),
            "term",
        ),
        (
            Method::PATCH,
            json!({"leader": "c", "term": TERM, "retries": 11}),
            "retries",
        ),
        (
            Method::PATCH,
            json!({"leader": "c", "term": TERM, "retries": -1}),
            "retries",
        ),
        (
            Method::PATCH,
            json!({"leader": "c", "term": TERM, "retry_interval": 1001}),
            "retry_interval",
        ),
        (Method::PUT, json!({"leader": "a?", "term": TERM}), "leader"),
        (Method::PUT, json!({"leader": "c", "term": 999}), "term"),
        (
            Method::PUT,
            json!({"leader": "c", "term": 86_400_001}),
            "term",
        ),
        (Method::DELETE, json!({"leader": "a[0]"}), "leader"),
        (Method::DELETE, json!({"leader": ""}), "leader"),
    ];
    for (method, body, field) in cases {
        let request = format!("{method} /election/k/e {body}");
        let message = call_json(&app, method, "/election/k/e", body)
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_names_field(&message, field, &request);
    }
}

#[tokio::test]
async fn retry_bounds_are_inclusive() {
    let app = app();
    campaign(&app, "k", "e", "alice").await;
    let reply = call_json(
        &app,
        Method::PATCH,
        "/election/k/e",
        json!({"leader": "alice", "term": 1000, "retries": 10, "retry_interval": 1000}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn malformed_json_is_400_with_message() {
    let app = app();
    for body in ["{", "{\"candidate\": \"c\", \"term\": }", "not json", ""] {
        let reply = call_raw(
            &app,
            Method::POST,
            "/election/k/e",
            Some("application/json"),
            body,
        )
        .await;
        let message = reply.error(StatusCode::BAD_REQUEST);
        assert!(!message.is_empty(), "body {body:?}");
    }
}

#[tokio::test]
async fn missing_fields_are_400_naming_the_field() {
    let app = app();
    let cases = [
        (Method::POST, json!({"term": 5000}), "candidate"),
        (Method::POST, json!({"candidate": "c"}), "term"),
        (Method::PATCH, json!({"term": 5000}), "leader"),
        (Method::PATCH, json!({"leader": "c"}), "term"),
        (Method::PUT, json!({"term": 5000}), "leader"),
        (Method::PUT, json!({"leader": "c"}), "term"),
        (Method::DELETE, json!({}), "leader"),
    ];
    for (method, body, field) in cases {
        let request = format!("{method} /election/k/e {body}");
        let message = call_json(&app, method, "/election/k/e", body)
            .await
            .error(StatusCode::BAD_REQUEST);
        assert!(
            message.contains(field),
            "{request}: message {message:?} does not name `{field}`"
        );
    }
}

#[tokio::test]
async fn fields_of_the_wrong_type_are_400_naming_the_field() {
    let app = app();
    let cases = [
        (
            Method::POST,
            json!({"candidate": "c", "term": "5000"}),
            "term",
        ),
        (
            Method::POST,
            json!({"candidate": 7, "term": 5000}),
            "candidate",
        ),
        (Method::POST, json!({"candidate": "c", "term": 1.5}), "term"),
        (
            Method::POST,
            json!({"candidate": "c", "term": 1e20}),
            "term",
        ),
        (
            Method::PATCH,
            json!({"leader": "c", "term": 5000, "retries": "3"}),
            "retries",
        ),
        (
            Method::PUT,
            json!({"leader": ["c"], "term": 5000}),
            "leader",
        ),
        (Method::DELETE, json!({"leader": null}), "leader"),
    ];
    for (method, body, field) in cases {
        let request = format!("{method} /election/k/e {body}");
        let message = call_json(&app, method, "/election/k/e", body)
            .await
            .error(StatusCode::BAD_REQUEST);
        assert!(
            message.contains(field),
            "{request}: message {message:?} does not name `{field}`"
        );
    }
    // A body that is JSON but not an object.
    for body in ["\"c\"", "5000", "null", "true"] {
        let message = call_raw(
            &app,
            Method::POST,
            "/election/k/e",
            Some("application/json"),
            body,
        )
        .await
        .error(StatusCode::BAD_REQUEST);
        assert!(!message.is_empty(), "body {body}");
    }
}

#[tokio::test]
async fn a_declared_content_type_other_than_json_is_415_on_every_body_route() {
    let app = app();
    let body = json!({"candidate": "c", "leader": "c", "term": TERM}).to_string();
    for method in [Method::POST, Method::PATCH, Method::PUT, Method::DELETE] {
        for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
            let reply = call_raw(
                &app,
                method.clone(),
                "/election/k/e",
                Some(content_type),
                body.clone(),
            )
            .await;
            let message = reply.error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert!(
                message.contains("application/json"),
                "{method} with {content_type:?}: message {message:?} says what is expected"
            );
        }
    }
    // Nothing was campaigned for.
    call(&app, Method::GET, "/election/k/e")
        .await
        .error(StatusCode::NOT_FOUND);
}

/// The Go service read a body without Content-Type as JSON, and its clients — its own HTTP
/// benchmark among them (Go's `http.NewRequest`) — send none: every body route serves them, and
/// still refuses malformed or oversized bodies with a message.
#[tokio::test]
async fn a_body_without_content_type_is_read_as_json() {
    let app = app();
    let send = async |method: Method, body: Value| {
        call_raw(&app, method, "/election/k/e", None, body.to_string()).await
    };
    let reply = send(Method::POST, json!({"candidate": "c", "term": TERM})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["elected"], true);
    let reply = send(Method::PATCH, json!({"leader": "c", "term": TERM})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = send(Method::PUT, json!({"leader": "d", "term": TERM})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = send(Method::DELETE, json!({"leader": "d"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let malformed = call_raw(
        &app,
        Method::POST,
        "/election/k/e",
        None,
        "{\"candidate\":".to_owned(),
    )
    .await;
    assert!(!malformed.error(StatusCode::BAD_REQUEST).is_empty());
    let missing = send(Method::POST, json!({"term": TERM})).await;
    assert!(missing.error(StatusCode::BAD_REQUEST).contains("candidate"));
    let padding = " ".repeat(http::BODY_LIMIT);
    let oversized = format!("{{\"candidate\": \"c\",{padding} \"term\": {TERM}}}");
    let reply = call_raw(&app, Method::POST, "/election/k/e", None, oversized).await;
    assert!(!reply.error(StatusCode::PAYLOAD_TOO_LARGE).is_empty());
}

#[tokio::test]
async fn json_content_type_with_charset_is_accepted() {
    let app = app();
    let reply = call_raw(
        &app,
        Method::POST,
        "/election/k/e",
        Some("application/json; charset=utf-8"),
        json!({"candidate": "c", "term": TERM}).to_string(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn body_over_64_kib_is_413_with_message() {
    let app = app();
    // Valid JSON, too large only because of its padding.
    let padding = " ".repeat(http::BODY_LIMIT);
    let body = format!("{{\"candidate\": \"c\",{padding} \"term\": {TERM}}}");
    assert!(body.len() > 64 * 1024);
    for method in [Method::POST, Method::PATCH, Method::PUT, Method::DELETE] {
        let reply = call_raw(
            &app,
            method.clone(),
            "/election/k/e",
            Some("application/json"),
            body.clone(),
        )
        .await;
        let message = reply.error(StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!message.is_empty(), "{method}");
    }
    // Just under the limit is fine.
    let padding = " ".repeat(http::BODY_LIMIT - 100);
    let body = format!("{{\"candidate\": \"c\",{padding} \"term\": {TERM}}}");
    assert!(body.len() <= http::BODY_LIMIT);
    let reply = call_raw(
        &app,
        Method::POST,
        "/election/k/e",
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

// ---------------------------------------------------------------------------------------------
// Probes, metrics, Kubernetes, fallbacks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn livez_is_200_ok() {
    let reply = call(&app(), Method::GET, "/livez").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_is_200_ok_with_a_memory_store() {
    let reply = call(&app(), Method::GET, "/readyz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_is_503_once_the_agent_shuts_down() {
    let shutdown = CancellationToken::new();
    let service = ElectionService::new(
        Store::Memory(MemoryStore::new()),
        None,
        TermBounds::default(),
        Arc::new(Metrics::new("test", vec![0.1, 1.0]).unwrap()),
        shutdown.clone(),
    );
    let app = http::router(service, true);
    shutdown.cancel();
    let reply = call(&app, Method::GET, "/readyz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = reply.json();
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// The value of the sample `name{labels...}` in Prometheus text, where `labels` must all appear.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_a_campaign_made_through_the_router_as_success() {
    let app = app();
    let count = |text: &str| {
        sample(
            text,
            "election_agent_request_duration_seconds_count",
            &[r#"action="campaign""#, r#"status="success""#],
        )
    };

    let before = call(&app, Method::GET, "/metrics").await;
    assert_eq!(before.status, StatusCode::OK);
    assert!(
        before.content_type().starts_with("text/plain"),
        "{:?}",
        before.content_type()
    );
    assert_eq!(count(&before.text()), Some(0.0), "{}", before.text());

    campaign(&app, "k", "e", "alice").await;
    campaign(&app, "k", "e", "bob").await; // losing is a successful request too

    let after = call(&app, Method::GET, "/metrics").await;
    assert_eq!(after.status, StatusCode::OK);
    let text = after.text();
    assert!(text.contains("election_agent_request_duration_seconds"));
    assert_eq!(count(&text), Some(2.0), "{text}");
}

#[tokio::test]
async fn metrics_count_a_refused_request_as_fail() {
    let app = app();
    call_json(
        &app,
        Method::PATCH,
        "/election/k/e",
        json!({"leader": "alice", "term": TERM}),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    let text = call(&app, Method::GET, "/metrics").await.text();
    assert_eq!(
        sample(
            &text,
            "election_agent_request_duration_seconds_count",
            &[r#"action="extend_elected_term""#, r#"status="fail""#],
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_are_404_with_message_when_disabled() {
    let app = http::router(service(), false);
    let message = call(&app, Method::GET, "/metrics")
        .await
        .error(StatusCode::NOT_FOUND);
    assert!(message.contains("disabled"), "{message}");
}

#[tokio::test]
async fn kubernetes_pods_are_501_with_message() {
    let message = call(&app(), Method::GET, "/kube/ns/dep/pods")
        .await
        .error(StatusCode::NOT_IMPLEMENTED);
    assert!(message.contains("Kubernetes"), "{message}");
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let app = app();
    for uri in [
        "/nope",
        "/election",
        "/election/k/e/watch/more",
        "/kube/ns/pods",
    ] {
        let message = call(&app, Method::GET, uri)
            .await
            .error(StatusCode::NOT_FOUND);
        assert!(
            message.contains("no route") && message.contains(uri),
            "{uri}: {message}"
        );
    }
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let app = app();
    for (method, uri, allowed) in [
        (Method::POST, "/livez", "GET,HEAD"),
        (Method::DELETE, "/readyz", "GET,HEAD"),
        (Method::PUT, "/metrics", "GET,HEAD"),
        (Method::POST, "/election/k", "GET,HEAD"),
        (Method::POST, "/election/k/e/watch", "GET,HEAD"),
        (Method::DELETE, "/kube/ns/dep/pods", "GET,HEAD"),
        (Method::PATCH, "/openapi.json", "GET,HEAD"),
        (
            Method::OPTIONS,
            "/election/k/e",
            "DELETE,GET,HEAD,PATCH,POST,PUT",
        ),
    ] {
        let reply = call(&app, method.clone(), uri).await;
        let message = reply.error(StatusCode::METHOD_NOT_ALLOWED);
        assert!(
            message.contains(method.as_str()) && message.contains(uri),
            "{method} {uri}: {message}"
        );
        // RFC 9110 §15.5.6: a 405 lists the allowed methods (compared as a set).
        let allow = reply
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut allow: Vec<&str> = allow.split(',').map(str::trim).collect();
        allow.sort_unstable();
        assert_eq!(allow.join(","), allowed, "Allow header of {method} {uri}");
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAPI: served == generated == checked in, and every documented operation is routed
// ---------------------------------------------------------------------------------------------

fn generated_openapi() -> Value {
    serde_json::to_value(http::openapi()).expect("the OpenAPI document serializes")
}

/// Where two JSON documents first differ, as a JSON pointer with both values shortened (unlike a
/// dump of two 25 KB documents); `None` when they are equal.
fn first_difference(left: &Value, right: &Value, pointer: &str) -> Option<String> {
    fn short(value: Option<&Value>) -> String {
        let text = value.map_or_else(|| "(absent)".to_owned(), Value::to_string);
        match text.char_indices().nth(200) {
            Some((end, _)) => format!("{}...", &text[..end]),
            None => text,
        }
    }
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            let keys: std::collections::BTreeSet<&String> = l.keys().chain(r.keys()).collect();
            keys.into_iter().find_map(|key| {
                let pointer = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                match (l.get(key), r.get(key)) {
                    (Some(l), Some(r)) => first_difference(l, r, &pointer),
                    (l, r) => Some(format!("{pointer}: {} != {}", short(l), short(r))),
                }
            })
        }
        (Value::Array(l), Value::Array(r)) if l.len() == r.len() => l
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (l, r))| first_difference(l, r, &format!("{pointer}/{i}"))),
        (l, r) if l == r => None,
        (l, r) => Some(format!(
            "{}: {} != {}",
            if pointer.is_empty() { "/" } else { pointer },
            short(Some(l)),
            short(Some(r))
        )),
    }
}

#[tokio::test]
async fn served_openapi_document_equals_the_generated_one() {
    let reply = call(&app(), Method::GET, "/openapi.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.content_type().starts_with("application/json"),
        "{:?}",
        reply.content_type()
    );
    if let Some(difference) = first_difference(&reply.json(), &generated_openapi(), "") {
        panic!("served /openapi.json != http::openapi() at {difference}");
    }
}

/// The document states the rules the server enforces, so a client (or schemathesis) generating
/// requests from it is never refused one it says is valid — including the term bounds this agent
/// was configured with.
#[tokio::test]
async fn the_served_document_states_the_rules_the_server_enforces() {
    let bounds = TermBounds {
        min: Term::from_millis(2_000),
        max: Term::from_millis(90_000),
    };
    let service = ElectionService::new(
        Store::Memory(MemoryStore::new()),
        None,
        bounds,
        Arc::new(Metrics::new("test", vec![0.1, 1.0]).unwrap()),
        CancellationToken::new(),
    );
    let app = http::router(service, true);
    let document = call(&app, Method::GET, "/openapi.json").await.json();
    let schemas = &document["components"]["schemas"];
    for body in ["CampaignBody", "ExtendBody", "HandoverBody"] {
        let term = &schemas[body]["properties"]["term"];
        assert_eq!(term["minimum"], 2_000, "{body}: {term}");
        assert_eq!(term["maximum"], 90_000, "{body}: {term}");
    }
    let name = &schemas["CampaignBody"]["properties"]["candidate"];
    assert_eq!(name["maxLength"], 253);
    assert_eq!(name["minLength"], 1);
    let retries = &schemas["ExtendBody"]["properties"]["retries"];
    assert_eq!(
        (&retries["minimum"], &retries["maximum"]),
        (&json!(0), &json!(10))
    );
    // What the document allows is accepted; just outside is refused naming the field.
    for (term, status) in [
        (2_000, StatusCode::OK),
        (90_000, StatusCode::OK),
        (1_999, StatusCode::BAD_REQUEST),
        (90_001, StatusCode::BAD_REQUEST),
    ] {
        let reply = call_json(
            &app,
            Method::POST,
            &format!("/election/k/t{term}"),
            json!({"candidate": "a-b.c_d:e/f@g", "term": term}),
        )
        .await;
        assert_eq!(reply.status, status, "term {term}: {}", reply.text());
    }
}

/// JSON has one number type, and the document's `integer` includes `60000.0`: a whole number
/// is that integer; a fraction is refused naming the field.
#[tokio::test]
async fn a_whole_number_written_with_a_fraction_part_is_that_integer() {
    let app = app();
    let reply = call_raw(
        &app,
        Method::POST,
        "/election/k/e",
        Some("application/json"),
        format!("{{\"candidate\": \"c\", \"term\": {TERM}.0}}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = call_raw(
        &app,
        Method::PATCH,
        "/election/k/e",
        Some("application/json"),
        format!(
            "{{\"leader\": \"c\", \"term\": {TERM}, \"retries\": 1.0, \"retry_interval\": 0.0}}"
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    for body in [
        format!("{{\"candidate\": \"c\", \"term\": {TERM}.5}}"),
        "{\"candidate\": \"c\", \"term\": 1e300}".to_owned(),
        "{\"candidate\": \"c\", \"term\": \"60000\"}".to_owned(),
    ] {
        let reply = call_raw(
            &app,
            Method::POST,
            "/election/k/f",
            Some("application/json"),
            body.clone(),
        )
        .await;
        assert!(
            reply.error(StatusCode::BAD_REQUEST).contains("term"),
            "{body}"
        );
    }
}

/// A handover conditional on the live lease: 409 naming the live leader, nothing changed, unless
/// the lease is the expected one.
#[tokio::test]
async fn a_conditional_handover_is_409_over_another_lease_and_done_over_the_expected_one() {
    let app = app();
    let won = call_json(
        &app,
        Method::POST,
        "/election/k/e",
        json!({"candidate": "alice", "term": TERM}),
    )
    .await
    .json();
    let token = won["fencing_token"].as_u64().unwrap();
    for expected in [
        json!({"expected_leader": "bob"}),
        json!({"expected_fencing_token": token + 1}),
        json!({"expected_leader": "alice", "expected_fencing_token": token + 1}),
    ] {
        let mut body = json!({"leader": "mallory", "term": TERM});
        body.as_object_mut()
            .unwrap()
            .extend(expected.as_object().unwrap().clone());
        let reply = call_json(&app, Method::PUT, "/election/k/e", body).await;
        assert!(
            reply.error(StatusCode::CONFLICT).contains("alice leads it"),
            "{expected}"
        );
    }
    assert_eq!(
        call(&app, Method::GET, "/election/k/e").await.json()["leader"],
        "alice"
    );
    let reply = call_json(
        &app,
        Method::PUT,
        "/election/k/e",
        json!({"leader": "bob", "term": TERM, "expected_leader": "alice", "expected_fencing_token": token}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let token = reply.json()["fencing_token"].as_u64().unwrap();
    assert_eq!(
        call(&app, Method::GET, "/election/k/e").await.json()["leader"],
        "bob"
    );
    // As the document says (and schemathesis checks): an empty expected leader and a token of 0
    // mean any; a token is a whole number, `7.0` included; a negative one is refused.
    let reply = call_raw(
        &app,
        Method::PUT,
        "/election/k/e",
        Some("application/json"),
        format!(r#"{{"leader": "carol", "term": {TERM}, "expected_leader": "", "expected_fencing_token": {token}.0}}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = call_json(
        &app,
        Method::PUT,
        "/election/k/e",
        json!({"leader": "dave", "term": TERM, "expected_fencing_token": 0}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = call_json(
        &app,
        Method::PUT,
        "/election/k/e",
        json!({"leader": "erin", "term": TERM, "expected_fencing_token": -1}),
    )
    .await;
    assert!(
        reply
            .error(StatusCode::BAD_REQUEST)
            .contains("expected_fencing_token")
    );
}

#[test]
fn checked_in_openapi_document_equals_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| {
        panic!(
            "cannot read {path} ({err}); regenerate it: cargo run -- openapi > docs/openapi.json"
        )
    });
    let checked_in: Value = serde_json::from_str(&text).unwrap_or_else(|err| {
        panic!(
            "{path} is not JSON ({err}); regenerate it: cargo run -- openapi > docs/openapi.json"
        )
    });
    if let Some(difference) = first_difference(&checked_in, &generated_openapi(), "") {
        panic!(
            "docs/openapi.json (left) differs from http::openapi() (right) at {difference}; \
             regenerate it: cargo run -- openapi > docs/openapi.json"
        );
    }
}

/// A valid value for each path parameter of the document.
fn path_param(name: &str) -> &'static str {
    match name {
        "kind" => "k",
        "name" => "e",
        "namespace" => "ns",
        "deployment" => "dep",
        "pod" => "dep-1",
        other => panic!("no test value for path parameter {{{other}}}; add one to path_param"),
    }
}

/// `/election/{kind}/{name}` with every `{param}` replaced by a valid value.
fn fill_path(template: &str) -> String {
    template
        .split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(param) => path_param(param),
                None => segment,
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let app = app();
    let document = generated_openapi();
    let paths = document["paths"]
        .as_object()
        .expect("the document has paths");
    let mut operations = 0;
    for (template, item) in paths {
        let uri = fill_path(template);
        for (method, _) in item
            .as_object()
            .expect("a path item is an object")
            .iter()
            .filter(|(key, _)| METHODS.contains(&key.as_str()))
        {
            operations += 1;
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            // No body: routes that take one answer 415, which is a route's answer too.
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            // Only the head: a watch answers with an endless stream.
            let response = tokio::time::timeout(WAIT, app.clone().oneshot(request))
                .await
                .expect("router answers in time")
                .unwrap();
            let status = response.status();
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "documented {method} {template} ({uri}) is not routed"
            );
            assert_ne!(
                status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "documented {method} {template} ({uri})"
            );
            if status == StatusCode::NOT_FOUND {
                let body = tokio::time::timeout(WAIT, response.into_body().collect())
                    .await
                    .unwrap()
                    .unwrap()
                    .to_bytes();
                let body = String::from_utf8_lossy(&body);
                assert!(
                    !body.contains("no route"),
                    "documented {method} {template} ({uri}) hits the fallback: {body}"
                );
            }
        }
    }
    // 5 on /election/{kind}/{name}, list, watch, pods, livez, readyz, metrics, openapi.json.
    assert!(
        operations >= 12,
        "only {operations} operations documented: {document}"
    );
}

//! The REST API's paths: the names of an election route's path (`{kind}`, `{name}`), validated
//! as the service validates them, and whole request paths sent through the agent's router (over
//! an in-memory store), where axum percent-decodes and extracts the parameters.
//!
//! Never a panic, never a 5xx but the 501 of the Kubernetes routes (discovery is off here); an
//! accepted name is within the documented alphabet and length; an election route answers 400
//! exactly when its names are invalid. The HTTP layer parses no query string: one in `raw` is
//! carried along and ignored.
#![no_main]

use std::{
    fmt::Write,
    sync::{Arc, OnceLock},
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, Uri},
};
use election_agent::{
    discovery::check_pods_request,
    election::{ElectionService, election_key, public_kind},
    http::router,
    lease::{DEFAULT_KIND, Name},
    metrics::Metrics,
    store::{MemoryStore, Store},
};
use election_agent_fuzz::{
    assert_key, assert_name, assert_names_field, assert_object_name, bounds,
};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The one election that has a leader, so that the fuzzer also reaches the routes' 200s.
const LED_KIND: &str = "default";
const LED_ELECTION: &str = "jobs";

struct Agent {
    runtime: Runtime,
    router: Router,
}

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let metrics = Metrics::new("fuzz", vec![1.0]).expect("metrics register");
        let service = ElectionService::new(
            Store::Memory(MemoryStore::new()),
            None,
            bounds(),
            Arc::new(metrics),
            CancellationToken::new(),
        );
        runtime
            .block_on(service.campaign(LED_KIND, LED_ELECTION, "alice", 86_400_000))
            .expect("the seed campaign");
        Agent {
            runtime,
            router: router(service, false),
        }
    })
}

fn get(path: &str) -> Option<StatusCode> {
    let uri = Uri::try_from(path).ok()?;
    let request = Request::get(uri).body(Body::empty()).ok()?;
    let agent = agent();
    let response = agent
        .runtime
        .block_on(agent.router.clone().oneshot(request))
        .unwrap_or_else(|never| match never {});
    Some(response.status())
}

/// Every byte but the unreserved ones, percent-encoded: the segment reaches the handler as given.
fn segment(text: &str) -> String {
    text.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

fuzz_target!(|data: &[u8]| {
    // Three lines: `{kind}` and `{name}` (before percent-encoding), then a request path as a
    // client writes it (after the first `/`), sent as is.
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let (kind, name, raw) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );

    // The names, as the service validates them.
    let key = election_key(kind, name);
    match &key {
        Ok(key) => assert_key(key, kind, name),
        Err(err) => assert_names_field(err, &["kind", "election"]),
    }
    match public_kind(kind) {
        Ok(parsed) => assert_name(&parsed, if kind.is_empty() { DEFAULT_KIND } else { kind }),
        Err(err) => assert_names_field(&err, &["kind"]),
    }
    if let Ok(parsed) = Name::parse("candidate", name) {
        assert_name(&parsed, name);
    }
    // `/kube/{namespace}/{deployment}/pods` and `/kube/{namespace}/pod/{pod}/pods`.
    for (deployment, pod) in [(name, ""), ("", name)] {
        if check_pods_request(kind, deployment, pod).is_ok() {
            assert_object_name(kind);
            assert_object_name(name);
        }
    }

    // The same names in a request path: 400 exactly when they are invalid. An empty `{kind}`
    // is the default kind, as in every request; an empty `{name}` matches no route (404).
    let status = get(&format!("/election/{}/{}", segment(kind), segment(name)));
    let status = status.expect("a percent-encoded path is a valid URI");
    let expected = match &key {
        _ if name.is_empty() => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::BAD_REQUEST,
        Ok(key) if key.kind.as_str() == LED_KIND && key.election.as_str() == LED_ELECTION => {
            StatusCode::OK
        }
        Ok(_) => StatusCode::NOT_FOUND,
    };
    assert_eq!(status, expected, "GET /election/{kind:?}/{name:?}");

    // Any path, as a client may write it.
    if let Some(status) = get(&format!("/{raw}")) {
        assert!(
            !status.is_server_error() || status == StatusCode::NOT_IMPLEMENTED,
            "GET /{raw:?} answered {status}"
        );
    }
});

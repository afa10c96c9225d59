//! The authentication layer: one tower layer, in front of the gRPC server and of the HTTP
//! server, that authenticates every request but the probes' before any handler runs, and puts
//! its [`Caller`] into the request's extensions for the handlers' authorization checks.
//!
//! Open without credentials: gRPC health and reflection (reflection describes the public wire
//! contract only), `/livez`, `/readyz`, `/openapi.json`, and `/metrics` unless
//! `EA_AUTH_METRICS`. Everything else — unknown routes included — needs credentials. With
//! authentication off the layer passes every request through untouched.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use axum::http::{self, HeaderValue, Method, Request, Response, StatusCode, header};
use futures::future::{BoxFuture, Either};
use tower::{Layer, Service};

use super::{AuthError, Authentication, Caller, Decision, Verb};

/// The gRPC service all API methods belong to.
const ELECTION_SERVICE: &str = "/grpc.election_agent.v1.Election/";

/// Which server a layer guards: what is open there, and how a refusal is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    Http,
}

/// Authenticates the requests of one server; see the module documentation.
pub struct AuthLayer<B> {
    authentication: Option<Arc<Authentication>>,
    protocol: Protocol,
    refusal: fn(&AuthError) -> Response<B>,
}

impl<B> Clone for AuthLayer<B> {
    fn clone(&self) -> Self {
        Self {
            authentication: self.authentication.clone(),
            protocol: self.protocol,
            refusal: self.refusal,
        }
    }
}

impl AuthLayer<tonic::body::Body> {
    /// For the gRPC server: refusals are UNAUTHENTICATED (or UNAVAILABLE) statuses.
    pub fn grpc(authentication: Option<Arc<Authentication>>) -> Self {
        Self {
            authentication,
            protocol: Protocol::Grpc,
            refusal: |err| err.grpc_status().into_http(),
        }
    }
}

impl AuthLayer<axum::body::Body> {
    /// For the HTTP server: refusals are 401 (or 503) with `{"message": ...}` and, for 401,
    /// `WWW-Authenticate: Bearer`.
    pub fn http(authentication: Option<Arc<Authentication>>) -> Self {
        Self {
            authentication,
            protocol: Protocol::Http,
            refusal: http_refusal,
        }
    }
}

fn http_refusal(err: &AuthError) -> Response<axum::body::Body> {
    let body = serde_json::json!({"message": err.to_string()}).to_string();
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = err.http_status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if err.http_status() == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"election-agent\""),
        );
    }
    response
}

impl<S, B> Layer<S> for AuthLayer<B> {
    type Service = AuthService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a server's routes.
pub struct AuthService<S, B> {
    inner: S,
    layer: AuthLayer<B>,
}

impl<S: Clone, B> Clone for AuthService<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let Some(authentication) = self
            .layer
            .authentication
            .clone()
            .filter(|a| !is_open(self.layer.protocol, a, request.uri().path()))
        else {
            return Either::Left(self.inner.call(request));
        };
        // The clone that was made ready is the one to call; leave a fresh clone in its place.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let (protocol, refusal) = (self.layer.protocol, self.layer.refusal);
        Either::Right(Box::pin(async move {
            match authentication
                .authenticate(request.headers(), request.extensions())
                .await
            {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(err) => {
                    if let Some(verb) = verb_of(protocol, request.method(), request.uri().path()) {
                        authentication.count(verb, Decision::Unauthenticated);
                    }
                    tracing::debug!(path = request.uri().path(), error = %err, "request not authenticated");
                    Ok(refusal(&err))
                }
            }
        }))
    }
}

/// The HTTP handlers' extractor of the request's [`Caller`]; never refuses (without one, the
/// request was not authenticated because authentication is off).
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller::of(&parts.extensions))
    }
}

/// Whether `path` is served without credentials.
fn is_open(protocol: Protocol, authentication: &Authentication, path: &str) -> bool {
    match protocol {
        Protocol::Grpc => {
            path.starts_with("/grpc.health.v1.Health/")
                || path.starts_with("/grpc.reflection.v1.ServerReflection/")
                || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
        }
        Protocol::Http => match path {
            "/livez" | "/readyz" | "/openapi.json" => true,
            "/metrics" => !authentication.protect_metrics,
            _ => false,
        },
    }
}

/// The verb of an API request, for counting the requests refused before any handler saw them;
/// `None` for what is no API action (an unknown route, `/metrics`). The handlers name the verb
/// they check themselves.
fn verb_of(protocol: Protocol, method: &Method, path: &str) -> Option<Verb> {
    match protocol {
        Protocol::Grpc => match path.strip_prefix(ELECTION_SERVICE)? {
            "Campaign" => Some(Verb::Campaign),
            "ExtendElectedTerm" => Some(Verb::Extend),
            "Resign" => Some(Verb::Resign),
            "Handover" => Some(Verb::Handover),
            "GetLeader" | "GetPods" => Some(Verb::Get),
            "ListLeaders" => Some(Verb::List),
            "Observe" => Some(Verb::Watch),
            _ => None,
        },
        Protocol::Http => {
            let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
            match (method, segments.as_slice()) {
                (&Method::GET, ["election", _]) => Some(Verb::List),
                (&Method::GET, ["election", _, _]) => Some(Verb::Get),
                (&Method::POST, ["election", _, _]) => Some(Verb::Campaign),
                (&Method::PATCH, ["election", _, _]) => Some(Verb::Extend),
                (&Method::PUT, ["election", _, _]) => Some(Verb::Handover),
                (&Method::DELETE, ["election", _, _]) => Some(Verb::Resign),
                (&Method::GET, ["election", _, _, "watch"]) => Some(Verb::Watch),
                (&Method::GET, ["kube", _, _, "pods"] | ["kube", _, "pod", _, "pods"]) => {
                    Some(Verb::Get)
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_route_has_the_verb_its_handler_checks() {
        use Verb::*;
        for (method, path, verb) in [
            (Method::GET, "/election/default", Some(List)),
            (Method::GET, "/election/default/jobs", Some(Get)),
            (Method::POST, "/election/default/jobs", Some(Campaign)),
            (Method::PATCH, "/election/default/jobs", Some(Extend)),
            (Method::PUT, "/election/default/jobs", Some(Handover)),
            (Method::DELETE, "/election/default/jobs", Some(Resign)),
            (Method::GET, "/election/team%2Fa/jobs/watch", Some(Watch)),
            (Method::GET, "/kube/shop/web/pods", Some(Get)),
            (Method::GET, "/kube/shop/pod/web-1/pods", Some(Get)),
            (Method::POST, "/election/default", None),
            (Method::GET, "/metrics", None),
            (Method::GET, "/nowhere", None),
        ] {
            assert_eq!(
                verb_of(Protocol::Http, &method, path),
                verb,
                "{method} {path}"
            );
        }
        for (method, verb) in [
            ("Campaign", Some(Campaign)),
            ("ExtendElectedTerm", Some(Extend)),
            ("Resign", Some(Resign)),
            ("Handover", Some(Handover)),
            ("GetLeader", Some(Get)),
            ("ListLeaders", Some(List)),
            ("Observe", Some(Watch)),
            ("GetPods", Some(Get)),
            ("Unknown", None),
        ] {
            let path = format!("{ELECTION_SERVICE}{method}");
            assert_eq!(
                verb_of(Protocol::Grpc, &Method::POST, &path),
                verb,
                "{path}"
            );
        }
        assert_eq!(
            verb_of(
                Protocol::Grpc,
                &Method::POST,
                "/grpc.health.v1.Health/Check"
            ),
            None
        );
    }
}

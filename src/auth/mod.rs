//! Authentication and authorization of API requests — off unless `EA_AUTH_TOKENS_FILE`,
//! `EA_AUTH_KUBERNETES` or `EA_TLS_CLIENT_CA_FILE` is set, so clients of the Go service keep
//! working unchanged.
//!
//! * [`Authentication`] says who calls: the request's bearer token, looked up in the static
//!   tokens file ([`tokens`]) or reviewed by the Kubernetes API server ([`token_review`]); without
//!   a token, the identity the transport vouches for: a verified mTLS client certificate's
//!   name ([`crate::transport::PeerIdentity`]), when client certificates are required.
//! * [`Policy`] says what each identity may do: pure, and table-tested ([`policy`]).
//! * [`layer`] holds the thin adapters: one tower layer in front of each server authenticates
//!   every request but the probes' and puts its [`Caller`] into the request's extensions; the
//!   gRPC and HTTP handlers ask [`Caller::authorize`] as soon as they know the election. Requests
//!   without a `Caller` (authentication off) may do anything.
//!
//! Every decision is counted in `election_agent_auth_decisions_total{verb, result}`.

pub mod layer;
pub mod policy;
pub mod token_review;
pub mod tokens;

use std::{fmt, path::PathBuf, sync::Arc};

use axum::http;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

pub use layer::AuthLayer;
pub use policy::Policy;
pub use token_review::TokenReviewer;
pub use tokens::StaticTokens;

use crate::{config::AuthConfig, lease::DEFAULT_KIND, transport::PeerIdentity};

/// Who a request comes from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name (a ServiceAccount's is `system:serviceaccount:NAMESPACE:NAME`).
    pub user: String,
    /// The user's uid, when the source gives one.
    pub uid: String,
    /// The groups the user belongs to (policy subjects `group:NAME`).
    pub groups: Vec<String>,
}

/// What a request does, as policies name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// GetLeader (`GET /election/{kind}/{name}`), and GetPods.
    Get,
    /// ListLeaders (`GET /election/{kind}`).
    List,
    /// Observe (`GET /election/{kind}/{name}/watch`).
    Watch,
    /// Campaign (`POST`).
    Campaign,
    /// ExtendElectedTerm (`PATCH`).
    Extend,
    /// Resign (`DELETE`).
    Resign,
    /// Handover (`PUT`).
    Handover,
}

impl Verb {
    /// Every verb, in the order of the metric's label values.
    pub const ALL: [Verb; 7] = [
        Verb::Get,
        Verb::List,
        Verb::Watch,
        Verb::Campaign,
        Verb::Extend,
        Verb::Resign,
        Verb::Handover,
    ];

    /// The verb as policies and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Campaign => "campaign",
            Verb::Extend => "extend",
            Verb::Resign => "resign",
            Verb::Handover => "handover",
        }
    }

    /// The verb named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == name)
    }
}

/// The kind policies name GetPods by, with the namespace as the election: `/kube/{namespace}/…`
/// read as `/election/{kind}/{name}` is.
pub const PODS_KIND: &str = "kube";

/// What a request acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// One election (the kind as the request gives it: empty means `default`).
    Election {
        /// Its kind.
        kind: &'a str,
        /// Its name.
        election: &'a str,
    },
    /// Every election of a kind: a listing.
    Kind(&'a str),
    /// The pods of a namespace (GetPods).
    Pods {
        /// The namespace.
        namespace: &'a str,
    },
}

impl<'a> Target<'a> {
    /// One election.
    pub fn election(kind: &'a str, election: &'a str) -> Self {
        Target::Election { kind, election }
    }

    /// Every election of `kind`.
    pub fn kind(kind: &'a str) -> Self {
        Target::Kind(kind)
    }

    /// The pods of `namespace`.
    pub fn pods(namespace: &'a str) -> Self {
        Target::Pods { namespace }
    }

    /// The kind and election a policy matches; no election for a listing.
    fn policy_names(&self) -> (&'a str, Option<&'a str>) {
        let kind = |kind: &'a str| if kind.is_empty() { DEFAULT_KIND } else { kind };
        match *self {
            Target::Election { kind: k, election } => (kind(k), Some(election)),
            Target::Kind(k) => (kind(k), None),
            Target::Pods { namespace } => (PODS_KIND, Some(namespace)),
        }
    }
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.policy_names()) {
            (Target::Pods { namespace }, _) => write!(f, "the pods of namespace {namespace}"),
            (_, (kind, Some(election))) => write!(f, "election {kind}/{election}"),
            (_, (kind, None)) => write!(f, "the elections of kind {kind}"),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token, and no identity from the transport.
    #[error("authentication required: send the header Authorization: Bearer TOKEN")]
    MissingToken,
    /// An Authorization header that is not `Bearer TOKEN`.
    #[error("the Authorization header must be Bearer TOKEN")]
    NotBearer,
    /// A token no source knows.
    #[error("invalid bearer token")]
    InvalidToken,
    /// The Kubernetes API server could not review the token (unreachable, or refused the
    /// TokenReview: the agent's log says why).
    #[error("cannot verify the bearer token now: the Kubernetes TokenReview failed")]
    Unverifiable,
    /// The caller is authenticated but the policy does not allow the request.
    #[error("{user} may not {} {target}", verb.as_str())]
    Denied {
        /// Who asked.
        user: String,
        /// What for.
        verb: Verb,
        /// On what, as [`Target`] shows it.
        target: String,
    },
}

impl AuthError {
    /// The HTTP status: 401 unauthenticated, 403 denied, 503 when the token cannot be verified.
    pub fn http_status(&self) -> http::StatusCode {
        match self {
            AuthError::MissingToken | AuthError::NotBearer | AuthError::InvalidToken => {
                http::StatusCode::UNAUTHORIZED
            }
            AuthError::Unverifiable => http::StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Denied { .. } => http::StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status: UNAUTHENTICATED, PERMISSION_DENIED or UNAVAILABLE likewise.
    pub fn grpc_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            AuthError::MissingToken | AuthError::NotBearer | AuthError::InvalidToken => {
                tonic::Status::unauthenticated(message)
            }
            AuthError::Unverifiable => tonic::Status::unavailable(message),
            AuthError::Denied { .. } => tonic::Status::permission_denied(message),
        }
    }
}

/// Why authentication could not be set up; each renders as one line naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// Which file: tokens or policy.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tokens file is not in kube-apiserver's `--token-auth-file` format.
    #[error("invalid tokens file {}, line {line}: {reason}", path.display())]
    Tokens {
        /// The file.
        path: PathBuf,
        /// The line at fault, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The policy file is invalid.
    #[error("invalid policy file {}: {reason}", path.display())]
    Policy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `EA_AUTH_KUBERNETES` without a Kubernetes client.
    #[error("EA_AUTH_KUBERNETES=true needs a connection to Kubernetes, and this agent has none")]
    NoKubernetes,
    /// The decisions metric could not be registered.
    #[error("cannot register the authorization metric: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The result label of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Authenticated, and the policy allows it.
    Allowed,
    /// Authenticated, and the policy does not allow it.
    Denied,
    /// No identity: no, a malformed or an invalid token.
    Unauthenticated,
}

impl Decision {
    const ALL: [Decision; 3] = [
        Decision::Allowed,
        Decision::Denied,
        Decision::Unauthenticated,
    ];

    fn label(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Unauthenticated => "unauthenticated",
        }
    }
}

/// `election_agent_auth_decisions_total{verb, result}`, every series resolved at start-up.
#[derive(Clone)]
pub struct AuthMetrics {
    /// Indexed like [`Verb::ALL`], then [`Decision::ALL`].
    decisions: Vec<[IntCounter; 3]>,
}

impl AuthMetrics {
    /// Registers the metric on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "election_agent_auth_decisions_total",
                "API requests by verb and authorization result (allowed, denied, unauthenticated).",
            ),
            &["verb", "result"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(Self {
            decisions: Verb::ALL
                .iter()
                .map(|verb| {
                    Decision::ALL.map(|d| decisions.with_label_values(&[verb.as_str(), d.label()]))
                })
                .collect(),
        })
    }

    /// Counts one decision.
    pub fn count(&self, verb: Verb, decision: Decision) {
        let v = Verb::ALL
            .iter()
            .position(|v| *v == verb)
            .unwrap_or_default();
        let d = Decision::ALL
            .iter()
            .position(|d| *d == decision)
            .unwrap_or_default();
        self.decisions[v][d].inc();
    }
}

/// Who calls, from a request's credentials; and the policy their requests are checked against.
pub struct Authentication {
    tokens: Option<StaticTokens>,
    reviewer: Option<TokenReviewer>,
    /// A verified client certificate names the caller of a request without a token.
    client_certificates: bool,
    authorizer: Arc<Authorizer>,
    protect_metrics: bool,
}

/// The policy and the decisions metric, shared by every [`Caller`].
struct Authorizer {
    policy: Policy,
    metrics: AuthMetrics,
}

impl Authentication {
    /// Authentication as `config` says — `None` when it is off. Reads the tokens and policy
    /// files; `kube` is the client TokenReviews go through (needed with `EA_AUTH_KUBERNETES`);
    /// the decisions metric is registered on `registry`.
    pub fn load(
        config: &AuthConfig,
        kube: Option<kube::Client>,
        registry: &Registry,
    ) -> Result<Option<Self>, LoadError> {
        if !config.enabled() {
            return Ok(None);
        }
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                what,
                path: path.clone(),
                source,
            })
        };
        let tokens = config
            .tokens_file
            .as_ref()
            .map(|path| {
                StaticTokens::parse(&read("tokens file", path)?).map_err(|err| LoadError::Tokens {
                    path: path.clone(),
                    line: err.line,
                    reason: err.reason,
                })
            })
            .transpose()?;
        let policy = match &config.policy_file {
            Some(path) => {
                Policy::parse(&read("policy file", path)?).map_err(|reason| LoadError::Policy {
                    path: path.clone(),
                    reason,
                })?
            }
            None => Policy::default_for_authenticated(),
        };
        let reviewer = if config.kubernetes {
            let client = kube.ok_or(LoadError::NoKubernetes)?;
            Some(TokenReviewer::new(client, config.audience.clone()))
        } else {
            None
        };
        tracing::info!(
            static_tokens = tokens.as_ref().map(StaticTokens::len),
            kubernetes_audience = config.kubernetes.then_some(config.audience.as_str()),
            policy = ?config.policy_file,
            protect_metrics = config.metrics,
            "authentication on"
        );
        Ok(Some(Self {
            tokens,
            reviewer,
            client_certificates: config.client_certificates,
            authorizer: Arc::new(Authorizer {
                policy,
                metrics: AuthMetrics::register(registry)?,
            }),
            protect_metrics: config.metrics,
        }))
    }

    /// Authenticates a request by its headers (the bearer token) and, without a token, by its
    /// extensions: the verified client certificate the transport put there names the caller,
    /// in no group. A token, when sent, decides: a wrong one is not rescued by a certificate.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, AuthError> {
        let identity = match bearer_token(headers)? {
            Some(token) => self.identity_of_token(token).await?,
            None => Identity {
                user: extensions
                    .get::<PeerIdentity>()
                    .filter(|_| self.client_certificates)
                    .map(|PeerIdentity(name)| name.clone())
                    .ok_or(AuthError::MissingToken)?,
                uid: String::new(),
                groups: Vec::new(),
            },
        };
        Ok(Caller(Some(Arc::new(Authenticated {
            identity,
            authorizer: self.authorizer.clone(),
        }))))
    }

    async fn identity_of_token(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(identity) = self.tokens.as_ref().and_then(|t| t.authenticate(token)) {
            return Ok(identity.clone());
        }
        let Some(reviewer) = &self.reviewer else {
            return Err(AuthError::InvalidToken);
        };
        match reviewer.review(token).await {
            Ok(Some(identity)) => Ok(identity),
            Ok(None) => Err(AuthError::InvalidToken),
            Err(err) => {
                tracing::warn!(error = %err, "a TokenReview failed: the token cannot be verified");
                Err(AuthError::Unverifiable)
            }
        }
    }

    /// Counts a decision.
    pub fn count(&self, verb: Verb, decision: Decision) {
        self.authorizer.metrics.count(verb, decision);
    }
}

/// The bearer token of `headers`, if they carry an Authorization header.
fn bearer_token(headers: &http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::NotBearer);
    }
    Ok(Some(token))
}

/// The caller of a request: put into its extensions by [`AuthLayer`] once authenticated. The
/// default, a request no layer authenticated (authentication off), may do anything.
#[derive(Clone, Default)]
pub struct Caller(Option<Arc<Authenticated>>);

struct Authenticated {
    identity: Identity,
    authorizer: Arc<Authorizer>,
}

impl Caller {
    /// The caller a request's extensions hold.
    pub fn of(extensions: &http::Extensions) -> Self {
        extensions.get::<Caller>().cloned().unwrap_or_default()
    }

    /// Who calls; `None` with authentication off.
    pub fn identity(&self) -> Option<&Identity> {
        self.0.as_ref().map(|a| &a.identity)
    }

    /// Whether the caller may `verb` on `target`, as the policy says; the decision is counted.
    pub fn authorize(&self, verb: Verb, target: Target<'_>) -> Result<(), AuthError> {
        let Some(caller) = &self.0 else {
            return Ok(());
        };
        let authorizer = &caller.authorizer;
        if authorizer.policy.allows(&caller.identity, verb, &target) {
            authorizer.metrics.count(verb, Decision::Allowed);
            return Ok(());
        }
        authorizer.metrics.count(verb, Decision::Denied);
        tracing::info!(user = %caller.identity.user, verb = verb.as_str(), %target, "request denied");
        Err(AuthError::Denied {
            user: caller.identity.user.clone(),
            verb,
            target: target.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn the_bearer_token_is_read_from_the_authorization_header() {
        assert_eq!(bearer_token(&http::HeaderMap::new()), Ok(None));
        for (value, token) in [
            ("Bearer abc", "abc"),
            ("bearer abc", "abc"),
            ("BEARER  abc ", "abc"),
        ] {
            assert_eq!(bearer_token(&headers(value)), Ok(Some(token)), "{value:?}");
        }
        for value in [
            "Basic YWxpY2U6cHc=",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "abc",
        ] {
            assert_eq!(
                bearer_token(&headers(value)),
                Err(AuthError::NotBearer),
                "{value:?}"
            );
        }
    }

    #[test]
    fn targets_read_as_the_messages_name_them() {
        assert_eq!(
            Target::election("", "jobs").to_string(),
            "election default/jobs"
        );
        assert_eq!(
            Target::election("team/a", "jobs").to_string(),
            "election team/a/jobs"
        );
        assert_eq!(
            Target::kind("batch").to_string(),
            "the elections of kind batch"
        );
        assert_eq!(
            Target::pods("shop").to_string(),
            "the pods of namespace shop"
        );
        let denied = AuthError::Denied {
            user: "alice".into(),
            verb: Verb::Handover,
            target: Target::election("", "jobs").to_string(),
        };
        assert_eq!(
            denied.to_string(),
            "alice may not handover election default/jobs"
        );
    }

    fn authentication(tokens: &str, policy: Option<&str>) -> (Authentication, Registry) {
        let registry = Registry::new();
        let authentication = Authentication {
            tokens: Some(StaticTokens::parse(tokens).unwrap()),
            reviewer: None,
            client_certificates: false,
            authorizer: Arc::new(Authorizer {
                policy: policy.map_or_else(Policy::default_for_authenticated, |p| {
                    Policy::parse(p).unwrap()
                }),
                metrics: AuthMetrics::register(&registry).unwrap(),
            }),
            protect_metrics: false,
        };
        (authentication, registry)
    }

    fn counted(registry: &Registry, verb: &str, result: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == "election_agent_auth_decisions_total")
            .flat_map(|family| family.get_metric().iter())
            .find(|metric| {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                };
                label("verb").as_deref() == Some(verb) && label("result").as_deref() == Some(result)
            })
            .map_or(0, |metric| metric.get_counter().get_value() as u64)
    }

    #[tokio::test]
    async fn a_caller_is_authenticated_by_token_and_authorized_by_policy_each_decision_counted() {
        let (auth, registry) = authentication("tok-a,alice,1,ops\n", None);
        let none = http::Extensions::new();
        assert_eq!(
            auth.authenticate(&http::HeaderMap::new(), &none)
                .await
                .err(),
            Some(AuthError::MissingToken)
        );
        assert_eq!(
            auth.authenticate(&headers("Bearer nope"), &none)
                .await
                .err(),
            Some(AuthError::InvalidToken)
        );
        let caller = auth
            .authenticate(&headers("Bearer tok-a"), &none)
            .await
            .unwrap();
        assert_eq!(caller.identity().unwrap().groups, ["ops"]);
        let jobs = Target::election("", "jobs");
        assert_eq!(caller.authorize(Verb::Campaign, jobs), Ok(()));
        assert_eq!(
            caller
                .authorize(Verb::Handover, jobs)
                .unwrap_err()
                .to_string(),
            "alice may not handover election default/jobs"
        );
        assert_eq!(counted(&registry, "campaign", "allowed"), 1);
        assert_eq!(counted(&registry, "handover", "denied"), 1);
        assert_eq!(counted(&registry, "campaign", "denied"), 0);
    }

    #[tokio::test]
    async fn without_a_token_the_transports_peer_identity_is_the_caller() {
        let (mut auth, _) = authentication("tok-a,alice,1\n", None);
        let mut extensions = http::Extensions::new();
        extensions.insert(PeerIdentity("jobs-runner".into()));
        // Without client certificates required, an identity in the extensions counts for nothing.
        assert_eq!(
            auth.authenticate(&http::HeaderMap::new(), &extensions)
                .await
                .err(),
            Some(AuthError::MissingToken)
        );
        auth.client_certificates = true;
        let caller = auth
            .authenticate(&http::HeaderMap::new(), &extensions)
            .await
            .unwrap();
        assert_eq!(caller.identity().unwrap().user, "jobs-runner");
        // A token, when sent, decides: a wrong one is not rescued by the certificate.
        assert_eq!(
            auth.authenticate(&headers("Bearer nope"), &extensions)
                .await
                .err(),
            Some(AuthError::InvalidToken)
        );
        let caller = auth
            .authenticate(&headers("Bearer tok-a"), &extensions)
            .await
            .unwrap();
        assert_eq!(caller.identity().unwrap().user, "alice");
    }

    #[test]
    fn without_authentication_a_caller_may_do_anything() {
        let caller = Caller::of(&http::Extensions::new());
        assert!(caller.identity().is_none());
        for verb in Verb::ALL {
            assert_eq!(caller.authorize(verb, Target::election("", "x")), Ok(()));
        }
    }
}

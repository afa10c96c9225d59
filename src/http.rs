//! The REST adapter: the Go service's routes plus list, watch (Server-Sent Events),
//! probes, metrics and the OpenAPI document.
//!
//! Routes are registered through `utoipa_axum`'s `OpenApiRouter`, which takes each route's path
//! and method from the handler's `#[utoipa::path]` attribute: the served document and the router
//! are built from the same declaration and cannot drift. Every error leaves as
//! `{"message": "..."}`; [`ApiError::from`] for [`ElectionError`] is the one mapping to HTTP status.
//! Each election route first asks whether its caller may act ([`Caller::authorize`]).

use std::{convert::Infallible, sync::Arc};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, FromRequest, FromRequestParts, Request, State,
        rejection::{BytesRejection, JsonRejection, PathRejection},
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response, sse},
};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use utoipa::{
    OpenApi, PartialSchema, ToSchema,
    openapi::{ObjectBuilder, RefOr, Schema, Type},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{AuthError, Caller, Target, Verb},
    discovery::{DiscoveryError, mapping::PodInfo},
    election::{ElectionError, ElectionService, EventKind, LeaderEvent},
    lease::TermBounds,
    transport::{StreamSlots, TooManyStreams},
};

/// Largest request body accepted; larger ones get 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    service: ElectionService,
    metrics_enabled: bool,
    openapi: Arc<str>,
}

/// The REST API, probes, metrics (when enabled) and the OpenAPI document over `service`.
pub fn router(service: ElectionService, metrics_enabled: bool) -> Router {
    let (router, openapi) = api().split_for_parts();
    let openapi = with_term_bounds(with_authentication(openapi), service.term_bounds());
    let state = HttpState {
        service,
        metrics_enabled,
        openapi: serde_json::to_string_pretty(&openapi)
            .unwrap_or_default()
            .into(),
    };
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// The OpenAPI 3 document of [`router`], with the default term bounds.
pub fn openapi() -> utoipa::openapi::OpenApi {
    with_authentication(api().into_openapi())
}

/// The document with what authentication adds (`EA_AUTH_*`, `EA_TLS_CLIENT_CA_FILE`): the
/// `bearer` scheme, optional on every route but the always-open probes and this document (a
/// request may also come without one: authentication off, or a client certificate naming the
/// caller), 401 on those routes and 403 where a policy decides. `/metrics` is protected only with
/// `EA_AUTH_METRICS`; a token the TokenReview API cannot verify now is 503.
fn with_authentication(mut openapi: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{
        ResponseBuilder,
        security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme},
    };
    let bearer = "bearer";
    openapi
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            bearer,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "With authentication on (EA_AUTH_TOKENS_FILE, EA_AUTH_KUBERNETES): a \
                         static token or a Kubernetes ServiceAccount token. Not needed with \
                         authentication off, or with a client certificate naming the caller.",
                    ))
                    .build(),
            ),
        );
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        "ErrorBody",
                    ))))
                    .build(),
            )
            .build()
    };
    for (path, item) in openapi.paths.paths.iter_mut() {
        if matches!(path.as_str(), "/livez" | "/readyz" | "/openapi.json") {
            continue;
        }
        let decided_by_policy = path != "/metrics";
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
        ]
        .into_iter()
        .chain([&mut item.delete])
        .flatten()
        {
            operation.security = Some(vec![
                SecurityRequirement::default(),
                SecurityRequirement::new(bearer, Vec::<String>::new()),
            ]);
            let responses = &mut operation.responses.responses;
            responses.insert(
                "401".into(),
                RefOr::T(error(
                    "Authentication is on and the request has no valid bearer token \
                     (WWW-Authenticate: Bearer)",
                )),
            );
            if decided_by_policy {
                responses.insert(
                    "403".into(),
                    RefOr::T(error(
                        "The policy (EA_AUTH_POLICY_FILE) does not let the caller do this; the \
                         message names the verb and the election",
                    )),
                );
            }
            responses.entry("503".into()).or_insert_with(|| {
                RefOr::T(error(
                    "The bearer token cannot be verified now (the Kubernetes TokenReview \
                         failed)",
                ))
            });
        }
    }
    openapi
}

/// The document as an agent with `bounds` (`EA_LEASE_MIN_TERM`, `EA_LEASE_MAX_TERM`) serves it:
/// the terms it accepts are the ones its bodies' schemas state.
fn with_term_bounds(openapi: utoipa::openapi::OpenApi, bounds: TermBounds) -> serde_json::Value {
    let mut document = serde_json::to_value(openapi).unwrap_or_default();
    for body in ["CampaignBody", "ExtendBody", "HandoverBody"] {
        let term = &mut document["components"]["schemas"][body]["properties"]["term"];
        if term.is_object() {
            term["minimum"] = bounds.min.as_millis().into();
            term["maximum"] = bounds.max.as_millis().into();
        }
    }
    document
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "election-agent",
        description = "Leader election over HTTP: campaign for, keep, hand over and watch leadership. \
            Names (kind, election, candidate, leader) are 1..253 characters of [A-Za-z0-9._:/@-]; \
            terms are milliseconds (1000 .. 86400000 by default).",
    ),
    tags(
        (name = "election", description = "Leases of elections"),
        (name = "kubernetes", description = "Kubernetes discovery"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
struct ApiDoc;

fn api() -> OpenApiRouter<HttpState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(get_leader, campaign, extend, handover, resign))
        .routes(routes!(list_leaders))
        .routes(routes!(watch))
        .routes(routes!(pods))
        .routes(routes!(pods_of_pod))
        .routes(routes!(livez))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_document))
}

/// An error response: a status and `{"message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

/// The body of every error response.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field at fault where there is one.
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<ElectionError> for ApiError {
    fn from(err: ElectionError) -> Self {
        let status = match &err {
            ElectionError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ElectionError::NoLeader { .. } | ElectionError::NotLeader { .. } => {
                StatusCode::NOT_FOUND
            }
            ElectionError::HeldByOther { .. } | ElectionError::NotAsExpected { .. } => {
                StatusCode::CONFLICT
            }
            ElectionError::Unavailable(_) => StatusCode::PRECONDITION_FAILED,
            ElectionError::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ElectionError::Discovery(err) => match err {
                DiscoveryError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                DiscoveryError::NotSynced | DiscoveryError::Client(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                DiscoveryError::NamespaceNotWatched(_)
                | DiscoveryError::DeploymentNotFound { .. }
                | DiscoveryError::PodNotFound { .. }
                | DiscoveryError::NotInDeployment { .. } => StatusCode::NOT_FOUND,
            },
        };
        Self {
            status,
            message: err.to_string(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        Self {
            status: err.http_status(),
            message: err.to_string(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // A body that parses but lacks a field or has one of the wrong type is a bad request too
        // (axum would say 422); 413 and 415 keep their status.
        let status = match rejection.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            status => status,
        };
        Self {
            status,
            message: rejection.body_text(),
        }
    }
}

impl From<TooManyStreams> for ApiError {
    fn from(err: TooManyStreams) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: err.to_string(),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: rejection.body_text(),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        Self {
            status: rejection.status(),
            message: rejection.body_text(),
        }
    }
}

/// A JSON body, whose rejections are [`ApiError`]s: declared `application/json` (or `+json`), or
/// with no Content-Type at all — the Go service read those as JSON, and its clients (its own
/// benchmark among them: Go's `http.NewRequest`) send none. Another declared type is 415.
struct Json<T>(T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if request.headers().contains_key(header::CONTENT_TYPE) {
            let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
            return Ok(Self(value));
        }
        let body = Bytes::from_request(request, state).await?;
        Ok(Self(decode_json(&body)?))
    }
}

/// A request body read as the JSON of a `T` — what [`Json`] does once the body is read, with a
/// Content-Type or without (axum's extractor ends in the same `from_bytes`). Refused (400, naming
/// what is wrong) when it is not JSON or not a `T`. Public for the fuzz targets (`fuzz/`).
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let axum::Json(value) = axum::Json::<T>::from_bytes(body)?;
    Ok(value)
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
struct Path<T>(T);

/// An integer field of a request body. JSON has one number type and JSON Schema's `integer`
/// includes `60000.0`: a number with no fractional part is that integer; `1.5`, or one beyond
/// the range of an i64, is refused (400 naming the field).
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Integer(i64),
        Float(f64),
    }
    match Number::deserialize(deserializer)? {
        Number::Integer(value) => Ok(value),
        // i64::MAX as f64 rounds up to 2^63, which is out of range: hence `<`.
        Number::Float(value)
            if value.fract() == 0.0 && value >= i64::MIN as f64 && value < i64::MAX as f64 =>
        {
            Ok(value as i64)
        }
        Number::Float(value) => Err(serde::de::Error::custom(format!(
            "{value} is not a whole number of the range of a 64-bit integer"
        ))),
    }
}

/// An optional fencing token of a request body: a whole number (see [`whole_number`]) from 0.
fn whole_token<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole_number")] i64);
    match Option::<Whole>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Whole(value)) => u64::try_from(value)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{value} is negative"))),
    }
}

/// `GET /election/{kind}/{name}`: the leader.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LeaderBody {
    /// The leader's name.
    leader: String,
    /// The fencing token of its lease.
    fencing_token: u64,
}

/// `POST /election/{kind}/{name}`: campaign.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CampaignBody {
    /// Who campaigns.
    #[schema(min_length = 1, max_length = 253, pattern = "^[A-Za-z0-9._:/@-]+$")]
    pub candidate: String,
    /// Term in milliseconds.
    #[schema(minimum = 1000, maximum = 86400000)]
    #[serde(deserialize_with = "whole_number")]
    pub term: i64,
}

/// The result of a campaign; losing is not an error.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CampaignResponse {
    /// Whether the candidate leads now.
    elected: bool,
    /// Who leads.
    leader: String,
    /// The election's kind.
    kind: String,
    /// The leader's fencing token.
    fencing_token: u64,
}

/// `PATCH /election/{kind}/{name}`: extend the leader's term.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ExtendBody {
    /// The current leader.
    #[schema(min_length = 1, max_length = 253, pattern = "^[A-Za-z0-9._:/@-]+$")]
    pub leader: String,
    /// Term in milliseconds.
    #[schema(minimum = 1000, maximum = 86400000)]
    #[serde(deserialize_with = "whole_number")]
    pub term: i64,
    /// Retries while the store is unavailable (0..10).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 10)]
    #[serde(deserialize_with = "whole_number")]
    pub retries: i64,
    /// Milliseconds between retries (0..1000).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000)]
    #[serde(deserialize_with = "whole_number")]
    pub retry_interval: i64,
}

/// `PUT /election/{kind}/{name}`: hand over to a new leader.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct HandoverBody {
    /// The NEW leader.
    #[schema(min_length = 1, max_length = 253, pattern = "^[A-Za-z0-9._:/@-]+$")]
    pub leader: String,
    /// Term in milliseconds.
    #[schema(minimum = 1000, maximum = 86400000)]
    #[serde(deserialize_with = "whole_number")]
    pub term: i64,
    /// Only hand over if this is the live lease's holder (else 409, nothing changes); empty or
    /// absent: any.
    #[serde(default)]
    #[schema(max_length = 253, pattern = "^[A-Za-z0-9._:/@-]*$")]
    pub expected_leader: Option<String>,
    /// Only hand over if this is the live lease's fencing token (else 409, nothing changes); 0
    /// or absent: any.
    #[serde(default, deserialize_with = "whole_token")]
    #[schema(minimum = 0)]
    pub expected_fencing_token: Option<u64>,
}

/// `DELETE /election/{kind}/{name}`: resign.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ResignBody {
    /// The current leader.
    #[schema(min_length = 1, max_length = 253, pattern = "^[A-Za-z0-9._:/@-]+$")]
    pub leader: String,
}

/// The success of extend, handover and resign.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ValueBody {
    /// Always true on success.
    value: bool,
    /// The lease's fencing token after extend and handover; 0 after resign.
    fencing_token: u64,
}

/// One leader of a list.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LeaderEntry {
    /// The election.
    election: String,
    /// Its leader.
    name: String,
    /// The fencing token of its lease.
    fencing_token: u64,
}

/// The live leaders of a kind.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LeadersBody {
    /// The kind.
    kind: String,
    /// Leaders, sorted by election.
    leaders: Vec<LeaderEntry>,
}

/// One Server-Sent Event of a watch; the SSE `event` field repeats `type`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    /// current | elected | handed_over | resigned | expired
    r#type: String,
    /// The election's kind.
    kind: String,
    /// The election.
    election: String,
    /// The leader after the event; for resigned/expired the one who stopped leading; empty when
    /// nobody leads.
    leader: String,
    /// That leader's fencing token.
    fencing_token: u64,
    /// Where this state stands in the election's history: strictly increasing along a stream
    /// (also the SSE `id`). A `current` event after the first is a resynchronisation: changes
    /// between it and the event before may have been missed.
    version: u64,
}

/// One event of a watch stream as `text/event-stream` carries it (how OpenAPI 3.2 and its tools
/// describe a stream): `event` says what happened, `id` is the event's `version`, and `data` is a
/// [`WatchEvent`] as JSON.
pub struct WatchStreamEvent;

impl utoipa::PartialSchema for WatchStreamEvent {
    fn schema() -> RefOr<Schema> {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        ObjectBuilder::new()
            .description(Some(
                "One Server-Sent Event of a watch stream: `event` says what happened, `id` is its \
                 `version`, `data` is a WatchEvent (#/components/schemas/WatchEvent) as JSON.",
            ))
            .property(
                "event",
                string().enum_values(Some([
                    "current",
                    "elected",
                    "handed_over",
                    "resigned",
                    "expired",
                ])),
            )
            .required("event")
            .property("id", string().pattern(Some("^[0-9]+$")))
            .required("id")
            .property(
                "data",
                string()
                    .content_media_type("application/json")
                    .description(Some("A WatchEvent, as JSON")),
            )
            .required("data")
            .into()
    }
}

impl ToSchema for WatchStreamEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((WatchEvent::name().into(), WatchEvent::schema()));
    }
}

/// Probe result.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct StatusBody {
    /// `ok`, or `unavailable` with a message.
    status: String,
    /// Why the agent is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

#[utoipa::path(get, path = "/election/{kind}/{name}", tag = "election",
    params(("kind" = String, Path, description = "Kind of the election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253), ("name" = String, Path, description = "Election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    responses(
        (status = 200, description = "The live leader", body = LeaderBody),
        (status = 400, description = "Invalid kind or name", body = ErrorBody),
        (status = 404, description = "No live leader", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
    ))]
async fn get_leader(
    State(state): State<HttpState>,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<LeaderBody>, ApiError> {
    caller.authorize(Verb::Get, Target::election(&kind, &name))?;
    let info = state.service.leader(&kind, &name).await?;
    Ok(Json(LeaderBody {
        leader: info.leader.to_string(),
        fencing_token: info.token.0,
    }))
}

#[utoipa::path(post, path = "/election/{kind}/{name}", tag = "election",
    params(("kind" = String, Path, description = "Kind of the election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253), ("name" = String, Path, description = "Election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    request_body = CampaignBody,
    responses(
        (status = 200, description = "Campaign done; `elected` says whether it was won", body = CampaignResponse),
        (status = 400, description = "Invalid or malformed request", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A declared Content-Type other than application/json (none is read as JSON)", body = ErrorBody),
    ))]
async fn campaign(
    State(state): State<HttpState>,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    Json(body): Json<CampaignBody>,
) -> Result<Json<CampaignResponse>, ApiError> {
    caller.authorize(Verb::Campaign, Target::election(&kind, &name))?;
    let result = state
        .service
        .campaign(&kind, &name, &body.candidate, body.term)
        .await?;
    Ok(Json(CampaignResponse {
        elected: result.elected,
        leader: result.leader.to_string(),
        kind: result.kind.to_string(),
        fencing_token: result.token.0,
    }))
}

#[utoipa::path(patch, path = "/election/{kind}/{name}", tag = "election",
    params(("kind" = String, Path, description = "Kind of the election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253), ("name" = String, Path, description = "Election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    request_body = ExtendBody,
    responses(
        (status = 200, description = "Term extended", body = ValueBody),
        (status = 400, description = "Invalid or malformed request", body = ErrorBody),
        (status = 404, description = "Nobody leads", body = ErrorBody),
        (status = 409, description = "Another candidate leads", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A declared Content-Type other than application/json (none is read as JSON)", body = ErrorBody),
    ))]
async fn extend(
    State(state): State<HttpState>,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    Json(body): Json<ExtendBody>,
) -> Result<Json<ValueBody>, ApiError> {
    caller.authorize(Verb::Extend, Target::election(&kind, &name))?;
    let token = state
        .service
        .extend(
            &kind,
            &name,
            &body.leader,
            body.term,
            body.retries,
            body.retry_interval,
        )
        .await?;
    Ok(Json(ValueBody {
        value: true,
        fencing_token: token.0,
    }))
}

#[utoipa::path(put, path = "/election/{kind}/{name}", tag = "election",
    params(("kind" = String, Path, description = "Kind of the election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253), ("name" = String, Path, description = "Election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    request_body = HandoverBody,
    responses(
        (status = 200, description = "`leader` leads now, with a new fencing token", body = ValueBody),
        (status = 400, description = "Invalid or malformed request", body = ErrorBody),
        (status = 409, description = "The live lease is not the one `expected_leader` / `expected_fencing_token` name (the message says who leads); nothing changed", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A declared Content-Type other than application/json (none is read as JSON)", body = ErrorBody),
    ))]
async fn handover(
    State(state): State<HttpState>,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    Json(body): Json<HandoverBody>,
) -> Result<Json<ValueBody>, ApiError> {
    caller.authorize(Verb::Handover, Target::election(&kind, &name))?;
    let token = state
        .service
        .handover(
            &kind,
            &name,
            &body.leader,
            body.term,
            body.expected_leader.as_deref().unwrap_or_default(),
            body.expected_fencing_token.unwrap_or_default(),
        )
        .await?;
    Ok(Json(ValueBody {
        value: true,
        fencing_token: token.0,
    }))
}

#[utoipa::path(delete, path = "/election/{kind}/{name}", tag = "election",
    params(("kind" = String, Path, description = "Kind of the election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253), ("name" = String, Path, description = "Election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    request_body = ResignBody,
    responses(
        (status = 200, description = "`leader` does not lead (any more)", body = ValueBody),
        (status = 400, description = "Invalid or malformed request", body = ErrorBody),
        (status = 404, description = "Another candidate leads", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A declared Content-Type other than application/json (none is read as JSON)", body = ErrorBody),
    ))]
async fn resign(
    State(state): State<HttpState>,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    Json(body): Json<ResignBody>,
) -> Result<Json<ValueBody>, ApiError> {
    caller.authorize(Verb::Resign, Target::election(&kind, &name))?;
    state.service.resign(&kind, &name, &body.leader).await?;
    Ok(Json(ValueBody {
        value: true,
        fencing_token: 0,
    }))
}

#[utoipa::path(get, path = "/election/{kind}", tag = "election",
    params(("kind" = String, Path, description = "Kind of the elections", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    responses(
        (status = 200, description = "Live leaders of the kind", body = LeadersBody),
        (status = 400, description = "Invalid kind", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
    ))]
async fn list_leaders(
    State(state): State<HttpState>,
    caller: Caller,
    Path(kind): Path<String>,
) -> Result<Json<LeadersBody>, ApiError> {
    caller.authorize(Verb::List, Target::kind(&kind))?;
    let (kind, leaders) = state.service.leaders(&kind).await?;
    Ok(Json(LeadersBody {
        kind: kind.to_string(),
        leaders: leaders
            .into_iter()
            .map(|(election, info)| LeaderEntry {
                election: election.to_string(),
                name: info.leader.to_string(),
                fencing_token: info.token.0,
            })
            .collect(),
    }))
}

fn watch_event(event: LeaderEvent) -> sse::Event {
    let kind = match event.kind {
        EventKind::Current => "current",
        EventKind::Elected => "elected",
        EventKind::HandedOver => "handed_over",
        EventKind::Resigned => "resigned",
        EventKind::Expired => "expired",
    };
    let body = WatchEvent {
        r#type: kind.to_owned(),
        kind: event.election.kind.to_string(),
        election: event.election.election.to_string(),
        leader: event.leader.map(|l| l.to_string()).unwrap_or_default(),
        fencing_token: event.token.0,
        version: event.version.0,
    };
    sse::Event::default()
        .event(kind)
        .id(event.version.to_string())
        .json_data(body)
        .unwrap_or_default()
}

#[utoipa::path(get, path = "/election/{kind}/{name}/watch", tag = "election",
    params(("kind" = String, Path, description = "Kind of the election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253), ("name" = String, Path, description = "Election", pattern = "^[A-Za-z0-9._:/@-]+$", max_length = 253)),
    responses(
        (status = 200, description = "Server-Sent Events: the current leader at once, then every change \
            (elected, handed_over, resigned, expired), each with a strictly increasing `version` (also \
            the event `id`); a later `current` event is a resynchronisation after changes may have been \
            missed. While the store is unavailable the stream stays open and resynchronises once it is back",
            content_type = "text/event-stream", body = WatchStreamEvent),
        (status = 400, description = "Invalid kind or name", body = ErrorBody),
        (status = 412, description = "Lease store unavailable", body = ErrorBody),
        (status = 429, description = "The agent, or this HTTP/2 connection, already serves its maximum of watch streams (EA_HTTP_MAX_WATCH_STREAMS, EA_HTTP_MAX_WATCH_STREAMS_PER_CONNECTION)", body = ErrorBody),
    ))]
async fn watch(
    State(state): State<HttpState>,
    caller: Caller,
    slots: Option<Extension<StreamSlots>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<sse::Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, ApiError> {
    caller.authorize(Verb::Watch, Target::election(&kind, &name))?;
    // Held by the stream: its slot is free again once the client is gone.
    let slot = slots.map(|Extension(slots)| slots.acquire()).transpose()?;
    let events = state.service.observe(&kind, &name).await?;
    let events = events.map(move |event| {
        let _slot = &slot;
        Ok(watch_event(event))
    });
    Ok(sse::Sse::new(events).keep_alive(sse::KeepAlive::default()))
}

/// The pods of a Deployment (`Pods` of the wire contract; every field present).
#[derive(Serialize, ToSchema)]
pub struct PodsBody {
    /// Sorted by ReplicaSet revision, then name.
    items: Vec<PodInfo>,
}

#[utoipa::path(get, path = "/kube/{namespace}/{deployment}/pods", tag = "kubernetes",
    params(("namespace" = String, Path, description = "Namespace", pattern = "^[a-z0-9.-]+$", min_length = 1, max_length = 253), ("deployment" = String, Path, description = "Deployment", pattern = "^[a-z0-9.-]+$", min_length = 1, max_length = 253)),
    responses(
        (status = 200, description = "The Deployment's pods, from the watch caches", body = PodsBody),
        (status = 400, description = "Invalid namespace or Deployment name", body = ErrorBody),
        (status = 404, description = "No such namespace (among those watched) or Deployment", body = ErrorBody),
        (status = 501, description = "Kubernetes features are off", body = ErrorBody),
        (status = 503, description = "The caches have not synced yet", body = ErrorBody),
    ))]
async fn pods(
    State(state): State<HttpState>,
    caller: Caller,
    Path((namespace, deployment)): Path<(String, String)>,
) -> Result<Json<PodsBody>, ApiError> {
    caller.authorize(Verb::Get, Target::pods(&namespace))?;
    let pods = state.service.pods(&namespace, &deployment, "").await?;
    Ok(Json(PodsBody {
        items: pods.items.clone(),
    }))
}

#[utoipa::path(get, path = "/kube/{namespace}/pod/{pod}/pods", tag = "kubernetes",
    params(("namespace" = String, Path, description = "Namespace", pattern = "^[a-z0-9.-]+$", min_length = 1, max_length = 253), ("pod" = String, Path, description = "A pod of the Deployment", pattern = "^[a-z0-9.-]+$", min_length = 1, max_length = 253)),
    responses(
        (status = 200, description = "The pods of the Deployment owning `pod`, from the watch caches", body = PodsBody),
        (status = 400, description = "Invalid namespace or pod name", body = ErrorBody),
        (status = 404, description = "No such namespace (among those watched) or pod, or the pod belongs to no Deployment", body = ErrorBody),
        (status = 501, description = "Kubernetes features are off", body = ErrorBody),
        (status = 503, description = "The caches have not synced yet", body = ErrorBody),
    ))]
async fn pods_of_pod(
    State(state): State<HttpState>,
    caller: Caller,
    Path((namespace, pod)): Path<(String, String)>,
) -> Result<Json<PodsBody>, ApiError> {
    caller.authorize(Verb::Get, Target::pods(&namespace))?;
    let pods = state.service.pods(&namespace, "", &pod).await?;
    Ok(Json(PodsBody {
        items: pods.items.clone(),
    }))
}

#[utoipa::path(get, path = "/livez", tag = "operations",
    responses((status = 200, description = "The process serves requests", body = StatusBody)))]
async fn livez() -> Json<StatusBody> {
    Json(StatusBody {
        status: "ok".into(),
        message: None,
    })
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready: the lease store answers", body = StatusBody),
        (status = 503, description = "Not ready: the lease store is unreachable or the agent is shutting down", body = StatusBody),
    ))]
async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<StatusBody>) {
    match state.service.ready().await {
        Ok(()) => (
            StatusCode::OK,
            Json(StatusBody {
                status: "ok".into(),
                message: None,
            }),
        ),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(StatusBody {
                status: "unavailable".into(),
                message: Some(err.to_string()),
            }),
        ),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String),
        (status = 404, description = "Metrics are disabled (EA_METRIC_ENABLE=false)", body = ErrorBody),
    ))]
async fn metrics(State(state): State<HttpState>) -> Result<Response, ApiError> {
    if !state.metrics_enabled {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: "metrics are disabled (EA_METRIC_ENABLE=false)".into(),
        });
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.service.metrics().encode(),
    )
        .into_response())
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This OpenAPI 3 document", content_type = "application/json", body = Object)))]
async fn openapi_document(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.to_string(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {}; see /openapi.json", uri.path()),
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{method} is not allowed on {}; see /openapi.json",
            uri.path()
        ),
    }
}

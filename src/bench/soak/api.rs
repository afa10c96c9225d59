//! One client's way to an agent, over gRPC or REST: the four lease calls and a stream of the
//! election's events, every failure turned into a [`Failure`].

use std::time::Duration;

use axum::http::{Method, Request, StatusCode, header};
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client as HttpClient, connect::HttpConnector};
use tonic::transport::Channel;

use super::failure::{Class, Failure, grpc_failure, http_failure, transport_failure};
use super::sse::SseParser;
use crate::grpc::pb::{self, election_client::ElectionClient};

/// Requests and streams give up after this long (an agent stopped mid-answer, a lost packet).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) type Http = HttpClient<HttpConnector, Full<Bytes>>;

/// One client's way to an agent.
#[derive(Clone)]
pub(super) enum Api {
    Grpc(ElectionClient<Channel>),
    Http { client: Http, base: String },
}

/// A campaign's answer, as far as the soak reads it.
#[derive(serde::Deserialize)]
pub(super) struct Campaigned {
    pub(super) elected: bool,
    pub(super) fencing_token: u64,
}

/// The answer of extend and handover.
#[derive(serde::Deserialize)]
struct Value {
    fencing_token: u64,
}

/// One event of a stream, as far as the soak reads it.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Event {
    pub(super) fencing_token: u64,
    pub(super) version: u64,
}

impl Api {
    pub(super) fn protocol(&self) -> &'static str {
        match self {
            Api::Grpc(_) => "gRPC",
            Api::Http { .. } => "HTTP",
        }
    }

    async fn grpc<T>(
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(grpc_failure(&status)),
            Err(_) => Err(Failure::timeout()),
        }
    }

    async fn http<T: serde::de::DeserializeOwned>(
        client: &Http,
        method: Method,
        uri: &str,
        body: serde_json::Value,
    ) -> Result<T, Failure> {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| Failure::new("invalid request", Class::Unexpected))?;
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|err| transport_failure(&err))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|err| transport_failure(&err))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(http_failure(status));
            }
            serde_json::from_slice(&body)
                .map_err(|_| Failure::new("unreadable answer", Class::Unexpected))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(Failure::timeout()))
    }

    pub(super) async fn campaign(&mut self, seat: &Seat, term: i32) -> Result<Campaigned, Failure> {
        match self {
            Api::Grpc(client) => {
                let answer = Self::grpc(client.campaign(pb::CampaignRequest {
                    election: seat.election.clone(),
                    candidate: seat.candidate.clone(),
                    term,
                    kind: seat.kind.clone(),
                }))
                .await?;
                Ok(Campaigned {
                    elected: answer.elected,
                    fencing_token: answer.fencing_token,
                })
            }
            Api::Http { client, base } => {
                let body = serde_json::json!({"candidate": seat.candidate, "term": term});
                Self::http(client, Method::POST, &seat.uri(base), body).await
            }
        }
    }

    pub(super) async fn extend(&mut self, seat: &Seat, term: i32) -> Result<u64, Failure> {
        match self {
            Api::Grpc(client) => {
                Self::grpc(client.extend_elected_term(pb::ExtendElectedTermRequest {
                    election: seat.election.clone(),
                    leader: seat.candidate.clone(),
                    term,
                    kind: seat.kind.clone(),
                    retries: 0,
                    retry_interval: 0,
                }))
                .await
                .map(|answer| answer.fencing_token)
            }
            Api::Http { client, base } => {
                let body = serde_json::json!({"leader": seat.candidate, "term": term});
                Self::http::<Value>(client, Method::PATCH, &seat.uri(base), body)
                    .await
                    .map(|answer| answer.fencing_token)
            }
        }
    }

    pub(super) async fn resign(&mut self, seat: &Seat) -> Result<(), Failure> {
        match self {
            Api::Grpc(client) => Self::grpc(client.resign(pb::ResignRequest {
                election: seat.election.clone(),
                leader: seat.candidate.clone(),
                kind: seat.kind.clone(),
            }))
            .await
            .map(drop),
            Api::Http { client, base } => {
                let body = serde_json::json!({"leader": seat.candidate});
                Self::http::<Value>(client, Method::DELETE, &seat.uri(base), body)
                    .await
                    .map(drop)
            }
        }
    }

    /// Hands the caller's own live lease (`token`) to `to`, and nothing else.
    pub(super) async fn handover(
        &mut self,
        seat: &Seat,
        to: &str,
        term: i32,
        token: u64,
    ) -> Result<u64, Failure> {
        match self {
            Api::Grpc(client) => Self::grpc(client.handover(pb::HandoverRequest {
                election: seat.election.clone(),
                leader: to.to_owned(),
                term,
                kind: seat.kind.clone(),
                expected_leader: seat.candidate.clone(),
                expected_fencing_token: token,
            }))
            .await
            .map(|answer| answer.fencing_token),
            Api::Http { client, base } => {
                let body = serde_json::json!({
                    "leader": to, "term": term,
                    "expected_leader": seat.candidate, "expected_fencing_token": token,
                });
                Self::http::<Value>(client, Method::PUT, &seat.uri(base), body)
                    .await
                    .map(|answer| answer.fencing_token)
            }
        }
    }

    /// Opens a stream of the election's events: Observe over gRPC, watch (SSE) over HTTP.
    pub(super) async fn follow(
        &mut self,
        seat: &Seat,
    ) -> Result<BoxStream<'static, Result<Event, Failure>>, Failure> {
        match self {
            Api::Grpc(client) => {
                let events = Self::grpc(client.observe(pb::ObserveRequest {
                    election: seat.election.clone(),
                    kind: seat.kind.clone(),
                }))
                .await?;
                Ok(events
                    .map(|event| match event {
                        Ok(e) => Ok(Event {
                            fencing_token: e.fencing_token,
                            version: e.version,
                        }),
                        Err(status) => Err(grpc_failure(&status)),
                    })
                    .boxed())
            }
            Api::Http { client, base } => {
                let request = Request::get(format!("{}/watch", seat.uri(base)))
                    .header(header::ACCEPT, "text/event-stream")
                    .body(Full::default())
                    .map_err(|_| Failure::new("invalid request", Class::Unexpected))?;
                let response = tokio::time::timeout(REQUEST_TIMEOUT, client.request(request))
                    .await
                    .map_err(|_| Failure::timeout())?
                    .map_err(|err| transport_failure(&err))?;
                if response.status() != StatusCode::OK {
                    return Err(http_failure(response.status()));
                }
                let mut body = response.into_body();
                Ok(async_stream::stream! {
                    let mut parser = SseParser::default();
                    while let Some(frame) = body.frame().await {
                        let data = match frame {
                            Ok(frame) => match frame.into_data() {
                                Ok(data) => data,
                                Err(_) => continue, // trailers
                            },
                            Err(err) => {
                                yield Err(transport_failure(&err));
                                return;
                            }
                        };
                        for event in parser.push(&data) {
                            yield serde_json::from_str::<Event>(&event)
                                .map_err(|_| Failure::new("unreadable event", Class::Unexpected));
                        }
                    }
                }
                .boxed())
            }
        }
    }
}

/// A candidate's (or a stream's) place: which election, under which name.
#[derive(Debug, Clone)]
pub(super) struct Seat {
    pub(super) kind: String,
    pub(super) election: String,
    pub(super) candidate: String,
}

impl Seat {
    fn uri(&self, base: &str) -> String {
        format!("{base}/election/{}/{}", self.kind, self.election)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioExecutor;
    use tonic::transport::Endpoint;

    #[tokio::test]
    async fn a_call_to_a_port_nobody_listens_on_counts_as_connection_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("http://127.0.0.1:{port}");
        let channel = Endpoint::from_shared(address.clone())
            .unwrap()
            .connect_lazy();
        let mut grpc = Api::Grpc(ElectionClient::new(channel));
        let mut http = Api::Http {
            client: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
            base: address,
        };
        let seat = Seat {
            kind: "soak".into(),
            election: "e".into(),
            candidate: "c".into(),
        };
        for api in [&mut grpc, &mut http] {
            let failure = api.campaign(&seat, 1000).await.err().unwrap();
            assert_eq!(failure.kind, "connection refused", "{}", api.protocol());
        }
    }
}

//! What a failed request says about the agent: its kind (the gRPC code, the HTTP status, a refused
//! or closed connection) and its class (an outage, contention between candidates, or unexpected).

use axum::http::StatusCode;
use serde::Serialize;

/// What a failure says about the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// The agent or its store was down or going down: refused connections, a store unavailable.
    Outage,
    /// The lease was not the caller's (any more): another candidate took it, or it was lost with
    /// the store's data. Normal among competing candidates.
    Contention,
    /// Anything else: a bug, or a case the soak does not know.
    Unexpected,
}

/// A failed request (or a stream that ended), as the soak counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// e.g. `connection refused`, `gRPC NotFound`, `HTTP 412`.
    pub kind: String,
    /// What it says about the agent.
    pub class: Class,
}

impl Failure {
    pub(super) fn new(kind: impl Into<String>, class: Class) -> Self {
        Self {
            kind: kind.into(),
            class,
        }
    }

    pub(super) fn timeout() -> Self {
        Self::new("timeout", Class::Outage)
    }
}

/// A failure of the connection itself (nothing the agent answered), from an error's chain.
pub fn transport_failure(err: &(dyn std::error::Error + 'static)) -> Failure {
    use std::io::ErrorKind;
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => {
                    return Failure::new("connection refused", Class::Outage);
                }
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => {
                    return Failure::new("connection closed", Class::Outage);
                }
                ErrorKind::TimedOut => return Failure::timeout(),
                _ => {}
            }
        }
        next = err.source();
    }
    // The connection went away in a way without an I/O error (h2 GOAWAY, a stream refused or
    // reset, a pooled connection found closed): what an agent stopping does.
    Failure::new("connection closed", Class::Outage)
}

/// A gRPC status: the agent's answer, or (when it has a source) the client's transport failing.
pub fn grpc_failure(status: &tonic::Status) -> Failure {
    use tonic::Code;
    if let Some(source) = std::error::Error::source(status) {
        return transport_failure(source);
    }
    let kind = |detail: &str| format!("gRPC {:?}{detail}", status.code());
    match status.code() {
        // The agent answers FAILED_PRECONDITION both when its store is unavailable (as the Go
        // service did) and when a conditional handover meets another lease; the message tells.
        Code::FailedPrecondition if status.message().starts_with("lease store unavailable") => {
            Failure::new(kind(" (store unavailable)"), Class::Outage)
        }
        Code::FailedPrecondition => Failure::new(kind(" (not as expected)"), Class::Contention),
        Code::NotFound | Code::AlreadyExists => Failure::new(kind(""), Class::Contention),
        // Refused by an agent going down, or not answered in its deadline while the store was.
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            Failure::new(kind(""), Class::Outage)
        }
        _ => Failure::new(kind(""), Class::Unexpected),
    }
}

/// An HTTP status other than 200.
pub fn http_failure(status: StatusCode) -> Failure {
    let class = match status.as_u16() {
        // 412: the store is unavailable (the Go service's status); 503: not ready, shutting down.
        412 | 503 => Class::Outage,
        // 404: nobody leads, or another candidate does (resign); 409: another candidate leads.
        404 | 409 => Class::Contention,
        _ => Class::Unexpected,
    };
    Failure::new(format!("HTTP {}", status.as_u16()), class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_from_the_agent_are_classified_by_what_they_mean() {
        let class = |status: tonic::Status| grpc_failure(&status);
        assert_eq!(
            class(tonic::Status::failed_precondition(
                "lease store unavailable: timed out"
            )),
            Failure::new("gRPC FailedPrecondition (store unavailable)", Class::Outage)
        );
        assert_eq!(
            class(tonic::Status::failed_precondition(
                "election soak/x is not led as the handover expects; b leads it"
            )),
            Failure::new(
                "gRPC FailedPrecondition (not as expected)",
                Class::Contention
            )
        );
        assert_eq!(
            class(tonic::Status::not_found("nobody")).class,
            Class::Contention
        );
        assert_eq!(
            class(tonic::Status::already_exists("b")).class,
            Class::Contention
        );
        assert_eq!(
            class(tonic::Status::unavailable("bye")).class,
            Class::Outage
        );
        assert_eq!(
            class(tonic::Status::internal("boom")),
            Failure::new("gRPC Internal", Class::Unexpected)
        );
        assert_eq!(
            class(tonic::Status::invalid_argument("x")).class,
            Class::Unexpected
        );
    }

    #[test]
    fn http_statuses_are_classified_by_what_they_mean() {
        assert_eq!(
            http_failure(StatusCode::PRECONDITION_FAILED),
            Failure::new("HTTP 412", Class::Outage)
        );
        assert_eq!(
            http_failure(StatusCode::SERVICE_UNAVAILABLE).class,
            Class::Outage
        );
        assert_eq!(http_failure(StatusCode::CONFLICT).class, Class::Contention);
        assert_eq!(http_failure(StatusCode::NOT_FOUND).class, Class::Contention);
        assert_eq!(
            http_failure(StatusCode::BAD_REQUEST).class,
            Class::Unexpected
        );
        assert_eq!(
            http_failure(StatusCode::INTERNAL_SERVER_ERROR).class,
            Class::Unexpected
        );
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport error")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn transport_failures_are_found_down_the_error_chain() {
        use std::io::{Error, ErrorKind};
        let failure = |kind| transport_failure(&Wrapped(Error::from(kind)));
        assert_eq!(
            failure(ErrorKind::ConnectionRefused).kind,
            "connection refused"
        );
        assert_eq!(
            failure(ErrorKind::ConnectionReset).kind,
            "connection closed"
        );
        assert_eq!(failure(ErrorKind::TimedOut).kind, "timeout");
        assert!(
            [ErrorKind::ConnectionRefused, ErrorKind::Other]
                .into_iter()
                .all(|kind| failure(kind).class == Class::Outage)
        );
        // A status with a source is the client's transport, not the agent's answer.
        let status =
            tonic::Status::from_error(Box::new(Wrapped(Error::from(ErrorKind::ConnectionRefused))));
        assert_eq!(grpc_failure(&status).kind, "connection refused");
    }
}

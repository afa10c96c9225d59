//! The JSON bodies of the REST API's election routes, from arbitrary bytes: decoded by the
//! handlers' own decoder (`http::decode_json`, with `whole_number` / `whole_token`), then
//! validated as the service validates them. Never a panic; a body that does not decode is a 400;
//! an accepted one yields names, terms, retries and expectations within the documented bounds.
//!
//! The first byte picks the body (campaign, extend, handover, resign); the rest is the body.
#![no_main]

use axum::{http::StatusCode, response::IntoResponse};
use election_agent::{
    election::{
        CampaignRequest, ExtendRequest, HandoverRequest, MAX_RETRIES, MAX_RETRY_INTERVAL_MS,
        ResignRequest,
    },
    http::{CampaignBody, ExtendBody, HandoverBody, ResignBody, decode_json},
    lease::FencingToken,
};
use election_agent_fuzz::{assert_name, assert_names_field, assert_term, bounds};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// The path parameters: valid, so that every refusal is the body's.
const KIND: &str = "default";
const ELECTION: &str = "jobs";

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => campaign(body),
        1 => extend(body),
        2 => handover(body),
        _ => resign(body),
    }
});

fn decoded<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    match decode_json::<T>(body) {
        Ok(value) => Some(value),
        Err(err) => {
            let status = err.into_response().status();
            assert_eq!(status, StatusCode::BAD_REQUEST, "a malformed body is a 400");
            None
        }
    }
}

fn campaign(body: &[u8]) {
    let Some(body) = decoded::<CampaignBody>(body) else {
        return;
    };
    match CampaignRequest::parse(bounds(), KIND, ELECTION, &body.candidate, body.term) {
        Ok(r) => {
            assert_name(&r.candidate, &body.candidate);
            assert_term(r.term, bounds(), body.term);
        }
        Err(err) => assert_names_field(&err, &["candidate", "term"]),
    }
}

fn extend(body: &[u8]) {
    let Some(body) = decoded::<ExtendBody>(body) else {
        return;
    };
    match ExtendRequest::parse(
        bounds(),
        KIND,
        ELECTION,
        &body.leader,
        body.term,
        body.retries,
        body.retry_interval,
    ) {
        Ok(r) => {
            assert_name(&r.leader, &body.leader);
            assert_term(r.term, bounds(), body.term);
            assert!(r.retries <= MAX_RETRIES);
            assert_eq!(i128::from(r.retries), i128::from(body.retries));
            assert!(r.retry_interval_ms <= MAX_RETRY_INTERVAL_MS);
            assert_eq!(
                i128::from(r.retry_interval_ms),
                i128::from(body.retry_interval)
            );
        }
        Err(err) => assert_names_field(&err, &["leader", "term", "retries", "retry_interval"]),
    }
}

fn handover(body: &[u8]) {
    let Some(body) = decoded::<HandoverBody>(body) else {
        return;
    };
    // As the handler passes them: absent and empty alike mean any leader, absent and 0 any token.
    let expected_leader = body.expected_leader.as_deref().unwrap_or_default();
    let expected_token = body.expected_fencing_token.unwrap_or_default();
    match HandoverRequest::parse(
        bounds(),
        KIND,
        ELECTION,
        &body.leader,
        body.term,
        expected_leader,
        expected_token,
    ) {
        Ok(r) => {
            assert_name(&r.leader, &body.leader);
            assert_term(r.term, bounds(), body.term);
            match &r.expected.leader {
                Some(name) => assert_name(name, expected_leader),
                None => assert!(expected_leader.is_empty()),
            }
            match r.expected.token {
                Some(FencingToken(token)) => assert!(token != 0 && token == expected_token),
                None => assert_eq!(expected_token, 0),
            }
        }
        Err(err) => assert_names_field(&err, &["leader", "term", "expected_leader"]),
    }
}

fn resign(body: &[u8]) {
    let Some(body) = decoded::<ResignBody>(body) else {
        return;
    };
    match ResignRequest::parse(KIND, ELECTION, &body.leader) {
        Ok(r) => assert_name(&r.leader, &body.leader),
        Err(err) => assert_names_field(&err, &["leader"]),
    }
}

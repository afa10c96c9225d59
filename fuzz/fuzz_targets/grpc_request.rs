//! Every request message of the `Election` gRPC service, from arbitrary bytes: decoded with
//! `prost::Message::decode` (what tonic's codec does), then validated as the handler and the
//! service validate it. Never a panic; an accepted request yields names, terms, retries and
//! expectations within the documented bounds, and a refusal names a field of the message.
//!
//! The first byte picks the message; the rest is its protobuf encoding.
#![no_main]

use election_agent::{
    discovery::check_pods_request,
    election::{
        CONTROLLER_KIND, CampaignRequest, ExtendRequest, HandoverRequest, MAX_RETRIES,
        MAX_RETRY_INTERVAL_MS, ResignRequest, election_key, public_kind,
    },
    grpc::pb,
    lease::{DEFAULT_KIND, FencingToken},
};
use election_agent_fuzz::{
    assert_key, assert_name, assert_names_field, assert_object_name, assert_term, bounds,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, message)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => campaign(message),
        1 => extend(message),
        2 => resign(message),
        3 => handover(message),
        4 => get_leader(message),
        5 => list_leaders(message),
        6 => get_pods(message),
        _ => observe(message),
    }
});

fn campaign(message: &[u8]) {
    let Ok(r) = pb::CampaignRequest::decode(message) else {
        return;
    };
    match CampaignRequest::parse(bounds(), &r.kind, &r.election, &r.candidate, r.term.into()) {
        Ok(v) => {
            assert_key(&v.election, &r.kind, &r.election);
            assert_name(&v.candidate, &r.candidate);
            assert_term(v.term, bounds(), r.term.into());
        }
        Err(err) => assert_names_field(&err, &["kind", "election", "candidate", "term"]),
    }
}

fn extend(message: &[u8]) {
    let Ok(r) = pb::ExtendElectedTermRequest::decode(message) else {
        return;
    };
    match ExtendRequest::parse(
        bounds(),
        &r.kind,
        &r.election,
        &r.leader,
        r.term.into(),
        r.retries.into(),
        r.retry_interval.into(),
    ) {
        Ok(v) => {
            assert_key(&v.election, &r.kind, &r.election);
            assert_name(&v.leader, &r.leader);
            assert_term(v.term, bounds(), r.term.into());
            assert!(v.retries <= MAX_RETRIES && i128::from(v.retries) == i128::from(r.retries));
            assert!(
                v.retry_interval_ms <= MAX_RETRY_INTERVAL_MS
                    && i128::from(v.retry_interval_ms) == i128::from(r.retry_interval)
            );
        }
        Err(err) => assert_names_field(
            &err,
            &[
                "kind",
                "election",
                "leader",
                "term",
                "retries",
                "retry_interval",
            ],
        ),
    }
}

fn resign(message: &[u8]) {
    let Ok(r) = pb::ResignRequest::decode(message) else {
        return;
    };
    match ResignRequest::parse(&r.kind, &r.election, &r.leader) {
        Ok(v) => {
            assert_key(&v.election, &r.kind, &r.election);
            assert_name(&v.leader, &r.leader);
        }
        Err(err) => assert_names_field(&err, &["kind", "election", "leader"]),
    }
}

fn handover(message: &[u8]) {
    let Ok(r) = pb::HandoverRequest::decode(message) else {
        return;
    };
    match HandoverRequest::parse(
        bounds(),
        &r.kind,
        &r.election,
        &r.leader,
        r.term.into(),
        &r.expected_leader,
        r.expected_fencing_token,
    ) {
        Ok(v) => {
            assert_key(&v.election, &r.kind, &r.election);
            assert_name(&v.leader, &r.leader);
            assert_term(v.term, bounds(), r.term.into());
            match &v.expected.leader {
                Some(name) => assert_name(name, &r.expected_leader),
                None => assert!(r.expected_leader.is_empty()),
            }
            match v.expected.token {
                Some(FencingToken(token)) => {
                    assert!(token != 0 && token == r.expected_fencing_token)
                }
                None => assert_eq!(r.expected_fencing_token, 0),
            }
        }
        Err(err) => assert_names_field(
            &err,
            &["kind", "election", "leader", "term", "expected_leader"],
        ),
    }
}

/// GetLeader and Observe name an election and nothing else.
fn election(kind: &str, election: &str) {
    match election_key(kind, election) {
        Ok(key) => assert_key(&key, kind, election),
        Err(err) => assert_names_field(&err, &["kind", "election"]),
    }
}

fn get_leader(message: &[u8]) {
    if let Ok(r) = pb::GetLeaderRequest::decode(message) {
        election(&r.kind, &r.election);
    }
}

fn observe(message: &[u8]) {
    if let Ok(r) = pb::ObserveRequest::decode(message) {
        election(&r.kind, &r.election);
    }
}

fn list_leaders(message: &[u8]) {
    let Ok(r) = pb::ListLeadersRequest::decode(message) else {
        return;
    };
    match public_kind(&r.kind) {
        Ok(kind) => {
            assert_name(
                &kind,
                if r.kind.is_empty() {
                    DEFAULT_KIND
                } else {
                    &r.kind
                },
            );
            assert_ne!(
                kind.as_str(),
                CONTROLLER_KIND,
                "the controller's kind is reserved"
            );
        }
        Err(err) => assert_names_field(&err, &["kind"]),
    }
}

fn get_pods(message: &[u8]) {
    let Ok(r) = pb::GetPodsRequest::decode(message) else {
        return;
    };
    match check_pods_request(&r.namespace, &r.deployment, &r.pod_name) {
        Ok(()) => {
            assert_object_name(&r.namespace);
            assert_object_name(if r.pod_name.is_empty() {
                &r.deployment
            } else {
                &r.pod_name
            });
        }
        Err(err) => assert_names_field(&err, &["namespace", "deployment", "pod_name"]),
    }
}

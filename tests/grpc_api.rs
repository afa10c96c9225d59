//! The gRPC API over the network: every RPC, its status codes, Observe, health and reflection.

mod common;

use std::time::Duration;

use election_agent::grpc::pb::{self, election_client::ElectionClient, leader_event::Type};
use futures::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn client(agent: &election_agent::server::RunningAgent) -> ElectionClient<Channel> {
    ElectionClient::connect(common::grpc_endpoint(agent))
        .await
        .expect("connects")
}

fn campaign(election: &str, candidate: &str, term: i32) -> pb::CampaignRequest {
    pb::CampaignRequest {
        election: election.into(),
        candidate: candidate.into(),
        term,
        kind: String::new(),
    }
}

#[tokio::test]
async fn leadership_can_be_won_kept_contested_handed_over_and_given_up() {
    let agent = common::start_agent().await;
    let mut c = client(&agent).await;

    let won = c
        .campaign(campaign("jobs", "alice", 5_000))
        .await
        .unwrap()
        .into_inner();
    assert!(won.elected);
    assert_eq!(
        (won.leader.as_str(), won.kind.as_str()),
        ("alice", "default")
    );
    assert!(won.fencing_token > 0);

    let lost = c
        .campaign(campaign("jobs", "bob", 5_000))
        .await
        .unwrap()
        .into_inner();
    assert!(!lost.elected, "a competing campaign is not an error");
    assert_eq!(lost.leader, "alice");
    assert_eq!(lost.fencing_token, won.fencing_token);

    let leader = c
        .get_leader(pb::GetLeaderRequest {
            election: "jobs".into(),
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (leader.value.as_str(), leader.fencing_token),
        ("alice", won.fencing_token)
    );

    let extended = c
        .extend_elected_term(pb::ExtendElectedTermRequest {
            election: "jobs".into(),
            leader: "alice".into(),
            term: 5_000,
            kind: String::new(),
            retries: 3,
            retry_interval: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(extended.value);
    assert_eq!(extended.fencing_token, won.fencing_token);

    let handed = c
        .handover(pb::HandoverRequest {
            election: "jobs".into(),
            leader: "bob".into(),
            term: 5_000,
            kind: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(handed.value && handed.fencing_token > won.fencing_token);

    let leaders = c
        .list_leaders(pb::ListLeadersRequest {
            kind: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        leaders.leaders,
        [pb::Leader {
            election: "jobs".into(),
            name: "bob".into(),
            fencing_token: handed.fencing_token
        }]
    );

    let resigned = c
        .resign(pb::ResignRequest {
            election: "jobs".into(),
            leader: "bob".into(),
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resigned.value);
    let none = c
        .get_leader(pb::GetLeaderRequest {
            election: "jobs".into(),
            kind: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);

    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn failures_carry_the_status_codes_of_the_contract() {
    let agent = common::start_agent().await;
    let mut c = client(&agent).await;
    let extend = |leader: &str| pb::ExtendElectedTermRequest {
        election: "e".into(),
        leader: leader.into(),
        term: 5_000,
        kind: "k".into(),
        retries: 0,
        retry_interval: 0,
    };

    let no_holder = c.extend_elected_term(extend("a")).await.unwrap_err();
    assert_eq!(no_holder.code(), Code::NotFound, "{no_holder:?}");
    c.campaign(pb::CampaignRequest {
        kind: "k".into(),
        ..campaign("e", "a", 5_000)
    })
    .await
    .unwrap();
    let other = c.extend_elected_term(extend("b")).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    let resign = c
        .resign(pb::ResignRequest {
            election: "e".into(),
            leader: "b".into(),
            kind: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(resign.code(), Code::NotFound, "{resign:?}");
    let pods = c
        .get_pods(pb::GetPodsRequest {
            namespace: "ns".into(),
            deployment: "d".into(),
            pod_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(pods.code(), Code::Unimplemented);

    let long = "x".repeat(254);
    for (request, field) in [
        (campaign("", "a", 5_000), "election"),
        (campaign("e", "", 5_000), "candidate"),
        (campaign("e*", "a", 5_000), "election"),
        (campaign("e?", "a", 5_000), "election"),
        (campaign("e[1]", "a", 5_000), "election"),
        (campaign("e f", "a", 5_000), "election"),
        (campaign(&long, "a", 5_000), "election"),
        (campaign("e", "a", 999), "term"),
        (campaign("e", "a", 86_400_001), "term"),
        (
            pb::CampaignRequest {
                kind: "k*".into(),
                ..campaign("e", "a", 5_000)
            },
            "kind",
        ),
    ] {
        let err = c.campaign(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(&format!("invalid {field}: ")),
            "{err:?}"
        );
    }
    for (retries, retry_interval, field) in [
        (11, 0, "retries"),
        (0, 1_001, "retry_interval"),
        (-1, 0, "retries"),
    ] {
        let err = c
            .extend_elected_term(pb::ExtendElectedTermRequest {
                retries,
                retry_interval,
                ..extend("a")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{err:?}");
    }
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn observe_streams_the_current_leader_then_each_change_within_100_ms() {
    let agent = common::start_agent().await;
    let mut c = client(&agent).await;
    let mut events = c
        .observe(pb::ObserveRequest {
            election: "watched".into(),
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        let event = tokio::time::timeout(Duration::from_millis(100), events.next())
            .await
            .expect("event within 100 ms")
            .expect("stream open")
            .expect("no error");
        (Type::try_from(event.r#type).unwrap(), event.leader)
    };
    assert_eq!(
        next().await,
        (Type::Current, String::new()),
        "nobody leads yet"
    );
    c.campaign(campaign("watched", "alice", 1_000))
        .await
        .unwrap();
    assert_eq!(next().await, (Type::Elected, "alice".into()));
    c.handover(pb::HandoverRequest {
        election: "watched".into(),
        leader: "bob".into(),
        term: 1_000,
        kind: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(next().await, (Type::HandedOver, "bob".into()));
    c.resign(pb::ResignRequest {
        election: "watched".into(),
        leader: "bob".into(),
        kind: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(next().await, (Type::Resigned, "bob".into()));

    // Expiry is reported without any request causing it.
    c.campaign(campaign("watched", "carol", 1_000))
        .await
        .unwrap();
    assert_eq!(next().await, (Type::Elected, "carol".into()));
    tokio::time::sleep(Duration::from_millis(950)).await;
    assert_eq!(next().await, (Type::Expired, "carol".into()));

    // Shutting down ends the stream, so it cannot hold the drain up.
    agent.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(2), events.next())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let agent = common::start_agent().await;
    let channel = Channel::from_shared(common::grpc_endpoint(&agent))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in [
        "",
        "liveness",
        "readiness",
        "grpc.election_agent.v1.Election",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    agent.shutdown().await;
    let status = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("status pushed")
        .expect("stream open")
        .expect("no error")
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_election_and_health_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let agent = common::start_agent().await;
    let channel = Channel::from_shared(common::grpc_endpoint(&agent))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a list of services");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.election_agent.v1.Election".to_string()),
        "{names:?}"
    );
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

/// A handover conditional on the live lease (additive fields 5 and 6): refused with
/// FAILED_PRECONDITION naming the live leader, changing nothing, unless the lease is the expected
/// one — so a client can hand over safely without an authorization policy.
#[tokio::test]
async fn a_conditional_handover_happens_only_over_the_expected_lease() {
    let agent = common::start_agent().await;
    let mut c = ElectionClient::connect(common::grpc_endpoint(&agent))
        .await
        .unwrap();
    let handover =
        |leader: &str, expected_leader: &str, expected_fencing_token: u64| pb::HandoverRequest {
            election: "jobs".into(),
            leader: leader.into(),
            term: 5_000,
            expected_leader: expected_leader.into(),
            expected_fencing_token,
            ..Default::default()
        };
    let refused = c
        .handover(handover("mallory", "alice", 0))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("nobody leads it"), "{refused:?}");

    let won = c
        .campaign(pb::CampaignRequest {
            election: "jobs".into(),
            candidate: "alice".into(),
            term: 5_000,
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    for (expected_leader, expected_token) in [
        ("bob", 0),
        ("", won.fencing_token + 1),
        ("alice", won.fencing_token + 2),
    ] {
        let refused = c
            .handover(handover("mallory", expected_leader, expected_token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("alice leads it"), "{refused:?}");
    }
    let bad = c
        .handover(handover("bob", "not a name", 0))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("expected_leader"), "{bad:?}");

    let handed = c
        .handover(handover("bob", "alice", won.fencing_token))
        .await
        .unwrap()
        .into_inner();
    assert!(handed.value && handed.fencing_token > won.fencing_token);
    let leader = c
        .get_leader(pb::GetLeaderRequest {
            election: "jobs".into(),
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leader.value, "bob");
    agent.shutdown().await;
}

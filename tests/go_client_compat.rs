//! Clients generated from the Go service's contract (`tests/proto/go_contract.proto`,
//! without this product's additions) work unchanged against the server, on every RPC.

mod common;

mod go {
    #![allow(clippy::all, dead_code, missing_docs)]
    include!(concat!(
        env!("OUT_DIR"),
        "/go_contract/grpc.election_agent.v1.rs"
    ));
}

use go::election_client::ElectionClient;
use tonic::Code;

#[tokio::test]
async fn a_client_of_the_go_contract_drives_every_rpc() {
    let agent = common::start_agent().await;
    let mut c = ElectionClient::connect(common::grpc_endpoint(&agent))
        .await
        .unwrap();

    let won = c
        .campaign(go::CampaignRequest {
            election: "legacy".into(),
            candidate: "a".into(),
            term: 5_000,
            kind: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        won,
        go::CampaignResult {
            elected: true,
            leader: "a".into(),
            kind: "app".into()
        }
    );
    let lost = c
        .campaign(go::CampaignRequest {
            election: "legacy".into(),
            candidate: "b".into(),
            term: 5_000,
            kind: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lost,
        go::CampaignResult {
            elected: false,
            leader: "a".into(),
            kind: "app".into()
        }
    );

    let leader = c
        .get_leader(go::GetLeaderRequest {
            election: "legacy".into(),
            kind: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leader, go::StringValue { value: "a".into() });

    let extended = c
        .extend_elected_term(go::ExtendElectedTermRequest {
            election: "legacy".into(),
            leader: "a".into(),
            term: 5_000,
            kind: "app".into(),
            retries: 2,
            retry_interval: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(extended, go::BoolValue { value: true });

    let handed = c
        .handover(go::HandoverRequest {
            election: "legacy".into(),
            leader: "b".into(),
            term: 5_000,
            kind: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(handed, go::BoolValue { value: true });

    let leaders = c
        .list_leaders(go::ListLeadersRequest { kind: "app".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        leaders.leaders,
        [go::Leader {
            election: "legacy".into(),
            name: "b".into()
        }]
    );

    let resigned = c
        .resign(go::ResignRequest {
            election: "legacy".into(),
            leader: "b".into(),
            kind: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resigned, go::BoolValue { value: true });

    let pods = c
        .get_pods(go::GetPodsRequest {
            namespace: "ns".into(),
            deployment: "d".into(),
            pod_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(pods.code(), Code::Unimplemented);

    let invalid = c
        .campaign(go::CampaignRequest {
            election: String::new(),
            candidate: "a".into(),
            term: 5_000,
            kind: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);

    agent.shutdown().await;
    agent.wait().await.unwrap();
}

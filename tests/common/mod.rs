//! Shared by the integration tests: an agent on loopback with ports of its own, and what their
//! requests carry.
#![allow(dead_code)] // each test crate uses its own subset

use election_agent::{
    config::Sources,
    server::{self, RunningAgent},
};

/// Starts an agent with the memory store on 127.0.0.1, on free ports.
pub async fn start_agent() -> RunningAgent {
    let config = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_ENABLE", "false")
        .resolve()
        .expect("valid test configuration");
    server::start(&config).await.expect("agent starts")
}

/// The gRPC endpoint of a running agent.
pub fn grpc_endpoint(agent: &RunningAgent) -> String {
    format!("http://{}", agent.grpc_address.expect("gRPC enabled"))
}

/// `message` as a gRPC request carrying `authorization: Bearer token`, if a token is given.
pub fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

//! The gRPC adapter: the `Election` service of the wire contract over [`ElectionService`].
//!
//! Handlers only check that the caller may act ([`Caller::authorize`]) and translate messages;
//! [`status`] is the one place where service errors become gRPC codes.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    auth::{Caller, Target, Verb},
    discovery::{
        DiscoveryError,
        mapping::{PodInfo, PodStatusInfo, ReplicaSetInfo},
    },
    election::{ElectionError, ElectionService, EventKind, LeaderEvent},
    transport::StreamSlots,
};

/// The code generated from `proto/election_agent/v1/election_agent.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("grpc.election_agent.v1");

    pub use super::Pods;

    /// The encoded descriptor set of the contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/election_agent_descriptor.bin"));
}

pub use pb::election_server::ElectionServer;

/// Message `Pods` of the contract (`repeated Pod items = 1`), GetPods' answer, in two forms: a
/// client decodes the pods into `items`; the agent sends `encoded`, the pods of a
/// [`PodList`](crate::discovery::PodList) encoded once for every request until the caches change.
/// Both are field 1 on the wire: a `Pod` message and a byte string encode alike.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pods {
    /// The pods.
    pub items: Vec<pb::Pod>,
    /// More pods, each an encoded `Pod` message; sent after `items`.
    pub encoded: Vec<bytes::Bytes>,
}

impl prost::Message for Pods {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        for pod in &self.items {
            prost::encoding::message::encode(1, pod, buf);
        }
        for pod in &self.encoded {
            prost::encoding::bytes::encode(1, pod, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == 1 {
            prost::encoding::message::merge_repeated(wire_type, &mut self.items, buf, ctx)
        } else {
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        prost::encoding::message::encoded_len_repeated(1, &self.items)
            + prost::encoding::bytes::encoded_len_repeated(1, &self.encoded)
    }

    fn clear(&mut self) {
        self.items.clear();
        self.encoded.clear();
    }
}

/// The codec of the generated server and client: prost's, with message buffers sized for this
/// contract.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Bytes each call's encode and decode buffers start with. tonic's 8 KiB default is two
    /// allocations of 8 KiB per call, too large for the allocator's fast paths; this contract's
    /// messages are a few hundred bytes, and the rare larger one (a big Deployment's `GetPods`)
    /// grows its buffer once.
    const BUFFER_SIZE: usize = 1024;
    /// A server stream (`Observe`) sends what it has ready in one write of up to this many bytes
    /// (tonic's default).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    fn buffers() -> BufferSettings {
        BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
    }

    /// Protobuf messages with [`BUFFER_SIZE`] buffers.
    #[derive(Debug, Clone)]
    pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBuffers<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBuffers<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(buffers())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(buffers())
        }
    }
}

/// The fully qualified name of the `Election` service, as health checks know it.
pub const SERVICE_NAME: &str = "grpc.election_agent.v1.Election";

/// Maps a service error to its gRPC status: invalid fields INVALID_ARGUMENT, no leader NOT_FOUND,
/// held by another ALREADY_EXISTS, store unavailable FAILED_PRECONDITION (as the Go service), a
/// conditional handover over another lease FAILED_PRECONDITION too (its message says which).
pub fn status(err: ElectionError) -> Status {
    let message = err.to_string();
    match err {
        ElectionError::InvalidArgument(_) => Status::invalid_argument(message),
        ElectionError::NoLeader { .. } | ElectionError::NotLeader { .. } => {
            Status::not_found(message)
        }
        ElectionError::HeldByOther { .. } => Status::already_exists(message),
        ElectionError::Unavailable(_) | ElectionError::NotAsExpected { .. } => {
            Status::failed_precondition(message)
        }
        ElectionError::Unimplemented(_) => Status::unimplemented(message),
        ElectionError::Discovery(err) => match err {
            DiscoveryError::InvalidArgument(_) => Status::invalid_argument(message),
            DiscoveryError::NotSynced | DiscoveryError::Client(_) => Status::unavailable(message),
            DiscoveryError::NamespaceNotWatched(_)
            | DiscoveryError::DeploymentNotFound { .. }
            | DiscoveryError::PodNotFound { .. }
            | DiscoveryError::NotInDeployment { .. } => Status::not_found(message),
        },
    }
}

/// The wire message of a pod (discovery → gRPC).
impl From<PodInfo> for pb::Pod {
    fn from(pod: PodInfo) -> Self {
        let (status, rs) = (pod.status, pod.replica_set);
        pb::Pod {
            name: pod.name,
            deployment: pod.deployment,
            ip: pod.ip,
            status: Some(pb::PodStatus {
                phase: status.phase,
                reason: status.reason,
                terminating: status.terminating,
                pod_scheduled: status.pod_scheduled,
                pod_initialized: status.pod_initialized,
                pod_ready: status.pod_ready,
                containers_ready: status.containers_ready,
            }),
            replica_set: Some(pb::ReplicaSet {
                name: rs.name,
                revision: rs.revision,
                available_replicas: rs.available_replicas,
                fully_labeled_replicas: rs.fully_labeled_replicas,
                ready_replicas: rs.ready_replicas,
                replicas: rs.replicas,
                desired_replicas: rs.desired_replicas,
                max_replicas: rs.max_replicas,
            }),
        }
    }
}

/// A pod as the REST API shows it, from its wire message (the CLI client's `pods`).
impl From<pb::Pod> for PodInfo {
    fn from(pod: pb::Pod) -> Self {
        let status = pod.status.unwrap_or_default();
        let rs = pod.replica_set.unwrap_or_default();
        Self {
            name: pod.name,
            deployment: pod.deployment,
            ip: pod.ip,
            status: PodStatusInfo {
                phase: status.phase,
                reason: status.reason,
                terminating: status.terminating,
                pod_scheduled: status.pod_scheduled,
                pod_initialized: status.pod_initialized,
                pod_ready: status.pod_ready,
                containers_ready: status.containers_ready,
            },
            replica_set: ReplicaSetInfo {
                name: rs.name,
                revision: rs.revision,
                available_replicas: rs.available_replicas,
                fully_labeled_replicas: rs.fully_labeled_replicas,
                ready_replicas: rs.ready_replicas,
                replicas: rs.replicas,
                desired_replicas: rs.desired_replicas,
                max_replicas: rs.max_replicas,
            },
        }
    }
}

/// The `Election` gRPC service.
pub struct ElectionGrpc {
    service: ElectionService,
}

impl ElectionGrpc {
    /// Serves `service` over gRPC.
    pub fn new(service: ElectionService) -> ElectionServer<Self> {
        ElectionServer::new(Self { service })
    }
}

fn event_message(event: LeaderEvent) -> pb::LeaderEvent {
    use pb::leader_event::Type;
    let kind = match event.kind {
        EventKind::Current => Type::Current,
        EventKind::Elected => Type::Elected,
        EventKind::HandedOver => Type::HandedOver,
        EventKind::Resigned => Type::Resigned,
        EventKind::Expired => Type::Expired,
    };
    pb::LeaderEvent {
        r#type: kind.into(),
        election: event.election.election.to_string(),
        kind: event.election.kind.to_string(),
        leader: event.leader.map(|l| l.to_string()).unwrap_or_default(),
        fencing_token: event.token.0,
        version: event.version.0,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::LeaderEvent, Status>> + Send>>;

/// The request's message, once its caller (see [`crate::auth`]) may `verb` on the `target`
/// the message names.
fn authorized<T>(
    request: Request<T>,
    verb: Verb,
    target: fn(&T) -> Target<'_>,
) -> Result<T, Status> {
    let (_, extensions, message) = request.into_parts();
    Caller::of(&extensions)
        .authorize(verb, target(&message))
        .map_err(|err| err.grpc_status())?;
    Ok(message)
}

#[tonic::async_trait]
impl pb::election_server::Election for ElectionGrpc {
    async fn campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignResult>, Status> {
        let r = authorized(request, Verb::Campaign, |r| {
            Target::election(&r.kind, &r.election)
        })?;
        let result = self
            .service
            .campaign(&r.kind, &r.election, &r.candidate, r.term.into())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CampaignResult {
            elected: result.elected,
            leader: result.leader.to_string(),
            kind: result.kind.to_string(),
            fencing_token: result.token.0,
        }))
    }

    async fn extend_elected_term(
        &self,
        request: Request<pb::ExtendElectedTermRequest>,
    ) -> Result<Response<pb::BoolValue>, Status> {
        let r = authorized(request, Verb::Extend, |r| {
            Target::election(&r.kind, &r.election)
        })?;
        let token = self
            .service
            .extend(
                &r.kind,
                &r.election,
                &r.leader,
                r.term.into(),
                r.retries.into(),
                r.retry_interval.into(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::BoolValue {
            value: true,
            fencing_token: token.0,
        }))
    }

    async fn resign(
        &self,
        request: Request<pb::ResignRequest>,
    ) -> Result<Response<pb::BoolValue>, Status> {
        let r = authorized(request, Verb::Resign, |r| {
            Target::election(&r.kind, &r.election)
        })?;
        self.service
            .resign(&r.kind, &r.election, &r.leader)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::BoolValue {
            value: true,
            fencing_token: 0,
        }))
    }

    async fn handover(
        &self,
        request: Request<pb::HandoverRequest>,
    ) -> Result<Response<pb::BoolValue>, Status> {
        let r = authorized(request, Verb::Handover, |r| {
            Target::election(&r.kind, &r.election)
        })?;
        let token = self
            .service
            .handover(
                &r.kind,
                &r.election,
                &r.leader,
                r.term.into(),
                &r.expected_leader,
                r.expected_fencing_token,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::BoolValue {
            value: true,
            fencing_token: token.0,
        }))
    }

    async fn get_leader(
        &self,
        request: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<pb::StringValue>, Status> {
        let r = authorized(request, Verb::Get, |r| {
            Target::election(&r.kind, &r.election)
        })?;
        let info = self
            .service
            .leader(&r.kind, &r.election)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::StringValue {
            value: info.leader.to_string(),
            fencing_token: info.token.0,
        }))
    }

    async fn list_leaders(
        &self,
        request: Request<pb::ListLeadersRequest>,
    ) -> Result<Response<pb::Leaders>, Status> {
        let r = authorized(request, Verb::List, |r| Target::kind(&r.kind))?;
        let (_, leaders) = self.service.leaders(&r.kind).await.map_err(status)?;
        Ok(Response::new(pb::Leaders {
            leaders: leaders
                .into_iter()
                .map(|(election, info)| pb::Leader {
                    election: election.to_string(),
                    name: info.leader.to_string(),
                    fencing_token: info.token.0,
                })
                .collect(),
        }))
    }

    async fn get_pods(
        &self,
        request: Request<pb::GetPodsRequest>,
    ) -> Result<Response<Pods>, Status> {
        let r = authorized(request, Verb::Get, |r| Target::pods(&r.namespace))?;
        let pods = self
            .service
            .pods(&r.namespace, &r.deployment, &r.pod_name)
            .await
            .map_err(status)?;
        let encoded = pods.encoded(|items| {
            items
                .iter()
                .map(|pod| prost::Message::encode_to_vec(&pb::Pod::from(pod.clone())).into())
                .collect()
        });
        Ok(Response::new(Pods {
            items: Vec::new(),
            encoded: encoded.to_vec(),
        }))
    }

    type ObserveStream = EventStream;

    async fn observe(
        &self,
        request: Request<pb::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let slots = request.extensions().get::<StreamSlots>().cloned();
        let r = authorized(request, Verb::Watch, |r| {
            Target::election(&r.kind, &r.election)
        })?;
        // Held by the stream: its slot is free again once the client is gone.
        let slot = slots.map(|slots| slots.acquire()).transpose()?;
        let events = self
            .service
            .observe(&r.kind, &r.election)
            .await
            .map_err(status)?;
        let events = events.map(move |event| {
            let _slot = &slot;
            Ok(event_message(event))
        });
        Ok(Response::new(Box::pin(events)))
    }
}

#[cfg(test)]
mod pod_tests {
    use super::*;
    use crate::discovery::mapping::{PodStatusInfo, ReplicaSetInfo};

    #[test]
    fn a_pod_survives_the_wire_and_back_field_for_field() {
        let pod = PodInfo {
            name: "web-2-a".into(),
            deployment: "web".into(),
            ip: "10.0.0.3".into(),
            status: PodStatusInfo {
                phase: "Running".into(),
                reason: "Evicted".into(),
                terminating: true,
                pod_scheduled: true,
                pod_initialized: false,
                pod_ready: true,
                containers_ready: false,
            },
            replica_set: ReplicaSetInfo {
                name: "web-2".into(),
                revision: 2,
                available_replicas: 3,
                fully_labeled_replicas: 4,
                ready_replicas: 5,
                replicas: 6,
                desired_replicas: 7,
                max_replicas: 8,
            },
        };
        assert_eq!(PodInfo::from(pb::Pod::from(pod.clone())), pod);
    }

    #[test]
    fn pods_sent_encoded_are_the_bytes_of_pods_sent_as_messages() {
        use prost::Message;
        let pod = |name: &str| pb::Pod {
            name: name.into(),
            deployment: "web".into(),
            status: Some(pb::PodStatus {
                phase: "Running".into(),
                pod_ready: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (a, b) = (pod("web-1-a"), pod("web-1-b"));
        let as_messages = Pods {
            items: vec![a.clone(), b.clone()],
            encoded: Vec::new(),
        };
        let as_encoded = Pods {
            items: Vec::new(),
            encoded: vec![a.encode_to_vec().into(), b.encode_to_vec().into()],
        };
        let mixed = Pods {
            items: vec![a.clone()],
            encoded: vec![b.encode_to_vec().into()],
        };
        let wire = as_messages.encode_to_vec();
        assert_eq!(as_encoded.encode_to_vec(), wire);
        assert_eq!(mixed.encode_to_vec(), wire);
        assert_eq!(as_encoded.encoded_len(), wire.len());
        // Decoding gives the pods as messages; fields of a newer contract are skipped.
        let mut newer = wire.clone();
        prost::encoding::string::encode(9, &"later".to_owned(), &mut newer);
        assert_eq!(Pods::decode(newer.as_slice()).unwrap(), as_messages);
        assert_eq!(Pods::decode(&b""[..]).unwrap(), Pods::default());
    }
}

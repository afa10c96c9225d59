//! `election-agent client`: every `Election` RPC from a shell, against any agent, over gRPC.
//!
//! Each command prints its result as one JSON object per line on stdout; a failed RPC prints the
//! gRPC code and message on stderr and exits non-zero.

use futures::StreamExt;
use serde_json::json;

use crate::{
    discovery::mapping::PodInfo,
    grpc::pb::{self, election_client::ElectionClient},
};

/// Options of `election-agent client`.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The agent's gRPC endpoint.
    #[arg(
        long,
        env = "EA_CLIENT_ADDRESS",
        default_value = "http://127.0.0.1:50051"
    )]
    pub address: String,
    /// A bearer token sent with every call, for an agent with authentication on.
    #[arg(long, env = "EA_CLIENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS (an `https://` address) and its files.
    #[command(flatten)]
    pub tls: ClientTls,
    /// The election kind (empty means "default").
    #[arg(long, global = true, default_value = "")]
    pub kind: String,
    /// What to do.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// TLS options of a gRPC client of the agent (`client`, `bench`): TLS is used with an `https://`
/// address, verifying the agent's certificate against the CA file or, without one, the public
/// web roots; a client certificate is presented when given (an agent with
/// `EA_TLS_CLIENT_CA_FILE` requires one).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTls {
    /// PEM CA certificates the agent's certificate must chain to (https:// addresses).
    #[arg(long, env = "EA_CLIENT_TLS_CA_FILE")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate chain, for an agent that requires one (with --tls-key-file).
    #[arg(long, env = "EA_CLIENT_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "EA_CLIENT_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl ClientTls {
    /// The endpoint of `address`, with TLS when it is `https://`.
    pub fn endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint, ClientError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let endpoint =
            tonic::transport::Endpoint::from_shared(address.to_owned()).map_err(|source| {
                ClientError::Connect {
                    address: address.to_owned(),
                    source,
                }
            })?;
        let https = address.starts_with("https://");
        let given = self.tls_ca_file.is_some() || self.tls_cert_file.is_some();
        if !https {
            return if given {
                Err(ClientError::Tls(format!(
                    "TLS files are given, but the address {address} is not https://"
                )))
            } else {
                Ok(endpoint)
            };
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|err| ClientError::Tls(format!("cannot read {}: {err}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca_file {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_webpki_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        // tonic takes the process's default provider: ring, as everywhere in the agent.
        crate::transport::crypto_provider();
        endpoint
            .tls_config(config)
            .map_err(|source| ClientError::Connect {
                address: address.to_owned(),
                source,
            })
    }
}

/// One RPC.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Campaign to lead ELECTION as CANDIDATE.
    Campaign {
        /// Election name.
        election: String,
        /// Candidate name.
        candidate: String,
        /// Term in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        term: i32,
    },
    /// Extend LEADER's term.
    Extend {
        /// Election name.
        election: String,
        /// The current leader.
        leader: String,
        /// Term in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        term: i32,
        /// Retries while the store is unavailable (0..10).
        #[arg(long, default_value_t = 0)]
        retries: i32,
        /// Milliseconds between retries (0..1000).
        #[arg(long, default_value_t = 0)]
        retry_interval: i32,
    },
    /// Resign LEADER.
    Resign {
        /// Election name.
        election: String,
        /// The current leader.
        leader: String,
    },
    /// Hand ELECTION over to LEADER: whoever leads now, or only over the lease the --expected-*
    /// options name.
    Handover {
        /// Election name.
        election: String,
        /// The new leader.
        leader: String,
        /// Term in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        term: i32,
        /// Only if this candidate holds the live lease.
        #[arg(long, default_value = "")]
        expected_leader: String,
        /// Only if the live lease has this fencing token.
        #[arg(long, default_value_t = 0)]
        expected_token: u64,
    },
    /// Print the leader of ELECTION.
    Leader {
        /// Election name.
        election: String,
    },
    /// Print the leaders of every election of the kind.
    Leaders,
    /// Print the pods of DEPLOYMENT in NAMESPACE, or of the Deployment owning --pod-name.
    Pods {
        /// The Kubernetes namespace.
        namespace: String,
        /// The Deployment (not needed with --pod-name).
        #[arg(required_unless_present = "pod_name")]
        deployment: Option<String>,
        /// A pod: list the pods of the Deployment it belongs to (wins over DEPLOYMENT).
        #[arg(long)]
        pod_name: Option<String>,
    },
    /// Print the current leader, then every change, one line each.
    Observe {
        /// Election name.
        election: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is malformed or unreachable.
    #[error("cannot connect to {address}: {source}{}", causes(source, &source.to_string()))]
    Connect {
        /// The endpoint.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The TLS options cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The token cannot be sent as metadata.
    #[error("the token must be printable ASCII")]
    Token,
    /// The agent answered with an error, or the call failed on the way (then with the causes:
    /// a refused TLS handshake, say).
    #[error("{:?}: {}{}", .0.code(), .0.message(), causes(.0, .0.message()))]
    Rpc(#[from] tonic::Status),
}

/// The causes of `error`, shown as `shown`, each after `: ` but those that repeat what comes
/// before them (tonic's own messages say only "transport error").
fn causes(error: &dyn std::error::Error, shown: &str) -> String {
    let (mut causes, mut last) = (String::new(), shown.to_owned());
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !last.ends_with(&text) {
            causes += &format!(": {text}");
        }
        last = text;
        next = cause.source();
    }
    causes
}

/// Runs one client command, printing to stdout.
pub async fn run(args: ClientArgs) -> Result<(), ClientError> {
    let authorization: Option<tonic::metadata::AsciiMetadataValue> = args
        .token
        .as_deref()
        .map(|token| format!("Bearer {token}").parse())
        .transpose()
        .map_err(|_| ClientError::Token)?;
    let channel = args
        .tls
        .endpoint(&args.address)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            address: args.address.clone(),
            source,
        })?;
    let mut client =
        ElectionClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(authorization) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", authorization.clone());
            }
            Ok(request)
        });
    let kind = args.kind;
    let output = match args.command {
        ClientCommand::Campaign {
            election,
            candidate,
            term,
        } => {
            let r = client
                .campaign(pb::CampaignRequest {
                    election,
                    candidate,
                    term,
                    kind,
                })
                .await?
                .into_inner();
            json!({"elected": r.elected, "leader": r.leader, "kind": r.kind, "fencing_token": r.fencing_token})
        }
        ClientCommand::Extend {
            election,
            leader,
            term,
            retries,
            retry_interval,
        } => {
            let r = client
                .extend_elected_term(pb::ExtendElectedTermRequest {
                    election,
                    leader,
                    term,
                    kind,
                    retries,
                    retry_interval,
                })
                .await?
                .into_inner();
            json!({"value": r.value, "fencing_token": r.fencing_token})
        }
        ClientCommand::Resign { election, leader } => {
            let r = client
                .resign(pb::ResignRequest {
                    election,
                    leader,
                    kind,
                })
                .await?
                .into_inner();
            json!({"value": r.value})
        }
        ClientCommand::Handover {
            election,
            leader,
            term,
            expected_leader,
            expected_token,
        } => {
            let r = client
                .handover(pb::HandoverRequest {
                    election,
                    leader,
                    term,
                    kind,
                    expected_leader,
                    expected_fencing_token: expected_token,
                })
                .await?
                .into_inner();
            json!({"value": r.value, "fencing_token": r.fencing_token})
        }
        ClientCommand::Leader { election } => {
            let r = client
                .get_leader(pb::GetLeaderRequest { election, kind })
                .await?
                .into_inner();
            json!({"leader": r.value, "fencing_token": r.fencing_token})
        }
        ClientCommand::Leaders => {
            let r = client
                .list_leaders(pb::ListLeadersRequest { kind })
                .await?
                .into_inner();
            let leaders: Vec<_> = r
                .leaders
                .into_iter()
                .map(|l| json!({"election": l.election, "name": l.name, "fencing_token": l.fencing_token}))
                .collect();
            json!({"leaders": leaders})
        }
        ClientCommand::Pods {
            namespace,
            deployment,
            pod_name,
        } => {
            let r = client
                .get_pods(pb::GetPodsRequest {
                    namespace,
                    deployment: deployment.unwrap_or_default(),
                    pod_name: pod_name.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let items: Vec<PodInfo> = r.items.into_iter().map(PodInfo::from).collect();
            json!({ "items": items })
        }
        ClientCommand::Observe { election, count } => {
            let mut events = client
                .observe(pb::ObserveRequest { election, kind })
                .await?
                .into_inner()
                .take(count.unwrap_or(usize::MAX));
            while let Some(event) = events.next().await {
                let e = event?;
                let kind = pb::leader_event::Type::try_from(e.r#type)
                    .map(|t| {
                        t.as_str_name()
                            .trim_start_matches("TYPE_")
                            .to_ascii_lowercase()
                    })
                    .unwrap_or_else(|_| e.r#type.to_string());
                println!(
                    "{}",
                    json!({"type": kind, "election": e.election, "kind": e.kind, "leader": e.leader, "fencing_token": e.fencing_token, "version": e.version})
                );
            }
            return Ok(());
        }
    };
    println!("{output}");
    Ok(())
}

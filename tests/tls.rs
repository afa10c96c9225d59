//! TLS on both ports, with certificates made here (rcgen): plain connections refused, TLS
//! served, client certificates required and naming the caller, certificate files rotated under
//! open connections.

mod common;

use common::with_token;

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{Extension, Router, routing};
use election_agent::{
    config::{PortLimits, Sources, Timeouts, TlsFiles},
    grpc::pb::{self, election_client::ElectionClient},
    server::{self, RunningAgent},
    transport::{self, Churn, PeerIdentity, Protocol, Tls},
};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// A certificate authority of a test's own.
struct Authority {
    certificate: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Self {
            certificate: certificate.der().clone(),
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `localhost` and 127.0.0.1 (server) or named `common_name` (client):
    /// (its PEM, its key's PEM, its DER).
    fn issue(&self, common_name: &str, client: bool) -> (String, String, CertificateDer<'static>) {
        let names = if client {
            vec![]
        } else {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        };
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (
            certificate.pem(),
            key.serialize_pem(),
            certificate.der().clone(),
        )
    }
}

/// A directory of a test's own, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ea-tls-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `text` to `name` at once (a new file renamed over the old, as a Secret update is).
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let staged = self.0.join(format!(".{name}.new"));
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What most tests start from: a directory of their own holding the agent's certificate files,
/// issued by `authority`, and the certificate of `clients`, the CA of client certificates, as
/// `clients.crt` (`client_ca`).
struct Setup {
    dir: Dir,
    authority: Authority,
    clients: Authority,
    client_ca: PathBuf,
}

impl Setup {
    fn new(test: &str) -> Self {
        let dir = Dir::new(test);
        let authority = Authority::new("test CA");
        server_files(&dir, &authority, "agent");
        let clients = Authority::new("clients CA");
        let client_ca = dir.write("clients.crt", &clients.pem);
        Self {
            dir,
            authority,
            clients,
            client_ca,
        }
    }
}

/// Whether `address` serves `GET /livez` over TLS to a client that presents no certificate.
async fn serves_without_a_certificate(address: SocketAddr, authority: &Authority) -> bool {
    let attempt = async {
        let mut stream = tls_connect(address, client(authority, None, b"http/1.1")).await?;
        get(&mut stream, "/livez").await
    };
    attempt.await.is_ok()
}

/// Server certificate files of `authority` in `dir`; the certificate's DER.
fn server_files(dir: &Dir, authority: &Authority, name: &str) -> CertificateDer<'static> {
    let (cert, key, der) = authority.issue(name, false);
    dir.write("tls.key", &key);
    dir.write("tls.crt", &cert);
    der
}

async fn start(dir: &Dir, client_ca: Option<&Path>) -> RunningAgent {
    start_with(dir, client_ca, &[]).await
}

/// An agent serving TLS with the files in `dir`, requiring client certificates of `client_ca`
/// if given, with `settings` besides.
async fn start_with(
    dir: &Dir,
    client_ca: Option<&Path>,
    settings: &[(&'static str, String)],
) -> RunningAgent {
    let mut sources = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_ENABLE", "false")
        .flag(
            "EA_TLS_CERT_FILE",
            dir.0.join("tls.crt").display().to_string(),
        )
        .flag(
            "EA_TLS_KEY_FILE",
            dir.0.join("tls.key").display().to_string(),
        );
    if let Some(ca) = client_ca {
        sources = sources.flag("EA_TLS_CLIENT_CA_FILE", ca.display().to_string());
    }
    for (key, value) in settings {
        sources = sources.flag(key, value.clone());
    }
    server::start(&sources.resolve().unwrap()).await.unwrap()
}

async fn stop(agent: RunningAgent) {
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

/// A client trusting `authority`, presenting `certificate` if given, offering `alpn`.
fn client(
    authority: &Authority,
    certificate: Option<(String, String)>,
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(authority.certificate.clone()).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match certificate {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    address: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let stream = TcpStream::connect(address).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
}

/// The certificate the server presented on `stream`.
fn server_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Sends `GET path` on `stream` (keep-alive) and reads one response: (status, body).
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
) -> io::Result<(u16, String)> {
    request(stream, "GET", path, None, None).await
}

/// Sends `method path` on `stream` (keep-alive), with `token` as `Authorization: Bearer` and
/// `body` as JSON if given, and reads one response: (status, body).
async fn request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(token) = token {
        request += &format!("Authorization: Bearer {token}\r\n");
    }
    let body = body.unwrap_or_default();
    request += &format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let mut buf = [0; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return Ok((head[9..12].parse().unwrap(), body.to_owned()));
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn grpc_channel(address: SocketAddr, config: Arc<ClientConfig>) -> Result<Channel, String> {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let config = Arc::clone(&config);
            async move { tls_connect(address, config).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|err| err.to_string())
}

async fn campaign(channel: Channel) -> Result<bool, tonic::Status> {
    let won = ElectionClient::new(channel)
        .campaign(pb::CampaignRequest {
            election: "tls".into(),
            candidate: "alice".into(),
            term: 10_000,
            kind: String::new(),
        })
        .await?;
    Ok(won.into_inner().elected)
}

#[tokio::test]
async fn with_tls_files_both_ports_serve_tls_and_refuse_plain_connections() {
    let Setup { dir, authority, .. } = Setup::new("ports");
    let agent = start(&dir, None).await;
    let (grpc, http) = (agent.grpc_address.unwrap(), agent.http_address.unwrap());

    let mut plain = TcpStream::connect(http).await.unwrap();
    let (status, body) = get(&mut plain, "/livez").await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("TLS"), "{body}");
    let plain_grpc = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await;
    let refused = match plain_grpc {
        Err(_) => true,
        Ok(channel) => campaign(channel).await.is_err(),
    };
    assert!(refused, "plain gRPC was served on a TLS port");

    let mut tls = tls_connect(http, client(&authority, None, b"http/1.1"))
        .await
        .unwrap();
    assert_eq!(get(&mut tls, "/livez").await.unwrap().0, 200);
    let mut tls_h2c = tls_connect(http, client(&authority, None, b"h2"))
        .await
        .unwrap();
    assert_eq!(tls_h2c.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls_h2c.shutdown().await.unwrap();
    let channel = grpc_channel(grpc, client(&authority, None, b"h2"))
        .await
        .unwrap();
    assert!(campaign(channel).await.unwrap());
    stop(agent).await;
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_its_certificates_are_served() {
    let Setup {
        dir,
        authority,
        clients,
        client_ca: ca,
    } = Setup::new("mtls");
    let agent = start(&dir, Some(&ca)).await;
    let (grpc, http) = (agent.grpc_address.unwrap(), agent.http_address.unwrap());

    // Without a certificate: no answer (TLS 1.3 reports the refusal on the first read).
    assert!(
        !serves_without_a_certificate(http, &authority).await,
        "served a client without a certificate"
    );
    assert!(
        grpc_channel(grpc, client(&authority, None, b"h2"))
            .await
            .map(|_| ())
            .is_err()
            || {
                let channel = grpc_channel(grpc, client(&authority, None, b"h2"))
                    .await
                    .unwrap();
                campaign(channel).await.is_err()
            },
        "served a gRPC client without a certificate"
    );
    // A certificate of another CA: refused too.
    let (cert, key, _) = authority.issue("mallory", true);
    let stranger = async {
        let mut stream =
            tls_connect(http, client(&authority, Some((cert, key)), b"http/1.1")).await?;
        get(&mut stream, "/livez").await
    };
    assert!(
        stranger.await.is_err(),
        "served a certificate of another CA"
    );

    let (cert, key, _) = clients.issue("alice", true);
    let mut stream = tls_connect(
        http,
        client(&authority, Some((cert.clone(), key.clone())), b"http/1.1"),
    )
    .await
    .unwrap();
    assert_eq!(get(&mut stream, "/livez").await.unwrap().0, 200);
    let channel = grpc_channel(grpc, client(&authority, Some((cert, key)), b"h2"))
        .await
        .unwrap();
    assert!(campaign(channel).await.unwrap());
    stop(agent).await;
}

#[tokio::test]
async fn a_verified_client_certificate_names_the_caller_to_request_handlers() {
    let Setup {
        dir,
        authority,
        clients,
        client_ca: ca,
    } = Setup::new("identity");
    let files = TlsFiles {
        cert: dir.0.join("tls.crt"),
        key: dir.0.join("tls.key"),
        client_ca: Some(ca),
    };
    let tls = Tls::load(files, Protocol::Http.alpn()).unwrap();
    // What the authentication layer reads.
    let router = Router::new().route(
        "/whoami",
        routing::get(|identity: Option<Extension<PeerIdentity>>| async move {
            identity.map_or_else(|| "nobody".to_owned(), |Extension(PeerIdentity(name))| name)
        }),
    );
    let config = Sources::default().resolve().unwrap();
    let (limits, timeouts): (PortLimits, Timeouts) = (config.http_limits, config.timeouts);
    let listener = transport::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server =
        transport::Server::new(Protocol::Http, limits, timeouts, Arc::new(Churn::default()))
            .with_tls(Some(Arc::new(tls)));
    let serving = tokio::spawn(server.serve(listener, router, shutdown.clone()));

    for name in ["alice", "build-bot.ci.example"] {
        let (cert, key, _) = clients.issue(name, true);
        let mut stream = tls_connect(address, client(&authority, Some((cert, key)), b"http/1.1"))
            .await
            .unwrap();
        assert_eq!(
            get(&mut stream, "/whoami").await.unwrap(),
            (200, name.to_owned())
        );
    }
    shutdown.cancel();
    serving.await.unwrap();
}

#[tokio::test]
async fn rotated_certificate_files_serve_new_connections_while_open_ones_keep_working() {
    let dir = Dir::new("rotation");
    let authority = Authority::new("test CA");
    let first = server_files(&dir, &authority, "first");
    let agent = start(&dir, None).await;
    let (grpc, http) = (agent.grpc_address.unwrap(), agent.http_address.unwrap());

    let mut old = tls_connect(http, client(&authority, None, b"http/1.1"))
        .await
        .unwrap();
    assert_eq!(server_certificate(&old), first);
    assert_eq!(get(&mut old, "/livez").await.unwrap().0, 200);
    let old_channel = grpc_channel(grpc, client(&authority, None, b"h2"))
        .await
        .unwrap();
    assert!(campaign(old_channel.clone()).await.unwrap());

    let second = server_files(&dir, &authority, "second");
    assert_ne!(first, second);
    let mut rotated = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stream = tls_connect(http, client(&authority, None, b"http/1.1"))
            .await
            .unwrap();
        if server_certificate(&stream) == second {
            rotated = Some(stream);
            break;
        }
    }
    let mut new = rotated.expect("new connections still get the old certificate");
    assert_eq!(get(&mut new, "/livez").await.unwrap().0, 200);
    let new_grpc = tls_connect(grpc, client(&authority, None, b"h2"))
        .await
        .unwrap();
    assert_eq!(server_certificate(&new_grpc), second);

    // The connections opened before the rotation were not dropped.
    assert_eq!(get(&mut old, "/livez").await.unwrap().0, 200);
    assert!(campaign(old_channel).await.unwrap());

    // Files that cannot be used (a key of another certificate) leave the current ones in place.
    let (_, other_key, _) = authority.issue("third", false);
    dir.write("tls.key", &other_key);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let stream = tls_connect(http, client(&authority, None, b"http/1.1"))
        .await
        .unwrap();
    assert_eq!(server_certificate(&stream), second);
    stop(agent).await;
}

#[tokio::test]
async fn tls_files_that_cannot_be_used_stop_start_up_naming_the_file() {
    let dir = Dir::new("unusable");
    let authority = Authority::new("test CA");
    let start_with = |cert: &Path, key: &Path| {
        let config = Sources::default()
            .flag("EA_BIND_ADDRESS", "127.0.0.1")
            .flag("EA_GRPC_PORT", "0")
            .flag("EA_HTTP_PORT", "0")
            .flag("EA_KUBE_ENABLE", "false")
            .flag("EA_TLS_CERT_FILE", cert.display().to_string())
            .flag("EA_TLS_KEY_FILE", key.display().to_string())
            .resolve()
            .unwrap();
        async move { server::start(&config).await.err().map(|e| e.to_string()) }
    };
    let missing = dir.0.join("missing.crt");
    let (cert, _, _) = authority.issue("agent", false);
    let (_, other_key, _) = authority.issue("other", false);
    let cert = dir.write("tls.crt", &cert);
    let key = dir.write("tls.key", &other_key);
    let not_pem = dir.write("not.pem", "hello");

    let err = start_with(&missing, &key)
        .await
        .expect("started without a certificate");
    assert!(err.contains("missing.crt"), "{err}");
    let err = start_with(&not_pem, &key)
        .await
        .expect("started with no certificate in the file");
    assert!(err.contains("not.pem"), "{err}");
    let err = start_with(&cert, &key)
        .await
        .expect("started with a key of another certificate");
    assert!(err.contains("tls.key") && err.contains("match"), "{err}");
}

/// alice may work on `jobs-*` but not hand them over; the ops group may do anything.
const POLICY: &str = r#"
rules:
  - subjects: [alice]
    kinds: [default]
    elections: ["jobs-*"]
    verbs: [get, campaign, extend, resign]
  - subjects: ["group:ops"]
    kinds: ["*"]
    elections: ["*"]
    verbs: ["*"]
"#;

fn campaign_for(election: &str, candidate: &str) -> pb::CampaignRequest {
    pb::CampaignRequest {
        election: election.into(),
        candidate: candidate.into(),
        term: 60_000,
        kind: String::new(),
    }
}

/// The issue's acceptance, whole: TLS, a tokens file and a policy together. Plain HTTP is
/// refused; no or a wrong token is 401 / UNAUTHENTICATED; outside the policy 403 /
/// PERMISSION_DENIED naming verb and election; inside it 200 / OK — over both ports.
#[tokio::test]
async fn with_tls_tokens_and_a_policy_both_ports_authenticate_and_authorize_every_request() {
    let Setup { dir, authority, .. } = Setup::new("tls-auth");
    let tokens = dir.write(
        "tokens.csv",
        "alice-token,alice,uid-a\nops-token,olga,uid-o,\"ops\"\n",
    );
    let policy = dir.write("policy.yaml", POLICY);
    let agent = start_with(
        &dir,
        None,
        &[
            ("EA_AUTH_TOKENS_FILE", tokens.display().to_string()),
            ("EA_AUTH_POLICY_FILE", policy.display().to_string()),
        ],
    )
    .await;
    let (grpc, http) = (agent.grpc_address.unwrap(), agent.http_address.unwrap());
    let body = |candidate: &str| format!(r#"{{"candidate":"{candidate}","term":60000}}"#);

    // Plain HTTP, even with a good token: refused before any route is reached.
    let mut plain = TcpStream::connect(http).await.unwrap();
    let (status, text) = request(
        &mut plain,
        "POST",
        "/election/default/jobs-1",
        Some("alice-token"),
        Some(&body("alice")),
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("TLS"), "{text}");

    let mut tls = tls_connect(http, client(&authority, None, b"http/1.1"))
        .await
        .unwrap();
    for token in [None, Some("wrong-token")] {
        let (status, text) = request(
            &mut tls,
            "POST",
            "/election/default/jobs-1",
            token,
            Some(&body("alice")),
        )
        .await
        .unwrap();
        assert_eq!(status, 401, "{token:?}: {text}");
    }
    let (status, text) = request(
        &mut tls,
        "POST",
        "/election/default/jobs-1",
        Some("alice-token"),
        Some(&body("alice")),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(r#""elected":true"#), "{text}");
    let (status, text) = request(
        &mut tls,
        "PUT",
        "/election/default/jobs-1",
        Some("alice-token"),
        Some(r#"{"leader":"mallory","term":60000}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("alice may not handover election default/jobs-1"),
        "{text}"
    );
    let (status, text) = request(
        &mut tls,
        "POST",
        "/election/default/payments",
        Some("alice-token"),
        Some(&body("alice")),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("campaign") && text.contains("payments"),
        "{text}"
    );
    let (status, text) = request(
        &mut tls,
        "GET",
        "/election/default/jobs-1",
        Some("ops-token"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("alice"), "{text}");

    // gRPC: plain refused; over TLS the same decisions.
    let plain_grpc = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain_grpc {
        let refused = ElectionClient::new(channel)
            .campaign(with_token(
                campaign_for("jobs-2", "alice"),
                Some("alice-token"),
            ))
            .await;
        assert!(refused.is_err(), "plain gRPC was served: {refused:?}");
    }
    let mut client = ElectionClient::new(
        grpc_channel(grpc, client(&authority, None, b"h2"))
            .await
            .unwrap(),
    );
    for token in [None, Some("wrong-token")] {
        let refused = client
            .campaign(with_token(campaign_for("jobs-2", "alice"), token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{token:?}");
    }
    let refused = client
        .campaign(with_token(
            campaign_for("payments", "alice"),
            Some("alice-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        "alice may not campaign election default/payments"
    );
    let won = client
        .campaign(with_token(
            campaign_for("jobs-2", "alice"),
            Some("alice-token"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(won.elected);
    let handed = client
        .handover(with_token(
            pb::HandoverRequest {
                election: "jobs-2".into(),
                leader: "bob".into(),
                term: 60_000,
                ..Default::default()
            },
            Some("ops-token"),
        ))
        .await;
    assert!(handed.is_ok(), "{handed:?}");
    stop(agent).await;
}

/// With client certificates required and no tokens, the certificate names the caller and the
/// policy applies to that name; a client without a certificate cannot connect at all.
#[tokio::test]
async fn with_client_certificates_the_certificate_is_the_identity_the_policy_judges() {
    let Setup {
        dir,
        authority,
        clients,
        client_ca: ca,
    } = Setup::new("mtls-auth");
    let policy = dir.write("policy.yaml", POLICY);
    let agent = start_with(
        &dir,
        Some(&ca),
        &[("EA_AUTH_POLICY_FILE", policy.display().to_string())],
    )
    .await;
    let (grpc, http) = (agent.grpc_address.unwrap(), agent.http_address.unwrap());

    assert!(
        !serves_without_a_certificate(http, &authority).await,
        "served a client without a certificate"
    );

    let (alice_cert, alice_key, _) = clients.issue("alice", true);
    let mut alice = tls_connect(
        http,
        client(
            &authority,
            Some((alice_cert.clone(), alice_key.clone())),
            b"http/1.1",
        ),
    )
    .await
    .unwrap();
    let (status, text) = request(
        &mut alice,
        "POST",
        "/election/default/jobs-1",
        None,
        Some(r#"{"candidate":"alice","term":60000}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let (status, text) = request(
        &mut alice,
        "POST",
        "/election/default/payments",
        None,
        Some(r#"{"candidate":"alice","term":60000}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("alice may not campaign election default/payments"),
        "{text}"
    );

    // mallory's certificate is valid, but the policy names no mallory.
    let (cert, key, _) = clients.issue("mallory", true);
    let mut client_of_mallory = ElectionClient::new(
        grpc_channel(grpc, client(&authority, Some((cert, key)), b"h2"))
            .await
            .unwrap(),
    );
    let refused = client_of_mallory
        .campaign(campaign_for("jobs-1", "mallory"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        "mallory may not campaign election default/jobs-1"
    );
    let mut client_of_alice = ElectionClient::new(
        grpc_channel(
            grpc,
            client(&authority, Some((alice_cert, alice_key)), b"h2"),
        )
        .await
        .unwrap(),
    );
    let kept = client_of_alice
        .campaign(campaign_for("jobs-1", "alice"))
        .await
        .unwrap()
        .into_inner();
    assert!(kept.elected);
    stop(agent).await;
}

/// `election-agent client` against an agent requiring client certificates: with `https://`, the
/// CA file and a certificate it campaigns; without the certificate it cannot connect, and says
/// why; TLS files with an `http://` address are refused before connecting.
#[tokio::test]
async fn the_command_line_client_speaks_tls_and_presents_its_certificate() {
    use election_agent::client::{self, ClientArgs, ClientCommand, ClientTls};
    let Setup {
        dir,
        authority,
        clients,
        client_ca: ca,
    } = Setup::new("client");
    let server_ca = dir.write("server-ca.crt", &authority.pem);
    let (cert, key, _) = clients.issue("alice", true);
    let (cert, key) = (dir.write("alice.crt", &cert), dir.write("alice.key", &key));
    let agent = start(&dir, Some(&ca)).await;
    let address = format!("https://localhost:{}", agent.grpc_address.unwrap().port());
    let args = |address: &str, tls: ClientTls| ClientArgs {
        address: address.to_owned(),
        token: None,
        tls,
        kind: String::new(),
        command: ClientCommand::Campaign {
            election: "cli".into(),
            candidate: "alice".into(),
            term: 10_000,
        },
    };

    let with_certificate = ClientTls {
        tls_ca_file: Some(server_ca.clone()),
        tls_cert_file: Some(cert),
        tls_key_file: Some(key),
    };
    client::run(args(&address, with_certificate.clone()))
        .await
        .expect("campaigns over mTLS");

    let without = ClientTls {
        tls_ca_file: Some(server_ca),
        ..ClientTls::default()
    };
    let refused = client::run(args(&address, without))
        .await
        .expect_err("served without a client certificate")
        .to_string();
    // TLS 1.3: the refusal comes on the first read, as an alert or as the connection closed.
    assert!(
        refused.contains("CertificateRequired") || refused.contains("connection closed"),
        "{refused}"
    );

    let plain = format!("http://127.0.0.1:{}", agent.grpc_address.unwrap().port());
    let refused = client::run(args(&plain, with_certificate))
        .await
        .expect_err("TLS files with http:// were accepted")
        .to_string();
    assert!(refused.contains("not https://"), "{refused}");
    stop(agent).await;
}

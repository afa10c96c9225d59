//! The transport under both ports, over real loopback connections: connection caps, the timeouts
//! that close slow, silent and idle connections, per-connection HTTP/2 streams, limits on
//! Observe and watch streams, body and request deadlines.
//!
//! Limits and timeouts are set small here so that each behaviour shows in well under a second;
//! the waits allow seconds, never asserting a latency (`scripts/flood.sh` measures those).

use std::{net::SocketAddr, time::Duration};

use election_agent::{
    config::Sources,
    grpc::pb::{self, election_client::ElectionClient, leader_event::Type},
    server::{self, RunningAgent},
};
use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, transport::Channel};

/// Generous bound for something that should happen within a fraction of a second.
const SOON: Duration = Duration::from_secs(5);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what a client sends right after the preface.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A connection to the agent's gRPC port that has said the HTTP/2 preface and empty SETTINGS,
/// and nothing more.
async fn h2_connection(agent: &RunningAgent) -> TcpStream {
    let mut stream = TcpStream::connect(agent.grpc_address.unwrap())
        .await
        .unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(&EMPTY_SETTINGS).await.unwrap();
    stream
}

/// Starts an agent on loopback with the memory store and `settings` on top.
async fn start(settings: &[(&'static str, &str)]) -> RunningAgent {
    let mut sources = Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_ENABLE", "false");
    for (key, value) in settings {
        sources = sources.flag(key, *value);
    }
    server::start(&sources.resolve().expect("valid configuration"))
        .await
        .expect("agent starts")
}

async fn stop(agent: RunningAgent) {
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

async fn grpc_client(agent: &RunningAgent) -> ElectionClient<Channel> {
    // A channel of its own: a fresh TCP connection.
    let channel = Channel::from_shared(format!("http://{}", agent.grpc_address.unwrap()))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    ElectionClient::new(channel)
}

fn campaign(election: &str, candidate: &str) -> pb::CampaignRequest {
    pb::CampaignRequest {
        election: election.into(),
        candidate: candidate.into(),
        term: 10_000,
        kind: String::new(),
    }
}

fn observe(election: &str) -> pb::ObserveRequest {
    pb::ObserveRequest {
        election: election.into(),
        kind: String::new(),
    }
}

/// Opens `n` connections that send nothing.
async fn idle_connections(address: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(n);
    for _ in 0..n {
        connections.push(TcpStream::connect(address).await.unwrap());
    }
    connections
}

/// Whether the agent closed the connection: end of stream or reset, as far as it can be seen
/// without waiting.
fn is_closed(stream: &TcpStream) -> bool {
    let mut buf = [0; 1024];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Reads until the agent closes the connection; what it sent, or `None` if it kept it open
/// for [`SOON`].
async fn read_until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let read = async {
        let mut buf = [0; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(SOON, read).await.ok()?;
    Some(received)
}

/// `GET path` on a new HTTP/1.1 connection: (status, body).
async fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_until_closed(&mut stream)
        .await
        .expect("an answer within seconds");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The frames an HTTP/2 server sent: (type, flags, payload).
fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let Some(payload) = bytes.get(9..9 + length) else {
            break;
        };
        frames.push((bytes[3], bytes[4], payload.to_vec()));
        bytes = &bytes[9 + length..];
    }
    frames
}

const GOAWAY: u8 = 7;
const SETTINGS: u8 = 4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;

#[tokio::test]
async fn at_the_http_connection_cap_idle_connections_make_room_and_probes_still_answer() {
    let agent = start(&[("EA_HTTP_MAX_CONNECTIONS", "20")]).await;
    let http = agent.http_address.unwrap();

    let flood = idle_connections(http, 100).await;
    let (status, body) = get(http, "/livez").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = flood.iter().filter(|c| !is_closed(c)).count();
    assert!(
        open <= 20,
        "{open} of 100 idle connections still open, cap 20"
    );
    assert!(
        flood[..80].iter().all(is_closed),
        "the connections idle longest are the ones closed"
    );
    stop(agent).await;
}

#[tokio::test]
async fn at_the_grpc_connection_cap_idle_connections_make_room_and_busy_ones_stay() {
    let agent = start(&[("EA_GRPC_MAX_CONNECTIONS", "20")]).await;
    let grpc = agent.grpc_address.unwrap();

    // A connection with a stream in flight is never the one closed.
    let mut watcher = grpc_client(&agent).await;
    let mut events = watcher
        .observe(observe("flooded"))
        .await
        .unwrap()
        .into_inner();
    let current = events.next().await.unwrap().unwrap();
    assert_eq!(current.r#type(), Type::Current);

    let flood = idle_connections(grpc, 100).await;
    let won = grpc_client(&agent)
        .await
        .campaign(campaign("flooded", "alice"))
        .await
        .unwrap()
        .into_inner();
    assert!(won.elected);
    let elected = tokio::time::timeout(SOON, events.next())
        .await
        .expect("the watcher's stream survived the flood")
        .unwrap()
        .unwrap();
    assert_eq!(
        (elected.r#type(), elected.leader.as_str()),
        (Type::Elected, "alice")
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = flood.iter().filter(|c| !is_closed(c)).count();
    assert!(
        open <= 20,
        "{open} of 100 idle connections still open, cap 20"
    );
    stop(agent).await;
}

#[tokio::test]
async fn connections_that_send_nothing_are_closed_after_the_handshake_timeout() {
    let agent = start(&[("EA_HANDSHAKE_TIMEOUT", "300ms")]).await;
    for address in [agent.grpc_address.unwrap(), agent.http_address.unwrap()] {
        let mut silent = TcpStream::connect(address).await.unwrap();
        assert!(
            read_until_closed(&mut silent).await.is_some(),
            "{address}: a silent connection was kept open"
        );
        // Half a preface is not a preface.
        let mut partial = TcpStream::connect(address).await.unwrap();
        partial.write_all(&H2_PREFACE[..10]).await.unwrap();
        assert!(
            read_until_closed(&mut partial).await.is_some(),
            "{address}: a connection that never finished the HTTP/2 preface was kept open"
        );
    }
    stop(agent).await;
}

#[tokio::test]
async fn slowloris_headers_are_cut_off_after_the_header_read_timeout() {
    let agent = start(&[("EA_HEADER_READ_TIMEOUT", "500ms")]).await;
    let mut slow = TcpStream::connect(agent.http_address.unwrap())
        .await
        .unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: agent\r\n")
        .await
        .unwrap();
    // One more header byte every 100 ms: never idle, never done.
    let trickle = async {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(b"X").await.is_err() {
                return true;
            }
        }
        false
    };
    let cut_off = tokio::time::timeout(SOON, trickle).await.unwrap_or(false);
    assert!(cut_off, "a request whose headers never end was kept open");
    stop(agent).await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_http2_with_goaway() {
    let agent = start(&[("EA_IDLE_TIMEOUT", "500ms")]).await;

    // HTTP/1.1 keep-alive after one answer.
    let mut kept = TcpStream::connect(agent.http_address.unwrap())
        .await
        .unwrap();
    kept.write_all(b"GET /livez HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut kept)
        .await
        .expect("an idle keep-alive connection was kept open");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // HTTP/2 (the gRPC port) that never opens a stream.
    let mut silent = h2_connection(&agent).await;
    let frames = read_until_closed(&mut silent)
        .await
        .expect("an idle HTTP/2 connection was kept open");
    assert!(
        h2_frames(&frames).iter().any(|(kind, ..)| *kind == GOAWAY),
        "closed without GOAWAY: {:?}",
        h2_frames(&frames)
    );
    stop(agent).await;
}

#[tokio::test]
async fn an_http2_client_that_stops_answering_pings_is_disconnected() {
    let agent = start(&[
        ("EA_KEEPALIVE_INTERVAL", "200ms"),
        ("EA_KEEPALIVE_TIMEOUT", "200ms"),
    ])
    .await;
    let mut silent = h2_connection(&agent).await;
    // The idle timeout is minutes away: only the unanswered PING can close it.
    let frames = read_until_closed(&mut silent)
        .await
        .expect("a client that never answers PINGs was kept");
    const PING: u8 = 6;
    assert!(
        h2_frames(&frames).iter().any(|(kind, ..)| *kind == PING),
        "{:?}",
        h2_frames(&frames)
    );
    stop(agent).await;
}

#[tokio::test]
async fn grpc_connections_are_told_how_many_streams_they_may_open() {
    let agent = start(&[
        ("EA_GRPC_MAX_CONCURRENT_STREAMS", "64"),
        ("EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION", "32"),
    ])
    .await;
    let mut stream = h2_connection(&agent).await;
    let mut received = vec![0; 512];
    let n = tokio::time::timeout(SOON, stream.read(&mut received))
        .await
        .unwrap()
        .unwrap();
    let frames = h2_frames(&received[..n]);
    let (_, _, settings) = frames
        .iter()
        .find(|(kind, flags, _)| *kind == SETTINGS && flags & 1 == 0)
        .expect("the server's SETTINGS");
    let max_streams = settings.chunks(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    });
    assert_eq!(max_streams, Some(64));
    stop(agent).await;
}

#[tokio::test]
async fn observe_streams_beyond_the_connection_and_port_limits_are_resource_exhausted() {
    let agent = start(&[
        ("EA_GRPC_MAX_OBSERVE_STREAMS", "3"),
        ("EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION", "2"),
    ])
    .await;
    let mut first = grpc_client(&agent).await;
    let mut second = grpc_client(&agent).await;

    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(first.observe(observe("busy")).await.unwrap().into_inner());
    }
    let refused = first.observe(observe("busy")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("connection"), "{refused:?}");

    open.push(second.observe(observe("busy")).await.unwrap().into_inner());
    let refused = second.observe(observe("busy")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("maximum of 3"), "{refused:?}");
    // Other calls still go through on a connection at its Observe limit.
    assert!(
        first
            .campaign(campaign("busy", "alice"))
            .await
            .unwrap()
            .into_inner()
            .elected
    );

    // A stream that ends frees its slot.
    drop(open.pop());
    let mut reopened = None;
    for _ in 0..50 {
        match second.observe(observe("busy")).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        reopened.is_some(),
        "the slot of the ended stream was not freed"
    );
    stop(agent).await;
}

#[tokio::test]
async fn watch_streams_beyond_the_limit_are_refused_with_429() {
    let agent = start(&[
        ("EA_HTTP_MAX_WATCH_STREAMS", "2"),
        ("EA_HTTP_MAX_WATCH_STREAMS_PER_CONNECTION", "1"),
    ])
    .await;
    let http = agent.http_address.unwrap();
    let watch = async || {
        let mut stream = TcpStream::connect(http).await.unwrap();
        stream
            .write_all(b"GET /election/default/busy/watch HTTP/1.1\r\nHost: agent\r\n\r\n")
            .await
            .unwrap();
        let mut head = vec![0; 1024];
        let n = tokio::time::timeout(SOON, stream.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        (stream, String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let (first, head) = watch().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_second, head) = watch().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_, head) = watch().await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.contains(r#"{"message":"#), "{head}");

    drop(first);
    let mut reopened = false;
    for _ in 0..50 {
        if watch().await.1.starts_with("HTTP/1.1 200") {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened, "the slot of the closed watch was not freed");
    stop(agent).await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_fails_the_request() {
    let agent = start(&[("EA_BODY_READ_TIMEOUT", "300ms")]).await;
    let mut stream = TcpStream::connect(agent.http_address.unwrap())
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /election/default/slow HTTP/1.1\r\nHost: agent\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"candidate\"",
        )
        .await
        .unwrap();
    let mut head = vec![0; 1024];
    let n = tokio::time::timeout(SOON, stream.read(&mut head))
        .await
        .expect("no answer to a partial body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("did not arrive within"), "{head}");
    stop(agent).await;
}

#[tokio::test]
async fn a_request_that_outlives_the_request_timeout_gets_deadline_exceeded_or_503() {
    // A Redis server that accepts connections and never answers: every attempt times out, and
    // an extend retries for seconds.
    let redis = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redis_url = format!("redis://{}", redis.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = redis.accept().await {
            held.push(stream);
        }
    });
    let agent = start(&[
        ("EA_REDIS_URLS", &redis_url),
        ("EA_REDIS_OPERATION_TIMEOUT", "200ms"),
        ("EA_REDIS_SERVER_TIMEOUT", "100ms"),
        ("EA_REQUEST_TIMEOUT", "500ms"),
    ])
    .await;

    let refused = grpc_client(&agent)
        .await
        .extend_elected_term(pb::ExtendElectedTermRequest {
            election: "stuck".into(),
            leader: "alice".into(),
            term: 10_000,
            kind: String::new(),
            retries: 10,
            retry_interval: 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");

    let mut stream = TcpStream::connect(agent.http_address.unwrap())
        .await
        .unwrap();
    let body = r#"{"leader":"alice","term":10000,"retries":10,"retry_interval":1000}"#;
    let request = format!(
        "PATCH /election/default/stuck HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_until_closed(&mut stream).await.expect("an answer");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("request timeout"), "{response}");

    stop(agent).await;
    held.abort();
}

#[tokio::test]
async fn grpc_answers_carry_no_date_header_and_rest_answers_do() {
    let agent = start(&[]).await;
    let answer = grpc_client(&agent)
        .await
        .campaign(campaign("dated", "alice"))
        .await
        .expect("campaign answered");
    assert!(
        answer.metadata().get("date").is_none(),
        "gRPC response headers: {:?}",
        answer.metadata()
    );

    let mut stream = TcpStream::connect(agent.http_address.unwrap())
        .await
        .unwrap();
    let request = "GET /livez HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_until_closed(&mut stream).await.expect("an answer");
    let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(response.contains("\r\ndate: "), "REST response: {response}");
    stop(agent).await;
}

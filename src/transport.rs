//! The transport under both APIs: accepts a port's TCP connections and serves them with hyper
//! (HTTP/1.1 or HTTP/2 on the HTTP port, HTTP/2 only on the gRPC port), keeping what clients can
//! hold bounded.
//!
//! Each port caps its open connections, one semaphore permit each. At the cap, a new connection
//! closes the one idle longest (no request in flight): a flood of idle, slow or silent
//! connections only pushes out its own, while a probe or a client sending requests is served at
//! once. Only when every connection has a request in flight does the port stop accepting (the
//! kernel's backlog holds new ones) until one ends or goes idle. Each connection is watched: its
//! first bytes must come within the handshake timeout, an HTTP/1 request's headers within the
//! header-read timeout of its first byte, a body within the body-read timeout; a connection idle
//! for the idle timeout is closed, and HTTP/2 PINGs close one that went silent, streams and all.
//! A response must start within the request timeout, which therefore bounds unary requests
//! whole and Observe/watch streams only until their first event. Those long-lived streams take a
//! [`StreamSlots`] permit, limited per port and per connection.
//!
//! With TLS ([`Tls`]), the handshake comes first, within the handshake timeout, and a verified
//! client certificate's identity ([`PeerIdentity`]) goes into the extensions of every request of
//! its connection, next to the [`StreamSlots`].

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::http::{Request, Response, StatusCode, header};
use bytes::{Buf, Bytes};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

use crate::config::{PortLimits, Timeouts};

mod tls;

pub use tls::{PeerIdentity, Tls, TlsError, crypto_provider};

/// Errors of request and response bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The first bytes of every HTTP/2 connection.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a connection closed for being idle (or evicted) may take to say goodbye (HTTP/2
/// GOAWAY) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The accept queue asked of the kernel (which caps it at `net.core.somaxconn`), as Go's
/// servers ask: a flood's bursts wait there rather than overflow it, which would drop every
/// client's connection attempt — a probe's too — for a second, until the SYN is sent again.
const BACKLOG: u32 = 4096;
/// Evicted connections that may still be closing after a new one took their place: at most
/// this many descriptors above a port's cap.
const MAX_CLOSING: usize = 256;
/// While shutting down, how often a connection with requests in flight looks whether they ended.
const DRAIN_RECHECK: Duration = Duration::from_millis(100);
/// At the cap, how long the port waits for a place before it looks again for an idle connection.
const BUSY_RECHECK: Duration = Duration::from_millis(50);
/// Pauses after a failed accept (out of descriptors, say): doubling from the first to the last.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));
/// A repeated warning is logged at most this often, with how many times it happened.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Descriptors the agent needs besides its clients' connections: the store's, Kubernetes',
/// the listeners, logs.
pub const DESCRIPTOR_RESERVE: usize = 512;

/// HTTP/2 flow-control windows and send buffer: requests and events are small, and a client
/// that sends a partial body or reads nothing must not make the agent buffer megabytes per
/// stream (hyper's defaults are 1 MiB windows and a 400 KiB send buffer).
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
const SEND_BUFFER: usize = 64 * 1024;

/// What a port speaks, which decides how the transport's own refusals are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2 only; refusals are gRPC statuses.
    Grpc,
    /// The REST API: HTTP/1.1, or HTTP/2 with prior knowledge; refusals are `{"message"}`.
    Http,
}

impl Protocol {
    /// The application protocols its TLS handshake offers, most preferred first.
    pub fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Protocol::Grpc => &[b"h2"],
            Protocol::Http => &[b"h2", b"http/1.1"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "gRPC",
            Protocol::Http => "HTTP",
        }
    }

    /// The answer to a request whose response did not start within `deadline`.
    fn deadline_exceeded(self, deadline: Duration) -> Response<Option<Bytes>> {
        let message = format!("no answer within the request timeout of {deadline:?}");
        match self {
            Protocol::Grpc => tonic::Status::deadline_exceeded(message)
                .into_http::<()>()
                .map(|()| None),
            Protocol::Http => {
                let body = serde_json::json!({ "message": message }).to_string();
                let mut response = Response::new(Some(Bytes::from(body)));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                response
            }
        }
    }

    /// Why a request's body failed, as the service reports it to the client.
    fn body_timeout(self, timeout: Duration) -> BoxError {
        let message = format!("the request body did not arrive within {timeout:?}");
        match self {
            Protocol::Grpc => Box::new(tonic::Status::deadline_exceeded(message)),
            Protocol::Http => message.into(),
        }
    }
}

/// Counts connections closed and event streams ended, so that housekeeping can hand the memory
/// of a burst of them back to the system (the allocator keeps it otherwise).
#[derive(Debug, Default)]
pub struct Churn(AtomicUsize);

impl Churn {
    /// How many ended since the last call.
    pub fn take(&self) -> usize {
        self.0.swap(0, Ordering::Relaxed)
    }

    fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The event streams (gRPC Observe, HTTP watch) a request may still open: its port's and its
/// connection's free slots. The transport puts one in every request's extensions.
#[derive(Debug, Clone)]
pub struct StreamSlots {
    port: Arc<Semaphore>,
    connection: Arc<Semaphore>,
    port_limit: usize,
    connection_limit: usize,
    churn: Arc<Churn>,
}

impl StreamSlots {
    /// Slots for a port of `port_limit` streams and a connection of `connection_limit`.
    pub fn new(port_limit: usize, connection_limit: usize) -> Self {
        Self::of_port(
            Arc::new(Semaphore::new(port_limit)),
            port_limit,
            connection_limit,
            Arc::default(),
        )
    }

    fn of_port(
        port: Arc<Semaphore>,
        port_limit: usize,
        connection_limit: usize,
        churn: Arc<Churn>,
    ) -> Self {
        Self {
            port,
            connection: Arc::new(Semaphore::new(connection_limit)),
            port_limit,
            connection_limit,
            churn,
        }
    }

    /// Takes a slot for one stream, freed when the permit is dropped.
    pub fn acquire(&self) -> Result<StreamPermit, TooManyStreams> {
        let connection = Arc::clone(&self.connection)
            .try_acquire_owned()
            .map_err(|_| TooManyStreams::Connection(self.connection_limit))?;
        let port = Arc::clone(&self.port)
            .try_acquire_owned()
            .map_err(|_| TooManyStreams::Port(self.port_limit))?;
        Ok(StreamPermit {
            _port: port,
            _connection: connection,
            churn: Arc::clone(&self.churn),
        })
    }
}

/// One event stream's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamPermit {
    _port: OwnedSemaphorePermit,
    _connection: OwnedSemaphorePermit,
    churn: Arc<Churn>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.churn.add();
    }
}

/// Why an event stream was refused: RESOURCE_EXHAUSTED / 429.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooManyStreams {
    /// The port serves as many as it may.
    #[error(
        "this agent already serves its maximum of {0} event streams on this port; try again later"
    )]
    Port(usize),
    /// The connection has as many as it may.
    #[error(
        "this connection already has its maximum of {0} event streams; open more on another connection"
    )]
    Connection(usize),
}

impl From<TooManyStreams> for tonic::Status {
    fn from(err: TooManyStreams) -> Self {
        tonic::Status::resource_exhausted(err.to_string())
    }
}

/// One listening port's transport: what it speaks, its limits and timeouts.
pub struct Server {
    protocol: Protocol,
    limits: PortLimits,
    timeouts: Timeouts,
    churn: Arc<Churn>,
    tls: Option<Arc<Tls>>,
}

impl Server {
    /// A transport for a port speaking `protocol`; closed connections and ended streams are
    /// counted in `churn`.
    pub fn new(
        protocol: Protocol,
        limits: PortLimits,
        timeouts: Timeouts,
        churn: Arc<Churn>,
    ) -> Self {
        Self {
            protocol,
            limits,
            timeouts,
            churn,
            tls: None,
        }
    }

    /// Serves TLS only, with `tls`'s files (plain TCP with `None`).
    pub fn with_tls(self, tls: Option<Arc<Tls>>) -> Self {
        Self { tls, ..self }
    }

    /// Serves `service` on `listener` until `shutdown`; then stops accepting, lets every
    /// connection finish the requests it has in flight and returns once all are closed.
    pub async fn serve<S, B>(self, listener: TcpListener, service: S, shutdown: CancellationToken)
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let port = Arc::new(Port {
            protocol: self.protocol,
            limits: self.limits,
            timeouts: self.timeouts,
            epoch: Instant::now(),
            permits: Arc::new(Semaphore::new(self.limits.max_connections)),
            closing: Arc::new(Semaphore::new(MAX_CLOSING)),
            slots: (0..self.limits.max_connections + MAX_CLOSING)
                .map(|_| Slot::default())
                .collect(),
            table: Mutex::new(Table {
                connections: vec![None; self.limits.max_connections + MAX_CLOSING],
                free: (0..self.limits.max_connections + MAX_CLOSING)
                    .rev()
                    .collect(),
            }),
            next_id: AtomicU64::new(0),
            event_streams: Arc::new(Semaphore::new(self.limits.max_event_streams)),
            churn: self.churn,
            tls: self.tls,
            shutdown,
            at_cap: RateLimited::default(),
            accept_failed: RateLimited::default(),
        });
        let mut backoff = ACCEPT_BACKOFF.0;
        loop {
            let accepted = tokio::select! {
                () = port.shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF.0;
                    stream
                }
                // The client gave up before we took its connection: nothing to do.
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    // Out of descriptors, the connection waits in the backlog: an idle one
                    // closed makes room for it.
                    let evicted =
                        is_out_of_descriptors(&err) && port.evict_longest_idle().is_some();
                    if let Some(times) = port.accept_failed.occurred() {
                        tracing::warn!(
                            port = port.protocol.name(),
                            error = %err,
                            times,
                            evicted,
                            retry_in = ?backoff,
                            "cannot accept connections"
                        );
                    }
                    tokio::select! {
                        () = port.shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            };
            let place = match Arc::clone(&port.permits).try_acquire_owned() {
                Ok(place) => place,
                Err(_) => match port.take_place_of_longest_idle() {
                    Some(place) => place,
                    None => match port.make_room().await {
                        Some(place) => place,
                        None => break,
                    },
                },
            };
            let Some(connection) = port.register(place) else {
                continue;
            };
            tokio::spawn(Arc::clone(&port).connection(stream, connection, service.clone()));
        }
        drop(listener);
        // Every connection holds a permit until it is closed.
        let all = u32::try_from(port.limits.max_connections).unwrap_or(u32::MAX);
        let _ = port.permits.acquire_many(all).await;
    }
}

/// A repeated event, logged at most once per [`WARN_EVERY`].
#[derive(Default)]
struct RateLimited(Mutex<(Option<Instant>, u64)>);

impl RateLimited {
    /// Counts one occurrence; when it is time to log again, returns how many there were since
    /// the last time.
    fn occurred(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (logged, count) = &mut *state;
        *count += 1;
        if logged.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return None;
        }
        *logged = Some(Instant::now());
        Some(std::mem::take(count))
    }
}

/// What a port holds and how it treats it.
struct Port {
    protocol: Protocol,
    limits: PortLimits,
    timeouts: Timeouts,
    /// Times of connections are milliseconds since this, plus one (zero means "never").
    epoch: Instant,
    /// Places under the cap, one per open connection.
    permits: Arc<Semaphore>,
    /// Evicted connections still closing whose place a new connection took already.
    closing: Arc<Semaphore>,
    /// What eviction looks at, one slot per open connection: the places under the cap and
    /// those of connections still closing.
    slots: Box<[Slot]>,
    table: Mutex<Table>,
    next_id: AtomicU64,
    event_streams: Arc<Semaphore>,
    churn: Arc<Churn>,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
    at_cap: RateLimited,
    accept_failed: RateLimited,
}

/// What eviction reads of one open connection. The slots of a port are contiguous, so that
/// finding the connection idle longest among thousands is a quick scan (following a pointer to
/// each connection instead cost a cache miss each, and the accept loop fell behind a flood).
#[derive(Default)]
struct Slot {
    /// The connection's id + 1 while the slot is taken; 0 while it is free.
    owner: AtomicU64,
    /// Requests whose response has not been sent whole yet (streams included).
    in_flight: AtomicUsize,
    /// When a request last started or ended (or the connection was accepted).
    last_active: AtomicU64,
    /// Asked to close already.
    evicted: AtomicBool,
}

/// The open connections by slot, and the free slots. Sized once for the cap: a flood leaves no
/// grown table behind.
struct Table {
    connections: Vec<Option<Arc<Connection>>>,
    free: Vec<usize>,
}

/// One open connection, as its watchdog and the eviction see it.
struct Connection {
    /// Its index in the port's slots.
    slot: usize,
    /// HTTP/1, while no request is in flight: when the next request's first bytes came (0: none).
    reading_since: AtomicU64,
    evict: CancellationToken,
    streams: StreamSlots,
    /// Its place under the cap: a permit of the port's, or of its `closing` once evicted.
    place: Mutex<Option<OwnedSemaphorePermit>>,
}

/// What the watchdog decides about a connection.
enum Verdict {
    /// Look again at this time.
    Keep(u64),
    /// No request for the idle timeout: close it politely.
    Idle,
    /// An HTTP/1 request's headers did not arrive in time: drop it.
    SlowHeaders,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Port {
    fn now(&self) -> u64 {
        millis(self.epoch.elapsed()) + 1
    }

    fn instant(&self, at: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_millis(at.saturating_sub(1)))
    }

    fn slot(&self, connection: &Connection) -> &Slot {
        &self.slots[connection.slot]
    }

    /// Registers a new connection holding `place`; `None` if no slot is free, which the
    /// permits rule out.
    fn register(&self, place: OwnedSemaphorePermit) -> Option<Arc<Connection>> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let index = table.free.pop()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[index];
        slot.in_flight.store(0, Ordering::Relaxed);
        slot.last_active.store(self.now(), Ordering::Relaxed);
        slot.evicted.store(false, Ordering::Relaxed);
        slot.owner.store(id + 1, Ordering::Release);
        let connection = Arc::new(Connection {
            slot: index,
            reading_since: AtomicU64::new(0),
            evict: CancellationToken::new(),
            streams: StreamSlots::of_port(
                Arc::clone(&self.event_streams),
                self.limits.max_event_streams,
                self.limits.max_event_streams_per_connection,
                Arc::clone(&self.churn),
            ),
            place: Mutex::new(Some(place)),
        });
        table.connections[index] = Some(Arc::clone(&connection));
        Some(connection)
    }

    fn unregister(&self, connection: &Connection) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.connections[connection.slot] = None;
        self.slot(connection).owner.store(0, Ordering::Release);
        table.free.push(connection.slot);
        drop(table);
        drop(
            connection
                .place
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        self.churn.add();
    }

    /// Asks the connection idle longest to close and returns it; `None` if every one has a
    /// request in flight.
    fn evict_longest_idle(&self) -> Option<Arc<Connection>> {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock, no slot changes hands during the scan.
        let (_, _, index) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| {
                slot.owner.load(Ordering::Acquire) != 0
                    && slot.in_flight.load(Ordering::Acquire) == 0
                    && !slot.evicted.load(Ordering::Relaxed)
            })
            // Connections accepted within the same millisecond: the older one first.
            .map(|(index, slot)| {
                (
                    slot.last_active.load(Ordering::Relaxed),
                    slot.owner.load(Ordering::Relaxed),
                    index,
                )
            })
            .min()?;
        let victim = table.connections[index].as_ref()?;
        self.slot(victim).evicted.store(true, Ordering::Relaxed);
        victim.evict.cancel();
        Some(Arc::clone(victim))
    }

    /// At the cap: evicts the connection idle longest and takes its place at once, without
    /// waiting for it to close (the accept loop must keep up with a flood, or the kernel's
    /// backlog overflows and drops everyone's connection attempts, probes' too). At most
    /// [`MAX_CLOSING`] evicted connections may be closing so: past that, `None`.
    fn take_place_of_longest_idle(&self) -> Option<OwnedSemaphorePermit> {
        let victim = self.evict_longest_idle();
        self.at_cap_reached(victim.is_some());
        let closing = Arc::clone(&self.closing).try_acquire_owned().ok()?;
        victim?
            .place
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(closing)
    }

    fn at_cap_reached(&self, evicted: bool) {
        if let Some(times) = self.at_cap.occurred() {
            tracing::warn!(
                port = self.protocol.name(),
                max_connections = self.limits.max_connections,
                times,
                "connection cap reached: closing the connections idle longest{}",
                if evicted {
                    ""
                } else {
                    "; none is idle, so new connections wait"
                }
            );
        }
    }

    /// At the cap, with no place to take: closes idle connections until a place is free
    /// (`None` once shutting down).
    async fn make_room(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            self.evict_longest_idle();
            tokio::select! {
                permit = Arc::clone(&self.permits).acquire_owned() => return permit.ok(),
                () = self.shutdown.cancelled() => return None,
                // The evicted connection is slow to go, or none was idle: look again.
                () = tokio::time::sleep(BUSY_RECHECK) => {}
            }
        }
    }

    fn verdict(&self, connection: &Connection, http1: bool) -> Verdict {
        let now = self.now();
        let header_read = millis(self.timeouts.header_read);
        let slot = self.slot(connection);
        if slot.in_flight.load(Ordering::Acquire) > 0 {
            // HTTP/1 looks again sooner: the next request's headers may start once this ends.
            let idle = millis(self.timeouts.idle);
            return Verdict::Keep(now + if http1 { header_read.min(idle) } else { idle });
        }
        let reading_since = connection.reading_since.load(Ordering::Acquire);
        if http1 && reading_since != 0 && now >= reading_since + header_read {
            return Verdict::SlowHeaders;
        }
        let idle_at = slot.last_active.load(Ordering::Acquire) + millis(self.timeouts.idle);
        if now >= idle_at {
            return Verdict::Idle;
        }
        if !http1 {
            return Verdict::Keep(idle_at);
        }
        let headers_at = if reading_since == 0 {
            now + header_read
        } else {
            reading_since + header_read
        };
        Verdict::Keep(idle_at.min(headers_at))
    }

    /// Serves one accepted connection until it closes.
    async fn connection<S, B>(
        self: Arc<Self>,
        stream: TcpStream,
        connection: Arc<Connection>,
        service: S,
    ) where
        S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let _registered = Registered {
            port: &self,
            connection: &connection,
        };
        if let Err(err) = stream.set_nodelay(true) {
            // Without it, a response of more than one segment waits for the client's delayed
            // ACK (40 ms on Linux).
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let handshaken = tokio::select! {
            handshaken = tokio::time::timeout(self.timeouts.handshake, self.handshake(stream)) => handshaken,
            () = connection.evict.cancelled() => Ok(Err(io::ErrorKind::ConnectionAborted.into())),
            () = self.shutdown.cancelled() => Ok(Err(io::ErrorKind::ConnectionAborted.into())),
        };
        match handshaken {
            Ok(Ok(Handshaken::Plain(io, first))) => {
                self.serve_io(io, first, None, &connection, service).await;
            }
            Ok(Ok(Handshaken::Tls(io, first, identity))) => {
                self.serve_io(io, first, identity, &connection, service)
                    .await;
            }
            Ok(Err(err)) => {
                tracing::debug!(port = self.protocol.name(), error = %err, "connection closed before it started");
            }
            Err(_) => {
                tracing::debug!(
                    port = self.protocol.name(),
                    "no first bytes or TLS handshake within the handshake timeout: connection closed"
                );
            }
        }
    }

    /// Reads what starts a connection: its TLS handshake, if the port speaks TLS, and the first
    /// bytes that tell HTTP/2 from HTTP/1 (unless ALPN told already).
    async fn handshake(&self, mut stream: TcpStream) -> io::Result<Handshaken> {
        let Some(tls) = &self.tls else {
            let first = sniff(&mut stream).await?;
            return Ok(Handshaken::Plain(stream, first));
        };
        let mut record = [0; 1];
        if stream.peek(&mut record).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Every TLS connection opens with a handshake record (content type 22).
        if record[0] != 0x16 {
            if self.protocol == Protocol::Http {
                let body = r#"{"message":"this port speaks TLS only: use https://"}"#;
                let refusal = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                     connection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(refusal.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "plain text on a TLS port",
            ));
        }
        let mut stream = tokio_rustls::TlsAcceptor::from(tls.config())
            .accept(stream)
            .await?;
        let (_, session) = stream.get_ref();
        let identity = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(tls::identity);
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let first = match alpn.as_deref() {
            Some(b"h2") => First {
                prefix: Bytes::new(),
                http2: true,
            },
            Some(b"http/1.1") => First {
                prefix: Bytes::new(),
                http2: false,
            },
            _ => sniff(&mut stream).await?,
        };
        Ok(Handshaken::Tls(Box::new(stream), first, identity))
    }

    /// Serves a started connection with hyper, HTTP/2 or HTTP/1, until it closes.
    async fn serve_io<T, S, B>(
        self: &Arc<Self>,
        io: T,
        first: First,
        identity: Option<PeerIdentity>,
        connection: &Arc<Connection>,
        service: S,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let First { prefix, http2 } = first;
        let io = TokioIo::new(Io::new(
            io,
            prefix,
            Arc::clone(self),
            Arc::clone(connection),
            !http2,
        ));
        let service = ConnectionService {
            service,
            port: Arc::clone(self),
            connection: Arc::clone(connection),
            identity,
        };
        if http2 {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(self.timeouts.keepalive_interval)
                .keep_alive_timeout(self.timeouts.keepalive_timeout)
                .max_concurrent_streams(self.limits.max_concurrent_streams)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_send_buf_size(SEND_BUFFER)
                // A Date header on every response is for HTTP caches (RFC 9110 asks origin
                // servers for one); gRPC has no use for it, and it is a header to format and
                // encode on every call.
                .auto_date_header(self.protocol == Protocol::Http);
            // Boxed: a connection that never gets this far costs its task only a few bytes.
            let conn = Box::pin(builder.serve_connection(io, service));
            self.watch(
                conn,
                |conn| conn.get_mut().as_mut().graceful_shutdown(),
                connection,
                false,
            )
            .await;
        } else if self.protocol == Protocol::Http {
            let mut builder = http1::Builder::new();
            // The watchdog times headers from their first byte, not from the previous response.
            builder.header_read_timeout(None);
            let conn = Box::pin(builder.serve_connection(io, service));
            self.watch(
                conn,
                |conn| conn.get_mut().as_mut().graceful_shutdown(),
                connection,
                true,
            )
            .await;
        } else {
            tracing::debug!("HTTP/1 on the gRPC port: connection closed");
        }
    }

    /// Drives a connection, closing it when the watchdog or the cap say so, and gracefully on
    /// shutdown.
    async fn watch<C>(
        &self,
        conn: C,
        graceful_shutdown: impl Fn(Pin<&mut C>),
        connection: &Connection,
        http1: bool,
    ) where
        C: Future<Output = hyper::Result<()>>,
    {
        let mut conn = std::pin::pin!(conn);
        let mut draining = false;
        // Once asked to close: when to drop it if it has not closed by itself (an HTTP/2 client
        // must acknowledge the GOAWAY's PING first, which a silent one never does).
        let mut drop_at: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            let idle = self.slot(connection).in_flight.load(Ordering::Acquire) == 0;
            if draining && idle && drop_at.is_none() {
                drop_at = Some(now + CLOSE_GRACE);
            }
            let next = match self.verdict(connection, http1) {
                Verdict::Keep(at) => self.instant(at),
                Verdict::SlowHeaders => {
                    tracing::debug!(
                        port = self.protocol.name(),
                        "request headers not received within the header-read timeout: connection closed"
                    );
                    return;
                }
                Verdict::Idle => {
                    if drop_at.is_none() {
                        tracing::debug!(port = self.protocol.name(), "idle connection closed");
                        graceful_shutdown(conn.as_mut());
                        drop_at = Some(now + CLOSE_GRACE);
                    }
                    now + CLOSE_GRACE
                }
            };
            let mut wake = drop_at.map_or(next, |at| at.min(next));
            if draining {
                // Its last request may end any moment.
                wake = wake.min(now + DRAIN_RECHECK);
            }
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(port = self.protocol.name(), error = %err, "connection ended");
                    }
                    return;
                }
                () = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    graceful_shutdown(conn.as_mut());
                }
                () = connection.evict.cancelled() => {
                    // Another connection waits for this one's place: say goodbye (HTTP/2
                    // GOAWAY goes out on this poll) and go, without waiting for an answer.
                    graceful_shutdown(conn.as_mut());
                    std::future::poll_fn(|cx| {
                        let _ = conn.as_mut().poll(cx);
                        Poll::Ready(())
                    })
                    .await;
                    return;
                }
                () = tokio::time::sleep_until(wake) => {
                    if drop_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                        return;
                    }
                }
            }
        }
    }
}

/// Takes a connection off its port's list when its task ends, however it ends.
struct Registered<'a> {
    port: &'a Port,
    connection: &'a Connection,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.port.unregister(self.connection);
    }
}

/// A connection whose start was read: plain, or TLS with the client certificate's identity.
enum Handshaken {
    Plain(TcpStream, First),
    Tls(
        Box<tokio_rustls::server::TlsStream<TcpStream>>,
        First,
        Option<PeerIdentity>,
    ),
}

/// What a connection's first bytes said.
struct First {
    /// The bytes read to tell, to be read again by hyper.
    prefix: Bytes,
    /// Whether it speaks HTTP/2.
    http2: bool,
}

/// Reads a connection's first bytes to tell HTTP/2 (its preface) from HTTP/1, as hyper-util's
/// automatic builder does.
async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<First> {
    let mut first = [0; H2_PREFACE.len()];
    let mut read = 0;
    while read < first.len() {
        let n = io.read(&mut first[read..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        read += n;
        if first[..read] != H2_PREFACE[..read] {
            return Ok(First {
                prefix: Bytes::copy_from_slice(&first[..read]),
                http2: false,
            });
        }
    }
    Ok(First {
        prefix: Bytes::copy_from_slice(&first),
        http2: true,
    })
}

/// A connection's bytes: those the sniffing read first, then the socket's. On HTTP/1 it notes
/// when a request starts arriving while none is in flight, for the header-read timeout.
struct Io<T> {
    inner: T,
    prefix: Bytes,
    port: Arc<Port>,
    connection: Arc<Connection>,
    http1: bool,
}

impl<T> Io<T> {
    fn new(
        inner: T,
        prefix: Bytes,
        port: Arc<Port>,
        connection: Arc<Connection>,
        http1: bool,
    ) -> Self {
        let io = Self {
            inner,
            prefix,
            port,
            connection,
            http1,
        };
        if io.http1 {
            io.request_bytes_arrived();
        }
        io
    }

    fn request_bytes_arrived(&self) {
        if self
            .port
            .slot(&self.connection)
            .in_flight
            .load(Ordering::Acquire)
            == 0
        {
            let _ = self.connection.reading_since.compare_exchange(
                0,
                self.port.now(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.http1 && buf.filled().len() > before {
            this.request_bytes_arrived();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A request in flight on a connection, from its headers until its response was sent whole
/// (or abandoned): the connection is not idle meanwhile.
struct InFlight {
    port: Arc<Port>,
    connection: Arc<Connection>,
}

impl InFlight {
    fn start(port: &Arc<Port>, connection: &Arc<Connection>) -> Self {
        let slot = port.slot(connection);
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        connection.reading_since.store(0, Ordering::Release);
        slot.last_active.store(port.now(), Ordering::Release);
        Self {
            port: Arc::clone(port),
            connection: Arc::clone(connection),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let slot = self.port.slot(&self.connection);
        slot.last_active.store(self.port.now(), Ordering::Release);
        slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The service hyper calls for each request of one connection: marks the request in flight,
/// gives it the connection's [`StreamSlots`], bounds its body and its answer in time.
struct ConnectionService<S> {
    service: S,
    port: Arc<Port>,
    connection: Arc<Connection>,
    identity: Option<PeerIdentity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnectionService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.port, &self.connection);
        request
            .extensions_mut()
            .insert(self.connection.streams.clone());
        if let Some(identity) = &self.identity {
            request.extensions_mut().insert(identity.clone());
        }
        let (protocol, timeouts) = (self.port.protocol, self.port.timeouts);
        let request = request.map(|body| RequestBody::new(body, protocol, timeouts.body_read));
        let mut service = self.service.clone();
        let respond = async move {
            std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(request).await
        };
        Box::pin(async move {
            let response = match tokio::time::timeout(timeouts.request, respond).await {
                Ok(Ok(response)) => response.map(|body| ResponseBody {
                    kind: Kind::Service(body),
                    _in_flight: in_flight,
                }),
                Ok(Err(never)) => match never {},
                Err(_) => protocol
                    .deadline_exceeded(timeouts.request)
                    .map(|body| ResponseBody {
                        kind: Kind::Full(body),
                        _in_flight: in_flight,
                    }),
            };
            Ok(response)
        })
    }
}

/// A request's body, failed if it has not arrived whole within the body-read timeout.
pub struct RequestBody {
    inner: Incoming,
    /// When the body must have arrived whole; `None` once it has.
    deadline: Option<tokio::time::Instant>,
    /// The timer of `deadline`, armed only when the body is not there when first asked for: a
    /// gRPC or JSON body usually arrives with its headers, and most requests need no timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    protocol: Protocol,
    timeout: Duration,
}

impl RequestBody {
    fn new(inner: Incoming, protocol: Protocol, timeout: Duration) -> Self {
        let deadline = (!inner.is_end_stream()).then(|| tokio::time::Instant::now() + timeout);
        Self {
            inner,
            deadline,
            timer: None,
            protocol,
            timeout,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.deadline = None;
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {
                let Some(deadline) = this.deadline else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.deadline = None;
                this.timer = None;
                Poll::Ready(Some(Err(this.protocol.body_timeout(this.timeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response's body, holding its request in flight until it is sent whole or dropped.
pub struct ResponseBody<B> {
    kind: Kind<B>,
    _in_flight: InFlight,
}

enum Kind<B> {
    /// The service's answer.
    Service(B),
    /// The transport's own (a refusal), sent in one frame.
    Full(Option<Bytes>),
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Service(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Service(body) => body.is_end_stream(),
            Kind::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Service(body) => body.size_hint(),
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// A failed accept that concerns one connection only (the client gave up meanwhile).
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// EMFILE (the process's descriptors) or ENFILE (the system's): the same numbers on Linux and
/// the BSDs.
fn is_out_of_descriptors(err: &io::Error) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(err.raw_os_error(), Some(ENFILE | EMFILE))
}

/// Listens on `address` with an accept queue of [`BACKLOG`].
pub fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

/// Descriptors a port capped at `max_connections` may hold: the cap, and evicted connections
/// still closing after a new one took their place.
pub fn descriptors_at_cap(max_connections: usize) -> usize {
    max_connections + MAX_CLOSING
}

/// The process's soft limit of open files, where the system tells it (Linux).
pub fn descriptor_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

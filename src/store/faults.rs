//! A loopback TCP proxy that injects network faults between the Redis store and one server.
//!
//! [`FaultProxy`] listens on 127.0.0.1 and relays every connection it accepts to one upstream
//! port. [`FaultProxy::set`] degrades the link as a network would — delay, silence, refusal —
//! and [`FaultProxy::cut`] resets every connection it carries. Each direction of a connection
//! is a reader that stamps every chunk it reads with the time it is due and a writer that
//! delivers chunks in order when they are due, so latency delays a pipeline without slowing it
//! down, and a blackhole holds bytes instead of losing them (losing some would desynchronise the
//! RESP protocol, which TCP never does). Servers that must be reached through a proxy announce
//! its port ([`SentinelSet::start_proxied`], [`RedisCluster::start_proxied`]).
//!
//! [`SentinelSet::start_proxied`]: super::servers::SentinelSet::start_proxied
//! [`RedisCluster::start_proxied`]: super::servers::RedisCluster::start_proxied

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The most bytes one read takes from a socket (one chunk).
const CHUNK_BYTES: usize = 16 * 1024;
/// How many chunks one direction of a connection holds before it stops reading (then TCP's own
/// flow control holds the rest in the sender's buffers).
const CHUNKS_IN_FLIGHT: usize = 4096;
/// How long the accept loop waits after a failed accept (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// What the link through a [`FaultProxy`] does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Bytes pass both ways at once.
    None,
    /// Every chunk is delivered this long after it was read, in each direction, in order; a
    /// pipeline is delayed once, not once per chunk.
    Latency(Duration),
    /// Nothing is delivered either way, nothing is refused: connections stay open and new ones
    /// are accepted but only reach the server once the fault clears. Bytes are held, and are
    /// delivered in order when it clears, as TCP retransmits after a partition heals.
    Blackhole,
    /// The host refuses connections: every current connection is reset, and new ones are
    /// accepted and reset at once, until the fault clears.
    Down,
}

/// A fault-injecting TCP proxy in front of one server; see the module documentation. Dropping
/// it stops accepting and resets every connection it carries.
#[derive(Debug)]
pub(crate) struct FaultProxy {
    port: u16,
    upstream: u16,
    shared: Arc<Shared>,
}

/// What the proxy handle, its accept loop and its connections share.
#[derive(Debug)]
struct Shared {
    /// The current fault; every connection watches it.
    fault: watch::Sender<Fault>,
    /// The token of every connection accepted since the last cut: cancelling it resets them all.
    /// Replaced by a fresh one at each cut, under the same lock as the fault changes, so a
    /// connection is never accepted past a `Down` unseen.
    current: Mutex<CancellationToken>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Cancelled when the proxy is dropped; parent of every connection's token.
    stopped: CancellationToken,
}

impl Shared {
    /// Resets every connection accepted so far (`current` held locked by the caller).
    fn cut_locked(&self, current: &mut CancellationToken) {
        current.cancel();
        *current = self.stopped.child_token();
    }
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards every accepted connection to
    /// 127.0.0.1:`upstream`.
    pub(crate) async fn start(upstream: u16) -> FaultProxy {
        Self::start_on(0, upstream).await
    }

    /// Like [`start`](Self::start), on 127.0.0.1:`port`; panics if that port is taken.
    pub(crate) async fn start_on(port: u16, upstream: u16) -> FaultProxy {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|error| {
            panic!("fault proxy: cannot listen on 127.0.0.1:{port}: {error}")
        });
        Self::start_with(listener, upstream).await
    }

    /// Like [`start`](Self::start), on a listener bound already: its port can be given to a
    /// server (to announce) before the server, and so the upstream port, exists — with no
    /// window for another process to take it.
    pub(crate) async fn start_with(listener: std::net::TcpListener, upstream: u16) -> FaultProxy {
        let port = listener
            .local_addr()
            .expect("fault proxy: local address of a bound listener")
            .port();
        listener
            .set_nonblocking(true)
            .expect("fault proxy: make the listener non-blocking");
        let listener = TcpListener::from_std(listener)
            .expect("fault proxy: register the listener with the tokio runtime");
        let stopped = CancellationToken::new();
        let shared = Arc::new(Shared {
            fault: watch::Sender::new(Fault::None),
            current: Mutex::new(stopped.child_token()),
            accepted: AtomicUsize::new(0),
            stopped,
        });
        tokio::spawn(accept(listener, upstream, Arc::clone(&shared)));
        FaultProxy {
            port,
            upstream,
            shared,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The port it forwards to (127.0.0.1).
    pub(crate) fn upstream(&self) -> u16 {
        self.upstream
    }

    /// `redis://127.0.0.1:PORT`, its own port.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Applies `fault` at once, to current and new connections alike.
    ///
    /// Chunks keep the due time they were stamped with when read: clearing a latency delivers
    /// what is queued on its schedule (bytes read afterwards wait behind it, to keep the order),
    /// clearing a blackhole delivers what it held at once.
    pub(crate) fn set(&self, fault: Fault) {
        let mut current = self.lock_current();
        self.shared.fault.send_replace(fault);
        if fault == Fault::Down {
            self.shared.cut_locked(&mut current);
        }
    }

    /// The fault in force.
    pub(crate) fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Resets every current connection, on both sides (RST, not FIN: an abrupt loss, not a
    /// goodbye); later connections are carried as usual.
    pub(crate) fn cut(&self) {
        let mut current = self.lock_current();
        self.shared.cut_locked(&mut current);
    }

    /// How many connections it has accepted so far (including those reset at once by `Down`).
    pub(crate) fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, CancellationToken> {
        // The lock guards no invariant a panic could break: a token is always valid.
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopped.cancel();
    }
}

/// Closes `stream` with a reset (`SO_LINGER` 0), as a crashed host or a broken path would.
fn reset(stream: TcpStream) {
    // Deprecated because a non-zero linger blocks the thread on drop; zero never blocks.
    // (`set_zero_linger` would need tokio 1.50, above what Cargo.toml asks for.)
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Accepts connections until the proxy is dropped, and carries each on its own task.
async fn accept(listener: TcpListener, upstream: u16, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.stopped.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let token = {
            let current = shared
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (*shared.fault.borrow() != Fault::Down).then(|| current.child_token())
        };
        match token {
            Some(token) => {
                tokio::spawn(carry(client, upstream, shared.fault.subscribe(), token));
            }
            None => reset(client),
        }
    }
}

/// Carries one client connection to the upstream server until both sides have closed it, or
/// resets both sides when `token` is cancelled (cut, `Down`, proxy dropped) or either side
/// fails.
async fn carry(
    mut client: TcpStream,
    upstream: u16,
    faults: watch::Receiver<Fault>,
    token: CancellationToken,
) {
    let connected = tokio::select! {
        () = token.cancelled() => None,
        upstream = connect(upstream, faults.clone()) => upstream,
    };
    let Some(mut server) = connected else {
        // The upstream refuses connections (a stopped server): so does the proxy, abruptly.
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    let carried = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::select! {
            () = token.cancelled() => Err(io::ErrorKind::ConnectionAborted.into()),
            carried = async {
                tokio::try_join!(
                    relay(&mut client_read, &mut server_write, faults.clone()),
                    relay(&mut server_read, &mut client_write, faults),
                )
            } => carried,
        }
    };
    if carried.is_err() {
        reset(client);
        reset(server);
    }
}

/// Connects to 127.0.0.1:`upstream` once the link is not blackholed; `None` if it refuses.
async fn connect(upstream: u16, mut faults: watch::Receiver<Fault>) -> Option<TcpStream> {
    while *faults.borrow_and_update() == Fault::Blackhole {
        faults.changed().await.ok()?;
    }
    TcpStream::connect(("127.0.0.1", upstream)).await.ok()
}

/// Bytes read from one side, due for delivery to the other at `due`; no bytes: end of stream.
struct Chunk {
    due: Instant,
    bytes: Option<Bytes>,
}

/// One direction of a connection: reads `from` and delivers to `to`, as the fault allows.
/// `Ok` once the end of `from`'s stream has been passed on; `Err` if either side failed.
async fn relay(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    faults: watch::Receiver<Fault>,
) -> io::Result<()> {
    let (chunks, queue) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::try_join!(
        read_chunks(from, chunks, faults.clone()),
        deliver(to, queue, faults),
    )?;
    Ok(())
}

/// Reads `from` until its end, stamping each chunk with its due time under the fault in force.
async fn read_chunks(
    from: &mut ReadHalf<'_>,
    chunks: mpsc::Sender<Chunk>,
    faults: watch::Receiver<Fault>,
) -> io::Result<()> {
    let mut buffer = vec![0_u8; CHUNK_BYTES];
    loop {
        let n = read(from, &mut buffer).await?;
        let delay = match *faults.borrow() {
            Fault::Latency(delay) => delay,
            Fault::None | Fault::Blackhole | Fault::Down => Duration::ZERO,
        };
        let chunk = Chunk {
            due: Instant::now() + delay,
            bytes: (n > 0).then(|| Bytes::copy_from_slice(&buffer[..n])),
        };
        // A closed queue means the delivering side failed, and reports why.
        if chunks.send(chunk).await.is_err() || n == 0 {
            return Ok(());
        }
    }
}

/// Delivers queued chunks to `to` in order, each once it is due and the link is not
/// blackholed; passes the end of the stream on as a half-close (FIN).
async fn deliver(
    to: &mut WriteHalf<'_>,
    mut queue: mpsc::Receiver<Chunk>,
    mut faults: watch::Receiver<Fault>,
) -> io::Result<()> {
    let gone = || io::Error::from(io::ErrorKind::ConnectionAborted);
    while let Some(chunk) = queue.recv().await {
        // Held while the link is blackholed, and again if it is blackholed before it is due.
        loop {
            if *faults.borrow_and_update() == Fault::Blackhole {
                faults.changed().await.map_err(|_| gone())?;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep_until(chunk.due) => break,
                changed = faults.changed() => changed.map_err(|_| gone())?,
            }
        }
        match chunk.bytes {
            Some(bytes) => write_all(to, &bytes).await?,
            None => {
                poll_fn(|cx| Pin::new(&mut *to).poll_shutdown(cx)).await?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Reads what is available into `buffer` (0: end of stream).
async fn read(from: &mut ReadHalf<'_>, buffer: &mut [u8]) -> io::Result<usize> {
    let mut buffer = ReadBuf::new(buffer);
    poll_fn(|cx| Pin::new(&mut *from).poll_read(cx, &mut buffer)).await?;
    Ok(buffer.filled().len())
}

/// Writes all of `bytes` to `to`.
async fn write_all(to: &mut WriteHalf<'_>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *to).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::servers::{RedisServer, redis_cli};

    /// How long a test waits for an answer that should come.
    const ANSWER: Duration = Duration::from_secs(2);

    /// A raw RESP connection to 127.0.0.1:`port`.
    async fn connect_to(port: u16) -> TcpStream {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|error| panic!("connect to 127.0.0.1:{port}: {error}"))
    }

    async fn send(stream: &TcpStream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            stream.writable().await.expect("writable");
            match stream.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("write: {error}"),
            }
        }
    }

    /// What a connection yields when a test reads from it.
    #[derive(Debug, PartialEq, Eq)]
    enum Read {
        /// Exactly the bytes expected.
        Bytes(Vec<u8>),
        /// The connection ended (end of stream or reset) first.
        Closed,
        /// Not all the bytes came within the time allowed (what came is kept).
        Timeout(Vec<u8>),
    }

    /// Reads until `len` bytes came, the connection ended, or `within` passed.
    async fn receive(stream: &TcpStream, len: usize, within: Duration) -> Read {
        let mut received = Vec::new();
        let reading = async {
            while received.len() < len {
                if stream.readable().await.is_err() {
                    return false;
                }
                let mut chunk = [0_u8; 4096];
                match stream.try_read(&mut chunk) {
                    Ok(0) => return false,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return false,
                }
            }
            true
        };
        match tokio::time::timeout(within, reading).await {
            Ok(true) => Read::Bytes(received),
            Ok(false) => Read::Closed,
            Err(_) => Read::Timeout(received),
        }
    }

    /// Sends PING on `stream` and expects `+PONG` within `within`.
    async fn ping(stream: &TcpStream, within: Duration) -> Read {
        send(stream, b"PING\r\n").await;
        receive(stream, 7, within).await
    }

    fn pong() -> Read {
        Read::Bytes(b"+PONG\r\n".to_vec())
    }

    #[tokio::test]
    async fn ping_passes_through_and_connections_are_counted() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        assert_eq!(proxy.url(), format!("redis://127.0.0.1:{}", proxy.port()));
        assert_eq!(proxy.upstream(), server.port());
        assert_eq!(proxy.fault(), Fault::None);
        assert_eq!(
            redis_cli(proxy.port(), &["PING"]).await.as_deref(),
            Ok("PONG\n")
        );
        let stream = connect_to(proxy.port()).await;
        assert_eq!(ping(&stream, ANSWER).await, pong());
        assert_eq!(ping(&stream, ANSWER).await, pong());
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn latency_delays_each_direction_but_not_a_pipeline_per_request() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let stream = connect_to(proxy.port()).await;
        assert_eq!(ping(&stream, ANSWER).await, pong());
        let delay = Duration::from_millis(150);
        proxy.set(Fault::Latency(delay));

        let sent = Instant::now();
        assert_eq!(ping(&stream, ANSWER).await, pong());
        let round_trip = sent.elapsed();
        assert!(round_trip >= 2 * delay, "round trip {round_trip:?}");

        // 50 requests written one by one (so read as separate chunks): served in about one
        // round trip, where delivering one chunk per delay would take 50 of them.
        let sent = Instant::now();
        for _ in 0..50 {
            send(&stream, b"PING\r\n").await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(matches!(
            receive(&stream, 50 * 7, ANSWER).await,
            Read::Bytes(_)
        ));
        let pipeline = sent.elapsed();
        assert!(
            pipeline >= 2 * delay && pipeline < 2 * delay + Duration::from_millis(600),
            "50 pipelined PINGs took {pipeline:?}"
        );

        proxy.set(Fault::None);
        let sent = Instant::now();
        assert_eq!(ping(&stream, ANSWER).await, pong());
        assert!(sent.elapsed() < delay, "PING took {:?}", sent.elapsed());
    }

    #[tokio::test]
    async fn blackhole_holds_requests_and_answers_until_it_clears() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let open = connect_to(proxy.port()).await;
        assert_eq!(ping(&open, ANSWER).await, pong());

        proxy.set(Fault::Blackhole);
        send(&open, b"INCR held\r\n").await;
        // A connection opened during the blackhole is accepted, and answered by nobody.
        let late = connect_to(proxy.port()).await;
        assert_eq!(
            ping(&late, Duration::from_millis(300)).await,
            Read::Timeout(Vec::new())
        );
        assert_eq!(
            receive(&open, 4, Duration::from_millis(300)).await,
            Read::Timeout(Vec::new())
        );
        // The request never reached the server: held, not delivered (nor lost, see below).
        assert_eq!(
            redis_cli(server.port(), &["EXISTS", "held"])
                .await
                .as_deref(),
            Ok("0\n")
        );

        proxy.set(Fault::None);
        assert_eq!(
            receive(&open, 4, ANSWER).await,
            Read::Bytes(b":1\r\n".to_vec())
        );
        assert_eq!(receive(&late, 7, ANSWER).await, pong());
        assert_eq!(ping(&late, ANSWER).await, pong());
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn blackhole_holds_answers_already_on_their_way() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let stream = connect_to(proxy.port()).await;
        // The request reaches the server after 200 ms and its answer is due 200 ms later; the
        // blackhole starts in between, so the answer is held on its way back.
        proxy.set(Fault::Latency(Duration::from_millis(200)));
        send(&stream, b"INCR n\r\n").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set(Fault::Blackhole);
        assert_eq!(
            redis_cli(server.port(), &["GET", "n"]).await.as_deref(),
            Ok("1\n")
        );
        assert_eq!(
            receive(&stream, 4, Duration::from_millis(300)).await,
            Read::Timeout(Vec::new())
        );
        proxy.set(Fault::None);
        assert_eq!(
            receive(&stream, 4, ANSWER).await,
            Read::Bytes(b":1\r\n".to_vec())
        );
    }

    #[tokio::test]
    async fn down_resets_connections_and_refuses_new_ones_until_cleared() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let open = connect_to(proxy.port()).await;
        assert_eq!(ping(&open, ANSWER).await, pong());

        proxy.set(Fault::Down);
        assert_eq!(receive(&open, 1, ANSWER).await, Read::Closed);
        let refused = connect_to(proxy.port()).await;
        assert_eq!(receive(&refused, 1, ANSWER).await, Read::Closed);
        assert!(redis_cli(proxy.port(), &["PING"]).await.is_err());

        proxy.set(Fault::None);
        let again = connect_to(proxy.port()).await;
        assert_eq!(ping(&again, ANSWER).await, pong());
    }

    #[tokio::test]
    async fn cut_resets_open_connections_and_later_ones_work() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let first = connect_to(proxy.port()).await;
        let second = connect_to(proxy.port()).await;
        assert_eq!(ping(&first, ANSWER).await, pong());
        assert_eq!(ping(&second, ANSWER).await, pong());
        let clients = || async {
            let list = redis_cli(server.port(), &["CLIENT", "LIST"])
                .await
                .expect("CLIENT LIST");
            list.lines().count()
        };
        // The two proxied connections and CLIENT LIST's own.
        assert_eq!(clients().await, 3);

        proxy.cut();
        assert_eq!(receive(&first, 1, ANSWER).await, Read::Closed);
        assert_eq!(receive(&second, 1, ANSWER).await, Read::Closed);
        let deadline = Instant::now() + ANSWER;
        // The server side is reset too: the server forgets both clients.
        while clients().await != 1 {
            assert!(
                Instant::now() < deadline,
                "the server still has the cut clients"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let third = connect_to(proxy.port()).await;
        assert_eq!(ping(&third, ANSWER).await, pong());
        assert_eq!(proxy.connections(), 3);
    }

    #[tokio::test]
    async fn a_stopped_upstream_resets_proxied_connections() {
        let mut server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let open = connect_to(proxy.port()).await;
        assert_eq!(ping(&open, ANSWER).await, pong());
        server.stop().await;
        assert_eq!(receive(&open, 1, ANSWER).await, Read::Closed);
        let refused = connect_to(proxy.port()).await;
        assert_eq!(receive(&refused, 1, ANSWER).await, Read::Closed);
        server.restart().await;
        assert_eq!(ping(&connect_to(proxy.port()).await, ANSWER).await, pong());
    }

    #[tokio::test]
    async fn hundreds_of_pipelining_connections_are_carried() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let port = proxy.port();
        let answered = futures::future::join_all((0..300).map(|_| async move {
            let stream = connect_to(port).await;
            send(&stream, &b"PING\r\n".repeat(20)).await;
            receive(&stream, 20 * 7, ANSWER).await == Read::Bytes(b"+PONG\r\n".repeat(20))
        }))
        .await;
        assert!(answered.iter().all(|&ok| ok));
        assert_eq!(proxy.connections(), 300);

        // A large value crosses in many chunks, intact, both ways.
        let value = "v".repeat(1_000_000);
        let stream = connect_to(port).await;
        let request = format!(
            "*3\r\n$3\r\nSET\r\n$5\r\nlarge\r\n${}\r\n{value}\r\n",
            value.len()
        );
        send(&stream, request.as_bytes()).await;
        assert_eq!(
            receive(&stream, 5, ANSWER).await,
            Read::Bytes(b"+OK\r\n".to_vec())
        );
        send(&stream, b"GET large\r\n").await;
        let reply = format!("${}\r\n{value}\r\n", value.len());
        assert_eq!(
            receive(&stream, reply.len(), ANSWER).await,
            Read::Bytes(reply.into_bytes())
        );
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections_and_its_port() {
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start(server.port()).await;
        let port = proxy.port();
        let open = connect_to(port).await;
        assert_eq!(ping(&open, ANSWER).await, pong());
        drop(proxy);
        assert_eq!(receive(&open, 1, ANSWER).await, Read::Closed);
        let deadline = Instant::now() + ANSWER;
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(Instant::now() < deadline, "the dropped proxy still accepts");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_proxy_can_listen_on_a_port_chosen_before_its_server_starts() {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let chosen = listener.local_addr().expect("address").port();
        drop(listener);
        let server = RedisServer::start().await;
        let proxy = FaultProxy::start_on(chosen, server.port()).await;
        assert_eq!(proxy.port(), chosen);
        assert_eq!(redis_cli(chosen, &["PING"]).await.as_deref(), Ok("PONG\n"));
    }
}

//! Real Redis servers for the Redis store's tests.
//!
//! Every server here is a genuine `redis-server` (or `redis-sentinel`) process from the machine's
//! Redis installation, listening on 127.0.0.1 on a port picked free for it, without persistence
//! unless asked for, in a private temporary directory that also holds its log. Dropping a handle
//! kills the process and removes the directory, so no server outlives its test, even one that
//! panics.
//!
//! * [`RedisServer`] — one standalone server that a test can crash ([`RedisServer::stop`]) and
//!   bring back on the same port ([`RedisServer::restart`]), empty or, if started
//!   [persistent](RedisServer::start_persistent), with every write it acknowledged;
//!   [`start_many`] starts independent ones (Redlock).
//! * [`SentinelSet`] — a master, its replica and three sentinels, ready to fail over.
//! * [`RedisCluster`] — a six-node cluster, three masters with one replica each.
//!
//! The `start_proxied` variants of the last two put each data server behind its own
//! [`FaultProxy`] and make it announce the proxy's port — to sentinels, replicas and cluster
//! peers — so the store's clients, which discover addresses from Sentinel or `CLUSTER SLOTS`,
//! reach every server only through a link a test can break. The harness itself talks to each
//! server on its own port, so a fault never gets in the way of setting up or checking a test.
//!
//! Raw commands go through `redis-cli`, so the harness depends on no Redis client crate. Missing
//! Redis programs make the tests panic with the way to install them: they never silently skip.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;

use super::faults::FaultProxy;

/// How far behind a replica may be (its last acknowledgement) for a master started with
/// `min-replicas-to-write 1` to accept writes.
const MIN_REPLICAS_MAX_LAG: Duration = Duration::from_secs(2);
/// How long a server may take to answer PING after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a [`SentinelSet`] may take to be ready to fail over.
const SENTINEL_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a [`RedisCluster`] may take to be created and report `cluster_state:ok` everywhere.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `redis-cli` call may take before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(5);
/// How often readiness conditions are polled.
const POLL: Duration = Duration::from_millis(50);
/// How many fresh ports to try when another process takes the one picked for a server.
const PORT_ATTEMPTS: usize = 8;
/// How much of a server's log a panic message shows (its end).
const LOG_TAIL: usize = 8_000;

const MASTER_NAME: &str = "mymaster";
const CLUSTER_SLOTS: usize = 16_384;

/// The absolute path of `program` on `PATH`; panics with how to install Redis if it is missing.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: run `bash scripts/test.sh` (it installs Debian's \
                 redis-server, redis-sentinel and redis-tools) or `apt-get install redis-server \
                 redis-sentinel redis-tools`"
            )
        })
}

/// `n` distinct loopback ports that were free a moment ago (all bound at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|listener| {
            listener
                .local_addr()
                .expect("local address of a bound listener")
                .port()
        })
        .collect()
}

/// A listener on a free loopback port, held so that no other process takes the port before a
/// [`FaultProxy`] is started on it (the servers behind proxies announce the port first).
fn reserve_port() -> TcpListener {
    TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0 to reserve a port for a proxy")
}

/// The port `listener` is bound to.
fn port_of(listener: &TcpListener) -> u16 {
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// A new, empty, private directory under the system's temporary directory.
fn private_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "election-agent-redis-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => panic!(
                "cannot create temporary directory {}: {error}",
                dir.display()
            ),
        }
    }
}

/// Kills `child` (SIGKILL) and reaps it; errors only mean it had already exited.
fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether a raw TCP connection to `port` answers `PING` with `+PONG` (within half a second).
async fn ping(port: u16) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = b"PING\r\n";
        let mut written = 0;
        while written < request.len() {
            stream.writable().await.ok()?;
            match stream.try_write(&request[written..]) {
                Ok(n) => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n") {
            stream.readable().await.ok()?;
            let mut chunk = [0_u8; 256];
            match stream.try_read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
        Some(reply.starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

/// Reads `pipe` to its end on a blocking thread.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> tokio::task::JoinHandle<String> {
    tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `redis-cli` with `args` (stdin closed) and returns its stdout, or why it failed:
/// a non-zero exit (with its output) or no exit within `timeout` (it is then killed).
async fn run_cli(args: &[String], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(program("redis-cli"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run redis-cli: {error}"))?;
    // Drained on blocking threads while the child runs, so a full pipe can never stall it.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                kill(child);
                break None;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(error) => {
                kill(child);
                return Err(format!("cannot wait for redis-cli: {error}"));
            }
        }
    };
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => Err(format!(
            "`redis-cli {}` failed ({status}): {} {}",
            args.join(" "),
            stdout.trim(),
            stderr.trim()
        )),
        None => Err(format!(
            "`redis-cli {}` did not finish within {timeout:?}",
            args.join(" ")
        )),
    }
}

/// Runs one command on the server at 127.0.0.1:`port` through `redis-cli` and returns its reply
/// in `redis-cli`'s raw format (one line per element; nested arrays flattened). An error reply, a
/// refused connection or a hang (5 s) is an `Err`.
pub(crate) async fn redis_cli(port: u16, command: &[&str]) -> Result<String, String> {
    let mut args: Vec<String> = ["-e", "-h", "127.0.0.1", "-p"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.push(port.to_string());
    args.extend(command.iter().map(ToString::to_string));
    let reply = run_cli(&args, CLI_TIMEOUT).await?;
    // Older redis-cli versions print an error reply on stdout and still exit 0.
    if reply.starts_with("ERR") || reply.starts_with("(error)") {
        return Err(format!(
            "`{}` on port {port}: {}",
            command.join(" "),
            reply.trim()
        ));
    }
    Ok(reply)
}

/// Disconnects every client of the server on `port` that is in pub/sub mode (`CLIENT KILL TYPE
/// pubsub`), as a server-side timeout or a proxy dropping idle connections would, and returns
/// how many there were.
pub(crate) async fn kill_pubsub_clients(port: u16) -> usize {
    let reply = redis_cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"])
        .await
        .unwrap_or_else(|why| panic!("CLIENT KILL TYPE pubsub on port {port} failed: {why}"));
    reply
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("unexpected CLIENT KILL reply {reply:?} on port {port}"))
}

/// The value of `field` in an INFO-style reply (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

/// The `key value key value ...` pairs of a flat map reply printed one element per line.
fn flat_pairs(reply: &str) -> Vec<(&str, &str)> {
    let lines: Vec<&str> = reply.lines().map(str::trim_end).collect();
    lines
        .chunks(2)
        .filter_map(|pair| match pair {
            [key, value] => Some((*key, *value)),
            _ => None,
        })
        .collect()
}

/// What a handle runs, beyond the settings every server shares.
#[derive(Debug, Clone)]
enum Kind {
    /// A standalone server, optionally replicating the server on `replica_of`.
    Standalone { replica_of: Option<u16> },
    /// A cluster node, with its cluster bus on `bus_port`.
    ClusterNode { bus_port: u16 },
    /// A sentinel monitoring the master on `master_port` as `mymaster`, quorum 2.
    Sentinel { master_port: u16 },
    /// A standalone server also serving TLS on `tls_port`, with certificates made for it
    /// ([`TlsFiles`]): clients must present one (Redis's default `tls-auth-clients yes`).
    Tls { tls_port: u16 },
}

/// The files of a [`Kind::Tls`] server, in its directory: a CA of its own, the server's
/// certificate for 127.0.0.1 and a client certificate, each signed by that CA.
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
}

/// How a data server is set up beyond its [`Kind`] (none of it applies to a sentinel).
#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    /// An append-only file fsynced at every write: a crash loses no write it acknowledged.
    persistent: bool,
    /// The port it tells replicas, sentinels and cluster peers to reach it on (its proxy's),
    /// instead of its own.
    announced_port: Option<u16>,
    /// `min-replicas-to-write 1`: it refuses writes while no replica has acknowledged the
    /// replication stream within [`MIN_REPLICAS_MAX_LAG`].
    min_replicas: bool,
}

/// Why a spawned server did not become ready.
enum StartError {
    /// Another process holds its port.
    PortTaken,
    /// It exited, or never answered, for another reason (described).
    Failed(String),
}

/// One Redis process (`redis-server` or `redis-sentinel`) on 127.0.0.1; see the module
/// documentation. Dropping it kills the process and removes its directory.
#[derive(Debug)]
pub(crate) struct RedisServer {
    port: u16,
    kind: Kind,
    settings: Settings,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server on a free port and waits until it answers PING.
    pub(crate) async fn start() -> RedisServer {
        Self::start_kind(
            |_| Kind::Standalone { replica_of: None },
            Settings::default(),
        )
        .await
    }

    /// Like [`start`](Self::start), with an append-only file fsynced at every write, so that
    /// [`stop`](Self::stop) (a crash) and [`restart`](Self::restart) keep every acknowledged write.
    pub(crate) async fn start_persistent() -> RedisServer {
        let settings = Settings {
            persistent: true,
            ..Settings::default()
        };
        Self::start_kind(|_| Kind::Standalone { replica_of: None }, settings).await
    }

    /// Starts a standalone server replicating the server at 127.0.0.1:`master_port`
    /// (`--replicaof`); returns once it answers PING, not once replication is up.
    pub(crate) async fn start_replica_of(master_port: u16) -> RedisServer {
        let kind = move |_| Kind::Standalone {
            replica_of: Some(master_port),
        };
        Self::start_kind(kind, Settings::default()).await
    }

    /// Starts a standalone server that serves TLS ([`tls_url`](Self::tls_url)) besides plain TCP
    /// (kept for the harness's own `redis-cli`).
    pub(crate) async fn start_tls() -> RedisServer {
        Self::start_kind(|tls_port| Kind::Tls { tls_port }, Settings::default()).await
    }

    /// `rediss://127.0.0.1:TLS_PORT` of a server [started with TLS](Self::start_tls).
    pub(crate) fn tls_url(&self) -> String {
        let Kind::Tls { tls_port } = self.kind else {
            panic!("not started with TLS")
        };
        format!("rediss://127.0.0.1:{tls_port}")
    }

    /// The certificate files of a server [started with TLS](Self::start_tls).
    pub(crate) fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.dir.join("ca.crt"),
            client_cert: self.dir.join("client.crt"),
            client_key: self.dir.join("client.key"),
        }
    }

    /// Makes the CA, the server's and a client's certificates in its directory.
    fn write_tls_files(&self) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "redis test CA");
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_certificate = ca.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, text: String| {
            fs::write(self.dir.join(name), text).expect("certificate files are written");
        };
        write("ca.crt", ca_certificate.pem());
        for (name, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                    .expect("certificate parameters");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![purpose];
            let key = KeyPair::generate().expect("a key");
            let certificate = params.signed_by(&key, &issuer).expect("a certificate");
            write(&format!("{name}.crt"), certificate.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
    }

    /// Starts a cluster node (empty, not yet part of any cluster).
    async fn start_cluster_node(settings: Settings) -> RedisServer {
        Self::start_kind(|bus_port| Kind::ClusterNode { bus_port }, settings).await
    }

    /// Starts a sentinel monitoring the master at 127.0.0.1:`master_port`.
    async fn start_sentinel(master_port: u16) -> RedisServer {
        Self::start_kind(move |_| Kind::Sentinel { master_port }, Settings::default()).await
    }

    /// Starts a process of the kind `kind` makes (given a spare free port, used for a cluster
    /// bus) with `settings` in a new private directory, retrying on fresh ports while another
    /// process takes them.
    async fn start_kind(kind: impl Fn(u16) -> Kind, settings: Settings) -> RedisServer {
        let dir = private_dir();
        let mut server = None::<RedisServer>;
        for _ in 0..PORT_ATTEMPTS {
            let ports = free_ports(2);
            let mut candidate = match server.take() {
                Some(mut previous) => {
                    previous.port = ports[0];
                    previous.kind = kind(ports[1]);
                    previous
                }
                None => RedisServer {
                    port: ports[0],
                    kind: kind(ports[1]),
                    settings,
                    dir: dir.clone(),
                    child: None,
                },
            };
            match candidate.launch(true).await {
                Ok(()) => return candidate,
                Err(StartError::PortTaken) => server = Some(candidate),
                Err(StartError::Failed(why)) => candidate.fail(&why),
            }
        }
        let server = server.expect("at least one attempt was made");
        server.fail(&format!(
            "another process took its port {PORT_ATTEMPTS} times in a row"
        ))
    }

    /// The port it listens on (127.0.0.1).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it tells others to reach it on: its proxy's if it sits behind one, else its own.
    pub(crate) fn announced_port(&self) -> u16 {
        self.settings.announced_port.unwrap_or(self.port)
    }

    /// Its private directory (config, log, cluster `nodes.conf`).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the process is meant to be running: started and not [stopped](Self::stop).
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process with SIGKILL (a crash: no shutdown, no goodbye to clients or peers) and
    /// waits for it to be gone. Does nothing if it is already stopped.
    pub(crate) async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
    }

    /// Starts the process again on the same port, in the same directory, with the same
    /// arguments (killing it first if it still runs), and waits until it answers PING.
    ///
    /// A standalone server comes back empty, unless it was started persistent; a cluster node
    /// keeps its identity (`nodes.conf`); a sentinel keeps the configuration it rewrote. A
    /// standalone server that still runs keeps the role it has now, as Sentinel's rewrite of its
    /// configuration would: a replica that was promoted comes back a master, not a replica of
    /// its old master.
    pub(crate) async fn restart(&mut self) {
        if let (Kind::Standalone { .. }, true) = (&self.kind, self.is_running())
            && let Ok(info) = redis_cli(self.port, &["INFO", "replication"]).await
        {
            let replica_of = match info_field(&info, "role") {
                Some("slave") => info_field(&info, "master_port").and_then(|p| p.parse().ok()),
                _ => None,
            };
            self.kind = Kind::Standalone { replica_of };
        }
        self.stop().await;
        match self.launch(false).await {
            Ok(()) => {}
            Err(StartError::PortTaken) => self.fail(&format!(
                "another process took port {} while it was stopped",
                self.port
            )),
            Err(StartError::Failed(why)) => self.fail(&why),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn sentinel_config_path(&self) -> PathBuf {
        self.dir.join("sentinel.conf")
    }

    /// Spawns the process (`fresh`: for the first time on this port) and waits until it answers
    /// PING, as itself.
    async fn launch(&mut self, fresh: bool) -> Result<(), StartError> {
        self.spawn(fresh);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait().ok().flatten() {
                self.child = None;
                return Err(self.exit_error(status));
            }
            if ping(self.port).await {
                // Make sure the answer came from this process, not from one that took the port.
                if self.answers_as_itself().await {
                    return Ok(());
                }
                self.stop().await;
                return Err(StartError::PortTaken);
            }
            if Instant::now() >= deadline {
                self.stop().await;
                return Err(StartError::Failed(format!(
                    "it did not answer PING on port {} within {START_TIMEOUT:?}",
                    self.port
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn(&mut self, fresh: bool) {
        let (program_name, args) = match &self.kind {
            Kind::Sentinel { master_port } => {
                // A fresh start writes the configuration; a restart keeps the sentinel's rewrite.
                let config = self.sentinel_config_path();
                if fresh {
                    self.write_sentinel_config(*master_port);
                }
                ("redis-sentinel", vec![config.display().to_string()])
            }
            Kind::Tls { .. } => {
                if fresh {
                    self.write_tls_files();
                }
                ("redis-server", self.server_args())
            }
            Kind::Standalone { .. } | Kind::ClusterNode { .. } => {
                ("redis-server", self.server_args())
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|error| panic!("cannot open {}: {error}", self.log_path().display()));
        let log_err = log.try_clone().expect("duplicate the log file handle");
        let child = Command::new(program(program_name))
            .args(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {program_name}: {error}"));
        self.child = Some(child);
    }

    fn server_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            // Full syncs start at once (the default waits 5 s for more replicas to join).
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            &self.dir.display().to_string(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let mut set = |name: &str, value: &str| args.extend([format!("--{name}"), value.into()]);
        if self.settings.persistent {
            // Every write is on disk before it is acknowledged: SIGKILL loses none of them.
            set("appendonly", "yes");
            set("appendfsync", "always");
        } else {
            set("appendonly", "no");
        }
        if self.settings.min_replicas {
            set("min-replicas-to-write", "1");
            set(
                "min-replicas-max-lag",
                &MIN_REPLICAS_MAX_LAG.as_secs().to_string(),
            );
        }
        match (&self.kind, self.settings.announced_port) {
            (Kind::ClusterNode { bus_port }, Some(announced)) => {
                // Clients and replicas are told the proxy's port; the cluster bus (gossip,
                // failure detection, votes) stays direct.
                set("cluster-announce-ip", "127.0.0.1");
                set("cluster-announce-port", &announced.to_string());
                set("cluster-announce-bus-port", &bus_port.to_string());
            }
            (Kind::Standalone { .. }, Some(announced)) => {
                // What its master's INFO, and so the sentinels, list it as once it replicates.
                set("replica-announce-ip", "127.0.0.1");
                set("replica-announce-port", &announced.to_string());
            }
            (_, _) => {}
        }
        match &self.kind {
            Kind::Standalone {
                replica_of: Some(master),
            } => {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
            }
            Kind::ClusterNode { bus_port } => {
                // An explicit bus port: the default (port + 10000) may be taken or above 65535.
                args.extend(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-port",
                        &bus_port.to_string(),
                    ]
                    .iter()
                    .map(ToString::to_string),
                );
            }
            Kind::Tls { tls_port } => {
                let file = |name: &str| self.dir.join(name).display().to_string();
                args.extend([
                    "--tls-port".into(),
                    tls_port.to_string(),
                    "--tls-cert-file".into(),
                    file("server.crt"),
                    "--tls-key-file".into(),
                    file("server.key"),
                    "--tls-ca-cert-file".into(),
                    file("ca.crt"),
                ]);
            }
            Kind::Standalone { replica_of: None } | Kind::Sentinel { .. } => {}
        }
        args
    }

    fn write_sentinel_config(&self, master_port: u16) {
        let config = format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             protected-mode no\n\
             daemonize no\n\
             dir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            port = self.port,
            dir = self.dir.display(),
        );
        let path = self.sentinel_config_path();
        fs::write(&path, config)
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
    }

    /// Whether the server on its port is this process (its INFO `process_id`).
    async fn answers_as_itself(&self) -> bool {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return false;
        };
        match redis_cli(self.port, &["INFO", "server"]).await {
            Ok(info) => info_field(&info, "process_id") == Some(pid.to_string().as_str()),
            Err(_) => false,
        }
    }

    fn exit_error(&self, status: ExitStatus) -> StartError {
        let log = self.log();
        if log.contains("Address already in use") {
            StartError::PortTaken
        } else {
            StartError::Failed(format!("it exited ({status}) during start-up"))
        }
    }

    /// The end of its log.
    fn log(&self) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(LOG_TAIL);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// Panics with `why` and the end of its log (the handle is dropped: process killed).
    fn fail(&self, why: &str) -> ! {
        panic!(
            "{} ({:?}) on port {} failed to start: {why}\n--- {} ---\n{}",
            match self.kind {
                Kind::Sentinel { .. } => "redis-sentinel",
                _ => "redis-server",
            },
            self.kind,
            self.port,
            self.log_path().display(),
            self.log()
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts `n` independent standalone servers (for Redlock), in parallel.
pub(crate) async fn start_many(n: usize) -> Vec<RedisServer> {
    join_all((0..n).map(|_| RedisServer::start())).await
}

/// Polls `check` every [`POLL`] until it returns `Ok`, or panics after `timeout` with `what` and
/// the last reason `check` gave.
async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if Instant::now() >= deadline => {
                panic!("{what}: not done within {timeout:?}; last seen: {why}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// A master, one replica and three sentinels (quorum 2, down after 1 s), ready to fail over.
///
/// [`master`](Self::master) and [`replica`](Self::replica) are the servers *started* as master
/// and replica; after a failover their roles are swapped, not the handles.
///
/// Started [proxied](Self::start_proxied), each data server sits behind its own [`FaultProxy`]
/// and is known to the sentinels, to its peer and to clients only by its proxy's port.
#[derive(Debug)]
pub(crate) struct SentinelSet {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
    /// The proxies in front of the master and the replica, if started proxied.
    proxies: Option<(FaultProxy, FaultProxy)>,
    /// The master port (as announced) the sentinels last agreed on (at start or the last
    /// failover awaited).
    known_master: AtomicU16,
}

impl SentinelSet {
    /// Starts the set and waits (20 s at most) until a failover can happen: the replica is in
    /// sync, and every sentinel knows the master, the replica and the two other sentinels.
    pub(crate) async fn start() -> SentinelSet {
        Self::launch(false, false).await
    }

    /// Like [`start`](Self::start), with the master and the replica each behind a
    /// [`FaultProxy`] ([`master_proxy`](Self::master_proxy),
    /// [`replica_proxy`](Self::replica_proxy)): the sentinels monitor the master through its
    /// proxy, the replica replicates through it, and each server announces its proxy's port, so
    /// the sentinels report a proxy's port before and after a failover.
    ///
    /// Both servers run with `min-replicas-to-write 1` (lag 2 s): a master without a replica
    /// in sync — one cut off from it, or a replica just promoted until the old master rejoins
    /// as its replica — refuses writes (`NOREPLICAS`) rather than accept writes a failover
    /// would lose.
    pub(crate) async fn start_proxied() -> SentinelSet {
        Self::launch(true, false).await
    }

    /// Like [`start_proxied`](Self::start_proxied), with both servers
    /// [persistent](RedisServer::start_persistent).
    pub(crate) async fn start_proxied_persistent() -> SentinelSet {
        Self::launch(true, true).await
    }

    async fn launch(proxied: bool, persistent: bool) -> SentinelSet {
        let started = Instant::now();
        // The proxies' ports come first: each server is started announcing its proxy's.
        let listeners = proxied.then(|| (reserve_port(), reserve_port()));
        let settings = |announced_port: Option<u16>| Settings {
            persistent,
            announced_port,
            min_replicas: proxied,
        };
        let master = match &listeners {
            None => RedisServer::start().await,
            Some((master, _)) => {
                let kind = |_| Kind::Standalone { replica_of: None };
                RedisServer::start_kind(kind, settings(Some(port_of(master)))).await
            }
        };
        // Where the sentinels and the replica reach the master.
        let master_port = master.announced_port();
        let replica = match &listeners {
            None => RedisServer::start_replica_of(master_port).await,
            Some((_, replica)) => {
                let kind = move |_| Kind::Standalone {
                    replica_of: Some(master_port),
                };
                RedisServer::start_kind(kind, settings(Some(port_of(replica)))).await
            }
        };
        let proxies = match listeners {
            Some((master_listener, replica_listener)) => Some((
                FaultProxy::start_with(master_listener, master.port()).await,
                FaultProxy::start_with(replica_listener, replica.port()).await,
            )),
            None => None,
        };
        let replica_own_port = replica.port();
        // Sentinels discover replicas from the master's INFO, so the replica must be linked first.
        wait_until(
            "sentinel set: replica linked to its master",
            SENTINEL_READY_TIMEOUT,
            || async move {
                let info = redis_cli(replica_own_port, &["INFO", "replication"]).await?;
                match info_field(&info, "master_link_status") {
                    Some("up") => Ok(()),
                    status => Err(format!("master_link_status {status:?}")),
                }
            },
        )
        .await;
        let replica_port = replica.announced_port();
        let sentinels = join_all((0..3).map(|_| RedisServer::start_sentinel(master_port))).await;
        let set = SentinelSet {
            master,
            replica,
            sentinels,
            proxies,
            known_master: AtomicU16::new(master_port),
        };
        let remaining = SENTINEL_READY_TIMEOUT.saturating_sub(started.elapsed());
        for sentinel in set.sentinel_ports() {
            wait_until(
                &format!("sentinel set: sentinel on port {sentinel} ready to fail over"),
                remaining,
                || Self::sentinel_ready(sentinel, master_port, replica_port),
            )
            .await;
        }
        set
    }

    /// Whether the sentinel on `sentinel` sees the master, a healthy replica and two peers
    /// (`master` and `replica`: the ports they announce).
    async fn sentinel_ready(sentinel: u16, master: u16, replica: u16) -> Result<(), String> {
        let reported = Self::reported_master(sentinel).await?;
        if reported != master {
            return Err(format!("it reports master port {reported}, not {master}"));
        }
        let state = redis_cli(sentinel, &["SENTINEL", "master", MASTER_NAME]).await?;
        let state = flat_pairs(&state);
        let field = |name: &str| state.iter().find(|(key, _)| *key == name).map(|(_, v)| *v);
        if field("flags") != Some("master")
            || field("num-slaves") != Some("1")
            || field("num-other-sentinels") != Some("2")
        {
            return Err(format!(
                "master flags {:?}, {:?} replicas, {:?} other sentinels",
                field("flags"),
                field("num-slaves"),
                field("num-other-sentinels")
            ));
        }
        let replicas = redis_cli(sentinel, &["SENTINEL", "replicas", MASTER_NAME]).await?;
        let replicas = flat_pairs(&replicas);
        let value = |name: &str| {
            replicas
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, v)| *v)
        };
        if value("port") != Some(replica.to_string().as_str())
            || value("flags") != Some("slave")
            || value("master-link-status") != Some("ok")
        {
            return Err(format!(
                "replica port {:?}, flags {:?}, master link {:?}",
                value("port"),
                value("flags"),
                value("master-link-status")
            ));
        }
        Ok(())
    }

    /// The master port the sentinel on `sentinel` reports (a proxy's, if started proxied).
    async fn reported_master(sentinel: u16) -> Result<u16, String> {
        let reply = redis_cli(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        )
        .await?;
        let mut lines = reply.lines().map(str::trim);
        match (lines.next(), lines.next()) {
            (Some(_host), Some(port)) => port
                .parse()
                .map_err(|_| format!("unexpected master address reply {reply:?}")),
            _ => Err(format!("unexpected master address reply {reply:?}")),
        }
    }

    /// `mymaster`: the name the sentinels monitor the master under.
    pub(crate) fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// `redis://127.0.0.1:PORT` of each sentinel.
    pub(crate) fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The port of each sentinel.
    pub(crate) fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(RedisServer::port).collect()
    }

    /// The server started as master.
    pub(crate) fn master(&mut self) -> &mut RedisServer {
        &mut self.master
    }

    /// The server started as replica.
    pub(crate) fn replica(&mut self) -> &mut RedisServer {
        &mut self.replica
    }

    /// The proxy in front of the server started as master; panics if not started proxied.
    pub(crate) fn master_proxy(&self) -> &FaultProxy {
        &self.proxies().0
    }

    /// The proxy in front of the server started as replica; panics if not started proxied.
    pub(crate) fn replica_proxy(&self) -> &FaultProxy {
        &self.proxies().1
    }

    fn proxies(&self) -> &(FaultProxy, FaultProxy) {
        self.proxies
            .as_ref()
            .expect("sentinel set: started without proxies (use SentinelSet::start_proxied)")
    }

    /// The three sentinels.
    pub(crate) fn sentinels(&mut self) -> &mut [RedisServer] {
        &mut self.sentinels
    }

    /// The data server (master or replica) on `port` — its own port or the one it announces
    /// (its proxy's) — if it is one of this set's.
    pub(crate) fn server_on(&mut self, port: u16) -> Option<&mut RedisServer> {
        [&mut self.master, &mut self.replica]
            .into_iter()
            .find(|server| server.port() == port || server.announced_port() == port)
    }

    /// The own port of the data server that announces `announced`, if it is one of this set's.
    fn own_port(&self, announced: u16) -> Option<u16> {
        [&self.master, &self.replica]
            .into_iter()
            .find(|server| server.announced_port() == announced)
            .map(RedisServer::port)
    }

    /// Waits until the sentinels have failed over to a new master: every reachable sentinel
    /// (at least one) reports the same master port, different from the one they agreed on before
    /// (at start, or at the previous call), and the server there says `role:master`. Returns
    /// that server's own port (not its proxy's: see [`server_on`](Self::server_on)); panics
    /// after `timeout`.
    pub(crate) async fn wait_for_failover(&self, timeout: Duration) -> u16 {
        let old = self.known_master.load(Ordering::SeqCst);
        let sentinels = self.sentinel_ports();
        let own_ports: Vec<(u16, u16)> = [&self.master, &self.replica]
            .into_iter()
            .map(|server| (server.announced_port(), server.port()))
            .collect();
        let new = wait_until(
            &format!("sentinel set: failover away from the master on port {old}"),
            timeout,
            || {
                let sentinels = sentinels.clone();
                let own_ports = own_ports.clone();
                async move {
                    let mut reported = Vec::new();
                    for sentinel in sentinels {
                        // A stopped sentinel is no obstacle; a reachable one must agree.
                        if let Ok(port) = Self::reported_master(sentinel).await {
                            reported.push(port);
                        }
                    }
                    let Some(&new) = reported.first() else {
                        return Err("no sentinel answers".to_string());
                    };
                    if new == old || reported.iter().any(|&port| port != new) {
                        return Err(format!("sentinels report master ports {reported:?}"));
                    }
                    let Some(&(_, own)) = own_ports.iter().find(|(announced, _)| *announced == new)
                    else {
                        return Err(format!("sentinels report master port {new}, not ours"));
                    };
                    // Asked directly, so that a fault on its proxy does not hide the answer.
                    let info = redis_cli(own, &["INFO", "replication"]).await?;
                    match info_field(&info, "role") {
                        Some("master") => Ok(new),
                        role => Err(format!("the server on port {own} has role {role:?}")),
                    }
                }
            },
        )
        .await;
        self.known_master.store(new, Ordering::SeqCst);
        self.own_port(new).expect("checked to be one of ours")
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct ClusterNodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The id of its master (`-` for a master).
    master_id: String,
    /// Inclusive slot ranges it serves (as a master).
    slots: Vec<(usize, usize)>,
}

impl ClusterNodeLine {
    fn parse(line: &str) -> Option<ClusterNodeLine> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        // `ip:port@cport[,hostname]`; a node without a known address shows `:0@0`.
        let address = fields[1].split('@').next()?;
        let port = address.rsplit(':').next()?.parse().ok()?;
        let flags = fields[2].split(',').map(str::to_string).collect();
        let slots = fields[8..]
            .iter()
            .filter(|slot| !slot.starts_with('['))
            .filter_map(|slot| match slot.split_once('-') {
                Some((from, to)) => Some((from.parse().ok()?, to.parse().ok()?)),
                None => {
                    let slot = slot.parse().ok()?;
                    Some((slot, slot))
                }
            })
            .collect();
        Some(ClusterNodeLine {
            id: fields[0].to_string(),
            port,
            flags,
            master_id: fields[3].to_string(),
            slots,
        })
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Whether it is flagged failing, or not (yet) a full member.
    fn unhealthy(&self) -> bool {
        ["fail", "fail?", "handshake", "noaddr"]
            .iter()
            .any(|flag| self.has_flag(flag))
    }

    fn serves(&self, slot: usize) -> bool {
        self.slots
            .iter()
            .any(|&(from, to)| (from..=to).contains(&slot))
    }
}

async fn cluster_nodes(port: u16) -> Result<Vec<ClusterNodeLine>, String> {
    let reply = redis_cli(port, &["CLUSTER", "NODES"]).await?;
    Ok(reply.lines().filter_map(ClusterNodeLine::parse).collect())
}

/// A six-node Redis Cluster: three masters with one replica each (node timeout 1 s).
///
/// Started [proxied](Self::start_proxied), each node sits behind its own [`FaultProxy`] and
/// announces the proxy's port as its address (`CLUSTER SLOTS`, `CLUSTER NODES`, redirections,
/// replication); the cluster bus stays direct.
#[derive(Debug)]
pub(crate) struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The proxy in front of each node (same order as `nodes`), or none.
    proxies: Vec<FaultProxy>,
}

impl RedisCluster {
    /// Starts six cluster nodes, joins them with `redis-cli --cluster create ... --cluster-replicas
    /// 1`, and waits (30 s at most) until every node reports `cluster_state:ok`.
    pub(crate) async fn start() -> RedisCluster {
        Self::launch(false, false).await
    }

    /// Like [`start`](Self::start), with each node behind its own [`FaultProxy`] and announcing
    /// the proxy's port as its client port (its cluster bus port stays its own, so gossip and
    /// failure detection between nodes bypass the proxies — a fault on a proxy cuts a node off
    /// from clients and from its replica, not from its peers). [`urls`](Self::urls) are the
    /// proxies'.
    pub(crate) async fn start_proxied() -> RedisCluster {
        Self::launch(true, false).await
    }

    /// Like [`start_proxied`](Self::start_proxied), with every node
    /// [persistent](RedisServer::start_persistent).
    pub(crate) async fn start_proxied_persistent() -> RedisCluster {
        Self::launch(true, true).await
    }

    async fn launch(proxied: bool, persistent: bool) -> RedisCluster {
        let started = Instant::now();
        let listeners: Vec<TcpListener> = if proxied {
            (0..6).map(|_| reserve_port()).collect()
        } else {
            Vec::new()
        };
        let nodes = join_all((0..6).map(|i| {
            RedisServer::start_cluster_node(Settings {
                persistent,
                announced_port: listeners.get(i).map(port_of),
                min_replicas: false,
            })
        }))
        .await;
        let mut proxies = Vec::new();
        for (listener, node) in listeners.into_iter().zip(&nodes) {
            proxies.push(FaultProxy::start_with(listener, node.port()).await);
        }
        // Created through the announced addresses, the nodes' own view of themselves.
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(
            nodes
                .iter()
                .map(|node| format!("127.0.0.1:{}", node.announced_port())),
        );
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let output = run_cli(&args, CLUSTER_READY_TIMEOUT)
            .await
            .unwrap_or_else(|why| panic!("cluster: creation failed: {why}"));
        assert!(
            output.contains("All 16384 slots covered"),
            "cluster: `redis-cli {}` did not cover every slot:\n{output}",
            args.join(" ")
        );
        let cluster = RedisCluster { nodes, proxies };
        cluster
            .wait_until_ok(CLUSTER_READY_TIMEOUT.saturating_sub(started.elapsed()))
            .await;
        // A write must reach a replica (EA_REDIS_REPLICA_ACKS): started means replicating.
        let ports: Vec<u16> = cluster.nodes.iter().map(RedisServer::port).collect();
        wait_until(
            "cluster: every replica's link to its master up",
            CLUSTER_READY_TIMEOUT.saturating_sub(started.elapsed()),
            || {
                let ports = ports.clone();
                async move {
                    for port in ports {
                        let info = redis_cli(port, &["INFO", "replication"]).await?;
                        if info_field(&info, "role") == Some("slave")
                            && info_field(&info, "master_link_status") != Some("up")
                        {
                            return Err(format!("replica {port}: link to its master not up"));
                        }
                    }
                    Ok(())
                }
            },
        )
        .await;
        cluster
    }

    /// `redis://127.0.0.1:PORT` of each node, as it announces itself: its proxy's, if started
    /// proxied.
    pub(crate) fn urls(&self) -> Vec<String> {
        if self.proxies.is_empty() {
            self.nodes.iter().map(RedisServer::url).collect()
        } else {
            self.proxies.iter().map(FaultProxy::url).collect()
        }
    }

    /// The own port of each node (not its proxy's).
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The proxy in front of each node, in the order of [`nodes`](Self::nodes) (empty unless
    /// started proxied).
    pub(crate) fn proxies(&self) -> &[FaultProxy] {
        &self.proxies
    }

    /// The six nodes, in start order (roles change with failovers).
    pub(crate) fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// A running node to ask questions.
    fn any_running_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|node| node.is_running())
            .map(RedisServer::port)
            .expect("cluster: every node is stopped")
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub(crate) async fn key_slot(&self, key: &str) -> usize {
        let port = self.any_running_port();
        let reply = redis_cli(port, &["CLUSTER", "KEYSLOT", key])
            .await
            .unwrap_or_else(|why| panic!("cluster: CLUSTER KEYSLOT failed: {why}"));
        reply
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("cluster: unexpected CLUSTER KEYSLOT reply {reply:?}"))
    }

    /// The index in `nodes` of the master serving `key`, as a running node's `CLUSTER NODES`
    /// says (which lists each node by the port it announces).
    async fn master_index_for_key(&self, key: &str) -> usize {
        let slot = self.key_slot(key).await;
        let port = self.any_running_port();
        let nodes = cluster_nodes(port)
            .await
            .unwrap_or_else(|why| panic!("cluster: CLUSTER NODES failed: {why}"));
        let announced = nodes
            .iter()
            .find(|node| node.has_flag("master") && node.serves(slot))
            .map(|node| node.port)
            .unwrap_or_else(|| panic!("cluster: no master serves slot {slot} of {key:?}"));
        self.nodes
            .iter()
            .position(|node| node.announced_port() == announced)
            .unwrap_or_else(|| panic!("cluster: the master on port {announced} is not one of ours"))
    }

    /// The own port (not its proxy's) of the master serving `key`, as a running node's
    /// `CLUSTER NODES` says.
    pub(crate) async fn master_port_for_key(&self, key: &str) -> u16 {
        let index = self.master_index_for_key(key).await;
        self.nodes[index].port()
    }

    /// The node that is the master serving `key`.
    pub(crate) async fn master_for_key(&mut self, key: &str) -> &mut RedisServer {
        let index = self.master_index_for_key(key).await;
        &mut self.nodes[index]
    }

    /// The proxy in front of the master serving `key`; panics if not started proxied.
    pub(crate) async fn proxy_for_key(&self, key: &str) -> &FaultProxy {
        assert!(
            !self.proxies.is_empty(),
            "cluster: started without proxies (use RedisCluster::start_proxied)"
        );
        let index = self.master_index_for_key(key).await;
        &self.proxies[index]
    }

    /// Waits until the cluster is whole again on every running node: `cluster_state:ok`, all
    /// 16384 slots ok, and every slot served by a master that is running (so a master just
    /// killed, not yet noticed as failed, does not count as ok), every running node known to all
    /// as such a master or as a replica of one, and every running replica in sync with its master
    /// (so it could take over in turn). Panics after `timeout`.
    pub(crate) async fn wait_until_ok(&self, timeout: Duration) {
        let running: Vec<(u16, u16)> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| (node.port(), node.announced_port()))
            .collect();
        wait_until(
            "cluster: cluster_state:ok on every running node",
            timeout,
            || {
                let running = running.clone();
                async move {
                    let announced: Vec<u16> = running.iter().map(|&(_, port)| port).collect();
                    for &(port, _) in &running {
                        Self::node_ok(port, &announced).await?;
                    }
                    Ok(())
                }
            },
        )
        .await;
    }

    /// Whether the node on `port` (its own) sees a whole cluster served by the `running` nodes
    /// (the ports they announce, as `CLUSTER NODES` lists them).
    async fn node_ok(port: u16, running: &[u16]) -> Result<(), String> {
        let info = redis_cli(port, &["CLUSTER", "INFO"]).await?;
        let state = info_field(&info, "cluster_state");
        let slots_ok = info_field(&info, "cluster_slots_ok");
        if state != Some("ok") || slots_ok != Some("16384") {
            return Err(format!(
                "node {port}: cluster_state {state:?}, cluster_slots_ok {slots_ok:?}"
            ));
        }
        let nodes = cluster_nodes(port).await?;
        let mut served = 0;
        for node in nodes.iter().filter(|node| node.has_flag("master")) {
            if node.slots.is_empty() {
                continue;
            }
            if !running.contains(&node.port) || node.unhealthy() {
                return Err(format!(
                    "node {port}: slots still served by the master on port {} ({})",
                    node.port,
                    node.flags.join(",")
                ));
            }
            served += node
                .slots
                .iter()
                .map(|&(from, to)| to - from + 1)
                .sum::<usize>();
        }
        if served != CLUSTER_SLOTS {
            return Err(format!("node {port}: {served} slots served"));
        }
        // Every running node is, in this node's view, a healthy master serving slots or a
        // replica of one: otherwise masters may refuse their votes to a replica taking over.
        for &member in running {
            let Some(node) = nodes.iter().find(|node| node.port == member) else {
                return Err(format!("node {port}: does not know node {member}"));
            };
            let role_ok = if node.has_flag("master") {
                !node.slots.is_empty()
            } else {
                nodes
                    .iter()
                    .any(|master| master.id == node.master_id && !master.slots.is_empty())
            };
            if node.unhealthy() || !role_ok {
                return Err(format!(
                    "node {port}: sees node {member} as {} (master {})",
                    node.flags.join(","),
                    node.master_id
                ));
            }
        }
        // A replica that never synced could not take over from its master.
        let myself = nodes.iter().find(|node| node.has_flag("myself"));
        if myself.is_some_and(|node| node.has_flag("slave")) {
            let info = redis_cli(port, &["INFO", "replication"]).await?;
            let link = info_field(&info, "master_link_status");
            if link != Some("up") {
                return Err(format!("replica {port}: master_link_status {link:?}"));
            }
        }
        Ok(())
    }

    /// Starts every stopped node again (a master that was failed over comes back as a replica
    /// of its successor) and waits (30 s at most) until the cluster is whole.
    pub(crate) async fn restart_stopped(&mut self) {
        for node in self.nodes.iter_mut().filter(|node| !node.is_running()) {
            node.restart().await;
        }
        self.wait_until_ok(CLUSTER_READY_TIMEOUT).await;
    }

    /// A human-readable dump of the cluster as the first running node sees it (for diagnostics).
    pub(crate) async fn describe(&self) -> String {
        let port = self.any_running_port();
        let mut out = String::new();
        match cluster_nodes(port).await {
            Ok(nodes) => {
                for node in nodes {
                    let _ = writeln!(
                        out,
                        "{} {} {:?}",
                        node.port,
                        node.flags.join(","),
                        node.slots
                    );
                }
            }
            Err(why) => out.push_str(&why),
        }
        out
    }
}

impl RedisServer {
    /// Freezes the process with SIGSTOP — it keeps its data but answers nothing, like a server
    /// behind a network partition — until [`resume`](Self::resume).
    pub(crate) async fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Lets a [paused](Self::pause) process run again (SIGCONT).
    pub(crate) async fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .map(|child| child.id().to_string())
            .expect("the server is running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid} failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faults::Fault;

    #[tokio::test]
    async fn server_stops_like_a_crash_and_restarts_on_the_same_port() {
        let mut server = RedisServer::start().await;
        let port = server.port();
        assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
        assert!(ping(port).await);
        let dir = server.dir().to_path_buf();
        redis_cli(port, &["SET", "k", "v"]).await.expect("SET");

        server.stop().await;
        assert!(!server.is_running());
        assert!(!ping(port).await, "PING must fail after stop");
        assert!(redis_cli(port, &["PING"]).await.is_err());

        server.restart().await;
        assert_eq!(server.port(), port);
        assert!(server.is_running());
        assert!(ping(port).await, "PING must work after restart");
        // No persistence: the restarted server is empty.
        assert_eq!(
            redis_cli(port, &["EXISTS", "k"])
                .await
                .expect("EXISTS")
                .trim(),
            "0"
        );

        drop(server);
        assert!(!ping(port).await, "dropping the handle kills the server");
        assert!(!dir.exists(), "dropping the handle removes its directory");
    }

    #[tokio::test]
    #[should_panic(expected = "while it was stopped")]
    async fn restart_panics_with_the_log_when_the_port_was_taken() {
        let mut server = RedisServer::start().await;
        server.stop().await;
        let _squatter = TcpListener::bind(("127.0.0.1", server.port())).expect("bind");
        server.restart().await;
    }

    #[tokio::test]
    async fn independent_servers_have_distinct_ports() {
        let servers = start_many(3).await;
        let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 3);
        for port in ports {
            let role = redis_cli(port, &["INFO", "replication"])
                .await
                .expect("INFO");
            assert_eq!(info_field(&role, "role"), Some("master"));
        }
    }

    #[tokio::test]
    async fn redis_cli_reports_error_replies() {
        let server = RedisServer::start().await;
        let error = redis_cli(server.port(), &["NO-SUCH-COMMAND"])
            .await
            .unwrap_err();
        assert!(error.contains("unknown command"), "{error}");
    }

    #[test]
    #[should_panic(expected = "no-such-redis-program is not installed: run `bash scripts/test.sh`")]
    fn a_missing_program_panics_with_how_to_install_it() {
        program("no-such-redis-program");
    }

    #[tokio::test]
    async fn sentinels_fail_over_when_the_master_is_killed() {
        let mut set = SentinelSet::start().await;
        assert_eq!(set.master_name(), "mymaster");
        assert_eq!(set.sentinel_urls().len(), 3);
        let replica = set.replica().port();
        set.master().stop().await;
        let killed = Instant::now();
        let new_master = set.wait_for_failover(Duration::from_secs(15)).await;
        eprintln!("sentinel failover took {:?}", killed.elapsed());
        assert_eq!(new_master, replica);
        assert!(set.server_on(new_master).is_some());

        // A restarted sentinel keeps the configuration it rewrote: it knows the new master.
        let sentinel = &mut set.sentinels()[0];
        sentinel.restart().await;
        assert_eq!(
            SentinelSet::reported_master(sentinel.port()).await,
            Ok(new_master)
        );
    }

    #[tokio::test]
    async fn cluster_recovers_when_a_master_is_killed() {
        let mut cluster = RedisCluster::start().await;
        assert_eq!(cluster.urls().len(), 6);
        let nodes = cluster_nodes(cluster.ports()[0])
            .await
            .expect("CLUSTER NODES");
        assert_eq!(nodes.iter().filter(|n| n.has_flag("master")).count(), 3);
        assert_eq!(nodes.iter().filter(|n| n.has_flag("slave")).count(), 3);

        let old = cluster.master_port_for_key("probe").await;
        cluster.master_for_key("probe").await.stop().await;
        let killed = Instant::now();
        cluster.wait_until_ok(Duration::from_secs(20)).await;
        eprintln!("cluster failover took {:?}", killed.elapsed());
        let new = cluster.master_port_for_key("probe").await;
        assert_ne!(new, old, "{}", cluster.describe().await);

        // The old master comes back as a replica (it keeps its identity in nodes.conf).
        let node = cluster
            .nodes()
            .iter_mut()
            .find(|n| n.port() == old)
            .expect("a node");
        node.restart().await;
        let restarted = Instant::now();
        cluster.wait_until_ok(Duration::from_secs(20)).await;
        eprintln!("cluster rejoin took {:?}", restarted.elapsed());
        let role = redis_cli(old, &["INFO", "replication"])
            .await
            .expect("INFO");
        assert_eq!(info_field(&role, "role"), Some("slave"));
        assert!(cluster.key_slot("probe").await < CLUSTER_SLOTS);
    }

    #[tokio::test]
    async fn a_persistent_server_keeps_acknowledged_writes_across_a_crash() {
        let mut server = RedisServer::start_persistent().await;
        let port = server.port();
        redis_cli(port, &["SET", "k", "v"]).await.expect("SET");
        for _ in 0..100 {
            redis_cli(port, &["INCR", "n"]).await.expect("INCR");
        }
        server.stop().await;
        server.restart().await;
        assert_eq!(redis_cli(port, &["GET", "k"]).await.as_deref(), Ok("v\n"));
        assert_eq!(redis_cli(port, &["GET", "n"]).await.as_deref(), Ok("100\n"));
    }

    /// Whether the server closes `stream` within `within` (what it sends first is skipped).
    async fn closed_within(stream: &tokio::net::TcpStream, within: Duration) -> bool {
        let closed = async {
            loop {
                if stream.readable().await.is_err() {
                    return;
                }
                let mut chunk = [0_u8; 256];
                match stream.try_read(&mut chunk) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, closed).await.is_ok()
    }

    #[tokio::test]
    async fn kill_pubsub_clients_disconnects_subscribers_only() {
        let server = RedisServer::start().await;
        let port = server.port();
        let connect = || tokio::net::TcpStream::connect(("127.0.0.1", port));
        let subscriber = connect().await.expect("connect");
        let plain = connect().await.expect("connect");
        subscriber.writable().await.expect("writable");
        subscriber
            .try_write(b"SUBSCRIBE ch\r\n")
            .expect("a fresh connection takes a short write");
        wait_until("the subscription", Duration::from_secs(2), || async {
            let list = redis_cli(port, &["CLIENT", "LIST", "TYPE", "pubsub"]).await?;
            match list.lines().count() {
                1 => Ok(()),
                _ => Err(list),
            }
        })
        .await;

        assert_eq!(kill_pubsub_clients(port).await, 1);
        assert!(closed_within(&subscriber, Duration::from_secs(2)).await);
        assert!(!closed_within(&plain, Duration::from_millis(100)).await);
        assert_eq!(kill_pubsub_clients(port).await, 0);
    }

    #[tokio::test]
    async fn proxied_sentinels_fail_over_to_the_replica_behind_its_proxy() {
        let mut set = SentinelSet::start_proxied().await;
        let (master_proxy, replica_proxy) = (set.master_proxy().port(), set.replica_proxy().port());
        assert_eq!(set.master_proxy().upstream(), set.master().port());
        assert_eq!(set.replica_proxy().upstream(), set.replica().port());
        for sentinel in set.sentinel_ports() {
            assert_eq!(
                SentinelSet::reported_master(sentinel).await,
                Ok(master_proxy)
            );
        }
        redis_cli(master_proxy, &["SET", "k", "v"])
            .await
            .expect("SET through the proxy");
        // Replicated before the crash, so the promoted replica must have it.
        redis_cli(master_proxy, &["WAIT", "1", "2000"])
            .await
            .expect("WAIT");
        // The replica and each of the three sentinels connect through the proxy.
        let proxied = set.master_proxy().connections();
        assert!(proxied >= 4, "{proxied} connections through the proxy");
        let info = redis_cli(set.master().port(), &["INFO", "replication"])
            .await
            .expect("INFO");
        // The replica is listed (and so found by the sentinels) at its proxy's port.
        let listed = info_field(&info, "slave0").unwrap_or_default();
        assert!(
            listed.starts_with(&format!("ip=127.0.0.1,port={replica_proxy},")),
            "{listed}"
        );

        let replica = set.replica().port();
        set.master().stop().await;
        let killed = Instant::now();
        let new_master = set.wait_for_failover(Duration::from_secs(15)).await;
        eprintln!("proxied sentinel failover took {:?}", killed.elapsed());
        assert_eq!(new_master, replica);
        for sentinel in set.sentinel_ports() {
            assert_eq!(
                SentinelSet::reported_master(sentinel).await,
                Ok(replica_proxy)
            );
        }
        assert_eq!(
            set.server_on(replica_proxy).map(|server| server.port()),
            Some(replica)
        );
        // The write replicated before the crash is there, read through the new master's proxy.
        assert_eq!(
            redis_cli(replica_proxy, &["GET", "k"]).await.as_deref(),
            Ok("v\n")
        );
    }

    #[tokio::test]
    async fn a_blackholed_master_is_failed_over_and_steps_down_when_the_link_heals() {
        let mut set = SentinelSet::start_proxied().await;
        let (old, new) = (set.master().port(), set.replica().port());
        set.master_proxy().set(Fault::Blackhole);
        let partitioned = Instant::now();
        assert_eq!(set.wait_for_failover(Duration::from_secs(15)).await, new);
        eprintln!(
            "failover away from a blackholed master took {:?}",
            partitioned.elapsed()
        );
        // Cut off from its replica, the old master soon refuses writes rather than lose them
        // (once the replica's last acknowledgement is more than 2 s old).
        wait_until(
            "the old master to refuse writes",
            Duration::from_secs(5),
            || async {
                match redis_cli(old, &["SET", "k", "lost"]).await {
                    Err(refused) if refused.contains("NOREPLICAS") => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        assert_eq!(
            info_field(
                &redis_cli(old, &["INFO", "replication"])
                    .await
                    .expect("INFO"),
                "role"
            ),
            Some("master")
        );
        // So does the new master, until it has a replica again.
        let refused = redis_cli(new, &["SET", "k", "v"]).await.unwrap_err();
        assert!(refused.contains("NOREPLICAS"), "{refused}");

        set.master_proxy().set(Fault::None);
        let healed = Instant::now();
        let replica_proxy = set.replica_proxy().port();
        wait_until(
            "the old master to follow the new one",
            Duration::from_secs(20),
            || async {
                let info = redis_cli(old, &["INFO", "replication"]).await?;
                match (info_field(&info, "role"), info_field(&info, "master_port")) {
                    (Some("slave"), Some(port)) if port == replica_proxy.to_string() => Ok(()),
                    (role, port) => Err(format!("role {role:?}, master port {port:?}")),
                }
            },
        )
        .await;
        eprintln!(
            "the old master stepped down {:?} after the link healed",
            healed.elapsed()
        );
        let master_proxy = set.master_proxy().port();
        let refused = redis_cli(master_proxy, &["SET", "k", "stale"])
            .await
            .unwrap_err();
        assert!(refused.contains("READONLY"), "{refused}");
        // With its replica back, the new master takes writes again.
        wait_until(
            "a write to the new master",
            Duration::from_secs(10),
            || async { redis_cli(replica_proxy, &["SET", "k", "v"]).await },
        )
        .await;
    }

    #[tokio::test]
    async fn a_persistent_proxied_set_keeps_writes_when_both_servers_crash() {
        let mut set = SentinelSet::start_proxied_persistent().await;
        let master_proxy = set.master_proxy().port();
        redis_cli(master_proxy, &["SET", "k", "v"])
            .await
            .expect("SET");
        set.replica().stop().await;
        set.master().stop().await;
        set.master().restart().await;
        set.replica().restart().await;
        let master = set.master().port();
        assert_eq!(redis_cli(master, &["GET", "k"]).await.as_deref(), Ok("v\n"));
    }

    #[tokio::test]
    async fn proxied_cluster_announces_its_proxies_and_recovers_when_a_master_is_killed() {
        let mut cluster = RedisCluster::start_proxied().await;
        let proxies: Vec<u16> = cluster.proxies().iter().map(FaultProxy::port).collect();
        assert_eq!(
            cluster.urls(),
            proxies
                .iter()
                .map(|port| format!("redis://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
        );
        let mut announced: Vec<u16> = cluster_nodes(cluster.ports()[0])
            .await
            .expect("CLUSTER NODES")
            .iter()
            .map(|node| node.port)
            .collect();
        announced.sort_unstable();
        let mut expected = proxies.clone();
        expected.sort_unstable();
        assert_eq!(announced, expected, "CLUSTER NODES lists the proxies");
        let slots = redis_cli(cluster.ports()[0], &["CLUSTER", "SLOTS"])
            .await
            .expect("SLOTS");
        for node in cluster.ports() {
            assert!(
                !slots.lines().any(|line| line.trim() == node.to_string()),
                "{slots}"
            );
        }

        let old_proxy = cluster.proxy_for_key("probe").await.port();
        redis_cli(old_proxy, &["SET", "probe", "v"])
            .await
            .expect("SET through the proxy");
        redis_cli(
            cluster.master_port_for_key("probe").await,
            &["WAIT", "1", "2000"],
        )
        .await
        .expect("WAIT");
        let old = cluster.master_port_for_key("probe").await;
        cluster.master_for_key("probe").await.stop().await;
        let killed = Instant::now();
        cluster.wait_until_ok(Duration::from_secs(20)).await;
        eprintln!("proxied cluster failover took {:?}", killed.elapsed());
        let new_proxy = cluster.proxy_for_key("probe").await.port();
        assert_ne!(new_proxy, old_proxy, "{}", cluster.describe().await);
        assert_eq!(
            redis_cli(new_proxy, &["GET", "probe"]).await.as_deref(),
            Ok("v\n")
        );
        redis_cli(new_proxy, &["SET", "probe", "w"])
            .await
            .expect("SET through the new proxy");

        let node = cluster
            .nodes()
            .iter_mut()
            .find(|n| n.port() == old)
            .expect("a node");
        node.restart().await;
        cluster.wait_until_ok(Duration::from_secs(20)).await;
        let role = redis_cli(old, &["INFO", "replication"])
            .await
            .expect("INFO");
        assert_eq!(info_field(&role, "role"), Some("slave"));
        assert_eq!(
            info_field(&role, "master_port"),
            Some(new_proxy.to_string().as_str()),
            "the old master replicates through the new master's proxy"
        );
    }

    #[tokio::test]
    async fn a_persistent_proxied_cluster_keeps_writes_when_a_whole_shard_crashes() {
        let mut cluster = RedisCluster::start_proxied_persistent().await;
        let proxy = cluster.proxy_for_key("probe").await.port();
        redis_cli(proxy, &["SET", "probe", "v"]).await.expect("SET");
        let master = cluster.master_port_for_key("probe").await;
        let master_announced = cluster.proxy_for_key("probe").await.port();
        let nodes = cluster_nodes(master).await.expect("CLUSTER NODES");
        let master_id = &nodes
            .iter()
            .find(|node| node.port == master_announced)
            .expect("the master's line")
            .id;
        let replica_announced = nodes
            .iter()
            .find(|node| &node.master_id == master_id)
            .expect("the master's replica")
            .port;
        let shard: Vec<usize> = [master_announced, replica_announced]
            .iter()
            .map(|&announced| {
                cluster
                    .nodes()
                    .iter()
                    .position(|node| node.announced_port() == announced)
                    .expect("one of ours")
            })
            .collect();

        for &index in &shard {
            cluster.nodes()[index].stop().await;
        }
        for &index in &shard {
            cluster.nodes()[index].restart().await;
        }
        cluster.wait_until_ok(Duration::from_secs(20)).await;
        let proxy = cluster.proxy_for_key("probe").await.port();
        assert_eq!(
            redis_cli(proxy, &["GET", "probe"]).await.as_deref(),
            Ok("v\n")
        );
    }
}

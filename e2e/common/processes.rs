//! Processes an e2e test starts and always stops: a Redis server on a free loopback port, and
//! agents run from the built binary (as a Deployment's replicas would be), each logging to a
//! file of its own. Dropping one kills it, so a failing test leaves nothing behind.

use std::{
    fs::File,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{eventually, http_get, within};

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A Redis server of the test's own: no persistence, killed when dropped.
pub struct RedisServer {
    /// The loopback port it listens on.
    pub port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it answers PING.
    pub async fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/e2e.sh installs it)");
        let server = Self { port, child };
        eventually(
            "redis-server answers",
            Duration::from_secs(10),
            async || server.command(&["PING"]).await == Ok(Some("PONG".to_owned())),
        )
        .await;
        server
    }

    /// The URL agents reach it at.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command; its answer as text (`None` for a nil reply). Only what the tests
    /// need of RESP: simple strings, errors, integers and bulk strings.
    pub async fn command(&self, args: &[&str]) -> Result<Option<String>, String> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|e| e.to_string())?;
            let mut request = format!("*{}\r\n", args.len());
            for arg in args {
                request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut reply = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed".to_owned());
                }
                reply.extend_from_slice(&chunk[..n]);
                if let Some(answer) = parse_reply(&reply)? {
                    return Ok(answer);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| format!("{args:?}: no answer within 5 s"))?
    }
}

/// One complete RESP reply of `bytes`, `Ok(None)` inside when it is a nil; `Ok(None)` outside
/// when more bytes are needed.
fn parse_reply(bytes: &[u8]) -> Result<Option<Option<String>>, String> {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, rest)) = text.split_once("\r\n") else {
        return Ok(None);
    };
    let (kind, value) = head.split_at(1);
    match kind {
        "+" | ":" => Ok(Some(Some(value.to_owned()))),
        "-" => Err(value.to_owned()),
        "$" if value == "-1" => Ok(Some(None)),
        "$" => {
            let len: usize = value.parse().map_err(|_| format!("bad reply {head}"))?;
            Ok((rest.len() >= len + 2).then(|| Some(rest[..len].to_owned())))
        }
        _ => Err(format!("unexpected reply {head}")),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent process of the built binary, on loopback ports of its own; killed when dropped.
pub struct AgentProcess {
    /// Its `HOSTNAME`: the controller lease's holder is this name with a random suffix.
    pub hostname: String,
    /// Where its gRPC API listens.
    pub grpc_port: u16,
    /// Where its HTTP API listens.
    pub http_port: u16,
    /// Its log (standard output and error).
    pub log: PathBuf,
    child: Child,
}

impl AgentProcess {
    /// Starts `election-agent` with leases in the Redis server at `redis_url` (mode `single`)
    /// and Kubernetes features on for `namespace`, its controller term 3 s, and waits until it is
    /// ready. It uses the cluster of `KUBECONFIG` (or `~/.kube/config`), as the test does.
    pub async fn start(hostname: &str, redis_url: &str, namespace: &str) -> Self {
        let mut environment: Vec<(String, String)> = [
            ("EA_NAME", hostname),
            ("EA_REDIS_MODE", "single"),
            ("EA_REDIS_URLS", redis_url),
            ("EA_BIND_ADDRESS", "127.0.0.1"),
            ("EA_GRPC_PORT", &free_port().to_string()),
            ("EA_HTTP_PORT", &free_port().to_string()),
            ("EA_KUBE_IN_CLUSTER", "false"),
            ("EA_KUBE_NAMESPACES", namespace),
            ("EA_CONTROLLER_TERM", "3s"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
        for inherited in ["KUBECONFIG", "HOME"] {
            if let Ok(value) = std::env::var(inherited) {
                environment.push((inherited.to_owned(), value));
            }
        }
        Self::with_environment(hostname, namespace, environment).await
    }

    /// Starts `election-agent` with `environment` and nothing else but `HOSTNAME` (as a pod's
    /// container gets), and waits until it is ready. `environment` names its ports
    /// (`EA_GRPC_PORT`, `EA_HTTP_PORT`, free loopback ones) and its cluster (`KUBECONFIG`); its
    /// log is named after `namespace` and `hostname`.
    pub async fn with_environment(
        hostname: &str,
        namespace: &str,
        environment: Vec<(String, String)>,
    ) -> Self {
        let port = |key: &str| -> u16 {
            environment
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("the agent's environment names no {key}"))
        };
        let (grpc_port, http_port) = (port("EA_GRPC_PORT"), port("EA_HTTP_PORT"));
        let log = std::env::temp_dir().join(format!("{namespace}-{hostname}.log"));
        let file = File::create(&log).expect("create the agent's log");
        let child = Command::new(env!("CARGO_BIN_EXE_election-agent"))
            .env_clear()
            .env("HOSTNAME", hostname)
            .envs(environment)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log, twice"))
            .stderr(file)
            .spawn()
            .expect("start the election-agent binary");
        let mut agent = Self {
            hostname: hostname.to_owned(),
            grpc_port,
            http_port,
            log,
            child,
        };
        let ready = format!("http://127.0.0.1:{http_port}/readyz");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "agent {hostname} exited with {status}:\n{}",
                    agent.log_text()
                );
            }
            let answer = tokio::time::timeout(Duration::from_secs(1), async {
                tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await
            })
            .await;
            if matches!(answer, Ok(Ok(_))) && http_get(&ready).await.0 == 200 {
                return agent;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "agent {hostname} not ready within 30 s:\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its gRPC endpoint.
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Its HTTP base URL.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: it dies on the spot, without resigning anything.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the agent");
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a clean shutdown, as Kubernetes asks of a pod); returns at once.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {}", self.child.id());
    }

    /// Waits for it to exit, at most `limit`; its exit status.
    pub async fn exited(&mut self, limit: Duration) -> ExitStatus {
        within(&format!("agent {} exits", self.hostname), limit, async {
            loop {
                if let Some(status) = self.child.try_wait().expect("the agent's status") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A failing test shows the log; a passing one leaves nothing behind.
        if std::thread::panicking() {
            eprintln!(
                "--- log of agent {} ({}):\n{}",
                self.hostname,
                self.log.display(),
                self.log_text()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

//! Configuration: built-in defaults < YAML file < `EA_*` environment < command-line flags.
//!
//! Every setting is one row of [`SETTINGS`]: its `EA_*` key (the Go service's names), its path in
//! the YAML file, its command-line flag, its default and what it allows. All sources are merged as
//! text first and parsed once, so a bad value is reported the same way wherever it came from: one
//! line naming the key, the value, where it came from and what is allowed.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::lease::{Name, Term, TermBounds};

/// One configuration setting.
#[derive(Debug)]
pub struct Setting {
    /// The environment variable.
    pub key: &'static str,
    /// Older names of the same variable, still read.
    pub aliases: &'static [&'static str],
    /// The dotted path in the YAML file; the command-line flag is the same with `-` for `.`/`_`.
    pub path: &'static str,
    /// The built-in default.
    pub default: &'static str,
    /// What the setting does.
    pub help: &'static str,
}

impl Setting {
    /// The command-line flag (without `--`).
    pub fn flag(&self) -> String {
        self.path.replace(['.', '_'], "-")
    }
}

/// The histogram buckets used when none are configured: the Go service's 0.1, 0.25, 0.5, 1 (so
/// existing queries keep their `le` values) plus finer ones for sub-millisecond requests.
pub const DEFAULT_BUCKETS: &str = "0.0005,0.001,0.0025,0.005,0.01,0.025,0.05,0.1,0.25,0.5,1";

macro_rules! settings {
    ($($key:literal $([$($alias:literal),*])? => $path:literal = $default:expr, $help:literal;)*) => {
        /// Every setting, in the order of the README's configuration table.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            key: $key,
            aliases: &[$($($alias),*)?],
            path: $path,
            default: $default,
            help: $help,
        }),*];
    };
}

settings! {
    "EA_ENV" => "env" = "production",
        "production|benchmark (JSON logs) or development|test (human-readable logs)";
    "EA_LOG_LEVEL" => "log_level" = "info",
        "trace|debug|info|warning|error (panic and fatal mean error)";
    "EA_NAME" => "name" = "election-agent",
        "this agent's name: the `agent` label of every metric";
    "EA_KEY_PREFIX" ["EA_REDIS_PREFIX"] => "key_prefix" = "ela",
        "prefix of every lease key in the store";
    "EA_BIND_ADDRESS" => "bind_address" = "0.0.0.0",
        "IP address the gRPC and HTTP servers listen on";
    "EA_GRPC_ENABLE" => "grpc.enable" = "true",
        "serve the gRPC API";
    "EA_GRPC_PORT" => "grpc.port" = "443",
        "gRPC port (0 picks a free one)";
    "EA_GRPC_MAX_CONNECTIONS" => "grpc.max_connections" = "4096",
        "open gRPC connections at most: a new one beyond closes the longest-idle one, or waits while every one has a request in flight";
    "EA_GRPC_MAX_CONCURRENT_STREAMS" => "grpc.max_concurrent_streams" = "1000",
        "requests (HTTP/2 streams) one gRPC connection may have open at once";
    "EA_GRPC_MAX_OBSERVE_STREAMS" => "grpc.max_observe_streams" = "10000",
        "Observe streams open at once on the gRPC port; beyond, RESOURCE_EXHAUSTED";
    "EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION" => "grpc.max_observe_streams_per_connection" = "500",
        "Observe streams one gRPC connection may have open; below EA_GRPC_MAX_CONCURRENT_STREAMS, so that other calls keep room";
    "EA_HTTP_ENABLE" => "http.enable" = "true",
        "serve the REST API, probes and metrics";
    "EA_HTTP_PORT" => "http.port" = "80",
        "HTTP port (0 picks a free one)";
    "EA_HTTP_MAX_CONNECTIONS" => "http.max_connections" = "4096",
        "open HTTP connections at most: a new one beyond closes the longest-idle one, or waits while every one has a request in flight";
    "EA_HTTP_MAX_CONCURRENT_STREAMS" => "http.max_concurrent_streams" = "200",
        "requests (HTTP/2 streams) one HTTP/2 connection may have open at once";
    "EA_HTTP_MAX_WATCH_STREAMS" => "http.max_watch_streams" = "1000",
        "watch (Server-Sent Events) streams open at once on the HTTP port; beyond, 429";
    "EA_HTTP_MAX_WATCH_STREAMS_PER_CONNECTION" => "http.max_watch_streams_per_connection" = "100",
        "watch streams one HTTP/2 connection may have open (HTTP/1: one per connection); below EA_HTTP_MAX_CONCURRENT_STREAMS";
    "EA_METRIC_ENABLE" => "metric.enable" = "true",
        "serve Prometheus metrics at /metrics (needs HTTP)";
    "EA_METRIC_REQUEST_DURATION_BUCKETS" => "metric.request_duration_buckets" = DEFAULT_BUCKETS,
        "comma-separated, increasing upper bounds (seconds) of the request duration histogram";
    "EA_KUBE_ENABLE" => "kube.enable" = "true",
        "Kubernetes features (GetPods discovery); when off, GetPods answers UNIMPLEMENTED";
    "EA_KUBE_IN_CLUSTER" => "kube.in_cluster" = "true",
        "use the in-cluster service account, else KUBECONFIG / ~/.kube/config";
    "EA_KUBE_NAMESPACES" => "kube.namespaces" = "",
        "comma-separated namespaces to watch (GetPods, Elections' pods); empty: the whole cluster";
    "EA_CONTROLLER_ENABLE" => "controller.enable" = "true",
        "run the Election controller (with EA_KUBE_ENABLE); agent replicas elect one to run it";
    "EA_CONTROLLER_TERM" => "controller.term" = "15s",
        "term of the controller role's lease: another replica takes over within it";
    "EA_AUTH_TOKENS_FILE" => "auth.tokens_file" = "",
        "static bearer tokens, in kube-apiserver's --token-auth-file CSV format (token,user,uid,\"group1,group2\"); empty: none";
    "EA_AUTH_KUBERNETES" => "auth.kubernetes" = "false",
        "accept Kubernetes ServiceAccount tokens, verified by the API server's TokenReview for EA_AUTH_AUDIENCE";
    "EA_AUTH_AUDIENCE" => "auth.audience" = "election-agent",
        "the audience Kubernetes tokens must be issued for (kubectl create token SA --audience election-agent)";
    "EA_AUTH_POLICY_FILE" => "auth.policy_file" = "",
        "YAML authorization rules (needs authentication); empty: an authenticated caller may do everything but handover";
    "EA_AUTH_METRICS" => "auth.metrics" = "false",
        "with authentication on, /metrics needs a token too (else it stays open, like the probes)";
    "EA_TLS_CERT_FILE" => "tls.cert_file" = "",
        "PEM certificate chain both ports serve TLS with (with EA_TLS_KEY_FILE); re-read when it changes; empty: plain TCP";
    "EA_TLS_KEY_FILE" => "tls.key_file" = "",
        "PEM private key of EA_TLS_CERT_FILE";
    "EA_TLS_CLIENT_CA_FILE" => "tls.client_ca_file" = "",
        "PEM CA certificates: clients must present a certificate they signed, whose subject (CN, else first DNS name) is the caller's identity; empty: no client certificates";
    "EA_REDIS_MODE" => "redis.mode" = "",
        "memory|single|failover|cluster|sharding; empty: memory without EA_REDIS_URLS, else single";
    "EA_REDIS_URLS" => "redis.urls" = "",
        "comma-separated Redis URLs (several with single mode: Redlock quorum)";
    "EA_REDIS_MASTER" => "redis.master" = "",
        "Sentinel master name (failover mode)";
    "EA_REDIS_TLS_CA_FILE" => "redis.tls_ca_file" = "",
        "rediss:// URLs: PEM CA certificates the Redis servers' certificates must chain to; empty: the public web roots (webpki-roots)";
    "EA_REDIS_TLS_CERT_FILE" => "redis.tls_cert_file" = "",
        "rediss:// URLs: PEM client certificate chain for servers that ask for one (Redis's tls-auth-clients), with EA_REDIS_TLS_KEY_FILE; empty: none";
    "EA_REDIS_TLS_KEY_FILE" => "redis.tls_key_file" = "",
        "rediss:// URLs: PEM private key of EA_REDIS_TLS_CERT_FILE";
    "EA_REDIS_OPERATION_TIMEOUT" ["EA_REDIS_OPEARATION_TIMEOUT"] => "redis.operation_timeout" = "3s",
        "how long a store operation may take before the request fails with FAILED_PRECONDITION";
    "EA_REDIS_SERVER_TIMEOUT" => "redis.server_timeout" = "100ms",
        "how long to wait for one server: Redlock decides without it after this (at most a tenth of the command's term); failover/cluster: for a replica to acknowledge a write";
    "EA_REDIS_REPLICA_ACKS" => "redis.replica_acks" = "1",
        "failover/cluster: replicas that must acknowledge a write before it is reported (WAIT), so a failover cannot lose it; 0: none";
    "EA_LEASE_MIN_TERM" => "lease.min_term" = "1s",
        "shortest term a request may ask for";
    "EA_LEASE_MAX_TERM" => "lease.max_term" = "1d",
        "longest term a request may ask for";
    "EA_LEASE_RETENTION" => "lease.retention" = "1d",
        "how long an election's record is kept after its lease ended, then removed (its fencing tokens still only increase); at least 1s";
    "EA_SHUTDOWN_TIMEOUT" => "shutdown_timeout" = "8s",
        "how long SIGTERM waits for in-flight requests before exiting";
    "EA_REQUEST_TIMEOUT" => "request_timeout" = "60s",
        "longest a request may take to be answered (Observe and watch: their first event), then DEADLINE_EXCEEDED / 503; at least EA_REDIS_OPERATION_TIMEOUT";
    "EA_HANDSHAKE_TIMEOUT" => "connection.handshake_timeout" = "10s",
        "a new connection must finish its TLS handshake (with EA_TLS_*) and send its first bytes (the HTTP/2 preface, or an HTTP/1 request line) within this, else it is closed";
    "EA_HEADER_READ_TIMEOUT" => "connection.header_read_timeout" = "10s",
        "HTTP/1: a request's headers must arrive within this from its first byte, else the connection is closed (slowloris)";
    "EA_BODY_READ_TIMEOUT" => "connection.body_read_timeout" = "10s",
        "a request's body must arrive within this from its headers, else the request fails";
    "EA_IDLE_TIMEOUT" => "connection.idle_timeout" = "2m",
        "a connection without a request in flight for this long is closed (HTTP/2: with GOAWAY)";
    "EA_KEEPALIVE_INTERVAL" => "connection.keepalive_interval" = "30s",
        "HTTP/2: a PING is sent to a client silent for this long";
    "EA_KEEPALIVE_TIMEOUT" => "connection.keepalive_timeout" = "10s",
        "HTTP/2: a connection whose PING is not answered within this is closed, with its streams";
}

/// Shortest retention of an ended lease's record: tokens of a new record start at the clock
/// in milliseconds, above every token of a record removed at least this long ago.
const MIN_RETENTION: Duration = Duration::from_secs(1);

/// Most replicas `EA_REDIS_REPLICA_ACKS` may require.
const MAX_REPLICA_ACKS: usize = 16;

/// Largest connection or stream limit: far beyond what one process can hold.
const MAX_COUNT: usize = 1_000_000;

/// The README's configuration table, generated from [`SETTINGS`].
pub fn markdown_table() -> String {
    let mut table =
        String::from("| variable | file key / flag | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let aliases: String = s
            .aliases
            .iter()
            .map(|a| format!(" (alias `{a}`)"))
            .collect();
        let default = if s.default.is_empty() {
            "(empty)".to_owned()
        } else {
            format!("`{}`", s.default)
        };
        table.push_str(&format!(
            "| `{}`{aliases} | `{}` / `--{}` | {default} | {} |\n",
            s.key,
            s.path,
            s.flag(),
            s.help.replace('|', "\\|")
        ));
    }
    table
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The YAML file.
    File(PathBuf),
    /// The environment.
    Environment,
    /// A command-line flag.
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => write!(f, "from {}", path.display()),
            Origin::Environment => f.write_str("from the environment"),
            Origin::Flag => f.write_str("from the command line"),
        }
    }
}

/// Why the configuration was refused. Each renders as a single line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that the setting does not allow.
    #[error("invalid configuration: {key}={value:?} ({origin}): {allowed}")]
    Invalid {
        /// The setting's key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Where it came from.
        origin: Origin,
        /// What is allowed.
        allowed: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("invalid configuration file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// `EA_ENV`: how the agent presents itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// JSON logs.
    Production,
    /// Human-readable logs.
    Development,
}

/// A listener that can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Serve it at all.
    pub enable: bool,
    /// Its TCP port.
    pub port: u16,
}

/// What one port allows at once, so that no client can take every descriptor or grow memory
/// without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortLimits {
    /// Open connections.
    pub max_connections: usize,
    /// HTTP/2 streams (requests) per connection: the SETTINGS_MAX_CONCURRENT_STREAMS sent.
    pub max_concurrent_streams: u32,
    /// Long-lived event streams (gRPC Observe, HTTP watch) on the whole port.
    pub max_event_streams: usize,
    /// Long-lived event streams per connection.
    pub max_event_streams_per_connection: usize,
}

/// How long a connection or a request may take at each step before it is closed or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accepting a connection to its first bytes, TLS handshake included.
    pub handshake: Duration,
    /// HTTP/1: from a request's first byte to the end of its headers.
    pub header_read: Duration,
    /// From a request's headers to the end of its body.
    pub body_read: Duration,
    /// A connection without a request in flight for this long is closed.
    pub idle: Duration,
    /// HTTP/2: a PING after this long without a frame from the client...
    pub keepalive_interval: Duration,
    /// ...which must be answered within this.
    pub keepalive_timeout: Duration,
    /// From a request's headers to its response's headers.
    pub request: Duration,
}

/// `EA_REDIS_MODE`: which lease store backs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// In-process.
    Memory,
    /// One Redis server, or a Redlock quorum of several.
    Single,
    /// Redis Sentinel.
    Failover,
    /// Redis Cluster.
    Cluster,
    /// Several Redlock groups, keys spread by CRC16.
    Sharding,
}

impl StoreMode {
    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreMode::Memory => "memory",
            StoreMode::Single => "single",
            StoreMode::Failover => "failover",
            StoreMode::Cluster => "cluster",
            StoreMode::Sharding => "sharding",
        }
    }
}

/// The lease store settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// The backend.
    pub mode: StoreMode,
    /// Redis URLs.
    pub urls: Vec<String>,
    /// Sentinel master name.
    pub master: String,
    /// Per-operation timeout.
    pub operation_timeout: Duration,
    /// Redlock: how long to wait for one server's answer before deciding without it;
    /// failover/cluster: for a replica to acknowledge a write.
    pub server_timeout: Duration,
    /// Failover/cluster: replicas that must acknowledge a write before it is reported.
    pub replica_acks: usize,
    /// Key prefix.
    pub key_prefix: String,
    /// How long a record is kept after its lease ended.
    pub retention: Duration,
    /// `EA_REDIS_TLS_*`: how `rediss://` URLs are connected to.
    pub tls: RedisTls,
}

/// `EA_REDIS_TLS_*`: the files TLS connections to Redis (`rediss://` URLs) use, read at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    /// CA certificates, PEM, the servers' certificates must chain to; none: the public web roots.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key, PEM, for servers that require one.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// `EA_TLS_*`: the files both ports serve TLS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, the server's own first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM: client certificates are required and must chain to one of them.
    pub client_ca: Option<PathBuf>,
}

/// `EA_AUTH_*`: who may call the API. Authentication is on when a token source is set, or
/// client certificates are required (`EA_TLS_CLIENT_CA_FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthConfig {
    /// `EA_AUTH_TOKENS_FILE`.
    pub tokens_file: Option<PathBuf>,
    /// `EA_AUTH_KUBERNETES`.
    pub kubernetes: bool,
    /// `EA_AUTH_AUDIENCE`.
    pub audience: String,
    /// `EA_AUTH_POLICY_FILE` (none: the default policy).
    pub policy_file: Option<PathBuf>,
    /// `EA_AUTH_METRICS`: `/metrics` needs a token too.
    pub metrics: bool,
    /// `EA_TLS_CLIENT_CA_FILE` is set: a verified client certificate names the caller of a
    /// request without a bearer token.
    pub client_certificates: bool,
}

impl AuthConfig {
    /// Whether requests must be authenticated.
    pub fn enabled(&self) -> bool {
        self.tokens_file.is_some() || self.kubernetes || self.client_certificates
    }
}

/// The agent's whole configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `EA_ENV`.
    pub environment: Environment,
    /// `EA_LOG_LEVEL`, as a `tracing` level name.
    pub log_level: tracing::Level,
    /// `EA_NAME`.
    pub name: String,
    /// `EA_BIND_ADDRESS`.
    pub bind_address: IpAddr,
    /// `EA_GRPC_*`.
    pub grpc: Listener,
    /// `EA_HTTP_*`.
    pub http: Listener,
    /// `EA_GRPC_MAX_*`.
    pub grpc_limits: PortLimits,
    /// `EA_HTTP_MAX_*`.
    pub http_limits: PortLimits,
    /// `EA_*_TIMEOUT` of connections and requests, `EA_KEEPALIVE_*`.
    pub timeouts: Timeouts,
    /// `EA_METRIC_ENABLE`.
    pub metrics_enabled: bool,
    /// `EA_METRIC_REQUEST_DURATION_BUCKETS`.
    pub request_duration_buckets: Vec<f64>,
    /// `EA_KUBE_ENABLE`.
    pub kube_enabled: bool,
    /// `EA_KUBE_IN_CLUSTER`.
    pub kube_in_cluster: bool,
    /// `EA_KUBE_NAMESPACES` (empty: the whole cluster).
    pub kube_namespaces: Vec<String>,
    /// `EA_CONTROLLER_ENABLE`.
    pub controller_enabled: bool,
    /// `EA_CONTROLLER_TERM`.
    pub controller_term: Duration,
    /// `EA_TLS_*` (none: plain TCP).
    pub tls: Option<TlsFiles>,
    /// `EA_AUTH_*`.
    pub auth: AuthConfig,
    /// `EA_REDIS_*` and `EA_KEY_PREFIX`.
    pub store: StoreConfig,
    /// `EA_LEASE_MIN_TERM`, `EA_LEASE_MAX_TERM`.
    pub terms: TermBounds,
    /// `EA_SHUTDOWN_TIMEOUT`.
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Sources::default()
            .resolve()
            .expect("the built-in defaults are valid")
    }
}

/// The raw values of every source, before parsing.
#[derive(Debug, Default)]
pub struct Sources {
    file: Option<(PathBuf, String)>,
    environment: Vec<(String, String)>,
    flags: Vec<(&'static str, String)>,
}

impl Sources {
    /// Adds the YAML configuration file `path` with contents `text`.
    pub fn file(mut self, path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        self.file = Some((path.into(), text.into()));
        self
    }

    /// Reads the YAML configuration file at `path`.
    pub fn read_file(self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::File {
            path: path.to_owned(),
            reason: err.to_string(),
        })?;
        Ok(self.file(path, text))
    }

    /// Adds environment variables (all of them; only `EA_*` keys are looked at).
    pub fn environment(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.environment.extend(vars);
        self
    }

    /// Adds a command-line value for the setting `key`.
    pub fn flag(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.flags.push((key, value.into()));
        self
    }

    /// `EA_*` variables that no setting reads (e.g. the Go service's zone settings), to warn about.
    pub fn unknown_environment_keys(&self) -> Vec<&str> {
        self.environment
            .iter()
            .map(|(key, _)| key.as_str())
            .filter(|key| key.starts_with("EA_") && *key != "EA_CONFIG_FILE")
            .filter(|key| setting_for_env(key).is_none())
            .collect()
    }

    /// Merges the sources and validates the result.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut values: BTreeMap<&'static str, (String, Origin)> = SETTINGS
            .iter()
            .map(|s| (s.key, (s.default.to_owned(), Origin::Default)))
            .collect();
        if let Some((path, text)) = &self.file {
            for (key, value) in file_values(path, text)? {
                values.insert(key, (value, Origin::File(path.clone())));
            }
        }
        // Canonical names win over aliases when both are set.
        for (key, value) in &self.environment {
            if let Some(setting) = setting_for_env(key).filter(|s| s.key != key) {
                values.insert(setting.key, (value.clone(), Origin::Environment));
            }
        }
        for (key, value) in &self.environment {
            if let Some(setting) = setting_for_env(key).filter(|s| s.key == key) {
                values.insert(setting.key, (value.clone(), Origin::Environment));
            }
        }
        for (key, value) in &self.flags {
            values.insert(key, (value.clone(), Origin::Flag));
        }
        Values(values).parse()
    }
}

fn setting_for_env(key: &str) -> Option<&'static Setting> {
    SETTINGS
        .iter()
        .find(|s| s.key == key || s.aliases.contains(&key))
}

/// Flattens the YAML file into `(key, value)` pairs; unknown keys are refused, since a typo would
/// otherwise silently keep the default.
fn file_values(path: &Path, text: &str) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let error = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let document: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|err| error(one_line(&err.to_string())))?;
    let mut flat = Vec::new();
    flatten("", &document, &mut flat).map_err(error)?;
    flat.into_iter()
        .map(|(path, value)| {
            let setting = SETTINGS.iter().find(|s| s.path == path).ok_or_else(|| {
                let known: Vec<_> = SETTINGS.iter().map(|s| s.path).collect();
                error(format!(
                    "unknown key {path:?}; known keys: {}",
                    known.join(", ")
                ))
            })?;
            Ok((setting.key, value))
        })
        .collect()
}

fn flatten(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    use serde_json::Value;
    let scalar = |value: &Value| match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        Value::Array(_) | Value::Object(_) => None,
    };
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, value, out)?;
            }
        }
        Value::Null if prefix.is_empty() => {}
        Value::Array(items) => {
            let items: Option<Vec<String>> = items.iter().map(scalar).collect();
            let items = items.ok_or_else(|| format!("{prefix} must be a list of plain values"))?;
            out.push((prefix.to_owned(), items.join(",")));
        }
        _ if prefix.is_empty() => return Err("expected a mapping of settings".into()),
        value => out.extend(scalar(value).map(|v| (prefix.to_owned(), v))),
    }
    Ok(())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Values(BTreeMap<&'static str, (String, Origin)>);

impl Values {
    fn raw(&self, key: &'static str) -> &(String, Origin) {
        // Every key of SETTINGS has a value: the defaults are inserted first.
        &self.0[key]
    }

    fn get<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, origin) = self.raw(key);
        parse(value.trim()).map_err(|allowed| ConfigError::Invalid {
            key,
            value: value.clone(),
            origin: origin.clone(),
            allowed,
        })
    }

    /// Reports a value that is valid alone but not together with others.
    fn conflict(&self, key: &'static str, allowed: String) -> ConfigError {
        let (value, origin) = self.raw(key);
        ConfigError::Invalid {
            key,
            value: value.clone(),
            origin: origin.clone(),
            allowed,
        }
    }

    /// One port's limits: each at least 1, event streams per connection at most the port's and
    /// fewer than the streams a connection may open (a connection full of event streams could
    /// otherwise send nothing else).
    fn port_limits(
        &self,
        connections: &'static str,
        streams: &'static str,
        event_streams: &'static str,
        event_streams_per_connection: &'static str,
    ) -> Result<PortLimits, ConfigError> {
        let limits = PortLimits {
            max_connections: self.get(connections, count)?,
            max_concurrent_streams: self.get(streams, |v| {
                count(v).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            })?,
            max_event_streams: self.get(event_streams, count)?,
            max_event_streams_per_connection: self.get(event_streams_per_connection, count)?,
        };
        if limits.max_event_streams_per_connection > limits.max_event_streams {
            return Err(self.conflict(
                event_streams_per_connection,
                format!(
                    "must not be more than {event_streams} ({})",
                    limits.max_event_streams
                ),
            ));
        }
        if limits.max_event_streams_per_connection >= limits.max_concurrent_streams as usize {
            return Err(self.conflict(
                event_streams_per_connection,
                format!(
                    "must be fewer than {streams} ({}), so that other requests keep room",
                    limits.max_concurrent_streams
                ),
            ));
        }
        Ok(limits)
    }

    fn parse(&self) -> Result<Config, ConfigError> {
        let environment = self.get("EA_ENV", |v| match v {
            "production" | "benchmark" => Ok(Environment::Production),
            "development" | "test" => Ok(Environment::Development),
            _ => Err("allowed: production, development, test, benchmark".into()),
        })?;
        let log_level = self.get("EA_LOG_LEVEL", |v| match v.to_ascii_lowercase().as_str() {
            "trace" => Ok(tracing::Level::TRACE),
            "debug" => Ok(tracing::Level::DEBUG),
            "info" => Ok(tracing::Level::INFO),
            "warn" | "warning" => Ok(tracing::Level::WARN),
            "error" | "panic" | "fatal" => Ok(tracing::Level::ERROR),
            _ => Err("allowed: trace, debug, info, warning, error, panic, fatal".into()),
        })?;
        let name = self.get("EA_NAME", non_empty)?;
        let key_prefix = self.get("EA_KEY_PREFIX", |v| {
            Name::parse("key_prefix", v)
                .map(|_| v.to_owned())
                .map_err(|err| err.reason)
        })?;
        let bind_address = self.get("EA_BIND_ADDRESS", |v| {
            v.parse()
                .map_err(|_| "expected an IP address such as 0.0.0.0 or 127.0.0.1".into())
        })?;
        let grpc = Listener {
            enable: self.get("EA_GRPC_ENABLE", boolean)?,
            port: self.get("EA_GRPC_PORT", port)?,
        };
        let http = Listener {
            enable: self.get("EA_HTTP_ENABLE", boolean)?,
            port: self.get("EA_HTTP_PORT", port)?,
        };
        let grpc_limits = self.port_limits(
            "EA_GRPC_MAX_CONNECTIONS",
            "EA_GRPC_MAX_CONCURRENT_STREAMS",
            "EA_GRPC_MAX_OBSERVE_STREAMS",
            "EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION",
        )?;
        let http_limits = self.port_limits(
            "EA_HTTP_MAX_CONNECTIONS",
            "EA_HTTP_MAX_CONCURRENT_STREAMS",
            "EA_HTTP_MAX_WATCH_STREAMS",
            "EA_HTTP_MAX_WATCH_STREAMS_PER_CONNECTION",
        )?;
        let metrics_enabled = self.get("EA_METRIC_ENABLE", boolean)?;
        if metrics_enabled && !http.enable {
            return Err(self.conflict(
                "EA_METRIC_ENABLE",
                "metrics are served over HTTP: set EA_HTTP_ENABLE=true or EA_METRIC_ENABLE=false"
                    .into(),
            ));
        }
        let request_duration_buckets = self.get("EA_METRIC_REQUEST_DURATION_BUCKETS", buckets)?;

        let urls: Vec<String> = self.get("EA_REDIS_URLS", |v| {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect())
        })?;
        let mode = self.get("EA_REDIS_MODE", |v| match v {
            "" if urls.is_empty() => Ok(StoreMode::Memory),
            "" | "single" => Ok(StoreMode::Single),
            "memory" => Ok(StoreMode::Memory),
            "failover" => Ok(StoreMode::Failover),
            "cluster" => Ok(StoreMode::Cluster),
            "sharding" => Ok(StoreMode::Sharding),
            _ => Err("allowed: memory, single, failover, cluster, sharding".into()),
        })?;
        if mode != StoreMode::Memory && urls.is_empty() {
            return Err(self.conflict(
                "EA_REDIS_URLS",
                format!(
                    "EA_REDIS_MODE={} needs at least one Redis URL",
                    mode.as_str()
                ),
            ));
        }
        // A setting the chosen mode would ignore is a mistake, not a preference: a Redis URL next
        // to `memory` (say, a file's mode under an environment's URLs) would otherwise run a
        // store of its own in each replica, silently.
        let mode_given = || {
            let (value, origin) = self.raw("EA_REDIS_MODE");
            format!("EA_REDIS_MODE={value} ({origin})")
        };
        if mode == StoreMode::Memory && !urls.is_empty() {
            return Err(self.conflict(
                "EA_REDIS_URLS",
                format!(
                    "{} keeps leases in this agent and uses no Redis: remove EA_REDIS_URLS, or \
                     set EA_REDIS_MODE to single, failover, cluster or sharding",
                    mode_given()
                ),
            ));
        }
        let master = self.get("EA_REDIS_MASTER", |v| Ok(v.to_owned()))?;
        if mode == StoreMode::Failover && master.is_empty() {
            return Err(self.conflict(
                "EA_REDIS_MASTER",
                "EA_REDIS_MODE=failover needs the Sentinel master's name".into(),
            ));
        }
        if mode != StoreMode::Failover && !master.is_empty() {
            return Err(self.conflict(
                "EA_REDIS_MASTER",
                format!(
                    "only failover (Sentinel) mode uses a master's name, not {}: remove it or \
                     set EA_REDIS_MODE=failover",
                    mode_given()
                ),
            ));
        }
        let redis_tls = self.redis_tls(&urls)?;
        let operation_timeout = self.get("EA_REDIS_OPERATION_TIMEOUT", positive_duration)?;
        let server_timeout = self.get("EA_REDIS_SERVER_TIMEOUT", positive_duration)?;
        let replica_acks = self.get("EA_REDIS_REPLICA_ACKS", |v| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_REPLICA_ACKS)
                .ok_or_else(|| format!("expected a number of replicas 0..={MAX_REPLICA_ACKS}"))
        })?;
        if server_timeout > operation_timeout {
            return Err(self.conflict(
                "EA_REDIS_SERVER_TIMEOUT",
                format!(
                    "must not be longer than EA_REDIS_OPERATION_TIMEOUT ({} ms)",
                    operation_timeout.as_millis()
                ),
            ));
        }

        let request_timeout = self.get("EA_REQUEST_TIMEOUT", positive_duration)?;
        // A shorter deadline would turn a store outage's FAILED_PRECONDITION into
        // DEADLINE_EXCEEDED, and cut the store's own timeout short.
        if request_timeout < operation_timeout {
            return Err(self.conflict(
                "EA_REQUEST_TIMEOUT",
                format!(
                    "must not be shorter than EA_REDIS_OPERATION_TIMEOUT ({} ms)",
                    operation_timeout.as_millis()
                ),
            ));
        }
        let timeouts = Timeouts {
            handshake: self.get("EA_HANDSHAKE_TIMEOUT", positive_duration)?,
            header_read: self.get("EA_HEADER_READ_TIMEOUT", positive_duration)?,
            body_read: self.get("EA_BODY_READ_TIMEOUT", positive_duration)?,
            idle: self.get("EA_IDLE_TIMEOUT", positive_duration)?,
            keepalive_interval: self.get("EA_KEEPALIVE_INTERVAL", positive_duration)?,
            keepalive_timeout: self.get("EA_KEEPALIVE_TIMEOUT", positive_duration)?,
            request: request_timeout,
        };

        let tls = self.tls()?;
        let auth = self.auth(tls.as_ref())?;

        let min = self.get("EA_LEASE_MIN_TERM", term)?;
        let max = self.get("EA_LEASE_MAX_TERM", term)?;
        if min > max {
            return Err(self.conflict(
                "EA_LEASE_MAX_TERM",
                format!(
                    "must not be shorter than EA_LEASE_MIN_TERM ({} ms)",
                    min.as_millis()
                ),
            ));
        }

        Ok(Config {
            environment,
            log_level,
            name,
            bind_address,
            grpc,
            http,
            grpc_limits,
            http_limits,
            timeouts,
            metrics_enabled,
            request_duration_buckets,
            kube_enabled: self.get("EA_KUBE_ENABLE", boolean)?,
            kube_in_cluster: self.get("EA_KUBE_IN_CLUSTER", boolean)?,
            kube_namespaces: self.get("EA_KUBE_NAMESPACES", namespaces)?,
            controller_enabled: self.get("EA_CONTROLLER_ENABLE", boolean)?,
            controller_term: self.get("EA_CONTROLLER_TERM", positive_duration)?,
            tls,
            auth,
            store: StoreConfig {
                mode,
                urls,
                master,
                operation_timeout,
                server_timeout,
                replica_acks,
                key_prefix,
                retention: self.get("EA_LEASE_RETENTION", retention)?,
                tls: redis_tls,
            },
            terms: TermBounds { min, max },
            shutdown_timeout: self.get("EA_SHUTDOWN_TIMEOUT", positive_duration)?,
        })
    }
}

impl Values {
    /// `EA_TLS_*`: a certificate needs its key and the other way round, and client certificates
    /// need TLS.
    fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let file = |v: &str| Ok((!v.is_empty()).then(|| PathBuf::from(v)));
        let cert = self.get("EA_TLS_CERT_FILE", file)?;
        let key = self.get("EA_TLS_KEY_FILE", file)?;
        let client_ca = self.get("EA_TLS_CLIENT_CA_FILE", file)?;
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert,
                key,
                client_ca,
            })),
            (Some(_), None) => Err(self.conflict(
                "EA_TLS_CERT_FILE",
                "needs its private key: set EA_TLS_KEY_FILE too".into(),
            )),
            (None, Some(_)) => Err(self.conflict(
                "EA_TLS_KEY_FILE",
                "needs its certificate: set EA_TLS_CERT_FILE too".into(),
            )),
            (None, None) if client_ca.is_some() => Err(self.conflict(
                "EA_TLS_CLIENT_CA_FILE",
                "client certificates need TLS: set EA_TLS_CERT_FILE and EA_TLS_KEY_FILE".into(),
            )),
            (None, None) => Ok(None),
        }
    }

    /// `EA_REDIS_TLS_*`, which apply to `rediss://` URLs: all the URLs are, or none (a Redlock
    /// quorum or a Sentinel set half on TLS is a mistake), and a certificate needs its key.
    fn redis_tls(&self, urls: &[String]) -> Result<RedisTls, ConfigError> {
        let file = |v: &str| Ok((!v.is_empty()).then(|| PathBuf::from(v)));
        let ca = self.get("EA_REDIS_TLS_CA_FILE", file)?;
        let cert = self.get("EA_REDIS_TLS_CERT_FILE", file)?;
        let key = self.get("EA_REDIS_TLS_KEY_FILE", file)?;
        let secure = |url: &String| url.starts_with("rediss://");
        if urls.iter().any(secure) && !urls.iter().all(secure) {
            return Err(self.conflict(
                "EA_REDIS_URLS",
                "mixes rediss:// and redis:// URLs: use TLS with every server or with none".into(),
            ));
        }
        if !urls.iter().any(secure) {
            for (key, given) in [
                ("EA_REDIS_TLS_CA_FILE", ca.is_some()),
                ("EA_REDIS_TLS_CERT_FILE", cert.is_some()),
                ("EA_REDIS_TLS_KEY_FILE", key.is_some()),
            ] {
                if given {
                    return Err(self.conflict(
                        key,
                        "applies to TLS connections to Redis, and EA_REDIS_URLS has no \
                         rediss:// URL"
                            .into(),
                    ));
                }
            }
        }
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (Some(_), None) => {
                return Err(self.conflict(
                    "EA_REDIS_TLS_CERT_FILE",
                    "needs its private key: set EA_REDIS_TLS_KEY_FILE too".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(self.conflict(
                    "EA_REDIS_TLS_KEY_FILE",
                    "needs its certificate: set EA_REDIS_TLS_CERT_FILE too".into(),
                ));
            }
            (None, None) => None,
        };
        Ok(RedisTls { ca, client })
    }

    /// `EA_AUTH_*`. A policy, or a protected `/metrics`, without a way to authenticate would
    /// leave every request refused (or the setting silently ignored): refused.
    fn auth(&self, tls: Option<&TlsFiles>) -> Result<AuthConfig, ConfigError> {
        let file = |v: &str| Ok((!v.is_empty()).then(|| PathBuf::from(v)));
        let auth = AuthConfig {
            tokens_file: self.get("EA_AUTH_TOKENS_FILE", file)?,
            kubernetes: self.get("EA_AUTH_KUBERNETES", boolean)?,
            audience: self.get("EA_AUTH_AUDIENCE", non_empty)?,
            policy_file: self.get("EA_AUTH_POLICY_FILE", file)?,
            metrics: self.get("EA_AUTH_METRICS", boolean)?,
            client_certificates: tls.is_some_and(|tls| tls.client_ca.is_some()),
        };
        let needs_authentication = |key| {
            self.conflict(
                key,
                "applies to authenticated callers, and authentication is off: set \
                 EA_AUTH_TOKENS_FILE, EA_AUTH_KUBERNETES=true or EA_TLS_CLIENT_CA_FILE"
                    .into(),
            )
        };
        if !auth.enabled() && auth.policy_file.is_some() {
            return Err(needs_authentication("EA_AUTH_POLICY_FILE"));
        }
        if !auth.enabled() && auth.metrics {
            return Err(needs_authentication("EA_AUTH_METRICS"));
        }
        Ok(auth)
    }
}

fn non_empty(value: &str) -> Result<String, String> {
    if value.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(value.to_owned())
    }
}

fn boolean(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("allowed: true, false (or 1/0, yes/no, on/off)".into()),
    }
}

fn port(value: &str) -> Result<u16, String> {
    value
        .parse()
        .map_err(|_| "expected a port number 0..=65535 (0 picks a free port)".into())
}

fn count(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_COUNT).contains(n))
        .ok_or_else(|| format!("expected a number 1..={MAX_COUNT}"))
}

fn namespaces(value: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    let valid = |n: &str| {
        n.len() <= 63
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if names.iter().all(|n| valid(n)) {
        Ok(names)
    } else {
        Err("expected comma-separated namespace names (lower-case letters, digits and '-')".into())
    }
}

fn retention(value: &str) -> Result<Duration, String> {
    Some(duration(value)?)
        .filter(|d| *d >= MIN_RETENTION)
        .ok_or_else(|| "expected a duration of at least 1s such as 1h or 1d".into())
}

fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|_| "expected a duration such as 500ms, 3s, 1m or 1d".into())
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    duration(value).and_then(|d| {
        if d.is_zero() {
            Err("must be longer than zero".into())
        } else {
            Ok(d)
        }
    })
}

fn term(value: &str) -> Result<Term, String> {
    let d = positive_duration(value)?;
    u64::try_from(d.as_millis())
        .ok()
        .filter(|ms| *ms >= 1)
        .map(Term::from_millis)
        .ok_or_else(|| "expected a duration of at least 1ms such as 1s or 1d".into())
}

fn buckets(value: &str) -> Result<Vec<f64>, String> {
    const ALLOWED: &str = "expected comma-separated, strictly increasing positive numbers of seconds such as 0.1,0.25,0.5,1";
    let bounds: Vec<f64> = value
        .split(',')
        .map(|b| b.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| ALLOWED.to_owned())?;
    let increasing = bounds.windows(2).all(|w| w[0] < w[1]);
    if bounds.is_empty() || !increasing || bounds.iter().any(|b| !b.is_finite() || *b <= 0.0) {
        return Err(ALLOWED.into());
    }
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_those_of_the_go_service() {
        let config = Config::default();
        assert_eq!(
            config.grpc,
            Listener {
                enable: true,
                port: 443
            }
        );
        assert_eq!(
            config.http,
            Listener {
                enable: true,
                port: 80
            }
        );
        assert_eq!(config.store.mode, StoreMode::Memory);
        assert_eq!(config.store.key_prefix, "ela");
        assert_eq!(config.store.operation_timeout, Duration::from_secs(3));
        assert_eq!(config.store.server_timeout, Duration::from_millis(100));
        assert_eq!(config.store.replica_acks, 1);
        assert_eq!(config.terms, TermBounds::default());
        assert_eq!(config.environment, Environment::Production);
        assert!(config.request_duration_buckets.contains(&0.25));
    }

    /// Both ports' caps and a reserve fit in a 20,000-descriptor limit with room to spare, and
    /// a connection full of event streams still has streams left for other calls.
    #[test]
    fn default_limits_fit_a_common_descriptor_limit_and_leave_streams_for_calls() {
        let config = Config::default();
        assert_eq!(
            (config.grpc_limits, config.http_limits),
            (
                PortLimits {
                    max_connections: 4096,
                    max_concurrent_streams: 1000,
                    max_event_streams: 10_000,
                    max_event_streams_per_connection: 500,
                },
                PortLimits {
                    max_connections: 4096,
                    max_concurrent_streams: 200,
                    max_event_streams: 1000,
                    max_event_streams_per_connection: 100,
                }
            )
        );
        assert!(config.grpc_limits.max_connections + config.http_limits.max_connections < 10_000);
        assert_eq!(
            config.timeouts,
            Timeouts {
                handshake: Duration::from_secs(10),
                header_read: Duration::from_secs(10),
                body_read: Duration::from_secs(10),
                idle: Duration::from_secs(120),
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
                request: Duration::from_secs(60),
            }
        );
    }

    #[test]
    fn file_then_environment_then_flags_override_each_other() {
        let file = "grpc:\n  port: 1000\nhttp:\n  port: 2000\nname: from-file\nredis:\n  urls: [redis://a:6379, redis://b:6379]\n";
        let config = Sources::default()
            .file("agent.yaml", file)
            .environment(env(&[("EA_HTTP_PORT", "3000"), ("EA_NAME", "from-env")]))
            .flag("EA_NAME", "from-flag")
            .resolve()
            .unwrap();
        assert_eq!(config.grpc.port, 1000, "file over default");
        assert_eq!(config.http.port, 3000, "environment over file");
        assert_eq!(config.name, "from-flag", "flag over environment");
        assert_eq!(config.store.urls, ["redis://a:6379", "redis://b:6379"]);
        assert_eq!(
            config.store.mode,
            StoreMode::Single,
            "URLs without a mode mean single"
        );
    }

    #[test]
    fn aliases_of_the_go_service_are_read_and_canonical_names_win() {
        let config = Sources::default()
            .environment(env(&[
                ("EA_REDIS_OPEARATION_TIMEOUT", "5s"),
                ("EA_REDIS_PREFIX", "old"),
            ]))
            .resolve()
            .unwrap();
        assert_eq!(config.store.operation_timeout, Duration::from_secs(5));
        assert_eq!(config.store.key_prefix, "old");
        let config = Sources::default()
            .environment(env(&[("EA_KEY_PREFIX", "new"), ("EA_REDIS_PREFIX", "old")]))
            .resolve()
            .unwrap();
        assert_eq!(config.store.key_prefix, "new");
    }

    #[test]
    fn invalid_values_name_key_value_origin_and_what_is_allowed_on_one_line() {
        let cases = [
            ("EA_HTTP_PORT", "abc", "port number"),
            ("EA_GRPC_PORT", "70000", "port number"),
            (
                "EA_REDIS_MODE",
                "bogus",
                "memory, single, failover, cluster, sharding",
            ),
            ("EA_ENV", "staging", "production, development"),
            ("EA_LOG_LEVEL", "loud", "debug, info"),
            ("EA_GRPC_ENABLE", "maybe", "true, false"),
            ("EA_REDIS_OPERATION_TIMEOUT", "soon", "duration"),
            ("EA_REDIS_OPERATION_TIMEOUT", "0s", "longer than zero"),
            ("EA_METRIC_REQUEST_DURATION_BUCKETS", "1,0.5", "increasing"),
            ("EA_BIND_ADDRESS", "localhost", "IP address"),
            ("EA_KEY_PREFIX", "a*b", "only letters"),
            ("EA_LEASE_MAX_TERM", "500ms", "EA_LEASE_MIN_TERM"),
            (
                "EA_REDIS_SERVER_TIMEOUT",
                "5s",
                "EA_REDIS_OPERATION_TIMEOUT",
            ),
            ("EA_REDIS_SERVER_TIMEOUT", "0ms", "longer than zero"),
            ("EA_REDIS_REPLICA_ACKS", "many", "number of replicas"),
            ("EA_GRPC_MAX_CONNECTIONS", "0", "1..=1000000"),
            ("EA_HTTP_MAX_WATCH_STREAMS", "lots", "1..=1000000"),
            ("EA_IDLE_TIMEOUT", "0s", "longer than zero"),
            ("EA_HEADER_READ_TIMEOUT", "soon", "duration"),
            ("EA_REQUEST_TIMEOUT", "1s", "EA_REDIS_OPERATION_TIMEOUT"),
            (
                "EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION",
                "1000",
                "EA_GRPC_MAX_CONCURRENT_STREAMS",
            ),
            (
                "EA_HTTP_MAX_WATCH_STREAMS_PER_CONNECTION",
                "200",
                "EA_HTTP_MAX_CONCURRENT_STREAMS",
            ),
        ];
        for (key, value, allowed) in cases {
            let err = Sources::default()
                .environment(env(&[(key, value)]))
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "invalid configuration: {key}={value:?} (from the environment): "
                )),
                "{err}"
            );
            assert!(err.contains(allowed), "{err} should say {allowed}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn combinations_that_cannot_work_are_refused() {
        let refused = |pairs: &[(&str, &str)], key: &str| {
            let err = Sources::default()
                .environment(env(pairs))
                .resolve()
                .unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        };
        refused(&[("EA_REDIS_MODE", "single")], "EA_REDIS_URLS");
        refused(
            &[
                ("EA_REDIS_MODE", "failover"),
                ("EA_REDIS_URLS", "redis://s:26379"),
            ],
            "EA_REDIS_MASTER",
        );
        refused(&[("EA_HTTP_ENABLE", "false")], "EA_METRIC_ENABLE");
        refused(
            &[
                ("EA_GRPC_MAX_OBSERVE_STREAMS", "10"),
                ("EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION", "20"),
            ],
            "EA_GRPC_MAX_OBSERVE_STREAMS_PER_CONNECTION",
        );
        refused(
            &[
                ("EA_REDIS_MASTER", "mymaster"),
                ("EA_REDIS_URLS", "redis://r:6379"),
            ],
            "EA_REDIS_MASTER",
        );
    }

    #[test]
    fn tls_takes_a_certificate_with_its_key_and_client_certificates_only_with_both() {
        let refused = |pairs: &[(&str, &str)], key: &str, says: &str| {
            let err = Sources::default()
                .environment(env(pairs))
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid configuration: {key}=")),
                "{err}"
            );
            assert!(err.contains(says), "{err} should say {says}");
        };
        refused(
            &[("EA_TLS_CERT_FILE", "tls.crt")],
            "EA_TLS_CERT_FILE",
            "set EA_TLS_KEY_FILE",
        );
        refused(
            &[("EA_TLS_KEY_FILE", "tls.key")],
            "EA_TLS_KEY_FILE",
            "set EA_TLS_CERT_FILE",
        );
        refused(
            &[("EA_TLS_CLIENT_CA_FILE", "ca.crt")],
            "EA_TLS_CLIENT_CA_FILE",
            "EA_TLS_CERT_FILE and EA_TLS_KEY_FILE",
        );
        assert_eq!(Config::default().tls, None);
        let config = Sources::default()
            .file(
                "agent.yaml",
                "tls:\n  cert_file: tls.crt\n  key_file: tls.key\n",
            )
            .environment(env(&[("EA_TLS_CLIENT_CA_FILE", "ca.crt")]))
            .resolve()
            .unwrap();
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "tls.crt".into(),
                key: "tls.key".into(),
                client_ca: Some("ca.crt".into()),
            })
        );
    }

    /// The trap of the review: `--config config/local.yaml` (mode `memory`) with `EA_REDIS_URLS`
    /// in the environment ran the memory store, silently.
    #[test]
    fn redis_urls_next_to_the_memory_mode_stop_start_up_naming_both() {
        let err = Sources::default()
            .file("local.yaml", "redis:\n  mode: memory\n")
            .environment(env(&[("EA_REDIS_URLS", "redis://r:6379")]))
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "invalid configuration: EA_REDIS_URLS=\"redis://r:6379\" (from the environment): "
            ),
            "{err}"
        );
        assert!(
            err.contains("EA_REDIS_MODE=memory (from local.yaml)"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        // Without a mode, URLs choose single mode, and without URLs the memory store runs.
        let urls = Sources::default()
            .environment(env(&[("EA_REDIS_URLS", "redis://r:6379")]))
            .resolve()
            .unwrap();
        assert_eq!(urls.store.mode, StoreMode::Single);
    }

    #[test]
    fn file_errors_name_the_file_and_the_unknown_key() {
        let err = Sources::default()
            .file("agent.yaml", "grpc:\n  prot: 1\n")
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.yaml") && err.contains("\"grpc.prot\""),
            "{err}"
        );
        let err = Sources::default()
            .file("agent.yaml", "grpc: [\n")
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid configuration file agent.yaml: "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let err = Sources::default()
            .file("agent.yaml", "http:\n  port: abc\n")
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EA_HTTP_PORT=\"abc\" (from agent.yaml)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_ea_variables_are_reported_for_a_warning() {
        let sources = Sources::default().environment(env(&[
            ("EA_ZONE_ENABLE", "false"),
            ("EA_GRPC_PORT", "1"),
            ("EA_CONFIG_FILE", "x.yaml"),
            ("HOME", "/root"),
        ]));
        assert_eq!(sources.unknown_environment_keys(), ["EA_ZONE_ENABLE"]);
    }

    #[test]
    fn authentication_is_off_by_default_and_a_policy_or_protected_metrics_need_it() {
        let config = Config::default();
        assert!(!config.auth.enabled());
        assert_eq!(config.auth.audience, "election-agent");
        let config = Sources::default()
            .environment(env(&[
                ("EA_AUTH_TOKENS_FILE", "/etc/ea/tokens.csv"),
                ("EA_AUTH_POLICY_FILE", "/etc/ea/policy.yaml"),
                ("EA_AUTH_METRICS", "true"),
            ]))
            .resolve()
            .unwrap();
        assert!(config.auth.enabled());
        assert_eq!(
            config.auth.tokens_file.as_deref(),
            Some(Path::new("/etc/ea/tokens.csv"))
        );
        assert_eq!(
            config.auth.policy_file.as_deref(),
            Some(Path::new("/etc/ea/policy.yaml"))
        );
        let kubernetes = Sources::default()
            .file(
                "agent.yaml",
                "auth:\n  kubernetes: true\n  audience: jobs\n",
            )
            .resolve()
            .unwrap();
        assert!(kubernetes.auth.enabled() && kubernetes.auth.kubernetes);
        assert_eq!(kubernetes.auth.audience, "jobs");
        for (key, value) in [
            ("EA_AUTH_POLICY_FILE", "/etc/ea/policy.yaml"),
            ("EA_AUTH_METRICS", "true"),
        ] {
            let err = Sources::default()
                .environment(env(&[(key, value)]))
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "invalid configuration: {key}={value:?} (from the environment): "
                )) && err.contains(
                    "set EA_AUTH_TOKENS_FILE, EA_AUTH_KUBERNETES=true or EA_TLS_CLIENT_CA_FILE"
                ),
                "{err}"
            );
        }
        // Required client certificates name the caller: authentication is on, a policy applies.
        let certificates = Sources::default()
            .environment(env(&[
                ("EA_TLS_CERT_FILE", "/etc/ea/tls.crt"),
                ("EA_TLS_KEY_FILE", "/etc/ea/tls.key"),
                ("EA_TLS_CLIENT_CA_FILE", "/etc/ea/clients.crt"),
                ("EA_AUTH_POLICY_FILE", "/etc/ea/policy.yaml"),
            ]))
            .resolve()
            .unwrap();
        assert!(certificates.auth.enabled() && certificates.auth.client_certificates);
        let err = Sources::default()
            .environment(env(&[("EA_AUTH_AUDIENCE", "")]))
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("EA_AUTH_AUDIENCE"), "{err}");
    }

    #[test]
    fn redis_tls_files_apply_to_rediss_urls_only_and_every_url_or_none_is_rediss() {
        let resolve = |pairs: &[(&str, &str)]| {
            Sources::default()
                .environment(env(pairs))
                .resolve()
                .map_err(|err| err.to_string())
        };
        let config = resolve(&[
            ("EA_REDIS_URLS", "rediss://r1:6380,rediss://r2:6380"),
            ("EA_REDIS_TLS_CA_FILE", "/etc/ea/redis-ca.crt"),
            ("EA_REDIS_TLS_CERT_FILE", "/etc/ea/redis.crt"),
            ("EA_REDIS_TLS_KEY_FILE", "/etc/ea/redis.key"),
        ])
        .unwrap();
        assert_eq!(
            config.store.tls,
            RedisTls {
                ca: Some("/etc/ea/redis-ca.crt".into()),
                client: Some(("/etc/ea/redis.crt".into(), "/etc/ea/redis.key".into())),
            }
        );
        // rediss:// alone trusts the public roots.
        let config = resolve(&[("EA_REDIS_URLS", "rediss://r1:6380")]).unwrap();
        assert_eq!(config.store.tls, RedisTls::default());

        for (pairs, key, why) in [
            (
                &[("EA_REDIS_URLS", "rediss://r1:6380,redis://r2:6379")][..],
                "EA_REDIS_URLS",
                "mixes rediss:// and redis://",
            ),
            (
                &[
                    ("EA_REDIS_URLS", "redis://r1:6379"),
                    ("EA_REDIS_TLS_CA_FILE", "/ca.crt"),
                ][..],
                "EA_REDIS_TLS_CA_FILE",
                "no rediss:// URL",
            ),
            (
                &[("EA_REDIS_TLS_CERT_FILE", "/c.crt")][..],
                "EA_REDIS_TLS_CERT_FILE",
                "no rediss:// URL",
            ),
            (
                &[
                    ("EA_REDIS_URLS", "rediss://r1:6380"),
                    ("EA_REDIS_TLS_CERT_FILE", "/c.crt"),
                ][..],
                "EA_REDIS_TLS_CERT_FILE",
                "set EA_REDIS_TLS_KEY_FILE too",
            ),
            (
                &[
                    ("EA_REDIS_URLS", "rediss://r1:6380"),
                    ("EA_REDIS_TLS_KEY_FILE", "/c.key"),
                ][..],
                "EA_REDIS_TLS_KEY_FILE",
                "set EA_REDIS_TLS_CERT_FILE too",
            ),
        ] {
            let err = resolve(pairs).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid configuration: {key}=")) && err.contains(why),
                "{pairs:?}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn every_setting_has_a_unique_key_path_and_flag() {
        use std::collections::HashSet;
        let (mut keys, mut paths, mut flags) = (HashSet::new(), HashSet::new(), HashSet::new());
        for setting in SETTINGS {
            assert!(setting.key.starts_with("EA_"), "{}", setting.key);
            assert!(keys.insert(setting.key), "{}", setting.key);
            assert!(paths.insert(setting.path), "{}", setting.path);
            assert!(flags.insert(setting.flag()), "{}", setting.flag());
        }
    }

    #[test]
    fn the_readme_configuration_table_matches_the_settings() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table is out of date; replace it with:\n{table}"
        );
    }

    #[test]
    fn every_example_file_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for (file, mode, urls) in [
            ("redis.yaml", StoreMode::Single, 1),
            ("redlock.yaml", StoreMode::Single, 3),
            ("sentinel.yaml", StoreMode::Failover, 3),
            ("cluster.yaml", StoreMode::Cluster, 1),
            ("sharding.yaml", StoreMode::Sharding, 3),
        ] {
            let config = Sources::default()
                .read_file(&dir.join(file))
                .unwrap()
                .resolve()
                .unwrap_or_else(|err| panic!("{file}: {err}"));
            assert_eq!(
                (config.store.mode, config.store.urls.len()),
                (mode, urls),
                "{file}"
            );
        }
    }

    #[test]
    fn the_local_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/local.yaml");
        let config = Sources::default()
            .read_file(&path)
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(config.store.mode, StoreMode::Memory);
        assert!(!config.kube_enabled);
        assert_eq!(config.bind_address.to_string(), "127.0.0.1");
    }
}

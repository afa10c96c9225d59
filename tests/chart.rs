//! The Helm chart (`helm/election-agent`): it lints, its values schema refuses bad values naming
//! them, its CRD is the code's, and the plain manifests for users without Helm
//! (`deploy/election-agent.yaml`) are exactly what it renders with default values. With TLS
//! values, the agent binary also runs here as the rendered Deployment would run it — its
//! Secrets written where the mounts would put them — and is probed as the kubelet and scraped as
//! the ServiceMonitor says.
//!
//! Needs the `helm` binary: `scripts/test.sh` installs one into `target/tools/bin` and puts it on
//! PATH; `HELM` names another.

mod tools;

use serde_json::{Value, json};
use tools::{CHART, helm, root};

const MANIFESTS: &str = "deploy/election-agent.yaml";

/// The plain manifests: the chart rendered with default values, CRD included.
fn rendered_with_defaults() -> String {
    tools::template(&["--include-crds"])
}

#[test]
fn the_chart_lints_cleanly() {
    let (ok, printed) = helm(&["lint", "--strict", CHART]);
    assert!(ok, "{printed}");
}

#[test]
fn the_plain_manifests_are_the_chart_rendered_with_default_values() {
    let committed = std::fs::read_to_string(root().join(MANIFESTS)).unwrap_or_default();
    assert!(
        committed == rendered_with_defaults(),
        "{MANIFESTS} is out of date; regenerate it: helm template election-agent {CHART} \
         --namespace election-agent --include-crds > {MANIFESTS}"
    );
}

#[test]
fn the_charts_crd_is_the_one_the_code_generates() {
    let chart = std::fs::read_to_string(root().join(CHART).join("crds/election.yaml")).unwrap();
    let code = std::fs::read_to_string(root().join("crds/election.yaml")).unwrap();
    assert!(
        chart == code,
        "{CHART}/crds/election.yaml differs from crds/election.yaml: copy it"
    );
}

#[test]
fn the_values_schema_refuses_bad_values_naming_them() {
    for (value, named) in [
        ("controller.term=5", "controller.term"),
        ("controller.term=fast", "controller.term"),
        ("redis.mode=postgres", "redis.mode"),
        ("redis.mode=single", "redis.urls"),
        ("grpc.port=0", "grpc.port"),
        ("log.level=verbose", "log.level"),
        ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces.0"),
        ("replicas=3", "replicas"),
        ("extraEnv[0].name=PATH", "extraEnv.0.name"),
        // The demo Redis is the store: no other at the same time.
        ("redis.demo.enabled=true,redis.mode=cluster", "redis.mode"),
        (
            "redis.demo.enabled=true,redis.urls={redis://redis:6379}",
            "redis.urls",
        ),
        // A policy, or protected metrics, without a way to authenticate.
        (
            "auth.policy.existingConfigMap=rules",
            "auth.tokens.existingSecret",
        ),
        ("auth.protectMetrics=true", "auth.tokens.existingSecret"),
        (
            "auth.kubernetes.enabled=true,auth.policy.existingConfigMap=a,auth.policy.existingSecret=b",
            "auth.policy.existingSecret",
        ),
        ("auth.kubernetes.audience=", "auth.kubernetes.audience"),
        ("auth.tokens.key=../tokens", "auth.tokens.key"),
        // Client certificates without TLS, or from two places.
        ("tls.clientCA.existingSecret=ca", "tls.existingSecret"),
        ("tls.clientCA.existingConfigMap=ca", "tls.existingSecret"),
        (
            "tls.existingSecret=t,tls.clientCA.existingSecret=a,tls.clientCA.existingConfigMap=b",
            "tls.clientCA.existingConfigMap",
        ),
        ("tls.certKey=../tls.crt", "tls.certKey"),
        ("tls.keyKey=..", "tls.keyKey"),
        ("tls.clientCA.key=", "tls.clientCA.key"),
        // Redis TLS files apply to rediss:// URLs only.
        ("redis.tls.caSecret=ca", "redis.urls"),
        (
            "redis.mode=single,redis.urls={redis://redis:6379},redis.tls.caSecret=ca",
            "redis.urls.0",
        ),
        (
            "redis.demo.enabled=true,redis.tls.clientSecret=client",
            "redis.demo.enabled",
        ),
        ("redis.tls.clientKeyKey=a/b", "redis.tls.clientKeyKey"),
        (
            "serviceMonitor.tlsConfig.insecureSkipVerify=yes",
            "serviceMonitor.tlsConfig.insecureSkipVerify",
        ),
        (
            "serviceMonitor.tlsConfig.cafile=x",
            "serviceMonitor.tlsConfig",
        ),
    ] {
        let (ok, printed) = helm(&["template", "x", CHART, "--set", value]);
        assert!(!ok, "{value} was accepted");
        assert!(printed.contains(named), "{value}: {printed}");
    }
    let (ok, printed) = helm(&["template", "x", CHART, "--set", "replicaCount=2"]);
    assert!(
        !ok && printed.contains("memory store"),
        "two replicas over the memory store elect two leaders: {printed}"
    );
    let (ok, printed) = helm(&[
        "template",
        "x",
        CHART,
        "--set",
        "redis.mode=single,redis.urls={redis://redis:6379}",
    ]);
    assert!(ok, "a valid Redis setting: {printed}");
    assert!(printed.contains("replicas: 2"), "two replicas with Redis");
}

/// `redis.demo.enabled`: a Redis Deployment and Service in the release, the agent in mode
/// `single` at that Service with two replicas — and the Redis pods are not the agent's: neither
/// the agent's Deployment nor its Service selects them.
#[test]
fn the_demo_redis_is_the_agents_store_and_not_one_of_its_pods() {
    let objects = tools::documents(&tools::template(&["--set", "redis.demo.enabled=true"]));
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let agent = find("Deployment", "election-agent");
    let redis = find("Deployment", "election-agent-redis");
    let service = find("Service", "election-agent-redis");
    let env = &agent["spec"]["template"]["spec"]["containers"][0]["env"];
    let variable = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(variable("EA_REDIS_MODE").as_deref(), Some("single"));
    assert_eq!(
        variable("EA_REDIS_URLS").as_deref(),
        Some("redis://election-agent-redis:6379")
    );
    assert_eq!(agent["spec"]["replicas"], 2);
    assert_eq!(service["spec"]["ports"][0]["port"], 6379);

    let redis_pods = &redis["spec"]["template"]["metadata"]["labels"];
    let selects = |selector: &serde_json::Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(key, value)| &redis_pods[key] == value)
    };
    assert!(selects(&redis["spec"]["selector"]["matchLabels"]));
    assert!(selects(&service["spec"]["selector"]));
    assert!(!selects(&agent["spec"]["selector"]["matchLabels"]));
    assert!(!selects(
        &find("Service", "election-agent")["spec"]["selector"]
    ));
    let security = &redis["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
}

/// `auth.*`: the tokens Secret and the policy ConfigMap are mounted read-only where the
/// `EA_AUTH_*` variables point, Kubernetes tokens bring the TokenReview grant — and with the
/// default values there is none of it (authentication off, as with the Go service).
#[test]
fn auth_values_mount_the_files_the_variables_name() {
    let agent = |objects: &[serde_json::Value]| {
        objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "election-agent")
            .expect("the agent's Deployment")
            .clone()
    };
    let variable = |agent: &serde_json::Value, name: &str| {
        agent["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["value"].as_str().unwrap().to_owned())
    };

    let defaults = tools::documents(&rendered_with_defaults());
    let plain = agent(&defaults);
    assert!(
        plain["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| !v["name"].as_str().unwrap().starts_with("EA_AUTH_")),
        "no EA_AUTH_* by default"
    );
    assert!(plain["spec"]["template"]["spec"]["volumes"].is_null());
    assert!(!defaults.iter().any(|o| {
        o["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("token-review"))
    }));

    let objects = tools::documents(&tools::template(&[
        "--set",
        "auth.tokens.existingSecret=ea-tokens,auth.policy.existingConfigMap=ea-policy,\
         auth.kubernetes.enabled=true,auth.kubernetes.audience=jobs",
    ]));
    let agent = agent(&objects);
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(
        variable(&agent, "EA_AUTH_KUBERNETES").as_deref(),
        Some("true")
    );
    assert_eq!(
        variable(&agent, "EA_AUTH_AUDIENCE").as_deref(),
        Some("jobs")
    );
    for (file, source) in [
        ("EA_AUTH_TOKENS_FILE", ("secret", "secretName", "ea-tokens")),
        ("EA_AUTH_POLICY_FILE", ("configMap", "name", "ea-policy")),
    ] {
        let path = variable(&agent, file).unwrap_or_else(|| panic!("{file} set"));
        let (directory, _) = path.rsplit_once('/').unwrap();
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == directory)
            .unwrap_or_else(|| panic!("{directory} ({file}) is mounted"));
        assert_eq!(mount["readOnly"], true);
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let (kind, field, name) = source;
        assert_eq!(volume[kind][field], name, "{file}");
    }
    let review = objects
        .iter()
        .find(|o| {
            o["kind"] == "ClusterRole" && o["metadata"]["name"] == "election-agent-token-review"
        })
        .expect("the TokenReview grant");
    assert_eq!(
        review["rules"],
        serde_json::json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}])
    );
}

// TLS: the agent's certificate, client certificates and Redis' files come from Secrets (and a
// ConfigMap) mounted read-only where the EA_*_FILE variables point; the probes and the
// ServiceMonitor follow what the agent then serves.

/// The object of `kind` named `name` in `objects`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The agent's container in `objects`.
fn agent_container(objects: &[Value]) -> &Value {
    &object(objects, "Deployment", "election-agent")["spec"]["template"]["spec"]["containers"][0]
}

/// The value of `name` in `container`'s environment.
fn variable(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
        .map(|v| v["value"].as_str().expect("a plain value").to_owned())
}

/// Where the file `variable` names comes from: (volume kind, Secret or ConfigMap name, key) —
/// after checking that it lies in a read-only mount of the whole volume (a subPath mount would
/// never see a renewed Secret).
fn mounted_file(objects: &[Value], variable_name: &str) -> (String, String, String) {
    let container = agent_container(objects);
    let pod = &object(objects, "Deployment", "election-agent")["spec"]["template"]["spec"];
    let path = variable(container, variable_name).unwrap_or_else(|| panic!("{variable_name} set"));
    let (directory, file) = path.rsplit_once('/').unwrap();
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == directory)
        .unwrap_or_else(|| panic!("{directory} ({variable_name}) is mounted"));
    assert_eq!(mount["readOnly"], true, "{variable_name}");
    assert!(mount["subPath"].is_null(), "{variable_name}");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let (kind, name) = if volume["secret"].is_object() {
        ("secret", &volume["secret"]["secretName"])
    } else {
        ("configMap", &volume["configMap"]["name"])
    };
    let item = volume[kind]["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == file)
        .unwrap_or_else(|| panic!("{variable_name}: the volume holds {file}"));
    (
        kind.to_owned(),
        name.as_str().unwrap().to_owned(),
        item["key"].as_str().unwrap().to_owned(),
    )
}

/// What a probe does, without its timing: `{"httpGet": …}`, `{"tcpSocket": …}`, `{"grpc": …}`.
fn handler(probe: &Value) -> Value {
    let mut handler = probe.as_object().expect("a probe").clone();
    handler.retain(|field, _| !field.ends_with("Seconds") && !field.ends_with("Threshold"));
    Value::Object(handler)
}

#[test]
fn tls_values_mount_the_secrets_where_the_variables_point_and_probe_and_scrape_over_https() {
    let objects = tools::documents(&tools::template(&tools::set(&[
        "tls.existingSecret=ea-tls",
        "serviceMonitor.enabled=true",
        "redis.mode=single,redis.urls={rediss://redis.shop:6380}",
        "redis.tls.caSecret=redis-ca,redis.tls.clientSecret=redis-client",
    ])));
    let file = |kind: &str, name: &str, key: &str| (kind.into(), name.into(), key.into());
    for (variable, source) in [
        ("EA_TLS_CERT_FILE", file("secret", "ea-tls", "tls.crt")),
        ("EA_TLS_KEY_FILE", file("secret", "ea-tls", "tls.key")),
        ("EA_REDIS_TLS_CA_FILE", file("secret", "redis-ca", "ca.crt")),
        (
            "EA_REDIS_TLS_CERT_FILE",
            file("secret", "redis-client", "tls.crt"),
        ),
        (
            "EA_REDIS_TLS_KEY_FILE",
            file("secret", "redis-client", "tls.key"),
        ),
    ] {
        assert_eq!(mounted_file(&objects, variable), source, "{variable}");
    }
    let container = agent_container(&objects);
    assert_eq!(variable(container, "EA_TLS_CLIENT_CA_FILE"), None);

    // The kubelet's grpc probe cannot speak TLS; its httpGet probes can, without verifying.
    let livez = json!({"httpGet": {"path": "/livez", "port": "http", "scheme": "HTTPS"}});
    assert_eq!(handler(&container["startupProbe"]), livez);
    assert_eq!(handler(&container["livenessProbe"]), livez);
    assert_eq!(
        handler(&container["readinessProbe"]),
        json!({"httpGet": {"path": "/readyz", "port": "http", "scheme": "HTTPS"}})
    );

    let endpoint = &object(&objects, "ServiceMonitor", "election-agent")["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(
        endpoint["tlsConfig"],
        json!({
            "ca": {"secret": {"name": "ea-tls", "key": "ca.crt"}},
            "serverName": "election-agent.election-agent.svc",
        }),
        "verified against the Secret's CA, for the Service's name"
    );
    let service = object(&objects, "Service", "election-agent");
    for port in service["spec"]["ports"].as_array().unwrap() {
        assert_eq!(port["appProtocol"], "https", "{port}");
    }

    // With default values, none of it: plain TCP, gRPC health for readiness, a plain scrape.
    let defaults = tools::documents(&tools::template(&["--set", "serviceMonitor.enabled=true"]));
    let container = agent_container(&defaults);
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| !v["name"].as_str().unwrap().contains("TLS")),
        "no EA_*TLS* by default"
    );
    assert_eq!(
        handler(&container["readinessProbe"]),
        json!({"grpc": {"port": 9090}})
    );
    let endpoint = &object(&defaults, "ServiceMonitor", "election-agent")["spec"]["endpoints"][0];
    assert!(endpoint["scheme"].is_null() && endpoint["tlsConfig"].is_null());
}

#[test]
fn client_certificates_make_the_probes_tcp_and_the_service_monitor_present_one() {
    let values = [
        "tls.existingSecret=ea-tls",
        "tls.clientCA.existingConfigMap=clients-ca",
    ];
    let objects = tools::documents(&tools::template(&tools::set(&values)));
    assert_eq!(
        mounted_file(&objects, "EA_TLS_CLIENT_CA_FILE"),
        ("configMap".into(), "clients-ca".into(), "ca.crt".into())
    );
    // The kubelet has no client certificate: an HTTPS probe could not finish the handshake.
    let container = agent_container(&objects);
    assert_eq!(
        handler(&container["startupProbe"]),
        json!({"tcpSocket": {"port": "http"}})
    );
    assert_eq!(
        handler(&container["livenessProbe"]),
        json!({"tcpSocket": {"port": "http"}})
    );
    assert_eq!(
        handler(&container["readinessProbe"]),
        json!({"tcpSocket": {"port": "grpc"}})
    );

    // Prometheus must present a certificate too: without one the chart says which values.
    let monitored = [&values[..], &["serviceMonitor.enabled=true"]].concat();
    let mut args = vec!["template", "x", CHART];
    args.extend(tools::set(&monitored));
    let (ok, printed) = helm(&args);
    assert!(!ok, "a ServiceMonitor that cannot scrape was rendered");
    assert!(
        printed.contains("serviceMonitor.tlsConfig.cert") && printed.contains("tls.clientCA"),
        "{printed}"
    );
    let client = [
        "serviceMonitor.tlsConfig.cert.secret.name=prometheus-client",
        "serviceMonitor.tlsConfig.cert.secret.key=tls.crt",
        "serviceMonitor.tlsConfig.keySecret.name=prometheus-client",
        "serviceMonitor.tlsConfig.keySecret.key=tls.key",
        "serviceMonitor.tlsConfig.insecureSkipVerify=true",
    ];
    let objects = tools::documents(&tools::template(&tools::set(
        &[&monitored[..], &client[..]].concat(),
    )));
    let endpoint = &object(&objects, "ServiceMonitor", "election-agent")["spec"]["endpoints"][0];
    assert_eq!(
        endpoint["tlsConfig"],
        json!({
            "ca": {"secret": {"name": "ea-tls", "key": "ca.crt"}},
            "serverName": "election-agent.election-agent.svc",
            "cert": {"secret": {"name": "prometheus-client", "key": "tls.crt"}},
            "keySecret": {"name": "prometheus-client", "key": "tls.key"},
            "insecureSkipVerify": true,
        })
    );

    // A certificate is an authenticated identity: a policy needs no token source besides.
    let mut args = vec!["template", "x", CHART];
    let with_policy = [&values[..], &["auth.policy.existingConfigMap=policy"]].concat();
    args.extend(tools::set(&with_policy));
    let (ok, printed) = helm(&args);
    assert!(ok, "a policy judging client certificates: {printed}");
}

/// The agent run here as the rendered Deployment runs it, and probed as the kubelet probes it.
/// The store and Kubernetes stay away (memory store, or a rediss:// URL nothing answers; no
/// API server): what is proven is the wiring — files where the variables point, read and
/// accepted by the agent, and probes and scrapes the agent answers.
mod run {
    use std::{
        collections::BTreeMap,
        io::{BufRead, BufReader, Read, Write},
        net::{SocketAddr, TcpStream},
        path::PathBuf,
        process::{Child, Command, Stdio},
        sync::Arc,
        time::{Duration, Instant},
    };

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use rustls::{
        ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
        StreamOwned,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    };
    use serde_json::Value;

    /// The data of Secrets and ConfigMaps by name: key → contents.
    pub type Sources = BTreeMap<&'static str, BTreeMap<&'static str, String>>;

    /// A certificate authority, as a cert-manager CA Issuer.
    pub struct Authority {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Authority {
        pub fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            Self {
                pem,
                issuer: Issuer::new(params, key),
            }
        }

        /// The CA certificate alone, as a ConfigMap of client CAs holds it.
        pub fn ca(&self) -> BTreeMap<&'static str, String> {
            BTreeMap::from([("ca.crt", self.pem.clone())])
        }

        /// The Secret cert-manager writes for a Certificate this CA issues: `tls.crt`,
        /// `tls.key`, `ca.crt`. A server certificate for `dns_names`, or a client's named
        /// `common_name`.
        pub fn secret(
            &self,
            common_name: &str,
            dns_names: &[&str],
            client: bool,
        ) -> BTreeMap<&'static str, String> {
            let names = dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
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
            BTreeMap::from([
                ("tls.crt", certificate.pem()),
                ("tls.key", key.serialize_pem()),
                ("ca.crt", self.pem.clone()),
            ])
        }
    }

    /// The agent's container of `objects`, started here: each mounted volume written from
    /// `sources` to a directory of its own, the variables pointing into a mount pointed there.
    /// As the e2e test runs the chart's environment out of the cluster: ports (free ones, on
    /// loopback) and Kubernetes (off) aside.
    pub struct Pod {
        child: Child,
        dir: PathBuf,
        container: Value,
        grpc: SocketAddr,
        http: SocketAddr,
    }

    impl Pod {
        pub fn start(test: &str, objects: &[Value], sources: &Sources) -> Self {
            let container = super::agent_container(objects).clone();
            let pod =
                &super::object(objects, "Deployment", "election-agent")["spec"]["template"]["spec"];
            let dir = std::env::temp_dir().join(format!("ea-chart-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();

            let mut mounts = Vec::new();
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let volume = pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap();
                let (source, name) = if volume["secret"].is_object() {
                    (&volume["secret"], &volume["secret"]["secretName"])
                } else {
                    (&volume["configMap"], &volume["configMap"]["name"])
                };
                let name = name.as_str().unwrap();
                let data = sources
                    .get(name)
                    .unwrap_or_else(|| panic!("no Secret or ConfigMap {name} here"));
                let local = dir.join(mount["name"].as_str().unwrap());
                std::fs::create_dir_all(&local).unwrap();
                for item in source["items"].as_array().expect("items") {
                    let key = item["key"].as_str().unwrap();
                    let text = data.get(key).unwrap_or_else(|| {
                        panic!("{name} has no key {key}: the pod would not start")
                    });
                    std::fs::write(local.join(item["path"].as_str().unwrap()), text).unwrap();
                }
                mounts.push((format!("{}/", mount["mountPath"].as_str().unwrap()), local));
            }

            let mut command = Command::new(env!("CARGO_BIN_EXE_election-agent"));
            command.env_clear();
            for entry in container["env"].as_array().unwrap() {
                let value = entry["value"]
                    .as_str()
                    .expect("a plain value, not valueFrom");
                let value = mounts
                    .iter()
                    .find_map(|(path, local)| {
                        let file = value.strip_prefix(path.as_str())?;
                        Some(local.join(file).display().to_string())
                    })
                    .unwrap_or_else(|| value.to_owned());
                command.env(entry["name"].as_str().unwrap(), value);
            }
            let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
            let mut child = command
                .env("EA_BIND_ADDRESS", "127.0.0.1")
                .env("EA_GRPC_PORT", "0")
                .env("EA_HTTP_PORT", "0")
                .env("EA_KUBE_ENABLE", "false")
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .expect("the agent starts");

            // Its JSON log names the addresses it listens on.
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let (mut grpc, mut http) = (None, None);
            while grpc.is_none() || http.is_none() {
                let Some(Ok(line)) = lines.next() else {
                    let _ = child.wait();
                    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
                    panic!("the agent stopped before listening: {stderr}");
                };
                let entry: Value = serde_json::from_str(&line).expect("a JSON log line");
                let address = entry["fields"]["address"].as_str().map(|a| a.parse());
                match entry["fields"]["message"].as_str() {
                    Some("gRPC API listening") => grpc = address.map(Result::unwrap),
                    Some("HTTP API listening") => http = address.map(Result::unwrap),
                    _ => {}
                }
            }
            // Keep reading, so that its logging never blocks.
            std::thread::spawn(move || lines.for_each(drop));
            Self {
                child,
                dir,
                container,
                grpc: grpc.unwrap(),
                http: http.unwrap(),
            }
        }

        /// The address of the container port `port` (its name or number) — where the
        /// rendered EA_GRPC_PORT or EA_HTTP_PORT would have put it.
        pub fn address(&self, port: &Value) -> SocketAddr {
            let number = match port {
                Value::String(name) => self.container["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == *name)
                    .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
                    .to_string(),
                number => number.to_string(),
            };
            if Some(&number) == super::variable(&self.container, "EA_GRPC_PORT").as_ref() {
                self.grpc
            } else if Some(&number) == super::variable(&self.container, "EA_HTTP_PORT").as_ref() {
                self.http
            } else {
                panic!("port {port} is neither of the agent's")
            }
        }

        /// Runs the container's probe `which` as the kubelet does: an httpGet probe with
        /// `scheme: HTTPS` verifies nothing and presents no certificate, and passes with a
        /// status from 200 to 399; a tcpSocket probe passes when the port accepts a connection.
        pub fn probe(&self, which: &str) -> Result<(), String> {
            kubelet(self, &self.container[which])
        }

        /// Runs the startup probe as the kubelet would, `failureThreshold` times
        /// `periodSeconds` at most, until it passes.
        pub fn started(&self) {
            let probe = &self.container["startupProbe"];
            let period = Duration::from_secs(probe["periodSeconds"].as_u64().unwrap());
            let mut left = probe["failureThreshold"].as_u64().unwrap();
            while let Err(err) = kubelet(self, probe) {
                left -= 1;
                assert!(left > 0, "the startup probe kept failing: {err}");
                std::thread::sleep(period);
            }
        }
    }

    impl Drop for Pod {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Runs `probe` against `pod` as the kubelet does.
    pub fn kubelet(pod: &Pod, probe: &Value) -> Result<(), String> {
        if let Some(socket) = probe.get("tcpSocket") {
            return TcpStream::connect_timeout(&pod.address(&socket["port"]), TIMEOUT)
                .map(drop)
                .map_err(|err| err.to_string());
        }
        let get = probe.get("httpGet").expect("a tcpSocket or httpGet probe");
        let address = pod.address(&get["port"]);
        let path = get["path"].as_str().unwrap();
        let (status, _) = if get["scheme"] == "HTTPS" {
            https(address, path, unverified(), None)?
        } else {
            request(
                TcpStream::connect_timeout(&address, TIMEOUT).map_err(|e| e.to_string())?,
                address,
                path,
            )?
        };
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// `GET path` over HTTPS with `config`, for `server_name` (else the address, as the
    /// kubelet sends): the status and the body.
    pub fn https(
        address: SocketAddr,
        path: &str,
        config: ClientConfig,
        server_name: Option<&str>,
    ) -> Result<(u16, String), String> {
        let name = match server_name {
            Some(name) => ServerName::try_from(name.to_owned()).unwrap(),
            None => ServerName::IpAddress(address.ip().into()),
        };
        let connection = ClientConnection::new(Arc::new(config), name).unwrap();
        let socket = TcpStream::connect_timeout(&address, TIMEOUT).map_err(|e| e.to_string())?;
        request(StreamOwned::new(connection, socket), address, path)
    }

    /// Sends `GET path` over `stream` (HTTP/1.1, as kube-probe and Prometheus do): the status
    /// and the body, or why none came.
    fn request<S: Read + Write>(
        mut stream: S,
        address: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), String> {
        let deadline = Instant::now() + TIMEOUT;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: kube-probe/1.33\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        )
        .and_then(|()| stream.flush())
        .map_err(|err| err.to_string())?;
        let mut response = Vec::new();
        let mut buffer = [0; 16384];
        let ended = loop {
            match stream.read(&mut buffer) {
                Ok(0) => break None,
                Ok(n) => response.extend_from_slice(&buffer[..n]),
                Err(err) => break Some(err),
            }
            assert!(Instant::now() < deadline, "no end of the response");
        };
        let response = String::from_utf8_lossy(&response);
        let status = response
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3)?.parse().ok())
            .ok_or_else(|| format!("no HTTP response ({ended:?})"))?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.to_owned()))
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
    }

    /// A TLS client as the kubelet's HTTPS probes are: any server certificate, none of its own.
    pub fn unverified() -> ClientConfig {
        builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
            .with_no_client_auth()
    }

    /// A TLS client trusting `ca` (PEM), presenting `client` (a Secret's `tls.crt`, `tls.key`)
    /// if given.
    pub fn verified(ca: &str, client: Option<(&str, &str)>) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let builder = builder().with_root_certificates(roots);
        match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        }
    }

    /// Accepts any server certificate, as `InsecureSkipVerify` does (the signature of the
    /// handshake is still checked).
    #[derive(Debug)]
    struct AnyServer(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            certificate: &CertificateDer<'_>,
            signature: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                certificate,
                signature,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            certificate: &CertificateDer<'_>,
            signature: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                certificate,
                signature,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Scrapes `/metrics` as Prometheus does with the ServiceMonitor in `objects`: its
    /// endpoint's port, path and scheme, the CA, server name and client certificate its
    /// tlsConfig names (from `sources`). The status and the body.
    pub fn scrape(
        pod: &Pod,
        objects: &[Value],
        sources: &Sources,
    ) -> Result<(u16, String), String> {
        let endpoint =
            &super::object(objects, "ServiceMonitor", "election-agent")["spec"]["endpoints"][0];
        let service = super::object(objects, "Service", "election-agent");
        let target = &service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == endpoint["port"])
            .expect("the Service port the ServiceMonitor names")["targetPort"];
        assert_eq!(endpoint["scheme"], "https");
        let tls = &endpoint["tlsConfig"];
        let read = |selector: &Value| {
            sources[selector["name"].as_str().unwrap()][selector["key"].as_str().unwrap()].clone()
        };
        let ca = read(&tls["ca"]["secret"]);
        let client = tls["cert"]["secret"]
            .is_object()
            .then(|| (read(&tls["cert"]["secret"]), read(&tls["keySecret"])));
        let config = verified(
            &ca,
            client
                .as_ref()
                .map(|(cert, key)| (cert.as_str(), key.as_str())),
        );
        https(
            pod.address(target),
            endpoint["path"].as_str().unwrap(),
            config,
            tls["serverName"].as_str(),
        )
    }
}

/// The certificate a cert-manager Certificate for the chart's Service would hold.
const SERVICE_NAMES: &[&str] = &[
    "election-agent.election-agent.svc",
    "election-agent.election-agent.svc.cluster.local",
];

#[test]
fn with_tls_the_agent_run_as_rendered_answers_the_kubelets_https_probes_and_the_service_monitor() {
    let authority = run::Authority::new("election-agent CA");
    let sources = run::Sources::from([(
        "ea-tls",
        authority.secret("election-agent", SERVICE_NAMES, false),
    )]);
    let objects = tools::documents(&tools::template(&tools::set(&[
        "tls.existingSecret=ea-tls",
        "serviceMonitor.enabled=true",
    ])));
    let pod = run::Pod::start("tls", &objects, &sources);
    pod.started();
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(pod.probe(probe), Ok(()), "{probe}");
    }
    let (status, metrics) = run::scrape(&pod, &objects, &sources).expect("scraped");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("election_agent_store_available 1"),
        "{metrics}"
    );
}

#[test]
fn with_client_certificates_the_agent_run_as_rendered_admits_tcp_probes_and_certified_clients_only()
{
    let authority = run::Authority::new("election-agent CA");
    let redis = run::Authority::new("redis CA");
    let sources = run::Sources::from([
        (
            "ea-tls",
            authority.secret("election-agent", SERVICE_NAMES, false),
        ),
        ("clients-ca", authority.ca()),
        (
            "prometheus-client",
            authority.secret("prometheus", &[], true),
        ),
        ("redis-ca", redis.ca()),
        ("redis-client", redis.secret("election-agent", &[], true)),
    ]);
    // Nothing answers at the Redis URL: the agent reads the Redis TLS files at start-up (and
    // would stop, naming a file it cannot read), then finds the store unavailable.
    let objects = tools::documents(&tools::template(&tools::set(&[
        "tls.existingSecret=ea-tls",
        "tls.clientCA.existingConfigMap=clients-ca",
        "redis.mode=single,redis.urls={rediss://127.0.0.1:1}",
        "redis.tls.caSecret=redis-ca,redis.tls.clientSecret=redis-client",
        "serviceMonitor.enabled=true",
        "serviceMonitor.tlsConfig.cert.secret.name=prometheus-client",
        "serviceMonitor.tlsConfig.cert.secret.key=tls.crt",
        "serviceMonitor.tlsConfig.keySecret.name=prometheus-client",
        "serviceMonitor.tlsConfig.keySecret.key=tls.key",
    ])));
    let pod = run::Pod::start("mtls", &objects, &sources);
    pod.started();
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(pod.probe(probe), Ok(()), "{probe}");
    }
    // The HTTPS probe the kubelet would run without client certificates cannot connect, nor
    // can any client without a certificate.
    let https_probe = json!({"httpGet": {"path": "/livez", "port": "http", "scheme": "HTTPS"}});
    assert!(run::kubelet(&pod, &https_probe).is_err());
    let http = pod.address(&json!("http"));
    let ca = &sources["ea-tls"]["ca.crt"];
    assert!(
        run::https(
            http,
            "/livez",
            run::verified(ca, None),
            Some(SERVICE_NAMES[0])
        )
        .is_err()
    );

    // What the TCP readiness probe cannot see: the store is down, and /readyz says so to a
    // client with a certificate.
    let (status, _) = run::scrape(&pod, &objects, &sources).expect("Prometheus scrapes");
    assert_eq!(status, 200);
    let prometheus = &sources["prometheus-client"];
    let certified = run::verified(ca, Some((&prometheus["tls.crt"], &prometheus["tls.key"])));
    let (status, _) =
        run::https(http, "/readyz", certified, Some(SERVICE_NAMES[0])).expect("answered");
    assert_eq!(
        status, 503,
        "the store is unreachable, yet the pod is Ready"
    );
}

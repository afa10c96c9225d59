//! The Helm chart on a real API server: `helm install` with default values; what its
//! ServiceAccount may do (`kubectl auth can-i --as=system:serviceaccount:…`) and may not (no
//! Secrets, no pod deletes, no Deployment writes); and the agent, run out of the cluster with
//! exactly the chart's environment and a token of that ServiceAccount, keeping a managed
//! Election — its leader labelled, the label moved off a deleted leader, the finalizer taken off
//! on deletion — with no Forbidden answer. When `scripts/e2e.sh` built the image
//! (`EA_E2E_IMAGE`, podman present), the image runs too: read-only, non-root, host network,
//! against the same API server.
//!
//! The agent runs against the release upgraded to `watchNamespaces={the test's namespace}`:
//! the other e2e tests run at the same time on the same cluster, and an agent watching the
//! whole cluster would manage their Elections too. The default (cluster-wide) release is what
//! the can-i checks look at first.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use kube::api::DeleteParams;
use serde_json::{Value, json};

use super::{
    LEADER_LABEL, install_crd, label_moves_off_deleted, labelled_leader, managed_web, pods_labelled,
};
use crate::common::{
    self, TestNamespace, eventually, http_get,
    processes::{AgentProcess, free_port},
    until, within,
};

const CHART: &str = "helm/election-agent";

/// Runs `program` with `args` in the repository: whether it succeeded, and what it printed.
fn run(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} ({err}): scripts/e2e.sh installs it"));
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), printed)
}

fn helm(args: &[&str]) -> (bool, String) {
    run(
        &std::env::var("HELM").unwrap_or_else(|_| "helm".into()),
        args,
    )
}

/// A Helm release of the chart, uninstalled when dropped (its ClusterRole and binding outlive
/// the namespace otherwise). Declare it after the test's namespace, so it goes first.
struct Release {
    name: String,
    namespace: String,
}

impl Release {
    /// `helm install` with default values into `namespace`; prints what helm said.
    fn install(namespace: &str) -> Self {
        let release = Self {
            name: format!("ea-e2e-{}", std::process::id()),
            namespace: namespace.to_owned(),
        };
        let (ok, printed) = helm(&["install", &release.name, CHART, "--namespace", namespace]);
        eprintln!(
            "$ helm install {} {CHART} --namespace {namespace}\n{printed}",
            release.name
        );
        assert!(ok, "helm install failed");
        release
    }

    /// `helm upgrade` with `values` on top of the defaults.
    fn upgrade(&self, values: &str) {
        let (ok, printed) = helm(&[
            "upgrade",
            &self.name,
            CHART,
            "--namespace",
            &self.namespace,
            "--set",
            values,
        ]);
        assert!(ok, "helm upgrade --set {values}: {printed}");
    }

    /// The chart's ServiceAccount (and fullname): the release name with the chart's.
    fn account(&self) -> String {
        format!("{}-election-agent", self.name)
    }

    /// The objects of the release, as helm applied them.
    fn manifest(&self) -> Vec<Value> {
        let (ok, printed) = helm(&[
            "get",
            "manifest",
            &self.name,
            "--namespace",
            &self.namespace,
        ]);
        assert!(ok, "helm get manifest: {printed}");
        serde_saphyr::from_multiple(&printed).expect("helm prints YAML")
    }

    /// The environment of the chart's agent container: every variable, by value.
    fn environment(&self) -> Vec<(String, String)> {
        let deployment = self
            .manifest()
            .into_iter()
            .find(|object| object["kind"] == "Deployment")
            .expect("the chart renders a Deployment");
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("the agent container has an environment")
            .iter()
            .map(|variable| {
                let value = variable["value"].as_str().unwrap_or_else(|| {
                    panic!("{variable}: only plain values with default settings")
                });
                (
                    variable["name"].as_str().unwrap().to_owned(),
                    value.to_owned(),
                )
            })
            .collect()
    }

    /// A kubeconfig for the API server of `KUBECONFIG`, authenticating with a fresh token of the
    /// chart's ServiceAccount (`kubectl create token`); its path.
    fn service_account_kubeconfig(&self) -> PathBuf {
        let (ok, token) = run(
            "kubectl",
            &[
                "create",
                "token",
                &self.account(),
                "--namespace",
                &self.namespace,
                "--duration",
                "1h",
            ],
        );
        assert!(ok, "kubectl create token: {token}");
        let (ok, admin) = run(
            "kubectl",
            &["config", "view", "--raw", "--minify", "-o", "json"],
        );
        assert!(ok, "kubectl config view: {admin}");
        let admin: Value = serde_json::from_str(&admin).expect("kubectl prints JSON");
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": admin["clusters"][0]["cluster"]}],
            "users": [{"name": "agent", "user": {"token": token.trim()}}],
            "contexts": [{"name": "agent", "context": {
                "cluster": "cluster", "user": "agent", "namespace": self.namespace}}],
            "current-context": "agent",
        });
        let path = std::env::temp_dir().join(format!("{}-kubeconfig", self.name));
        std::fs::write(&path, kubeconfig.to_string()).expect("write the kubeconfig");
        path
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let (ok, printed) = helm(&["uninstall", &self.name, "--namespace", &self.namespace]);
        if !ok {
            eprintln!("e2e: helm uninstall {}: {printed}", self.name);
        }
        let _ =
            std::fs::remove_file(std::env::temp_dir().join(format!("{}-kubeconfig", self.name)));
    }
}

/// `kubectl auth can-i VERB RESOURCE --as=system:serviceaccount:…` for each check, printed;
/// fails on any answer other than the expected one.
fn can_i(release: &Release, checks: &[(&str, &str, Option<&str>, bool)]) {
    let user = format!(
        "system:serviceaccount:{}:{}",
        release.namespace,
        release.account()
    );
    let mut wrong = Vec::new();
    for (verb, resource, namespace, expected) in checks {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", &user];
        match namespace {
            Some(namespace) => args.extend(["--namespace", namespace]),
            None => args.push("--all-namespaces"),
        }
        let (yes, printed) = run("kubectl", &args);
        let scope = namespace.unwrap_or("all namespaces");
        eprintln!(
            "$ kubectl auth can-i {verb} {resource} ({scope}) --as={user}: {}",
            printed.trim()
        );
        if yes != *expected {
            wrong.push(format!("{verb} {resource} in {scope}: {}", printed.trim()));
        }
    }
    assert!(wrong.is_empty(), "unexpected can-i answers: {wrong:?}");
}

/// What a ServiceAccount of the chart must be able to do in `namespace` (a watched namespace,
/// or `None` for all of them), and what it must not.
fn checks(namespace: Option<&str>) -> Vec<(&'static str, &'static str, Option<&str>, bool)> {
    let allowed = [
        ("list", "pods"),
        ("watch", "pods"),
        ("patch", "pods"),
        ("list", "replicasets.apps"),
        ("watch", "deployments.apps"),
        ("list", "elections.election-agent.io"),
        ("watch", "elections.election-agent.io"),
        ("patch", "elections.election-agent.io"),
        ("patch", "elections.election-agent.io/status"),
        ("create", "events.events.k8s.io"),
        ("patch", "events.events.k8s.io"),
    ];
    let denied = [
        ("get", "secrets"),
        ("list", "secrets"),
        ("delete", "pods"),
        ("create", "pods"),
        ("update", "pods"),
        ("patch", "deployments.apps"),
        ("update", "deployments.apps"),
        ("delete", "deployments.apps"),
        ("patch", "replicasets.apps"),
        ("create", "elections.election-agent.io"),
        ("delete", "elections.election-agent.io"),
        ("update", "elections.election-agent.io"),
        ("create", "configmaps"),
        ("get", "nodes"),
        ("create", "serviceaccounts/token"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
    ];
    allowed
        .into_iter()
        .map(|(verb, resource)| (verb, resource, namespace, true))
        .chain(
            denied
                .into_iter()
                .map(|(verb, resource)| (verb, resource, namespace, false)),
        )
        .collect()
}

/// Whether a log tells of a refusal by the API server.
fn forbidden(log: &str) -> bool {
    let log = log.to_lowercase();
    log.contains("forbidden") || log.contains("403")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run scripts/e2e.sh with KUBECONFIG set"]
async fn the_chart_installs_and_its_service_account_keeps_a_managed_election_and_nothing_more() {
    let client = common::cluster().await;
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client, "chart").await;
    let ns = namespace.name.as_str();

    // Default values: a ClusterRole.
    let release = Release::install(ns);
    can_i(&release, &checks(None));

    // Watching only the test's namespace: Roles there, nothing elsewhere.
    release.upgrade(&format!("watchNamespaces={{{ns}}}"));
    can_i(&release, &checks(Some(ns)));
    can_i(
        &release,
        &[
            ("list", "pods", None, false),
            ("list", "pods", Some("default"), false),
            (
                "patch",
                "elections.election-agent.io",
                Some("default"),
                false,
            ),
        ],
    );

    // The agent with the chart's environment, but out of the cluster: a kubeconfig holding a
    // token of the chart's ServiceAccount instead of the mounted one, and free loopback ports.
    let kubeconfig = release.service_account_kubeconfig();
    let mut environment: Vec<(String, String)> = release
        .environment()
        .into_iter()
        .filter(|(key, _)| {
            !matches!(
                key.as_str(),
                "EA_KUBE_IN_CLUSTER" | "EA_GRPC_PORT" | "EA_HTTP_PORT"
            )
        })
        .collect();
    eprintln!("the chart's environment: {environment:?}");
    environment.extend(
        [
            ("EA_KUBE_IN_CLUSTER", "false".to_owned()),
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("EA_BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("EA_GRPC_PORT", free_port().to_string()),
            ("EA_HTTP_PORT", free_port().to_string()),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    let agent = AgentProcess::with_environment("chart-agent", ns, environment.clone()).await;

    let (_deployments, elections) = managed_web(&client, ns).await;
    let first = labelled_leader(&client, &elections, ns, LEADER_LABEL, 1).await;
    label_moves_off_deleted(&client, &elections, ns, &first, Duration::from_secs(10)).await;

    // Deleting the Election takes the label off and the finalizer with it.
    within(
        "delete the Election",
        Duration::from_secs(10),
        elections.delete("web-leader", &DeleteParams::default()),
    )
    .await
    .expect("delete the Election");
    eventually(
        "the Election is gone and no pod is labelled",
        Duration::from_secs(10),
        async || {
            elections
                .get_opt("web-leader")
                .await
                .ok()
                .flatten()
                .is_none()
                && pods_labelled(&client, ns, LEADER_LABEL).await.is_empty()
        },
    )
    .await;
    let log = agent.log_text();
    assert!(!forbidden(&log), "the API server refused the agent:\n{log}");
    drop(agent);

    if let Ok(image) = std::env::var("EA_E2E_IMAGE") {
        the_image_runs_read_only_as_non_root(&image, ns, &kubeconfig, environment).await;
    } else {
        eprintln!(
            "\n  e2e: the image part is SKIPPED — scripts/e2e.sh builds it only when podman is \
             installed (EA_E2E_IMAGE unset)\n"
        );
    }
    drop(release);
    drop(namespace);
}

/// `--ulimit` for `name`: this process's own (soft) limit (`/proc/self/limits` row `row`), at
/// most `cap`, as both the container's soft and hard limit. podman's defaults may exceed what
/// this machine allows, and then the container cannot start; runc is refused some raises
/// (processes) even up to the soft limit here, hence the cap.
fn limit(name: &str, row: &str, cap: u64) -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let soft = limits
        .lines()
        .find(|line| line.starts_with(row))
        .and_then(|line| line[row.len()..].split_whitespace().next())
        .unwrap_or_else(|| panic!("no {row} in /proc/self/limits"));
    let value = soft.parse().map_or(cap, |soft: u64| soft.min(cap));
    format!("{name}={value}:{value}")
}

/// Runs `image` with podman — read-only root filesystem, non-root, host network, the chart's
/// `environment` with the ServiceAccount's `kubeconfig` mounted — and checks that it answers
/// `/livez` and `/readyz`, runs as uid 65532, and takes up the controller with no Forbidden.
async fn the_image_runs_read_only_as_non_root(
    image: &str,
    ns: &str,
    kubeconfig: &Path,
    environment: Vec<(String, String)>,
) {
    let container = format!("{ns}-agent");
    let http_port = environment
        .iter()
        .find(|(key, _)| key == "EA_HTTP_PORT")
        .map(|(_, port)| port.clone())
        .unwrap();
    let port: u16 = http_port.parse().unwrap();
    let podman = ["--runtime", "/usr/sbin/runc", "--cgroup-manager=cgroupfs"];
    let mut args: Vec<String> = podman.iter().map(|s| (*s).to_owned()).collect();
    args.extend(
        [
            "run",
            "--detach",
            "--name",
            &container,
            "--network",
            "host",
            "--read-only",
            "--ulimit",
            &limit("nofile", "Max open files", 65_536),
            "--ulimit",
            &limit("nproc", "Max processes", 4_096),
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            &format!("{}:/var/run/ea/kubeconfig:ro", kubeconfig.display()),
        ]
        .map(str::to_owned),
    );
    for (key, value) in &environment {
        let value = if key == "KUBECONFIG" {
            "/var/run/ea/kubeconfig"
        } else {
            value
        };
        args.extend(["--env".to_owned(), format!("{key}={value}")]);
    }
    args.push(image.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, printed) = run("podman", &args);
    assert!(ok, "podman run: {printed}");
    struct Container(String);
    impl Drop for Container {
        fn drop(&mut self) {
            let podman = ["--runtime", "/usr/sbin/runc", "--cgroup-manager=cgroupfs"];
            let _ = run(
                "podman",
                &[&podman[..], &["rm", "--force", &self.0]].concat(),
            );
        }
    }
    let _container = Container(container.clone());
    let logs = || run("podman", &["logs", &container]).1;

    let started = Instant::now();
    for probe in ["livez", "readyz"] {
        let url = format!("http://127.0.0.1:{http_port}/{probe}");
        until(
            &format!("the image answers /{probe}"),
            Duration::from_secs(30),
            async || {
                // Not listening yet is fine; http_get would take it for a failure.
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                {
                    return Err(format!("not listening yet\n{}", logs()));
                }
                match http_get(&url).await {
                    (200, _) => Ok(()),
                    (code, body) => Err(format!("{code} {body}\n{}", logs())),
                }
            },
        )
        .await;
        eprintln!("$ curl {url} → 200 after {:?}", started.elapsed());
    }
    let (ok, user) = run(
        "podman",
        &["inspect", "--format", "{{.Config.User}}", image],
    );
    assert!(ok, "{user}");
    let (ok, pid) = run(
        "podman",
        &["inspect", "--format", "{{.State.Pid}}", &container],
    );
    assert!(ok, "{pid}");
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .expect("the container's process");
    let uid = proc_status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("image user {}, process {uid}", user.trim());
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65532"),
        "the agent runs as {uid}"
    );
    eventually(
        "the image runs the controller",
        Duration::from_secs(30),
        async || logs().contains("leading: running the Election controller"),
    )
    .await;
    let log = logs();
    assert!(!forbidden(&log), "the API server refused the image:\n{log}");
}

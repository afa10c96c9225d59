//! A kubelet stand-in, for clusters that have none (such as `scripts/control-plane.sh`: an API
//! server and a controller manager, no scheduler, no kubelet). Without it the test Deployments'
//! pods would stay Pending for ever, and nothing the tests look at — readiness, pod IPs, rolling
//! updates, terminating pods — would ever happen.
//!
//! It plays a kubelet's part for the pods of **one** test namespace only, never any other: it
//! binds their Pending pods to a fake node, reports them Running and Ready with a pod IP, and
//! finishes the termination of deleted pods once their grace period has passed — which is what a
//! real kubelet tells the API server about containers that start at once, pass their readiness
//! probe at once and ignore SIGTERM (as `deployment()`'s do). Nothing runs: no image is pulled,
//! no container started.
//!
//! On a cluster with a real, schedulable node it is not started at all ([`needed`]): the pods
//! then run for real.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The fake node the stand-in binds pods to. Every test process shares it (each creates it if
/// absent); it is left in place afterwards, unschedulable, so a later run finds it.
pub const NODE: &str = "ea-e2e-stand-in";
/// The label that marks [`NODE`] as the stand-in's, so it is never taken for a real node.
pub const NODE_LABEL: &str = "election-agent.io/e2e-stand-in";
/// How often the node's Ready condition gets a fresh heartbeat. The node lifecycle controller
/// of kube-controller-manager marks a node's pods NotReady (and later evicts them) when the
/// heartbeat is older than its grace period (40 s by default); a few seconds keeps well clear.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often the stand-in looks at the namespace's pods: well under the second in which the
/// tests expect the agent to follow a change, so the stand-in is never what they wait for.
const SYNC: Duration = Duration::from_millis(200);

/// Whether the cluster needs the stand-in: it does when it has no Ready, schedulable node other
/// than the stand-in's own. A real kubelet registers its node and keeps its Ready condition
/// True, so any such node means real kubelets run the pods; the stand-in must then stay away
/// (two "kubelets" reporting on one pod would fight).
pub async fn needed(client: &Client) -> bool {
    let nodes: Api<Node> = Api::all(client.clone());
    let listed = nodes
        .list(&ListParams::default())
        .await
        .expect("list the cluster's nodes");
    !listed.items.iter().any(|node| {
        !node.labels().contains_key(NODE_LABEL)
            && !node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
            && node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The loud notice that the pods of this test are not real.
pub fn banner(namespace: &str) {
    let lines = [
        "e2e: NO KUBELET FOUND - the cluster has no Ready, schedulable node.".to_owned(),
        "The harness plays kubelet for its own test namespace only:".to_owned(),
        format!("  {namespace}"),
        format!("Its pods are bound to the fake node {NODE} and reported"),
        "Running and Ready; no container runs and no image is pulled.".to_owned(),
    ];
    let rule = "#".repeat(78);
    let mut text = format!("\n{rule}\n");
    for line in lines {
        text.push_str(&format!("#  {line:<72}  #\n"));
    }
    eprintln!("{text}{rule}\n");
}

/// The stand-in at work for one namespace; it stops when dropped.
pub struct StandIn {
    task: JoinHandle<()>,
}

impl StandIn {
    /// Starts playing kubelet for the pods of `namespace` (and only those).
    pub fn start(client: &Client, namespace: &str) -> Self {
        let task = tokio::spawn(run(client.clone(), namespace.to_owned()));
        Self { task }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stand-in's loop: keep the node alive, and act on each pod of the namespace as a kubelet
/// would. A failed request is reported and tried again on the next round — the stand-in never
/// gives up while its test runs.
async fn run(client: Client, namespace: String) {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let mut addresses = PodAddresses::default();
    let mut last_heartbeat: Option<Instant> = None;
    loop {
        if last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
            match keep_node_alive(&nodes).await {
                Ok(()) => last_heartbeat = Some(Instant::now()),
                Err(err) => eprintln!("kubelet stand-in: node {NODE}: {err}"),
            }
        }
        match pods.list(&ListParams::default()).await {
            Ok(listed) => {
                for pod in &listed.items {
                    if let Err(err) = tend(&pods, pod, &mut addresses).await {
                        eprintln!("kubelet stand-in: pod {}: {err}", pod.name_any());
                    }
                }
            }
            Err(err) => eprintln!("kubelet stand-in: list pods of {namespace}: {err}"),
        }
        tokio::time::sleep(SYNC).await;
    }
}

/// Creates the node if it is absent, and gives its Ready condition a fresh heartbeat (marking
/// it Ready again if the node lifecycle controller marked it Unknown since the last run).
async fn keep_node_alive(nodes: &Api<Node>) -> Result<(), kube::Error> {
    let node = match nodes.get_opt(NODE).await? {
        Some(node) => node,
        None => {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": NODE, "labels": {NODE_LABEL: "true"}},
                // Never a target for a real scheduler.
                "spec": {"unschedulable": true},
            }))
            .expect("a valid Node");
            match nodes.create(&PostParams::default(), &node).await {
                Ok(node) => node,
                // Another test process created it meanwhile.
                Err(kube::Error::Api(status)) if status.code == 409 => nodes.get(NODE).await?,
                Err(err) => return Err(err),
            }
        }
    };
    let was_ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let now = now();
    let mut ready = json!({
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "the e2e harness's kubelet stand-in is posting ready status",
        "lastHeartbeatTime": now,
    });
    if !was_ready {
        ready["lastTransitionTime"] = now.clone();
    }
    // A strategic merge patch merges conditions by type, so the transition time stays as it was.
    let patch = json!({"status": {"conditions": [ready]}});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

/// What a kubelet does about `pod` at this moment: bind and start it, or finish its
/// termination, or nothing.
async fn tend(pods: &Api<Pod>, pod: &Pod, addresses: &mut PodAddresses) -> Result<(), kube::Error> {
    let name = pod.name_any();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if let Some(deleted_at) = &pod.metadata.deletion_timestamp {
        // The API server set the deletion timestamp to the end of the grace period; a kubelet
        // that saw the containers stop (here: one whose containers ignored SIGTERM to the end)
        // then deletes the pod for good.
        if node == Some(NODE) && Timestamp::now() >= deleted_at.0 {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: pod.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match pods.delete(&name, &params).await {
                Ok(_) => {}
                // Gone already, or a new pod of the same name: not ours to delete.
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(err) => return Err(err),
            }
        }
        return Ok(());
    }
    match node {
        // Pending: schedule it onto the fake node, as the scheduler would (a binding ignores
        // the node's unschedulable mark, as a scheduler's does not).
        None => {
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
            });
            pods.create_subresource::<_, Value>("binding", &name, &PostParams::default(), &binding)
                .await?;
            start(pods, pod, addresses).await
        }
        Some(NODE) if !is_running(pod) => start(pods, pod, addresses).await,
        // Running already, or on a real node: nothing to do.
        Some(_) => Ok(()),
    }
}

fn is_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
}

/// Reports `pod` as a kubelet does once its containers started and passed their readiness
/// probes: Running, Ready, with an IP of its own.
async fn start(
    pods: &Api<Pod>,
    pod: &Pod,
    addresses: &mut PodAddresses,
) -> Result<(), kube::Error> {
    let name = pod.name_any();
    let ip = addresses.of(&pod.uid().unwrap_or_else(|| name.clone()));
    let now = now();
    let condition = |kind: &str| json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "containerID": format!("stand-in://{name}/{}", c.name),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            condition("Initialized"),
            condition("Ready"),
            condition("ContainersReady"),
            condition("PodScheduled"),
        ],
        "containerStatuses": containers,
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// The current time as the API server writes it (RFC 3339, whole seconds).
fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a time serializes")
}

/// Pod IPs, one per pod: `10.<pid>.<n>`, so test processes running side by side (each with a
/// namespace of its own) do not hand out the same one, and a process repeats one only after 254
/// pods, far more than a test makes. They are only ever data in the pods' status: nothing
/// connects to them.
#[derive(Default)]
struct PodAddresses {
    given: HashMap<String, String>,
}

impl PodAddresses {
    fn of(&mut self, pod_uid: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        self.given
            .entry(pod_uid.to_owned())
            .or_insert_with(|| {
                let pid = std::process::id();
                let n = NEXT.fetch_add(1, Ordering::Relaxed) % 254 + 1;
                format!("10.{}.{}.{n}", (pid >> 8) & 0xff, pid & 0xff)
            })
            .clone()
    }
}

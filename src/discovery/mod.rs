//! Kubernetes discovery: `GetPods` answered from watch caches, with no API call per request.
//!
//! Reflectors (kube-runtime watchers feeding reflector stores) keep Pods, ReplicaSets and
//! Deployments in memory — cluster-wide, or for the namespaces of `EA_KUBE_NAMESPACES` — and
//! [`mapping`] turns them into the wire contract's `Pod` messages. The caches are shared by
//! everything in the process that needs them (the controller will read the same stores).
//!
//! A Deployment's answer is built once per state of the caches: the first lookup after a change
//! maps the Deployment's pods into a [`PodList`], and every lookup until the next change — any
//! event on any watch — shares it. The answers kept are those of Deployments asked about since
//! the last change, so they never outnumber the Deployments in the caches.

pub mod mapping;

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    hash::Hash,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, future::join_all};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::Pod,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::broadcast, task::JoinHandle};

use self::mapping::{PodInfo, controlling_deployment, controlling_replica_set, deployment_pods};
use crate::lease::InvalidArgument;

/// Why pods could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A request field is invalid; the message names it.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
    /// The caches have not been filled yet.
    #[error("the Kubernetes caches have not synced yet; try again shortly")]
    NotSynced,
    /// The namespace is outside `EA_KUBE_NAMESPACES`.
    #[error("namespace {0} is not watched by this agent (EA_KUBE_NAMESPACES)")]
    NamespaceNotWatched(String),
    /// No such Deployment.
    #[error("deployment {namespace}/{name} not found")]
    DeploymentNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// No such pod.
    #[error("pod {namespace}/{name} not found")]
    PodNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod is not part of a Deployment.
    #[error("pod {namespace}/{name} does not belong to a Deployment")]
    NotInDeployment {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The Kubernetes client could not be set up.
    #[error(
        "cannot connect to Kubernetes: {0}; or set EA_KUBE_ENABLE=false to run without Kubernetes"
    )]
    Client(String),
}

/// The reflector stores of one scope (the whole cluster, or one namespace).
#[derive(Clone)]
pub struct Caches {
    /// Pods.
    pub pods: Store<Pod>,
    /// ReplicaSets.
    pub replica_sets: Store<ReplicaSet>,
    /// Deployments.
    pub deployments: Store<Deployment>,
}

impl Caches {
    /// Caches already filled with these objects and marked synced — for tests and benchmarks
    /// that answer `GetPods` without a cluster.
    pub fn from_objects(
        pods: impl IntoIterator<Item = Pod>,
        replica_sets: impl IntoIterator<Item = ReplicaSet>,
        deployments: impl IntoIterator<Item = Deployment>,
    ) -> Self {
        Self {
            pods: filled(pods),
            replica_sets: filled(replica_sets),
            deployments: filled(deployments),
        }
    }
}

/// A reflector store holding `objects`, as after a watcher's initial list.
fn filled<K>(objects: impl IntoIterator<Item = K>) -> Store<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// A Deployment's pods as one state of the caches shows them, shared by every lookup until the
/// caches change.
#[derive(Debug, Default)]
pub struct PodList {
    /// Sorted by ReplicaSet revision, then name.
    pub items: Vec<PodInfo>,
    encoded: OnceLock<Vec<Bytes>>,
}

impl PodList {
    /// The pods as `encode` encodes them for a wire (gRPC: each one's `Pod` message) — encoded by
    /// the first caller, so once per list rather than once per request.
    pub fn encoded(&self, encode: impl FnOnce(&[PodInfo]) -> Vec<Bytes>) -> &[Bytes] {
        self.encoded.get_or_init(|| encode(&self.items))
    }
}

/// The answers built at one state of the caches, by (namespace, Deployment).
#[derive(Default)]
struct Answers {
    /// The state they were built at (the `generation` of [`Discovery`]).
    generation: u64,
    by_deployment: HashMap<(String, String), Arc<PodList>>,
}

/// Which caches hold a namespace's objects.
enum Scope {
    /// One set of caches for the whole cluster.
    Cluster(Caches),
    /// One set per watched namespace.
    Namespaces(BTreeMap<String, Caches>),
}

/// Discovery over watch caches; see the module documentation.
pub struct Discovery {
    scope: Scope,
    synced: Arc<AtomicBool>,
    changes: broadcast::Sender<String>,
    /// Counts the events the caches have taken in: raised after each one is in its cache.
    generation: Arc<AtomicU64>,
    /// None when the caches change unseen ([`Discovery::from_caches`]).
    answers: Option<Mutex<Answers>>,
    tasks: Vec<JoinHandle<()>>,
}

/// How many change notifications a slow subscriber may fall behind before it is told it lagged.
const CHANGES_CAPACITY: usize = 1024;

impl Drop for Discovery {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Discovery {
    /// A client of the in-cluster service account, or of `KUBECONFIG` / `~/.kube/config`.
    pub async fn connect(in_cluster: bool) -> Result<Client, DiscoveryError> {
        let config = if in_cluster {
            kube::Config::incluster().map_err(|err| {
                DiscoveryError::Client(format!(
                    "no in-cluster service account ({err}); outside a cluster set \
                     EA_KUBE_IN_CLUSTER=false to use KUBECONFIG"
                ))
            })?
        } else {
            kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
                .await
                .map_err(|err| DiscoveryError::Client(format!("KUBECONFIG: {err}")))?
        };
        // Its rustls configuration takes the process's default crypto provider.
        crate::transport::crypto_provider();
        Client::try_from(config).map_err(|err| DiscoveryError::Client(err.to_string()))
    }

    /// Starts watching `namespaces` (all when empty) through `client`. Each scope costs three
    /// watches (Pods, ReplicaSets, Deployments), held open for the life of the agent; lookups
    /// read the caches only.
    pub fn start(client: &Client, namespaces: &[String]) -> Self {
        let mut tasks = Vec::new();
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let generation = Arc::new(AtomicU64::new(0));
        let mut watch_scope = |namespace: Option<&str>| {
            let watched = || (changes.clone(), generation.clone());
            let (pods, pod_task) = watch::<Pod>(api(client, namespace), watched());
            let (replica_sets, rs_task) = watch::<ReplicaSet>(api(client, namespace), watched());
            let (deployments, deployment_task) =
                watch::<Deployment>(api(client, namespace), watched());
            tasks.extend([pod_task, rs_task, deployment_task]);
            Caches {
                pods,
                replica_sets,
                deployments,
            }
        };
        let scope = if namespaces.is_empty() {
            Scope::Cluster(watch_scope(None))
        } else {
            Scope::Namespaces(
                namespaces
                    .iter()
                    .map(|ns| (ns.clone(), watch_scope(Some(ns))))
                    .collect(),
            )
        };
        Self::watching(scope, changes, generation, tasks)
    }

    /// Discovery over caches filled by someone else (tests, or a caller with its own watchers):
    /// one set for the whole cluster. Their changes are not seen as they happen, so every lookup
    /// maps the caches afresh.
    pub fn from_caches(caches: Caches) -> Self {
        let mut discovery = Self::fixed(caches);
        discovery.answers = None;
        discovery
    }

    /// Discovery over caches that no longer change (filled by [`Caches::from_objects`]): one set
    /// for the whole cluster, and a Deployment's answer built once and shared by every lookup, as
    /// [`Discovery::start`]'s are between two watch events.
    pub fn fixed(caches: Caches) -> Self {
        Self::watching(
            Scope::Cluster(caches),
            broadcast::channel(1).0,
            Arc::default(),
            Vec::new(),
        )
    }

    fn watching(
        scope: Scope,
        changes: broadcast::Sender<String>,
        generation: Arc<AtomicU64>,
        mut tasks: Vec<JoinHandle<()>>,
    ) -> Self {
        let synced = Arc::new(AtomicBool::new(false));
        let all: Vec<Caches> = match &scope {
            Scope::Cluster(caches) => vec![caches.clone()],
            Scope::Namespaces(by_namespace) => by_namespace.values().cloned().collect(),
        };
        let flag = synced.clone();
        let all_synced = async move {
            let waits = all.iter().map(|c| async {
                c.pods.wait_until_ready().await.is_ok()
                    && c.replica_sets.wait_until_ready().await.is_ok()
                    && c.deployments.wait_until_ready().await.is_ok()
            });
            if join_all(waits).await.into_iter().all(|synced| synced) {
                tracing::info!("Kubernetes caches synced");
                flag.store(true, Ordering::Release);
            }
        };
        // Caches that are filled already count as synced at once; others once they are.
        let mut all_synced = Box::pin(all_synced);
        if (&mut all_synced).now_or_never().is_none() {
            tasks.push(tokio::spawn(all_synced));
        }
        Self {
            scope,
            synced,
            changes,
            generation,
            answers: Some(Mutex::default()),
            tasks,
        }
    }

    /// The namespace of every Pod, ReplicaSet and Deployment the watches see change (added,
    /// modified or deleted), from now on — after the cache holds the change.
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Whether every cache has been filled once.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn caches(&self, namespace: &str) -> Result<&Caches, DiscoveryError> {
        match &self.scope {
            Scope::Cluster(caches) => Ok(caches),
            Scope::Namespaces(by_namespace) => by_namespace
                .get(namespace)
                .ok_or_else(|| DiscoveryError::NamespaceNotWatched(namespace.to_owned())),
        }
    }

    /// The pods of Deployment `deployment` in `namespace` — or, when `pod_name` is set, of the
    /// Deployment owning that pod — from the caches: the list built at the caches' current state,
    /// or a new one (see the module documentation).
    pub fn pods(
        &self,
        namespace: &str,
        deployment: &str,
        pod_name: &str,
    ) -> Result<Arc<PodList>, DiscoveryError> {
        check_pods_request(namespace, deployment, pod_name)?;
        if !self.synced() {
            return Err(DiscoveryError::NotSynced);
        }
        // Read before the caches: a list built from them is at least as new as this state.
        let generation = self.generation.load(Ordering::Acquire);
        let deployment = if pod_name.is_empty() {
            deployment.to_owned()
        } else {
            owning_deployment(self.caches(namespace)?, namespace, pod_name)?
        };
        let key = (namespace.to_owned(), deployment);
        if let Some(answers) = &self.answers {
            let answers = answers.lock().unwrap_or_else(|e| e.into_inner());
            if answers.generation == generation
                && let Some(list) = answers.by_deployment.get(&key)
            {
                return Ok(list.clone());
            }
        }
        let items = self
            .pod_objects(namespace, &key.1, "")?
            .into_iter()
            .map(|(info, _)| info)
            .collect();
        let list = Arc::new(PodList {
            items,
            encoded: OnceLock::new(),
        });
        let Some(answers) = &self.answers else {
            return Ok(list);
        };
        let mut answers = answers.lock().unwrap_or_else(|e| e.into_inner());
        // A list of an older state than the kept ones is answered, not kept; kept lists of an
        // older state than this one are dropped.
        if answers.generation < generation {
            *answers = Answers {
                generation,
                by_deployment: HashMap::new(),
            };
        }
        if answers.generation == generation {
            answers.by_deployment.insert(key, list.clone());
        }
        Ok(list)
    }

    /// [`Discovery::pods`], each with the pod object from the cache (for the controller, which
    /// also needs creation times and labels).
    pub fn pod_objects(
        &self,
        namespace: &str,
        deployment: &str,
        pod_name: &str,
    ) -> Result<Vec<(PodInfo, Arc<Pod>)>, DiscoveryError> {
        check_pods_request(namespace, deployment, pod_name)?;
        if !self.synced() {
            return Err(DiscoveryError::NotSynced);
        }
        let caches = self.caches(namespace)?;
        let deployment = if pod_name.is_empty() {
            deployment.to_owned()
        } else {
            owning_deployment(caches, namespace, pod_name)?
        };
        let replica_sets = caches
            .replica_sets
            .state_filter(|rs| rs.metadata.namespace.as_deref() == Some(namespace));
        let found = caches
            .deployments
            .get(&ObjectRef::new(&deployment).within(namespace))
            .ok_or_else(|| DiscoveryError::DeploymentNotFound {
                namespace: namespace.to_owned(),
                name: deployment.clone(),
            })?;
        let pods = caches
            .pods
            .state_filter(|pod| pod.metadata.namespace.as_deref() == Some(namespace));
        Ok(deployment_pods(&found, &replica_sets, &pods))
    }
}

/// The name of the Deployment owning pod `namespace/pod_name`.
fn owning_deployment(
    caches: &Caches,
    namespace: &str,
    pod_name: &str,
) -> Result<String, DiscoveryError> {
    let pod = caches
        .pods
        .get(&ObjectRef::new(pod_name).within(namespace))
        .ok_or_else(|| DiscoveryError::PodNotFound {
            namespace: namespace.to_owned(),
            name: pod_name.to_owned(),
        })?;
    let replica_sets = caches
        .replica_sets
        .state_filter(|rs| rs.metadata.namespace.as_deref() == Some(namespace));
    controlling_replica_set(&pod, &replica_sets)
        .and_then(|rs| controlling_deployment(rs).map(str::to_owned))
        .ok_or_else(|| DiscoveryError::NotInDeployment {
            namespace: namespace.to_owned(),
            name: pod_name.to_owned(),
        })
}

/// Checks the names a GetPods request gives: the namespace, and the Deployment or (when set,
/// instead) the pod. Public so that the fuzz targets (`fuzz/`) apply the same rules.
pub fn check_pods_request(
    namespace: &str,
    deployment: &str,
    pod_name: &str,
) -> Result<(), InvalidArgument> {
    object_name("namespace", namespace)?;
    if pod_name.is_empty() {
        object_name("deployment", deployment)
    } else {
        object_name("pod_name", pod_name)
    }
}

/// Checks a Kubernetes object name given in the request field `field` (a DNS subdomain: at most
/// 253 characters of lower-case letters, digits, `-` and `.`).
fn object_name(field: &'static str, value: &str) -> Result<(), InvalidArgument> {
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(InvalidArgument {
            field,
            reason: format!(
                "{value:?} is not a Kubernetes object name (1..253 lower-case letters, digits, '-' and '.')"
            ),
        })
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A reflector store of `api`'s objects and the task that keeps it filled (retrying with
/// backoff on errors, never giving up). After each event is in the store, the task raises
/// `generation` and, for an event naming an object, sends the object's namespace to `changes`.
fn watch<K>(
    api: Api<K>,
    (changes, generation): (broadcast::Sender<String>, Arc<AtomicU64>),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|object| object.managed_fields_mut().clear())
            .reflect(writer);
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    // Every event, the end of a re-list too (which may drop objects).
                    generation.fetch_add(1, Ordering::Release);
                    if let watcher::Event::Apply(object)
                    | watcher::Event::Delete(object)
                    | watcher::Event::InitApply(object) = event
                    {
                        // Nobody listening is fine: the controller may not run in this process.
                        drop(changes.send(object.namespace().unwrap_or_default()));
                    }
                }
                Err(err) => {
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %err, "Kubernetes watch failed; retrying");
                }
            }
        }
    });
    (store, task)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{Request, Response};
    use kube::{client::Body, runtime::watcher::Event};
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle, SendResponse};

    use super::*;

    type ApiServer = Handle<Request<Body>, Response<Body>>;

    /// The next request the agent sends to the (mock) API server: its path and query, and
    /// the handle to answer it with.
    async fn next_request(api: &mut ApiServer) -> (String, SendResponse<Response<Body>>) {
        let (request, respond) = tokio::time::timeout(Duration::from_secs(5), api.next_request())
            .await
            .expect("a request within 5 s")
            .expect("the client is alive");
        assert_eq!(request.method(), "GET");
        (request.uri().to_string(), respond)
    }

    fn json_response(body: &Value) -> Response<Body> {
        Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    fn meta(name: &str, extra: Value) -> Value {
        let mut meta = json!({"name": name, "namespace": "shop", "uid": format!("{name}-uid"),
            "resourceVersion": "1"});
        meta.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        meta
    }

    fn owned_by(kind: &str, name: &str) -> Value {
        json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": name,
            "uid": format!("{name}-uid"), "controller": true}]})
    }

    fn pod(name: &str) -> Value {
        let mut metadata = meta(name, owned_by("ReplicaSet", "web-1"));
        metadata["labels"] = json!({"app": "web"});
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "status": {"phase": "Running", "podIP": "10.0.0.1"}})
    }

    /// The list a watcher starts with, for the object kind its request path names.
    fn initial_list(path: &str) -> Value {
        let (api_version, kind, items) = if path.starts_with("/api/v1/namespaces/shop/pods?") {
            ("v1", "PodList", vec![pod("web-1-a")])
        } else if path.starts_with("/apis/apps/v1/namespaces/shop/replicasets?") {
            let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": meta("web-1", owned_by("Deployment", "web")),
                "status": {"replicas": 1}});
            ("apps/v1", "ReplicaSetList", vec![rs])
        } else if path.starts_with("/apis/apps/v1/namespaces/shop/deployments?") {
            let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": meta("web", json!({})),
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}}}}});
            ("apps/v1", "DeploymentList", vec![deployment])
        } else {
            panic!("unexpected request {path}");
        };
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"},
            "items": items})
    }

    /// Against kube-rs' mock API server: three lists and three watches per watched namespace,
    /// changes arriving on a watch show in the next lookup, and lookups themselves send nothing.
    #[tokio::test]
    async fn the_caches_follow_the_api_servers_watches_and_lookups_send_no_requests() {
        let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let discovery = Discovery::start(&Client::new(service, "default"), &["shop".to_owned()]);

        for _ in 0..3 {
            let (path, respond) = next_request(&mut api).await;
            assert!(!path.contains("watch=true"), "a list first: {path}");
            respond.send_response(json_response(&initial_list(&path)));
        }
        let mut open_watches = Vec::new();
        let mut pod_watch = None;
        for _ in 0..3 {
            let (path, respond) = next_request(&mut api).await;
            assert!(path.contains("watch=true"), "then a watch: {path}");
            if path.starts_with("/api/v1/namespaces/shop/pods?") {
                pod_watch = Some(respond);
            } else {
                open_watches.push(respond);
            }
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while !discovery.synced() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("synced after the lists");
        let names = |pods: Arc<PodList>| {
            pods.items
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(discovery.pods("shop", "web", "").unwrap()),
            ["web-1-a"]
        );
        assert!(matches!(
            discovery.pods("elsewhere", "web", ""),
            Err(DiscoveryError::NamespaceNotWatched(ns)) if ns == "elsewhere"
        ));

        // A new pod arrives on the pod watch (which then ends; the watcher resumes it).
        let mut added = pod("web-1-b");
        added["metadata"]["resourceVersion"] = json!("2");
        let event = json!({"type": "ADDED", "object": added});
        pod_watch.unwrap().send_response(
            Response::builder()
                .body(Body::from(format!("{event}\n").into_bytes()))
                .unwrap(),
        );
        let (path, pod_watch) = next_request(&mut api).await;
        assert!(
            path.contains("watch=true") && path.contains("resourceVersion=2"),
            "the pod watch resumes from the event: {path}"
        );
        assert_eq!(
            names(discovery.pods("shop", "web", "").unwrap()),
            ["web-1-a", "web-1-b"]
        );
        assert_eq!(
            names(discovery.pods("shop", "", "web-1-b").unwrap()),
            ["web-1-a", "web-1-b"]
        );

        // Lookups are answered from memory: the API server sees nothing more.
        for _ in 0..1_000 {
            discovery.pods("shop", "web", "").unwrap();
        }
        let more = tokio::time::timeout(Duration::from_millis(200), api.next_request()).await;
        assert!(more.is_err(), "no request per lookup: {more:?}");
        // ... and while nothing changes, every lookup of the Deployment shares one answer.
        let answer = discovery.pods("shop", "web", "").unwrap();
        assert!(Arc::ptr_eq(
            &answer,
            &discovery.pods("shop", "web", "").unwrap()
        ));
        assert!(Arc::ptr_eq(
            &answer,
            &discovery.pods("shop", "", "web-1-a").unwrap()
        ));

        // The pod watch expires and the watcher lists again: the new list has no pods. No pod
        // event comes of it (no object is added, changed or deleted on a watch), only the end of
        // the list, and the answer must follow it.
        let expired = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
            "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version"}});
        pod_watch.send_response(
            Response::builder()
                .body(Body::from(format!("{expired}\n").into_bytes()))
                .unwrap(),
        );
        let (path, respond) = next_request(&mut api).await;
        assert!(
            path.starts_with("/api/v1/namespaces/shop/pods?") && !path.contains("watch=true"),
            "the pods listed again: {path}"
        );
        respond.send_response(json_response(
            &json!({"apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "3"}, "items": []}),
        ));
        let (path, respond) = next_request(&mut api).await;
        assert!(path.contains("watch=true"), "then watched again: {path}");
        open_watches.push(respond);
        assert!(names(discovery.pods("shop", "web", "").unwrap()).is_empty());
        drop(open_watches);
    }

    fn empty_caches() -> (Caches, impl FnOnce()) {
        let (pods, mut pod_writer) = reflector::store::<Pod>();
        let (replica_sets, mut rs_writer) = reflector::store::<ReplicaSet>();
        let (deployments, mut deployment_writer) = reflector::store::<Deployment>();
        let sync = move || {
            pod_writer.apply_watcher_event(&Event::InitDone);
            rs_writer.apply_watcher_event(&Event::InitDone);
            deployment_writer.apply_watcher_event(&Event::InitDone);
        };
        (
            Caches {
                pods,
                replica_sets,
                deployments,
            },
            sync,
        )
    }

    #[tokio::test]
    async fn lookups_wait_for_the_caches_and_name_what_is_missing() {
        let (caches, sync) = empty_caches();
        let discovery = Discovery::from_caches(caches);
        assert!(matches!(
            discovery.pods("ns", "web", ""),
            Err(DiscoveryError::NotSynced)
        ));
        sync();
        tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while !discovery.synced() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("synced");
        let err = discovery.pods("ns", "web", "").unwrap_err();
        assert_eq!(err.to_string(), "deployment ns/web not found");
        let err = discovery.pods("ns", "", "web-1").unwrap_err();
        assert_eq!(err.to_string(), "pod ns/web-1 not found");
        let err = discovery.pods("", "web", "").unwrap_err();
        assert!(err.to_string().starts_with("invalid namespace"), "{err}");
        let err = discovery.pods("ns", "Web*", "").unwrap_err();
        assert!(err.to_string().starts_with("invalid deployment"), "{err}");
    }
}

//! From Kubernetes objects to the `Pod` / `PodStatus` / `ReplicaSet` of the wire contract, as
//! pure functions: no client, no cache, tested on plain k8s-openapi objects.
//!
//! The pods of a Deployment are those its label selector matches **and** whose controller
//! ReplicaSet is controlled by that Deployment (owner references), so pods of another Deployment
//! with overlapping labels, and pods nobody owns, are left out.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::core::{Selector, SelectorExt};
use serde::Serialize;

/// ReplicaSet annotation: the Deployment revision it belongs to.
const REVISION: &str = "deployment.kubernetes.io/revision";
/// ReplicaSet annotation: the Deployment's desired replicas.
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// ReplicaSet annotation: desired replicas plus max surge.
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// One pod of a Deployment (wire message `Pod`; JSON field names as in gRPC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// The Deployment it belongs to.
    pub deployment: String,
    /// Pod IP (empty until assigned).
    pub ip: String,
    /// Phase and conditions.
    pub status: PodStatusInfo,
    /// The ReplicaSet that owns it.
    pub replica_set: ReplicaSetInfo,
}

/// A pod's phase and conditions (wire message `PodStatus`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusInfo {
    /// Pending, Running, Succeeded, Failed or Unknown.
    pub phase: String,
    /// Why the pod is in this state, when Kubernetes says.
    pub reason: String,
    /// The pod has a deletion timestamp (its phase can still be Running).
    pub terminating: bool,
    /// Condition PodScheduled is True.
    pub pod_scheduled: bool,
    /// Condition Initialized is True.
    pub pod_initialized: bool,
    /// Condition Ready is True.
    pub pod_ready: bool,
    /// Condition ContainersReady is True.
    pub containers_ready: bool,
}

/// The ReplicaSet owning a pod (wire message `ReplicaSet`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSetInfo {
    /// ReplicaSet name.
    pub name: String,
    /// Deployment revision (annotation `deployment.kubernetes.io/revision`; 0 when absent).
    pub revision: i32,
    /// status.availableReplicas.
    pub available_replicas: i32,
    /// status.fullyLabeledReplicas.
    pub fully_labeled_replicas: i32,
    /// status.readyReplicas.
    pub ready_replicas: i32,
    /// status.replicas.
    pub replicas: i32,
    /// Annotation `deployment.kubernetes.io/desired-replicas` (0 when absent).
    pub desired_replicas: i32,
    /// Annotation `deployment.kubernetes.io/max-replicas` (0 when absent).
    pub max_replicas: i32,
}

fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_deref()?
        .iter()
        .find(|owner| owner.controller == Some(true))
}

fn annotation(meta: &ObjectMeta, key: &str) -> i32 {
    meta.annotations
        .as_ref()
        .and_then(|annotations| annotations.get(key))
        .and_then(|value| value.parse().ok())
        .unwrap_or_default()
}

/// The ReplicaSet among `replica_sets` that controls `pod`, if any.
pub fn controlling_replica_set<'a>(
    pod: &Pod,
    replica_sets: &'a [Arc<ReplicaSet>],
) -> Option<&'a Arc<ReplicaSet>> {
    let owner = controller(&pod.metadata).filter(|o| o.kind == "ReplicaSet")?;
    replica_sets
        .iter()
        .find(|rs| rs.metadata.uid.as_deref() == Some(owner.uid.as_str()))
}

/// The name of the Deployment controlling `replica_set`, if any.
pub fn controlling_deployment(replica_set: &ReplicaSet) -> Option<&str> {
    controller(&replica_set.metadata)
        .filter(|o| o.kind == "Deployment")
        .map(|o| o.name.as_str())
}

fn replica_set_info(rs: &ReplicaSet) -> ReplicaSetInfo {
    let status = rs.status.as_ref();
    ReplicaSetInfo {
        name: rs.metadata.name.clone().unwrap_or_default(),
        revision: annotation(&rs.metadata, REVISION),
        available_replicas: status
            .and_then(|s| s.available_replicas)
            .unwrap_or_default(),
        fully_labeled_replicas: status
            .and_then(|s| s.fully_labeled_replicas)
            .unwrap_or_default(),
        ready_replicas: status.and_then(|s| s.ready_replicas).unwrap_or_default(),
        replicas: status.map(|s| s.replicas).unwrap_or_default(),
        desired_replicas: annotation(&rs.metadata, DESIRED_REPLICAS),
        max_replicas: annotation(&rs.metadata, MAX_REPLICAS),
    }
}

fn status_info(pod: &Pod) -> PodStatusInfo {
    let status = pod.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    PodStatusInfo {
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        reason: status.and_then(|s| s.reason.clone()).unwrap_or_default(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        pod_scheduled: condition("PodScheduled"),
        pod_initialized: condition("Initialized"),
        pod_ready: condition("Ready"),
        containers_ready: condition("ContainersReady"),
    }
}

/// The pods of `deployment`, sorted by ReplicaSet revision, then pod name: those its selector
/// matches whose controller is a ReplicaSet controlled by this very Deployment (owner UIDs, so a
/// re-created Deployment of the same name does not adopt its predecessor's pods). Objects of
/// other namespaces among `replica_sets` and `pods` are ignored.
/// Each pod comes with the object it was read from (the controller needs its labels and age).
pub fn deployment_pods(
    deployment: &Deployment,
    replica_sets: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
) -> Vec<(PodInfo, Arc<Pod>)> {
    let name = deployment.metadata.name.as_deref().unwrap_or_default();
    let namespace = deployment.metadata.namespace.as_deref();
    let Some(selector) = deployment
        .spec
        .as_ref()
        .and_then(|spec| Selector::try_from(spec.selector.clone()).ok())
    else {
        return Vec::new();
    };
    // The Deployment's own ReplicaSets (a handful: its revision history), found once.
    let uid = deployment.metadata.uid.as_deref();
    let owned: Vec<Arc<ReplicaSet>> = replica_sets
        .iter()
        .filter(|rs| rs.metadata.namespace.as_deref() == namespace)
        .filter(|rs| {
            controller(&rs.metadata)
                .is_some_and(|o| o.kind == "Deployment" && Some(o.uid.as_str()) == uid)
        })
        .cloned()
        .collect();
    let no_labels = BTreeMap::new();
    let mut found: Vec<(PodInfo, Arc<Pod>)> = pods
        .iter()
        .filter(|pod| pod.metadata.namespace.as_deref() == namespace)
        .filter(|pod| selector.matches(pod.metadata.labels.as_ref().unwrap_or(&no_labels)))
        .filter_map(|pod| {
            let rs = controlling_replica_set(pod, &owned)?;
            let info = PodInfo {
                name: pod.metadata.name.clone().unwrap_or_default(),
                deployment: name.to_owned(),
                ip: pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .unwrap_or_default(),
                status: status_info(pod),
                replica_set: replica_set_info(rs),
            };
            Some((info, pod.clone()))
        })
        .collect();
    found.sort_by(|(a, _), (b, _)| {
        (a.replica_set.revision, &a.name).cmp(&(b.replica_set.revision, &b.name))
    });
    found
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::{DeploymentSpec, ReplicaSetStatus},
            core::v1::{PodCondition, PodStatus},
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
        jiff::Timestamp,
    };

    use super::*;

    /// The pods' wire views only.
    fn deployment_pods(
        deployment: &Deployment,
        replica_sets: &[Arc<ReplicaSet>],
        pods: &[Arc<Pod>],
    ) -> Vec<PodInfo> {
        super::deployment_pods(deployment, replica_sets, pods)
            .into_iter()
            .map(|(info, _)| info)
            .collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn owner(kind: &str, name: &str, uid: &str) -> Option<Vec<OwnerReference>> {
        Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }])
    }

    fn deployment(name: &str, app: &str) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("{name}-uid")),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                selector: LabelSelector {
                    match_labels: labels(&[("app", app)]),
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn replica_set(name: &str, deployment: &str, revision: Option<&str>) -> Arc<ReplicaSet> {
        let annotations = revision.map(|r| {
            [
                (REVISION.to_string(), r.to_string()),
                (DESIRED_REPLICAS.to_string(), "3".to_string()),
                (MAX_REPLICAS.to_string(), "4".to_string()),
            ]
            .into()
        });
        Arc::new(ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("{name}-uid")),
                annotations,
                owner_references: owner("Deployment", deployment, &format!("{deployment}-uid")),
                ..Default::default()
            },
            status: Some(ReplicaSetStatus {
                replicas: 3,
                ready_replicas: Some(2),
                available_replicas: Some(2),
                fully_labeled_replicas: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn pod(name: &str, app: &str, replica_set: Option<&str>) -> Pod {
        let condition = |kind: &str, status: &str| PodCondition {
            type_: kind.into(),
            status: status.into(),
            ..Default::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: labels(&[("app", app)]),
                owner_references: replica_set
                    .and_then(|rs| owner("ReplicaSet", rs, &format!("{rs}-uid"))),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(format!("10.0.0.{}", name.len())),
                conditions: Some(vec![
                    condition("PodScheduled", "True"),
                    condition("Initialized", "True"),
                    condition("Ready", "False"),
                    condition("ContainersReady", "True"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(pods: &[PodInfo]) -> Vec<(&str, i32)> {
        pods.iter()
            .map(|p| (p.name.as_str(), p.replica_set.revision))
            .collect()
    }

    #[test]
    fn a_rolling_update_lists_both_revisions_oldest_first_then_by_name() {
        let replica_sets = [
            replica_set("web-new", "web", Some("2")),
            replica_set("web-old", "web", Some("1")),
        ];
        let pods = [
            Arc::new(pod("web-new-b", "web", Some("web-new"))),
            Arc::new(pod("web-old-z", "web", Some("web-old"))),
            Arc::new(pod("web-new-a", "web", Some("web-new"))),
            Arc::new(pod("web-old-a", "web", Some("web-old"))),
        ];
        let found = deployment_pods(&deployment("web", "web"), &replica_sets, &pods);
        assert_eq!(
            names(&found),
            [
                ("web-old-a", 1),
                ("web-old-z", 1),
                ("web-new-a", 2),
                ("web-new-b", 2)
            ]
        );
    }

    #[test]
    fn every_field_is_filled_from_the_pod_and_its_replica_set() {
        let replica_sets = [replica_set("web-1", "web", Some("7"))];
        let mut terminating = pod("web-1-a", "web", Some("web-1"));
        terminating.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        terminating.status.as_mut().unwrap().reason = Some("Evicted".into());
        let found = deployment_pods(
            &deployment("web", "web"),
            &replica_sets,
            &[Arc::new(terminating)],
        );
        assert_eq!(
            found,
            [PodInfo {
                name: "web-1-a".into(),
                deployment: "web".into(),
                ip: "10.0.0.7".into(),
                status: PodStatusInfo {
                    phase: "Running".into(),
                    reason: "Evicted".into(),
                    terminating: true,
                    pod_scheduled: true,
                    pod_initialized: true,
                    pod_ready: false,
                    containers_ready: true,
                },
                replica_set: ReplicaSetInfo {
                    name: "web-1".into(),
                    revision: 7,
                    available_replicas: 2,
                    fully_labeled_replicas: 3,
                    ready_replicas: 2,
                    replicas: 3,
                    desired_replicas: 3,
                    max_replicas: 4,
                },
            }]
        );
    }

    #[test]
    fn pods_without_owner_or_of_another_deployment_with_the_same_labels_are_left_out() {
        let replica_sets = [
            replica_set("web-1", "web", Some("1")),
            replica_set("copy-1", "copy", Some("1")),
        ];
        let pods = [
            Arc::new(pod("web-1-a", "web", Some("web-1"))),
            Arc::new(pod("orphan", "web", None)),
            Arc::new(pod("copy-1-a", "web", Some("copy-1"))),
            Arc::new(pod("other-app", "other", Some("web-1"))),
        ];
        let found = deployment_pods(&deployment("web", "web"), &replica_sets, &pods);
        assert_eq!(names(&found), [("web-1-a", 1)]);
    }

    #[test]
    fn a_recreated_deployment_does_not_claim_its_predecessors_pods() {
        let replica_sets = [replica_set("web-1", "web", Some("1"))];
        let pods = [Arc::new(pod("web-1-a", "web", Some("web-1")))];
        let mut recreated = deployment("web", "web");
        recreated.metadata.uid = Some("web-uid-2".into());
        assert!(deployment_pods(&recreated, &replica_sets, &pods).is_empty());
    }

    #[test]
    fn replica_sets_without_annotations_report_zero() {
        let replica_sets = [replica_set("web-1", "web", None)];
        let pods = [Arc::new(pod("web-1-a", "web", Some("web-1")))];
        let found = deployment_pods(&deployment("web", "web"), &replica_sets, &pods);
        let rs = &found[0].replica_set;
        assert_eq!(
            (rs.revision, rs.desired_replicas, rs.max_replicas),
            (0, 0, 0)
        );
    }

    #[test]
    fn pods_in_another_namespace_are_left_out() {
        let replica_sets = [replica_set("web-1", "web", Some("1"))];
        let mut elsewhere = pod("web-1-a", "web", Some("web-1"));
        elsewhere.metadata.namespace = Some("other".into());
        assert!(
            deployment_pods(
                &deployment("web", "web"),
                &replica_sets,
                &[Arc::new(elsewhere)]
            )
            .is_empty()
        );
    }

    #[test]
    fn json_uses_the_grpc_field_names_and_keeps_zero_values() {
        let json = serde_json::to_value(PodInfo::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "", "deployment": "", "ip": "",
                "status": {"phase": "", "reason": "", "terminating": false, "podScheduled": false,
                           "podInitialized": false, "podReady": false, "containersReady": false},
                "replicaSet": {"name": "", "revision": 0, "availableReplicas": 0,
                               "fullyLabeledReplicas": 0, "readyReplicas": 0, "replicas": 0,
                               "desiredReplicas": 0, "maxReplicas": 0}
            })
        );
    }
}

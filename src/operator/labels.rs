//! The leader label of managed Elections: `"true"` on exactly the leader pod, removed from every
//! other pod first — and taken off the pods it was on when the label or the Deployment changes,
//! managed mode is switched off or the Election is deleted ([`ElectionStatus::labelled`] says
//! where it was put).
//!
//! The discovery cache lags behind this controller's own writes: a label added a moment ago may
//! not show yet, and a leader that moves again in that moment would leave it on the old pod. So
//! the cache alone only ever decides that nothing needs doing — when it shows no move to make and
//! the leader is the pod this controller last labelled. Otherwise the pods carrying the label are
//! listed from the API server (cheap: it happens on leader changes) and the moves are decided
//! from that.
//!
//! [`ElectionStatus::labelled`]: super::crd::ElectionStatus::labelled

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Mutex, PoisonError},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::{
    Context, OperatorError,
    crd::{Election, LabelledPods},
    plan::{self, LabelMove, PodState},
};
use crate::discovery::DiscoveryError;

/// The leader pod this controller last left labelled, per Election (by UID); an Election it has
/// not labelled since it started is not in it.
#[derive(Default)]
pub(super) struct Labelled(Mutex<HashMap<String, Option<String>>>);

impl Labelled {
    fn settled(&self, uid: &str, leader: Option<&str>) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uid)
            .is_some_and(|last| last.as_deref() == leader)
    }

    fn remember(&self, uid: &str, leader: Option<&str>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid.to_owned(), leader.map(str::to_owned));
    }

    /// Forgets an Election (deleted, or no longer labelling).
    pub(super) fn forget(&self, uid: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid);
    }
}

/// Where `election` keeps its leader label now: on its Deployment's pods in managed mode.
pub(super) fn target(election: &Election) -> Option<LabelledPods> {
    let deployment = election.spec.deployment.as_ref()?;
    election.spec.managed.then(|| LabelledPods {
        label: election.spec.leader_label.clone(),
        deployment: deployment.clone(),
    })
}

/// Leaves the label on exactly `leader` among `pods` (the Deployment's, from the cache).
pub(super) async fn settle(
    election: &Election,
    ctx: &Context,
    namespace: &str,
    pods: &[PodState],
    leader: Option<&str>,
) -> Result<(), OperatorError> {
    let uid = election.uid().unwrap_or_default();
    let label = &election.spec.leader_label;
    if plan::label_moves(pods, leader).is_empty() && ctx.labelled.settled(&uid, leader) {
        return Ok(());
    }
    let carrying = carrying(ctx, namespace, label).await?;
    let now: Vec<PodState> = pods
        .iter()
        .map(|pod| PodState {
            leader_label: carrying.get(&pod.info.name).cloned(),
            ..pod.clone()
        })
        .collect();
    for change in plan::label_moves(&now, leader) {
        match change {
            LabelMove::Remove(pod) => relabel(ctx, namespace, &pod, label, None).await?,
            LabelMove::Add(pod) => relabel(ctx, namespace, &pod, label, Some("true")).await?,
        }
    }
    ctx.labelled.remember(&uid, leader);
    Ok(())
}

/// Takes `labelled`'s label off the pods of its Deployment, as the API server lists them now.
pub(super) async fn take_off(
    election: &Election,
    ctx: &Context,
    namespace: &str,
    labelled: &LabelledPods,
) -> Result<(), OperatorError> {
    let Some(discovery) = ctx.service.discovery() else {
        return Err(OperatorError::NotReady(
            "Kubernetes discovery is off: cannot tell which pods carry the leader label".into(),
        ));
    };
    let members: HashSet<String> = match discovery.pod_objects(namespace, &labelled.deployment, "")
    {
        Ok(pods) => pods.into_iter().map(|(info, _)| info.name).collect(),
        // Its pods are gone with it.
        Err(DiscoveryError::DeploymentNotFound { .. }) => HashSet::new(),
        Err(err) => {
            return Err(OperatorError::NotReady(format!(
                "cannot take the leader label off the pods yet: {err}"
            )));
        }
    };
    let carrying = carrying(ctx, namespace, &labelled.label).await?;
    for pod in carrying.keys().filter(|pod| members.contains(*pod)) {
        relabel(ctx, namespace, pod, &labelled.label, None).await?;
    }
    ctx.labelled.forget(&election.uid().unwrap_or_default());
    Ok(())
}

/// The pods of `namespace` carrying `label`, with its value, as the API server has them now.
async fn carrying(
    ctx: &Context,
    namespace: &str,
    label: &str,
) -> Result<BTreeMap<String, String>, OperatorError> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = api
        .list_metadata(&ListParams::default().labels(label))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|pod| {
            let value = pod.labels().get(label).cloned()?;
            Some((pod.name_any(), value))
        })
        .collect())
}

/// Sets `label` on `pod` to `value`, or removes it.
async fn relabel(
    ctx: &Context,
    namespace: &str,
    pod: &str,
    label: &str,
    value: Option<&str>,
) -> Result<(), OperatorError> {
    ctx.leading.check()?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({"metadata": {"labels": {label: value}}});
    match api
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // The pod is gone: nothing to label or unlabel.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

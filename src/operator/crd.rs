//! The `Election` custom resource (`election-agent.io/v1`): its spec, its status, and the CRD
//! generated from them (`election-agent crd`, checked in as `crds/election.yaml`).
//!
//! Validation lives in the schema itself — patterns, lengths, minimums — so the API server
//! refuses a bad object at `kubectl apply`. Only OpenAPI v3 features that Kubernetes 1.24 already
//! has are used (no CEL rules).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Election kinds and names, as the lease API accepts them.
const NAME_PATTERN: &str = r"^[A-Za-z0-9._:/@-]{1,253}$";
/// A Deployment name (DNS subdomain).
const DEPLOYMENT_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";
/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
const LABEL_KEY_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A term: a whole number of milliseconds, seconds, minutes or hours — never negative.
pub const TERM_PATTERN: &str = r"^[0-9]{1,8}(ms|s|m|h)$";

/// The label managed mode puts on the leader pod unless `leaderLabel` says otherwise.
pub const DEFAULT_LEADER_LABEL: &str = "election-agent.io/leader";

/// An election the agent keeps in its lease store and reports on — or, in managed mode, runs
/// among a Deployment's pods.
// Each printer column repeats `name = .., type_ = ..`; clippy takes those for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "election-agent.io",
    version = "v1",
    kind = "Election",
    namespaced,
    shortname = "el",
    status = "ElectionStatus",
    derive = "PartialEq",
    doc = "A leader election kept by election-agent",
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(name = "Token", type_ = "integer", json_path = ".status.fencingToken"),
    printcolumn(
        name = "Revision",
        type_ = "integer",
        description = "ReplicaSet revision of the leader pod",
        json_path = ".status.leaderRevision"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "ready candidate pods / all pods",
        json_path = ".status.ready"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ElectionSpec {
    /// The election kind (groups elections); `default` when empty.
    #[serde(default = "default_kind")]
    #[schemars(pattern(NAME_PATTERN))]
    pub kind: String,
    /// The lease's election name; the object's name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NAME_PATTERN))]
    pub election: Option<String>,
    /// How long a leader's lease lasts without renewal, e.g. `500ms`, `15s`, `2m` (within the
    /// agent's EA_LEASE_MIN_TERM..EA_LEASE_MAX_TERM).
    #[serde(default = "default_term")]
    #[schemars(pattern(TERM_PATTERN))]
    pub term: String,
    /// The Deployment whose pods are the candidates (reported in status; elected among in
    /// managed mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DEPLOYMENT_PATTERN))]
    pub deployment: Option<String>,
    /// The controller elects the leader among the Deployment's ready pods itself, keeps its
    /// lease and labels the leader pod.
    #[serde(default)]
    pub managed: bool,
    /// The label set to "true" on exactly the leader pod in managed mode.
    #[serde(default = "default_leader_label")]
    #[schemars(pattern(LABEL_KEY_PATTERN))]
    pub leader_label: String,
    /// In managed mode, prefer pods of the newest ReplicaSet revision (then the oldest pod).
    #[serde(default = "default_true")]
    pub prefer_newest_revision: bool,
}

fn default_kind() -> String {
    "default".into()
}

fn default_term() -> String {
    "15s".into()
}

fn default_leader_label() -> String {
    DEFAULT_LEADER_LABEL.into()
}

fn default_true() -> bool {
    true
}

/// What the controller last saw of the election.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElectionStatus {
    /// The live leader; unset when nobody leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The fencing token of the leader's lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// When the current leader (by fencing token) was first seen leading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_since: Option<Time>,
    /// When the lease was last seen renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<Time>,
    /// When the lease expires unless renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<Time>,
    /// How many times leadership changed hands while the controller watched.
    #[serde(default)]
    pub transitions: i64,
    /// The ReplicaSet revision of the leader pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_revision: Option<i32>,
    /// Ready, non-terminating candidate pods / all pods of the Deployment, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// The Deployment's pods.
    #[serde(default)]
    pub pods: Vec<CandidatePod>,
    /// The Deployment's ReplicaSets that have pods.
    #[serde(default)]
    pub revisions: Vec<RevisionStatus>,
    /// Ready, LeaderElected, StoreAvailable, Conflict.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The leader label the controller keeps on the leader pod (managed mode), and on which
    /// Deployment's pods: kept so that when the label or the Deployment changes, managed mode is
    /// switched off or the Election is deleted, the label is taken off the pods it was put on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled: Option<LabelledPods>,
}

/// Where the controller keeps an Election's leader label.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelledPods {
    /// The label (`spec.leaderLabel` when it was put on).
    pub label: String,
    /// The Deployment whose leader pod carries it (`spec.deployment` then).
    pub deployment: String,
}

/// One pod of the Deployment.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CandidatePod {
    /// Pod name.
    pub name: String,
    /// Pod IP.
    #[serde(default)]
    pub ip: String,
    /// Pod phase.
    #[serde(default)]
    pub phase: String,
    /// Condition Ready is True.
    #[serde(default)]
    pub ready: bool,
    /// The pod has a deletion timestamp.
    #[serde(default)]
    pub terminating: bool,
    /// Its ReplicaSet.
    #[serde(default)]
    pub replica_set: String,
    /// Its ReplicaSet's Deployment revision.
    #[serde(default)]
    pub revision: i32,
    /// It is the leader.
    #[serde(default)]
    pub leader: bool,
}

/// One ReplicaSet (revision) of the Deployment.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    /// ReplicaSet name.
    pub replica_set: String,
    /// Deployment revision.
    pub revision: i32,
    /// Pods it has.
    pub replicas: i32,
    /// Of which ready.
    pub ready: i32,
}

impl Election {
    /// The lease's election name: `spec.election`, else the object's name.
    pub fn lease_name(&self) -> String {
        self.spec
            .election
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }
}

/// The CRD as YAML, exactly as `crds/election.yaml` holds it.
pub fn crd_yaml() -> String {
    let yaml = serde_saphyr::to_string(&Election::crd()).expect("a CRD always serializes");
    format!("# Generated by `election-agent crd` from src/operator/crd.rs; do not edit.\n{yaml}")
}

/// Milliseconds of a term string matching [`TERM_PATTERN`].
pub fn term_ms(term: &str) -> Option<i64> {
    let digits = term.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = digits.parse().ok()?;
    let unit = match &term[digits.len()..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    value.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_checked_in_crd_equals_the_generated_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/election.yaml");
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == crd_yaml(),
            "crds/election.yaml is out of date; regenerate it: cargo run -- crd > crds/election.yaml"
        );
    }

    #[test]
    fn the_crd_has_what_kubectl_shows_and_validates() {
        let crd = serde_json::to_value(Election::crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["el"])
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Leader", "Token", "Revision", "Ready", "Age"]);
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["term"]["pattern"], TERM_PATTERN);
        for field in ["kind", "election", "deployment", "leaderLabel"] {
            assert!(spec[field]["pattern"].is_string(), "{field} has a pattern");
        }
        let text = crd.to_string();
        assert!(
            !text.contains("x-kubernetes-validations"),
            "no CEL: the CRD must install on Kubernetes 1.24"
        );
    }

    #[test]
    fn the_example_elections_are_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/elections.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let examples: Vec<Election> = serde_saphyr::from_multiple(&text).unwrap();
        let names: Vec<_> = examples.iter().map(|e| e.lease_name()).collect();
        assert_eq!(names, ["jobs", "web-leader"]);
        for e in &examples {
            assert!(term_ms(&e.spec.term).is_some(), "{:?}", e.spec.term);
            assert_eq!(e.spec.kind, "default");
            assert_eq!(e.spec.leader_label, DEFAULT_LEADER_LABEL);
        }
        assert!(examples[1].spec.managed && examples[1].spec.prefer_newest_revision);
    }

    #[test]
    fn terms_are_whole_numbers_of_one_unit() {
        for (term, ms) in [
            ("500ms", 500),
            ("15s", 15_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(term_ms(term), Some(ms), "{term}");
        }
        for bad in ["-5s", "5", "5 s", "1.5s", "5d", "", "s"] {
            assert_eq!(term_ms(bad), None, "{bad}");
        }
    }
}

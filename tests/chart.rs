//! The Helm chart (`helm/election-agent`): it lints, its values schema refuses bad values naming
//! them, its CRD is the code's, and the plain manifests for users without Helm
//! (`deploy/election-agent.yaml`) are exactly what it renders with default values.
//!
//! Needs the `helm` binary: `scripts/test.sh` installs one into `target/tools/bin` and puts it on
//! PATH; `HELM` names another.

mod tools;

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

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

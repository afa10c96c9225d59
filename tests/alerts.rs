//! The chart's alerts and dashboard: `promtool` checks the PrometheusRule's rules and runs their
//! unit tests (`tests/alerts/election-agent.test.yaml`: each alert fires on series that should
//! fire it and stays silent on others), every alert has such tests, and every metric the rules
//! and the dashboard query is one the agent exports.
//!
//! Needs `helm` (as tests/chart.rs: `HELM`, else PATH) and `promtool` (`PROMTOOL`, else PATH;
//! Debian's `prometheus` package, which `scripts/test.sh` installs).

mod tools;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use election_agent::{
    metrics::Metrics,
    operator::{
        OperatorMetrics,
        crd::{Election, ElectionStatus},
    },
};
use serde_json::{Value, json};
use tools::{CHART, helm, root, run};

const RULE_TESTS: &str = "tests/alerts/election-agent.test.yaml";
const DASHBOARD: &str = "helm/election-agent/files/dashboard.json";

/// One template of the chart rendered as the plain manifests are (release and namespace
/// `election-agent`) with `values`, parsed.
fn rendered(template: &str, values: &[&str]) -> Value {
    let printed = tools::template(&[&["--show-only", template][..], &tools::set(values)].concat());
    serde_saphyr::from_str(&printed).unwrap_or_else(|err| panic!("{err}:\n{printed}"))
}

/// The PrometheusRule's rule groups, as a plain Prometheus rules file.
fn rules(values: &[&str]) -> Value {
    let rule = rendered("templates/prometheusrule.yaml", values);
    assert_eq!(rule["kind"], "PrometheusRule");
    json!({"groups": rule["spec"]["groups"]})
}

fn alert_names(rules: &Value) -> BTreeSet<String> {
    every_rule(rules)
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

fn every_rule(rules: &Value) -> impl Iterator<Item = &Value> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
}

/// A directory of this test process's own.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn each_alert_fires_on_series_that_should_fire_it_and_stays_silent_on_the_others() {
    let dir = scratch("alerts");
    let rules = rules(&["prometheusRule.enabled=true"]);
    std::fs::write(dir.join("rules.yaml"), rules.to_string()).unwrap();
    std::fs::copy(root().join(RULE_TESTS), dir.join("tests.yaml")).unwrap();

    let (ok, printed) = run(
        "PROMTOOL",
        "promtool",
        &["check", "rules", "rules.yaml"],
        &dir,
    );
    assert!(ok, "promtool check rules:\n{printed}");
    let (ok, printed) = run(
        "PROMTOOL",
        "promtool",
        &["test", "rules", "tests.yaml"],
        &dir,
    );
    assert!(ok, "promtool test rules ({RULE_TESTS}):\n{printed}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every alert has a case where it fires and one where it must not.
#[test]
fn every_alert_has_a_firing_and_a_silent_case() {
    let text = std::fs::read_to_string(root().join(RULE_TESTS)).unwrap();
    let tests: Value = serde_saphyr::from_str(&text).unwrap();
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"].as_array().unwrap() {
        for check in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = check["alertname"].as_str().unwrap().to_owned();
            // promtool compares the alerts exactly: `exp_alerts: []` says none fires.
            match check["exp_alerts"].as_array().map_or(0, Vec::len) {
                0 => silent.insert(name),
                _ => firing.insert(name),
            };
        }
    }
    let alerts = alert_names(&rules(&["prometheusRule.enabled=true"]));
    assert_eq!(alerts.len(), 5, "{alerts:?}");
    assert_eq!(firing, alerts, "alerts with a firing case");
    assert_eq!(silent, alerts, "alerts with a silent case");
}

/// Metric names in PromQL text: every `election_agent_…` identifier.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = query;
    while let Some(start) = rest.find("election_agent_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

/// Every series name the agent exports (histograms as `_bucket`, `_sum`, `_count`), with one
/// Election observed and a leader change counted so that its series exist.
fn exported() -> BTreeSet<String> {
    let metrics = Metrics::new("agent", vec![1.0]).unwrap();
    let operator = OperatorMetrics::register(metrics.registry()).unwrap();
    let election: Election = serde_json::from_value(json!({
        "apiVersion": "election-agent.io/v1", "kind": "Election",
        "metadata": {"name": "jobs", "namespace": "shop"}, "spec": {}
    }))
    .unwrap();
    operator.observe_election(&election, &ElectionStatus::default());
    operator.leader_changed(&election);
    operator.set_leading(true);
    metrics
        .encode()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every string under `key` anywhere in `value`.
fn strings_under<'a>(value: &'a Value, key: &str, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == key => found.push(s),
                    _ => strings_under(v, key, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, found)),
        _ => {}
    }
}

#[test]
fn the_rules_and_the_dashboard_query_only_metrics_the_agent_exports() {
    let exported = exported();
    let rules = rules(&["prometheusRule.enabled=true"]);
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(DASHBOARD)).unwrap()).unwrap();
    let mut queries: Vec<&str> = every_rule(&rules)
        .filter_map(|rule| rule["expr"].as_str())
        .collect();
    let rule_queries = queries.len();
    strings_under(&dashboard, "expr", &mut queries);
    strings_under(&dashboard, "definition", &mut queries);
    assert!(
        queries.len() > rule_queries + 10,
        "the dashboard's queries were found"
    );
    let queried: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let unknown: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queried but not exported: {unknown:?}\nexported: {exported:?}"
    );
    for name in [
        "election_agent_election_has_leader",
        "election_agent_election_leaderless_since_timestamp_seconds",
        "election_agent_election_term_seconds",
        "election_agent_election_leader_changes_total",
        "election_agent_controller_leading",
        "election_agent_store_available",
        "election_agent_controller_reconcile_errors_total",
    ] {
        assert!(queried.contains(name), "{name} is queried");
    }
}

#[test]
fn the_dashboard_parses_and_its_configmap_carries_it_verbatim() {
    let text = std::fs::read_to_string(root().join(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "panel {} has a query", panel["title"]);
    }
    let map = rendered(
        "templates/grafana-dashboard.yaml",
        &["grafanaDashboard.enabled=true"],
    );
    assert_eq!(map["kind"], "ConfigMap");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    let carried: Value =
        serde_json::from_str(map["data"]["election-agent.json"].as_str().unwrap()).unwrap();
    assert_eq!(carried, dashboard);
}

#[test]
fn alerts_and_dashboard_are_off_by_default_and_controller_alerts_need_the_controller() {
    for template in [
        "templates/prometheusrule.yaml",
        "templates/grafana-dashboard.yaml",
    ] {
        let (ok, printed) = helm(&["template", "x", CHART, "--show-only", template]);
        assert!(
            !ok && printed.contains("could not find template"),
            "{template} renders nothing by default: {printed}"
        );
    }
    let without_controller = rules(&["prometheusRule.enabled=true", "controller.enabled=false"]);
    assert_eq!(
        alert_names(&without_controller),
        BTreeSet::from(["ElectionAgentStoreUnavailable".to_owned()]),
        "no controller, no controller metrics to alert on"
    );
}

#[test]
fn the_values_schema_refuses_bad_alert_settings_naming_them() {
    for (value, named) in [
        ("prometheusRule.leaderChurn.window=soon", "window"),
        ("prometheusRule.leaderChurn.threshold=-1", "threshold"),
        ("prometheusRule.storeUnavailable.for=1", "for"),
        ("prometheusRule.noController.severity=", "severity"),
        ("grafanaDashboard.folder=x", "folder"),
    ] {
        let (ok, printed) = helm(&["template", "x", CHART, "--set", value]);
        assert!(!ok, "{value} was accepted");
        assert!(printed.contains(named), "{value}: {printed}");
    }
}

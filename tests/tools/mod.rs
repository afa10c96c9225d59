//! The command-line tools the chart's tests run: `helm` (`HELM` names another) and `promtool`
//! (`PROMTOOL`). `scripts/test.sh` installs both: helm into `target/tools/bin`, which it puts on
//! PATH, promtool from Debian's `prometheus` package.
#![allow(dead_code)] // each test binary uses its own subset

use std::{path::Path, process::Command};

use serde_json::Value;

/// The chart, relative to the repository.
pub const CHART: &str = "helm/election-agent";

/// The repository.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tool` (the program the variable `env` names, else `default`) with `args` in `dir`:
/// whether it succeeded, and what it printed (standard output, then error).
pub fn run(env: &str, default: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let program = std::env::var(env).unwrap_or_else(|_| default.into());
    let output = Command::new(&program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} ({err}): scripts/test.sh installs it"));
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), printed)
}

/// Runs helm with `args` in the repository.
pub fn helm(args: &[&str]) -> (bool, String) {
    run("HELM", "helm", args, root())
}

/// The chart rendered as the plain manifests are — release and namespace `election-agent` — with
/// `extra` arguments (`--show-only T`, `--set K=V`, `--include-crds`): the YAML helm prints.
pub fn template(extra: &[&str]) -> String {
    let mut args = vec![
        "template",
        "election-agent",
        CHART,
        "--namespace",
        "election-agent",
    ];
    args.extend(extra);
    let (ok, printed) = helm(&args);
    assert!(ok, "helm {}: {printed}", args.join(" "));
    printed
}

/// `--set` arguments for `values`.
pub fn set<'a>(values: &[&'a str]) -> Vec<&'a str> {
    values.iter().flat_map(|value| ["--set", value]).collect()
}

/// The documents of `yaml`, parsed.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap_or_else(|err| panic!("{err}:\n{yaml}"))
}

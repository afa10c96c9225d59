//! The `election-agent` binary as an operator runs it: start-up errors, signals, exit codes.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use election_agent::grpc::pb::{self, election_client::ElectionClient};
use futures::StreamExt;

fn agent() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_election-agent"));
    command
        .env_clear()
        .env("EA_BIND_ADDRESS", "127.0.0.1")
        .env("EA_GRPC_PORT", "0")
        .env("EA_HTTP_PORT", "0")
        .env("EA_KUBE_ENABLE", "false");
    command
}

/// Runs the agent expecting it to refuse to start; returns (exit code, stderr).
fn refused(command: &mut Command) -> (i32, String) {
    let output = command.output().expect("runs");
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.code().expect("exited"), stderr)
}

#[test]
fn an_invalid_config_value_stops_start_up_with_one_line_naming_key_value_and_allowed_values() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case; 5] = [
        (
            &[("EA_HTTP_PORT", "abc")],
            &[],
            r#"EA_HTTP_PORT="abc" (from the environment): expected a port number"#,
        ),
        (
            &[("EA_REDIS_MODE", "bogus")],
            &[],
            r#"EA_REDIS_MODE="bogus" (from the environment): allowed: memory, single, failover, cluster, sharding"#,
        ),
        (
            &[],
            &["--grpc-port", "99999"],
            r#"EA_GRPC_PORT="99999" (from the command line): expected a port number"#,
        ),
        (
            &[],
            &["--config", "config/does-not-exist.yaml"],
            "invalid configuration file config/does-not-exist.yaml: ",
        ),
        (
            &[("EA_LOG_LEVEL", "chatty")],
            &[],
            r#"EA_LOG_LEVEL="chatty" (from the environment): allowed: trace, debug, info"#,
        ),
    ];
    for (env, args, expected) in cases {
        let (code, stderr) = refused(agent().envs(env.iter().copied()).args(args));
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr}");
        assert!(
            stderr.contains(expected),
            "{stderr:?} should contain {expected:?}"
        );
    }
}

#[test]
fn a_redis_mode_this_agent_does_not_serve_is_refused_at_start_up() {
    let (code, stderr) = refused(
        agent()
            .env("EA_REDIS_MODE", "sharding")
            .env("EA_REDIS_URLS", "redis://127.0.0.1:1"),
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("EA_REDIS_MODE=sharding is not available"),
        "{stderr}"
    );
}

#[test]
fn an_unusable_redis_url_is_refused_at_start_up_without_showing_the_password() {
    let (code, stderr) = refused(agent().env("EA_REDIS_URLS", "http://user:secret@127.0.0.1:1"));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("EA_REDIS_URLS") && stderr.contains("scheme"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}

#[tokio::test]
async fn sigterm_ends_streams_drains_and_exits_zero_within_ten_seconds() {
    let mut child = agent()
        .env("EA_ENV", "production")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    // JSON logs: find the gRPC address in the "listening" line.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = loop {
        let line = lines.next().expect("logs until listening").unwrap();
        let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if entry["fields"]["message"] == "gRPC API listening" {
            break entry["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    let mut client = ElectionClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut events = client
        .observe(pb::ObserveRequest {
            election: "e".into(),
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(events.next().await.unwrap().is_ok(), "stream open");

    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    assert!(
        !matches!(events.next().await, Some(Ok(_))),
        "the Observe stream ended"
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:?}");
}

#[tokio::test]
async fn the_client_prints_json_and_fails_with_the_grpc_code() {
    let agent = election_agent::server::start(
        &election_agent::config::Sources::default()
            .flag("EA_BIND_ADDRESS", "127.0.0.1")
            .flag("EA_GRPC_PORT", "0")
            .flag("EA_HTTP_ENABLE", "false")
            .flag("EA_METRIC_ENABLE", "false")
            .flag("EA_KUBE_ENABLE", "false")
            .resolve()
            .unwrap(),
    )
    .await
    .unwrap();
    let address = format!("http://{}", agent.grpc_address.unwrap());
    let client = |args: &[&str]| {
        let address = address.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // The client blocks on its own runtime: run it off this test's runtime.
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_election-agent"))
                .args(["client", "--address", &address])
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let won = client(&["campaign", "jobs", "alice", "--kind", "batch"])
        .await
        .unwrap();
    assert!(won.status.success());
    let json: serde_json::Value = serde_json::from_slice(&won.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"elected": true, "leader": "alice", "kind": "batch", "fencing_token": 1})
    );
    let missing = client(&["leader", "nobody"]).await.unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(missing.stderr).unwrap().trim(),
        "election-agent: NotFound: election default/nobody has no leader"
    );
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[test]
fn sigterm_during_start_up_still_exits_cleanly() {
    let mut child = agent()
        .env("EA_ENV", "production")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    // The first log line is printed before the listeners exist: signal right then.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().expect("a first log line").unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

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
    let cases: [Case; 6] = [
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
            &[
                ("EA_REDIS_MODE", "memory"),
                ("EA_REDIS_URLS", "redis://r:1"),
            ],
            &[],
            r#"EA_REDIS_URLS="redis://r:1" (from the environment): EA_REDIS_MODE=memory (from the environment) keeps leases in this agent and uses no Redis"#,
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
fn sharding_members_of_different_sizes_are_refused_at_start_up() {
    let (code, stderr) = refused(agent().env("EA_REDIS_MODE", "sharding").env(
        "EA_REDIS_URLS",
        "redis://127.0.0.1:1?addr=127.0.0.1:2,redis://127.0.0.1:3",
    ));
    assert_ne!(code, 0);
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr}");
    assert!(
        stderr.contains("EA_REDIS_URLS") && stderr.contains("every member needs as many"),
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

/// An agent in this process (memory store, gRPC and HTTP on free loopback ports).
async fn in_process_agent() -> election_agent::server::RunningAgent {
    election_agent::server::start(&in_process_config())
        .await
        .unwrap()
}

fn in_process_config() -> election_agent::config::Config {
    election_agent::config::Sources::default()
        .flag("EA_BIND_ADDRESS", "127.0.0.1")
        .flag("EA_GRPC_PORT", "0")
        .flag("EA_HTTP_PORT", "0")
        .flag("EA_KUBE_ENABLE", "false")
        .flag("EA_LOG_LEVEL", "error")
        .resolve()
        .unwrap()
}

/// Runs the binary with `args`, off the test's runtime (the binary blocks on a runtime of its
/// own, and the agent it talks to may run on the test's).
async fn binary(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_election-agent"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// What `election-agent client --address <address> <args>` printed: (exit code, stdout as JSON
/// or Null, stderr).
async fn client(address: &str, args: &[&str]) -> (i32, serde_json::Value, String) {
    let output = binary(&[&["client", "--address", address], args].concat()).await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.code().expect("exited"), json, stderr)
}

#[tokio::test]
async fn the_client_prints_json_and_fails_with_the_grpc_code() {
    let agent = in_process_agent().await;
    let address = format!("http://{}", agent.grpc_address.unwrap());
    let (code, json, _) = client(&address, &["campaign", "jobs", "alice", "--kind", "batch"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        json,
        serde_json::json!({"elected": true, "leader": "alice", "kind": "batch", "fencing_token": 1})
    );
    let (code, _, stderr) = client(&address, &["leader", "nobody"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "election-agent: NotFound: election default/nobody has no leader"
    );
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn every_client_command_drives_its_rpc_and_prints_the_answer_as_json() {
    use serde_json::json;
    let agent = in_process_agent().await;
    let address = format!("http://{}", agent.grpc_address.unwrap());
    let ok = |args: &'static [&'static str]| {
        let address = address.clone();
        async move {
            let (code, json, stderr) = client(&address, args).await;
            assert_eq!(code, 0, "{args:?}: {stderr}");
            json
        }
    };

    // Observe first, so that it sees the changes that follow.
    let mut observer = std::process::Command::new(env!("CARGO_BIN_EXE_election-agent"))
        .args([
            "client",
            "--address",
            &address,
            "observe",
            "jobs",
            "--count",
            "4",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = BufReader::new(observer.stdout.take().unwrap()).lines();
    let first = tokio::task::spawn_blocking(move || {
        let line = events.next().unwrap().unwrap();
        (line, events)
    });
    let (current, mut events) = first.await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&current).unwrap(),
        json!({"type": "current", "election": "jobs", "kind": "default", "leader": "", "fencing_token": 0, "version": 1})
    );

    assert_eq!(
        ok(&["campaign", "jobs", "alice"]).await,
        json!({"elected": true, "leader": "alice", "kind": "default", "fencing_token": 1})
    );
    assert_eq!(
        ok(&["campaign", "jobs", "bob"]).await,
        json!({"elected": false, "leader": "alice", "kind": "default", "fencing_token": 1})
    );
    assert_eq!(
        ok(&[
            "extend",
            "jobs",
            "alice",
            "--term",
            "20000",
            "--retries",
            "2",
            "--retry-interval",
            "10"
        ])
        .await,
        json!({"value": true, "fencing_token": 1})
    );
    assert_eq!(
        ok(&["leader", "jobs"]).await,
        json!({"leader": "alice", "fencing_token": 1})
    );
    assert_eq!(
        ok(&["handover", "jobs", "bob"]).await,
        json!({"value": true, "fencing_token": 2})
    );
    assert_eq!(
        ok(&["leaders"]).await,
        json!({"leaders": [{"election": "jobs", "name": "bob", "fencing_token": 2}]})
    );
    assert_eq!(ok(&["resign", "jobs", "bob"]).await, json!({"value": true}));
    assert_eq!(ok(&["leaders"]).await, json!({"leaders": []}));

    let rest = tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = events.by_ref().map_while(Result::ok).collect();
        (lines, observer.wait().unwrap())
    });
    let (lines, status) = rest.await.unwrap();
    assert!(status.success(), "observe stops after --count events");
    let seen: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        seen,
        [
            json!({"type": "elected", "election": "jobs", "kind": "default", "leader": "alice", "fencing_token": 1, "version": 2}),
            json!({"type": "handed_over", "election": "jobs", "kind": "default", "leader": "bob", "fencing_token": 2, "version": 4}),
            json!({"type": "resigned", "election": "jobs", "kind": "default", "leader": "bob", "fencing_token": 2, "version": 5}),
        ]
    );

    // Failures: the gRPC code and message on stderr, exit code 1, nothing on stdout.
    let cases: [(&[&str], &str); 5] = [
        (
            &["extend", "jobs", "carol"],
            "NotFound: election default/jobs has no leader",
        ),
        (
            &["campaign", "jobs", "a*"],
            "InvalidArgument: invalid candidate",
        ),
        (
            &["handover", "jobs", "dave", "--term", "5"],
            "InvalidArgument: invalid term",
        ),
        (&["resign", "", "dave"], "InvalidArgument: invalid election"),
        (
            &["pods", "ns", "web"],
            "Unimplemented: Kubernetes features are off",
        ),
    ];
    for (args, expected) in cases {
        let (code, json, stderr) = client(&address, args).await;
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(json, serde_json::Value::Null, "{args:?}");
        assert!(
            stderr.starts_with(&format!("election-agent: {expected}")),
            "{args:?}: {stderr}"
        );
    }
    ok(&["campaign", "jobs", "erin"]).await;
    let (code, _, stderr) = client(&address, &["extend", "jobs", "frank"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("election-agent: AlreadyExists: election default/jobs is led by erin"),
        "{stderr}"
    );
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn the_client_names_an_agent_it_cannot_reach() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = client(&address, &["leaders"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(&format!("election-agent: cannot connect to {address}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn client_pods_lists_a_deployment_by_name_or_by_one_of_its_pods() {
    let caches = election_agent::bench::synthetic_deployment("shop", "web", 3);
    let agent = election_agent::server::start_with_discovery(
        &in_process_config(),
        election_agent::discovery::Discovery::from_caches(caches),
    )
    .await
    .unwrap();
    let address = format!("http://{}", agent.grpc_address.unwrap());

    let (code, by_name, stderr) = client(&address, &["pods", "shop", "web"]).await;
    assert_eq!(code, 0, "{stderr}");
    let items = by_name["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(
        items[0],
        serde_json::json!({
            "name": "web-1-00000", "deployment": "web", "ip": "10.0.0.1",
            "status": {"phase": "Running", "reason": "", "terminating": false,
                       "podScheduled": true, "podInitialized": true, "podReady": true,
                       "containersReady": true},
            "replicaSet": {"name": "web-1", "revision": 1, "availableReplicas": 3,
                           "fullyLabeledReplicas": 3, "readyReplicas": 3, "replicas": 3,
                           "desiredReplicas": 3, "maxReplicas": 4}
        })
    );
    // The REST API shows the same pods the same way.
    let http = agent.http_address.unwrap();
    let rest: serde_json::Value = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(http).unwrap();
        write!(
            stream,
            "GET /kube/shop/web/pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (_, body) = response.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(rest, by_name);

    let (code, by_pod, _) = client(&address, &["pods", "shop", "--pod-name", "web-1-00002"]).await;
    assert_eq!(code, 0);
    assert_eq!(by_pod, by_name);

    let (code, _, stderr) = client(&address, &["pods", "shop", "nope"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "election-agent: NotFound: deployment shop/nope not found"
    );
    let (code, _, stderr) = client(&address, &["pods", "shop"]).await;
    assert_eq!(code, 2, "a usage error: DEPLOYMENT or --pod-name is needed");
    assert!(stderr.contains("<DEPLOYMENT>"), "{stderr}");
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

/// Runs `election-agent bench <args> --json` and returns its report.
async fn bench_report(args: &[&str]) -> serde_json::Value {
    let output = binary(&[&["bench"], args, &["--json"]].concat()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    serde_json::from_slice(&output.stdout).expect("one JSON report on stdout")
}

#[tokio::test]
async fn a_short_benchmark_run_counts_every_request_of_the_workload() {
    let agent = in_process_agent().await;
    let grpc = format!("http://{}", agent.grpc_address.unwrap());
    let http = format!("http://{}", agent.http_address.unwrap());
    // Per client: one winning campaign, then per iteration an extend and a losing campaign.
    for (protocol, address) in [("grpc", &grpc), ("http", &http)] {
        let report = bench_report(&[protocol, "--address", address, "-c", "2", "-i", "10"]).await;
        assert_eq!(report["benchmark"], protocol);
        assert_eq!(report["requests"], 2 * (1 + 2 * 10), "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert!(report["requests_per_second"].as_f64().unwrap() > 0.0);
        let latency = &report["latency_ms"];
        assert!(latency["p50"].as_f64().unwrap() <= latency["max"].as_f64().unwrap());
    }
    // The leases are really there: one election per client, each led by its first candidate.
    let (_, leaders, _) = client(&grpc, &["leaders", "--kind", "bench"]).await;
    let leaders = leaders["leaders"].as_array().unwrap().clone();
    assert_eq!(leaders.len(), 4, "{leaders:?}");
    assert!(
        leaders
            .iter()
            .all(|l| l["name"].as_str().unwrap().starts_with("leader-"))
    );

    // A flood of names: every request a campaign on an election of its own, each won.
    let report = bench_report(&[
        "names",
        "--address",
        &grpc,
        "-c",
        "2",
        "-i",
        "10",
        "--kind",
        "flood",
    ])
    .await;
    assert_eq!(report["benchmark"], "names");
    assert_eq!(report["requests"], 20, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let (_, leaders, _) = client(&grpc, &["leaders", "--kind", "flood"]).await;
    assert_eq!(leaders["leaders"].as_array().unwrap().len(), 20);

    // Failures are counted by kind, not hidden: a term the agent refuses.
    let report = bench_report(&[
        "grpc",
        "--address",
        &grpc,
        "-c",
        "1",
        "-i",
        "2",
        "--term",
        "10",
    ])
    .await;
    assert_eq!(report["requests"], 5);
    assert_eq!(
        report["errors_by_kind"],
        serde_json::json!({"InvalidArgument": 5})
    );
    agent.shutdown().await;
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn a_benchmark_that_cannot_reach_its_agent_says_why_in_one_line() {
    for (address, says) in [
        // Nothing listens on port 1.
        (
            "http://127.0.0.1:1",
            "cannot connect to http://127.0.0.1:1: ",
        ),
        // The load generator speaks plain HTTP/2 only.
        ("https://127.0.0.1:1", "the address must start with http://"),
    ] {
        let output = binary(&["bench", "grpc", "--address", address, "-c", "1", "-i", "1"]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{address}: {stderr}");
        assert!(stderr.contains(says), "{address}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{address}: {stderr}");
    }
}

#[tokio::test]
async fn a_short_get_pods_benchmark_runs_against_its_own_in_process_agent() {
    let report = bench_report(&["pods", "-c", "2", "-i", "5", "--pods", "4"]).await;
    assert_eq!(report["benchmark"], "pods");
    assert_eq!(report["requests"], 10, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
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

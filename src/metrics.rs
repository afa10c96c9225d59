//! Prometheus metrics of the API, on a registry owned by the process.
//!
//! Names and labels are those of the Go service, so dashboards and alerts keep working. Every
//! `(action, status)` histogram and every in-flight gauge is resolved once at start-up: recording a
//! request touches no lock and does no label lookup.

use std::{collections::HashMap, time::Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// An API action, the `action` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Campaign.
    Campaign,
    /// ExtendElectedTerm.
    ExtendElectedTerm,
    /// Resign.
    Resign,
    /// Handover.
    Handover,
    /// GetLeader.
    GetLeader,
    /// ListLeaders.
    ListLeaders,
    /// GetPods.
    GetPods,
    /// Observe (streams: counted in flight only, they have no meaningful duration).
    Observe,
}

impl Action {
    const ALL: [Action; 8] = [
        Action::Campaign,
        Action::ExtendElectedTerm,
        Action::Resign,
        Action::Handover,
        Action::GetLeader,
        Action::ListLeaders,
        Action::GetPods,
        Action::Observe,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Action::Campaign => "campaign",
            Action::ExtendElectedTerm => "extend_elected_term",
            Action::Resign => "resign",
            Action::Handover => "handover",
            Action::GetLeader => "get_leader",
            Action::ListLeaders => "list_leaders",
            Action::GetPods => "get_pods",
            Action::Observe => "observe",
        }
    }
}

/// The metrics of one agent process.
pub struct Metrics {
    registry: Registry,
    /// `[success, fail]` per action, indexed like [`Action::ALL`].
    durations: Vec<[Histogram; 2]>,
    in_flight: Vec<IntGauge>,
    unavailable: IntCounter,
    disconnected_backends: IntGauge,
    store_available: IntGauge,
}

impl Metrics {
    /// Registers every metric, labelled `agent=<agent>`, with the given histogram buckets.
    pub fn new(agent: &str, buckets: Vec<f64>) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            None,
            Some(HashMap::from([("agent".to_owned(), agent.to_owned())])),
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "election_agent_request_duration_seconds",
                "Duration of API requests in seconds, by action and status (success|fail).",
            )
            .buckets(buckets),
            &["action", "status"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "election_agent_requests_in_flight",
                "API requests (and Observe streams) being served, by action.",
            ),
            &["action"],
        )?;
        let unavailable = IntCounter::new(
            "election_agent_unavailable_total",
            "Requests refused because the lease store was unavailable.",
        )?;
        let disconnected_backends = IntGauge::new(
            "election_agent_disconnected_redis_backends",
            "Redis servers of the lease store that cannot be reached right now.",
        )?;
        let store_available = IntGauge::new(
            "election_agent_store_available",
            "1 when the lease store answered the agent's last readiness check (every second), \
             0 when it did not; 0 until the first check, which waits for the Kubernetes caches \
             to sync.",
        )?;
        registry.register(Box::new(durations.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(unavailable.clone()))?;
        registry.register(Box::new(disconnected_backends.clone()))?;
        registry.register(Box::new(store_available.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Self {
            durations: Action::ALL
                .iter()
                .map(|action| {
                    [
                        durations.with_label_values(&[action.label(), "success"]),
                        durations.with_label_values(&[action.label(), "fail"]),
                    ]
                })
                .collect(),
            in_flight: Action::ALL
                .iter()
                .map(|action| in_flight.with_label_values(&[action.label()]))
                .collect(),
            registry,
            unavailable,
            disconnected_backends,
            store_available,
        })
    }

    /// Starts timing a request; it counts as in flight until the guard is finished or dropped.
    pub fn start(&self, action: Action) -> RequestGuard<'_> {
        let index = Action::ALL
            .iter()
            .position(|a| *a == action)
            .unwrap_or_default();
        self.in_flight[index].inc();
        RequestGuard {
            metrics: self,
            index,
            started: Instant::now(),
        }
    }

    /// Counts a request refused because the lease store was unavailable.
    pub fn count_unavailable(&self) {
        self.unavailable.inc();
    }

    /// The gauge of unreachable Redis servers, for the store to keep up to date.
    pub fn disconnected_backends(&self) -> IntGauge {
        self.disconnected_backends.clone()
    }

    /// Records whether the lease store answered a readiness check.
    pub fn set_store_available(&self, available: bool) {
        self.store_available.set(i64::from(available));
    }

    /// The registry, for collectors registered by other parts of the process.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for the metric types registered here.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Counts one request in flight; records its duration when finished.
pub struct RequestGuard<'a> {
    metrics: &'a Metrics,
    index: usize,
    started: Instant,
}

impl RequestGuard<'_> {
    /// Records the request's duration with `status` success or fail.
    /// A request dropped unfinished (its client went away) records no duration.
    pub fn finish(self, success: bool) {
        let histogram = &self.metrics.durations[self.index][usize::from(!success)];
        histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight[self.index].dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_recorded_with_action_status_and_agent_labels() {
        let metrics = Metrics::new("agent-1", vec![0.001, 0.1]).unwrap();
        metrics.start(Action::Campaign).finish(true);
        metrics.start(Action::ExtendElectedTerm).finish(false);
        let _streaming = metrics.start(Action::Observe);
        metrics.count_unavailable();
        let text = metrics.encode();
        for line in [
            r#"election_agent_request_duration_seconds_count{action="campaign",status="success",agent="agent-1"} 1"#,
            r#"election_agent_request_duration_seconds_count{action="extend_elected_term",status="fail",agent="agent-1"} 1"#,
            r#"election_agent_requests_in_flight{action="observe",agent="agent-1"} 1"#,
            r#"election_agent_requests_in_flight{action="campaign",agent="agent-1"} 0"#,
            r#"election_agent_unavailable_total{agent="agent-1"} 1"#,
            r#"election_agent_disconnected_redis_backends{agent="agent-1"} 0"#,
            r#"election_agent_store_available{agent="agent-1"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn each_metrics_instance_has_its_own_registry() {
        let a = Metrics::new("a", vec![1.0]).unwrap();
        let b = Metrics::new("b", vec![1.0]).unwrap();
        a.count_unavailable();
        assert!(
            b.encode()
                .contains(r#"election_agent_unavailable_total{agent="b"} 0"#)
        );
    }
}

//! Prometheus metrics at `/metrics` (the `prometheus-client` crate).
//!
//! The hub's counters are read at scrape time by a collector, so the hot
//! path only bumps atomics it already keeps; the server adds its own
//! counters for authentication failures and API requests. It lives in core
//! so that every adapter serves the same `/metrics`.

use crate::Hub;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// The server's metrics registry.
pub(crate) struct Metrics {
    registry: Registry,
    auth_failures: Family<Labels, Counter>,
    api_requests: Family<Labels, Counter>,
}

impl Metrics {
    pub(crate) fn new(hub: Hub) -> Self {
        let mut registry = Registry::default();
        let auth_failures = Family::<Labels, Counter>::default();
        let api_requests = Family::<Labels, Counter>::default();
        registry.register(
            "pgdn_auth_failures",
            "Connections (WebSocket or SSE) refused at authentication, by close reason",
            auth_failures.clone(),
        );
        registry.register(
            "pgdn_api_requests",
            "Publish API requests, by outcome",
            api_requests.clone(),
        );
        registry.register_collector(Box::new(HubCollector { hub }));
        Metrics {
            registry,
            auth_failures,
            api_requests,
        }
    }

    pub(crate) fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub(crate) fn api_request(&self, outcome: &'static str) {
        self.api_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct HubCollector {
    hub: Hub,
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for HubCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.hub.stats();
        gauge(
            &mut enc,
            "pgdn_connections",
            "Open connections (WebSocket and SSE)",
            s.total_connections as i64,
        )?;
        gauge(
            &mut enc,
            "pgdn_users",
            "Users with at least one connection",
            s.total_users as i64,
        )?;
        gauge(
            &mut enc,
            "pgdn_groups",
            "Groups with at least one connection",
            s.total_groups as i64,
        )?;
        counter(
            &mut enc,
            "pgdn_messages_published",
            "Publishes accepted",
            s.messages_published,
        )?;
        counter(
            &mut enc,
            "pgdn_messages_delivered",
            "Frames queued to connections",
            s.messages_delivered,
        )?;
        counter(
            &mut enc,
            "pgdn_duplicates_suppressed",
            "Publishes with an already-seen id",
            s.duplicates_suppressed,
        )?;
        counter(
            &mut enc,
            "pgdn_connections_opened",
            "Connections accepted",
            s.connections_opened,
        )?;
        counter(
            &mut enc,
            "pgdn_frames_received",
            "Client frames received",
            s.frames_received,
        )?;
        counter(
            &mut enc,
            "pgdn_messages_dropped_invalid",
            "Messages from other nodes dropped as invalid (not UTF-8, not a notification)",
            s.messages_dropped_invalid,
        )?;
        let mut fam = enc.encode_descriptor(
            "pgdn_disconnects",
            "Connections closed, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &s.disconnects {
            let labels = [("reason", *reason)];
            ConstCounter::new(*n).encode(fam.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

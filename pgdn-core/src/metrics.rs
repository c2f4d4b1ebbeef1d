//! Prometheus metrics at `/metrics` (the `prometheus-client` crate).
//!
//! Everything is read at scrape time from counters that are kept as things
//! happen (the hub's atomics, the limiter's connections by transport, the
//! delivery clock's histogram): a scrape never walks users, groups or
//! connections, so it costs the same with a million users as with one.
//! The service adds its own counters for authentication failures and API
//! requests, and the publish request duration. It lives in core so that
//! every adapter serves the same `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use crate::Hub;
use crate::limits::Limiter;
use crate::transport::TransportKind;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, &'static str)>;

/// Buckets of the publish request duration, in seconds.
const REQUEST_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The server's metrics registry.
pub(crate) struct Metrics {
    registry: Registry,
    auth_failures: Family<Labels, Counter>,
    api_requests: Family<Labels, Counter>,
    publish_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// The registry over `hub`'s counters, `limiter`'s connections and
    /// `shutdown` (for `pgdn_ready`), then the `extra` collectors of
    /// [`ServiceBuilder::collector`](crate::ServiceBuilder::collector).
    pub(crate) fn new(
        hub: Hub,
        limiter: Arc<Limiter>,
        shutdown: CancellationToken,
        extra: Vec<Box<dyn Collector>>,
    ) -> Self {
        let mut registry = Registry::default();
        let auth_failures = Family::<Labels, Counter>::default();
        let api_requests = Family::<Labels, Counter>::default();
        let publish_duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS));
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
        registry.register(
            "pgdn_publish_request_duration_seconds",
            "Publish API requests (publish, publish_batch) from routing to answer, by endpoint and outcome",
            publish_duration.clone(),
        );
        registry.register(
            "pgdn_build",
            "This build of pgdn",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(HubCollector {
            hub,
            limiter,
            shutdown,
        }));
        for collector in extra {
            registry.register_collector(collector);
        }
        Metrics {
            registry,
            auth_failures,
            api_requests,
            publish_duration,
        }
    }

    /// Records how long a publish API request took, by `endpoint`
    /// (`publish`, `publish_batch`) and `outcome` (`ok`, `bad_request`,
    /// `unauthorized`, `unavailable`).
    pub(crate) fn publish_request(
        &self,
        endpoint: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        self.publish_duration
            .get_or_create(&vec![("endpoint", endpoint), ("outcome", outcome)])
            .observe(took.as_secs_f64());
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
    limiter: Arc<Limiter>,
    shutdown: CancellationToken,
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
        let s = self.hub.totals();
        let broker_ready = self.hub.readiness().is_ok();
        gauge(
            &mut enc,
            "pgdn_ready",
            "1 while /readyz answers ready (not shutting down, broker ready), else 0",
            i64::from(broker_ready && !self.shutdown.is_cancelled()),
        )?;
        gauge(
            &mut enc,
            "pgdn_broker_ready",
            "1 while the broker can deliver (cluster mode: subscribed to Redis), else 0",
            i64::from(broker_ready),
        )?;
        let mut fam = enc.encode_descriptor(
            "pgdn_connections",
            "Open connections, by transport (websocket, sse)",
            None,
            MetricType::Gauge,
        )?;
        for kind in TransportKind::ALL {
            let labels = [("transport", kind.as_str())];
            ConstGauge::new(self.limiter.open(kind)).encode(fam.encode_family(&labels)?)?;
        }
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
        let mut fam = enc.encode_descriptor(
            "pgdn_connections_opened",
            "Connections accepted, by transport (websocket, sse)",
            None,
            MetricType::Counter,
        )?;
        for kind in TransportKind::ALL {
            let labels = [("transport", kind.as_str())];
            ConstCounter::new(self.limiter.opened(kind)).encode(fam.encode_family(&labels)?)?;
        }
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
            "pgdn_broker_messages_received",
            "Messages the broker brought to this node, by target kind (user, group, broadcast): \
             with Redis, only those for the users and groups this node holds",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in &s.messages_received {
            let labels = [("target", *kind)];
            ConstCounter::new(*n).encode(fam.encode_family(&labels)?)?;
        }
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
        self.hub.delivery_clock().encode(
            &mut enc,
            "pgdn_publish_to_write_seconds",
            "From a publish accepted by (or received from the broker on) this node to its frame \
             written to a subscriber's transport; one sample per written batch, for its oldest message",
        )?;
        if let Some(p) = crate::process::read() {
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as i64,
            )?;
            let cpu = ConstCounter::new(p.cpu_seconds);
            cpu.encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
            gauge(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds as i64,
            )?;
            if let Some(max) = p.max_fds {
                gauge(
                    &mut enc,
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max as i64,
                )?;
            }
            let start = ConstGauge::new(p.start_time_seconds);
            start.encode(enc.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Identity, Service, StaticAuthenticator};

    /// The value of the sample line `name` (with its labels) in `text`.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn a_scrape_reads_counters_and_never_lists_users_or_groups() {
        let service = Service::builder()
            .authenticator(StaticAuthenticator::new())
            .publish_key("a-publish-key-for-tests")
            .build()
            .unwrap();
        let hub = service.hub();
        let mut conns = Vec::new();
        for i in 0..2000 {
            let groups = [format!("g{}", i % 300)];
            conns.push(
                hub.connect(Identity::new(format!("u{i}"), groups))
                    .await
                    .unwrap(),
            );
        }
        let text = service.inner.metrics.render();
        assert_eq!(
            hub.registry_listings(),
            0,
            "a scrape must not list every user or group"
        );
        assert_eq!(sample(&text, "pgdn_users"), 2000.0);
        assert_eq!(sample(&text, "pgdn_groups"), 300.0);
        // The stats API does list them (that is what it is for): the probe
        // above would have seen a scrape that did.
        let stats = hub.stats();
        assert_eq!((stats.users.len(), stats.groups.len()), (2000, 300));
        assert_eq!(hub.registry_listings(), 2);
        drop(conns);
    }

    #[test]
    fn an_extra_collector_is_rendered_with_pgdns_own() {
        #[derive(Debug)]
        struct Extra;
        impl super::Collector for Extra {
            fn encode(&self, mut enc: super::DescriptorEncoder) -> std::fmt::Result {
                super::gauge(&mut enc, "app_queue_depth", "An app's queue", 7)
            }
        }
        let service = Service::builder()
            .authenticator(StaticAuthenticator::new())
            .publish_key("a-publish-key-for-tests")
            .collector(Extra)
            .build()
            .unwrap();
        let text = service.inner.metrics.render();
        assert_eq!(sample(&text, "app_queue_depth"), 7.0);
        assert_eq!(sample(&text, "pgdn_users"), 0.0);
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn build_info_and_readiness_are_exposed() {
        let service = Service::builder()
            .authenticator(StaticAuthenticator::new())
            .publish_key("a-publish-key-for-tests")
            .build()
            .unwrap();
        let text = service.inner.metrics.render();
        assert!(
            text.contains(&format!(
                "pgdn_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert_eq!(sample(&text, "pgdn_ready"), 1.0);
        assert_eq!(sample(&text, "pgdn_broker_ready"), 1.0);
        service.begin_shutdown();
        let text = service.inner.metrics.render();
        assert_eq!(sample(&text, "pgdn_ready"), 0.0, "shutting down");
        assert_eq!(sample(&text, "pgdn_broker_ready"), 1.0);
    }
}

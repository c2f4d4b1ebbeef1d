//! Settings of a pgdn service (the protocol, the publish API and every
//! limit), each with its default. Every adapter reads the same [`Config`],
//! so a warp server, an axum app and the binary behave alike.

use std::time::Duration;

use crate::limits::IpNetwork;
use crate::{HistoryConfig, QueueLimits};

/// Settings of a [`Service`](crate::Service). Start from
/// `Config::default()` and change what you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Path of the WebSocket route, relative to where the routes are
    /// mounted. Default `/ws`.
    pub ws_path: String,
    /// Path of the Server-Sent Events route (docs/protocol.md section 7).
    /// Default `/sse`.
    pub sse_path: String,
    /// Largest inbound WebSocket message; a larger one closes the connection
    /// with 1009. Default 64 KiB.
    pub max_frame_size: usize,
    /// Sustained inbound frames per second per connection; exceeding
    /// `rate_limit_burst` closes with 1008. Default 20.
    pub rate_limit_per_sec: f64,
    /// Inbound frames a connection may send in a burst. Default 50.
    pub rate_limit_burst: f64,
    /// Bounds of each connection's outbound queue (close 1013 when full).
    /// Default 1024 frames or 1 MiB.
    pub queue: QueueLimits,
    /// What is kept per user for resume after reconnect (`since=`). Default
    /// 100 messages and 10 minutes.
    pub history: HistoryConfig,
    /// Largest publish body; larger gets 413. Default 1 MiB.
    pub max_body_size: u64,
    /// Most publishes in one batch. Default 1000.
    pub max_batch_len: usize,
    /// Most open WebSocket connections on this node; more get 503 before the
    /// upgrade. Default 100,000.
    pub max_connections: usize,
    /// Most open connections (WebSocket and SSE together) of one user on
    /// this node; more get 429 before the upgrade (or the stream).
    /// Default 100.
    pub max_connections_per_user: usize,
    /// Most open connections from one client address on this node; more
    /// get 429 before authentication. Default `None` (no limit): behind a
    /// reverse proxy every client has the proxy's address, unless the
    /// proxy is listed in [`Config::trusted_proxies`].
    pub max_connections_per_ip: Option<usize>,
    /// Proxies (addresses or CIDR networks) whose `X-Forwarded-For` is
    /// believed: for a request from one of them, the client's address is
    /// the right-most `X-Forwarded-For` entry that is not a trusted proxy.
    /// Default empty: the peer's address is the client's.
    pub trusted_proxies: Vec<IpNetwork>,
    /// Origins allowed to connect besides the server's own (docs/protocol.md
    /// section 1): `https://app.example.com`, or `*` for any. A request
    /// with another `Origin` gets 403 before any upgrade. Default empty:
    /// same origin only.
    pub allowed_origins: Vec<String>,
    /// How many bytes a WebSocket connection reads from its socket at
    /// once. The buffer exists only while a read is under way (the warp
    /// adapter reads ahead for tungstenite, whose own buffer stays at 128
    /// bytes), so it costs an idle connection nothing. Default 4 KiB.
    pub read_buffer_size: usize,
    /// How often the server sends a keepalive to each connection (a
    /// WebSocket Ping; an SSE `: keepalive` comment), so that dead peers
    /// are noticed and proxies keep idle streams open. Default 25 s.
    pub ping_interval: Duration,
    /// A connection that answers none of the server's Pings (sends nothing
    /// at all, not even a Pong) for about this long is dropped: precisely,
    /// once a Ping stays unanswered for `idle_timeout - ping_interval`.
    /// Default 60 s.
    pub idle_timeout: Duration,
    /// How long a connection may take to write its close frame before it is
    /// dropped. Default 5 s.
    pub close_timeout: Duration,
    /// A write to a connection that makes no progress for this long closes
    /// it as a slow consumer (1013). Default 10 s.
    pub write_timeout: Duration,
    /// How long a shutdown waits for connections to close. Default 10 s.
    pub shutdown_timeout: Duration,
    /// How long a client may take to send a complete request head (request
    /// line and headers) on a new connection, or once it has begun the next
    /// request on a kept-alive one; the connection is closed otherwise.
    /// Applied by adapters that run their own HTTP server (the warp
    /// adapter's `serve`). Default 10 s.
    pub header_read_timeout: Duration,
    /// How long a kept-alive HTTP connection may sit idle between requests
    /// before it is closed. Applied like `header_read_timeout`. Default 60 s.
    pub keep_alive_timeout: Duration,
    /// How long a publish body may take to arrive in full, counted from
    /// when the API starts reading it; slower gets 408 and the connection
    /// is closed. Default 10 s.
    pub body_timeout: Duration,
    /// Whether `/` serves the demo page. Default true.
    pub demo_page: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ws_path: "/ws".into(),
            sse_path: "/sse".into(),
            max_frame_size: 64 * 1024,
            rate_limit_per_sec: 20.0,
            rate_limit_burst: 50.0,
            queue: QueueLimits::default(),
            history: HistoryConfig::default(),
            max_body_size: 1024 * 1024,
            max_batch_len: 1000,
            max_connections: 100_000,
            max_connections_per_user: 100,
            max_connections_per_ip: None,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            read_buffer_size: 4 * 1024,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            demo_page: true,
        }
    }
}

impl Config {
    /// Checks the settings for values that cannot work.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::Error::Config(m.to_string()));
        for (name, path) in [("ws_path", &self.ws_path), ("sse_path", &self.sse_path)] {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(crate::Error::Config(format!(
                    "{name} must start with `/` and name a path, e.g. /ws"
                )));
            }
            if path.trim_start_matches('/').contains("//") || path.ends_with('/') {
                return Err(crate::Error::Config(format!(
                    "{name} must not contain empty segments"
                )));
            }
        }
        if self.ws_path == self.sse_path {
            return bad("ws_path and sse_path must differ");
        }
        if self.max_frame_size < 128 {
            return bad("max_frame_size must be at least 128 bytes");
        }
        let rate_ok = self.rate_limit_per_sec.is_finite() && self.rate_limit_per_sec > 0.0;
        let burst_ok = self.rate_limit_burst.is_finite() && self.rate_limit_burst >= 1.0;
        if !rate_ok || !burst_ok {
            return bad("rate_limit_per_sec must be > 0 and rate_limit_burst >= 1");
        }
        if self.max_connections == 0 || self.max_body_size == 0 || self.max_batch_len == 0 {
            return bad("max_connections, max_body_size and max_batch_len must be > 0");
        }
        if self.max_connections_per_user == 0 || self.max_connections_per_ip == Some(0) {
            return bad("max_connections_per_user and max_connections_per_ip must be > 0");
        }
        crate::origin::OriginPolicy::new(&self.allowed_origins).map_err(crate::Error::Config)?;
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return bad("ping_interval must be > 0 and idle_timeout longer than ping_interval");
        }
        if self.write_timeout.is_zero() || self.close_timeout.is_zero() {
            return bad("write_timeout and close_timeout must be > 0");
        }
        if self.header_read_timeout.is_zero()
            || self.keep_alive_timeout.is_zero()
            || self.body_timeout.is_zero()
        {
            return bad("header_read_timeout, keep_alive_timeout and body_timeout must be > 0");
        }
        if self.read_buffer_size < 1024 {
            return bad("read_buffer_size must be at least 1 KiB");
        }
        Ok(())
    }
}

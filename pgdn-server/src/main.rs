//! The `pgdn-server` binary: a standalone pgdn node configured by flags and
//! environment variables, or a TOML file of the same settings
//! (`--config`, see `config_file`). With no configuration it runs in dev
//! mode.

mod config_file;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pgdn_server::core::IpNetwork;
use pgdn_server::core::LifecycleSink;
use pgdn_server::core::jwt::MIN_SECRET_LEN;
use pgdn_server::core::service::MIN_PUBLISH_KEY_LEN;
use pgdn_server::{Config, JwtAuthenticator, Pgdn, shutdown_signal};
use rand::Rng;
use tracing_subscriber::EnvFilter;

/// pgdn: real-time notifications over WebSocket and Server-Sent Events,
/// published over HTTP.
#[derive(Debug, Parser)]
#[command(name = "pgdn-server", version, about)]
struct Cli {
    /// A one-off task instead of serving.
    #[command(subcommand)]
    command: Option<Task>,
    #[command(flatten)]
    args: Args,
}

/// One-off tasks.
#[derive(Debug, Subcommand)]
enum Task {
    /// Removes, once, what dead nodes left in Redis (session mappings and
    /// node bookkeeping), with SCAN; every node also does this periodically.
    Cleanup {
        /// The cluster's Redis, e.g. redis://127.0.0.1:6379.
        #[arg(
            long,
            env = "PGDN_REDIS_URL",
            hide_env_values = true,
            conflicts_with = "redis_url_file"
        )]
        redis_url: Option<String>,
        /// File holding the Redis URL (a trailing newline is ignored).
        #[arg(long, env = "PGDN_REDIS_URL_FILE", value_name = "PATH")]
        redis_url_file: Option<PathBuf>,
        /// Key prefix the nodes use.
        #[arg(long, env = "PGDN_REDIS_PREFIX", default_value = "pgdn:")]
        prefix: String,
        #[command(flatten)]
        layout: RedisLayout,
    },
}

/// How the deployment's Redis is laid out; the same on every node, in
/// every emitter and for `cleanup`.
#[derive(Debug, Clone, clap::Args)]
struct RedisLayout {
    /// How Redis is deployed: `single` (one Redis; the default), `shards`
    /// (independent Redis instances, --redis-url lists them all, in the
    /// same order on every node), `cluster` (Redis Cluster 7+, sharded
    /// pub/sub; --redis-url lists one or more of its nodes) or `sentinel`
    /// (--redis-url lists the sentinels).
    #[arg(long, env = "PGDN_REDIS_MODE", default_value = "single", value_parser = parse_mode)]
    redis_mode: String,
    /// How many partitions users, groups and message ids are hashed to
    /// (1 to 1024); fixed for a deployment.
    #[arg(long, env = "PGDN_REDIS_PARTITIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    redis_partitions: u16,
    /// Mode sentinel: the name the sentinels monitor the master under.
    #[arg(long, env = "PGDN_REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    redis_sentinel_master: String,
}

fn parse_mode(s: &str) -> Result<String, String> {
    match s.to_ascii_lowercase().as_str() {
        m @ ("single" | "shards" | "cluster" | "sentinel") => Ok(m.to_string()),
        other => Err(format!(
            "unknown redis mode {other:?}: use single, shards, cluster or sentinel"
        )),
    }
}

/// Settings of a serving node.
#[derive(Debug, clap::Args)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "PGDN_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// HS256 secret that subscriber JWTs are signed with, at least 32 bytes.
    /// Generated in dev mode.
    #[arg(
        long,
        env = "PGDN_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_secret_file"
    )]
    jwt_secret: Option<String>,
    /// File holding the JWT secret (a trailing newline is ignored).
    #[arg(long, env = "PGDN_JWT_SECRET_FILE", value_name = "PATH")]
    jwt_secret_file: Option<PathBuf>,
    /// PEM public key that subscriber JWTs are verified with instead of a
    /// secret: RSA (RS256, 2048 bits or more) or P-256 (ES256).
    #[arg(
        long,
        env = "PGDN_JWT_PUBLIC_KEY_FILE",
        value_name = "PATH",
        conflicts_with_all = ["jwt_secret", "jwt_secret_file", "jwks_url"]
    )]
    jwt_public_key_file: Option<PathBuf>,
    /// JWKS URL of the identity provider whose RS256/ES256 JWTs are
    /// accepted, instead of a secret (https; the keys are cached, and
    /// fetched again on an unknown `kid`, at most every 30 s).
    #[arg(
        long,
        env = "PGDN_JWKS_URL",
        value_name = "URL",
        conflicts_with_all = ["jwt_secret", "jwt_secret_file"]
    )]
    jwks_url: Option<String>,
    /// Accept only JWTs whose `iss` is this (comma-separated: any of them).
    #[arg(
        long,
        env = "PGDN_JWT_ISSUER",
        value_delimiter = ',',
        value_name = "ISS"
    )]
    jwt_issuer: Vec<String>,
    /// Accept only JWTs whose `aud` names this (comma-separated: any of
    /// them). Without it, `aud` is not checked.
    #[arg(
        long,
        env = "PGDN_JWT_AUDIENCE",
        value_delimiter = ',',
        value_name = "AUD"
    )]
    jwt_audience: Vec<String>,
    /// Refuse JWTs valid for longer than this (`exp - iat`), e.g. `1h`.
    #[arg(long, env = "PGDN_JWT_MAX_LIFETIME", value_parser = humantime::parse_duration)]
    jwt_max_lifetime: Option<Duration>,
    /// Keys publishers send as `Authorization: Bearer <key>`, each at least
    /// 16 bytes; several (comma-separated, or the flag repeated) are all
    /// accepted, for rotating keys. Generated in dev mode.
    #[arg(
        long,
        env = "PGDN_PUBLISH_KEY",
        hide_env_values = true,
        value_delimiter = ',',
        conflicts_with = "publish_key_file"
    )]
    publish_key: Vec<String>,
    /// File holding the publish keys (comma-separated or one per line).
    #[arg(long, env = "PGDN_PUBLISH_KEY_FILE", value_name = "PATH")]
    publish_key_file: Option<PathBuf>,
    /// Path of the WebSocket route.
    #[arg(long, env = "PGDN_WS_PATH", default_value = "/ws")]
    ws_path: String,
    /// Path of the Server-Sent Events route.
    #[arg(long, env = "PGDN_SSE_PATH", default_value = "/sse")]
    sse_path: String,
    /// Largest inbound WebSocket message in bytes (larger closes with 1009).
    #[arg(long, env = "PGDN_MAX_FRAME_SIZE", default_value_t = 64 * 1024)]
    max_frame_size: usize,
    /// Sustained inbound frames per second per connection (over the burst closes with 1008).
    #[arg(long, env = "PGDN_RATE_LIMIT", default_value_t = 20.0)]
    rate_limit: f64,
    /// Inbound frames a connection may send in a burst.
    #[arg(long, env = "PGDN_RATE_BURST", default_value_t = 50.0)]
    rate_burst: f64,
    /// Most frames queued for one connection (a full queue closes it with 1013).
    #[arg(long, env = "PGDN_QUEUE_FRAMES", default_value_t = 1024)]
    queue_frames: usize,
    /// Most bytes queued for one connection.
    #[arg(long, env = "PGDN_QUEUE_BYTES", default_value_t = 1024 * 1024)]
    queue_bytes: usize,
    /// Largest publish body in bytes (larger gets 413).
    #[arg(long, env = "PGDN_MAX_BODY_SIZE", default_value_t = 1024 * 1024)]
    max_body_size: u64,
    /// Most open connections (WebSocket and SSE) on this node (503 above).
    #[arg(long, env = "PGDN_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Most open connections of one user on this node (429 above).
    #[arg(long, env = "PGDN_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    max_connections_per_user: usize,
    /// Most open connections from one client address on this node (429
    /// above). Off by default: behind a reverse proxy every client has the
    /// proxy's address, unless the proxy is in --trusted-proxies.
    #[arg(long, env = "PGDN_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// Reverse proxies whose `X-Forwarded-For` is believed, as addresses or
    /// CIDR networks (comma-separated): the client is the right-most
    /// forwarded address that is not one of them.
    #[arg(
        long,
        env = "PGDN_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "IP|CIDR"
    )]
    trusted_proxies: Vec<IpNetwork>,
    /// Origins allowed to connect besides the server's own, e.g.
    /// `https://app.example.com` (comma-separated; `*` for any). Others get 403.
    #[arg(
        long,
        env = "PGDN_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    allowed_origins: Vec<String>,
    /// Bytes a WebSocket connection reads from its socket at once (a
    /// buffer that exists only while reading; idle connections hold none).
    #[arg(long, env = "PGDN_READ_BUFFER", default_value_t = 4 * 1024)]
    read_buffer: usize,
    /// Threads that run WebSocket connections once greeted, apart from
    /// the threads that accept connections and answer HTTP (so that a
    /// broadcast waking every connection does not delay a publish or a new
    /// connection). Default: one per CPU; 0 runs everything on one pool.
    #[arg(long, env = "PGDN_SESSION_THREADS", value_name = "N")]
    session_threads: Option<usize>,
    /// The session threads' nice value (0 to 19, Linux): how much the
    /// operating system favours accepting, HTTP and greeting over writing
    /// broadcasts when the CPU is short. 0 treats them alike: use it on a
    /// box shared with CPU-heavy processes, which would otherwise slow the
    /// connections' writes.
    #[arg(long, env = "PGDN_SESSION_NICE", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    session_nice: i32,
    /// How often each connection gets a WebSocket Ping (e.g. `25s`).
    #[arg(long, env = "PGDN_PING_INTERVAL", default_value = "25s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Drop a connection that sent nothing, not even a Pong, for this long.
    #[arg(long, env = "PGDN_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Close a connection (1013) whose write makes no progress for this long.
    #[arg(long, env = "PGDN_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    write_timeout: Duration,
    /// Close a connection whose request head (line and headers) is not
    /// complete this long after it opened, or after the next request began.
    #[arg(long, env = "PGDN_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// Close a kept-alive HTTP connection idle this long between requests.
    #[arg(long, env = "PGDN_KEEP_ALIVE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    keep_alive_timeout: Duration,
    /// Answer 408 (and close) when a publish body is not in full after this long.
    #[arg(long, env = "PGDN_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// On SIGTERM/SIGINT, how long to wait for connections to close before
    /// dropping them and exiting.
    #[arg(long, env = "PGDN_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// Messages kept per user for resume after reconnect (`since=`).
    #[arg(long, env = "PGDN_HISTORY_MESSAGES", default_value_t = 100)]
    history_messages: usize,
    /// Oldest message kept for resume (e.g. `10m`).
    #[arg(long, env = "PGDN_HISTORY_AGE", default_value = "10m", value_parser = humantime::parse_duration)]
    history_age: Duration,
    /// Most users whose recent messages are kept for resume (in memory;
    /// the oldest entries go first past it).
    #[arg(long, env = "PGDN_HISTORY_MAX_USERS", default_value_t = 100_000)]
    history_max_users: usize,
    /// Most bytes of messages kept for resume (in memory), e.g. 268435456.
    #[arg(long, env = "PGDN_HISTORY_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    history_max_bytes: usize,
    /// Cluster mode: most users in one `users` publish (one Redis script
    /// call each); a longer list gets 400.
    #[arg(long, env = "PGDN_MAX_USERS_PER_PUBLISH", default_value_t = 1000)]
    max_users_per_publish: usize,
    /// PEM certificate chain (the server's certificate first): the server
    /// terminates TLS itself and serves `https://` and `wss://`. Needs
    /// --tls-key.
    #[arg(long, env = "PGDN_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PGDN_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// Serve the demo page at `/`.
    #[arg(long, env = "PGDN_DEMO_PAGE", default_value_t = true, action = clap::ArgAction::Set)]
    demo_page: bool,
    /// Redis URL: runs this node in cluster mode with the other nodes on the
    /// same Redis (e.g. redis://127.0.0.1:6379; a comma-separated list
    /// where --redis-mode needs several). Without it the node keeps
    /// everything in memory.
    #[arg(
        long,
        env = "PGDN_REDIS_URL",
        hide_env_values = true,
        conflicts_with = "redis_url_file"
    )]
    redis_url: Option<String>,
    /// File holding the Redis URL (a trailing newline is ignored).
    #[arg(long, env = "PGDN_REDIS_URL_FILE", value_name = "PATH")]
    redis_url_file: Option<PathBuf>,
    /// For a rediss:// URL: PEM file of the CA that the Redis server's
    /// certificate must chain to, instead of the public roots.
    #[arg(long, env = "PGDN_REDIS_CA_CERT", value_name = "PATH")]
    redis_ca_cert: Option<PathBuf>,
    /// This node's id in the cluster (default: generated, printed at start).
    #[arg(long, env = "PGDN_NODE_ID")]
    node_id: Option<String>,
    /// Key prefix in Redis, for several deployments on one Redis.
    #[arg(long, env = "PGDN_REDIS_PREFIX", default_value = "pgdn:")]
    redis_prefix: String,
    #[command(flatten)]
    layout: RedisLayout,
    /// How long a silent node's users stay routed to it (its liveness TTL;
    /// the heartbeat runs at a third of it).
    #[arg(long, env = "PGDN_NODE_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    node_ttl: Duration,
    /// URL that lifecycle events (`user.online`, `user.offline`,
    /// `notification.undelivered`) are POSTed to, in signed batches
    /// (comma-separated, or the flag repeated: each URL gets every event).
    /// Needs --webhook-secret.
    #[arg(
        long,
        env = "PGDN_WEBHOOK_URL",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "URL"
    )]
    webhook_url: Vec<String>,
    /// HMAC-SHA256 secret the webhook requests are signed with (the
    /// `Pgdn-Signature` header), at least 32 bytes.
    #[arg(
        long,
        env = "PGDN_WEBHOOK_SECRET",
        hide_env_values = true,
        conflicts_with = "webhook_secret_file"
    )]
    webhook_secret: Option<String>,
    /// File holding the webhook secret (a trailing newline is ignored).
    #[arg(long, env = "PGDN_WEBHOOK_SECRET_FILE", value_name = "PATH")]
    webhook_secret_file: Option<PathBuf>,
    /// Most lifecycle events queued per webhook URL while it is down or
    /// slow; past it the oldest are dropped (and counted).
    #[arg(long, env = "PGDN_WEBHOOK_QUEUE_LIMIT", default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    webhook_queue_limit: usize,
    /// Most events in one webhook request.
    #[arg(long, env = "PGDN_WEBHOOK_MAX_BATCH", default_value_t = 100,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    webhook_max_batch: usize,
    /// How long one webhook request may take (connecting included) before
    /// it counts as failed and is retried.
    #[arg(long, env = "PGDN_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    webhook_timeout: Duration,
    /// How long a user whose last connection closed must stay away before
    /// `user.offline` is sent (a page reload or a reconnect is not an
    /// offline/online pair).
    #[arg(long, env = "PGDN_OFFLINE_DEBOUNCE", default_value = "5s", value_parser = humantime::parse_duration)]
    offline_debounce: Duration,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `pgdn_server=debug`.
    #[arg(long, env = "PGDN_LOG", default_value = "info")]
    log: String,
    /// Log line format on stderr: `text`, or `json` (one object a line).
    #[arg(long, env = "PGDN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines, coloured only when stderr is a terminal.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// Installs the log subscriber on stderr; an invalid `--log` filter is an
/// error (silently logging at `info` instead would hide the mistake).
fn init_logs(filter: &str, format: LogFormat) -> Result<(), pgdn_server::Error> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        pgdn_server::Error::Config(format!("invalid --log (PGDN_LOG) filter {filter:?}: {e}"))
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Connects this node to the cluster's Redis and builds its hub.
#[cfg(feature = "redis")]
async fn cluster_hub(
    url: &str,
    args: &Args,
    config: &Config,
    lifecycle: Option<Arc<dyn LifecycleSink>>,
) -> Result<pgdn_server::Hub, pgdn_server::Error> {
    let node = args
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{}", random_key(4)));
    let mut cluster_config = pgdn_redis::ClusterConfig::default();
    cluster_config.prefix = args.redis_prefix.clone();
    cluster_config.node_ttl = args.node_ttl;
    cluster_config.heartbeat_interval = args.node_ttl / 3;
    cluster_config.history = config.history;
    cluster_config.max_users_per_publish = args.max_users_per_publish;
    args.layout.apply(&mut cluster_config);
    if let Some(path) = &args.redis_ca_cert {
        cluster_config.redis_ca_cert = Some(std::fs::read(path).map_err(|e| {
            pgdn_server::Error::Config(format!(
                "cannot read --redis-ca-cert {}: {e}",
                path.display()
            ))
        })?);
    }
    // Redis may not be up yet (containers start in any order): the node
    // comes up anyway, serves /healthz, and is not ready (503 on /readyz
    // and on publishes) until it is connected, subscribed and registered;
    // the link retries with backoff and logs why meanwhile.
    let cluster = pgdn_redis::Cluster::start(url, &node, cluster_config).map_err(|e| {
        pgdn_server::Error::Config(format!("cannot use redis at {}: {e}", redacted(url)))
    })?;
    // One parseable line on stdout, before the listening line.
    println!("pgdn-server cluster node {node} on {}", redacted(url));
    tracing::info!(
        node = %node,
        mode = %args.layout.redis_mode,
        partitions = args.layout.redis_partitions,
        "redis layout"
    );
    let hub = with_lifecycle(
        cluster.hub_builder().queue_limits(config.queue),
        lifecycle,
        args.offline_debounce,
    )
    .build();
    // Give a Redis that is up the time to take this node in, so that a
    // node started beside a running cluster is ready when it says it
    // listens; one that is down is not waited for.
    if !cluster.wait_ready(Duration::from_secs(5)).await {
        tracing::warn!(
            why = cluster.readiness().err().unwrap_or("ready"),
            "not ready yet; /readyz and publishes answer 503 until this node is"
        );
    }
    Ok(hub)
}

#[cfg(not(feature = "redis"))]
async fn cluster_hub(
    _: &str,
    _: &Args,
    _: &Config,
    _: Option<Arc<dyn LifecycleSink>>,
) -> Result<pgdn_server::Hub, pgdn_server::Error> {
    Err(pgdn_server::Error::Config(
        "this pgdn-server was built without the `redis` feature; rebuild with it for --redis-url"
            .into(),
    ))
}

#[cfg(feature = "redis")]
impl RedisLayout {
    /// Sets the layout in a cluster configuration.
    fn apply(&self, config: &mut pgdn_redis::ClusterConfig) {
        config.mode = self.redis_mode.parse().expect("checked by clap");
        config.partitions = self.redis_partitions;
        config.sentinel_master = self.redis_sentinel_master.clone();
    }
}

/// `pgdn-server cleanup`: one full pass on every shard.
#[cfg(feature = "redis")]
async fn cleanup(url: &str, prefix: &str, layout: &RedisLayout) -> Result<(), pgdn_server::Error> {
    let mut config = pgdn_redis::ClusterConfig::default();
    config.prefix = prefix.to_string();
    layout.apply(&mut config);
    let failed = |e: pgdn_redis::Error| {
        pgdn_server::Error::Config(format!("cleanup failed on {}: {e}", redacted(url)))
    };
    let cluster = pgdn_redis::Cluster::connect(url, "cleanup", config)
        .await
        .map_err(failed)?;
    let report = cluster.cleanup().await.map_err(failed)?;
    println!(
        "cleanup: {} user and group keys scanned, {} stale mappings removed, {} dead nodes removed",
        report.keys_scanned, report.mappings_removed, report.nodes_removed
    );
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn cleanup(_: &str, _: &str, _: &RedisLayout) -> Result<(), pgdn_server::Error> {
    Err(pgdn_server::Error::Config(
        "this pgdn-server was built without the `redis` feature".into(),
    ))
}

/// The URL without its password, for logs.
#[cfg(feature = "redis")]
fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
            _ => url.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn random_key(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// The contents of a secret's file, without its trailing newline.
fn read_secret_file(path: &Path, flag: &str) -> Result<String, pgdn_server::Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        pgdn_server::Error::Config(format!("cannot read {flag} {}: {e}", path.display()))
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// A secret given directly or in a file (clap keeps them exclusive).
fn secret_or_file(
    direct: Option<String>,
    file: Option<&Path>,
    flag: &str,
) -> Result<Option<String>, pgdn_server::Error> {
    match file {
        Some(path) => read_secret_file(path, flag).map(Some),
        None => Ok(direct),
    }
}

/// The credentials, from flags, variables or files; `None` for dev mode.
/// Refuses half a configuration and weak secrets, naming the setting.
fn credentials(args: &Args) -> Result<Option<(String, Vec<String>)>, pgdn_server::Error> {
    // With public keys there is no secret (clap refuses one alongside).
    let public_keys = args.jwt_public_key_file.is_some() || args.jwks_url.is_some();
    let secret = secret_or_file(
        args.jwt_secret.clone(),
        args.jwt_secret_file.as_deref(),
        "--jwt-secret-file",
    )?;
    let keys = match &args.publish_key_file {
        Some(path) => Some(
            read_secret_file(path, "--publish-key-file")?
                .split([',', '\n'])
                .map(|k| k.trim_end_matches('\r').to_string())
                .collect::<Vec<_>>(),
        ),
        None if args.publish_key.is_empty() => None,
        None => Some(args.publish_key.clone()),
    };
    let (secret_name, key_name) = (
        if args.jwt_secret_file.is_some() {
            "--jwt-secret-file (PGDN_JWT_SECRET_FILE)"
        } else {
            "--jwt-secret (PGDN_JWT_SECRET)"
        },
        if args.publish_key_file.is_some() {
            "--publish-key-file (PGDN_PUBLISH_KEY_FILE)"
        } else {
            "--publish-key (PGDN_PUBLISH_KEY)"
        },
    );
    let config = |m: String| Err(pgdn_server::Error::Config(m));
    let (secret, keys) = match (secret, keys) {
        (None, None) if public_keys => {
            return config(
                "--jwt-public-key-file or --jwks-url is set but --publish-key (PGDN_PUBLISH_KEY) is not".into(),
            );
        }
        (None, None) => return Ok(None),
        (Some(s), Some(k)) => (s, k),
        (None, Some(k)) if public_keys => (String::new(), k),
        (None, Some(_)) => {
            return config(format!(
                "{key_name} is set but --jwt-secret (PGDN_JWT_SECRET) is not; set both, or neither for dev mode"
            ));
        }
        (Some(_), None) => {
            return config(format!(
                "{secret_name} is set but --publish-key (PGDN_PUBLISH_KEY) is not; set both, or neither for dev mode"
            ));
        }
    };
    // Never print a secret, only its length.
    if !public_keys && secret.len() < MIN_SECRET_LEN {
        return config(format!(
            "the JWT secret from {secret_name} is {} bytes; at least {MIN_SECRET_LEN} are required \
             (e.g. `openssl rand -hex 32`)",
            secret.len()
        ));
    }
    if let Some(weak) = keys.iter().find(|k| k.len() < MIN_PUBLISH_KEY_LEN) {
        return config(format!(
            "a publish key from {key_name} is {} bytes; each must be at least {MIN_PUBLISH_KEY_LEN} \
             (e.g. `openssl rand -hex 24`)",
            weak.len()
        ));
    }
    Ok(Some((secret, keys)))
}

/// The JWT authenticator: a public key file's (RS256/ES256), a JWKS
/// URL's, or else the secret's (HS256), with the claim rules of the flags.
async fn authenticator(
    args: &Args,
    jwt_secret: &str,
) -> Result<JwtAuthenticator, pgdn_server::Error> {
    let mut auth = if let Some(path) = &args.jwt_public_key_file {
        let flag = format!("--jwt-public-key-file {}", path.display());
        let pem = std::fs::read(path)
            .map_err(|e| pgdn_server::Error::Config(format!("cannot read {flag}: {e}")))?;
        JwtAuthenticator::public_key_pem(pem).map_err(|e| match e {
            pgdn_server::core::Error::Config(m) => {
                pgdn_server::Error::Config(format!("{flag}: {m}"))
            }
            other => other.into(),
        })?
    } else if let Some(url) = &args.jwks_url {
        jwks_authenticator(url).await?
    } else {
        JwtAuthenticator::try_new(jwt_secret.as_bytes())?
    };
    for issuer in args.jwt_issuer.iter().filter(|i| !i.is_empty()) {
        auth = auth.issuer(issuer.clone());
    }
    for audience in args.jwt_audience.iter().filter(|a| !a.is_empty()) {
        auth = auth.audience(audience.clone());
    }
    if let Some(max) = args.jwt_max_lifetime {
        auth = auth.max_lifetime(max);
    }
    Ok(auth)
}

/// Keys from `url`, fetched once now so that a wrong URL shows at start;
/// if the provider is down, tokens are refused until a fetch succeeds.
#[cfg(feature = "jwks")]
async fn jwks_authenticator(url: &str) -> Result<JwtAuthenticator, pgdn_server::Error> {
    use pgdn_server::jwks::HttpJwks;
    use pgdn_server::jwt::JwksKeys;
    let keys = JwksKeys::new(HttpJwks::new(url)?);
    match keys.refresh().await {
        Ok(count) => tracing::info!(keys = count, "jwks fetched"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot fetch the jwks yet; tokens are refused until it can")
        }
    }
    Ok(JwtAuthenticator::jwks(keys))
}

#[cfg(not(feature = "jwks"))]
async fn jwks_authenticator(_: &str) -> Result<JwtAuthenticator, pgdn_server::Error> {
    Err(pgdn_server::Error::Config(
        "this pgdn-server was built without the `jwks` feature; rebuild with it for --jwks-url"
            .into(),
    ))
}

/// The hub builder with the lifecycle sink, if there is one.
fn with_lifecycle(
    builder: pgdn_server::core::HubBuilder,
    sink: Option<Arc<dyn LifecycleSink>>,
    debounce: Duration,
) -> pgdn_server::core::HubBuilder {
    match sink {
        Some(sink) => builder.lifecycle_sink(sink).offline_debounce(debounce),
        None => builder,
    }
}

/// How long, at shutdown, undelivered webhook events are still tried.
#[cfg(feature = "webhooks")]
const WEBHOOK_FLUSH: Duration = Duration::from_secs(2);

/// The webhook sink (feature `webhooks`).
#[cfg(feature = "webhooks")]
type Webhooks = pgdn_server::webhooks::WebhookSink;
/// Without the `webhooks` feature there is none (the type has no value).
#[cfg(not(feature = "webhooks"))]
type Webhooks = std::convert::Infallible;

/// The webhooks of --webhook-url, started; `None` without a URL. Refuses
/// a URL without a secret (and a secret without a URL) and a weak
/// secret, naming the setting and never the secret.
fn webhooks(args: &Args) -> Result<Option<Webhooks>, pgdn_server::Error> {
    let config = |m: String| Err(pgdn_server::Error::Config(m));
    let urls: Vec<String> = args
        .webhook_url
        .iter()
        .filter(|u| !u.is_empty())
        .cloned()
        .collect();
    let secret_name = if args.webhook_secret_file.is_some() {
        "--webhook-secret-file (PGDN_WEBHOOK_SECRET_FILE)"
    } else {
        "--webhook-secret (PGDN_WEBHOOK_SECRET)"
    };
    let secret = secret_or_file(
        args.webhook_secret.clone(),
        args.webhook_secret_file.as_deref(),
        "--webhook-secret-file",
    )?;
    let secret = match (urls.is_empty(), secret) {
        (true, None) => return Ok(None),
        (true, Some(_)) => {
            return config(format!(
                "{secret_name} is set but --webhook-url (PGDN_WEBHOOK_URL) is not; set both, or neither"
            ));
        }
        (false, None) => {
            return config(
                "--webhook-url (PGDN_WEBHOOK_URL) is set but --webhook-secret (PGDN_WEBHOOK_SECRET) \
                 is not: receivers need it to verify the requests (e.g. `openssl rand -hex 32`)"
                    .into(),
            );
        }
        (false, Some(secret)) => secret,
    };
    #[cfg(feature = "webhooks")]
    {
        use pgdn_server::webhooks::{MIN_SECRET_LEN, WebhookConfig, WebhookSink};
        if secret.len() < MIN_SECRET_LEN {
            return config(format!(
                "the webhook secret from {secret_name} is {} bytes; at least {MIN_SECRET_LEN} are \
                 required (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        let sink = WebhookSink::start(
            WebhookConfig::new(urls, secret)
                .queue_limit(args.webhook_queue_limit)
                .max_batch(args.webhook_max_batch)
                .timeout(args.webhook_timeout),
        )
        .map_err(|e| match e {
            pgdn_server::Error::Config(m) => pgdn_server::Error::Config(format!(
                "--webhook-url (PGDN_WEBHOOK_URL): {}",
                m.trim_start_matches("webhooks: ")
            )),
            other => other,
        })?;
        let shown: Vec<String> = sink.stats().into_iter().map(|r| r.url).collect();
        tracing::info!(urls = ?shown, "webhooks on");
        Ok(Some(sink))
    }
    #[cfg(not(feature = "webhooks"))]
    {
        let _ = secret;
        config(
            "this pgdn-server was built without the `webhooks` feature; rebuild with it for \
             --webhook-url"
                .into(),
        )
    }
}

/// What terminates TLS: a certificate and key (feature `tls`).
#[cfg(feature = "tls")]
type Tls = pgdn_server::TlsConfig;
/// Without the `tls` feature nothing can (the type has no value).
#[cfg(not(feature = "tls"))]
type Tls = std::convert::Infallible;

/// The TLS certificate and key of --tls-cert and --tls-key (both or
/// neither), read now so that a bad file stops the start.
fn tls_config(args: &Args) -> Result<Option<Tls>, pgdn_server::Error> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(pgdn_server::Error::Config(
                "--tls-cert (PGDN_TLS_CERT) is set but --tls-key (PGDN_TLS_KEY) is not; \
                 set both to serve https, or neither"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(pgdn_server::Error::Config(
                "--tls-key (PGDN_TLS_KEY) is set but --tls-cert (PGDN_TLS_CERT) is not; \
                 set both to serve https, or neither"
                    .into(),
            ));
        }
    };
    #[cfg(feature = "tls")]
    return pgdn_server::TlsConfig::from_pem_files(cert, key).map(Some);
    #[cfg(not(feature = "tls"))]
    {
        let _ = (cert, key);
        Err(pgdn_server::Error::Config(
            "this pgdn-server was built without the `tls` feature; rebuild with it for --tls-cert"
                .into(),
        ))
    }
}

fn main() {
    // Flags > environment > `--config` file > defaults.
    let cli: Cli = config_file::parse_or_exit();
    let args = cli.args;
    if let Err(e) = init_logs(&args.log, args.log_format) {
        fail(e);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("cannot start the runtime: {e}")));
    let result = match cli.command {
        Some(Task::Cleanup {
            redis_url,
            redis_url_file,
            prefix,
            layout,
        }) => match secret_or_file(redis_url, redis_url_file.as_deref(), "--redis-url-file") {
            Ok(Some(url)) => runtime.block_on(cleanup(&url, &prefix, &layout)),
            Ok(None) => Err(pgdn_server::Error::Config(
                "--redis-url (PGDN_REDIS_URL) is required".into(),
            )),
            Err(e) => Err(e),
        },
        None => {
            // Built before serving and dropped after it, outside any
            // runtime (a runtime cannot be dropped from within one).
            let sessions = session_runtime(args.session_threads, args.session_nice);
            let handle = sessions.as_ref().map(|rt| rt.handle().clone());
            let result = runtime.block_on(run(args, handle));
            drop(sessions);
            result
        }
    };
    drop(runtime);
    if let Err(e) = result {
        fail(e);
    }
}

/// Sets the calling thread's nice value (Linux: a nice value is per
/// thread). Raising it needs no privilege; a failure is logged, not fatal.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(thread), nice) {
            tracing::warn!(error = %e, nice, "cannot lower a session thread's priority");
        }
    }
}

/// Says why on stderr and exits with status 1.
fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("pgdn-server: {e}");
    std::process::exit(1);
}

/// The runtime connections run on once greeted (`--session-threads`):
/// one thread per CPU by default, none for 0. Its threads run at `nice`
/// (`--session-nice`).
///
/// Why a lower priority: under a broadcast to every connection these
/// threads have thousands of writes queued, and without it the operating
/// system shares the CPU evenly between them and the threads that accept
/// connections and answer publish requests, which then wait several
/// scheduler slices for their turn (the user-targeted p99 during broadcasts
/// went from about 10 ms to 4 ms in `cargo xtask bench --load`). They still
/// get whatever CPU the others leave, and their share among other
/// processes only shrinks under contention.
fn session_runtime(threads: Option<usize>, nice: i32) -> Option<tokio::runtime::Runtime> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    if threads == 0 {
        return None;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("pgdn-session")
        .on_thread_start(move || lower_priority(nice))
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("cannot start the session runtime: {e}")));
    Some(runtime)
}

async fn run(
    args: Args,
    sessions: Option<tokio::runtime::Handle>,
) -> Result<(), pgdn_server::Error> {
    let credentials = credentials(&args)?;
    let tls = tls_config(&args)?;
    let webhooks = webhooks(&args)?;
    let dev_mode = credentials.is_none();
    let (jwt_secret, publish_keys) =
        credentials.unwrap_or_else(|| (random_key(32), vec![random_key(24)]));
    let redis_url = secret_or_file(
        args.redis_url.clone(),
        args.redis_url_file.as_deref(),
        "--redis-url-file",
    )?;
    let mut config = Config::default();
    config.ws_path = args.ws_path.clone();
    config.sse_path = args.sse_path.clone();
    config.write_timeout = args.write_timeout;
    config.header_read_timeout = args.header_read_timeout;
    config.keep_alive_timeout = args.keep_alive_timeout;
    config.body_timeout = args.body_timeout;
    config.shutdown_timeout = args.shutdown_timeout;
    config.max_frame_size = args.max_frame_size;
    config.rate_limit_per_sec = args.rate_limit;
    config.rate_limit_burst = args.rate_burst;
    config.queue = config
        .queue
        .max_frames(args.queue_frames)
        .max_bytes(args.queue_bytes);
    config.max_body_size = args.max_body_size;
    config.max_connections = args.max_connections;
    config.max_connections_per_user = args.max_connections_per_user;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.trusted_proxies = args.trusted_proxies.clone();
    config.allowed_origins = if dev_mode {
        // Dev mode serves pages of any origin (the banner says so).
        vec!["*".into()]
    } else {
        args.allowed_origins.clone()
    };
    config.read_buffer_size = args.read_buffer;
    config.demo_page = args.demo_page;
    config.ping_interval = args.ping_interval;
    config.history = config
        .history
        .max_messages(args.history_messages)
        .max_age(args.history_age)
        .max_users(args.history_max_users)
        .max_bytes(args.history_max_bytes);
    config.idle_timeout = args.idle_timeout;

    let auth = authenticator(&args, &jwt_secret).await?;
    // Without a webhook there is nobody to tell: no lifecycle bookkeeping.
    let lifecycle: Option<Arc<dyn LifecycleSink>> = match &webhooks {
        #[cfg(feature = "webhooks")]
        Some(sink) => Some(Arc::new(sink.clone())),
        #[cfg(not(feature = "webhooks"))]
        Some(never) => match *never {},
        None => None,
    };
    let hub = match &redis_url {
        Some(url) => cluster_hub(url, &args, &config, lifecycle).await?,
        // What the builder makes by default, with the webhooks.
        None => with_lifecycle(
            pgdn_server::Hub::builder()
                .queue_limits(config.queue)
                .history_config(config.history),
            lifecycle,
            args.offline_debounce,
        )
        .build(),
    };
    let builder = Pgdn::builder().hub(hub);
    #[cfg(feature = "webhooks")]
    let builder = match &webhooks {
        Some(sink) => builder.collector(sink.metrics()),
        None => builder,
    };
    let builder = match sessions {
        Some(handle) => builder.session_runtime(handle),
        None => builder,
    };
    let pgdn = builder
        .config(config)
        .authenticator(auth.clone())
        .publish_keys(publish_keys.clone())
        .build()?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // One parseable line on stdout for scripts and tests.
    println!("pgdn-server listening on {scheme}://{addr}");
    tracing::info!(%addr, node = pgdn.hub().node_id(), "pgdn-server started");
    if dev_mode {
        print_dev_banner(
            &auth,
            &publish_keys[0],
            &jwt_secret,
            addr,
            &pgdn.config().ws_path,
            &pgdn.config().sse_path,
            tls.is_some(),
        )?;
    }
    match tls {
        None => pgdn.serve(listener, shutdown_signal()).await,
        #[cfg(feature = "tls")]
        Some(tls) => pgdn.serve_tls(listener, tls, shutdown_signal()).await,
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
    }
    #[cfg(feature = "webhooks")]
    if let Some(sink) = &webhooks {
        // Logs how many were left, if any.
        sink.shutdown(WEBHOOK_FLUSH).await;
    }
    tracing::info!("pgdn-server stopped");
    Ok(())
}

fn print_dev_banner(
    auth: &JwtAuthenticator,
    publish_key: &str,
    jwt_secret: &str,
    addr: SocketAddr,
    ws_path: &str,
    sse_path: &str,
    tls: bool,
) -> Result<(), pgdn_server::Error> {
    let (http, ws) = if tls {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let token = auth.issue("demo-user", &["demo"], Duration::from_secs(24 * 3600))?;
    let host = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        other => other.to_string(),
    };
    println!(
        r#"
=====================================================================
 DEV MODE: no PGDN_JWT_SECRET / PGDN_PUBLISH_KEY given, so pgdn made
 throwaway credentials. They change at every start. Do not use this
 configuration in production: set both variables.
=====================================================================
 Any origin may connect (--allowed-origins is ignored in dev mode).
 JWT secret (HS256): {jwt_secret}
 Publish key:        {publish_key}
 Demo token (user "demo-user", group "demo", valid 24 h):
   {token}

 Demo page:   {http}://{host}/?token={token}
 WebSocket:   {ws}://{host}{ws_path}?token=<token>
 SSE:         curl -N '{http}://{host}{sse_path}?token={token}'

 Publish to the demo user:
   curl -sS -X POST {http}://{host}/api/v1/publish \
     -H 'Authorization: Bearer {publish_key}' \
     -H 'Content-Type: application/json' \
     -d '{{"target":{{"user":"demo-user"}},"type":"info","payload":{{"title":"Hello","message":"from curl"}}}}'
====================================================================="#
    );
    Ok(())
}

//! The `pgdn-server` binary: a standalone pgdn node configured by flags and
//! environment variables. With no configuration it runs in dev mode.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
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
        #[arg(long, env = "PGDN_REDIS_URL")]
        redis_url: String,
        /// Key prefix the nodes use.
        #[arg(long, env = "PGDN_REDIS_PREFIX", default_value = "pgdn:")]
        prefix: String,
    },
}

/// Settings of a serving node.
#[derive(Debug, clap::Args)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "PGDN_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// HS256 secret that subscriber JWTs are signed with. Generated in dev mode.
    #[arg(long, env = "PGDN_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Key publishers send as `Authorization: Bearer <key>`. Generated in dev mode.
    #[arg(long, env = "PGDN_PUBLISH_KEY", hide_env_values = true)]
    publish_key: Option<String>,
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
    /// Most open WebSocket connections on this node.
    #[arg(long, env = "PGDN_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// tungstenite read buffer per connection, in bytes.
    #[arg(long, env = "PGDN_READ_BUFFER", default_value_t = 4 * 1024)]
    read_buffer: usize,
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
    /// Serve the demo page at `/`.
    #[arg(long, env = "PGDN_DEMO_PAGE", default_value_t = true, action = clap::ArgAction::Set)]
    demo_page: bool,
    /// Redis URL: runs this node in cluster mode with the other nodes on the
    /// same Redis (e.g. redis://127.0.0.1:6379). Without it the node keeps
    /// everything in memory.
    #[arg(long, env = "PGDN_REDIS_URL")]
    redis_url: Option<String>,
    /// This node's id in the cluster (default: generated, printed at start).
    #[arg(long, env = "PGDN_NODE_ID")]
    node_id: Option<String>,
    /// Key prefix in Redis, for several deployments on one Redis.
    #[arg(long, env = "PGDN_REDIS_PREFIX", default_value = "pgdn:")]
    redis_prefix: String,
    /// How long a silent node's users stay routed to it (its liveness TTL;
    /// the heartbeat runs at a third of it).
    #[arg(long, env = "PGDN_NODE_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    node_ttl: Duration,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `pgdn_server=debug`.
    #[arg(long, env = "PGDN_LOG", default_value = "info")]
    log: String,
}

/// Connects this node to the cluster's Redis and builds its hub.
#[cfg(feature = "redis")]
async fn cluster_hub(
    url: &str,
    args: &Args,
    config: &Config,
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
    let cluster = pgdn_redis::Cluster::connect(url, &node, cluster_config)
        .await
        .map_err(|e| {
            pgdn_server::Error::Config(format!("cannot use redis at {}: {e}", redacted(url)))
        })?;
    // One parseable line on stdout, before the listening line.
    println!("pgdn-server cluster node {node} on {}", redacted(url));
    let hub = cluster.hub_builder().queue_limits(config.queue).build();
    // Take publishes only once this node hears the cluster.
    if !cluster.wait_subscribed(Duration::from_secs(10)).await {
        tracing::warn!("not subscribed to redis yet; publishes get 503 until it is");
    }
    Ok(hub)
}

#[cfg(not(feature = "redis"))]
async fn cluster_hub(
    _: &str,
    _: &Args,
    _: &Config,
) -> Result<pgdn_server::Hub, pgdn_server::Error> {
    Err(pgdn_server::Error::Config(
        "this pgdn-server was built without the `redis` feature; rebuild with it for --redis-url"
            .into(),
    ))
}

/// `pgdn-server cleanup`: one full pass.
#[cfg(feature = "redis")]
async fn cleanup(url: &str, prefix: &str) -> Result<(), pgdn_server::Error> {
    let report = pgdn_redis::cleanup_all(url, prefix).await.map_err(|e| {
        pgdn_server::Error::Config(format!("cleanup failed on {}: {e}", redacted(url)))
    })?;
    println!(
        "cleanup: {} user keys scanned, {} stale mappings removed, {} dead nodes removed",
        report.keys_scanned, report.mappings_removed, report.nodes_removed
    );
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn cleanup(_: &str, _: &str) -> Result<(), pgdn_server::Error> {
    Err(pgdn_server::Error::Config(
        "this pgdn-server was built without the `redis` feature".into(),
    ))
}

/// The URL without its password, for logs.
#[cfg(feature = "redis")]
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn random_key(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let args = cli.args;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Some(Task::Cleanup { redis_url, prefix }) => cleanup(&redis_url, &prefix).await,
        None => run(args).await,
    };
    if let Err(e) = result {
        eprintln!("pgdn-server: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), pgdn_server::Error> {
    let dev_mode = args.jwt_secret.is_none() && args.publish_key.is_none();
    let (jwt_secret, publish_key) = match (args.jwt_secret.clone(), args.publish_key.clone()) {
        (Some(s), Some(k)) => (s, k),
        (None, None) => (random_key(32), random_key(24)),
        (None, Some(_)) => {
            return Err(pgdn_server::Error::Config(
                "--publish-key is set but --jwt-secret (PGDN_JWT_SECRET) is not; set both, or neither for dev mode".into(),
            ));
        }
        (Some(_), None) => {
            return Err(pgdn_server::Error::Config(
                "--jwt-secret is set but --publish-key (PGDN_PUBLISH_KEY) is not; set both, or neither for dev mode".into(),
            ));
        }
    };
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
    config.read_buffer_size = args.read_buffer;
    config.demo_page = args.demo_page;
    config.ping_interval = args.ping_interval;
    config.history = config
        .history
        .max_messages(args.history_messages)
        .max_age(args.history_age);
    config.idle_timeout = args.idle_timeout;

    let auth = JwtAuthenticator::new(jwt_secret.as_bytes());
    let mut builder = Pgdn::builder();
    if let Some(url) = &args.redis_url {
        builder = builder.hub(cluster_hub(url, &args, &config).await?);
    }
    let pgdn = builder
        .config(config)
        .authenticator(auth.clone())
        .publish_key(publish_key.clone())
        .build()?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    // One parseable line on stdout for scripts and tests.
    println!("pgdn-server listening on http://{addr}");
    tracing::info!(%addr, node = pgdn.hub().node_id(), "pgdn-server started");
    if dev_mode {
        print_dev_banner(
            &auth,
            &publish_key,
            &jwt_secret,
            addr,
            &pgdn.config().ws_path,
            &pgdn.config().sse_path,
        )?;
    }
    pgdn.serve(listener, shutdown_signal()).await;
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
) -> Result<(), pgdn_server::Error> {
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
 JWT secret (HS256): {jwt_secret}
 Publish key:        {publish_key}
 Demo token (user "demo-user", group "demo", valid 24 h):
   {token}

 Demo page:   http://{host}/?token={token}
 WebSocket:   ws://{host}{ws_path}?token=<token>
 SSE:         curl -N 'http://{host}{sse_path}?token={token}'

 Publish to the demo user:
   curl -sS -X POST http://{host}/api/v1/publish \
     -H 'Authorization: Bearer {publish_key}' \
     -H 'Content-Type: application/json' \
     -d '{{"target":{{"user":"demo-user"}},"type":"info","payload":{{"title":"Hello","message":"from curl"}}}}'
====================================================================="#
    );
    Ok(())
}

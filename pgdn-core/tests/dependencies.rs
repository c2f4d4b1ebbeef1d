//! The workspace's dependency rules, kept by a test (in the spirit of
//! rust-analyzer's `tidy`): pgdn-core stays free of web frameworks, HTTP
//! servers, WebSocket stacks and Redis, so every adapter can build on it;
//! pgdn-client depends on neither pgdn-server nor pgdn-redis; pgdn-redis
//! not on pgdn-server. And each user compiles only what it uses: a batch
//! job that only publishes no WebSocket stack, an app that embeds
//! pgdn-server none of the binary's dependencies.

use std::collections::BTreeSet;
use std::process::Command;

/// The names of every crate `package` pulls in as a normal dependency.
fn dependencies(package: &str, extra: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = |offline: bool| {
        Command::new(&cargo)
            .args(["tree", "-p", package, "-e", "normal", "--prefix", "none"])
            .args(offline.then_some("--offline"))
            .args(extra)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree runs")
    };
    // Offline first (fast, no network); a fresh machine may not have
    // downloaded the crates of a feature no build used yet (native-tls):
    // then cargo fetches them.
    let mut out = tree(true);
    if !out.status.success() {
        out = tree(false);
    }
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_none(package: &str, deps: &BTreeSet<String>, forbidden: &[&str]) {
    let found: Vec<&&str> = forbidden.iter().filter(|f| deps.contains(**f)).collect();
    assert!(found.is_empty(), "{package} must not depend on {found:?}");
}

#[test]
fn the_listing_sees_real_dependencies() {
    // Guards the other tests against passing on an empty listing.
    let server = dependencies("pgdn-server", &[]);
    assert!(
        server.contains("warp") && server.contains("pgdn-core"),
        "{server:?}"
    );
}

#[test]
fn core_has_no_framework_server_websocket_or_redis() {
    let forbidden = [
        "warp",
        "axum",
        "hyper",
        "hyper-util",
        "tungstenite",
        "tokio-tungstenite",
        "redis",
        "reqwest",
        "pgdn-server",
        "pgdn-redis",
        "pgdn-client",
    ];
    assert_none("pgdn-core", &dependencies("pgdn-core", &[]), &forbidden);
    assert_none(
        "pgdn-core without default features",
        &dependencies("pgdn-core", &["--no-default-features"]),
        &[&forbidden[..], &["jsonwebtoken"]].concat(),
    );
}

#[test]
fn clients_and_redis_do_not_pull_the_server() {
    let client = dependencies("pgdn-client", &[]);
    assert_none(
        "pgdn-client",
        &client,
        &["pgdn-server", "pgdn-redis", "warp", "redis"],
    );
    let redis = dependencies("pgdn-redis", &[]);
    assert_none("pgdn-redis", &redis, &["pgdn-server", "warp", "axum"]);
}

#[test]
fn a_publishing_batch_job_compiles_no_websocket_stack() {
    let websocket = ["tungstenite", "tokio-tungstenite"];
    for features in [
        "publisher,rustls",
        "blocking,rustls",
        "publisher,native-tls",
    ] {
        let deps = dependencies(
            "pgdn-client",
            &["--no-default-features", "--features", features],
        );
        assert!(deps.contains("reqwest"), "{features}: {deps:?}");
        assert_none(&format!("pgdn-client with {features}"), &deps, &websocket);
    }
    // The listing does see it when the subscriber is on.
    let subscriber = dependencies(
        "pgdn-client",
        &["--no-default-features", "--features", "subscriber"],
    );
    assert!(subscriber.contains("tokio-tungstenite"), "{subscriber:?}");
    assert_none(
        "pgdn-client with subscriber only",
        &subscriber,
        &["reqwest"],
    );
}

#[test]
fn an_app_embedding_pgdn_server_compiles_none_of_the_binarys_dependencies() {
    let deps = dependencies("pgdn-server", &["--no-default-features"]);
    assert_none(
        "pgdn-server without default features",
        &deps,
        &[
            "clap",
            "clap_builder",
            "tracing-subscriber",
            "pgdn-redis",
            "redis",
            "reqwest",
            "rustls",
            "tokio-rustls",
        ],
    );
    // The binary's own feature does pull them.
    let cli = dependencies(
        "pgdn-server",
        &["--no-default-features", "--features", "cli"],
    );
    assert!(
        cli.contains("clap") && cli.contains("tracing-subscriber"),
        "{cli:?}"
    );
}

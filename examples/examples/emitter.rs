//! A batch job that publishes straight into the cluster's Redis, without an
//! HTTP hop (the role of Socket.IO's redis-emitter): same message shape and
//! id rules as the HTTP API, delivered by whichever nodes hold the user.
//!
//! ```text
//! pgdn-server --redis-url redis://127.0.0.1:6379     # one or more nodes
//! PGDN_REDIS_URL=redis://127.0.0.1:6379 cargo run -p pgdn-examples --example emitter -- demo-user
//! ```
//!
//! On another layout, give the nodes' `PGDN_REDIS_MODE` too (and the same
//! comma-separated `PGDN_REDIS_URL`).

use pgdn_redis::{ClusterConfig, Emitter};
use serde_json::json;

/// Reports a job's progress to `user_id` through Redis.
pub async fn report(emitter: &Emitter, user_id: &str, job_id: &str) -> pgdn_redis::Result<()> {
    emitter
        .notify_user(user_id, "task_started", json!({"task_id": job_id}))
        .await?;
    for progress in (25..=100).step_by(25) {
        emitter
            .notify_user(
                user_id,
                "task_progress",
                json!({"task_id": job_id, "progress": progress}),
            )
            .await?;
    }
    emitter
        .notify_user(user_id, "task_completed", json!({"task_id": job_id}))
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() {
    let url = std::env::var("PGDN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let user = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo-user".into());
    let result = async {
        let mut config = ClusterConfig::default();
        if let Ok(mode) = std::env::var("PGDN_REDIS_MODE") {
            config.mode = mode
                .parse()
                .map_err(|e: String| pgdn_redis::Error::Config(format!("PGDN_REDIS_MODE: {e}")))?;
        }
        let emitter = Emitter::connect(&url, config).await?;
        report(&emitter, &user, "import-1").await
    }
    .await;
    match result {
        Ok(()) => println!("published import-1's progress to {user} through {url}"),
        Err(e) => {
            eprintln!("emitter: {e}");
            std::process::exit(1);
        }
    }
}

//! pgdn-ws's Celery example in Rust: long jobs on plain threads (no async
//! runtime of their own) report their progress to the user who started
//! them, through the blocking publisher. The notifications really reach the
//! user's browser, because they go to the server over HTTP.
//!
//! ```text
//! cargo run -p pgdn-server                      # prints PGDN_PUBLISH_KEY in dev mode
//! PGDN_PUBLISH_KEY=<key> cargo run -p pgdn-examples --example batch_job -- demo-user
//! ```
//!
//! Open the demo page printed by the server first to watch `task_started`,
//! `task_progress` (10..100) and `task_completed` arrive.

use std::time::Duration;

use pgdn_client::blocking::Publisher;
use serde_json::json;

/// Runs one job of `steps` steps for `user_id`, reporting start, progress
/// after each step, and completion. `work` does one step.
pub fn run_job(
    publisher: &Publisher,
    user_id: &str,
    job_id: &str,
    steps: u32,
    mut work: impl FnMut(u32),
) -> pgdn_client::Result<()> {
    publisher.notify_user(
        user_id,
        "task_started",
        json!({"task_id": job_id, "title": format!("Job {job_id} started")}),
    )?;
    for step in 1..=steps {
        work(step);
        let progress = step * 100 / steps;
        publisher.notify_user(
            user_id,
            "task_progress",
            json!({"task_id": job_id, "progress": progress, "message": format!("{progress}% done")}),
        )?;
    }
    publisher.notify_user(
        user_id,
        "task_completed",
        json!({"task_id": job_id, "title": format!("Job {job_id} finished"), "result": "ok"}),
    )?;
    Ok(())
}

fn main() {
    let url = std::env::var("PGDN_URL").unwrap_or_else(|_| "http://127.0.0.1:8000".into());
    let Ok(key) = std::env::var("PGDN_PUBLISH_KEY") else {
        eprintln!("set PGDN_PUBLISH_KEY to the server's publish key (dev mode prints it at start)");
        std::process::exit(2);
    };
    let user = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo-user".into());
    let publisher = match Publisher::new(url.clone(), key) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("batch_job: {e}");
            std::process::exit(2);
        }
    };
    println!("running two jobs for {user} against {url}");
    // Two jobs at once on plain threads, sharing one publisher.
    let jobs: Vec<_> = ["export-1", "report-2"]
        .into_iter()
        .map(|job| {
            let publisher = publisher.clone();
            let user = user.clone();
            std::thread::spawn(move || {
                run_job(&publisher, &user, job, 10, |_| {
                    std::thread::sleep(Duration::from_millis(300)) // the real work
                })
                .map(|()| println!("{job}: done"))
                .map_err(|e| eprintln!("{job}: {e}"))
            })
        })
        .collect();
    let failed = jobs
        .into_iter()
        .map(|j| j.join())
        .filter(|r| !matches!(r, Ok(Ok(()))))
        .count();
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

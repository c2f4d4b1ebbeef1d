//! Prints the notifications of one user as they arrive, from Rust, and
//! keeps doing so across network cuts and server restarts: the subscriber
//! reconnects by itself and resumes with `since=` so nothing is missed.
//!
//! ```text
//! cargo run -p pgdn-server                      # dev mode prints a demo token
//! PGDN_TOKEN=<token> cargo run -p pgdn-examples --example subscriber
//! ```
//!
//! With `PGDN_JWT_SECRET` instead of `PGDN_TOKEN` it mints a fresh token for
//! the user given as first argument before every connection.

use std::time::Duration;

use futures_util::StreamExt;
use pgdn_client::{Event, Subscriber, SubscriberBuilder};

/// The subscriber this example runs: a fixed token, or a fresh one minted
/// with the JWT secret before each connection.
pub fn subscriber(
    url: String,
    token: Option<String>,
    secret: Option<String>,
    user: String,
) -> Option<SubscriberBuilder> {
    if let Some(token) = token {
        return Some(Subscriber::new(url, token));
    }
    let secret = secret?;
    let auth = pgdn_server::JwtAuthenticator::new(secret.as_bytes());
    Some(Subscriber::with_token_callback(url, move || {
        let token = auth
            .issue(&user, &[], Duration::from_secs(3600))
            .map_err(|e| e.to_string());
        async move { token }
    }))
}

#[tokio::main]
async fn main() {
    let url = std::env::var("PGDN_WS_URL").unwrap_or_else(|_| "ws://127.0.0.1:8000/ws".into());
    let user = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo-user".into());
    let Some(builder) = subscriber(
        url.clone(),
        std::env::var("PGDN_TOKEN").ok(),
        std::env::var("PGDN_JWT_SECRET").ok(),
        user,
    ) else {
        eprintln!("set PGDN_TOKEN (dev mode prints a demo token) or PGDN_JWT_SECRET");
        std::process::exit(2);
    };
    println!("subscribing at {url} (Ctrl-C to stop)");
    let mut events = match builder.subscribe() {
        Ok(events) => events,
        Err(e) => {
            eprintln!("cannot subscribe: {e}");
            std::process::exit(2);
        }
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            event = events.next() => match event {
                Some(Ok(Event::Connected { user_id, connection_id, resumed })) => {
                    println!("connected as {user_id} ({connection_id}){}", if resumed { ", resuming" } else { "" });
                }
                Some(Ok(Event::Notification(n))) => {
                    println!("[{}] {} {} {}", n.timestamp, n.kind, n.id, serde_json::Value::Object(n.payload));
                }
                Some(Ok(Event::HistoryGap)) => println!("(history gap: some messages were missed; refetch state)"),
                Some(Ok(Event::Disconnected { code, reason, retry_in })) => {
                    println!("disconnected ({code:?} {reason}); retrying in {retry_in:?}");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("stopped: {e}");
                    std::process::exit(1);
                }
                None => break,
            },
        }
    }
}

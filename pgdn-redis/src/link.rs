//! The node's background tasks that keep its link to Redis, and that
//! decide when it may take publishes ([`LinkState`]):
//!
//! - [`command_link`]: connects the command connection (retrying with
//!   backoff while Redis is down, so a node may start before Redis), PINGs
//!   it, and replaces it when it stops answering (half-open).
//! - [`subscribe_loop`]: keeps the pub/sub subscription, PINGs it, and
//!   delivers what arrives.
//! - [`heartbeat_loop`]: refreshes the node's registration every heartbeat
//!   interval, and at once (then retrying) after anything that may have
//!   lost it.
//!
//! The rule they implement: a node answers 503 until its command
//! connection answers, its subscription is live and a heartbeat has
//! written its sessions since the last thing that may have lost them.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};

use crate::cluster::Shared;

/// First and longest wait between reconnect attempts.
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(100);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(2);
/// PINGs in a row without an answer before a connection is replaced.
const MISSED_PINGS: u32 = 2;
/// How often an ongoing outage is logged again at `warn`.
const REPEAT_WARNING: Duration = Duration::from_secs(30);

/// Logs an outage once when it starts, then every [`REPEAT_WARNING`] while
/// it lasts, and once when it ends.
pub(crate) struct Outage {
    what: &'static str,
    since: Option<Instant>,
    warned: Option<Instant>,
}

impl Outage {
    pub(crate) fn new(what: &'static str) -> Outage {
        Outage {
            what,
            since: None,
            warned: None,
        }
    }

    pub(crate) fn failed(&mut self, node: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.warned.is_none_or(|w| now - w >= REPEAT_WARNING) {
            self.warned = Some(now);
            tracing::warn!(
                node,
                error = %error,
                down_for = ?(now - since),
                "{}; retrying with backoff (publishes get 503 meanwhile)",
                self.what
            );
        } else {
            tracing::debug!(node, error = %error, "{}", self.what);
        }
    }

    pub(crate) fn recovered(&mut self, node: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(node, after = ?since.elapsed(), "recovered: {}", self.what);
        }
        self.warned = None;
    }
}

/// Keeps the node's command connection: makes it (with backoff while
/// Redis is down), PINGs it every `ping_interval`, and after
/// [`MISSED_PINGS`] unanswered PINGs drops it and makes a new one. Any
/// unanswered PING also marks the node's registration as possibly lost
/// (a Redis that stalls longer than the node TTL has expired its
/// mappings). Ends when the cluster is dropped.
pub(crate) async fn command_link(weak: Weak<Shared>) {
    let mut wait = RETRY_MIN;
    let mut missed = 0u32;
    // Whether the last touch found the cluster settling.
    let mut settled_seen = false;
    let mut outage = Outage::new("redis is unreachable");
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let timeout = shared.config.command_timeout;
        let pause = match shared.conn() {
            Err(_) => match crate::cluster::manager(&shared.client, timeout).await {
                Ok(conn) => {
                    shared.set_conn(Some(conn));
                    shared.update(|s| {
                        s.connected = true;
                        s.unreachable = false;
                    });
                    shared.registration_lost();
                    outage.recovered(&shared.node);
                    wait = RETRY_MIN;
                    missed = 0;
                    shared.config.ping_interval
                }
                Err(e) => {
                    shared.update(|s| {
                        s.connected = false;
                        s.unreachable = true;
                    });
                    outage.failed(&shared.node, &e);
                    let pause = wait;
                    wait = (wait * 2).min(RETRY_MAX);
                    pause
                }
            },
            Ok(mut conn) => {
                // The PING is the cluster clock's touch (see the publish
                // script): it also says whether the cluster is settling.
                let config = &shared.config;
                let mut touch = crate::scripts::TOUCH.prepare_invoke();
                touch
                    .arg(&shared.keys.prefix)
                    .arg(config.settle_gap().as_millis() as u64)
                    .arg(config.settle_time().as_millis() as u64);
                let ping = touch.invoke_async::<i64>(&mut conn);
                match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(settling)) => {
                        if missed > 0 {
                            shared.update(|s| s.connected = true);
                            outage.recovered(&shared.node);
                        }
                        missed = 0;
                        let settling = settling > 0;
                        if settling && !settled_seen {
                            tracing::warn!(
                                node = %shared.node,
                                "redis was away or restarted: registering again; \
                                 publishes get 503 until every node has"
                            );
                            shared.registration_lost();
                        }
                        settled_seen = settling;
                        shared.update(|s| s.settling = settling);
                    }
                    failed => {
                        missed += 1;
                        shared.update(|s| s.connected = false);
                        shared.registration_lost();
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer to PING within {timeout:?}"),
                        };
                        outage.failed(&shared.node, &error);
                        if missed >= MISSED_PINGS {
                            // A new connection: the old one may be half-open.
                            shared.set_conn(None);
                            missed = 0;
                        }
                    }
                }
                shared.config.ping_interval
            }
        };
        let woken = async move {
            shared.touch_now.notified().await;
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = woken => {}
        }
    }
}

/// Keeps the node subscribed to its channels, resubscribing after any
/// failure or after [`MISSED_PINGS`] unanswered PINGs on the subscription,
/// and delivers what arrives. Ends when the hub is gone.
pub(crate) async fn subscribe_loop(shared: Arc<Shared>) {
    let mut wait = RETRY_MIN;
    let mut outage = Outage::new("redis subscription is down");
    let channels = [
        shared.keys.all_channel(),
        shared.keys.node_channel(&shared.node),
    ];
    let timeout = shared.config.command_timeout;
    loop {
        if shared.hub().is_none() {
            return;
        }
        let subscribe = async {
            let mut pubsub = shared.client.get_async_pubsub().await?;
            for c in &channels {
                pubsub.subscribe(c).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        let error = match tokio::time::timeout(timeout * 2, subscribe).await {
            Ok(Ok(pubsub)) => {
                let (mut sink, mut messages) = pubsub.split();
                // Publishes wait for a heartbeat made after this point:
                // Redis may have restarted empty, or expired our mappings.
                shared.registration_lost();
                shared.update(|s| s.subscribed = true);
                outage.recovered(&shared.node);
                tracing::info!(node = %shared.node, "subscribed to redis");
                wait = RETRY_MIN;
                let every = shared.config.ping_interval;
                let pings = async move {
                    let mut missed = 0;
                    loop {
                        tokio::time::sleep(every).await;
                        match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                            Ok(Ok(_)) => missed = 0,
                            Ok(Err(e)) => return e.to_string(),
                            Err(_) => {
                                missed += 1;
                                if missed >= MISSED_PINGS {
                                    return format!(
                                        "{MISSED_PINGS} PINGs on the subscription unanswered"
                                    );
                                }
                            }
                        }
                    }
                };
                tokio::pin!(pings);
                let deliver = |msg: redis::Msg| {
                    let Some(hub) = shared.hub() else {
                        return false;
                    };
                    match crate::broker::parse_message(msg.get_payload_bytes()) {
                        Ok(envelope) => {
                            tracing::trace!(seq = envelope.seq, id = %envelope.id, "from redis");
                            hub.deliver_local(&envelope);
                        }
                        Err(e) => hub.drop_invalid(&e),
                    }
                    true
                };
                loop {
                    tokio::select! {
                        // Messages first: what Redis sent before a failure
                        // is delivered before the failure is acted on.
                        biased;
                        msg = messages.next() => {
                            let Some(msg) = msg else {
                                break "redis closed the subscription".to_string();
                            };
                            if !deliver(msg) {
                                return;
                            }
                        }
                        why = &mut pings => {
                            // A PING failed: deliver what had arrived
                            // before it, then start over.
                            while let Some(Some(msg)) = messages.next().now_or_never() {
                                if !deliver(msg) {
                                    return;
                                }
                            }
                            break why;
                        }
                    }
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("subscribing took longer than {:?}", timeout * 2),
        };
        shared.update(|s| s.subscribed = false);
        outage.failed(&shared.node, &error);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Refreshes liveness and mappings every heartbeat interval, and at once
/// when the registration may have been lost; a failed heartbeat is retried
/// with a short backoff, not at the next tick. Ends when the hub is gone.
pub(crate) async fn heartbeat_loop(shared: Arc<Shared>) {
    use std::sync::atomic::Ordering;
    let mut every = tokio::time::interval(shared.config.heartbeat_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outage = Outage::new("heartbeat to redis fails");
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shared.heartbeat_now.notified() => {}
        }
        let mut wait = RETRY_MIN;
        loop {
            if shared.hub().is_none() {
                return;
            }
            let epoch = shared.epoch.load(Ordering::SeqCst);
            match crate::session::heartbeat(&shared).await {
                Ok(()) if epoch == shared.epoch.load(Ordering::SeqCst) => {
                    shared.update(|s| s.registered = true);
                    outage.recovered(&shared.node);
                    break;
                }
                // Something happened meanwhile that may have lost what it
                // wrote (a resubscription, a failed PING): again, now.
                Ok(()) => continue,
                Err(e) => {
                    shared.update(|s| s.registered = false);
                    outage.failed(&shared.node, &e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shared.heartbeat_now.notified() => {}
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
        every.reset();
    }
}

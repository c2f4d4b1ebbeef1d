//! The node's background tasks that keep its link to Redis, and that
//! decide when it may take publishes ([`LinkState`]):
//!
//! Each runs once per shard ([`Shard`]):
//!
//! - [`command_link`]: connects the command connection (retrying with
//!   backoff while Redis is down, so a node may start before Redis), PINGs
//!   it (touching the clocks of the shard's partitions), and replaces it
//!   when it stops answering (half-open).
//! - [`subscribe_loop`]: keeps the sharded pub/sub subscription to the
//!   shard's channels (a node channel and a broadcast channel per
//!   partition), PINGs it, and delivers what arrives.
//! - [`heartbeat_loop`]: refreshes the node's registration in the shard's
//!   partitions every heartbeat interval, and at once (then retrying)
//!   after anything that may have lost it.
//!
//! The rule they implement: a node answers 503 until, on every shard, its
//! command connection answers, its subscription is live and a heartbeat
//! has written its sessions since the last thing that may have lost them.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::cluster::Shared;
use crate::scripts::{self, Call};
use crate::shard::Shard;

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

    pub(crate) fn failed(&mut self, node: &str, shard: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.warned.is_none_or(|w| now - w >= REPEAT_WARNING) {
            self.warned = Some(now);
            tracing::warn!(
                node,
                shard,
                error = %error,
                down_for = ?(now - since),
                "{}; retrying with backoff (publishes get 503 meanwhile)",
                self.what
            );
        } else {
            tracing::debug!(node, shard, error = %error, "{}", self.what);
        }
    }

    pub(crate) fn recovered(&mut self, node: &str, shard: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(node, shard, after = ?since.elapsed(), "recovered: {}", self.what);
        }
        self.warned = None;
    }
}

/// Connects a shard: finds its master, opens a connection that fails
/// fast, and loads the scripts.
pub(crate) async fn connect_shard(
    shard: &Shard,
    timeout: Duration,
) -> crate::Result<redis::aio::ConnectionManager> {
    let client = shard.locator.client(timeout).await?;
    let mut conn =
        crate::cluster::manager(&client, timeout, shard.locator.must_be_master()).await?;
    scripts::load_all(&mut conn).await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|r| r.trim().to_string())
        .ok_or_else(|| crate::Error::Corrupt("INFO server has no run_id".into()))?;
    shard.set_run_id(run_id);
    shard.set_client(client);
    Ok(conn)
}

/// Keeps a shard's command connection: makes it (with backoff while
/// Redis is down), PINGs it every `ping_interval`, and after
/// [`MISSED_PINGS`] unanswered PINGs drops it and makes a new one. Any
/// unanswered PING also marks the node's registration as possibly lost
/// (a Redis that stalls longer than the node TTL has expired its
/// mappings). Ends when the cluster is dropped or the shard retired.
pub(crate) async fn command_link(weak: Weak<Shared>, shard: Arc<Shard>) {
    let mut wait = RETRY_MIN;
    let mut missed = 0u32;
    // Whether the last touch found a partition settling.
    let mut settled_seen = false;
    // Whether a touch succeeded before.
    let mut touched = false;
    let mut outage = Outage::new("redis is unreachable");
    loop {
        if shard.is_retired() {
            return;
        }
        let Some(shared) = weak.upgrade() else { return };
        let timeout = shared.config.command_timeout;
        let pause = match shard.conn() {
            Err(_) => match connect_shard(&shard, timeout).await {
                Ok(conn) => {
                    shard.set_conn(Some(conn));
                    shard.update(|s| {
                        s.connected = true;
                        s.unreachable = false;
                    });
                    shard.registration_lost();
                    outage.recovered(&shared.node, &shard.name);
                    wait = RETRY_MIN;
                    missed = 0;
                    shared.config.ping_interval
                }
                Err(e) => {
                    shard.update(|s| {
                        s.connected = false;
                        s.unreachable = true;
                    });
                    outage.failed(&shared.node, &shard.name, &e);
                    shared.refresh_now.notify_one();
                    let pause = wait;
                    wait = (wait * 2).min(RETRY_MAX);
                    pause
                }
            },
            Ok(mut conn) => {
                // The PING is the touch of the partitions' clocks (see the
                // publish script): it also says whether one is settling.
                let config = &shared.config;
                let calls: Vec<Call> = shared
                    .clock_partitions(&shard)
                    .iter()
                    .map(|&p| {
                        let mut c = Call::new(&scripts::TOUCH);
                        c.key(shared.keys.clock(p))
                            .key(shared.keys.settling(p))
                            .key(shared.keys.master(p))
                            .arg(config.settle_gap().as_millis() as u64)
                            .arg(config.settle_time().as_millis() as u64)
                            .arg(shard.run_id());
                        c
                    })
                    .collect();
                let ping = scripts::run_all(&mut conn, &calls);
                match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(replies)) => {
                        if missed > 0 {
                            shard.update(|s| s.connected = true);
                            outage.recovered(&shared.node, &shard.name);
                        }
                        missed = 0;
                        let settling = replies
                            .iter()
                            .any(|v| matches!(v, redis::Value::Int(ms) if *ms > 0));
                        if settling && !settled_seen {
                            if touched {
                                tracing::warn!(
                                    node = %shared.node,
                                    shard = %shard.name,
                                    "redis was away or restarted: registering again; \
                                     publishes get 503 until every node has"
                                );
                            } else {
                                // A fresh Redis (or a node joining right
                                // after an outage): expected at start.
                                tracing::info!(
                                    node = %shared.node,
                                    shard = %shard.name,
                                    "redis settles: waiting for every node to register"
                                );
                            }
                            shard.registration_lost();
                        }
                        touched = true;
                        settled_seen = settling;
                        shard.update(|s| s.settling = settling);
                    }
                    failed => {
                        missed += 1;
                        shard.update(|s| s.connected = false);
                        shard.registration_lost();
                        let error = match failed {
                            Ok(Err(e)) => {
                                if e.redirect_node().is_some() {
                                    // Redis Cluster moved a slot.
                                    shared.refresh_now.notify_one();
                                }
                                e.to_string()
                            }
                            _ => format!("no answer to PING within {timeout:?}"),
                        };
                        outage.failed(&shared.node, &shard.name, &error);
                        if missed >= MISSED_PINGS {
                            // A new connection: the old one may be half-open.
                            shard.set_conn(None);
                            shared.refresh_now.notify_one();
                            missed = 0;
                        }
                    }
                }
                shared.config.ping_interval
            }
        };
        drop(shared);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shard.touch_now.notified() => {}
        }
    }
}

/// Keeps the node subscribed to a shard's channels (sharded pub/sub),
/// resubscribing after any failure or after [`MISSED_PINGS`] unanswered
/// PINGs on the subscription, and delivers what arrives. Ends when the hub
/// is gone or the shard retired.
pub(crate) async fn subscribe_loop(shared: Arc<Shared>, shard: Arc<Shard>) {
    let mut wait = RETRY_MIN;
    let mut outage = Outage::new("redis subscription is down");
    let channels: Vec<String> = shard
        .partitions
        .iter()
        .flat_map(|&p| {
            [
                shared.keys.node_channel(p, &shared.node),
                shared.keys.all_channel(p),
            ]
        })
        .collect();
    loop {
        if !shared.hub_open() || shard.is_retired() {
            return;
        }
        let error = match shard.client() {
            None => "redis master not found yet".to_string(),
            Some(client) => {
                match subscription(&shared, &shard, client, &channels, &mut outage, &mut wait).await
                {
                    Some(why) => why,
                    None => return,
                }
            }
        };
        shard.update(|s| s.subscribed = false);
        if shard.is_retired() {
            return;
        }
        outage.failed(&shared.node, &shard.name, &error);
        shared.refresh_now.notify_one();
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// One subscription, from connecting until it fails (`Some` with why) or
/// the hub is gone (`None`).
async fn subscription(
    shared: &Arc<Shared>,
    shard: &Arc<Shard>,
    client: redis::Client,
    channels: &[String],
    outage: &mut Outage,
    wait: &mut Duration,
) -> Option<String> {
    use crate::subscriber::{Resp, command, connect, read_value};
    use tokio::io::AsyncWriteExt;
    let timeout = shared.config.command_timeout;
    let ca = shared.config.redis_ca_cert.as_deref();
    let (mut reader, mut writer) = match connect(&client, ca, timeout).await {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    // One SSUBSCRIBE per partition: on Redis Cluster, the channels of one
    // command must be in one slot (a partition's two are).
    let mut subscribe = Vec::new();
    for pair in channels.chunks(2) {
        let mut args = vec!["SSUBSCRIBE"];
        args.extend(pair.iter().map(String::as_str));
        subscribe.extend(command(&args));
    }
    if let Err(e) = writer.write_all(&subscribe).await {
        return Some(format!("redis subscription: {e}"));
    }
    let confirm = async {
        for _ in channels {
            match read_value(&mut reader).await {
                // A MOVED here: Redis Cluster moved the slot meanwhile.
                Ok(Resp::Error(e)) => return Err(format!("redis refused SSUBSCRIBE: {e}")),
                Ok(v) => match v.push() {
                    Some((kind, _)) if kind == "ssubscribe" => {}
                    other => return Err(format!("unexpected answer to SSUBSCRIBE: {other:?}")),
                },
                Err(e) => return Err(format!("redis subscription: {e}")),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout * 2, confirm).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Some(why),
        Err(_) => return Some(format!("subscribing took longer than {:?}", timeout * 2)),
    }
    // Publishes wait for a heartbeat made after this point: Redis may have
    // restarted empty, or expired our mappings.
    shard.registration_lost();
    shard.update(|s| s.subscribed = true);
    outage.recovered(&shared.node, &shard.name);
    tracing::info!(node = %shared.node, shard = %shard.name, "subscribed to redis");
    *wait = RETRY_MIN;
    // The reader runs on: a value is never cut in half by a timeout.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Resp>>(1024);
    let read = tokio::spawn(async move {
        loop {
            let v = read_value(&mut reader).await;
            let end = v.is_err();
            if tx.send(v).await.is_err() || end {
                return;
            }
        }
    });
    let _stop_reading = AbortOnDrop(read);
    let every = shared.config.ping_interval;
    let ping = command(&["PING"]);
    let mut missed = 0u32;
    let mut pinged: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Messages first: what Redis sent before a failure is
            // delivered before the failure is acted on.
            biased;
            v = rx.recv() => {
                let v = match v {
                    Some(Ok(v)) => v,
                    Some(Err(e)) => return Some(format!("redis subscription: {e}")),
                    None => return Some("redis subscription ended".into()),
                };
                match v.push() {
                    Some((kind, items)) if kind == "smessage" => {
                        let Some(Resp::Bulk(Some(payload))) = items.into_iter().nth(1) else {
                            continue;
                        };
                        let node = shared.delivery()?;
                        match crate::broker::parse_message(&payload) {
                            Ok(envelope) => {
                                tracing::trace!(seq = envelope.seq, id = %envelope.id, "from redis");
                                node.deliver_async(&envelope).await?;
                            }
                            Err(e) => {
                                node.drop_invalid(&e);
                            }
                        }
                    }
                    Some((kind, _)) if kind == "pong" => {
                        missed = 0;
                        pinged = None;
                    }
                    Some((kind, _)) if kind == "sunsubscribe" => {
                        return Some("redis ended the subscription (its slots moved)".into());
                    }
                    other => tracing::debug!(?other, "unexpected on the subscription"),
                }
            }
            _ = tick.tick() => {
                shared.delivery()?;
                if shard.is_retired() {
                    return Some("shard retired".into());
                }
                if let Some(at) = pinged {
                    if at.elapsed() < timeout {
                        continue;
                    }
                    missed += 1;
                    if missed >= MISSED_PINGS {
                        return Some(format!("{MISSED_PINGS} PINGs on the subscription unanswered"));
                    }
                }
                let write = tokio::time::timeout(timeout, writer.write_all(&ping));
                match write.await {
                    Ok(Ok(())) => pinged = Some(tokio::time::Instant::now()),
                    Ok(Err(e)) => return Some(format!("redis subscription: {e}")),
                    Err(_) => return Some("redis subscription: writing a PING timed out".into()),
                }
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refreshes liveness and mappings every heartbeat interval, and at once
/// when the registration may have been lost; a failed heartbeat is retried
/// with a short backoff, not at the next tick. Ends when the hub is gone
/// or the shard retired.
pub(crate) async fn heartbeat_loop(shared: Arc<Shared>, shard: Arc<Shard>) {
    use std::sync::atomic::Ordering;
    let mut every = tokio::time::interval(shared.config.heartbeat_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outage = Outage::new("heartbeat to redis fails");
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shard.heartbeat_now.notified() => {}
        }
        let mut wait = RETRY_MIN;
        loop {
            if !shared.hub_open() || shard.is_retired() {
                return;
            }
            let epoch = shard.epoch.load(Ordering::SeqCst);
            match crate::session::heartbeat(&shared, &shard).await {
                Ok(()) if epoch == shard.epoch.load(Ordering::SeqCst) => {
                    shard.update(|s| s.registered = true);
                    outage.recovered(&shared.node, &shard.name);
                    break;
                }
                // Something happened meanwhile that may have lost what it
                // wrote (a resubscription, a failed PING): again, now.
                Ok(()) => continue,
                Err(e) => {
                    shard.update(|s| s.registered = false);
                    // While the shard is not connected, the command link
                    // says so; a heartbeat's failure is no news.
                    if shard.state.borrow().connected {
                        outage.failed(&shared.node, &shard.name, &e);
                    } else {
                        tracing::debug!(node = %shared.node, shard = %shard.name, error = %e, "heartbeat waits for the connection");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shard.heartbeat_now.notified() => {}
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
        every.reset();
    }
}

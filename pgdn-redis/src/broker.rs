//! [`RedisBroker`]: cross-node fan-out through one Lua script and Redis
//! pub/sub, plus the node's background tasks (subscription, heartbeat,
//! cleanup), started when the hub attaches.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pgdn_core::{Broker, Envelope, MessageId, PublishRequest, Published, Target, WeakHub};

use redis::aio::ConnectionManager;

use crate::cluster::{ClusterConfig, Shared};
use crate::error::{Error, Result};
use crate::scripts;

/// Sends publishes to the nodes that need them and delivers what other
/// nodes (and this one) publish. Every node delivers in the order the
/// publish script set, so a user's connections on different nodes see
/// their messages in one order.
#[derive(Clone)]
pub struct RedisBroker {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

/// Refuses a `users` target longer than
/// [`ClusterConfig::max_users_per_publish`]: one publish is one Lua call,
/// and Redis serves no one else meanwhile.
pub(crate) fn check_target(config: &ClusterConfig, target: &Target) -> Result<()> {
    let max = config.max_users_per_publish;
    match target {
        Target::Users(users) if users.len() > max => {
            Err(pgdn_core::Error::InvalidPublish(format!(
                "target users lists {} users, more than the {max} one publish may name \
                 in cluster mode; split it into several publishes",
                users.len()
            ))
            .into())
        }
        _ => Ok(()),
    }
}

/// Runs the publish script for `envelope` with the key prefix and bounds of
/// `config`; `None` for a repeated id. Shared by the broker and the emitter.
pub(crate) async fn publish_envelope(
    conn: &mut ConnectionManager,
    config: &ClusterConfig,
    envelope: &Envelope,
) -> Result<Option<u64>> {
    check_target(config, &envelope.target)?;
    let users = envelope.target.user_recipients();
    let kind = match &envelope.target {
        Target::User(_) | Target::Users(_) => "u",
        _ => "a",
    };
    let target = serde_json::to_string(&envelope.target).expect("targets serialize");
    let history = config.history;
    let mut inv = scripts::PUBLISH.prepare_invoke();
    inv.arg(&config.prefix)
        .arg(envelope.id.as_str())
        .arg(if envelope.chosen_id { "1" } else { "0" })
        .arg(config.dedup_window.as_millis() as u64)
        .arg(history.max_messages)
        .arg(history.max_age.as_millis() as u64)
        .arg(kind)
        .arg(target)
        .arg(&*envelope.origin)
        .arg(envelope.frame.as_ref())
        .arg(config.settle_gap().as_millis() as u64)
        .arg(config.settle_time().as_millis() as u64);
    for u in &users {
        inv.arg(&**u);
    }
    let seq: i64 = inv.invoke_async(conn).await?;
    if seq == -2 {
        return Err(Error::Unavailable(
            "redis is back from an outage; waiting for every node to register again".into(),
        ));
    }
    Ok((seq >= 0).then_some(seq as u64))
}

#[async_trait]
impl Broker for RedisBroker {
    fn attach(&self, hub: WeakHub) {
        if self.shared.hub.set(hub).is_err() {
            tracing::warn!("RedisBroker attached to a second hub; ignoring it");
            return;
        }
        tokio::spawn(crate::link::subscribe_loop(self.shared.clone()));
        tokio::spawn(crate::link::heartbeat_loop(self.shared.clone()));
        tokio::spawn(cleanup_loop(self.shared.clone()));
    }

    async fn publish(&self, envelope: &Envelope) -> pgdn_core::Result<Published> {
        if let Err(why) = self.shared.readiness() {
            return Err(pgdn_core::Error::Broker(format!("{why}; try again")));
        }
        let shared = &self.shared;
        match publish_envelope(&mut shared.conn()?, &shared.config, envelope).await? {
            Some(_) => Ok(Published::Sent),
            None => Ok(Published::Duplicate),
        }
    }

    fn delivers_locally(&self) -> bool {
        true
    }

    fn validate(&self, req: &PublishRequest) -> pgdn_core::Result<()> {
        Ok(check_target(&self.shared.config, &req.target)?)
    }

    fn readiness(&self) -> std::result::Result<(), String> {
        self.shared.readiness().map_err(String::from)
    }
}

/// Parses `seq\norigin\nid\ntarget\nframe` from a channel, and checks
/// that it is a message pgdn could have published ([`Envelope::check`]):
/// anyone who can `PUBLISH` on the channels could have put anything there.
pub(crate) fn parse_message(payload: &[u8]) -> Result<Envelope> {
    let bad = |what: &str| Error::Corrupt(format!("pub/sub message: {what}"));
    let mut parts = payload.splitn(5, |b| *b == b'\n');
    let mut next = |what: &str| parts.next().ok_or_else(|| bad(what));
    let seq = std::str::from_utf8(next("seq")?)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad("seq"))?;
    let origin = std::str::from_utf8(next("origin")?).map_err(|_| bad("origin"))?;
    let id = std::str::from_utf8(next("id")?).map_err(|_| bad("id"))?;
    let target: Target = serde_json::from_slice(next("target")?).map_err(|_| bad("target"))?;
    let frame = next("frame")?;
    let envelope = Envelope {
        id: MessageId::new(id).map_err(|_| bad("id"))?,
        target,
        frame: Bytes::copy_from_slice(frame),
        origin: Arc::from(origin),
        chosen_id: false,
        seq: Some(seq),
    };
    envelope.check()?;
    Ok(envelope)
}

/// Runs a bounded cleanup pass every cleanup interval (with jitter, so
/// that nodes do not all scan at once). Ends when the hub is gone.
async fn cleanup_loop(shared: Arc<Shared>) {
    use rand::Rng;
    let mut cursor = 0u64;
    loop {
        let base = shared.config.cleanup_interval;
        let jitter = rand::rng().random_range(Duration::ZERO..=base / 4);
        tokio::time::sleep(base + jitter).await;
        if shared.hub().is_none() {
            return;
        }
        let Ok(mut conn) = shared.conn() else {
            continue;
        };
        match crate::cleanup::cleanup_pass(
            &mut conn,
            &shared.keys.prefix,
            shared.config.cleanup_batch,
            cursor,
        )
        .await
        {
            Ok(report) => {
                cursor = report.cursor;
                if report.mappings_removed > 0 || report.nodes_removed > 0 {
                    tracing::info!(?report, "cleanup pass");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cleanup pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel_messages() {
        let frame = r#"{"id":"m1","type":"info","payload":{"x":"a\nb"},"timestamp":"t"}"#;
        let e = parse_message(format!("42\nnode-a\nm1\n{{\"user\":\"u1\"}}\n{frame}").as_bytes())
            .unwrap();
        assert_eq!(e.seq, Some(42));
        assert_eq!(&*e.origin, "node-a");
        assert_eq!(e.id.as_str(), "m1");
        assert_eq!(e.target, Target::user("u1"));
        assert_eq!(&e.frame[..], frame.as_bytes());
        assert!(parse_message(b"x\ny").is_err());
        assert!(parse_message(b"1\nn\nm1\n{\"user\":\"u1\"}\nnot a frame").is_err());
        assert!(parse_message(b"1\nn\nm1\n{\"user\":\"u1\"}\n\xff").is_err());
    }
}

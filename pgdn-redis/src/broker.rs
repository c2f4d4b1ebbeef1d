//! [`RedisBroker`]: cross-node fan-out through one Lua script and Redis
//! pub/sub, plus the node's background tasks (subscription, heartbeat,
//! cleanup), started when the hub starts it ([`Broker::start`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pgdn_core::{Broker, Delivery, Envelope, MessageId, PublishRequest, Published, Target};

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

/// One partition's part of a publish.
struct Part<'a> {
    partition: u16,
    kind: &'static str,
    target: String,
    /// The group, or the partition's target users.
    names: Vec<&'a str>,
}

/// Publishes `envelope`: one publish script per partition it touches (a
/// `users` target spanning partitions is split, each part carrying only
/// its partition's users), sent as one pipeline per shard. `None` when
/// every part was a repeated id, else whether any node holds a target. A frame for users in several partitions
/// is stored once, beforehand, in the partition of its id. Shared by the
/// broker and the emitter.
pub(crate) async fn publish_envelope(shared: &Shared, envelope: &Envelope) -> Result<Option<bool>> {
    let config = &shared.config;
    let keys = &shared.keys;
    check_target(config, &envelope.target)?;
    let id = envelope.id.as_str();
    let whole = || serde_json::to_string(&envelope.target).expect("targets serialize");
    let parts: Vec<Part<'_>> = match &envelope.target {
        Target::Group(g) => vec![Part {
            partition: keys.partition(g),
            kind: "g",
            target: whole(),
            names: vec![&**g],
        }],
        Target::User(u) => vec![Part {
            partition: keys.partition(u),
            kind: "u",
            target: whole(),
            names: vec![&**u],
        }],
        Target::Users(users) => {
            let mut by: std::collections::BTreeMap<u16, Vec<&str>> = Default::default();
            for u in users {
                let list = by.entry(keys.partition(u)).or_default();
                if !list.contains(&&**u) {
                    list.push(u);
                }
            }
            let split = by.len() > 1;
            by.into_iter()
                .map(|(partition, names)| Part {
                    partition,
                    kind: "u",
                    target: if split {
                        serde_json::to_string(&Target::users(names.iter().copied()))
                            .expect("targets serialize")
                    } else {
                        whole()
                    },
                    names,
                })
                .collect()
        }
        _ => vec![Part {
            partition: keys.partition(id),
            kind: "b",
            target: whole(),
            names: Vec::new(),
        }],
    };
    let history = config.history;
    let age = history.max_age.as_millis() as u64;
    let topology = shared.topology()?;
    // Where the frame of a user message is kept: with the part when there
    // is one, else once, in the id's partition, before any part runs.
    let frame_at = if parts.len() > 1 {
        let q = keys.partition(id);
        if history.max_messages > 0 {
            let _: () = redis::cmd("SET")
                .arg(keys.message(q, id))
                .arg(envelope.frame.as_ref())
                .arg("PX")
                .arg(age.max(1))
                .query_async(&mut topology.shard(q).conn()?)
                .await?;
        }
        q
    } else {
        parts[0].partition
    };
    let id_ttl = config.dedup_window.max(history.max_age).as_millis() as u64;
    let mut by_shard: Vec<Vec<scripts::Call>> = vec![Vec::new(); topology.shards.len()];
    for part in &parts {
        let p = part.partition;
        let clock = shared.clock_partition(&topology, p);
        let store_here = part.kind == "u" && parts.len() == 1;
        let mut c = scripts::Call::new(&scripts::PUBLISH);
        c.key(keys.id(p, id))
            .key(keys.seq(p))
            .key(keys.clock(clock))
            .key(keys.settling(clock))
            .key(keys.master(clock));
        match part.kind {
            "g" => {
                c.key(keys.group(part.names[0]));
            }
            "u" => {
                if store_here {
                    c.key(keys.message(p, id));
                }
                for u in &part.names {
                    c.key(keys.history(u))
                        .key(keys.history_evicted(u))
                        .key(keys.user(u));
                }
            }
            _ => {}
        }
        c.arg(keys.part(p))
            .arg(id)
            .arg(if envelope.chosen_id { "1" } else { "0" })
            .arg(id_ttl.max(1))
            .arg(history.max_messages)
            .arg(age)
            .arg(part.kind)
            .arg(&part.target)
            .arg(&*envelope.origin)
            .arg(envelope.frame.as_ref())
            .arg(config.settle_gap().as_millis() as u64)
            .arg(config.settle_time().as_millis() as u64)
            .arg(p)
            .arg(frame_at)
            .arg(if store_here { "1" } else { "0" })
            .arg(topology.shards[topology.owner[p as usize]].run_id());
        by_shard[topology.owner[p as usize]].push(c);
    }
    let mut sent = false;
    let mut routed = false;
    let mut settling = false;
    let mut counter = None;
    for (i, calls) in by_shard.iter().enumerate() {
        if calls.is_empty() {
            continue;
        }
        let mut conn = topology.shards[i].conn()?;
        let replies = scripts::run_all(&mut conn, calls).await.inspect_err(|e| {
            if e.redirect_node().is_some() {
                shared.refresh_now.notify_one();
            }
        })?;
        for r in replies {
            match r {
                redis::Value::Int(-2) => settling = true,
                redis::Value::Int(-1) => {}
                redis::Value::Array(v) => {
                    sent = true;
                    if let Some(redis::Value::Int(c)) = v.first() {
                        counter = Some(*c);
                    }
                    routed |= !matches!(v.get(1), Some(redis::Value::Int(0)));
                }
                other => {
                    return Err(Error::Corrupt(format!(
                        "the publish script answered {other:?}"
                    )));
                }
            }
        }
    }
    // A group message's id is also kept in the partition of the id, where
    // a resume from it looks (as for a broadcast, which runs there).
    if let (Target::Group(_), Some(c)) = (&envelope.target, counter) {
        let q = keys.partition(id);
        if q != parts[0].partition {
            let _: () = redis::cmd("SET")
                .arg(keys.id(q, id))
                .arg(c)
                .arg("PX")
                .arg(id_ttl.max(1))
                .query_async(&mut topology.shard(q).conn()?)
                .await?;
        }
    }
    if settling {
        return Err(Error::Unavailable(
            "redis is back from an outage; waiting for every node to register again".into(),
        ));
    }
    Ok(sent.then_some(routed))
}

#[async_trait]
impl Broker for RedisBroker {
    fn start(&self, node: Delivery) {
        if self.shared.node_delivery.set(node).is_err() {
            tracing::warn!("RedisBroker started by a second hub; ignoring it");
            return;
        }
        if let Ok(topology) = self.shared.topology() {
            for shard in &topology.shards {
                self.shared.start_node_tasks(shard);
            }
        }
        tokio::spawn(cleanup_loop(self.shared.clone()));
    }

    async fn publish(&self, envelope: &Envelope) -> pgdn_core::Result<Published> {
        if let Err(why) = self.shared.readiness() {
            return Err(pgdn_core::Error::Broker(format!("{why}; try again")));
        }
        match publish_envelope(&self.shared, envelope).await? {
            Some(true) => Ok(Published::Sent),
            Some(false) => Ok(Published::Unrouted),
            None => Ok(Published::Duplicate),
        }
    }

    fn validate(&self, req: &PublishRequest) -> pgdn_core::Result<()> {
        Ok(check_target(&self.shared.config, &req.target)?)
    }

    fn readiness(&self) -> std::result::Result<(), String> {
        self.shared.readiness().map_err(String::from)
    }
}

/// Parses `counter:partition\norigin\nid\ntarget\nframe` from a channel
/// (the number is [`keys::seq`](crate::keys::seq) of the two), and checks
/// that it is a message pgdn could have published ([`Envelope::check`]):
/// anyone who can `PUBLISH` on the channels could have put anything there.
pub(crate) fn parse_message(payload: &[u8]) -> Result<Envelope> {
    let bad = |what: &str| Error::Corrupt(format!("pub/sub message: {what}"));
    let mut parts = payload.splitn(5, |b| *b == b'\n');
    let mut next = |what: &str| parts.next().ok_or_else(|| bad(what));
    let seq = std::str::from_utf8(next("seq")?)
        .ok()
        .and_then(|s| s.split_once(':'))
        .and_then(|(c, p)| Some(crate::keys::seq(c.parse().ok()?, p.parse().ok()?)))
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

/// Runs a bounded cleanup pass on every shard every cleanup interval
/// (with jitter, so that nodes do not all scan at once). Ends when the hub
/// is gone.
async fn cleanup_loop(shared: Arc<Shared>) {
    use rand::Rng;
    let mut cursors: std::collections::HashMap<String, u64> = Default::default();
    loop {
        let base = shared.config.cleanup_interval;
        let jitter = rand::rng().random_range(Duration::ZERO..=base / 4);
        tokio::time::sleep(base + jitter).await;
        if !shared.hub_open() {
            return;
        }
        match crate::cleanup::cleanup_shards(&shared, shared.config.cleanup_batch, &mut cursors)
            .await
        {
            Ok(report) => {
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
        let e = parse_message(format!("42:3\nnode-a\nm1\n{{\"user\":\"u1\"}}\n{frame}").as_bytes())
            .unwrap();
        assert_eq!(e.seq, Some(crate::keys::seq(42, 3)));
        assert_eq!(&*e.origin, "node-a");
        assert_eq!(e.id.as_str(), "m1");
        assert_eq!(e.target, Target::user("u1"));
        assert_eq!(&e.frame[..], frame.as_bytes());
        assert!(parse_message(b"x\ny").is_err());
        assert!(parse_message(b"1:0\nn\nm1\n{\"user\":\"u1\"}\nnot a frame").is_err());
        assert!(parse_message(b"1:0\nn\nm1\n{\"user\":\"u1\"}\n\xff").is_err());
        assert!(parse_message(b"1\nn\nm1\n{\"user\":\"u1\"}\n{}").is_err());
    }
}

//! Redis Cluster: which master holds each partition, and following it when
//! slots move (a failover, a resharding).
//!
//! [`slot_watch`] asks the cluster (`CLUSTER SLOTS`, from the seed URLs or
//! any master it knows) every [`CHECK_EVERY`] and at once when a shard
//! fails or answers `MOVED`; when the owner of a partition's slot changed,
//! it installs a new [`Topology`]: shards whose partitions did not change
//! keep their links, the others are retired and new ones start (they are
//! not ready, and the node answers 503, until they are connected,
//! subscribed and registered).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::cluster::Shared;
use crate::error::{Error, Result};
use crate::shard::{Locator, Shard, Topology, slot};

/// How often the slots are checked when nothing failed.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Master address -> the partitions it holds.
type Owners = BTreeMap<String, Vec<u16>>;

/// Parses `CLUSTER SLOTS` into, for every slot range, its master's
/// `host:port`.
fn parse_slots(reply: &[redis::Value]) -> Vec<(u16, u16, String)> {
    use redis::Value;
    let mut out = Vec::new();
    for range in reply {
        let Value::Array(r) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (r.first(), r.get(1), r.get(2))
        else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        out.push((*start as u16, *end as u16, format!("{host}:{port}")));
    }
    out
}

/// Asks `url` for the slots, and maps every partition to its master.
async fn owners(shared: &Shared, url: &str) -> Result<Owners> {
    let timeout = shared.config.command_timeout;
    let client = crate::tls::client(url, shared.config.redis_ca_cert.as_deref())?;
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
    };
    let reply = tokio::time::timeout(timeout, ask).await.map_err(|_| {
        Error::Unavailable(format!("{} did not answer in time", crate::redacted(url)))
    })??;
    let ranges = parse_slots(&reply);
    let mut out = Owners::new();
    for p in 0..shared.keys.partitions {
        let s = slot(&p.to_string());
        let Some((_, _, master)) = ranges.iter().find(|(a, b, _)| (*a..=*b).contains(&s)) else {
            return Err(Error::Unavailable(format!(
                "redis cluster: no master serves slot {s} (partition {p})"
            )));
        };
        out.entry(master.clone()).or_default().push(p);
    }
    Ok(out)
}

/// The URL of a master at `addr`, with the scheme and credentials of the
/// first seed.
fn url_for(seed: &str, addr: &str) -> String {
    let (scheme, rest) = seed.split_once("://").unwrap_or(("redis", seed));
    let userinfo = rest
        .split('/')
        .next()
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}")
}

/// Keeps the node's topology in step with the cluster's slots. Ends when
/// the cluster is dropped.
pub(crate) async fn slot_watch(weak: Weak<Shared>) {
    let mut outage = crate::link::Outage::new("cannot read the redis cluster's slots");
    let mut wait = crate::link::RETRY_MIN;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        // Seeds first, then the masters known now (the seeds may be gone).
        let mut urls = shared.seeds.clone();
        if let Ok(t) = shared.topology() {
            for s in &t.shards {
                urls.push(url_for(&shared.seeds[0], &s.name));
            }
        }
        let mut found = None;
        let mut last_error = None;
        for url in &urls {
            match owners(&shared, url).await {
                Ok(o) => {
                    found = Some(o);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let pause = match found {
            Some(owners) => {
                outage.recovered(&shared.node, "cluster");
                wait = crate::link::RETRY_MIN;
                apply(&shared, owners);
                CHECK_EVERY
            }
            None => {
                let e = last_error.unwrap_or_else(|| Error::Config("no seed URL".into()));
                outage.failed(&shared.node, "cluster", &e);
                let pause = wait;
                wait = (wait * 2).min(crate::link::RETRY_MAX);
                pause
            }
        };
        let refresh = async {
            shared.refresh_now.notified().await;
            // A burst of failures is one check.
            tokio::time::sleep(crate::link::RETRY_MIN).await;
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = refresh => {}
        }
    }
}

/// Installs the topology of `owners` if it differs from the current one.
fn apply(shared: &Arc<Shared>, owners: Owners) {
    let current = shared.topology().ok();
    let same = current.as_ref().is_some_and(|t| {
        t.shards.len() == owners.len()
            && t.shards
                .iter()
                .all(|s| owners.get(&s.name) == Some(&s.partitions))
    });
    if same {
        return;
    }
    let mut shards = Vec::new();
    for (addr, partitions) in owners {
        let kept = current.as_ref().and_then(|t| {
            t.shards
                .iter()
                .find(|s| s.name == addr && s.partitions == partitions)
                .cloned()
        });
        let shard = match kept {
            Some(s) => s,
            None => {
                let url = url_for(&shared.seeds[0], &addr);
                match crate::tls::client(&url, shared.config.redis_ca_cert.as_deref()) {
                    Ok(client) => Arc::new(Shard::new(
                        addr,
                        Locator::Fixed(client),
                        partitions,
                        shared.changed.clone(),
                    )),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot use redis cluster master {addr}");
                        return;
                    }
                }
            }
        };
        shards.push(shard);
    }
    tracing::info!(
        node = %shared.node,
        masters = ?shards.iter().map(|s| (&s.name, s.partitions.len())).collect::<Vec<_>>(),
        "redis cluster slots (partitions per master)"
    );
    shared.install(Topology::new(shards, shared.keys.partitions));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_urls_keep_scheme_and_credentials() {
        assert_eq!(
            url_for("rediss://u:p@seed:7000/0", "10.0.0.2:7001"),
            "rediss://u:p@10.0.0.2:7001"
        );
        assert_eq!(url_for("redis://seed:7000", "h:1"), "redis://h:1");
    }
}

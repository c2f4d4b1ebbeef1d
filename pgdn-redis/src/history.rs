//! [`RedisHistory`]: per-user windows in Redis, shared by all nodes, so a
//! subscriber that reconnects to another node resumes without loss
//! (docs/protocol.md section 4).
//!
//! The publish script writes them and maps every message id to its
//! partition's counter (`{p}:id:{id}`, kept as long as the age bound and
//! the de-duplication window), so `record` has nothing to do. A user
//! message's frame is stored once (`{q}:msg:{id}`, expiring with the age
//! bound), however many users it is for; each user's window
//! (`{p}:hist:{user}`, a sorted set scored by the partition's counter,
//! trimmed to the count bound, expiring with the age bound) holds
//! `counter:ms:q:id` references, resolved on replay. A 100 KiB frame to
//! 200 users adds about 100 KiB to Redis, not 20 MiB.
//!
//! Counters follow Redis's clock in µs and always grow, so the counter of
//! a broadcast or group message (kept in the partition of its id) places a
//! resume in any user's window.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pgdn_core::{History, HistoryRecord, Replay};

use crate::cluster::Shared;
use crate::error::Error;
use crate::scripts::{self, Call};

/// Resume history in Redis. Created by
/// [`Cluster::history`](crate::Cluster::history).
#[derive(Clone)]
pub struct RedisHistory {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHistory").finish_non_exhaustive()
    }
}

/// Splits a window entry `counter:ms:q:id`: the counter, and the frame's
/// partition and id.
fn parse_entry(entry: &[u8]) -> Option<(u64, u16, String)> {
    let entry = std::str::from_utf8(entry).ok()?;
    let mut parts = entry.splitn(4, ':');
    let counter = parts.next()?.parse().ok()?;
    let _ms = parts.next()?;
    let q = parts.next()?.parse().ok()?;
    Some((counter, q, parts.next()?.to_string()))
}

#[async_trait]
impl History for RedisHistory {
    fn record(&self, _record: &HistoryRecord<'_>) {
        // Recorded by the publish script, atomically with numbering.
    }

    async fn replay(&self, user_id: &str, since: &str) -> pgdn_core::Result<Replay> {
        let shared = &self.shared;
        let keys = &shared.keys;
        let topology = shared.topology()?;
        let p = keys.partition(user_id);
        let mut conn = topology.shard(p).conn()?;
        let age = shared.config.history.max_age.as_millis() as u64;
        let ask = |since_counter: String| {
            let mut c = Call::new(&scripts::REPLAY);
            c.key(keys.history(user_id))
                .key(keys.history_evicted(user_id))
                .key(keys.id(p, since))
                .arg(since_counter)
                .arg(age);
            c
        };
        let mut reply: Vec<redis::Value> = scripts::run(&mut conn, &ask(String::new()))
            .await
            .map_err(Error::from)?;
        if matches!(reply.first(), Some(redis::Value::Int(2))) {
            // Not a message to this user: a broadcast's or a group's id,
            // kept in the partition of the id. Numbers of all partitions
            // follow Redis's clock, so it places the resume in this
            // user's window (exactly on one Redis; across shards, to
            // within their clocks' skew).
            let q = keys.partition(since);
            let found: Option<String> = redis::cmd("GET")
                .arg(keys.id(q, since))
                .query_async(&mut topology.shard(q).conn()?)
                .await
                .map_err(Error::from)?;
            let since_counter = found.unwrap_or_else(|| "none".into());
            reply = scripts::run(&mut conn, &ask(since_counter))
                .await
                .map_err(Error::from)?;
        }
        let mut items = reply.into_iter();
        let gap = matches!(items.next(), Some(redis::Value::Int(1)));
        let mut entries = Vec::new();
        for item in items {
            let redis::Value::BulkString(bytes) = item else {
                return Err(Error::Corrupt("history entry is not a string".into()).into());
            };
            let entry = parse_entry(&bytes)
                .ok_or_else(|| Error::Corrupt("history entry is not counter:ms:q:id".into()))?;
            entries.push(entry);
        }
        // The frames the references point to: one pipeline per shard.
        let mut frames: Vec<Option<Bytes>> = vec![None; entries.len()];
        for (i, shard) in topology.shards.iter().enumerate() {
            let wanted: Vec<usize> = (0..entries.len())
                .filter(|&e| topology.owner[entries[e].1 as usize] == i)
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for &e in &wanted {
                pipe.get(keys.message(entries[e].1, &entries[e].2));
            }
            let got: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut shard.conn()?)
                .await
                .map_err(Error::from)?;
            for (e, frame) in wanted.into_iter().zip(got) {
                frames[e] = frame.map(Bytes::from);
            }
        }
        let frames = entries
            .iter()
            .zip(frames)
            // None: it aged out since the script ran.
            .filter_map(|((counter, _, _), f)| Some((crate::keys::seq(*counter, p), f?)))
            .collect();
        Ok(Replay { gap, frames })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries() {
        assert_eq!(
            parse_entry(b"17:1795837363000:5:a:b"),
            Some((17, 5, "a:b".to_string()))
        );
        assert!(parse_entry(b"x:1:2:y").is_none());
        assert!(parse_entry(b"17:1").is_none());
    }
}

//! [`RedisHistory`]: per-user windows in Redis, shared by all nodes, so a
//! subscriber that reconnects to another node resumes without loss
//! (docs/protocol.md section 4).
//!
//! The publish script writes them and maps every message id to its number
//! (`ids:{minute}` hashes, kept as long as the age bound), so `record` has
//! nothing to do. A user message's frame is stored once (`msg:{seq}`,
//! expiring with the age bound), however many users it is for; each
//! user's window (`hist:{user}`, a sorted set scored by the cluster-wide
//! sequence number, trimmed to the count bound, expiring with the age
//! bound) holds `seq:ms` references, resolved on replay. A 100 KiB frame
//! to 200 users adds about 100 KiB to Redis, not 20 MiB.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pgdn_core::{History, HistoryRecord, Replay};

use crate::cluster::Shared;
use crate::error::Error;
use crate::scripts;

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

/// Splits a window entry: `seq:ms`, a reference to `msg:{seq}`, or
/// `seq:ms:frame`, the frame itself (as written before frames were stored
/// once).
fn parse_entry(entry: &[u8]) -> Option<(u64, Option<Bytes>)> {
    let mut parts = entry.splitn(3, |b| *b == b':');
    let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let _ms = parts.next()?;
    Some((seq, parts.next().map(Bytes::copy_from_slice)))
}

#[async_trait]
impl History for RedisHistory {
    fn record(&self, _record: &HistoryRecord<'_>) {
        // Recorded by the publish script, atomically with numbering.
    }

    async fn replay(&self, user_id: &str, since: &str) -> pgdn_core::Result<Replay> {
        let keys = &self.shared.keys;
        let mut conn = self.shared.conn()?;
        let reply: Vec<redis::Value> = scripts::REPLAY
            .prepare_invoke()
            .key(keys.history(user_id))
            .key(keys.history_evicted(user_id))
            .arg(&keys.prefix)
            .arg(since)
            .arg(self.shared.config.history.max_age.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(Error::from)?;
        let mut items = reply.into_iter();
        let gap = matches!(items.next(), Some(redis::Value::Int(1)));
        let mut entries = Vec::new();
        for item in items {
            let redis::Value::BulkString(bytes) = item else {
                return Err(Error::Corrupt("history entry is not a string".into()).into());
            };
            let entry = parse_entry(&bytes)
                .ok_or_else(|| Error::Corrupt("history entry is not seq:ms".into()))?;
            entries.push(entry);
        }
        // The frames the references point to, in one round trip.
        let wanted: Vec<String> = entries
            .iter()
            .filter(|(_, frame)| frame.is_none())
            .map(|(seq, _)| keys.message(*seq))
            .collect();
        let mut fetched = if wanted.is_empty() {
            Vec::new()
        } else {
            redis::cmd("MGET")
                .arg(&wanted)
                .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                .await
                .map_err(Error::from)?
        }
        .into_iter();
        let mut frames = Vec::with_capacity(entries.len());
        for (seq, frame) in entries {
            let frame = match frame {
                Some(f) => Some(f),
                // None: it aged out since the script ran.
                None => fetched.next().flatten().map(Bytes::from),
            };
            if let Some(f) = frame {
                frames.push((seq, f));
            }
        }
        Ok(Replay { gap, frames })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries() {
        assert_eq!(parse_entry(b"17:1795837363000"), Some((17, None)));
        let (seq, frame) = parse_entry(br#"17:1795837363000:{"a":"b:c"}"#).unwrap();
        assert_eq!(seq, 17);
        assert_eq!(&frame.unwrap()[..], br#"{"a":"b:c"}"#);
        assert!(parse_entry(b"x:1:y").is_none());
        assert!(parse_entry(b"17").is_none());
    }
}

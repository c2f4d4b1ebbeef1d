//! [`RedisHistory`]: per-user windows in Redis, shared by all nodes, so a
//! subscriber that reconnects to another node resumes without loss
//! (PROTOCOL.md section 4).
//!
//! The publish script writes them (`hist:{user}`, a sorted set scored by the
//! cluster-wide sequence number, trimmed to the count bound, expiring with
//! the age bound) and maps every message id to its number (`ids:{minute}`
//! hashes, kept as long as the age bound), so `record` has nothing to do.

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

/// Splits a stored entry `seq:ms:frame`.
fn parse_entry(entry: &[u8]) -> Option<(u64, Bytes)> {
    let mut parts = entry.splitn(3, |b| *b == b':');
    let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let _ms = parts.next()?;
    Some((seq, Bytes::copy_from_slice(parts.next()?)))
}

#[async_trait]
impl History for RedisHistory {
    fn record(&self, _record: &HistoryRecord<'_>) {
        // Recorded by the publish script, atomically with numbering.
    }

    async fn replay(&self, user_id: &str, since: &str) -> pgdn_core::Result<Replay> {
        let reply: Vec<redis::Value> = scripts::REPLAY
            .prepare_invoke()
            .arg(&self.shared.keys.prefix)
            .arg(user_id)
            .arg(since)
            .arg(self.shared.config.history.max_age.as_millis() as u64)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(Error::from)?;
        let mut items = reply.into_iter();
        let gap = matches!(items.next(), Some(redis::Value::Int(1)));
        let mut frames = Vec::new();
        for item in items {
            let redis::Value::BulkString(bytes) = item else {
                return Err(Error::Corrupt("history entry is not a string".into()).into());
            };
            let entry = parse_entry(&bytes)
                .ok_or_else(|| Error::Corrupt("history entry is not seq:ms:frame".into()))?;
            frames.push(entry);
        }
        Ok(Replay { gap, frames })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries() {
        let (seq, frame) = parse_entry(br#"17:1795837363000:{"a":"b:c"}"#).unwrap();
        assert_eq!(seq, 17);
        assert_eq!(&frame[..], br#"{"a":"b:c"}"#);
        assert!(parse_entry(b"x:1:y").is_none());
    }
}

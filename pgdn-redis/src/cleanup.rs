//! Removing what dead nodes left behind, with SCAN (never KEYS) and bounded
//! work per pass. Every node runs a pass periodically; `pgdn-server cleanup
//! --redis-url ...` runs a full one from the command line (what pgdn-ws
//! leaves to a hand-written Celery job).

use redis::AsyncCommands;
use redis::aio::ConnectionLike;

use crate::error::Result;
use crate::keys::Keys;
use crate::scripts;

/// What a cleanup pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupReport {
    /// Where the next pass continues the SCAN; 0 once a full cycle ended.
    pub cursor: u64,
    /// User keys looked at.
    pub keys_scanned: usize,
    /// Stale user -> node mappings removed.
    pub mappings_removed: usize,
    /// Dead nodes whose bookkeeping was removed.
    pub nodes_removed: usize,
}

/// One bounded pass: forgets dead nodes (no liveness key), then scans at
/// most about `batch` user keys from `cursor` and removes their mappings
/// that expired or point to a dead node.
pub async fn cleanup_pass<C>(
    conn: &mut C,
    prefix: &str,
    batch: usize,
    cursor: u64,
) -> Result<CleanupReport>
where
    C: ConnectionLike + Send + Sync,
{
    let keys = Keys::new(prefix);
    let mut report = CleanupReport::default();
    let nodes: Vec<String> = conn.smembers(keys.nodes()).await?;
    for node in nodes {
        let alive: bool = conn.exists(keys.alive(&node)).await?;
        if !alive {
            let _: () = redis::pipe()
                .del(keys.node_conns(&node))
                .del(keys.node_groups(&node))
                .srem(keys.nodes(), &node)
                .query_async(conn)
                .await?;
            report.nodes_removed += 1;
        }
    }
    let mut cursor = cursor;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys.user_pattern())
            .arg("COUNT")
            .arg(100)
            .query_async(conn)
            .await?;
        if !found.is_empty() {
            let mut inv = scripts::CLEAN_USERS.prepare_invoke();
            for k in &found {
                inv.key(k);
            }
            let removed: i64 = inv.arg(prefix).invoke_async(conn).await?;
            report.mappings_removed += removed.max(0) as usize;
            report.keys_scanned += found.len();
        }
        cursor = next;
        if cursor == 0 || report.keys_scanned >= batch {
            break;
        }
    }
    report.cursor = cursor;
    Ok(report)
}

/// Full cleanup: passes until the SCAN has gone round once. For the
/// command line.
pub async fn cleanup_all(url: &str, prefix: &str) -> Result<CleanupReport> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut total = CleanupReport::default();
    let mut cursor = 0;
    loop {
        let r = cleanup_pass(&mut conn, prefix, 1000, cursor).await?;
        total.keys_scanned += r.keys_scanned;
        total.mappings_removed += r.mappings_removed;
        total.nodes_removed += r.nodes_removed;
        cursor = r.cursor;
        if cursor == 0 {
            return Ok(total);
        }
    }
}

//! The Lua scripts. Each runs atomically in Redis, on the shard of one
//! partition: every key it touches is declared in `KEYS` and carries that
//! partition's hash tag ([`Keys`](crate::keys::Keys)), so the same scripts
//! run on one Redis, on independent shards and on Redis Cluster. They take
//! the time from Redis (`TIME`), so that expiry decisions do not depend on
//! the clocks of the nodes.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, RedisResult, Script, ToRedisArgs};

/// One call of a script, built like a [`redis::ScriptInvocation`] but
/// sendable in a pipeline (redis-rs pipelines take no scripts): the node
/// sends one pipeline per shard for what spans partitions (a heartbeat,
/// the clocks' touch, a publish to users in several partitions).
#[derive(Clone)]
pub(crate) struct Call {
    script: &'static Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Call {
    pub(crate) fn new(script: &'static LazyLock<Script>) -> Call {
        Call {
            script: LazyLock::force(script),
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    pub(crate) fn key(&mut self, key: String) -> &mut Self {
        self.keys.push(key);
        self
    }

    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn cmd(&self) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            c.arg(k);
        }
        for a in &self.args {
            c.arg(a.as_slice());
        }
        c
    }
}

fn noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Loads every script (a new connection, a Redis that restarted or a
/// replica that took over knows none).
pub(crate) async fn load_all(conn: &mut (impl ConnectionLike + Send)) -> RedisResult<()> {
    for s in [
        &PUBLISH,
        &TOUCH,
        &USER,
        &MEMBER,
        &HEARTBEAT_USERS,
        &HEARTBEAT_GROUPS,
        &SWEEP,
        &GONE,
        &ALIVE,
        &REPLAY,
        &CLEAN,
        &FORGET,
        &LIVE,
    ] {
        s.prepare_invoke().load_async(conn).await?;
    }
    Ok(())
}

/// Runs one call (loading the scripts if Redis does not know them).
pub(crate) async fn run<T: FromRedisValue>(
    conn: &mut (impl ConnectionLike + Send),
    call: &Call,
) -> RedisResult<T> {
    match call.cmd().query_async(conn).await {
        Err(e) if noscript(&e) => {
            load_all(conn).await?;
            call.cmd().query_async(conn).await
        }
        other => other,
    }
}

/// Runs calls in one pipeline, in order (loading the scripts if Redis does
/// not know them, then running them all again: every script is safe to
/// repeat). Fails on the first call that fails.
pub(crate) async fn run_all(
    conn: &mut (impl ConnectionLike + Send),
    calls: &[Call],
) -> RedisResult<Vec<redis::Value>> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let pipe = || {
        let mut p = redis::pipe();
        for c in calls {
            p.add_command(c.cmd());
        }
        p
    };
    match pipe().query_async(conn).await {
        Err(e) if noscript(&e) => {
            load_all(conn).await?;
            pipe().query_async(conn).await
        }
        other => other,
    }
}

/// The partition's clock, run first by [`PUBLISH`] and [`TOUCH`] with the
/// clock, the settling mark and the master mark (`ck`, `sk`, `mk`), `now`
/// (ms, Redis clock), `gap` and `settle` (ms) and `rid` (the run id of the
/// master the caller is connected to) defined. The clock holds when a node
/// last reached this partition's Redis, the master mark which master it
/// was. If the clock is missing (Redis restarted empty), older than `gap`
/// (Redis stalled, or was away, long enough for nodes' mappings to expire)
/// or set on another master (a replica took over after a failover, with
/// the writes replication had not yet carried lost, or Redis Cluster moved
/// the slot), the partition is *settling* for `settle` ms: long enough for
/// every live node to notice and register its sessions again.
/// Publishes are refused meanwhile: one could be routed by mappings not
/// yet rewritten, answered 200 and reach nobody. Leaves `settling` = the
/// ms left.
const CLOCK: &str = r#"
local last = tonumber(redis.call('GET', ck))
local moved = redis.call('GET', mk) ~= rid
if (not last) or now - last > gap or moved then
  redis.call('SET', sk, '1', 'PX', settle)
end
redis.call('SET', ck, now)
if moved then
  redis.call('SET', mk, rid)
end
local settling = redis.call('PTTL', sk)
"#;

/// Reads Redis's clock: `now` in ms and `now_us` in µs.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
"#;

/// Publishes one message in one partition.
///
/// KEYS: the id's key, the partition's counter, clock, settling mark,
/// master mark; then for a group message the group's map; for a user message the frame
/// key when the frame is stored here (ARGV[15] = 1), then for each target
/// user of the partition its window, eviction mark and map.
///
/// ARGV: the partition's key prefix (`pgdn:{p}:`), id, chosen (1/0,
/// informational: every id is claimed once),
/// id_ttl_ms, hist_max, hist_age_ms, kind (`b` broadcast / `g` group / `u`
/// users), target JSON, origin, frame, gap_ms, settle_ms, partition,
/// partition holding the frame, store-frame-here (1/0), the master's run
/// id.
///
/// Returns `{counter, routed}`: the message's counter in the partition
/// (which follows Redis's clock in µs and always grows) and how many nodes
/// it was sent to (0: no node holds a target); or -1 for a repeated
/// publisher id, or -2
/// while the partition is settling after a Redis outage ([`CLOCK`];
/// nothing is written then, not even the id's claim, so a retry is
/// published).
///
/// A user message's window entries are `counter:ms:q:id` references to
/// the frame in `pgdn:{q}:msg:{id}`, stored once for all its users; the
/// work is linear in the users, which
/// [`ClusterConfig::max_users_per_publish`](crate::ClusterConfig::max_users_per_publish)
/// bounds.
pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local part, id = ARGV[1], ARGV[2]
{NOW}
local ck, sk, mk, rid = KEYS[3], KEYS[4], KEYS[5], ARGV[16]
local gap, settle = tonumber(ARGV[11]), tonumber(ARGV[12])
{CLOCK}
if settling > 0 then
  return -2
end
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local c = now_us
if c <= prev then c = prev + 1 end
local cs = string.format('%.0f', c)
-- Generated ids are unique, so a taken one is this very publish, run
-- again (a retried pipeline): a duplicate too.
if not redis.call('SET', KEYS[1], cs, 'NX', 'PX', ARGV[4]) then
  return -1
end
redis.call('SET', KEYS[2], cs)
local msg = cs .. ':' .. ARGV[13] .. '\n' .. ARGV[9] .. '\n' .. id .. '\n' .. ARGV[8] .. '\n' .. ARGV[10]
local kind = ARGV[7]
if kind == 'b' then
  return {{c, redis.call('SPUBLISH', part .. 'all', msg)}}
end
local nodes = {{}}
if kind == 'g' then
  local m = redis.call('HGETALL', KEYS[6])
  for j = 1, #m, 2 do
    if tonumber(m[j + 1]) > now then nodes[m[j]] = true end
  end
else
  local max, age = tonumber(ARGV[5]), tonumber(ARGV[6])
  local first = 6
  if ARGV[15] == '1' then
    if max > 0 then redis.call('SET', KEYS[6], ARGV[10], 'PX', age) end
    first = 7
  end
  local ref = cs .. ':' .. now .. ':' .. ARGV[14] .. ':' .. id
  for i = first, #KEYS, 3 do
    if max > 0 then
      local hk = KEYS[i]
      redis.call('ZADD', hk, c, ref)
      local n = redis.call('ZCARD', hk)
      if n > max then
        local gone = redis.call('ZRANGE', hk, n - max - 1, n - max - 1, 'WITHSCORES')
        redis.call('SET', KEYS[i + 1], gone[2], 'PX', age)
        redis.call('ZREMRANGEBYRANK', hk, 0, n - max - 1)
      end
      redis.call('PEXPIRE', hk, age)
    end
    local m = redis.call('HGETALL', KEYS[i + 2])
    for j = 1, #m, 2 do
      if tonumber(m[j + 1]) > now then nodes[m[j]] = true end
    end
  end
end
local routed = 0
for node, _ in pairs(nodes) do
  redis.call('SPUBLISH', part .. 'node:' .. node, msg)
  routed = routed + 1
end
return {{c, routed}}
"#,
    ))
});

/// Touches a partition's clock ([`CLOCK`]) for a node's PING. KEYS: the
/// clock, the settling mark, the master mark. ARGV: gap_ms, settle_ms,
/// the master's run id. Returns the ms the
/// partition still settles, or a value <= 0 when it does not.
pub(crate) static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{NOW}
local ck, sk, mk, rid = KEYS[1], KEYS[2], KEYS[3], ARGV[3]
local gap, settle = tonumber(ARGV[1]), tonumber(ARGV[2])
{CLOCK}
return settling
"#
    ))
});

/// A connection of a user opened (delta 1) or closed (delta -1), and the
/// user's cluster-wide lifecycle. KEYS: the node's user counts and
/// first-connection times in the user's partition, the user's map, and
/// (lifecycle) the online and offline-due sets. ARGV: node, user, delta,
/// ttl_ms, since_ms (when the node's first current connection of the user
/// opened), lifecycle (1/0), debounce_ms. Returns `{count, online}`: the
/// node's connections of that user, and 1 when this was the user's first
/// connection anywhere (not a return within the debounce): `user.online`.
///
/// When the user's last connection anywhere closes, the user is due
/// offline after the debounce; [`SWEEP`] and [`GONE`] announce it then,
/// unless a connection came back.
pub(crate) static USER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local node, user = ARGV[1], ARGV[2]
local delta, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local lifecycle, debounce = ARGV[6] == '1', tonumber(ARGV[7])
{NOW}
local c = redis.call('HINCRBY', KEYS[1], user, delta)
local online = 0
if c <= 0 then
  redis.call('HDEL', KEYS[1], user)
  redis.call('HDEL', KEYS[2], user)
  redis.call('HDEL', KEYS[3], node)
  if lifecycle and redis.call('ZSCORE', KEYS[4], user) then
    local m = redis.call('HGETALL', KEYS[3])
    local live = false
    for j = 1, #m, 2 do
      if tonumber(m[j + 1]) > now then live = true end
    end
    if not live then
      redis.call('ZADD', KEYS[5], now + debounce, user)
    end
  end
else
  redis.call('HSET', KEYS[3], node, now + ttl)
  redis.call('PEXPIRE', KEYS[3], ttl * 4)
  if c == delta then
    redis.call('HSET', KEYS[2], user, ARGV[5])
  end
  if lifecycle and delta > 0 then
    if redis.call('ZSCORE', KEYS[5], user) then
      redis.call('ZREM', KEYS[5], user)
    elseif not redis.call('ZSCORE', KEYS[4], user) then
      online = 1
    end
    redis.call('ZADD', KEYS[4], 'GT', now + ttl, user)
  end
end
return {{c, online}}
"#
    ))
});

/// A connection listing a group opened (delta 1) or closed (delta -1).
/// KEYS: the node's group counts in the group's partition, the group's
/// map, the node's members of the group. ARGV: node, group, user, delta,
/// ttl_ms. Returns the node's connections in that group.
pub(crate) static MEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local node, group, user = ARGV[1], ARGV[2], ARGV[3]
local delta, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
{NOW}
local c = redis.call('HINCRBY', KEYS[1], group, delta)
if c <= 0 then
  redis.call('HDEL', KEYS[1], group)
  redis.call('HDEL', KEYS[2], node)
else
  redis.call('HSET', KEYS[2], node, now + ttl)
  redis.call('PEXPIRE', KEYS[2], ttl * 4)
end
if redis.call('HINCRBY', KEYS[3], user, delta) <= 0 then
  redis.call('HDEL', KEYS[3], user)
end
redis.call('PEXPIRE', KEYS[3], ttl * 4)
return c
"#
    ))
});

/// Heartbeat of one node for users of one partition. KEYS: the node's
/// user counts and first-connection times there, the online set, then the
/// listed users' maps. ARGV: node, ttl_ms, reset (1 on a partition's first
/// call of a heartbeat: the counts are rewritten from scratch), lifecycle
/// (1/0), then per user: name, count, since_ms. Refreshes the mappings
/// and rewrites the counts (what the node really holds), which also
/// restores a Redis that restarted empty and forgets counts of connections
/// whose close was lost while Redis was away. Announces nobody: a Redis
/// that lost its data takes its users back silently.
pub(crate) static HEARTBEAT_USERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local node, ttl = ARGV[1], tonumber(ARGV[2])
local lifecycle = ARGV[4] == '1'
{NOW}
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
end
local n = #KEYS - 3
for i = 1, n do
  local a = 5 + 3 * (i - 1)
  local user = ARGV[a]
  redis.call('HSET', KEYS[1], user, ARGV[a + 1])
  redis.call('HSET', KEYS[2], user, ARGV[a + 2])
  redis.call('HSET', KEYS[3 + i], node, now + ttl)
  redis.call('PEXPIRE', KEYS[3 + i], ttl * 4)
  if lifecycle then
    redis.call('ZADD', KEYS[3], 'GT', now + ttl, user)
  end
end
return n
"#
    ))
});

/// Heartbeat of one node for groups of one partition. KEYS: the node's
/// group counts there, then per listed group its map and the node's
/// members of it. ARGV: node, ttl_ms, reset (as for users), then per
/// group: name, count, number of members m, then m member/count pairs.
pub(crate) static HEARTBEAT_GROUPS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local node, ttl = ARGV[1], tonumber(ARGV[2])
{NOW}
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
end
local a = 4
for i = 1, (#KEYS - 1) / 2 do
  local map, members = KEYS[2 * i], KEYS[2 * i + 1]
  redis.call('HSET', KEYS[1], ARGV[a], ARGV[a + 1])
  redis.call('HSET', map, node, now + ttl)
  redis.call('PEXPIRE', map, ttl * 4)
  local m = tonumber(ARGV[a + 2])
  redis.call('DEL', members)
  for j = 0, m - 1 do
    redis.call('HSET', members, ARGV[a + 3 + 2 * j], ARGV[a + 4 + 2 * j])
  end
  if m > 0 then redis.call('PEXPIRE', members, ttl * 4) end
  a = a + 3 + 2 * m
end
return (#KEYS - 1) / 2
"#
    ))
});

/// The lifecycle sweep of one partition's sets. KEYS: the online set, the
/// offline-due set. ARGV: debounce_ms, most users. Users whose every
/// mapping expired (their nodes died) become due offline after the
/// debounce; returns the users due now, for [`GONE`].
pub(crate) static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local debounce, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
{NOW}
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, u in ipairs(stale) do
  if not redis.call('ZSCORE', KEYS[2], u) then
    redis.call('ZADD', KEYS[2], now + debounce, u)
  end
end
return redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
"#
    ))
});

/// A user due offline ([`SWEEP`]): if still due and connected nowhere, the
/// user is offline now. KEYS: the user's map, the online set, the
/// offline-due set. ARGV: user. Returns 1 when `user.offline` is to be
/// announced (once: the user leaves both sets).
pub(crate) static GONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local user = ARGV[1]
{NOW}
local due = redis.call('ZSCORE', KEYS[3], user)
if (not due) or tonumber(due) > now then return 0 end
redis.call('ZREM', KEYS[3], user)
local m = redis.call('HGETALL', KEYS[1])
for j = 1, #m, 2 do
  if tonumber(m[j + 1]) > now then return 0 end
end
redis.call('ZREM', KEYS[2], user)
return 1
"#
    ))
});

/// A node's liveness: KEYS: the node set (partition 0). ARGV: node,
/// ttl_ms (0 to remove the node).
pub(crate) static ALIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{NOW}
if tonumber(ARGV[2]) == 0 then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
"#
    ))
});

/// What a resuming client missed. KEYS: the user's window, its eviction
/// mark, the key of the `since` id in the user's partition. ARGV: the
/// since counter (empty: read it from KEYS[3]; `none`: unknown
/// everywhere), age_ms. Returns `{status, entry...}`: status 0 (the window
/// reaches back), 1 (a gap), or 2 with no entries when the id is not in
/// this partition (the caller looks in the others and asks again). The
/// entries are the window's `counter:ms:q:id` references after it, in
/// order, within the age bound.
pub(crate) static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local since, age = ARGV[1], tonumber(ARGV[2])
{NOW}
local since_c = nil
if since == '' then
  local v = redis.call('GET', KEYS[3])
  if not v then return {{2}} end
  since_c = tonumber(v)
elseif since ~= 'none' then
  since_c = tonumber(since)
end
local hk = KEYS[1]
local entries
local gap = 0
if since_c then
  entries = redis.call('ZRANGEBYSCORE', hk, '(' .. string.format('%.0f', since_c), '+inf')
  local ev = redis.call('GET', KEYS[2])
  if ev and tonumber(ev) > since_c then gap = 1 end
else
  entries = redis.call('ZRANGE', hk, 0, -1)
  gap = 1
end
local out = {{gap}}
for _, e in ipairs(entries) do
  local a = string.find(e, ':', 1, true)
  local b = string.find(e, ':', a + 1, true)
  if tonumber(string.sub(e, a + 1, b - 1)) >= now - age then
    table.insert(out, e)
  end
end
return out
"#
    ))
});

/// Removes the expired entries of the given user or group maps, and those
/// of the nodes in ARGV (nodes just found dead), or of the node set.
/// Returns the entries removed.
pub(crate) static CLEAN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{NOW}
local dead = {{}}
for _, n in ipairs(ARGV) do dead[n] = true end
local removed = 0
for _, key in ipairs(KEYS) do
  local m = redis.call('HGETALL', key)
  for j = 1, #m, 2 do
    if tonumber(m[j + 1]) <= now or dead[m[j]] then
      redis.call('HDEL', key, m[j])
      removed = removed + 1
    end
  end
end
return removed
"#
    ))
});

/// Removes the nodes whose liveness expired from the node set (KEYS[1])
/// and returns them.
pub(crate) static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{NOW}
local m = redis.call('HGETALL', KEYS[1])
local out = {{}}
for j = 1, #m, 2 do
  if tonumber(m[j + 1]) <= now then
    redis.call('HDEL', KEYS[1], m[j])
    table.insert(out, m[j])
  end
end
return out
"#
    ))
});

/// The live entries of a map (a user's or a group's nodes, or the live
/// nodes). KEYS: the map.
pub(crate) static LIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{NOW}
local m = redis.call('HGETALL', KEYS[1])
local out = {{}}
for j = 1, #m, 2 do
  if tonumber(m[j + 1]) > now then table.insert(out, m[j]) end
end
return out
"#
    ))
});

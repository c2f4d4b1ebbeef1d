//! The Lua scripts. Each runs atomically in Redis and takes the time from
//! Redis (`TIME`), so that expiry decisions do not depend on the clocks of
//! the nodes. Most keys are built inside the scripts from the prefix (pgdn
//! targets one Redis, not Redis Cluster); where a script's keys are known
//! before it runs, they are built in Rust ([`Keys`](crate::keys::Keys))
//! and passed as `KEYS`.

use std::sync::LazyLock;

use redis::Script;

/// The cluster clock, run first by [`PUBLISH`] and [`TOUCH`] with `p` (the
/// prefix), `now` (ms, Redis clock), `gap` and `settle` (ms) defined.
/// `clock` holds when a node last reached Redis. If it is missing (Redis
/// restarted empty) or older than `gap` (Redis stalled, or was away, long
/// enough for nodes' mappings to expire), the cluster is *settling* for
/// `settle` ms: long enough for every live node to notice and register its
/// sessions again. Publishes are refused meanwhile: one could be routed by
/// mappings not yet rewritten, answered 200 and reach nobody. Leaves
/// `settling` = the ms left.
const CLOCK: &str = r#"
local last = tonumber(redis.call('GET', p .. 'clock'))
if (not last) or now - last > gap then
  redis.call('SET', p .. 'settling', '1', 'PX', settle)
end
redis.call('SET', p .. 'clock', now)
local settling = redis.call('PTTL', p .. 'settling')
"#;

/// Publish one message. ARGV: prefix, id, chosen (1/0), dedup_ms, hist_max,
/// hist_age_ms, kind (`a` all nodes / `u` user targets), target JSON,
/// origin, frame, gap_ms, settle_ms, then the target users. Returns the
/// cluster-wide sequence number, -1 for a repeated publisher id, or -2
/// while the cluster is settling after a Redis outage ([`CLOCK`]; nothing
/// is written then, not even the id's claim, so a retry is published).
///
/// A user message's frame is stored once, in `msg:{seq}` for the age bound
/// ([`Keys::message`](crate::keys::Keys::message) names it the same way);
/// each user's window `hist:{user}` holds `seq:ms` references to it. The
/// work is linear in the users, which
/// [`ClusterConfig::max_users_per_publish`](crate::ClusterConfig::max_users_per_publish)
/// bounds.
pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local p = ARGV[1]
local id = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gap, settle = tonumber(ARGV[11]), tonumber(ARGV[12])
{CLOCK}
if settling > 0 then
  return -2
end
if ARGV[3] == '1' then
  if not redis.call('SET', p .. 'dedup:' .. id, '1', 'NX', 'PX', ARGV[4]) then
    return -1
  end
end
local age = tonumber(ARGV[6])
local seq = redis.call('INCR', p .. 'seq')
local bucket = p .. 'ids:' .. math.floor(now / 60000)
redis.call('HSET', bucket, id, seq)
redis.call('PEXPIRE', bucket, age + 120000)
local msg = seq .. '\n' .. ARGV[9] .. '\n' .. id .. '\n' .. ARGV[8] .. '\n' .. ARGV[10]
if ARGV[7] == 'a' then
  redis.call('PUBLISH', p .. 'all', msg)
  return seq
end
local max = tonumber(ARGV[5])
local nodes = {{}}
if max > 0 then
  redis.call('SET', p .. 'msg:' .. seq, ARGV[10], 'PX', age)
end
local ref = seq .. ':' .. now
for i = 13, #ARGV do
  local u = ARGV[i]
  if max > 0 then
    local hk = p .. 'hist:' .. u
    redis.call('ZADD', hk, seq, ref)
    local n = redis.call('ZCARD', hk)
    if n > max then
      local gone = redis.call('ZRANGE', hk, n - max - 1, n - max - 1, 'WITHSCORES')
      redis.call('SET', p .. 'hist_evicted:' .. u, gone[2], 'PX', age)
      redis.call('ZREMRANGEBYRANK', hk, 0, n - max - 1)
    end
    redis.call('PEXPIRE', hk, age)
  end
  local m = redis.call('HGETALL', p .. 'user:' .. u)
  for j = 1, #m, 2 do
    if tonumber(m[j + 1]) > now then nodes[m[j]] = true end
  end
end
for node, _ in pairs(nodes) do
  redis.call('PUBLISH', p .. 'node:' .. node, msg)
end
return seq
"#,
    ))
});

/// Touches the cluster clock ([`CLOCK`]) for a node's PING. ARGV: prefix,
/// gap_ms, settle_ms. Returns the ms the cluster still settles, or a
/// value <= 0 when it does not.
pub(crate) static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gap, settle = tonumber(ARGV[2]), tonumber(ARGV[3])
{CLOCK}
return settling
"#
    ))
});

/// A connection opened (delta 1) or closed (delta -1). ARGV: prefix, node,
/// user, delta, ttl_ms, then the connection's groups. Returns the node's
/// connections of that user.
pub(crate) static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p, node, user = ARGV[1], ARGV[2], ARGV[3]
local delta, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local c = redis.call('HINCRBY', p .. 'conns:' .. node, user, delta)
if c <= 0 then
  redis.call('HDEL', p .. 'conns:' .. node, user)
  redis.call('HDEL', p .. 'user:' .. user, node)
else
  redis.call('HSET', p .. 'user:' .. user, node, now + ttl)
  redis.call('PEXPIRE', p .. 'user:' .. user, ttl * 4)
end
for i = 6, #ARGV do
  local g = redis.call('HINCRBY', p .. 'groups:' .. node, ARGV[i], delta)
  if g <= 0 then redis.call('HDEL', p .. 'groups:' .. node, ARGV[i]) end
end
redis.call('SADD', p .. 'nodes', node)
redis.call('SET', p .. 'alive:' .. node, '1', 'PX', ttl)
return c
"#,
    )
});

/// Heartbeat. ARGV: prefix, node, ttl_ms, number of users, then user and
/// count pairs, then group and count pairs. Refreshes liveness and the
/// mappings of the listed users; rewrites the listed counts (what the node
/// really holds), which also restores a Redis that restarted empty.
pub(crate) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p, node, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', p .. 'alive:' .. node, '1', 'PX', ttl)
redis.call('SADD', p .. 'nodes', node)
local nu = tonumber(ARGV[4])
for i = 0, nu - 1 do
  local u, c = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  redis.call('HSET', p .. 'conns:' .. node, u, c)
  redis.call('HSET', p .. 'user:' .. u, node, now + ttl)
  redis.call('PEXPIRE', p .. 'user:' .. u, ttl * 4)
end
for j = 5 + 2 * nu, #ARGV, 2 do
  redis.call('HSET', p .. 'groups:' .. node, ARGV[j], ARGV[j + 1])
end
return nu
"#,
    )
});

/// What a resuming client missed. KEYS: the user's window, its eviction
/// mark. ARGV: prefix (of the id index), since id, age_ms. Returns `{gap,
/// entry...}` with the window's entries in order: `seq:ms` references
/// (whose frames are in `msg:{seq}`), or `seq:ms:frame` as written before
/// frames were stored once.
pub(crate) static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p, since, age = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since_seq = nil
local m = math.floor(now / 60000)
for b = m, m - math.floor(age / 60000) - 1, -1 do
  local v = redis.call('HGET', p .. 'ids:' .. b, since)
  if v then
    since_seq = tonumber(v)
    break
  end
end
local hk = KEYS[1]
local entries
local gap = 0
if since_seq then
  entries = redis.call('ZRANGEBYSCORE', hk, '(' .. since_seq, '+inf')
  local ev = redis.call('GET', KEYS[2])
  if ev and tonumber(ev) > since_seq then gap = 1 end
else
  entries = redis.call('ZRANGE', hk, 0, -1)
  gap = 1
end
local out = {gap}
for _, e in ipairs(entries) do
  local a = string.find(e, ':', 1, true)
  local b = string.find(e, ':', a + 1, true) or (#e + 1)
  if tonumber(string.sub(e, a + 1, b - 1)) >= now - age then
    table.insert(out, e)
  end
end
return out
"#,
    )
});

/// Removes, from the given user keys, the mappings that expired or point to
/// nodes without a liveness key. ARGV: prefix. Returns mappings removed.
pub(crate) static CLEAN_USERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed = 0
for _, key in ipairs(KEYS) do
  local m = redis.call('HGETALL', key)
  for j = 1, #m, 2 do
    if tonumber(m[j + 1]) <= now or redis.call('EXISTS', p .. 'alive:' .. m[j]) == 0 then
      redis.call('HDEL', key, m[j])
      removed = removed + 1
    end
  end
end
return removed
"#,
    )
});

/// The user's live nodes. ARGV: prefix, user.
pub(crate) static NODES_OF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m = redis.call('HGETALL', ARGV[1] .. 'user:' .. ARGV[2])
local out = {}
for j = 1, #m, 2 do
  if tonumber(m[j + 1]) > now then table.insert(out, m[j]) end
end
return out
"#,
    )
});

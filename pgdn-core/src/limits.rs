//! Connection limits: on this node in total, per user and per client
//! address, counted with reservations so that they hold under concurrency.
//!
//! [`Service::admit`](crate::Service::admit) reserves a slot for each limit
//! before the request is answered (before a WebSocket upgrade, before an
//! SSE stream): a check and its increment happen under one lock, so two
//! connections that authenticate at once cannot both take the last slot.
//! The slots travel with the [`Admission`](crate::service::Admission) and
//! then the [`Session`](crate::Session), and are given back when they are
//! dropped: when the connection ends, or when it is refused after all
//! (an authentication failure, an upgrade that never completes).
//!
//! The client's address is the peer's, or, when the peer is one of
//! [`Config::trusted_proxies`](crate::Config::trusted_proxies), the
//! right-most address of `X-Forwarded-For` that is not a trusted proxy
//! (the left-most ones are whatever the client wrote).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http::HeaderMap;

use crate::transport::TransportKind;

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or one
/// address (`192.0.2.7`): an entry of
/// [`Config::trusted_proxies`](crate::Config::trusted_proxies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// The network of `addr` with `prefix` bits; `None` when the prefix is
    /// longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpNetwork {
            addr: addr.to_canonical(),
            prefix: if addr.is_ipv6() && addr.to_canonical().is_ipv4() {
                prefix.saturating_sub(96)
            } else {
                prefix
            },
        })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count
    /// as their IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNetwork {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || format!("{s:?} is not an IP address or a CIDR network (e.g. 10.0.0.0/8)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        IpNetwork::new(addr, prefix).ok_or_else(bad)
    }
}

impl std::fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The client's address: the peer's, or, when the peer is a trusted
/// proxy, the right-most `X-Forwarded-For` entry that is not one (the
/// left-most entry when all of them are). `None` when the adapter does not
/// know the peer.
pub fn client_ip(
    remote: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[IpNetwork],
) -> Option<IpAddr> {
    let peer = remote?.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    // Every X-Forwarded-For header, in order, as one list.
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(parse_hop)
        .collect::<Option<Vec<_>>>()
        // A list we cannot read names nobody we could trust: the proxy
        // itself is the client.
        .unwrap_or_default();
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !is_trusted(hop) {
            break;
        }
    }
    Some(client)
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

/// Why a connection was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitExceeded {
    /// This node's `max_connections`.
    Total,
    /// `max_connections_per_ip` for the client's address.
    Ip,
    /// `max_connections_per_user` for the user.
    User,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    users: HashMap<Arc<str>, usize>,
    ips: HashMap<IpAddr, usize>,
}

/// The reservations of every connection of a service, and its sessions
/// by transport (maintained counters, so that `/metrics` reads numbers
/// instead of walking connections).
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    counts: Mutex<Counts>,
    /// Sessions running now, by [`TransportKind::index`].
    open: [AtomicI64; TransportKind::ALL.len()],
    /// Sessions started since start, by [`TransportKind::index`].
    opened: [AtomicU64; TransportKind::ALL.len()],
}

impl Limiter {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a slot on this node (`total < max`) and, when the client's
    /// address `ip` is known and `max_per_ip` given, one for the address.
    /// The slots remember the address (for logs) either way.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        max_total: usize,
        ip: Option<IpAddr>,
        max_per_ip: Option<usize>,
    ) -> Result<Slots, LimitExceeded> {
        let mut counts = self.lock();
        if counts.total >= max_total {
            return Err(LimitExceeded::Total);
        }
        let ip_counted = match (ip, max_per_ip) {
            (Some(ip), Some(max)) => {
                let n = counts.ips.entry(ip).or_default();
                if *n >= max {
                    if *n == 0 {
                        counts.ips.remove(&ip);
                    }
                    return Err(LimitExceeded::Ip);
                }
                *n += 1;
                true
            }
            _ => false,
        };
        counts.total += 1;
        Ok(Slots {
            limiter: Some(self.clone()),
            ip,
            ip_counted,
            user: None,
            transport: None,
        })
    }

    /// Sessions running now over `kind`.
    pub(crate) fn open(&self, kind: TransportKind) -> i64 {
        self.open[kind.index()].load(Ordering::Relaxed)
    }

    /// Sessions started over `kind` since start.
    pub(crate) fn opened(&self, kind: TransportKind) -> u64 {
        self.opened[kind.index()].load(Ordering::Relaxed)
    }

    /// How many connections hold a slot for `user`.
    #[cfg(test)]
    pub(crate) fn user_count(&self, user: &str) -> usize {
        self.lock().users.get(user).copied().unwrap_or(0)
    }
}

/// The slots a connection holds; given back when dropped.
///
/// Also where a connection keeps its client's address (for its log lines)
/// and its transport (for the open-connections gauge): both fit in this
/// struct's padding (48 bytes before and after), so an idle connection
/// does not grow for them.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    limiter: Option<Arc<Limiter>>,
    /// The client's address, where known.
    ip: Option<IpAddr>,
    /// Whether `ip` holds a slot of `max_connections_per_ip`.
    ip_counted: bool,
    user: Option<Arc<str>>,
    /// Set once the session runs: counted in [`Limiter::open`] until dropped.
    transport: Option<TransportKind>,
}

impl Slots {
    /// Adds a slot for `user`, if it has fewer than `max`.
    pub(crate) fn reserve_user(
        &mut self,
        user: &Arc<str>,
        max: usize,
    ) -> Result<(), LimitExceeded> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        debug_assert!(self.user.is_none());
        let mut counts = limiter.lock();
        let n = counts.users.entry(user.clone()).or_default();
        if *n >= max {
            if *n == 0 {
                counts.users.remove(user);
            }
            return Err(LimitExceeded::User);
        }
        *n += 1;
        self.user = Some(user.clone());
        Ok(())
    }
}

impl Slots {
    /// The client's address, where known.
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// Counts the connection as running over `kind` until these slots are
    /// dropped.
    pub(crate) fn open_as(&mut self, kind: TransportKind) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        if self.transport.replace(kind).is_none() {
            limiter.open[kind.index()].fetch_add(1, Ordering::Relaxed);
            limiter.opened[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let Some(limiter) = self.limiter.take() else {
            return;
        };
        if let Some(kind) = self.transport.take() {
            limiter.open[kind.index()].fetch_sub(1, Ordering::Relaxed);
        }
        let mut counts = limiter.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.ip.take().filter(|_| self.ip_counted) {
            if let Some(n) = counts.ips.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.ips.remove(&ip);
                }
            }
        }
        if let Some(user) = self.user.take() {
            if let Some(n) = counts.users.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    counts.users.remove(&user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        assert!(net("10.0.0.0/8").contains("10.200.0.1".parse().unwrap()));
        assert!(!net("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(net("192.0.2.7").contains("192.0.2.7".parse().unwrap()));
        assert!(!net("192.0.2.7").contains("192.0.2.8".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("203.0.113.1".parse().unwrap()));
        assert!(net("fd00::/8").contains("fd12::1".parse().unwrap()));
        assert!(!net("fd00::/8").contains("10.0.0.1".parse().unwrap()));
        // A v4 client seen on a dual-stack socket.
        assert!(net("127.0.0.1").contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(net("::ffff:10.0.0.0/104").contains("10.1.2.3".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_forwarded_address() {
        let trusted = [net("127.0.0.1"), net("10.0.0.0/8")];
        let peer = Some("127.0.0.1:5000".parse().unwrap());
        let xff = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", v.parse().unwrap());
            h
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            client_ip(peer, &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
        assert_eq!(
            client_ip(peer, &xff("203.0.113.5"), &trusted),
            ip("203.0.113.5")
        );
        // A client cannot hide behind what it writes itself.
        assert_eq!(
            client_ip(peer, &xff("198.51.100.1, 203.0.113.5, 10.1.1.1"), &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_ip(peer, &xff("10.2.2.2, 10.1.1.1"), &trusted),
            ip("10.2.2.2")
        );
        assert_eq!(
            client_ip(peer, &xff("[2001:db8::1]:443"), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(client_ip(peer, &xff("garbage"), &trusted), ip("127.0.0.1"));
        // Not from a trusted proxy: the header is the client's word.
        let other = Some("192.0.2.9:5000".parse().unwrap());
        assert_eq!(
            client_ip(other, &xff("203.0.113.5"), &trusted),
            ip("192.0.2.9")
        );
        assert_eq!(client_ip(peer, &xff("203.0.113.5"), &[]), ip("127.0.0.1"));
        assert_eq!(client_ip(None, &xff("203.0.113.5"), &trusted), None);
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let limiter = Arc::new(Limiter::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let user: Arc<str> = "u1".into();
        let mut a = limiter.reserve(3, Some(ip), Some(2)).unwrap();
        a.reserve_user(&user, 1).unwrap();
        let mut b = limiter.reserve(3, Some(ip), Some(2)).unwrap();
        assert_eq!(b.reserve_user(&user, 1), Err(LimitExceeded::User));
        assert_eq!(
            limiter.reserve(3, Some(ip), Some(2)).unwrap_err(),
            LimitExceeded::Ip
        );
        // Without a per-address limit the address is kept, not counted.
        let mut c = limiter.reserve(3, Some(ip), None).unwrap();
        assert_eq!(c.ip(), Some(ip));
        assert_eq!(
            limiter.reserve(3, None, None).unwrap_err(),
            LimitExceeded::Total
        );
        c.open_as(TransportKind::Sse);
        c.open_as(TransportKind::Sse);
        assert_eq!(limiter.open(TransportKind::Sse), 1, "counted once");
        assert_eq!(limiter.opened(TransportKind::Sse), 1);
        assert_eq!(limiter.open(TransportKind::WebSocket), 0);
        drop(a);
        b.reserve_user(&user, 1).unwrap();
        assert_eq!(limiter.user_count("u1"), 1);
        drop((b, c));
        assert_eq!(limiter.open(TransportKind::Sse), 0, "given back");
        assert_eq!(limiter.opened(TransportKind::Sse), 1);
        let counts = limiter.lock();
        assert_eq!(counts.total, 0);
        assert!(counts.users.is_empty() && counts.ips.is_empty());
    }
}

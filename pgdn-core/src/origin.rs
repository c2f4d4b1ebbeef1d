//! Origin checks (docs/protocol.md v1.1 section 1): a connecting request that
//! carries an `Origin` header is served only when that origin is allowed.
//!
//! - **Same origin** is always allowed: the origin's host and port equal
//!   the request's `Host` (a `Host` without a port takes the default port
//!   of the origin's scheme). The scheme itself is not compared: behind a
//!   TLS-terminating proxy the server cannot know whether the browser used
//!   `https`, and one host and port serve one scheme.
//! - [`Config::allowed_origins`](crate::Config::allowed_origins) widens
//!   it: each entry is an origin (`https://app.example.com`, ports as in
//!   the `Origin` header; a default port may be written or left out), or
//!   `*` for any origin.
//! - A request without `Origin` (a server, a batch job, a native app) is
//!   not affected.

use http::{HeaderMap, HeaderValue};

/// An origin: scheme, host and port (the scheme's default when left out).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `host[:port]` (an IPv6 host in brackets), lowercased.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", host.to_ascii_lowercase()), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    if host.is_empty() || host.contains(':') && !host.starts_with('[') {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((host, port))
}

impl Origin {
    /// `scheme://host[:port]`, as browsers send it (a trailing `/` is
    /// tolerated in configuration).
    fn parse(s: &str) -> Option<Origin> {
        let s = s.trim();
        let (scheme, rest) = s.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid_scheme {
            return None;
        }
        let (host, port) = split_host_port(rest.strip_suffix('/').unwrap_or(rest))?;
        let port = port.or(default_port(&scheme));
        Some(Origin { scheme, host, port })
    }
}

/// What to do with a connecting request, by its `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OriginCheck {
    /// No `Origin` header: not a browser's cross-site request.
    Absent,
    /// Allowed; the value to send back as `Access-Control-Allow-Origin`.
    Allowed(HeaderValue),
    /// Not allowed: 403.
    Refused,
}

/// The origins a service allows besides its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct OriginPolicy {
    any: bool,
    listed: Vec<Origin>,
}

impl OriginPolicy {
    /// From [`Config::allowed_origins`](crate::Config::allowed_origins);
    /// an error names an entry that is not an origin.
    pub(crate) fn new<S: AsRef<str>>(allowed: &[S]) -> Result<Self, String> {
        let mut policy = OriginPolicy::default();
        for entry in allowed {
            let entry = entry.as_ref().trim();
            if entry == "*" {
                policy.any = true;
            } else if let Some(origin) = Origin::parse(entry) {
                policy.listed.push(origin);
            } else {
                return Err(format!(
                    "allowed origin {entry:?} is not an origin like https://app.example.com (or `*`)"
                ));
            }
        }
        Ok(policy)
    }

    /// Checks a request's `Origin` against its `Host` and the list.
    pub(crate) fn check(&self, headers: &HeaderMap) -> OriginCheck {
        let mut values = headers.get_all(http::header::ORIGIN).iter();
        let Some(value) = values.next() else {
            return OriginCheck::Absent;
        };
        if values.next().is_some() {
            // Browsers send one; two are a forgery or a broken proxy.
            return OriginCheck::Refused;
        }
        if self.any {
            return OriginCheck::Allowed(value.clone());
        }
        let Some(origin) = value.to_str().ok().and_then(Origin::parse) else {
            // `null` (sandboxed frames, file: pages) and anything unreadable.
            return OriginCheck::Refused;
        };
        if self.listed.contains(&origin) || same_origin(&origin, headers) {
            OriginCheck::Allowed(value.clone())
        } else {
            OriginCheck::Refused
        }
    }
}

/// Whether `origin` names the host and port the request was sent to.
fn same_origin(origin: &Origin, headers: &HeaderMap) -> bool {
    let Some((host, port)) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| split_host_port(h.trim()))
    else {
        return false;
    };
    host == origin.host && port.or(default_port(&origin.scheme)) == origin.port
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &[&str], origin: Option<&str>, host: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(http::header::ORIGIN, o.parse().unwrap());
        }
        match OriginPolicy::new(policy).unwrap().check(&h) {
            OriginCheck::Absent => {
                assert!(origin.is_none());
                true
            }
            OriginCheck::Allowed(v) => {
                assert_eq!(Some(v.to_str().unwrap()), origin, "the origin is echoed");
                true
            }
            OriginCheck::Refused => false,
        }
    }

    #[test]
    fn same_origin_compares_host_and_port() {
        assert!(check(&[], None, "pgdn.example:8000"));
        assert!(check(
            &[],
            Some("http://pgdn.example:8000"),
            "pgdn.example:8000"
        ));
        assert!(check(
            &[],
            Some("http://PGDN.example:8000"),
            "pgdn.example:8000"
        ));
        // Behind TLS the server sees no scheme: host and port decide.
        assert!(check(&[], Some("https://pgdn.example"), "pgdn.example"));
        assert!(check(&[], Some("https://pgdn.example"), "pgdn.example:443"));
        assert!(check(&[], Some("http://pgdn.example"), "pgdn.example:80"));
        assert!(check(&[], Some("http://[::1]:8000"), "[::1]:8000"));
        assert!(!check(
            &[],
            Some("http://pgdn.example:8001"),
            "pgdn.example:8000"
        ));
        assert!(!check(&[], Some("http://pgdn.example"), "pgdn.example:443"));
        assert!(!check(
            &[],
            Some("http://evil.example:8000"),
            "pgdn.example:8000"
        ));
        assert!(!check(
            &[],
            Some("http://pgdn.example.evil:8000"),
            "pgdn.example:8000"
        ));
        assert!(!check(&[], Some("null"), "pgdn.example"));
        assert!(!check(&[], Some("garbage"), "pgdn.example"));
    }

    #[test]
    fn the_list_widens_it() {
        let list = ["https://app.example", "http://localhost:3000/"];
        assert!(check(&list, Some("https://app.example"), "pgdn.example"));
        assert!(check(
            &list,
            Some("https://app.example:443"),
            "pgdn.example"
        ));
        assert!(check(&list, Some("http://localhost:3000"), "pgdn.example"));
        assert!(!check(&list, Some("http://app.example"), "pgdn.example"));
        assert!(!check(&list, Some("http://localhost:3001"), "pgdn.example"));
        assert!(check(
            &["*"],
            Some("http://anything.example"),
            "pgdn.example"
        ));
        assert!(check(&["*"], Some("null"), "pgdn.example"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "app.example",
            "https://",
            "https://a.example/path",
            "http://a:b:c",
        ] {
            assert!(OriginPolicy::new(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_origin_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "a.example".parse().unwrap());
        h.append(http::header::ORIGIN, "http://a.example".parse().unwrap());
        h.append(http::header::ORIGIN, "http://a.example".parse().unwrap());
        assert_eq!(
            OriginPolicy::new(&["*"]).unwrap().check(&h),
            OriginCheck::Refused
        );
    }
}

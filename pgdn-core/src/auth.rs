//! Turning a connecting request into an [`Identity`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::LazyLock;

use async_trait::async_trait;
use http::HeaderMap;

use crate::identity::Identity;

/// Why a token was refused. Each maps to the close reason of docs/protocol.md
/// section 1; the connection is closed with 1008 (or, on Server-Sent
/// Events, answered 401) and nothing is registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was given.
    #[error("missing token")]
    MissingToken,
    /// The token is malformed, forged or expired. The detail is for logs and
    /// never contains the token itself.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token is valid but yields no usable identity (no user id).
    #[error("invalid identity")]
    InvalidIdentity,
}

impl AuthError {
    /// The close reason sent with code 1008.
    pub fn close_reason(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing token",
            AuthError::InvalidToken(_) => "invalid token",
            AuthError::InvalidIdentity => "invalid identity",
        }
    }
}

/// Why an [`Authenticator`] is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthPurpose {
    /// A new connection (WebSocket upgrade or Server-Sent Events request).
    Connect,
    /// An in-band `{"type":"refresh","token":...}` on a live connection
    /// (docs/protocol.md section 1). The headers are then empty: a refresh
    /// carries only its token.
    Refresh,
}

static NO_HEADERS: LazyLock<HeaderMap> = LazyLock::new(HeaderMap::new);

/// What an [`Authenticator`] sees of a connecting request: the token (from
/// `?token=` or `Authorization: Bearer`), the request's headers (cookies,
/// for apps with cookie sessions) and the peer's address.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AuthRequest<'a> {
    /// The token, if the client sent one (possibly empty).
    pub token: Option<&'a str>,
    /// The request's headers; empty for a [`AuthPurpose::Refresh`].
    pub headers: &'a HeaderMap,
    /// The peer's address, where the transport knows it.
    pub remote_addr: Option<SocketAddr>,
    /// Connect or refresh.
    pub purpose: AuthPurpose,
}

impl<'a> AuthRequest<'a> {
    /// A connecting request with `token` and `headers`.
    pub fn connect(token: Option<&'a str>, headers: &'a HeaderMap) -> Self {
        AuthRequest {
            token,
            headers,
            remote_addr: None,
            purpose: AuthPurpose::Connect,
        }
    }

    /// An in-band refresh with `token`.
    pub fn refresh(token: &'a str) -> Self {
        AuthRequest {
            token: Some(token),
            headers: &NO_HEADERS,
            remote_addr: None,
            purpose: AuthPurpose::Refresh,
        }
    }

    /// Just a token: for tests and token-only authenticators.
    pub fn token(token: &'a str) -> Self {
        AuthRequest::connect(Some(token), &NO_HEADERS)
    }

    /// Sets the peer's address.
    pub fn with_remote_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.remote_addr = addr;
        self
    }

    /// The token if one was given and is not empty; otherwise
    /// [`AuthError::MissingToken`].
    pub fn require_token(&self) -> Result<&'a str, AuthError> {
        self.token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)
    }

    /// The value of cookie `name`, if the request carries it.
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        self.headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim())
    }
}

/// Turns a connecting request into an identity.
///
/// Promise: returns an identity only for a request it verified; never logs
/// the token. It may be called concurrently for many connections, and
/// again on a live connection when the client refreshes its token
/// ([`AuthPurpose::Refresh`]). An identity's
/// [`expires_at`](Identity::expires_at) ends the connection with 4001 when
/// it passes.
///
/// ```
/// use pgdn_core::{AuthError, AuthRequest, Authenticator, Identity};
///
/// /// Reads a session cookie, as an app with cookie logins would.
/// struct CookieSessions;
///
/// #[async_trait::async_trait]
/// impl Authenticator for CookieSessions {
///     async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
///         match req.cookie("session") {
///             Some("s3cr3t") => Ok(Identity::new("u1", ["staff"])),
///             Some(_) => Err(AuthError::InvalidToken("unknown session".into())),
///             None => Err(AuthError::MissingToken),
///         }
///     }
/// }
/// ```
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies the request and yields who it belongs to.
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError>;
}

/// An authenticator backed by a fixed token -> identity table: for tests,
/// demos and small deployments with long-lived tokens.
#[derive(Debug, Clone, Default)]
pub struct StaticAuthenticator {
    tokens: HashMap<String, Identity>,
}

impl StaticAuthenticator {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` for `identity`.
    pub fn with_token(mut self, token: impl Into<String>, identity: Identity) -> Self {
        self.tokens.insert(token.into(), identity);
        self
    }
}

#[async_trait]
impl Authenticator for StaticAuthenticator {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        self.tokens
            .get(req.require_token()?)
            .cloned()
            .ok_or_else(|| AuthError::InvalidToken("unknown token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cookies() {
        let mut h = HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; session=xyz".parse().unwrap());
        h.append(http::header::COOKIE, "other=2".parse().unwrap());
        let r = AuthRequest::connect(None, &h);
        assert_eq!(r.cookie("session"), Some("xyz"));
        assert_eq!(r.cookie("other"), Some("2"));
        assert_eq!(r.cookie("nope"), None);
        assert_eq!(r.require_token(), Err(AuthError::MissingToken));
        assert_eq!(
            AuthRequest::connect(Some(""), &h).require_token(),
            Err(AuthError::MissingToken)
        );
    }
}

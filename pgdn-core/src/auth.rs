//! Turning a token into an [`Identity`].

use std::collections::HashMap;

use async_trait::async_trait;

use crate::identity::Identity;

/// Why a token was refused. Each maps to the close reason of PROTOCOL.md
/// section 1; the connection is closed with 1008 and nothing is registered.
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

/// Turns a subscriber's token into an identity.
///
/// Promise: returns an identity only for a token it verified; never logs the
/// token. It may be called concurrently for many connections.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `token` and yields who it belongs to.
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError>;
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
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        self.tokens
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::InvalidToken("unknown token".into()))
    }
}

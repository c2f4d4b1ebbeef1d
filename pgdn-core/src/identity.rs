//! Who a connection belongs to.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The identity an [`Authenticator`](crate::Authenticator) yields for a token:
/// a non-empty user id, the groups the user belongs to, and when the
/// connection must end (its token's expiry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The user the connection belongs to. Never empty once validated.
    pub user_id: Arc<str>,
    /// The groups whose notifications this connection receives.
    #[serde(default)]
    pub groups: Vec<Arc<str>>,
    /// When a live connection with this identity is closed with 4001
    /// `token expired` (docs/protocol.md section 1), unless an in-band refresh
    /// extends it first. `None`: never. The built-in JWT authenticator sets
    /// it to the token's `exp` plus its leeway. Not part of the serialized
    /// form: it belongs to one connection, not to the user.
    #[serde(skip)]
    pub expires_at: Option<SystemTime>,
}

impl Identity {
    /// An identity for `user_id` in `groups`, without expiry.
    pub fn new<I, G>(user_id: impl Into<Arc<str>>, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        Identity {
            user_id: user_id.into(),
            groups: groups.into_iter().map(Into::into).collect(),
            expires_at: None,
        }
    }

    /// The same identity, expiring at `at` (`None`: never).
    pub fn with_expiry(mut self, at: Option<SystemTime>) -> Self {
        self.expires_at = at;
        self
    }

    /// Whether this identity may be registered: the user id is not empty
    /// (docs/protocol.md section 1: otherwise the connection closes with
    /// `invalid identity`).
    pub fn is_valid(&self) -> bool {
        !self.user_id.trim().is_empty()
    }

    /// Whether this identity lists `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| &**g == group)
    }

    /// Whether the expiry has passed at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

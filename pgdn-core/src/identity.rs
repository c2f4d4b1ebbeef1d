//! Who a connection belongs to.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The identity an [`Authenticator`](crate::Authenticator) yields for a token:
/// a non-empty user id and the groups the user belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The user the connection belongs to. Never empty once validated.
    pub user_id: Arc<str>,
    /// The groups whose notifications this connection receives.
    #[serde(default)]
    pub groups: Vec<Arc<str>>,
}

impl Identity {
    /// An identity for `user_id` in `groups`.
    pub fn new<I, G>(user_id: impl Into<Arc<str>>, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        Identity {
            user_id: user_id.into(),
            groups: groups.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether this identity may be registered: the user id is not empty
    /// (PROTOCOL.md section 1: otherwise the connection closes with
    /// `invalid identity`).
    pub fn is_valid(&self) -> bool {
        !self.user_id.trim().is_empty()
    }

    /// Whether this identity lists `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| &**g == group)
    }
}

//! The crate's error type.

/// Errors of pgdn-core. Each variant's doc says what the caller can do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A publish was malformed (bad target, empty or reserved type, payload
    /// not an object, bad id). Fix the request; retrying it as is fails again.
    #[error("invalid publish: {0}")]
    InvalidPublish(String),
    /// The broker could not fan the message out to other nodes. The message
    /// may not have been delivered; retry with the same id later.
    #[error("broker unavailable: {0}")]
    Broker(String),
    /// The identity has no user id; the connection must be refused
    /// (`invalid identity`).
    #[error("invalid identity: user_id must not be empty")]
    InvalidIdentity,
    /// A handler cannot be registered for this type (empty or reserved).
    #[error("cannot register a handler for type `{0}`")]
    InvalidHandler(String),
    /// The session tracker failed. Connections keep working locally.
    #[error("session tracker: {0}")]
    Session(String),
    /// A setting is invalid; the message names it. Fix the configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

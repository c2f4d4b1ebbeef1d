//! The crate's error type.

/// Errors of pgdn-server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid; the message names it. Fix the configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The TLS certificate or key cannot be read or used; the message
    /// names the file and the problem. Fix the files.
    #[error("tls: {0}")]
    Tls(String),
    /// Binding or serving failed (address in use, no permission).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A JWT could not be created (only when issuing dev tokens).
    #[error("jwt: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// An error from pgdn-core (an invalid configuration among them).
    #[error(transparent)]
    Core(#[from] pgdn_core::Error),
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

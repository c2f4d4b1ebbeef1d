//! The crate's error type.

use std::time::Duration;

/// Errors of pgdn-client; each variant says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The publish key (or, for a subscriber, the token) was refused. Do
    /// not retry with the same credentials: fix them.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The server refused the request as malformed (HTTP 400/413 or another
    /// 4xx). Retrying it as is fails again; the message says what is wrong.
    #[error("rejected by the server (HTTP {status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The server's `error` text.
        message: String,
    },
    /// The server could not be reached or kept failing (connection errors,
    /// 5xx, 429) until the retry deadline. Safe to retry later: the same
    /// publish id is never delivered twice.
    #[error("server unavailable after {attempts} attempts over {elapsed:?}: {last}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last failure.
        last: String,
    },
    /// Every attempt timed out until the retry deadline. The message may or
    /// may not have been delivered; retrying with the same id is safe.
    #[error("timed out after {attempts} attempts over {elapsed:?}")]
    TimedOut {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
    },
    /// The request could not be built: a bad URL, message type or payload.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The URL needs TLS (`https://`, `wss://`) but pgdn-client was built
    /// without a TLS feature. Enable `rustls` (a default feature) or
    /// `native-tls` in your `Cargo.toml`; retrying cannot help.
    #[error(
        "{scheme} URLs need TLS, but pgdn-client was built without it: enable its `rustls` or `native-tls` feature"
    )]
    TlsNotEnabled {
        /// The scheme that needs TLS.
        scheme: &'static str,
    },
    /// The server answered something that is not pgdn's protocol.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// The token callback of a subscriber failed; the subscription stops.
    #[error("could not get a token: {0}")]
    Token(String),
    /// The client was shut down (a blocking publisher whose worker is gone).
    #[error("client closed")]
    Closed,
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<pgdn_core::Error> for Error {
    fn from(e: pgdn_core::Error) -> Self {
        Error::Invalid(e.to_string())
    }
}

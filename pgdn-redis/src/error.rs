//! The crate's error type.

/// Errors of pgdn-redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Redis could not be reached or answered with an error. Publishes fail
    /// visibly (HTTP 503) until it is back; the node reconnects by itself.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis is not usable right now (unreachable, not answering, or this
    /// node is not yet subscribed and registered); the node is working on
    /// it. Publishes fail visibly (HTTP 503) meanwhile.
    #[error("{0}")]
    Unavailable(String),
    /// Something in Redis is not what pgdn wrote there (another program
    /// using the same key prefix?).
    #[error("unexpected data in redis: {0}")]
    Corrupt(String),
    /// The Redis TLS settings are unusable (a CA certificate that is not
    /// PEM, or set for a `redis://` URL); the message says which. Fix the
    /// configuration.
    #[error("redis tls: {0}")]
    Tls(String),
    /// The cluster configuration is unusable (a malformed node id, key
    /// prefix, number of partitions or list of URLs); the message says
    /// which.
    #[error("redis configuration: {0}")]
    Config(String),
    /// A publish was malformed.
    #[error(transparent)]
    Core(#[from] pgdn_core::Error),
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for pgdn_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(e) => e,
            Error::Redis(e) => pgdn_core::Error::Broker(e.to_string()),
            Error::Corrupt(m) | Error::Unavailable(m) | Error::Tls(m) | Error::Config(m) => {
                pgdn_core::Error::Broker(m)
            }
        }
    }
}

//! The async publisher: `POST /api/v1/publish` and friends, with retries.
//! Needs the `publisher` feature (on by default); `https://` needs `rustls`
//! (on by default) or `native-tls`.

use std::time::{Duration, Instant};

use pgdn_core::{GroupPresence, MessageId, PublishReceipt, PublishRequest, Target, UserPresence};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::retry::Backoff;
use crate::tls::{self, Roots};

/// `GET /api/v1/stats`: pgdn-ws's fields, and whatever else the server
/// reports in `extra`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ServerStats {
    /// Users with at least one open connection.
    pub total_users: usize,
    /// Open connections.
    pub total_connections: usize,
    /// Groups with at least one connection.
    pub groups: Vec<String>,
    /// Connected user ids.
    pub users: Vec<String>,
    /// Every other field (counters, node id, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Builds a [`Publisher`].
#[derive(Clone)]
pub struct PublisherBuilder {
    base_url: String,
    key: String,
    request_timeout: Duration,
    deadline: Duration,
    backoff: Backoff,
    roots: Roots,
}

impl PublisherBuilder {
    /// Timeout of one HTTP attempt. Default 10 s.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }
    /// How long a publish keeps retrying before it gives up. Default 30 s.
    pub fn retry_deadline(mut self, t: Duration) -> Self {
        self.deadline = t;
        self
    }
    /// Cap of the first retry wait (default 100 ms) and of every later one
    /// (default 5 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff { initial, max };
        self
    }

    /// Trusts the CA certificate(s) in `pem` for `https://`, besides the
    /// built-in roots: for a server whose certificate a private CA signed.
    /// Call it once per PEM document; an unreadable one fails
    /// [`build`](Self::build). Needs the `rustls` or `native-tls` feature.
    #[cfg(any(feature = "rustls", feature = "native-tls"))]
    pub fn root_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.roots.add(pem.as_ref());
        self
    }

    /// Builds the publisher.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a URL that is not `http://` or `https://` or
    /// an unreadable root certificate; [`Error::TlsNotEnabled`] for an
    /// `https://` URL when pgdn-client was built without a TLS feature.
    pub fn build(self) -> Result<Publisher> {
        let base = self.base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "base URL must start with http:// or https://, got {base:?}"
            )));
        }
        tls::check(&base)?;
        let builder = reqwest::Client::builder()
            .timeout(self.request_timeout)
            .connect_timeout(self.request_timeout.min(Duration::from_secs(5)));
        let http = tls::reqwest_builder(builder, &self.roots)?
            .build()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(Publisher {
            http,
            base,
            key: self.key,
            deadline: self.deadline,
            backoff: self.backoff,
        })
    }
}

/// Publishes to a pgdn server over HTTP. Cheap to clone; share one.
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    base: String,
    key: String,
    deadline: Duration,
    backoff: Backoff,
}

// Hand-written so that the publish key never reaches a log.
impl std::fmt::Debug for PublisherBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherBuilder")
            .field("base_url", &self.base_url)
            .field("request_timeout", &self.request_timeout)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("base", &self.base)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

enum Attempt<T> {
    Done(Result<T>),
    Retry(String, bool),
}

impl Publisher {
    /// A publisher for the server at `base_url` (e.g.
    /// `http://127.0.0.1:8000`) with the publish key, default timeouts.
    pub fn new(base_url: impl Into<String>, key: impl Into<String>) -> Result<Self> {
        Self::builder(base_url, key).build()
    }

    /// A builder to set timeouts and retries.
    pub fn builder(base_url: impl Into<String>, key: impl Into<String>) -> PublisherBuilder {
        PublisherBuilder {
            base_url: base_url.into(),
            key: key.into(),
            request_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            roots: Roots::default(),
        }
    }

    /// Notifies every connection of one user.
    pub async fn notify_user(
        &self,
        user_id: &str,
        kind: &str,
        payload: impl Serialize,
    ) -> Result<PublishReceipt> {
        self.publish(PublishRequest::from_parts(
            Target::user(user_id),
            kind,
            payload,
        )?)
        .await
    }

    /// Notifies every connection of each listed user.
    pub async fn notify_users<S: AsRef<str>>(
        &self,
        user_ids: &[S],
        kind: &str,
        payload: impl Serialize,
    ) -> Result<PublishReceipt> {
        let target = Target::users(user_ids.iter().map(|u| u.as_ref()));
        self.publish(PublishRequest::from_parts(target, kind, payload)?)
            .await
    }

    /// Notifies every connection in a group.
    pub async fn notify_group(
        &self,
        group: &str,
        kind: &str,
        payload: impl Serialize,
    ) -> Result<PublishReceipt> {
        self.publish(PublishRequest::from_parts(
            Target::group(group),
            kind,
            payload,
        )?)
        .await
    }

    /// Notifies everyone except `exclude_users`.
    pub async fn broadcast<S: AsRef<str>>(
        &self,
        kind: &str,
        payload: impl Serialize,
        exclude_users: &[S],
    ) -> Result<PublishReceipt> {
        let target = Target::broadcast(exclude_users.iter().map(|u| u.as_ref()));
        self.publish(PublishRequest::from_parts(target, kind, payload)?)
            .await
    }

    /// Publishes one request. An id is generated when it has none, so that
    /// retries (here, or yours with the same request) are delivered once.
    pub async fn publish(&self, mut req: PublishRequest) -> Result<PublishReceipt> {
        req.id.get_or_insert_with(MessageId::generate);
        let body = serde_json::to_vec(&req).map_err(|e| Error::Invalid(e.to_string()))?;
        self.send("/api/v1/publish", Some(body)).await
    }

    /// Publishes several requests at once, all or nothing.
    pub async fn publish_batch(
        &self,
        mut reqs: Vec<PublishRequest>,
    ) -> Result<Vec<PublishReceipt>> {
        for r in &mut reqs {
            r.id.get_or_insert_with(MessageId::generate);
        }
        let body = serde_json::to_vec(&reqs).map_err(|e| Error::Invalid(e.to_string()))?;
        self.send("/api/v1/publish/batch", Some(body)).await
    }

    /// The server's numbers.
    pub async fn stats(&self) -> Result<ServerStats> {
        self.send("/api/v1/stats", None).await
    }

    /// Whether `user` is online anywhere in the cluster, with how many
    /// connections and since when (`GET /api/v1/presence/{user}`).
    pub async fn presence(&self, user: &str) -> Result<UserPresence> {
        let path = format!("/api/v1/presence/{}", encode(user));
        self.send(&path, None).await
    }

    /// [`Publisher::presence`] for up to 1,000 users at once, in order.
    pub async fn presence_of<S: AsRef<str>>(&self, users: &[S]) -> Result<Vec<UserPresence>> {
        #[derive(serde::Deserialize)]
        struct Reply {
            users: Vec<UserPresence>,
        }
        let users: Vec<&str> = users.iter().map(AsRef::as_ref).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "users": users }))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let reply: Reply = self.send("/api/v1/presence", Some(body)).await?;
        Ok(reply.users)
    }

    /// A page of the online members of `group`, in user id order, after
    /// `after`, at most `limit` (1 to 1,000); follow
    /// [`GroupPresence::next`] for the next page.
    pub async fn group_presence(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GroupPresence> {
        let mut path = format!("/api/v1/groups/{}/presence?limit={limit}", encode(group));
        if let Some(a) = after {
            path.push_str(&format!("&after={}", encode(a)));
        }
        self.send(&path, None).await
    }

    /// POSTs `body` (GETs without one), retrying what can be retried until
    /// the deadline.
    async fn send<T: DeserializeOwned>(&self, path: &str, body: Option<Vec<u8>>) -> Result<T> {
        let url = format!("{}{}", self.base, path);
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (last, timed_out) = match self.attempt(&url, body.as_ref()).await {
                Attempt::Done(result) => return result,
                Attempt::Retry(why, timed_out) => (why, timed_out),
            };
            let wait = self.backoff.delay(attempts);
            let elapsed = started.elapsed();
            if elapsed + wait >= self.deadline {
                return Err(if timed_out {
                    Error::TimedOut { attempts, elapsed }
                } else {
                    Error::Unavailable {
                        attempts,
                        elapsed,
                        last,
                    }
                });
            }
            tracing::debug!(attempt = attempts, error = %last, ?wait, "publish failed, retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt<T: DeserializeOwned>(&self, url: &str, body: Option<&Vec<u8>>) -> Attempt<T> {
        let req = match body {
            Some(b) => self
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(b.clone()),
            None => self.http.get(url),
        };
        let res = match req.bearer_auth(&self.key).send().await {
            Ok(res) => res,
            Err(e) => return Attempt::Retry(e.to_string(), e.is_timeout()),
        };
        let status = res.status().as_u16();
        let text = match res.text().await {
            Ok(t) => t,
            Err(e) => return Attempt::Retry(e.to_string(), e.is_timeout()),
        };
        let message = || {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect())
        };
        match status {
            200..=299 => Attempt::Done(serde_json::from_str(&text).map_err(|e| {
                Error::Protocol(format!(
                    "{e}: {}",
                    text.chars().take(200).collect::<String>()
                ))
            })),
            401 | 403 => Attempt::Done(Err(Error::Unauthorized(message()))),
            429 | 500..=599 => Attempt::Retry(format!("HTTP {status}: {}", message()), false),
            _ => Attempt::Done(Err(Error::Rejected {
                status,
                message: message(),
            })),
        }
    }
}

/// `s` as one URL path segment or query value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let p = Publisher::new("http://127.0.0.1:1", "s3cret-key").unwrap();
        assert!(!format!("{p:?}").contains("s3cret-key"));
        let b = Publisher::builder("http://127.0.0.1:1", "s3cret-key");
        assert!(!format!("{b:?}").contains("s3cret-key"));
        #[cfg(feature = "blocking")]
        {
            let blocking =
                crate::blocking::Publisher::new("http://127.0.0.1:1", "s3cret-key").unwrap();
            assert!(!format!("{blocking:?}").contains("s3cret-key"));
        }
    }
}

//! A blocking publisher for code without an async runtime: batch jobs on
//! plain threads (the role Celery workers play for pgdn-ws), scripts, and
//! `tokio::task::spawn_blocking`. Needs the `blocking` feature (on by
//! default).
//!
//! It owns one background thread with a small tokio runtime and hands each
//! call to it over a channel, waiting for the answer. Unlike calling
//! `Runtime::block_on` on the caller's thread, this works the same from a
//! plain thread, from several threads at once, and from inside
//! `spawn_blocking` (where a runtime is already entered).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use pgdn_core::{GroupPresence, PublishReceipt, PublishRequest, Target, UserPresence};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::publisher::{PublisherBuilder, ServerStats};

type Job = Box<dyn FnOnce(crate::Publisher) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

#[derive(Debug)]
struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
}

/// The blocking twin of [`crate::Publisher`], with the same methods.
/// Cheap to clone; calls from several threads run concurrently.
#[derive(Debug, Clone)]
pub struct Publisher {
    worker: Arc<Worker>,
}

impl Publisher {
    /// A publisher for the server at `base_url` with the publish key.
    pub fn new(base_url: impl Into<String>, key: impl Into<String>) -> Result<Self> {
        Self::from_builder(crate::Publisher::builder(base_url, key))
    }

    /// A publisher with the settings of an async [`PublisherBuilder`].
    pub fn from_builder(builder: PublisherBuilder) -> Result<Self> {
        let inner = builder.build()?;
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("could not start the worker runtime: {e}")))?;
        std::thread::Builder::new()
            .name("pgdn-publisher".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job(inner.clone()));
                    }
                });
            })
            .map_err(|e| Error::Invalid(format!("could not start the worker thread: {e}")))?;
        Ok(Publisher {
            worker: Arc::new(Worker { jobs }),
        })
    }

    fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(crate::Publisher) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let job: Job = Box::new(move |p| {
            Box::pin(async move {
                let _ = tx.send(f(p).await);
            })
        });
        self.worker.jobs.send(job).map_err(|_| Error::Closed)?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Notifies every connection of one user.
    pub fn notify_user(
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
    }

    /// Notifies every connection of each listed user.
    pub fn notify_users<S: AsRef<str>>(
        &self,
        user_ids: &[S],
        kind: &str,
        payload: impl Serialize,
    ) -> Result<PublishReceipt> {
        let target = Target::users(user_ids.iter().map(|u| u.as_ref()));
        self.publish(PublishRequest::from_parts(target, kind, payload)?)
    }

    /// Notifies every connection in a group.
    pub fn notify_group(
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
    }

    /// Notifies everyone except `exclude_users`.
    pub fn broadcast<S: AsRef<str>>(
        &self,
        kind: &str,
        payload: impl Serialize,
        exclude_users: &[S],
    ) -> Result<PublishReceipt> {
        let target = Target::broadcast(exclude_users.iter().map(|u| u.as_ref()));
        self.publish(PublishRequest::from_parts(target, kind, payload)?)
    }

    /// Publishes one request (an id is generated when it has none).
    pub fn publish(&self, req: PublishRequest) -> Result<PublishReceipt> {
        self.call(move |p| async move { p.publish(req).await })
    }

    /// Publishes several requests at once, all or nothing.
    pub fn publish_batch(&self, reqs: Vec<PublishRequest>) -> Result<Vec<PublishReceipt>> {
        self.call(move |p| async move { p.publish_batch(reqs).await })
    }

    /// The server's numbers.
    pub fn stats(&self) -> Result<ServerStats> {
        self.call(|p| async move { p.stats().await })
    }

    /// Whether `user` is online anywhere in the cluster
    /// ([`Publisher::presence`](crate::Publisher::presence)).
    pub fn presence(&self, user: &str) -> Result<UserPresence> {
        let user = user.to_string();
        self.call(move |p| async move { p.presence(&user).await })
    }

    /// The presence of up to 1,000 users, in order.
    pub fn presence_of<S: AsRef<str>>(&self, users: &[S]) -> Result<Vec<UserPresence>> {
        let users: Vec<String> = users.iter().map(|u| u.as_ref().to_string()).collect();
        self.call(move |p| async move { p.presence_of(&users).await })
    }

    /// A page of the online members of `group`
    /// ([`Publisher::group_presence`](crate::Publisher::group_presence)).
    pub fn group_presence(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GroupPresence> {
        let (group, after) = (group.to_string(), after.map(str::to_string));
        self.call(move |p| async move { p.group_presence(&group, after.as_deref(), limit).await })
    }
}

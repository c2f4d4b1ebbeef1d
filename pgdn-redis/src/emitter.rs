//! [`Emitter`]: publishing straight into Redis from a batch job, without an
//! HTTP hop (the role of Socket.IO's redis-emitter). Same message shape and
//! id rules as the HTTP API: the notification is built by
//! [`Envelope::from_request`], a publisher-chosen id is de-duplicated
//! cluster-wide for the same window, and the same publish script routes it.

use std::sync::Arc;

use pgdn_core::{Envelope, PublishReceipt, PublishRequest, Target};
use serde::Serialize;

use crate::broker::publish_envelope;
use crate::cluster::{Cluster, ClusterConfig};
use crate::error::Result;

/// Publishes into the cluster's Redis. Cheap to clone.
#[derive(Clone)]
pub struct Emitter {
    cluster: Cluster,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter").finish_non_exhaustive()
    }
}

impl Emitter {
    /// Connects to the deployment's Redis at `url` (a comma-separated
    /// list where the mode needs several). Use the same [`ClusterConfig`]
    /// (mode, partitions, prefix, history and dedup bounds) as the nodes.
    pub async fn connect(url: &str, config: ClusterConfig) -> Result<Emitter> {
        Ok(Emitter {
            cluster: Cluster::connect(url, "emitter", config).await?,
        })
    }

    /// Publishes one request. The receipt's `delivered` is `None`: the
    /// nodes deliver it, the emitter does not see them.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishReceipt> {
        req.target.validate()?;
        let envelope = Envelope::from_request(req, Arc::from("emitter"));
        publish_envelope(&self.cluster.shared, &envelope).await?;
        Ok(PublishReceipt {
            id: envelope.id,
            delivered: None,
        })
    }

    /// Notifies every connection of one user, on every node.
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
}

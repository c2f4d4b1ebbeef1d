//! Who a publish is for, the publish body and its receipt (docs/protocol.md
//! section 5).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::message::{MessageId, MessageType};

/// The recipients of a publish.
///
/// On the wire: `{"user":"u1"}`, `{"users":["u1","u2"]}`, `{"group":"g"}` or
/// `{"broadcast":{"exclude_users":["u3"]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Every connection of one user.
    User(Arc<str>),
    /// Every connection of each listed user.
    Users(Vec<Arc<str>>),
    /// Every connection whose identity lists the group.
    Group(Arc<str>),
    /// Every connection, except those of the excluded users.
    Broadcast(Broadcast),
}

/// The options of a broadcast target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broadcast {
    /// Users whose connections do not receive the broadcast.
    #[serde(default)]
    pub exclude_users: Vec<Arc<str>>,
}

impl Target {
    /// One user.
    pub fn user(user_id: impl Into<Arc<str>>) -> Self {
        Target::User(user_id.into())
    }
    /// Several users.
    pub fn users<I: IntoIterator<Item = S>, S: Into<Arc<str>>>(ids: I) -> Self {
        Target::Users(ids.into_iter().map(Into::into).collect())
    }
    /// One group.
    pub fn group(group: impl Into<Arc<str>>) -> Self {
        Target::Group(group.into())
    }
    /// Everyone but `exclude_users`.
    pub fn broadcast<I: IntoIterator<Item = S>, S: Into<Arc<str>>>(exclude_users: I) -> Self {
        Target::Broadcast(Broadcast {
            exclude_users: exclude_users.into_iter().map(Into::into).collect(),
        })
    }

    /// The users a `user`/`users` target names, each once, in order; empty
    /// for group and broadcast targets (whose recipients depend on who is
    /// connected). The users whose history keeps the message.
    pub fn user_recipients(&self) -> Vec<Arc<str>> {
        match self {
            Target::User(u) => vec![u.clone()],
            Target::Users(us) => {
                let mut seen = std::collections::HashSet::with_capacity(us.len());
                us.iter().filter(|u| seen.insert(&***u)).cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Checks what serde cannot: no empty user id or group name, at least one
    /// user in `users`.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::InvalidPublish(what.to_string()));
        match self {
            Target::User(u) if u.is_empty() => bad("target user must not be empty"),
            Target::Users(us) if us.is_empty() => bad("target users must not be empty"),
            Target::Users(us) if us.iter().any(|u| u.is_empty()) => {
                bad("target users must not contain an empty user id")
            }
            Target::Group(g) if g.is_empty() => bad("target group must not be empty"),
            _ => Ok(()),
        }
    }
}

/// A publish body: `{"target":..., "type":..., "payload":{...}, "id":...?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// A publisher-chosen id; a repeat within 5 minutes is not delivered
    /// again. Generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
    /// Who receives it.
    pub target: Target,
    /// The message type.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// Any JSON object; `{}` when left out.
    #[serde(default)]
    pub payload: serde_json::Map<String, serde_json::Value>,
    /// When it reaches no connection, emit a `notification.undelivered`
    /// lifecycle event (the app's cue to send a push or an e-mail).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub notify_undelivered: bool,
}

impl PublishRequest {
    /// A request with a generated id and an empty payload.
    pub fn new(target: Target, kind: MessageType) -> Self {
        PublishRequest {
            id: None,
            target,
            kind,
            payload: serde_json::Map::new(),
            notify_undelivered: false,
        }
    }

    /// Asks for a `notification.undelivered` lifecycle event when the
    /// message reaches no connection.
    pub fn notify_undelivered(mut self) -> Self {
        self.notify_undelivered = true;
        self
    }

    /// A request from a type name and any serializable payload (an object,
    /// or nothing: `()`/`null` is `{}`): what every publisher's
    /// `notify_*` methods build.
    pub fn from_parts(target: Target, kind: &str, payload: impl Serialize) -> Result<Self, Error> {
        let kind = MessageType::new(kind)?;
        let payload = match serde_json::to_value(payload) {
            Ok(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
            Ok(v) => v,
            Err(e) => return Err(Error::InvalidPublish(format!("payload: {e}"))),
        };
        PublishRequest::new(target, kind).with_payload(payload)
    }

    /// Sets the payload. Anything but a JSON object is refused.
    pub fn with_payload(mut self, payload: serde_json::Value) -> Result<Self, Error> {
        match payload {
            serde_json::Value::Object(map) => {
                self.payload = map;
                Ok(self)
            }
            _ => Err(Error::InvalidPublish(
                "payload must be a JSON object".into(),
            )),
        }
    }

    /// Sets the publisher-chosen id.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }

    /// Parses and validates a publish body from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let req: PublishRequest =
            serde_json::from_slice(bytes).map_err(|e| Error::InvalidPublish(e.to_string()))?;
        req.target.validate()?;
        Ok(req)
    }
}

/// What a publish returns: `{"id":"...","delivered":N}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReceipt {
    /// The message id (the publisher's or a generated one).
    pub id: MessageId,
    /// Connections reached on the node that took the publish; `None` where
    /// not known.
    pub delivered: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn target_shapes() {
        let cases = [
            (json!({"user":"u1"}), Target::user("u1")),
            (json!({"users":["u1","u2"]}), Target::users(["u1", "u2"])),
            (json!({"group":"admins"}), Target::group("admins")),
            (
                json!({"broadcast":{"exclude_users":["u3"]}}),
                Target::broadcast(["u3"]),
            ),
            (
                json!({"broadcast":{}}),
                Target::broadcast(Vec::<String>::new()),
            ),
        ];
        for (wire, target) in cases {
            assert_eq!(
                serde_json::from_value::<Target>(wire.clone()).unwrap(),
                target
            );
        }
        assert_eq!(
            serde_json::to_value(Target::broadcast(["u3"])).unwrap(),
            json!({"broadcast":{"exclude_users":["u3"]}})
        );
        assert!(serde_json::from_value::<Target>(json!({"room":"x"})).is_err());
        assert!(serde_json::from_value::<Target>(json!({"user":"a","group":"b"})).is_err());
    }

    #[test]
    fn publish_body() {
        let req = PublishRequest::from_json(
            br#"{"target":{"user":"u1"},"type":"info","payload":{"title":"Hi"}}"#,
        )
        .unwrap();
        assert_eq!(req.kind, MessageType::info());
        assert_eq!(req.payload["title"], json!("Hi"));
        let req = PublishRequest::from_json(br#"{"target":{"user":"u1"},"type":"x"}"#).unwrap();
        assert!(req.payload.is_empty(), "payload defaults to {{}}");

        for bad in [
            &br#"not json"#[..],
            br#"[]"#,
            br#"{"target":{"room":"x"},"type":"info"}"#,
            br#"{"target":{"user":"u1"},"type":""}"#,
            br#"{"target":{"user":"u1"},"type":"ping"}"#,
            br#"{"target":{"user":"u1"},"type":"info","payload":[1]}"#,
            br#"{"target":{"user":"u1"},"type":"info","payload":"x"}"#,
            br#"{"target":{"user":""},"type":"info"}"#,
            br#"{"target":{"users":[]},"type":"info"}"#,
            br#"{"target":{"user":"u1"},"type":"info","id":"has space"}"#,
            br#"{"target":{"user":"u1"},"kind":"info"}"#,
        ] {
            let err = PublishRequest::from_json(bad);
            assert!(err.is_err(), "{} should fail", String::from_utf8_lossy(bad));
        }
    }
}

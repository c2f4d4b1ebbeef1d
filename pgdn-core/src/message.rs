//! Message types, message ids, timestamps and the notification frame.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Message types a publisher may not use: they name protocol frames
/// (docs/protocol.md section 2).
pub const RESERVED_TYPES: [&str; 6] = [
    "connection",
    "ping",
    "pong",
    "refresh",
    "refreshed",
    "close",
];

/// The built-in message types of pgdn-ws; any other non-empty string is a
/// custom type.
pub const BUILTIN_TYPES: [&str; 5] = ["info", "success", "warning", "danger", "error"];

/// Longest accepted message type, in bytes.
pub const MAX_TYPE_LEN: usize = 128;

/// A validated, publishable message type: `info`, `success`, `warning`,
/// `danger`, `error` or any custom non-empty string that is not reserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct MessageType(Arc<str>);

impl MessageType {
    /// `info`.
    pub fn info() -> Self {
        MessageType(Arc::from("info"))
    }
    /// `success`.
    pub fn success() -> Self {
        MessageType(Arc::from("success"))
    }
    /// `warning`.
    pub fn warning() -> Self {
        MessageType(Arc::from("warning"))
    }
    /// `danger`.
    pub fn danger() -> Self {
        MessageType(Arc::from("danger"))
    }
    /// `error`.
    pub fn error() -> Self {
        MessageType(Arc::from("error"))
    }

    /// Validates `s` as a publishable type: not empty, at most
    /// [`MAX_TYPE_LEN`] bytes, not one of [`RESERVED_TYPES`].
    pub fn new(s: impl AsRef<str>) -> Result<Self, Error> {
        let s = s.as_ref();
        if s.is_empty() {
            return Err(Error::InvalidPublish("type must not be empty".into()));
        }
        if s.len() > MAX_TYPE_LEN {
            return Err(Error::InvalidPublish(format!(
                "type must be at most {MAX_TYPE_LEN} bytes"
            )));
        }
        if RESERVED_TYPES.contains(&s) {
            return Err(Error::InvalidPublish(format!(
                "type `{s}` is reserved for protocol frames"
            )));
        }
        Ok(MessageType(Arc::from(s)))
    }

    /// Whether this is one of the [`BUILTIN_TYPES`].
    pub fn is_builtin(&self) -> bool {
        BUILTIN_TYPES.contains(&&*self.0)
    }

    /// The type as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        MessageType::new(&*s).map_err(serde::de::Error::custom)
    }
}

/// Longest accepted message id, in bytes (docs/protocol.md section 5).
pub const MAX_ID_LEN: usize = 128;

/// A message id: 1-128 characters of `[A-Za-z0-9_.:-]`, either chosen by the
/// publisher or generated (a UUID v7, so generated ids sort by time).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct MessageId(Arc<str>);

impl MessageId {
    /// A fresh, unique, time-ordered id.
    pub fn generate() -> Self {
        MessageId(Arc::from(uuid::Uuid::now_v7().to_string()))
    }

    /// Validates a publisher-chosen id.
    pub fn new(s: impl AsRef<str>) -> Result<Self, Error> {
        let s = s.as_ref();
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(MessageId(Arc::from(s)))
        } else {
            Err(Error::InvalidPublish(
                "id must be 1-128 characters of [A-Za-z0-9_.:-]".into(),
            ))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        MessageId::new(&*s).map_err(serde::de::Error::custom)
    }
}

/// The current time as RFC 3339 UTC with milliseconds, e.g.
/// `2026-11-27T03:30:16.123Z`.
pub fn timestamp_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A notification as it goes over the wire (docs/protocol.md section 2).
///
/// Built once per publish and serialized once; every connection gets the
/// same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Unique message id.
    pub id: MessageId,
    /// The message type.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// Any JSON object.
    pub payload: serde_json::Map<String, serde_json::Value>,
    /// When the message was accepted, RFC 3339 UTC.
    pub timestamp: String,
    /// Present on notifications published to one user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Arc<str>>,
    /// Present on group notifications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_ids: Option<Vec<Arc<str>>>,
}

impl Notification {
    /// The JSON text of this notification, as sent to clients.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and a JSON map cannot fail.
        serde_json::to_string(self).expect("notification serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_validate() {
        for t in BUILTIN_TYPES {
            assert!(MessageType::new(t).unwrap().is_builtin());
        }
        assert!(!MessageType::new("task_progress").unwrap().is_builtin());
        for t in RESERVED_TYPES {
            let err = MessageType::new(t).unwrap_err().to_string();
            assert!(err.contains("reserved"), "{err}");
        }
        assert!(MessageType::new("").is_err());
        assert!(serde_json::from_value::<MessageType>(json!("pong")).is_err());
    }

    #[test]
    fn ids_validate() {
        assert!(MessageId::new("job-42:step.1_a").is_ok());
        assert!(MessageId::new("").is_err());
        assert!(MessageId::new("a b").is_err());
        assert!(MessageId::new("x".repeat(129)).is_err());
        assert!(MessageId::new("x".repeat(128)).is_ok());
        let a = MessageId::generate();
        let b = MessageId::generate();
        assert_ne!(a, b);
        assert!(
            MessageId::new(a.as_str()).is_ok(),
            "generated ids are valid ids"
        );
    }

    #[test]
    fn notification_shape() {
        let mut payload = serde_json::Map::new();
        payload.insert("title".into(), json!("Hi"));
        let n = Notification {
            id: MessageId::new("m1").unwrap(),
            kind: MessageType::info(),
            payload,
            timestamp: "2026-11-27T03:30:16.123Z".into(),
            user_id: Some("u1".into()),
            group_ids: None,
        };
        let v: serde_json::Value = serde_json::from_str(&n.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"id":"m1","type":"info","payload":{"title":"Hi"},
                   "timestamp":"2026-11-27T03:30:16.123Z","user_id":"u1"})
        );
        let g = Notification {
            user_id: None,
            group_ids: Some(vec!["admins".into()]),
            ..n
        };
        let v: serde_json::Value = serde_json::from_str(&g.to_json()).unwrap();
        assert_eq!(v["group_ids"], json!(["admins"]));
        assert!(v.get("user_id").is_none());
    }

    #[test]
    fn timestamp_is_rfc3339_utc() {
        let ts = timestamp_now();
        assert!(ts.ends_with('Z'), "{ts}");
        assert_eq!(ts.len(), "2026-11-27T03:30:16.123Z".len(), "{ts}");
        assert!(humantime::parse_rfc3339(&ts).is_ok());
    }
}

//! Protocol frames other than notifications: the connection, pong and error
//! frames the server sends, and parsing of the frames a client sends
//! (docs/protocol.md sections 1 to 3).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::message::timestamp_now;

/// The first frame on every accepted connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionFrame {
    /// Always `connection`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `connected`.
    pub status: String,
    /// The authenticated user.
    pub user_id: String,
    /// Opaque id of this connection.
    pub connection_id: String,
    /// When the connection was registered, RFC 3339 UTC.
    pub timestamp: String,
}

impl ConnectionFrame {
    /// The frame for a connection just registered.
    pub fn new(user_id: &str, connection_id: &str) -> Self {
        ConnectionFrame {
            kind: "connection".into(),
            status: "connected".into(),
            user_id: user_id.into(),
            connection_id: connection_id.into(),
            timestamp: timestamp_now(),
        }
    }

    /// JSON text of the frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("connection frame serializes")
    }
}

/// The reply to an application-level ping: `{"type":"pong","timestamp":<echoed>}`.
pub fn pong_json(timestamp: &Value) -> String {
    serde_json::json!({"type": "pong", "timestamp": timestamp}).to_string()
}

/// The answer to an accepted in-band refresh:
/// `{"type":"refreshed","expires_at":"<RFC 3339 UTC or null>"}`.
pub fn refreshed_json(expires_at: Option<std::time::SystemTime>) -> String {
    let at = expires_at.map(|t| humantime::format_rfc3339_millis(t).to_string());
    serde_json::json!({"type": "refreshed", "expires_at": at}).to_string()
}

/// Machine-readable codes of error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame was not JSON.
    InvalidJson,
    /// The frame was JSON but not an object with a string `type`, or binary.
    InvalidMessage,
    /// No handler is registered for the frame's type.
    UnknownType,
    /// The handler for the frame's type failed.
    HandlerError,
    /// Resume could not reach back to the requested id (docs/protocol.md section 4).
    HistoryGap,
    /// An in-band token refresh was refused; the old expiry stands
    /// (docs/protocol.md section 1).
    RefreshFailed,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::HandlerError => "handler_error",
            ErrorCode::HistoryGap => "history_gap",
            ErrorCode::RefreshFailed => "refresh_failed",
        }
    }
}

/// `{"type":"error","message":"<human text>","code":"<machine code>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Human-readable explanation.
    pub message: String,
    /// Machine-readable code, see [`ErrorCode`].
    pub code: String,
}

impl ErrorFrame {
    /// An error frame with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorFrame {
            kind: "error".into(),
            message: message.into(),
            code: code.as_str().into(),
        }
    }

    /// JSON text of the frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("error frame serializes")
    }
}

/// Why an inbound frame was refused; becomes an [`ErrorFrame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    /// The machine code.
    pub code: ErrorCode,
    /// The human text.
    pub message: String,
}

impl FrameError {
    /// A frame error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
        }
    }

    /// The error frame to send back.
    pub fn to_frame(&self) -> ErrorFrame {
        ErrorFrame::new(self.code, self.message.clone())
    }
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `{"type":"ping","timestamp":<any>}`; the timestamp (or `null`) is echoed.
    Ping {
        /// Echoed in the pong.
        timestamp: Value,
    },
    /// `{"type":"refresh","token":"..."}`: a new token for this connection
    /// (docs/protocol.md section 1). `None` when `token` is missing or not a
    /// string.
    Refresh {
        /// The new token.
        token: Option<String>,
    },
    /// Any other type: for the handler registered for it.
    Custom {
        /// The frame's `type`.
        kind: String,
        /// The whole frame object, `type` included.
        data: Map<String, Value>,
    },
}

impl ClientFrame {
    /// Parses one text frame (docs/protocol.md section 3).
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| FrameError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
        let Value::Object(mut data) = value else {
            return Err(FrameError::new(
                ErrorCode::InvalidMessage,
                "a frame must be a JSON object",
            ));
        };
        let kind = match data.get("type") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(FrameError::new(
                    ErrorCode::InvalidMessage,
                    "a frame must have a non-empty string `type`",
                ));
            }
        };
        if kind == "ping" {
            let timestamp = data.remove("timestamp").unwrap_or(Value::Null);
            return Ok(ClientFrame::Ping { timestamp });
        }
        if kind == "refresh" {
            let token = match data.remove("token") {
                Some(Value::String(t)) => Some(t),
                _ => None,
            };
            return Ok(ClientFrame::Refresh { token });
        }
        Ok(ClientFrame::Custom { kind, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn connection_frame_shape() {
        let f = ConnectionFrame::new("u1", "n1-7");
        let v: Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["type"], "connection");
        assert_eq!(v["status"], "connected");
        assert_eq!(v["user_id"], "u1");
        assert_eq!(v["connection_id"], "n1-7");
        assert!(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
        assert_eq!(v.as_object().unwrap().len(), 5);
    }

    #[test]
    fn pong_and_error_shapes() {
        let v: Value = serde_json::from_str(&pong_json(&json!(12345))).unwrap();
        assert_eq!(v, json!({"type":"pong","timestamp":12345}));
        let v: Value =
            serde_json::from_str(&ErrorFrame::new(ErrorCode::UnknownType, "no handler").to_json())
                .unwrap();
        assert_eq!(
            v,
            json!({"type":"error","message":"no handler","code":"unknown_type"})
        );
    }

    #[test]
    fn parse_client_frames() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping","timestamp":"t1"}"#).unwrap(),
            ClientFrame::Ping {
                timestamp: json!("t1")
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping {
                timestamp: Value::Null
            }
        );
        match ClientFrame::parse(r#"{"type":"chat","text":"hi"}"#).unwrap() {
            ClientFrame::Custom { kind, data } => {
                assert_eq!(kind, "chat");
                assert_eq!(data["text"], "hi");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ClientFrame::parse(r#"{"type":"refresh","token":"t"}"#).unwrap(),
            ClientFrame::Refresh {
                token: Some("t".into())
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"refresh","token":5}"#).unwrap(),
            ClientFrame::Refresh { token: None }
        );
        let v: Value = serde_json::from_str(&refreshed_json(None)).unwrap();
        assert_eq!(v, json!({"type":"refreshed","expires_at":null}));
        let code = |s: &str| ClientFrame::parse(s).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidMessage);
        assert_eq!(code("\"ping\""), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"no_type":1}"#), ErrorCode::InvalidMessage);
    }
}

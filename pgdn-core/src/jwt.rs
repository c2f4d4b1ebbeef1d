//! The built-in authenticator: HS256 JWTs (the `jsonwebtoken` crate), on
//! by default through the `jwt` feature, usable by any adapter.
//!
//! `sub` is the user id and the `groups` claim (array of strings) the groups;
//! `exp` is required and enforced with at most 60 s of leeway, at connect
//! and on live connections (the identity expires at `exp` + leeway); the
//! algorithm is pinned to HS256, so a token signed with anything else (or
//! `none`) is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{AuthError, AuthRequest, Authenticator, Identity};
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Default leeway allowed on `exp`, in seconds (PROTOCOL.md: at most 60).
pub const LEEWAY_SECS: u64 = 60;

/// The claims pgdn reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The user's groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Verifies HS256 JWTs signed with one shared secret.
#[derive(Clone)]
pub struct JwtAuthenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    leeway: u64,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("JwtAuthenticator").finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// An authenticator for tokens signed with `secret`, with the default
    /// leeway of 60 s on `exp`.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        JwtAuthenticator {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            leeway: 0,
        }
        .leeway(Duration::from_secs(LEEWAY_SECS))
    }

    /// Sets the leeway on `exp` (whole seconds, at most 60: PROTOCOL.md
    /// section 1): a token is accepted, and a live connection kept, until
    /// `exp` + leeway. Zero makes expiry exact.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway.as_secs().min(LEEWAY_SECS);
        self.validation.leeway = self.leeway;
        self
    }

    /// Issues a token for `user_id` in `groups`, valid for `ttl`: for dev
    /// mode, tests and backends that mint their own tokens.
    pub fn issue(
        &self,
        user_id: &str,
        groups: &[&str],
        ttl: Duration,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let exp = SystemTime::now()
            .checked_add(ttl)
            .unwrap_or(SystemTime::now())
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.encode(&Claims {
            sub: Some(user_id.to_string()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            exp,
        })
    }

    /// Signs arbitrary claims (for tests of odd tokens).
    pub fn encode(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        let token = req.require_token()?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            // The error names what failed (signature, expiry, format), never the token.
            .map_err(|e| AuthError::InvalidToken(e.kind_description()))?;
        let user_id = data.claims.sub.unwrap_or_default();
        let expires_at =
            UNIX_EPOCH + Duration::from_secs(data.claims.exp.saturating_add(self.leeway));
        let identity = Identity::new(user_id, data.claims.groups).with_expiry(Some(expires_at));
        if !identity.is_valid() {
            return Err(AuthError::InvalidIdentity);
        }
        Ok(identity)
    }
}

trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for jsonwebtoken::errors::Error {
    fn kind_description(&self) -> String {
        use jsonwebtoken::errors::ErrorKind;
        match self.kind() {
            ErrorKind::ExpiredSignature => "expired".into(),
            ErrorKind::InvalidSignature => "bad signature".into(),
            ErrorKind::InvalidAlgorithm => "algorithm not allowed".into(),
            ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
            ErrorKind::ImmatureSignature => "not yet valid".into(),
            _ => "malformed".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[tokio::test]
    async fn accepts_valid_and_refuses_the_rest() {
        let auth = JwtAuthenticator::new(b"secret");
        let t = auth
            .issue("u1", &["admins"], Duration::from_secs(60))
            .unwrap();
        let id = auth.authenticate(&AuthRequest::token(&t)).await.unwrap();
        assert_eq!(&*id.user_id, "u1");
        assert!(id.in_group("admins"));

        assert_eq!(
            auth.authenticate(&AuthRequest::token("")).await,
            Err(AuthError::MissingToken)
        );
        assert!(matches!(
            auth.authenticate(&AuthRequest::token("garbage")).await,
            Err(AuthError::InvalidToken(_))
        ));

        let other = JwtAuthenticator::new(b"other");
        let forged = other.issue("u1", &[], Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth.authenticate(&AuthRequest::token(&forged)).await,
            Err(AuthError::InvalidToken(_))
        ));

        let expired = auth
            .encode(&Claims {
                sub: Some("u1".into()),
                groups: vec![],
                exp: now() - 3600,
            })
            .unwrap();
        assert_eq!(
            auth.authenticate(&AuthRequest::token(&expired)).await,
            Err(AuthError::InvalidToken("expired".into()))
        );
        let within_leeway = auth
            .encode(&Claims {
                sub: Some("u1".into()),
                groups: vec![],
                exp: now() - 10,
            })
            .unwrap();
        assert!(
            auth.authenticate(&AuthRequest::token(&within_leeway))
                .await
                .is_ok()
        );

        let no_sub = auth
            .encode(&Claims {
                sub: None,
                groups: vec![],
                exp: now() + 60,
            })
            .unwrap();
        assert_eq!(
            auth.authenticate(&AuthRequest::token(&no_sub)).await,
            Err(AuthError::InvalidIdentity)
        );

        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &Claims {
                sub: Some("u1".into()),
                groups: vec![],
                exp: now() + 60,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(matches!(
            auth.authenticate(&AuthRequest::token(&hs384)).await,
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[tokio::test]
    async fn refuses_alg_none_and_missing_exp() {
        use base64_url as b64;
        let auth = JwtAuthenticator::new(b"secret");
        let header = b64::encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64::encode(format!(r#"{{"sub":"u1","exp":{}}}"#, now() + 60).as_bytes());
        let none = format!("{header}.{body}.");
        assert!(matches!(
            auth.authenticate(&AuthRequest::token(&none)).await,
            Err(AuthError::InvalidToken(_))
        ));

        #[derive(Serialize)]
        struct NoExp {
            sub: String,
        }
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoExp { sub: "u1".into() },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(matches!(
            auth.authenticate(&AuthRequest::token(&no_exp)).await,
            Err(AuthError::InvalidToken(_))
        ));
    }

    /// Minimal base64url (no padding) for building a forged `alg: none` token.
    mod base64_url {
        pub fn encode(input: &[u8]) -> String {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                let chars = chunk.len() + 1;
                for i in 0..chars {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}

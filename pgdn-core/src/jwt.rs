//! The built-in authenticator: JWTs (the `jsonwebtoken` crate), on by
//! default through the `jwt` feature, usable by any adapter.
//!
//! `sub` is the user id and the `groups` claim (array of strings) the groups;
//! `exp` is required and enforced with at most 60 s of leeway, at connect
//! and on live connections (the identity expires at `exp` + leeway). The
//! other registered claims are checked too:
//!
//! - `nbf` (when present): refused before `nbf` - leeway;
//! - `iat` (when present): refused when it is more than the leeway in the
//!   future (a token cannot be issued later than now);
//! - `iss`: checked only when issuers are configured ([`JwtAuthenticator::issuer`]);
//!   the claim is then required;
//! - `aud`: checked only when audiences are configured
//!   ([`JwtAuthenticator::audience`]); the claim is then required. With no
//!   audience configured a token carrying `aud` is accepted, since most
//!   libraries put one in by default;
//! - lifetime: with [`JwtAuthenticator::max_lifetime`], `exp - iat` (or
//!   `exp - now` for a token without `iat`) must not exceed it.
//!
//! The algorithm is pinned to the key: HS256 for a shared secret
//! ([`JwtAuthenticator::new`]), RS256 for an RSA public key and ES256 for a
//! P-256 one ([`JwtAuthenticator::public_key_pem`], or each key of a JSON
//! Web Key Set: [`JwtAuthenticator::jwks`]), so a token signed with
//! anything else (or `none`) is refused.

pub mod jwks;

pub use jwks::{JwksFetcher, JwksKeys};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{AuthError, AuthRequest, Authenticator, Identity};
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Default leeway allowed on `exp`, `nbf` and `iat`, in seconds
/// (docs/protocol.md: at most 60).
pub const LEEWAY_SECS: u64 = 60;

/// The claims pgdn writes (and reads: `sub`, `groups`, `exp`).
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

/// What a verified token yields: [`Claims`] plus `iat`, which the lifetime
/// rules read (`nbf`, `iss` and `aud` are checked by `jsonwebtoken`).
#[derive(Deserialize)]
struct Verified {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    exp: u64,
    /// Seconds since the epoch; some libraries write fractions.
    #[serde(default)]
    iat: Option<f64>,
}

/// The verification key and the one algorithm it accepts.
#[derive(Clone)]
enum Keys {
    /// One fixed key: a shared secret (HS256) or a public key.
    Static {
        decoding: DecodingKey,
        /// Only for a shared secret: tokens can then be issued too.
        encoding: Option<EncodingKey>,
    },
    /// A key set, each key selected by the token's `kid`.
    Jwks(JwksKeys),
}

/// Verifies JWTs: HS256 with a shared secret, RS256 or ES256 with a public
/// key or a JSON Web Key Set. Each key accepts exactly one algorithm.
#[derive(Clone)]
pub struct JwtAuthenticator {
    keys: Keys,
    validation: Validation,
    leeway: u64,
    max_lifetime: Option<Duration>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        let keys = match &self.keys {
            Keys::Static {
                encoding: Some(_), ..
            } => "secret (HS256)",
            Keys::Static { .. } => "public key",
            Keys::Jwks(_) => "jwks (RS256, ES256)",
        };
        f.debug_struct("JwtAuthenticator")
            .field("keys", &keys)
            .field("algorithm", &self.algorithm())
            .field("issuers", &self.validation.iss)
            .field("audiences", &self.validation.aud)
            .field("leeway", &self.leeway)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// An authenticator for HS256 tokens signed with `secret`, with the
    /// default leeway of 60 s.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        Self::with_keys(
            Keys::Static {
                decoding: DecodingKey::from_secret(secret),
                encoding: Some(EncodingKey::from_secret(secret)),
            },
            Algorithm::HS256,
        )
    }

    /// An authenticator for RS256 tokens, verified with an RSA public key
    /// (at least 2048 bits) in PEM: `BEGIN PUBLIC KEY` (SPKI, what
    /// `openssl pkey -pubout` writes) or `BEGIN RSA PUBLIC KEY` (PKCS#1).
    /// The algorithm is pinned: HS256 tokens (whatever their secret, the
    /// public key included) and every other `alg` are refused.
    pub fn rs256_pem(pem: impl AsRef<[u8]>) -> crate::Result<Self> {
        let pem = pem_text(pem.as_ref())?;
        let key = rsa_public_key(pem).ok_or_else(|| {
            crate::Error::Config(format!("not an RSA public key in PEM{}", pem_hint(pem)))
        })?;
        Ok(Self::public(key?, Algorithm::RS256))
    }

    /// An authenticator for ES256 tokens, verified with a P-256 public key
    /// in PEM (`BEGIN PUBLIC KEY`). The algorithm is pinned to ES256.
    pub fn es256_pem(pem: impl AsRef<[u8]>) -> crate::Result<Self> {
        let pem = pem_text(pem.as_ref())?;
        let key = p256_public_key(pem).ok_or_else(|| {
            crate::Error::Config(format!("not a P-256 public key in PEM{}", pem_hint(pem)))
        })?;
        Ok(Self::public(key, Algorithm::ES256))
    }

    /// [`rs256_pem`](Self::rs256_pem) or [`es256_pem`](Self::es256_pem),
    /// whichever the key is: the algorithm follows the key's type.
    pub fn public_key_pem(pem: impl AsRef<[u8]>) -> crate::Result<Self> {
        let pem = pem_text(pem.as_ref())?;
        if let Some(key) = rsa_public_key(pem) {
            return Ok(Self::public(key?, Algorithm::RS256));
        }
        if let Some(key) = p256_public_key(pem) {
            return Ok(Self::public(key, Algorithm::ES256));
        }
        Err(crate::Error::Config(format!(
            "not an RSA or P-256 public key in PEM{}",
            pem_hint(pem)
        )))
    }

    /// An authenticator for RS256 and ES256 tokens verified with the keys
    /// of a JSON Web Key Set, selected by the token's `kid` (a token without
    /// `kid` only when the set has one key); each key accepts the one
    /// algorithm of its type. See [`JwksKeys`] for caching and refresh.
    pub fn jwks(keys: JwksKeys) -> Self {
        Self::with_keys(Keys::Jwks(keys), Algorithm::RS256)
    }

    fn public(key: DecodingKey, algorithm: Algorithm) -> Self {
        Self::with_keys(
            Keys::Static {
                decoding: key,
                encoding: None,
            },
            algorithm,
        )
    }

    /// The algorithm tokens must be signed with, where one key is fixed
    /// (`None` for a key set, where each key pins its own).
    pub fn algorithm(&self) -> Option<Algorithm> {
        match &self.keys {
            Keys::Static { .. } => self.validation.algorithms.first().copied(),
            Keys::Jwks(_) => None,
        }
    }

    fn with_keys(keys: Keys, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Checked only against configured audiences (see `audience`).
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        JwtAuthenticator {
            keys,
            validation,
            leeway: 0,
            max_lifetime: None,
        }
        .leeway(Duration::from_secs(LEEWAY_SECS))
    }

    /// Sets the leeway on `exp`, `nbf` and `iat` (whole seconds, at most
    /// 60: docs/protocol.md section 1): a token is accepted, and a live
    /// connection kept, until `exp` + leeway. Zero makes expiry exact.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway.as_secs().min(LEEWAY_SECS);
        self.validation.leeway = self.leeway;
        self
    }

    /// Accepts only tokens whose `iss` is `issuer` (or, called several
    /// times, one of the issuers given); a token without `iss` is refused.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.validation
            .iss
            .get_or_insert_with(Default::default)
            .insert(issuer.into());
        self.validation.required_spec_claims.insert("iss".into());
        self
    }

    /// Accepts only tokens whose `aud` names `audience` (or, called several
    /// times, one of the audiences given); a token without `aud` is
    /// refused. Without any, `aud` is not checked.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.validation
            .aud
            .get_or_insert_with(Default::default)
            .insert(audience.into());
        self.validation.validate_aud = true;
        self.validation.required_spec_claims.insert("aud".into());
        self
    }

    /// Refuses tokens valid for longer than `max`: `exp - iat`, or
    /// `exp - now` for a token without `iat`. A leaked long-lived token is
    /// then useless, whoever minted it.
    pub fn max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = Some(max);
        self
    }

    /// Issues a token for `user_id` in `groups`, valid for `ttl`: for dev
    /// mode, tests and backends that mint their own tokens. Only an
    /// authenticator made with a secret can issue (others have no private
    /// key): the error is then `InvalidKeyFormat`.
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

    /// Signs arbitrary claims with the secret, HS256 (for tests of odd
    /// tokens). Fails with `InvalidKeyFormat` without a secret.
    pub fn encode<T: Serialize>(&self, claims: &T) -> Result<String, jsonwebtoken::errors::Error> {
        match &self.keys {
            Keys::Static {
                encoding: Some(encoding),
                ..
            } => jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, encoding),
            _ => Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into()),
        }
    }

    /// The lifetime and `iat` rules, on claims whose signature, `exp`,
    /// `nbf`, `iss` and `aud` already passed.
    fn check_times(&self, claims: &Verified) -> Result<(), AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let exp = claims.exp as f64;
        if let Some(iat) = claims.iat {
            if !iat.is_finite() {
                return Err(AuthError::InvalidToken("malformed".into()));
            }
            if iat > now + self.leeway as f64 {
                return Err(AuthError::InvalidToken("issued in the future".into()));
            }
        }
        if let Some(max) = self.max_lifetime {
            let lifetime = exp - claims.iat.unwrap_or(now);
            if lifetime > max.as_secs_f64() {
                return Err(AuthError::InvalidToken("lifetime too long".into()));
            }
        }
        Ok(())
    }
}

/// The shortest HS256 secret [`JwtAuthenticator::try_new`] (and
/// [`ServiceBuilder::jwt_secret`](crate::ServiceBuilder::jwt_secret))
/// accept, in bytes: HS256 keys should be at least as long as the hash
/// (RFC 7518 section 3.2), and anything shorter invites a brute force.
pub const MIN_SECRET_LEN: usize = 32;

impl JwtAuthenticator {
    /// Like [`JwtAuthenticator::new`], refusing a secret shorter than
    /// [`MIN_SECRET_LEN`] bytes (an empty one included: with it, anyone
    /// can sign tokens for any user and group). `new` itself takes any
    /// secret, for tests that use short ones on purpose.
    pub fn try_new(secret: impl AsRef<[u8]>) -> crate::Result<Self> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET_LEN {
            // Never name the secret itself.
            return Err(crate::Error::Config(format!(
                "the JWT secret must be at least {MIN_SECRET_LEN} bytes; this one has {}",
                secret.len()
            )));
        }
        Ok(Self::new(secret))
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        let token = req.require_token()?;
        let data = match &self.keys {
            Keys::Static { decoding, .. } => {
                jsonwebtoken::decode::<Verified>(token, decoding, &self.validation)
            }
            Keys::Jwks(keys) => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|e| AuthError::InvalidToken(e.kind_description()))?;
                // Refused before any key lookup: a symmetric or unknown
                // `alg` never makes the set be fetched.
                if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
                    return Err(AuthError::InvalidToken("algorithm not allowed".into()));
                }
                let key = keys.key(header.kid.as_deref()).await?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![key.algorithm];
                jsonwebtoken::decode::<Verified>(token, &key.decoding, &validation)
            }
        }
        // The error names what failed (signature, expiry, format), never the token.
        .map_err(|e| AuthError::InvalidToken(e.kind_description()))?;
        self.check_times(&data.claims)?;
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

/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

fn pem_text(pem: &[u8]) -> crate::Result<&str> {
    std::str::from_utf8(pem)
        .map(str::trim)
        .map_err(|_| crate::Error::Config("a PEM key must be text".into()))
}

/// Says why a PEM that is no public key was refused, without echoing it.
fn pem_hint(pem: &str) -> &'static str {
    if pem.contains("PRIVATE KEY") {
        " (this is a private key: give the public key, e.g. `openssl pkey -in key.pem -pubout`)"
    } else if pem.contains("CERTIFICATE") {
        " (this is a certificate: give its public key, e.g. `openssl x509 -in cert.pem -pubkey -noout`)"
    } else {
        ""
    }
}

/// An RSA public key from PEM: `None` if it is none, an error if it is one
/// too small to trust.
pub(crate) fn rsa_public_key(pem: &str) -> Option<crate::Result<DecodingKey>> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    let key = rsa::RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
        .ok()?;
    Some(rsa_decoding_key(&key))
}

pub(crate) fn rsa_decoding_key(key: &rsa::RsaPublicKey) -> crate::Result<DecodingKey> {
    use rsa::traits::PublicKeyParts;
    let bits = key.n().bits();
    if bits < MIN_RSA_BITS {
        return Err(crate::Error::Config(format!(
            "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
        )));
    }
    Ok(DecodingKey::from_rsa_raw_components(
        &key.n().to_bytes_be(),
        &key.e().to_bytes_be(),
    ))
}

/// A P-256 public key from PEM (SPKI).
fn p256_public_key(pem: &str) -> Option<DecodingKey> {
    use p256::pkcs8::DecodePublicKey;
    let key = p256::PublicKey::from_public_key_pem(pem).ok()?;
    Some(p256_decoding_key(&key))
}

pub(crate) fn p256_decoding_key(key: &p256::PublicKey) -> DecodingKey {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    DecodingKey::from_ec_der(key.to_encoded_point(false).as_bytes())
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
            ErrorKind::InvalidIssuer => "wrong issuer".into(),
            ErrorKind::InvalidAudience => "wrong audience".into(),
            _ => "malformed".into(),
        }
    }
}

#[cfg(test)]
mod test_keys;

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
        use super::test_keys::b64;
        let auth = JwtAuthenticator::new(b"secret");
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64(format!(r#"{{"sub":"u1","exp":{}}}"#, now() + 60).as_bytes());
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

    async fn check(auth: &JwtAuthenticator, token: &str) -> Result<Identity, AuthError> {
        auth.authenticate(&AuthRequest::token(token)).await
    }

    fn refused(reason: &str) -> Result<Identity, AuthError> {
        Err(AuthError::InvalidToken(reason.into()))
    }

    #[tokio::test]
    async fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        let auth = JwtAuthenticator::new(b"secret");
        let at = |nbf: u64| {
            auth.encode(&serde_json::json!({"sub": "u1", "exp": now() + 600, "nbf": nbf}))
                .unwrap()
        };
        assert_eq!(
            check(&auth, &at(now() + 300)).await,
            refused("not yet valid")
        );
        assert!(check(&auth, &at(now() + 30)).await.is_ok(), "within leeway");
        assert!(check(&auth, &at(now() - 30)).await.is_ok());
        let exact = auth.clone().leeway(Duration::ZERO);
        assert_eq!(
            check(&exact, &at(now() + 30)).await,
            refused("not yet valid")
        );
        let bad = auth
            .encode(&serde_json::json!({"sub": "u1", "exp": now() + 600, "nbf": "soon"}))
            .unwrap();
        assert_eq!(check(&auth, &bad).await, refused("malformed"));
    }

    #[tokio::test]
    async fn iat_in_the_future_is_refused_beyond_the_leeway() {
        let auth = JwtAuthenticator::new(b"secret");
        let at = |iat: serde_json::Value| {
            auth.encode(&serde_json::json!({"sub": "u1", "exp": now() + 7200, "iat": iat}))
                .unwrap()
        };
        assert_eq!(
            check(&auth, &at((now() + 3600).into())).await,
            refused("issued in the future")
        );
        assert!(
            check(&auth, &at((now() + 30).into())).await.is_ok(),
            "within leeway"
        );
        assert!(check(&auth, &at((now() - 30).into())).await.is_ok());
        assert!(
            check(&auth, &at((now() as f64 - 0.5).into())).await.is_ok(),
            "fractional iat"
        );
        assert_eq!(
            check(&auth, &at("yesterday".into())).await,
            refused("malformed")
        );
        let exact = auth.clone().leeway(Duration::ZERO);
        assert_eq!(
            check(&exact, &at((now() + 30).into())).await,
            refused("issued in the future")
        );
    }

    #[tokio::test]
    async fn issuer_is_checked_when_configured() {
        let minted = JwtAuthenticator::new(b"secret");
        let from = |iss: Option<&str>| {
            let mut claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
            if let Some(iss) = iss {
                claims["iss"] = iss.into();
            }
            minted.encode(&claims).unwrap()
        };
        // Not configured: any issuer, or none.
        assert!(check(&minted, &from(Some("anyone"))).await.is_ok());
        assert!(check(&minted, &from(None)).await.is_ok());

        let auth = JwtAuthenticator::new(b"secret").issuer("https://idp.example");
        assert!(
            check(&auth, &from(Some("https://idp.example")))
                .await
                .is_ok()
        );
        assert_eq!(
            check(&auth, &from(Some("https://evil.example"))).await,
            refused("wrong issuer")
        );
        assert_eq!(
            check(&auth, &from(None)).await,
            refused("missing claim iss")
        );
        let two = auth.issuer("https://other.example");
        assert!(
            check(&two, &from(Some("https://other.example")))
                .await
                .is_ok()
        );
        assert!(
            check(&two, &from(Some("https://idp.example")))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn audience_is_checked_only_when_configured() {
        let minted = JwtAuthenticator::new(b"secret");
        let for_aud = |aud: Option<serde_json::Value>| {
            let mut claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
            if let Some(aud) = aud {
                claims["aud"] = aud;
            }
            minted.encode(&claims).unwrap()
        };
        // Not configured: a token carrying `aud` (as most libraries mint
        // them) is accepted, as one without.
        let unconfigured = JwtAuthenticator::new(b"secret");
        assert!(
            check(&unconfigured, &for_aud(Some("my-app".into())))
                .await
                .is_ok()
        );
        assert!(
            check(&unconfigured, &for_aud(Some(serde_json::json!(["a", "b"]))))
                .await
                .is_ok()
        );
        assert!(check(&unconfigured, &for_aud(None)).await.is_ok());

        let auth = JwtAuthenticator::new(b"secret").audience("pgdn");
        assert!(check(&auth, &for_aud(Some("pgdn".into()))).await.is_ok());
        assert!(
            check(
                &auth,
                &for_aud(Some(serde_json::json!(["billing", "pgdn"])))
            )
            .await
            .is_ok(),
            "one of several"
        );
        assert_eq!(
            check(&auth, &for_aud(Some("billing".into()))).await,
            refused("wrong audience")
        );
        assert_eq!(
            check(&auth, &for_aud(Some(serde_json::json!(["billing"])))).await,
            refused("wrong audience")
        );
        assert_eq!(
            check(&auth, &for_aud(None)).await,
            refused("missing claim aud")
        );
    }

    #[tokio::test]
    async fn lifetime_longer_than_the_maximum_is_refused() {
        let auth = JwtAuthenticator::new(b"secret").max_lifetime(Duration::from_secs(3600));
        let token = |iat: Option<u64>, exp: u64| {
            let mut claims = serde_json::json!({"sub": "u1", "exp": exp});
            if let Some(iat) = iat {
                claims["iat"] = iat.into();
            }
            auth.encode(&claims).unwrap()
        };
        let t = now();
        assert!(check(&auth, &token(Some(t), t + 3600)).await.is_ok());
        assert_eq!(
            check(&auth, &token(Some(t), t + 3601)).await,
            refused("lifetime too long")
        );
        // Issued long ago for a long time: refused even if little is left.
        assert_eq!(
            check(&auth, &token(Some(t - 86_400), t + 60)).await,
            refused("lifetime too long")
        );
        // Without `iat`, what is left counts.
        assert!(check(&auth, &token(None, t + 1800)).await.is_ok());
        assert_eq!(
            check(&auth, &token(None, t + 7200)).await,
            refused("lifetime too long")
        );
        // Without a maximum, any lifetime.
        let unbounded = JwtAuthenticator::new(b"secret");
        assert!(
            check(&unbounded, &token(Some(t), t + 10 * 365 * 86_400))
                .await
                .is_ok()
        );
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let auth = JwtAuthenticator::new(b"s3cr3t-value").issuer("idp");
        let shown = format!("{auth:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("HS256"), "{shown}");
        let public = JwtAuthenticator::public_key_pem(test_keys::rsa(0).public_pem()).unwrap();
        assert!(format!("{public:?}").contains("RS256"), "{public:?}");
    }

    #[tokio::test]
    async fn rs256_from_a_pem_public_key_pins_the_algorithm() {
        let key = test_keys::rsa(0);
        let pem = key.public_pem();
        let auth = JwtAuthenticator::rs256_pem(&pem).unwrap();
        assert_eq!(auth.algorithm(), Some(Algorithm::RS256));
        let claims = test_keys::claims("u1", 60);
        let id = check(&auth, &key.sign(Algorithm::RS256, None, &claims))
            .await
            .unwrap();
        assert_eq!(&*id.user_id, "u1");
        // Detected from the key as well.
        let detected = JwtAuthenticator::public_key_pem(&pem).unwrap();
        assert_eq!(detected.algorithm(), Some(Algorithm::RS256));
        assert!(
            check(&detected, &key.sign(Algorithm::RS256, None, &claims))
                .await
                .is_ok()
        );

        // Another key's signature.
        let other = test_keys::rsa(1).sign(Algorithm::RS256, None, &claims);
        assert_eq!(check(&auth, &other).await, refused("bad signature"));
        // The classic confusion: HS256 "signed" with the public key as secret.
        let confused = JwtAuthenticator::new(pem.as_bytes())
            .encode(&claims)
            .unwrap();
        assert_eq!(
            check(&auth, &confused).await,
            refused("algorithm not allowed")
        );
        // Same key, other RSA algorithms.
        for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            assert_eq!(
                check(&auth, &key.sign(alg, None, &claims)).await,
                refused("algorithm not allowed"),
                "{alg:?}"
            );
        }
        // An ES256 token.
        let es = test_keys::EcKey::generate().sign(None, &claims);
        assert_eq!(check(&auth, &es).await, refused("algorithm not allowed"));

        // The claim rules hold for every key type.
        let strict = JwtAuthenticator::rs256_pem(&pem).unwrap().issuer("idp");
        assert_eq!(
            check(&strict, &key.sign(Algorithm::RS256, None, &claims)).await,
            refused("missing claim iss")
        );
        // No private key, so nothing can be issued.
        assert!(auth.issue("u1", &[], Duration::from_secs(60)).is_err());
    }

    #[tokio::test]
    async fn es256_from_a_pem_public_key_pins_the_algorithm() {
        let key = test_keys::EcKey::generate();
        let pem = key.public_pem();
        let auth = JwtAuthenticator::es256_pem(&pem).unwrap();
        assert_eq!(auth.algorithm(), Some(Algorithm::ES256));
        let claims = test_keys::claims("u2", 60);
        let id = check(&auth, &key.sign(None, &claims)).await.unwrap();
        assert_eq!(&*id.user_id, "u2");
        let detected = JwtAuthenticator::public_key_pem(&pem).unwrap();
        assert_eq!(detected.algorithm(), Some(Algorithm::ES256));
        assert!(check(&detected, &key.sign(None, &claims)).await.is_ok());

        let other = test_keys::EcKey::generate().sign(None, &claims);
        assert_eq!(check(&auth, &other).await, refused("bad signature"));
        let confused = JwtAuthenticator::new(pem.as_bytes())
            .encode(&claims)
            .unwrap();
        assert_eq!(
            check(&auth, &confused).await,
            refused("algorithm not allowed")
        );
        let rs = test_keys::rsa(0).sign(Algorithm::RS256, None, &claims);
        assert_eq!(check(&auth, &rs).await, refused("algorithm not allowed"));
    }

    #[test]
    fn a_pem_that_is_not_the_right_public_key_is_refused_at_start() {
        let rsa_pem = test_keys::rsa(0).public_pem();
        let ec_pem = test_keys::EcKey::generate().public_pem();
        let err = |r: crate::Result<JwtAuthenticator>| r.unwrap_err().to_string();
        assert!(err(JwtAuthenticator::es256_pem(&rsa_pem)).contains("not a P-256 public key"));
        assert!(err(JwtAuthenticator::rs256_pem(&ec_pem)).contains("not an RSA public key"));
        assert!(err(JwtAuthenticator::public_key_pem("garbage")).contains("not an RSA or P-256"));
        let private = test_keys::rsa(0).private_pem();
        let message = err(JwtAuthenticator::rs256_pem(&private));
        assert!(message.contains("private key"), "{message}");
        assert!(
            !message.contains("BEGIN"),
            "the key is not echoed: {message}"
        );
        let small = test_keys::RsaKey::generate(1024).public_pem();
        assert!(err(JwtAuthenticator::rs256_pem(&small)).contains("at least 2048"));
        assert!(err(JwtAuthenticator::public_key_pem(&small)).contains("at least 2048"));
    }
}

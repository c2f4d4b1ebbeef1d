//! Verification keys from a JSON Web Key Set (RFC 7517), as identity
//! providers publish them at a JWKS URL.
//!
//! [`JwksKeys`] caches the set and selects a key by the token's `kid`. It
//! fetches the set on first use, again when a token names a `kid` it does
//! not know (a key rotation), and again once the set is older than
//! [`max_age`](JwksKeys::max_age) (so a key the provider removed stops
//! being accepted). Fetches are rate-limited: at most one per
//! [`min_refresh_interval`](JwksKeys::min_refresh_interval) (30 s), and
//! one at a time however many connections wait, so a client spraying
//! random `kid`s cannot make the server hammer the provider. A failed fetch
//! keeps the keys already known.
//!
//! Only signing keys pgdn can pin an algorithm to are used: RSA keys of at
//! least 2048 bits (RS256) and P-256 keys (ES256). Keys marked for
//! encryption (`"use": "enc"`), with another `alg`, symmetric (`oct`) or of
//! other types are skipped.
//!
//! How the set is fetched is the adapter's business ([`JwksFetcher`]):
//! pgdn-core has no HTTP client. pgdn-server's `HttpJwks` fetches a URL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;
use tokio::time::Instant;

use crate::AuthError;

/// Fetches a JSON Web Key Set document (`{"keys":[...]}`), typically with
/// an HTTP GET of the provider's JWKS URL.
///
/// Promise: returns the document's bytes, or why it could not (for the
/// log; never a secret). It is called at most once at a time per
/// [`JwksKeys`]; a call that takes longer than the fetch timeout (10 s) is
/// abandoned.
#[async_trait]
pub trait JwksFetcher: Send + Sync + 'static {
    /// Fetches the key set.
    async fn fetch(&self) -> Result<Vec<u8>, String>;
}

/// One verification key of the set.
#[derive(Clone)]
pub(crate) struct Key {
    kid: Option<String>,
    pub(crate) algorithm: Algorithm,
    pub(crate) decoding: DecodingKey,
}

#[derive(Default)]
struct Cache {
    keys: Vec<Key>,
    /// The last fetch that succeeded.
    fetched_at: Option<Instant>,
    /// The last fetch, successful or not (the rate limit counts from it).
    attempted_at: Option<Instant>,
}

struct Shared {
    fetcher: Box<dyn JwksFetcher>,
    cache: std::sync::RwLock<Cache>,
    /// Held while fetching: one fetch at a time.
    refresh: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

/// A cached JSON Web Key Set, refreshed on an unknown `kid` (rate-limited):
/// the keys of a [`JwtAuthenticator::jwks`](super::JwtAuthenticator::jwks).
/// Clones share the cache.
#[derive(Clone)]
pub struct JwksKeys {
    shared: Arc<Shared>,
    min_refresh_interval: Duration,
    max_age: Duration,
    fetch_timeout: Duration,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKeys")
            .field("min_refresh_interval", &self.min_refresh_interval)
            .field("max_age", &self.max_age)
            .field("fetches", &self.fetch_count())
            .finish_non_exhaustive()
    }
}

impl JwksKeys {
    /// Default [`min_refresh_interval`](Self::min_refresh_interval): 30 s.
    pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
    /// Default [`max_age`](Self::max_age): 1 hour.
    pub const MAX_AGE: Duration = Duration::from_secs(3600);
    /// Default [`fetch_timeout`](Self::fetch_timeout): 10 s.
    pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

    /// Keys fetched by `fetcher`, on first use.
    pub fn new(fetcher: impl JwksFetcher) -> Self {
        JwksKeys {
            shared: Arc::new(Shared {
                fetcher: Box::new(fetcher),
                cache: Default::default(),
                refresh: tokio::sync::Mutex::new(()),
                fetches: AtomicU64::new(0),
            }),
            min_refresh_interval: Self::MIN_REFRESH_INTERVAL,
            max_age: Self::MAX_AGE,
            fetch_timeout: Self::FETCH_TIMEOUT,
        }
    }

    /// The shortest time between two fetches (default 30 s): a token with an
    /// unknown `kid` within it is refused without fetching.
    pub fn min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    /// How long a fetched set is used before it is fetched again on the
    /// next token (default 1 hour); if that fetch fails the old keys stay.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// How long a fetch may take (default 10 s).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// How many fetches were made (successful or not).
    pub fn fetch_count(&self) -> u64 {
        self.shared.fetches.load(Ordering::Relaxed)
    }

    /// Fetches the set now, whatever the rate limit (at startup, to find a
    /// wrong URL early). Returns how many usable keys it has.
    pub async fn refresh(&self) -> Result<usize, String> {
        let _one_at_a_time = self.shared.refresh.lock().await;
        self.fetch().await
    }

    /// The key for a token with `kid`, fetching the set if need be.
    pub(crate) async fn key(&self, kid: Option<&str>) -> Result<Key, AuthError> {
        if let Some(key) = self.cached(kid, true)? {
            return Ok(key);
        }
        let _one_at_a_time = self.shared.refresh.lock().await;
        // Whoever held the lock before may have fetched what we need.
        if let Some(key) = self.cached(kid, true)? {
            return Ok(key);
        }
        let may_fetch = self
            .read()
            .attempted_at
            .is_none_or(|at| at.elapsed() >= self.min_refresh_interval);
        if may_fetch {
            // A failure is logged; the keys known so far stay.
            let _ = self.fetch().await;
        }
        match self.cached(kid, false)? {
            Some(key) => Ok(key),
            None if self.read().fetched_at.is_none() => {
                Err(AuthError::InvalidToken("keys unavailable".into()))
            }
            None => Err(AuthError::InvalidToken("unknown key".into())),
        }
    }

    /// The key for `kid` in the cache; with `fresh_only`, `None` when the
    /// set is due for a refresh.
    fn cached(&self, kid: Option<&str>, fresh_only: bool) -> Result<Option<Key>, AuthError> {
        let cache = self.read();
        if fresh_only
            && cache
                .fetched_at
                .is_none_or(|at| at.elapsed() >= self.max_age)
        {
            return Ok(None);
        }
        match kid {
            Some(kid) => Ok(cache
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .cloned()),
            // Without `kid`, only a set of one key says which to use.
            None => match cache.keys.as_slice() {
                [only] => Ok(Some(only.clone())),
                [] => Ok(None),
                _ => Err(AuthError::InvalidToken("missing kid".into())),
            },
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.shared
            .cache
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One fetch; the caller holds the refresh lock.
    async fn fetch(&self) -> Result<usize, String> {
        self.shared.fetches.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        self.write().attempted_at = Some(started);
        let result =
            match tokio::time::timeout(self.fetch_timeout, self.shared.fetcher.fetch()).await {
                Ok(Ok(body)) => parse_key_set(&body),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("timed out after {:?}", self.fetch_timeout)),
            };
        match result {
            Ok(keys) => {
                let count = keys.len();
                let mut cache = self.write();
                cache.keys = keys;
                cache.fetched_at = Some(started);
                tracing::debug!(keys = count, "jwks fetched");
                Ok(count)
            }
            Err(e) => {
                tracing::warn!(error = %e, "jwks fetch failed; keeping the keys known so far");
                Err(e)
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.shared
            .cache
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The usable keys of a JWKS document; an error if it is not one, or has
/// no usable key (the keys known so far are then kept).
fn parse_key_set(body: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct KeySet {
        keys: Vec<serde_json::Value>,
    }
    let set: KeySet =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let total = set.keys.len();
    let keys: Vec<Key> = set.keys.iter().filter_map(parse_key).collect();
    if keys.is_empty() {
        return Err(format!(
            "no usable key among {total} (RS256 with RSA of 2048 bits or more, ES256 with P-256)"
        ));
    }
    Ok(keys)
}

/// One JWK, if it is a signing key pgdn can pin an algorithm to.
fn parse_key(jwk: &serde_json::Value) -> Option<Key> {
    let field = |name: &str| jwk.get(name).and_then(serde_json::Value::as_str);
    if field("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let kid = field("kid").map(str::to_string);
    let (algorithm, decoding) = match (field("kty")?, field("alg")) {
        ("RSA", None | Some("RS256")) => {
            let key = DecodingKey::from_rsa_components(field("n")?, field("e")?).ok()?;
            let DecodingKeyKind::RsaModulusExponent { n, e } = key.kind() else {
                return None;
            };
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(n),
                rsa::BigUint::from_bytes_be(e),
            )
            .ok()?;
            (Algorithm::RS256, super::rsa_decoding_key(&key).ok()?)
        }
        ("EC", None | Some("ES256")) if field("crv") == Some("P-256") => {
            let key = DecodingKey::from_ec_components(field("x")?, field("y")?).ok()?;
            let DecodingKeyKind::SecretOrDer(point) = key.kind() else {
                return None;
            };
            let key = p256::PublicKey::from_sec1_bytes(point).ok()?;
            (Algorithm::ES256, super::p256_decoding_key(&key))
        }
        _ => return None,
    };
    Some(Key {
        kid,
        algorithm,
        decoding,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::test_keys::{self, EcKey};
    use super::*;
    use crate::{AuthRequest, Authenticator, Identity, JwtAuthenticator};
    use serde_json::json;

    /// Serves whatever document the test sets; counts its calls.
    #[derive(Clone)]
    struct Fake {
        doc: Arc<Mutex<Result<serde_json::Value, String>>>,
        calls: Arc<AtomicU64>,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                doc: Arc::new(Mutex::new(Err("nothing served yet".into()))),
                calls: Arc::default(),
            }
        }
    }

    impl Fake {
        fn serve(&self, keys: Vec<serde_json::Value>) {
            *self.doc.lock().unwrap() = Ok(json!({ "keys": keys }));
        }
        fn fail(&self) {
            *self.doc.lock().unwrap() = Err("connection refused".into());
        }
        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl JwksFetcher for Fake {
        async fn fetch(&self) -> Result<Vec<u8>, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let doc = self.doc.lock().unwrap().clone()?;
            Ok(serde_json::to_vec(&doc).unwrap())
        }
    }

    async fn check(auth: &JwtAuthenticator, token: &str) -> Result<Identity, AuthError> {
        auth.authenticate(&AuthRequest::token(token)).await
    }

    fn refused(reason: &str) -> Result<Identity, AuthError> {
        Err(AuthError::InvalidToken(reason.into()))
    }

    fn rs(n: usize, kid: &str) -> String {
        test_keys::rsa(n).sign(Algorithm::RS256, Some(kid), &test_keys::claims("u1", 600))
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_on_first_use_caches_and_refetches_on_an_unknown_kid_rate_limited() {
        let fake = Fake::default();
        fake.serve(vec![test_keys::rsa(0).jwk("k1")]);
        let keys = JwksKeys::new(fake.clone());
        let auth = JwtAuthenticator::jwks(keys.clone());
        assert_eq!(fake.calls(), 0, "nothing fetched before the first token");

        assert!(check(&auth, &rs(0, "k1")).await.is_ok());
        assert_eq!(fake.calls(), 1);
        assert!(check(&auth, &rs(0, "k1")).await.is_ok());
        assert_eq!(fake.calls(), 1, "same kid: cached");

        // The provider rotates: k2 replaces k1.
        let ec = EcKey::generate();
        fake.serve(vec![test_keys::rsa(1).jwk("k2"), ec.jwk("e1")]);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Within 30 s of the last fetch, an unknown kid does not fetch.
        assert_eq!(check(&auth, &rs(1, "k2")).await, refused("unknown key"));
        assert_eq!(fake.calls(), 1);
        tokio::time::advance(JwksKeys::MIN_REFRESH_INTERVAL).await;
        assert!(check(&auth, &rs(1, "k2")).await.is_ok(), "rotated key");
        assert_eq!(fake.calls(), 2, "unknown kid refetched once");
        assert!(
            check(&auth, &ec.sign(Some("e1"), &test_keys::claims("u1", 60)))
                .await
                .is_ok()
        );
        // The removed key is no longer accepted.
        assert_eq!(check(&auth, &rs(0, "k1")).await, refused("unknown key"));
        assert_eq!(fake.calls(), 2);

        // A spray of random kids, 50 every 10 s for a minute, starting
        // right after a fetch: one fetch, 30 s in.
        for round in 0..6 {
            for i in 0..50 {
                let kid = format!("random-{round}-{i}");
                assert_eq!(check(&auth, &rs(0, &kid)).await, refused("unknown key"));
            }
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert_eq!(fake.calls(), 3, "300 unknown kids over 60 s: one fetch");
        assert_eq!(keys.fetch_count(), 3);
        assert!(check(&auth, &rs(1, "k2")).await.is_ok());
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_unknown_kids_share_one_fetch() {
        let fake = Fake::default();
        fake.serve(vec![test_keys::rsa(0).jwk("k1")]);
        let auth = Arc::new(JwtAuthenticator::jwks(JwksKeys::new(fake.clone())));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let auth = auth.clone();
                let kid = if i % 2 == 0 {
                    "k1".to_string()
                } else {
                    format!("x{i}")
                };
                tokio::spawn(async move { check(&auth, &rs(0, &kid)).await.is_ok() })
            })
            .collect();
        let mut accepted = 0;
        for task in tasks {
            accepted += usize::from(task.await.unwrap());
        }
        assert_eq!(accepted, 10);
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_set_is_refetched_and_a_failed_fetch_keeps_the_known_keys() {
        let fake = Fake::default();
        fake.fail();
        let keys = JwksKeys::new(fake.clone());
        let auth = JwtAuthenticator::jwks(keys.clone());
        assert_eq!(
            check(&auth, &rs(0, "k1")).await,
            refused("keys unavailable")
        );
        assert!(keys.refresh().await.is_err());
        assert_eq!(fake.calls(), 2);

        fake.serve(vec![test_keys::rsa(0).jwk("k1")]);
        assert_eq!(
            keys.refresh().await,
            Ok(1),
            "refresh ignores the rate limit"
        );
        assert!(check(&auth, &rs(0, "k1")).await.is_ok());
        assert_eq!(fake.calls(), 3);

        // Older than max_age: the next token fetches again.
        tokio::time::advance(JwksKeys::MAX_AGE).await;
        assert!(check(&auth, &rs(0, "k1")).await.is_ok());
        assert_eq!(fake.calls(), 4);
        // The provider is down at the next refresh: known keys still work.
        fake.fail();
        tokio::time::advance(JwksKeys::MAX_AGE).await;
        assert!(check(&auth, &rs(0, "k1")).await.is_ok());
        assert_eq!(fake.calls(), 5);
        assert!(check(&auth, &rs(0, "k1")).await.is_ok());
        assert_eq!(fake.calls(), 5, "rate-limited while stale");
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_pins_its_algorithm_and_unusable_keys_are_skipped() {
        let fake = Fake::default();
        let ec = EcKey::generate();
        let mut enc = test_keys::rsa(1).jwk("enc");
        enc["use"] = "enc".into();
        let mut rs384 = test_keys::rsa(1).jwk("rs384");
        rs384["alg"] = "RS384".into();
        let mut p384 = ec.jwk("p384");
        p384["crv"] = "P-384".into();
        let small = test_keys::RsaKey::generate(1024);
        fake.serve(vec![
            test_keys::rsa(0).jwk("rsa"),
            ec.jwk("ec"),
            json!({"kty": "oct", "kid": "oct", "k": test_keys::b64(b"secret")}),
            enc,
            rs384,
            p384,
            small.jwk("small"),
            json!({"kty": "RSA", "kid": "junk", "n": "!!", "e": "AQAB"}),
        ]);
        let keys = JwksKeys::new(fake.clone());
        assert_eq!(keys.refresh().await, Ok(2));
        let auth = JwtAuthenticator::jwks(keys);
        let claims = test_keys::claims("u1", 60);

        assert!(check(&auth, &rs(0, "rsa")).await.is_ok());
        assert!(check(&auth, &ec.sign(Some("ec"), &claims)).await.is_ok());
        // A key's kid with another algorithm.
        assert_eq!(
            check(&auth, &ec.sign(Some("rsa"), &claims)).await,
            refused("algorithm not allowed")
        );
        assert_eq!(
            check(&auth, &rs(0, "ec")).await,
            refused("algorithm not allowed")
        );
        // HS256 with the symmetric key of the set, or anything: refused
        // without a lookup.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("oct".into());
        let hs = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(check(&auth, &hs).await, refused("algorithm not allowed"));
        for kid in ["enc", "rs384", "small", "junk"] {
            assert_eq!(
                check(&auth, &rs(1, kid)).await,
                refused("unknown key"),
                "{kid}"
            );
        }
        // Several keys: a token must say which.
        let no_kid = test_keys::rsa(0).sign(Algorithm::RS256, None, &claims);
        assert_eq!(check(&auth, &no_kid).await, refused("missing kid"));
        // Claim rules apply.
        let strict = auth.clone().audience("pgdn");
        assert_eq!(
            check(&strict, &rs(0, "rsa")).await,
            refused("missing claim aud")
        );
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_of_one_key_accepts_tokens_without_kid() {
        let fake = Fake::default();
        fake.serve(vec![test_keys::rsa(0).jwk("only")]);
        let auth = JwtAuthenticator::jwks(JwksKeys::new(fake));
        let token = test_keys::rsa(0).sign(Algorithm::RS256, None, &test_keys::claims("u1", 60));
        assert!(check(&auth, &token).await.is_ok());
        assert_eq!(auth.algorithm(), None);
    }

    #[test]
    fn a_document_without_usable_keys_is_an_error() {
        assert!(parse_key_set(b"<html>").is_err());
        assert!(parse_key_set(br#"{"keys":[]}"#).is_err());
        assert!(parse_key_set(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
    }
}

//! Keys generated at test time (no private key is committed) and tokens
//! signed with them.

use std::sync::OnceLock;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use serde::Serialize;

/// An RSA key pair (2048 bits).
pub struct RsaKey(rsa::RsaPrivateKey);

/// A P-256 key pair.
pub struct EcKey(p256::SecretKey);

/// The `n`-th RSA key of this test binary (generating one takes a while
/// in a debug build, so each is made once and shared).
pub fn rsa(n: usize) -> &'static RsaKey {
    static KEYS: [OnceLock<RsaKey>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    KEYS[n].get_or_init(|| RsaKey::generate(2048))
}

impl RsaKey {
    pub fn generate(bits: usize) -> Self {
        RsaKey(rsa::RsaPrivateKey::new(&mut OsRng, bits).expect("rsa keygen"))
    }

    /// The public key, `BEGIN PUBLIC KEY`.
    pub fn public_pem(&self) -> String {
        self.0
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    /// The private key, PKCS#8 PEM (to check it is refused).
    pub fn private_pem(&self) -> String {
        use rsa::pkcs8::EncodePrivateKey;
        self.0.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
    }

    /// The public key as a JWK.
    pub fn jwk(&self, kid: &str) -> serde_json::Value {
        serde_json::json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": b64(&self.0.n().to_bytes_be()),
            "e": b64(&self.0.e().to_bytes_be()),
        })
    }

    fn encoding(&self) -> EncodingKey {
        EncodingKey::from_rsa_der(self.0.to_pkcs1_der().unwrap().as_bytes())
    }

    /// Signs `claims` with `alg` (an RSA one) and `kid`.
    pub fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &impl Serialize) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &self.encoding()).unwrap()
    }
}

impl EcKey {
    pub fn generate() -> Self {
        EcKey(p256::SecretKey::random(&mut OsRng))
    }

    pub fn public_pem(&self) -> String {
        self.0
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    /// The public key as a JWK.
    pub fn jwk(&self, kid: &str) -> serde_json::Value {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let point = self.0.public_key().to_encoded_point(false);
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid,
            "x": b64(point.x().unwrap()),
            "y": b64(point.y().unwrap()),
        })
    }

    /// Signs `claims` with ES256 and `kid`.
    pub fn sign(&self, kid: Option<&str>, claims: &impl Serialize) -> String {
        let der = self.0.to_pkcs8_der().unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(der.as_bytes())).unwrap()
    }
}

/// Claims for `sub` valid for `secs` from now.
pub fn claims(sub: &str, secs: u64) -> serde_json::Value {
    serde_json::json!({"sub": sub, "exp": now() + secs})
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Minimal base64url (no padding).
pub fn b64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..chunk.len() + 1 {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

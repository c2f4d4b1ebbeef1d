//! TLS for `https://` and `wss://` URLs: the check that refuses a secure
//! URL when the crate was built without a TLS feature (at build time, not
//! after 30 s of retries), and the clients' TLS settings, with the private
//! root certificates a caller adds.
//!
//! Features: `rustls` (the default: rustls with the ring provider and the
//! webpki roots) or `native-tls` (the platform's TLS and roots). With both
//! on, rustls is used.

use crate::error::{Error, Result};

/// Whether this build of pgdn-client can speak TLS.
pub(crate) const SUPPORTED: bool = cfg!(any(feature = "rustls", feature = "native-tls"));

/// The scheme of `url` if it needs TLS (`https://`, `wss://`).
fn secure_scheme(url: &str) -> Option<&'static str> {
    let starts = |prefix: &str| {
        url.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    ["https://", "wss://"].into_iter().find(|p| starts(p))
}

/// Whether `url` needs TLS.
#[cfg(all(
    feature = "subscriber",
    any(feature = "rustls", feature = "native-tls")
))]
pub(crate) fn is_secure(url: &str) -> bool {
    secure_scheme(url).is_some()
}

/// Refuses a URL that needs TLS when this build has none.
pub(crate) fn check(url: &str) -> Result<()> {
    check_with(url, SUPPORTED)
}

fn check_with(url: &str, supported: bool) -> Result<()> {
    match secure_scheme(url) {
        Some(scheme) if !supported => Err(Error::TlsNotEnabled { scheme }),
        _ => Ok(()),
    }
}

/// The root certificates added with `root_certificate` (PEM, each may hold
/// several), trusted besides the built-in roots.
#[derive(Debug, Clone, Default)]
pub(crate) struct Roots {
    /// PEM documents as given.
    #[cfg(any(feature = "rustls", feature = "native-tls"))]
    pem: Vec<Vec<u8>>,
}

impl Roots {
    /// Adds a PEM document of one or more certificates.
    #[cfg(any(feature = "rustls", feature = "native-tls"))]
    pub(crate) fn add(&mut self, pem: &[u8]) {
        self.pem.push(pem.to_vec());
    }

    /// The certificates for reqwest, each PEM document parsed.
    #[cfg(all(feature = "publisher", any(feature = "rustls", feature = "native-tls")))]
    pub(crate) fn reqwest(&self) -> Result<Vec<reqwest::Certificate>> {
        let mut certs = Vec::new();
        for pem in &self.pem {
            let parsed = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Invalid(format!("root certificate: {e}")))?;
            if parsed.is_empty() {
                return Err(no_certificate());
            }
            certs.extend(parsed);
        }
        Ok(certs)
    }

    /// The certificates, DER-encoded, each PEM document parsed.
    #[cfg(all(
        feature = "subscriber",
        any(feature = "rustls", feature = "native-tls")
    ))]
    fn der(&self) -> Result<Vec<Vec<u8>>> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut certs = Vec::new();
        for pem in &self.pem {
            let before = certs.len();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Invalid(format!("root certificate: {e}")))?;
                certs.push(cert.to_vec());
            }
            if certs.len() == before {
                return Err(no_certificate());
            }
        }
        Ok(certs)
    }
}

#[cfg(any(feature = "rustls", feature = "native-tls"))]
fn no_certificate() -> Error {
    Error::Invalid(
        "root certificate: no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
    )
}

/// Chooses reqwest's TLS backend: rustls when its feature is on, else the
/// platform's.
#[cfg(feature = "publisher")]
pub(crate) fn reqwest_builder(
    builder: reqwest::ClientBuilder,
    #[allow(unused_variables)] roots: &Roots,
) -> Result<reqwest::ClientBuilder> {
    #[cfg(feature = "rustls")]
    let builder = builder.use_rustls_tls();
    #[cfg(all(feature = "native-tls", not(feature = "rustls")))]
    let builder = builder.use_native_tls();
    #[cfg(any(feature = "rustls", feature = "native-tls"))]
    let builder = roots
        .reqwest()?
        .into_iter()
        .fold(builder, |b, cert| b.add_root_certificate(cert));
    Ok(builder)
}

/// The WebSocket connector for `url`: `None` (plain TCP) for `ws://`, a TLS
/// connector with the built-in and the added roots for `wss://`.
#[cfg(all(
    feature = "subscriber",
    any(feature = "rustls", feature = "native-tls")
))]
pub(crate) fn ws_connector(
    url: &str,
    roots: &Roots,
) -> Result<Option<tokio_tungstenite::Connector>> {
    if !is_secure(url) {
        return Ok(None);
    }
    let extra = roots.der()?;
    #[cfg(feature = "rustls")]
    {
        rustls_connector(extra).map(Some)
    }
    #[cfg(not(feature = "rustls"))]
    {
        native_connector(extra).map(Some)
    }
}

#[cfg(all(feature = "subscriber", feature = "rustls"))]
fn rustls_connector(extra: Vec<Vec<u8>>) -> Result<tokio_tungstenite::Connector> {
    use std::sync::Arc;
    let mut store = rustls::RootCertStore::empty();
    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra {
        store
            .add(der.into())
            .map_err(|e| Error::Invalid(format!("root certificate: {e}")))?;
    }
    // The provider is named, not taken from the process default: an app
    // that also links aws-lc-rs would otherwise make `builder()` panic.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("tls: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(tokio_tungstenite::Connector::Rustls(Arc::new(config)))
}

#[cfg(all(
    feature = "subscriber",
    feature = "native-tls",
    not(feature = "rustls")
))]
fn native_connector(extra: Vec<Vec<u8>>) -> Result<tokio_tungstenite::Connector> {
    let mut builder = native_tls::TlsConnector::builder();
    for der in extra {
        let cert = native_tls::Certificate::from_der(&der)
            .map_err(|e| Error::Invalid(format!("root certificate: {e}")))?;
        builder.add_root_certificate(cert);
    }
    let connector = builder
        .build()
        .map_err(|e| Error::Invalid(format!("tls: {e}")))?;
    Ok(tokio_tungstenite::Connector::NativeTls(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secure_url_without_tls_is_refused_naming_the_feature() {
        for url in ["https://example.com", "HTTPS://example.com", "wss://x/ws"] {
            let err = check_with(url, false).unwrap_err();
            assert!(matches!(err, Error::TlsNotEnabled { .. }), "{url}: {err:?}");
            let text = err.to_string();
            assert!(
                text.contains("`rustls`") && text.contains("`native-tls`"),
                "{text}"
            );
            check_with(url, true).unwrap();
        }
        for url in ["http://example.com", "ws://x/ws"] {
            check_with(url, false).unwrap();
        }
    }

    /// Run by `cargo xtask test` with `--no-default-features --features
    /// publisher`: the real check of a build without TLS.
    #[cfg(all(
        feature = "publisher",
        not(any(feature = "rustls", feature = "native-tls"))
    ))]
    #[test]
    fn without_a_tls_feature_an_https_publisher_is_refused_when_built() {
        let err = crate::Publisher::new("https://example.com", "a-publish-key-16+").unwrap_err();
        assert!(
            matches!(err, Error::TlsNotEnabled { scheme: "https://" }),
            "{err:?}"
        );
        crate::Publisher::new("http://example.com", "a-publish-key-16+").unwrap();
    }
}

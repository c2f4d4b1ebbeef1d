//! TLS termination in the server itself (feature `tls`): a certificate
//! chain and its private key, PEM, turned into a rustls acceptor (the ring
//! provider, HTTP/1.1 over ALPN) for [`Pgdn::serve_tls`](crate::Pgdn::serve_tls)
//! and [`Pgdn::serve_routes_tls`](crate::Pgdn::serve_routes_tls).
//!
//! The handshake runs in each connection's own task, never in the accept
//! loop, and must end before the connection's header-read deadline
//! ([`Config::header_read_timeout`](crate::Config::header_read_timeout)),
//! like the request head it comes before.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// A server certificate and key, ready to terminate TLS. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
}

// Hand-written: the key never reaches a log.
impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// From a PEM certificate chain (the server's certificate first, then
    /// any intermediates) and its PEM private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// [`Error::Tls`] when either holds nothing usable or the key does not
    /// match the certificate.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<TlsConfig> {
        let chain = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("the certificate is not valid PEM: {e}")))?;
        if chain.is_empty() {
            return Err(Error::Tls(
                "no certificate (-----BEGIN CERTIFICATE-----) in the certificate PEM".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| Error::Tls(format!("no usable private key in the key PEM: {e}")))?;
        // The provider is named rather than taken from the process default,
        // which an app linking aws-lc-rs as well would leave ambiguous.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| Error::Tls(format!("certificate and key do not go together: {e}")))?;
        // The accept loop speaks HTTP/1.1 (with upgrades) only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// From PEM files: the certificate chain and the private key (what
    /// `pgdn-server --tls-cert --tls-key` reads).
    ///
    /// # Errors
    /// [`Error::Tls`] naming the file that cannot be read or holds nothing
    /// usable.
    pub fn from_pem_files(cert_chain: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| Error::Tls(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let (cert_path, key_path) = (cert_chain.as_ref(), key.as_ref());
        let cert = read(cert_path, "certificate")?;
        let key = read(key_path, "key")?;
        Self::from_pem(&cert, &key).map_err(|e| match e {
            Error::Tls(m) => Error::Tls(format!(
                "{m} (certificate {}, key {})",
                cert_path.display(),
                key_path.display()
            )),
            other => other,
        })
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_certificate_and_key() {
        let err = TlsConfig::from_pem(b"not pem", b"not pem").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let err =
            TlsConfig::from_pem_files("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read the certificate /nonexistent/cert.pem"),
            "{err}"
        );
        let (one, other) = (
            pgdn_testkit::TestCa::generate(),
            pgdn_testkit::TestCa::generate(),
        );
        TlsConfig::from_pem(one.cert_pem.as_bytes(), one.key_pem.as_bytes()).unwrap();
        let err =
            TlsConfig::from_pem(one.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("do not go together"), "{err}");
    }
}

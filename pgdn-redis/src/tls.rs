//! The Redis client for a URL: `redis://` in the clear, `rediss://` over
//! TLS (feature `tls`: rustls, the webpki roots, or only the CA of
//! [`ClusterConfig::redis_ca_cert`](crate::ClusterConfig::redis_ca_cert)).

use crate::error::{Error, Result};

/// A client for `url`, trusting `ca_cert` (PEM) instead of the public
/// roots for a `rediss://` URL.
pub(crate) fn client(url: &str, ca_cert: Option<&[u8]>) -> Result<redis::Client> {
    let secure = url
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"));
    if !secure {
        if ca_cert.is_some() {
            return Err(Error::Tls(
                "a Redis CA certificate is set but the URL is not rediss://".into(),
            ));
        }
        return Ok(redis::Client::open(url)?);
    }
    tls_client(url, ca_cert)
}

#[cfg(feature = "tls")]
fn tls_client(url: &str, ca_cert: Option<&[u8]>) -> Result<redis::Client> {
    // redis-rs builds its rustls configuration from the process-wide
    // default provider; with none installed and two compiled in (an app
    // that also links aws-lc-rs) it would panic, so ring is installed when
    // nothing else was. An app's own choice, installed first, stands.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(pem) = ca_cert else {
        return Ok(redis::Client::open(url)?);
    };
    // Checked here: redis-rs would take an unreadable file as an empty
    // list of roots, and every connection would then fail on the server's
    // certificate.
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("the Redis CA certificate is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(
            "the Redis CA certificate holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                .into(),
        ));
    }
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    };
    Ok(redis::Client::build_with_tls(url, certificates)?)
}

#[cfg(not(feature = "tls"))]
fn tls_client(_: &str, _: Option<&[u8]>) -> Result<redis::Client> {
    Err(Error::Tls(
        "rediss:// needs pgdn-redis's `tls` feature; rebuild with it".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_certificate_needs_a_tls_url_and_a_certificate() {
        let err = client("redis://127.0.0.1:1", Some(b"x")).unwrap_err();
        assert!(err.to_string().contains("not rediss://"), "{err}");
        let err = client("rediss://127.0.0.1:1", Some(b"not pem")).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        client("rediss://127.0.0.1:1", None).unwrap();
        client("redis://127.0.0.1:1", None).unwrap();
    }
}

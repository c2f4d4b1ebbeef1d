//! Fetching a JSON Web Key Set over HTTP (feature `jwks`, on by default):
//! the [`JwksFetcher`] behind `--jwks-url`.
//!
//! pgdn-core holds the key cache and its refresh rules
//! ([`JwksKeys`](pgdn_core::jwt::JwksKeys)) but no HTTP client, so that
//! every adapter can build on it; this is the reqwest one, with rustls
//! (Mozilla's roots and the system's).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pgdn_server::JwtAuthenticator;
//! use pgdn_server::jwks::HttpJwks;
//! use pgdn_server::jwt::JwksKeys;
//!
//! let keys = JwksKeys::new(HttpJwks::new("https://idp.example.com/.well-known/jwks.json")?);
//! keys.refresh().await?; // optional: fetch now rather than on the first token
//! let auth = JwtAuthenticator::jwks(keys)
//!     .issuer("https://idp.example.com/")
//!     .audience("pgdn");
//! # Ok(())
//! # }
//! ```

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use pgdn_core::jwt::JwksFetcher;

use crate::Error;

/// Largest key set accepted, in bytes.
const MAX_BODY: usize = 1024 * 1024;

/// Fetches a JWKS from a URL with a GET.
///
/// The URL must be `https`, except on a loopback host (`localhost`,
/// `127.0.0.1`, `[::1]`): keys fetched in the clear could be swapped by
/// anyone on the path. Redirects are followed (at most 3, never from
/// `https` to `http`), the body is limited to 1 MiB.
#[derive(Debug, Clone)]
pub struct HttpJwks {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpJwks {
    /// A fetcher for `url`; refused if it is not an `https` URL (or `http`
    /// on a loopback host).
    pub fn new(url: &str) -> Result<Self, Error> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| Error::Config(format!("--jwks-url is not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                return Err(Error::Config(
                    "--jwks-url must be https (plain http is only accepted on a loopback host)"
                        .into(),
                ));
            }
            other => {
                return Err(Error::Config(format!(
                    "--jwks-url must be https, not {other}"
                )));
            }
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= 3 {
                    attempt.error("too many redirects")
                } else if attempt.url().scheme() != "https" && !is_loopback(attempt.url()) {
                    attempt.error("redirect to plain http")
                } else {
                    attempt.follow()
                }
            }))
            .user_agent(concat!("pgdn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("cannot build the JWKS client: {e}")))?;
        Ok(HttpJwks { client, url })
    }

    /// The URL fetched.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

#[async_trait]
impl JwksFetcher for HttpJwks {
    async fn fetch(&self) -> Result<Vec<u8>, String> {
        // reqwest's errors name the URL; it is configuration, not a secret.
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        if !response.status().is_success() {
            return Err(format!("GET {}: HTTP {}", self.url, response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(format!("GET {}: key set over {MAX_BODY} bytes", self.url));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("GET {}: key set over {MAX_BODY} bytes", self.url));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        for ok in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9000/jwks",
        ] {
            assert!(HttpJwks::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example.com/jwks",
            "http://10.0.0.5/jwks",
            "ftp://idp.example.com/jwks",
            "not a url",
        ] {
            assert!(HttpJwks::new(bad).is_err(), "{bad}");
        }
    }
}

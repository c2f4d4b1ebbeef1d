//! The connection a node subscribes on: sharded pub/sub (`SSUBSCRIBE`) to
//! one master, over TCP or TLS, read by a task of its own.
//!
//! Written here rather than taken from redis-rs: redis-rs offers sharded
//! subscriptions only through its cluster client, which hides each
//! master's connection, while pgdn must subscribe to one master at a time
//! (on a single Redis, on independent shards, on Redis Cluster and behind
//! Sentinel alike) and see that connection's liveness. Only the RESP2
//! replies pub/sub uses are parsed. redis-rs still parses the URL (its
//! [`redis::ConnectionInfo`]: address, TLS, credentials).

use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

use crate::error::{Error, Result};

/// Largest bulk string accepted (a frame is at most the publish body limit,
/// 1 MiB by default; this only stops a corrupt length from allocating
/// without bound).
const MAX_BULK: usize = 256 << 20;

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The kind of a pub/sub push (`smessage`, `ssubscribe`, `pong`...)
    /// and its items.
    pub(crate) fn push(self) -> Option<(String, Vec<Resp>)> {
        let Resp::Array(Some(items)) = self else {
            return None;
        };
        let mut items = items.into_iter();
        let Some(Resp::Bulk(Some(kind))) = items.next() else {
            return None;
        };
        Some((
            String::from_utf8_lossy(&kind).to_ascii_lowercase(),
            items.collect(),
        ))
    }
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// Reads one RESP2 value.
pub(crate) async fn read_value<R: AsyncBufRead + Unpin + Send>(r: &mut R) -> std::io::Result<Resp> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") || line.len() < 3 {
        return Err(bad("a RESP line without CRLF"));
    }
    let body = std::str::from_utf8(&line[1..line.len() - 2]).map_err(|_| bad("not UTF-8"))?;
    let int = || {
        body.parse::<i64>()
            .map_err(|_| bad(format!("not a number: {body:?}")))
    };
    match line[0] {
        b'+' => Ok(Resp::Simple(body.to_string())),
        b'-' => Ok(Resp::Error(body.to_string())),
        b':' => Ok(Resp::Int(int()?)),
        b'$' => {
            let n = int()?;
            if n < 0 {
                return Ok(Resp::Bulk(None));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(bad(format!("a bulk string of {n} bytes")));
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).await?;
            if !buf.ends_with(b"\r\n") {
                return Err(bad("a bulk string without CRLF"));
            }
            buf.truncate(n);
            Ok(Resp::Bulk(Some(buf)))
        }
        b'*' => {
            let n = int()?;
            if n < 0 {
                return Ok(Resp::Array(None));
            }
            let mut items = Vec::with_capacity((n as usize).min(64));
            for _ in 0..n {
                items.push(Box::pin(read_value(r)).await?);
            }
            Ok(Resp::Array(Some(items)))
        }
        other => Err(bad(format!("unknown RESP type {:?}", other as char))),
    }
}

/// Encodes a command.
pub(crate) fn command<S: AsRef<[u8]>>(args: &[S]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Either half of the connection.
pub(crate) type Reader = tokio::io::BufReader<tokio::io::ReadHalf<Box<dyn Io>>>;
pub(crate) type Writer = tokio::io::WriteHalf<Box<dyn Io>>;

/// A byte stream: TCP, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens a connection to the server of `client`, authenticated and on its
/// database, within `timeout`.
pub(crate) async fn connect(
    client: &redis::Client,
    ca_cert: Option<&[u8]>,
    timeout: Duration,
) -> Result<(Reader, Writer)> {
    let open = async {
        let info = client.get_connection_info();
        let stream: Box<dyn Io> = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => tls(host, *port, ca_cert).await?,
            other => {
                return Err(Error::Config(format!(
                    "cannot subscribe over {other:?}: use a redis:// or rediss:// URL"
                )));
            }
        };
        let (r, mut w) = tokio::io::split(stream);
        let mut r = tokio::io::BufReader::new(r);
        let settings = info.redis_settings();
        let mut setup = Vec::new();
        if let Some(password) = settings.password() {
            let mut auth = vec!["AUTH"];
            if let Some(user) = settings.username() {
                auth.push(user);
            }
            auth.push(password);
            setup.push(command(&auth));
        }
        if settings.db() != 0 {
            setup.push(command(&["SELECT", &settings.db().to_string()]));
        }
        for c in &setup {
            w.write_all(c).await.map_err(io)?;
        }
        for _ in &setup {
            if let Resp::Error(e) = read_value(&mut r).await.map_err(io)? {
                return Err(Error::Unavailable(format!(
                    "redis refused the subscription: {e}"
                )));
            }
        }
        Ok((r, w))
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| Error::Unavailable("redis did not answer in time".into()))?
}

fn io(e: std::io::Error) -> Error {
    Error::Unavailable(format!("redis subscription: {e}"))
}

#[cfg(feature = "tls")]
async fn tls(host: &str, port: u16, ca_cert: Option<&[u8]>) -> Result<Box<dyn Io>> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Tls(format!("redis CA certificate: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("redis CA certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| Error::Tls(format!("redis host {host:?}: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(io)?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(io)?;
    Ok(Box::new(stream))
}

#[cfg(not(feature = "tls"))]
async fn tls(_: &str, _: u16, _: Option<&[u8]>) -> Result<Box<dyn Io>> {
    Err(Error::Tls(
        "rediss:// needs pgdn-redis's `tls` feature; rebuild with it".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_pubsub_replies() {
        let wire = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\na\r\nb\n\r\n\
                     *2\r\n$4\r\npong\r\n$0\r\n\r\n:7\r\n-ERR x\r\n$-1\r\n";
        let mut r = tokio::io::BufReader::new(&wire[..]);
        let (kind, items) = read_value(&mut r).await.unwrap().push().unwrap();
        assert_eq!(kind, "smessage");
        assert_eq!(items[1], Resp::Bulk(Some(b"a\r\nb\n".to_vec())));
        assert_eq!(read_value(&mut r).await.unwrap().push().unwrap().0, "pong");
        assert_eq!(read_value(&mut r).await.unwrap(), Resp::Int(7));
        assert_eq!(
            read_value(&mut r).await.unwrap(),
            Resp::Error("ERR x".into())
        );
        assert_eq!(read_value(&mut r).await.unwrap(), Resp::Bulk(None));
        assert!(read_value(&mut r).await.is_err(), "end of stream");
        let mut bad = tokio::io::BufReader::new(&b"$999999999999\r\n"[..]);
        assert!(read_value(&mut bad).await.is_err());
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(command(&["PING"]), b"*1\r\n$4\r\nPING\r\n");
    }
}

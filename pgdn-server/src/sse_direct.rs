//! Server-Sent Events without hyper's per-connection buffers.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB header buffer for every
//! HTTP/1 connection, for the connection's whole life (`INIT_BUFFER_SIZE`;
//! neither can be set lower), and an SSE stream is a response that never
//! ends: 16 of the 20 KB an idle SSE connection cost. So when pgdn serves
//! its own routes ([`Pgdn::serve`](crate::Pgdn::serve)), a plain-TCP
//! connection whose first request is `GET <sse path>` is answered here: the
//! request head is read (within the header-read timeout, at most
//! [`MAX_HEAD`]) and parsed with httparse, the same
//! [`Service::sse`](pgdn_core::Service::sse) answers it, and the response
//! head and the stream's chunks are written straight to the socket
//! (`Transfer-Encoding: chunked`, one write per chunk). The connection
//! closes when the stream ends. Everything else (any other first request,
//! TLS, an app's own routes) goes to hyper as before.
//!
//! A client that stops reading blocks the write here; the session's own
//! write timeout then ends the stream (slow consumer), and a write that
//! makes no progress for the write timeout drops the connection.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use futures_util::{FutureExt, StreamExt};
use pgdn_core::{ConnectInfo, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warp::http::{HeaderMap, HeaderName, HeaderValue};

/// Largest request head read here; a longer one gets 431.
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// Most header lines parsed.
const MAX_HEADERS: usize = 64;

/// What the direct path needs: the service and the SSE path.
#[derive(Clone)]
pub(crate) struct DirectSse {
    pub(crate) service: Service,
    pub(crate) path: Arc<str>,
}

/// Whether the first request on `stream` is `GET <path>` (with or without
/// a query), from the bytes already arrived, without consuming them.
/// `None` when nothing arrived within `wait` (the caller drops the
/// connection, as the header-read timeout would).
pub(crate) async fn wants(
    stream: &TcpStream,
    path: &str,
    wait: std::time::Duration,
) -> Option<bool> {
    // Enough for `GET ` and a path of a reasonable length; a longer
    // configured path is served by hyper.
    let mut start = [0u8; 96];
    let n = match tokio::time::timeout(wait, stream.peek(&mut start)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return Some(false),
        Err(_) => return None,
    };
    let Some(rest) = start[..n].strip_prefix(b"GET ") else {
        return Some(false);
    };
    Some(rest.starts_with(path.as_bytes()) && matches!(rest.get(path.len()), Some(b' ' | b'?')))
}

/// Answers the SSE request on `stream` and streams it until it ends, the
/// client leaves or `force` (shutdown gave up waiting). On `stop` before
/// the request head is in, the connection closes (no request to finish);
/// a stream already open ends when the service's shutdown closes its
/// session.
pub(crate) async fn serve(
    direct: DirectSse,
    mut stream: TcpStream,
    peer: SocketAddr,
    header_timeout: std::time::Duration,
    (stop, force): (CancellationToken, CancellationToken),
) {
    let write_timeout = direct.service.config().write_timeout;
    // The phases before the stream are boxed: their state (the head's
    // read buffer, authentication) would otherwise stay in this future,
    // which lives as long as the stream.
    let reading = Box::pin(tokio::time::timeout(header_timeout, read_head(&mut stream)));
    let head = tokio::select! {
        head = reading => head,
        () = stop.cancelled() => return,
    };
    let head = match head {
        Ok(Ok(head)) => head,
        Ok(Err(status)) => {
            let res = pgdn_core::json_error(status, "bad request head");
            let _ = write_plain(&mut stream, res, write_timeout).await;
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "request head timed out; closing the connection");
            return;
        }
    };
    let Some(info) = connect_info(&head, peer) else {
        let res = pgdn_core::json_error(warp::http::StatusCode::BAD_REQUEST, "bad request");
        let _ = write_plain(&mut stream, res, write_timeout).await;
        return;
    };
    drop(head);
    let res = match Box::pin(direct.service.sse(info)).await {
        Ok(res) => res,
        Err(refused) => {
            let _ = write_plain(&mut stream, refused, write_timeout).await;
            return;
        }
    };
    let (parts, mut body) = res.into_parts();
    let mut out = response_head(parts.status, &parts.headers);
    out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    if write(&mut stream, &out, write_timeout).await.is_err() {
        return;
    }
    drop((out, parts));
    let (mut rd, mut wr) = stream.split();
    // The client sends nothing more; a read only tells that it left.
    let mut scratch = [0u8; 16];
    loop {
        tokio::select! {
            biased;
            () = force.cancelled() => return,
            chunk = body.next() => {
                let Some(Ok(chunk)) = chunk else {
                    let _ = write(&mut wr, b"0\r\n\r\n", write_timeout).await;
                    return;
                };
                // Whatever else the session has handed over meanwhile goes
                // in the same write: one system call and one TCP segment
                // rather than one per chunk (the socket has TCP_NODELAY).
                let mut out = BytesMut::new();
                frame_into(&mut out, &chunk);
                let mut ended = false;
                while out.len() < COALESCE_BYTES {
                    match body.next().now_or_never() {
                        Some(Some(Ok(more))) => frame_into(&mut out, &more),
                        Some(_) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                if ended {
                    out.put_slice(b"0\r\n\r\n");
                }
                if write(&mut wr, &out, write_timeout).await.is_err() || ended {
                    return;
                }
            }
            read = rd.read(&mut scratch) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
        }
    }
}

/// Reads up to the end of the request head (`\r\n\r\n`); the status to
/// answer when it is too long or the peer left first.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, warp::http::StatusCode> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| warp::http::StatusCode::BAD_REQUEST)?;
        if n == 0 {
            return Err(warp::http::StatusCode::BAD_REQUEST);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(warp::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
    }
}

/// The query and headers of a request head, as the WebSocket and the
/// hyper SSE routes build them.
fn connect_info(head: &[u8], peer: SocketAddr) -> Option<ConnectInfo> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let query = req.path?.split_once('?').map(|(_, q)| q.to_string());
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    Some(ConnectInfo::from_request(query.as_deref(), map).with_remote_addr(Some(peer)))
}

/// `HTTP/1.1 <status>` and the headers, each line ending in CRLF.
fn response_head(status: warp::http::StatusCode, headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One chunk of a chunked body.
fn frame_into(out: &mut BytesMut, chunk: &[u8]) {
    let size = format!("{:x}\r\n", chunk.len());
    out.reserve(size.len() + chunk.len() + 2);
    out.put_slice(size.as_bytes());
    out.put_slice(chunk);
    out.put_slice(b"\r\n");
}

/// Bytes of ready chunks written at once, at most (more waits for the
/// next write).
const COALESCE_BYTES: usize = 64 * 1024;

/// A whole (refusal) response with its length, then the connection closes.
async fn write_plain(
    stream: &mut TcpStream,
    res: pgdn_core::HttpResponse,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    let (parts, body) = res.into_parts();
    let mut out = response_head(parts.status, &parts.headers);
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    write(stream, &out, timeout).await?;
    stream.shutdown().await
}

/// Writes all of `bytes` within `timeout`.
async fn write<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(timeout, w.write_all(bytes)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_query_and_headers() {
        let head = b"GET /sse?token=abc&since=m1 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: m2\r\n\r\n";
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let info = connect_info(head, peer).unwrap();
        assert_eq!(info.token.as_deref(), Some("abc"));
        assert_eq!(info.headers.get("last-event-id").unwrap(), "m2");
        assert_eq!(info.remote_addr, Some(peer));
        assert!(connect_info(b"GET /sse HTTP/1.1\r\nHost", peer).is_none());
        let mut out = BytesMut::new();
        frame_into(&mut out, b"data: 1\n\n");
        frame_into(&mut out, b"data: 22\n\n");
        assert_eq!(&out[..], b"9\r\ndata: 1\n\n\r\na\r\ndata: 22\n\n\r\n");
    }
}

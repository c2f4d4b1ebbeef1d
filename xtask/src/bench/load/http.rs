//! A small HTTP/1.1 client for `--load`: one keep-alive connection per
//! [`HttpConn`], one request at a time, each written with one `write` from
//! a reused buffer and its answer read into another.
//!
//! reqwest costs the bench tens of microseconds per request, which at
//! tens of thousands of publishes per second takes most of a core that
//! the server needs (the bench shares the machine's two cores with it).
//! This client parses only what the bench needs: the status code, the
//! `Content-Length` of the answer (pgdn-server answers every API request
//! with one) and, in the body, numbers such as `"delivered":<n>`.

use std::io::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::super::client::now_ns;

/// The publish route (docs/protocol.md section 5).
pub(crate) const PUBLISH: &str = "/api/v1/publish";
/// The batch publish route.
pub(crate) const PUBLISH_BATCH: &str = "/api/v1/publish/batch";

/// One keep-alive HTTP/1.1 connection to a pgdn-server, with the publish
/// key.
pub(crate) struct HttpConn {
    stream: TcpStream,
    /// `Host` and `Authorization` header lines, each ending in CRLF.
    headers: Vec<u8>,
    /// The request being written.
    request: Vec<u8>,
    /// The answer being read.
    answer: Vec<u8>,
}

impl HttpConn {
    /// Connects to `addr` (`host:port`); every request carries
    /// `Authorization: Bearer <key>`.
    pub(crate) async fn connect(addr: &str, key: &str) -> Result<HttpConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        Ok(HttpConn {
            stream,
            headers: format!("Host: {addr}\r\nAuthorization: Bearer {key}\r\n").into_bytes(),
            request: Vec::with_capacity(4096),
            answer: Vec::with_capacity(8192),
        })
    }

    /// POSTs the JSON `body` to `path` and returns the answer's body; an
    /// answer other than 2xx is an error.
    pub(crate) async fn post(&mut self, path: &str, body: &[u8]) -> Result<&[u8], String> {
        self.request.clear();
        let _ = write!(self.request, "POST {path} HTTP/1.1\r\n");
        self.request.extend_from_slice(&self.headers);
        let _ = write!(
            self.request,
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.request.extend_from_slice(body);
        self.exchange(path).await
    }

    /// GETs `path` and returns the answer's body; an answer other than 2xx
    /// is an error.
    pub(crate) async fn get(&mut self, path: &str) -> Result<&[u8], String> {
        self.request.clear();
        let _ = write!(self.request, "GET {path} HTTP/1.1\r\n");
        self.request.extend_from_slice(&self.headers);
        self.request.extend_from_slice(b"\r\n");
        self.exchange(path).await
    }

    /// Writes the request and reads one answer.
    async fn exchange(&mut self, path: &str) -> Result<&[u8], String> {
        self.stream
            .write_all(&self.request)
            .await
            .map_err(|e| format!("{path}: writing the request: {e}"))?;
        self.answer.clear();
        // Read until the head is complete, then until the body is.
        let (head_len, status, length) = loop {
            if let Some(end) = find(&self.answer, b"\r\n\r\n") {
                let (status, length) =
                    parse_head(&self.answer[..end]).map_err(|e| format!("{path}: answer {e}"))?;
                break (end + 4, status, length);
            }
            self.read_more(path).await?;
        };
        while self.answer.len() < head_len + length {
            self.read_more(path).await?;
        }
        let body = &self.answer[head_len..head_len + length];
        if !(200..300).contains(&status) {
            return Err(format!(
                "{path}: {status}: {}",
                String::from_utf8_lossy(body)
            ));
        }
        Ok(body)
    }

    async fn read_more(&mut self, path: &str) -> Result<(), String> {
        self.answer.reserve(8192);
        match self.stream.read_buf(&mut self.answer).await {
            Ok(0) => Err(format!("{path}: the server closed the connection")),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{path}: reading the answer: {e}")),
        }
    }
}

/// The status code and `Content-Length` of an answer's head (without the
/// blank line).
fn parse_head(head: &[u8]) -> Result<(u16, usize), String> {
    let text = std::str::from_utf8(head).map_err(|_| "head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("status line `{status_line}`"))?;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                return value
                    .trim()
                    .parse()
                    .map(|len| (status, len))
                    .map_err(|_| format!("`{line}`"));
            }
            if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(format!("`{line}` (not read by the bench)"));
            }
        }
    }
    Err("without Content-Length".into())
}

/// Where `needle` first starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The number right after the first `key` in `s` (e.g. `"delivered":`).
pub(crate) use super::super::client::number_after;

/// How many times `key` followed by exactly `value` (not a longer number)
/// occurs in `s`: e.g. the items of a batch answer with `"delivered":1`.
pub(crate) fn count_values(s: &[u8], key: &[u8], value: u64) -> usize {
    let mut count = 0;
    let mut at = 0;
    while let Some(i) = find(&s[at..], key) {
        let start = at + i + key.len();
        let digits = s[start..].iter().take_while(|b| b.is_ascii_digit()).count();
        if std::str::from_utf8(&s[start..start + digits])
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
            == Some(value)
        {
            count += 1;
        }
        at = start;
    }
    count
}

/// Appends one publish body for `target` (a JSON target) in `phase`,
/// stamped with the current time (`"t"`, [`now_ns`]), with `pad` as
/// filler: the payload the bench's subscribers time (`client.rs`).
pub(crate) fn write_body(
    out: &mut Vec<u8>,
    target: std::fmt::Arguments<'_>,
    phase: usize,
    pad: &str,
) {
    let _ = write!(
        out,
        r#"{{"target":{target},"type":"bench","payload":{{"p":{phase},"pad":"{pad}","t":{}}}}}"#,
        now_ns()
    );
}

/// A small, fast random number generator (xorshift64*), one per task.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value).
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A number below `n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_heads_and_numbers() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 42";
        assert_eq!(parse_head(head), Ok((200, 42)));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked").is_err());
        let body = br#"{"id":"a","delivered":10000}"#;
        assert_eq!(number_after(body, b"\"delivered\":"), Some(10000));
        assert_eq!(
            number_after(br#"{"delivered":null}"#, b"\"delivered\":"),
            None
        );
        let batch =
            br#"[{"id":"a","delivered":1},{"id":"b","delivered":10},{"id":"c","delivered":1}]"#;
        assert_eq!(count_values(batch, b"\"delivered\":", 1), 2);
        let mut out = Vec::new();
        write_body(&mut out, format_args!(r#"{{"user":"u{}"}}"#, 7), 3, "xx");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(
            r#"{"target":{"user":"u7"},"type":"bench","payload":{"p":3,"pad":"xx","t":"#
        ));
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}

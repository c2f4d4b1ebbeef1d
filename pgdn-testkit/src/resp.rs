//! Talking to the test servers: a minimal RESP2 client over a std
//! [`TcpStream`] for the testkit's own waits (one command per connection,
//! short timeouts, so a paused or killed node is an error, not a hang), and
//! [`redis_cli`], which runs the real `redis-cli` for tests that want it
//! (e.g. `-c` to follow cluster redirections).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{INSTALL_HINT, find_binary};

/// How long the testkit's client waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// How long it waits for a reply (a paused node never replies).
const REPLY_TIMEOUT: Duration = Duration::from_millis(1000);

/// Where `redis-cli` is, if installed: on `PATH`, else `/usr/bin/redis-cli`
/// (Debian installs it with `redis-server`, from `redis-tools`).
pub fn redis_cli_path() -> Option<PathBuf> {
    find_binary("redis-cli", "/usr/bin/redis-cli")
}

/// `redis-cli`, or a panic that says how to install it.
pub(crate) fn redis_cli_bin() -> PathBuf {
    redis_cli_path().unwrap_or_else(|| {
        panic!(
            "redis-cli is not installed; the cluster and sentinel tests need it. Install it with \
             `{INSTALL_HINT}` (or run `cargo xtask test`, which installs it when it can)"
        )
    })
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args...>` and returns its
/// standard output, trimmed. Replies are printed as `redis-cli` prints them
/// when its output is not a terminal: a bulk string as is, an error as
/// `ERR ...` (still a success: check the text). Pass `-c` first to follow
/// cluster redirections.
///
/// # Panics
/// When `redis-cli` is not installed (with the command to install it) or
/// exits with a failure (with its output).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(redis_cli_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`redis-cli -p {port} {}` failed ({}):\n{stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.trim().to_string()
}

/// A RESP2 reply (an error reply is the `Err` of [`call`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK`, or a bulk string (`$3\r\nabc`), read as UTF-8 (lossy).
    Text(String),
    /// `:42`.
    Int(i64),
    /// `$-1` or `*-1`.
    Nil,
    /// `*2\r\n...`.
    Array(Vec<Reply>),
}

impl Reply {
    /// The text of a status or bulk string reply.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Reply::Text(s) => Some(s),
            _ => None,
        }
    }

    /// An integer reply, or a text reply holding one.
    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Text(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The elements of an array reply (none for anything else).
    pub(crate) fn array(&self) -> &[Reply] {
        match self {
            Reply::Array(items) => items,
            _ => &[],
        }
    }

    /// The value of `key` in a flat array of field/value pairs (how RESP2
    /// sends maps, e.g. `SENTINEL MASTER`).
    pub(crate) fn field(&self, key: &str) -> Option<&Reply> {
        self.array()
            .chunks(2)
            .find(|pair| pair[0].text() == Some(key))
            .and_then(|pair| pair.get(1))
    }
}

/// Sends one command to `127.0.0.1:<port>` on a new connection and reads
/// its reply; `Err` says what went wrong (refused, timed out, an error
/// reply), naming the port.
pub(crate) fn call(port: u16, args: &[&str]) -> Result<Reply, String> {
    let what = || format!("127.0.0.1:{port} `{}`", args.join(" "));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("{}: {e}", what()))?;
    let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| format!("{}: {e}", what()))?;
    read_reply(&mut BufReader::new(&stream)).map_err(|e| format!("{}: {e}", what()))
}

/// Reads one reply.
fn read_reply(r: &mut impl BufRead) -> Result<Reply, String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => return Err("connection closed".into()),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    let line = line
        .strip_suffix("\r\n")
        .ok_or_else(|| format!("truncated reply {line:?}"))?;
    let Some(kind) = line.chars().next() else {
        return Err("empty reply line".into());
    };
    let rest = &line[1..];
    let len = || {
        rest.parse::<i64>()
            .map_err(|_| format!("bad length in {line:?}"))
    };
    match kind {
        '+' => Ok(Reply::Text(rest.to_string())),
        '-' => Err(rest.to_string()),
        ':' => Ok(Reply::Int(len()?)),
        '$' => {
            let Ok(n) = usize::try_from(len()?) else {
                return Ok(Reply::Nil);
            };
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n);
            Ok(Reply::Text(String::from_utf8_lossy(&buf).into_owned()))
        }
        '*' => {
            let Ok(n) = usize::try_from(len()?) else {
                return Ok(Reply::Nil);
            };
            (0..n)
                .map(|_| read_reply(r))
                .collect::<Result<_, _>>()
                .map(Reply::Array)
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

/// The value of `key` in an `INFO` text (`key:value` lines).
pub(crate) fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(key)?.strip_prefix(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &str) -> Result<Reply, String> {
        read_reply(&mut bytes.as_bytes())
    }

    #[test]
    fn reads_resp2_replies() {
        assert_eq!(parse("+OK\r\n"), Ok(Reply::Text("OK".into())));
        assert_eq!(parse("-ERR no\r\n"), Err("ERR no".into()));
        assert_eq!(parse(":-3\r\n"), Ok(Reply::Int(-3)));
        assert_eq!(parse("$-1\r\n"), Ok(Reply::Nil));
        assert_eq!(parse("$4\r\na\r\nb\r\n"), Ok(Reply::Text("a\r\nb".into())));
        let r = parse("*2\r\n$4\r\nname\r\n*1\r\n:7\r\n").unwrap();
        assert_eq!(r.field("name").unwrap().array(), &[Reply::Int(7)]);
        assert!(parse("$5\r\nab").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert_eq!(info_field(info, "role"), Some("slave"));
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "master"), None);
    }
}

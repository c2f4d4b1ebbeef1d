//! What the bench asks Redis itself: its own counters around a phase
//! ([`Probe`]: commands, network bytes and CPU from `INFO`, less the
//! bench's own requests), and a [`Spy`] that subscribes to the nodes'
//! channels and counts what Redis sends on each.
//!
//! A small synchronous RESP2 client over a `TcpStream`, written here
//! because the bench needs to count the bytes of its own requests and
//! replies exactly, and to read pushes from a subscription.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// A status or bulk string (lossy UTF-8).
    Text(String),
    /// An integer.
    Int(i64),
    /// A nil bulk string or array.
    Nil,
    /// An array.
    Array(Vec<Value>),
    /// An error reply.
    Error(String),
}

/// A reader that counts the bytes it hands out.
struct Counting<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Encodes a command.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one value.
fn read_value(r: &mut impl BufRead) -> std::io::Result<Value> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let body = line
        .strip_suffix("\r\n")
        .ok_or_else(|| bad(format!("a RESP line without CRLF: {line:?}")))?;
    let (kind, rest) = body.split_at(body.len().min(1));
    let len = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("not a number: {rest:?}")))
    };
    match kind {
        "+" => Ok(Value::Text(rest.to_string())),
        "-" => Ok(Value::Error(rest.to_string())),
        ":" => Ok(Value::Int(len()?)),
        "$" => {
            let Ok(n) = usize::try_from(len()?) else {
                return Ok(Value::Nil);
            };
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n);
            Ok(Value::Text(String::from_utf8_lossy(&buf).into_owned()))
        }
        "*" => {
            let Ok(n) = usize::try_from(len()?) else {
                return Ok(Value::Nil);
            };
            (0..n)
                .map(|_| read_value(r))
                .collect::<Result<_, _>>()
                .map(Value::Array)
        }
        _ => Err(bad(format!("unknown RESP type in {line:?}"))),
    }
}

/// One connection to a Redis on 127.0.0.1 that counts its own traffic
/// and commands, so that a [`Snapshot`] can leave them out.
pub(crate) struct Probe {
    port: u16,
    writer: TcpStream,
    reader: BufReader<Counting<TcpStream>>,
    /// Bytes written so far.
    sent: u64,
    /// Commands sent so far, by lower-case name.
    commands: BTreeMap<String, u64>,
}

/// Redis's counters at one moment, and the bench's own share of them.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// When it was taken.
    pub(crate) at: Instant,
    /// `total_net_input_bytes`.
    net_in: u64,
    /// `total_net_output_bytes`.
    net_out: u64,
    /// `used_cpu_sys + used_cpu_user`, seconds.
    cpu_secs: f64,
    /// `calls` of every `cmdstat_<name>`.
    calls: BTreeMap<String, u64>,
    /// Bytes the probe had sent, this snapshot's request included (Redis
    /// counts a request's input before it runs it).
    own_in: u64,
    /// Bytes the probe had received before this snapshot's reply (Redis
    /// counts a reply's output once it is written, after the snapshot).
    own_out: u64,
    /// Commands the probe had sent before this one (a command's call is
    /// counted once it ran).
    own_calls: BTreeMap<String, u64>,
}

/// What Redis did between two snapshots, the bench's own requests left
/// out.
#[derive(Debug, Clone, Default)]
pub(crate) struct Usage {
    /// Seconds between the snapshots.
    pub(crate) secs: f64,
    /// Bytes Redis read from its clients.
    pub(crate) net_in: f64,
    /// Bytes Redis wrote to its clients.
    pub(crate) net_out: f64,
    /// CPU seconds (user + system).
    pub(crate) cpu_secs: f64,
    /// Calls, by command name (commands run inside scripts included, as
    /// Redis counts them).
    pub(crate) calls: BTreeMap<String, f64>,
}

impl Usage {
    /// Every command Redis ran, those inside scripts included.
    pub(crate) fn commands(&self) -> f64 {
        self.calls.values().sum()
    }

    /// Calls of the commands named in `names`.
    pub(crate) fn calls_of(&self, names: &[&str]) -> f64 {
        names
            .iter()
            .map(|n| self.calls.get(*n).copied().unwrap_or(0.0))
            .sum()
    }

    /// This usage less `rate` (a usage per second, e.g. of an idle
    /// window) over this usage's span: what the phase itself cost.
    pub(crate) fn less(&self, rate: &Usage) -> Usage {
        let f = self.secs;
        let mut calls = self.calls.clone();
        for (name, per_sec) in &rate.calls {
            *calls.entry(name.clone()).or_default() -= per_sec * f;
        }
        Usage {
            secs: self.secs,
            net_in: self.net_in - rate.net_in * f,
            net_out: self.net_out - rate.net_out * f,
            cpu_secs: self.cpu_secs - rate.cpu_secs * f,
            calls,
        }
    }

    /// This usage divided by its span: per second.
    pub(crate) fn per_sec(&self) -> Usage {
        self.scaled(1.0 / self.secs.max(1e-9))
    }

    /// Every figure times `k` (the span too).
    pub(crate) fn scaled(&self, k: f64) -> Usage {
        Usage {
            secs: self.secs * k,
            net_in: self.net_in * k,
            net_out: self.net_out * k,
            cpu_secs: self.cpu_secs * k,
            calls: self.calls.iter().map(|(n, c)| (n.clone(), c * k)).collect(),
        }
    }
}

/// The value of `key` in an `INFO` text.
fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(key)?.strip_prefix(':'))
}

impl Probe {
    /// Connects to the Redis on `127.0.0.1:<port>`.
    pub(crate) fn connect(port: u16) -> Result<Probe, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("connecting to redis on port {port}: {e}"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let reader = stream
            .try_clone()
            .map_err(|e| format!("redis on port {port}: {e}"))?;
        Ok(Probe {
            port,
            writer: stream,
            reader: BufReader::new(Counting {
                inner: reader,
                bytes: 0,
            }),
            sent: 0,
            commands: BTreeMap::new(),
        })
    }

    /// Bytes received so far (only whole replies are ever read, so none
    /// sits in the buffer between commands).
    fn received(&self) -> u64 {
        self.reader.get_ref().bytes - self.reader.buffer().len() as u64
    }

    /// Sends one command and reads its reply.
    pub(crate) fn call(&mut self, args: &[&str]) -> Result<Value, String> {
        let request = encode(args);
        let what = || format!("redis on port {} `{}`", self.port, args.join(" "));
        self.writer
            .write_all(&request)
            .map_err(|e| format!("{}: {e}", what()))?;
        self.sent += request.len() as u64;
        *self
            .commands
            .entry(args[0].to_ascii_lowercase())
            .or_default() += 1;
        match read_value(&mut self.reader) {
            Ok(Value::Error(e)) => Err(format!("{}: {e}", what())),
            Ok(v) => Ok(v),
            Err(e) => Err(format!("{}: {e}", what())),
        }
    }

    /// Reads the counters now.
    pub(crate) fn snapshot(&mut self) -> Result<Snapshot, String> {
        let own_calls = self.commands.clone();
        let own_out = self.received();
        let info = match self.call(&["INFO", "stats", "cpu", "commandstats"])? {
            Value::Text(t) => t,
            other => return Err(format!("INFO answered {other:?}")),
        };
        let at = Instant::now();
        let num = |key: &str| -> Result<f64, String> {
            info_field(&info, key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("INFO has no {key}"))
        };
        let calls = info
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect();
        Ok(Snapshot {
            at,
            net_in: num("total_net_input_bytes")? as u64,
            net_out: num("total_net_output_bytes")? as u64,
            cpu_secs: num("used_cpu_sys")? + num("used_cpu_user")?,
            calls,
            own_in: self.sent,
            own_out,
            own_calls,
        })
    }
}

impl Snapshot {
    /// What Redis did from `self` to `later`, the probe's own traffic and
    /// commands left out.
    pub(crate) fn until(&self, later: &Snapshot) -> Usage {
        let mut calls = BTreeMap::new();
        for (name, &n) in &later.calls {
            let before = self.calls.get(name).copied().unwrap_or(0);
            let own = later.own_calls.get(name).copied().unwrap_or(0)
                - self.own_calls.get(name).copied().unwrap_or(0);
            let d = n.saturating_sub(before).saturating_sub(own);
            if d > 0 {
                calls.insert(name.clone(), d as f64);
            }
        }
        Usage {
            secs: (later.at - self.at).as_secs_f64(),
            net_in: later.net_in.saturating_sub(self.net_in) as f64
                - (later.own_in - self.own_in) as f64,
            net_out: later.net_out.saturating_sub(self.net_out) as f64
                - (later.own_out - self.own_out) as f64,
            cpu_secs: later.cpu_secs - self.cpu_secs,
            calls,
        }
    }
}

/// Snapshots of several Redis servers taken together.
pub(crate) struct Probes(pub(crate) Vec<Probe>);

impl Probes {
    /// One probe per port.
    pub(crate) fn connect(ports: &[u16]) -> Result<Probes, String> {
        ports
            .iter()
            .map(|&p| Probe::connect(p))
            .collect::<Result<_, _>>()
            .map(Probes)
    }

    /// A snapshot of each.
    pub(crate) fn snapshot(&mut self) -> Result<Vec<Snapshot>, String> {
        self.0.iter_mut().map(Probe::snapshot).collect()
    }
}

/// Each server's usage between two lists of snapshots.
pub(crate) fn usages(before: &[Snapshot], after: &[Snapshot]) -> Vec<Usage> {
    before.iter().zip(after).map(|(a, b)| a.until(b)).collect()
}

/// The kinds of target a [`Spy`] tells apart, in the order of its counts.
pub(crate) const KINDS: [&str; 3] = ["user", "group", "broadcast"];

/// Messages per channel, by target kind ([`KINDS`]).
pub(crate) type ChannelCounts = BTreeMap<String, [u64; 3]>;

/// The kind of target of a message on pgdn's channels
/// (`number\norigin\nid\ntarget\nframe`, in both the old and the new
/// format), as an index of [`KINDS`].
fn message_kind(payload: &str) -> Option<usize> {
    let target = payload.split('\n').nth(3)?;
    if target.starts_with("{\"user") {
        Some(0)
    } else if target.starts_with("{\"group") {
        Some(1)
    } else if target.starts_with("{\"broadcast") {
        Some(2)
    } else {
        None
    }
}

/// A subscriber of the bench's own that counts the messages Redis sends on
/// some channels, by kind of target: what Redis sends every node
/// subscribed to the same channels. Runs on a thread until [`Spy::stop`].
pub(crate) struct Spy {
    /// The connection, to send the closing PING on.
    writer: TcpStream,
    thread: JoinHandle<Result<ChannelCounts, String>>,
}

impl Spy {
    /// Subscribes to `channels` on the Redis on `127.0.0.1:<port>` (with
    /// `SSUBSCRIBE`, one channel a command, when `sharded`; else
    /// `SUBSCRIBE`) and returns once Redis confirmed every one.
    pub(crate) fn start(port: u16, channels: Vec<String>, sharded: bool) -> Result<Spy, String> {
        let mut writer = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("spy: connecting to redis on port {port}: {e}"))?;
        let _ = writer.set_read_timeout(Some(Duration::from_secs(30)));
        let mut reader = BufReader::new(
            writer
                .try_clone()
                .map_err(|e| format!("spy: redis on port {port}: {e}"))?,
        );
        let mut request = Vec::new();
        if sharded {
            for c in &channels {
                request.extend(encode(&["SSUBSCRIBE", c]));
            }
        } else {
            let mut args = vec!["SUBSCRIBE"];
            args.extend(channels.iter().map(String::as_str));
            request.extend(encode(&args));
        }
        writer
            .write_all(&request)
            .map_err(|e| format!("spy: subscribing: {e}"))?;
        for _ in &channels {
            match read_value(&mut reader) {
                Ok(Value::Array(items))
                    if matches!(items.first(), Some(Value::Text(k))
                        if k.eq_ignore_ascii_case("subscribe") || k.eq_ignore_ascii_case("ssubscribe")) =>
                    {}
                other => return Err(format!("spy: unexpected answer to a subscribe: {other:?}")),
            }
        }
        let thread = std::thread::spawn(move || {
            let mut counts = ChannelCounts::new();
            loop {
                match read_value(&mut reader) {
                    Ok(Value::Array(items)) => match items.as_slice() {
                        [
                            Value::Text(kind),
                            Value::Text(channel),
                            Value::Text(payload),
                        ] if kind == "message" || kind == "smessage" => {
                            let Some(k) = message_kind(payload) else {
                                return Err(format!(
                                    "spy: a message of no known kind on {channel}"
                                ));
                            };
                            counts.entry(channel.clone()).or_default()[k] += 1;
                        }
                        // The answer to the PING of `stop`: Redis sent
                        // everything published before it.
                        [Value::Text(kind), ..] if kind == "pong" => return Ok(counts),
                        other => return Err(format!("spy: unexpected push {other:?}")),
                    },
                    Ok(other) => return Err(format!("spy: unexpected push {other:?}")),
                    Err(e) => return Err(format!("spy: reading: {e}")),
                }
            }
        });
        Ok(Spy { writer, thread })
    }

    /// Sends a PING and returns, once its answer arrived, the messages
    /// received per channel and kind before it.
    pub(crate) fn stop(mut self) -> Result<ChannelCounts, String> {
        self.writer
            .write_all(&encode(&["PING"]))
            .map_err(|e| format!("spy: PING: {e}"))?;
        self.thread
            .join()
            .map_err(|_| "spy: the thread panicked".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values() {
        let mut r = "*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$3\r\na\r\n\r\n".as_bytes();
        assert_eq!(
            read_value(&mut r).unwrap(),
            Value::Array(vec![
                Value::Text("smessage".into()),
                Value::Text("ch".into()),
                Value::Text("a\r\n".into())
            ])
        );
        assert_eq!(
            read_value(&mut "-ERR x\r\n".as_bytes()).unwrap(),
            Value::Error("ERR x".into())
        );
        assert_eq!(read_value(&mut ":7\r\n".as_bytes()).unwrap(), Value::Int(7));
        assert_eq!(read_value(&mut "$-1\r\n".as_bytes()).unwrap(), Value::Nil);
        assert!(read_value(&mut "$3\r\nab".as_bytes()).is_err());
    }

    #[test]
    fn tells_kinds_apart() {
        let msg = |target: &str| format!("17:3\nn1\nm1\n{target}\n{{\"id\":\"m1\"}}");
        assert_eq!(message_kind(&msg(r#"{"user":"u1"}"#)), Some(0));
        assert_eq!(message_kind(&msg(r#"{"users":["u1"]}"#)), Some(0));
        assert_eq!(message_kind(&msg(r#"{"group":"g"}"#)), Some(1));
        assert_eq!(message_kind(&msg(r#"{"broadcast":{}}"#)), Some(2));
        assert_eq!(message_kind("nothing"), None);
    }

    #[test]
    fn usage_leaves_out_the_probe_and_the_background() {
        let snap =
            |net_in, net_out, cpu, calls: &[(&str, u64)], own_in, own_out, own: &[(&str, u64)]| {
                Snapshot {
                    at: Instant::now(),
                    net_in,
                    net_out,
                    cpu_secs: cpu,
                    calls: calls.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
                    own_in,
                    own_out,
                    own_calls: own.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
                }
            };
        let a = snap(
            1000,
            5000,
            1.0,
            &[("info", 3), ("evalsha", 10)],
            100,
            2000,
            &[("info", 3)],
        );
        let b = snap(
            1300,
            9000,
            1.5,
            &[("info", 4), ("evalsha", 30)],
            150,
            3000,
            &[("info", 4)],
        );
        let u = a.until(&b);
        assert_eq!(u.net_in, 250.0);
        assert_eq!(u.net_out, 3000.0);
        assert_eq!(u.calls.get("info"), None);
        assert_eq!(u.calls["evalsha"], 20.0);
        assert!((u.cpu_secs - 0.5).abs() < 1e-9);
        let mut u = u;
        u.secs = 2.0;
        let idle = Usage {
            secs: 1.0,
            net_in: 25.0,
            net_out: 100.0,
            cpu_secs: 0.05,
            calls: [("evalsha".to_string(), 2.0)].into(),
        };
        let net = u.less(&idle);
        assert_eq!(net.net_in, 200.0);
        assert_eq!(net.net_out, 2800.0);
        assert_eq!(net.calls["evalsha"], 16.0);
        assert!((net.cpu_secs - 0.4).abs() < 1e-9);
    }
}

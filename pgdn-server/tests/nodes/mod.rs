//! The cluster tests' nodes: the real binary in cluster mode, and a
//! publisher that sends steadily through faults and checks that nothing it
//! was told was accepted is lost.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgdn_server::JwtAuthenticator;
use pgdn_testkit::{RedisDeployment, RedisServer};
use serde_json::{Value, json};

use crate::common::{Client, WAIT};
use crate::spawn::clean_command;

pub const SECRET: &str = "cluster-secret-of-at-least-32-bytes";
pub const KEY: &str = "cluster-publish-key";

/// One node: the real binary in cluster mode.
pub struct Node {
    pub child: Child,
    pub addr: String,
    /// What it logged on stderr so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    pub fn start(redis: &RedisServer, id: &str) -> Node {
        let node = Node::launch(&redis.url(), id, &["--node-ttl", "1s"]);
        node.wait_ready();
        node
    }

    /// Starts a node on any Redis layout, with `extra` flags, and waits
    /// until it is ready.
    pub fn start_on(dep: &RedisDeployment, id: &str, extra: &[&str]) -> Node {
        let mut args = vec!["--redis-mode", dep.mode()];
        args.extend_from_slice(extra);
        let node = Node::launch(&dep.url(), id, &args);
        node.wait_ready();
        node
    }

    /// `GET path` with the publish key: the status and the JSON body.
    pub async fn get_with_key(&self, path: &str) -> (u16, Value) {
        let res = reqwest::Client::new()
            .get(format!("http://{}{path}", self.addr))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    /// `GET /metrics`: the value of the sample `name` (with its labels,
    /// e.g. `pgdn_broker_messages_received_total{target="user"}`).
    pub async fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .trim()
            .parse::<f64>()
            .unwrap() as u64
    }

    /// [`Node::wait_ready`] without blocking the test's runtime (which may
    /// run a proxy the node depends on).
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/readyz` answers 200: the node may take publishes. (A
    /// fresh Redis makes the cluster settle for a few seconds first.)
    /// Blocks the thread.
    pub fn wait_ready(&self) {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut status = String::new();
            if let Ok(mut s) = std::net::TcpStream::connect(&self.addr) {
                let _ =
                    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                let _ = s.read_to_string(&mut status);
            }
            if status.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never ready: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a node on the Redis at `url` with `extra` flags.
    pub fn launch(url: &str, id: &str, extra: &[&str]) -> Node {
        let mut child = clean_command()
            .args(["--addr", "127.0.0.1:0", "--redis-url", url, "--node-id", id])
            .args(["--jwt-secret", SECRET, "--publish-key", KEY])
            .args(extra)
            .args(["--log", "warn"])
            .spawn()
            .expect("pgdn-server starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("pgdn-server listening on http://") {
                addr = Some(a.to_string());
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Node {
            child,
            addr: addr.expect("the node prints its address"),
            log,
        }
    }

    /// Whether a line it logged contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// `GET path`: the status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let res = reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn connect(&self, user: &str, groups: &[&str], since: Option<&str>) -> Client {
        let token = JwtAuthenticator::new(SECRET)
            .issue(user, groups, Duration::from_secs(600))
            .unwrap();
        let mut url = format!("ws://{}/ws?token={token}", self.addr);
        if let Some(s) = since {
            url.push_str(&format!("&since={s}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client::after_upgrade(ws).await
    }

    pub async fn post(&self, body: Value) -> (u16, Value) {
        let res = reqwest::Client::new()
            .post(format!("http://{}/api/v1/publish", self.addr))
            .bearer_auth(KEY)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap())
    }

    pub async fn publish(&self, body: Value) -> String {
        let (status, reply) = self.post(body).await;
        assert_eq!(status, 200, "{reply}");
        reply["id"].as_str().unwrap().to_string()
    }

    pub async fn stats(&self) -> Value {
        reqwest::Client::new()
            .get(format!("http://{}/api/v1/stats", self.addr))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the cluster stats until `ok` holds (the state lives in Redis
    /// and changes with TTLs, so there is no event to wait on).
    pub async fn wait_stats(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.stats().await;
            if ok(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {what}: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The next notification's payload field `n`.
pub async fn next_n(c: &mut Client) -> u64 {
    let v = c.next().await;
    v["payload"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("not a numbered notification: {v}"))
}

pub fn user(u: &str, n: u64) -> Value {
    json!({"target":{"user":u},"type":"info","payload":{"n":n}})
}

/// Publishes `user(alice, n)` to `node` every 50 ms (n = 0, 1, ...) until
/// told to stop, reporting each answer's status on the channel; returns
/// the numbers answered 200. A publish that gets neither 200 nor 503 (an
/// error, a client-side timeout) fails the test. While `hold` is set it
/// sends nothing, and says so once with a status of 0.
pub fn steady_publisher(
    addr: String,
    statuses: tokio::sync::mpsc::UnboundedSender<u16>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut hold: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut every = tokio::time::interval(Duration::from_millis(50));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut accepted = Vec::new();
        for n in 0.. {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => return accepted,
            }
            if *hold.borrow_and_update() {
                let _ = statuses.send(0);
                tokio::select! {
                    _ = hold.wait_for(|h| !*h) => {}
                    _ = stop.wait_for(|s| *s) => return accepted,
                }
            }
            let res = http
                .post(format!("http://{addr}/api/v1/publish"))
                .bearer_auth(KEY)
                .body(user("alice", n).to_string())
                .send()
                .await
                .unwrap_or_else(|e| panic!("publish {n} got no answer: {e}"));
            let status = res.status().as_u16();
            let body = res.text().await.unwrap_or_default();
            assert!(
                status == 200 || status == 503,
                "publish {n}: {status} {body}"
            );
            if status == 200 {
                accepted.push(n);
            }
            let _ = statuses.send(status);
        }
        accepted
    })
}

/// Waits for the next answer with `status` from the steady publisher.
pub async fn wait_status(statuses: &mut tokio::sync::mpsc::UnboundedReceiver<u16>, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, statuses.recv()).await {
            Ok(Some(s)) if s == status => return,
            Ok(Some(_)) => {}
            other => panic!("never answered {status}: {other:?}"),
        }
    }
}

/// Reads `c` until the notification with `payload.n == marker`, returning
/// every number seen before it.
pub async fn read_until(c: &mut Client, marker: u64) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    loop {
        let n = next_n(c).await;
        if n == marker {
            return seen;
        }
        seen.insert(n);
    }
}

/// Holds the steady publisher (after one more 200), then publishes
/// `marker` through `node` and reads both subscribers up to it, keeping
/// what they got in `seen`: afterwards nothing is in flight.
pub async fn quiesce(
    hold: &tokio::sync::watch::Sender<bool>,
    statuses: &mut tokio::sync::mpsc::UnboundedReceiver<u16>,
    node: &Node,
    subscribers: [&mut Client; 2],
    seen: &mut [BTreeSet<u64>; 2],
    marker: u64,
) {
    wait_status(statuses, 200).await;
    hold.send_replace(true);
    wait_status(statuses, 0).await;
    node.publish(user("alice", marker)).await;
    for (c, seen) in subscribers.into_iter().zip(seen.iter_mut()) {
        seen.extend(read_until(c, marker).await);
    }
}

/// Stops the steady publisher, sends a last marked message and checks
/// that each subscriber got every publish that was answered 200 (the
/// acceptance promise: nothing answered "accepted" may be lost).
pub async fn check_every_accepted_delivered(
    stop: tokio::sync::watch::Sender<bool>,
    publisher: tokio::task::JoinHandle<Vec<u64>>,
    node: &Node,
    subscribers: &mut [&mut Client],
    seen_before: impl IntoIterator<Item = BTreeSet<u64>>,
) -> usize {
    stop.send_replace(true);
    let accepted = publisher.await.unwrap();
    const MARKER: u64 = u64::MAX / 2;
    node.publish(user("alice", MARKER)).await;
    let mut before = seen_before.into_iter();
    for (i, c) in subscribers.iter_mut().enumerate() {
        let mut seen = read_until(c, MARKER).await;
        seen.extend(before.next().unwrap_or_default());
        let lost: Vec<_> = accepted.iter().filter(|n| !seen.contains(n)).collect();
        assert!(
            lost.is_empty(),
            "subscriber {i}: {} publishes were answered 200 and never delivered: {lost:?} \
             (accepted {accepted:?}, delivered {seen:?})",
            lost.len()
        );
    }
    accepted.len()
}

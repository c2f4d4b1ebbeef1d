//! pgdn-client against a real pgdn server on port 0: publishers (async and
//! blocking), retries across a restart, exactly-once, and the subscriber's
//! reconnect, resume and auth handling.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use pgdn_client::{Error, Event, Publisher, Subscriber, Subscription};
use pgdn_server::{JwtAuthenticator, Pgdn};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &[u8] = b"client-test-secret-of-at-least-32-bytes";
const KEY: &str = "client-test-publish-key";
const WAIT: Duration = Duration::from_secs(15);

struct Server {
    addr: SocketAddr,
    pgdn: Pgdn,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start() -> Server {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap(), build()).await
    }

    /// Starts on `addr` again (after a stop): the same port, a fresh server.
    async fn restart_on(addr: SocketAddr) -> Server {
        Self::on(TcpListener::bind(addr).await.unwrap(), build()).await
    }

    async fn on(listener: TcpListener, pgdn: Pgdn) -> Server {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(pgdn.clone().serve(listener, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            pgdn,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .unwrap()
            .unwrap();
    }

    fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn wait_connections(&self, n: usize) {
        let mut rx = self.pgdn.hub().watch_connections();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c == n))
            .await
            .expect("connection count reached")
            .unwrap();
    }
}

fn build() -> Pgdn {
    Pgdn::builder()
        .jwt_secret(SECRET)
        .publish_key(KEY)
        .build()
        .unwrap()
}

fn token(user: &str) -> String {
    JwtAuthenticator::new(SECRET)
        .issue(user, &["g"], Duration::from_secs(600))
        .unwrap()
}

fn fast_subscriber(url: String, user: &str) -> Subscription {
    Subscriber::new(url, token(user))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .subscribe()
        .unwrap()
}

async fn next_event(sub: &mut Subscription) -> Event {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("an event in time")
        .expect("subscription open")
        .expect("no error")
}

async fn expect_connected(sub: &mut Subscription) -> bool {
    loop {
        match next_event(sub).await {
            Event::Connected { resumed, .. } => return resumed,
            Event::Disconnected { .. } => continue,
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

async fn next_n(sub: &mut Subscription) -> u64 {
    let n = tokio::time::timeout(WAIT, sub.next_notification())
        .await
        .expect("a notification in time")
        .expect("open")
        .expect("no error");
    n.payload["n"].as_u64().unwrap()
}

#[tokio::test]
async fn async_publisher_reaches_users_groups_and_everyone() {
    let s = Server::start().await;
    let p = Publisher::new(s.http(), KEY).unwrap();
    let mut sub = fast_subscriber(s.ws(), "u1");
    assert!(!expect_connected(&mut sub).await);
    let r = p.notify_user("u1", "info", json!({"n": 1})).await.unwrap();
    assert_eq!(r.delivered, Some(1));
    assert_eq!(next_n(&mut sub).await, 1);
    p.notify_users(&["u1", "u2"], "success", json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!(next_n(&mut sub).await, 2);
    p.notify_group("g", "warning", json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!(next_n(&mut sub).await, 3);
    p.broadcast("task_progress", json!({"n": 4}), &["u2"])
        .await
        .unwrap();
    assert_eq!(next_n(&mut sub).await, 4);
    let batch = vec![
        pgdn_client::PublishRequest::new(
            pgdn_client::Target::user("u1"),
            pgdn_client::MessageType::info(),
        )
        .with_payload(json!({"n": 5}))
        .unwrap(),
    ];
    assert_eq!(p.publish_batch(batch).await.unwrap().len(), 1);
    assert_eq!(next_n(&mut sub).await, 5);
    let stats = p.stats().await.unwrap();
    assert_eq!((stats.total_users, stats.total_connections), (1, 1));
    assert_eq!(stats.users, vec!["u1"]);
    let me = p.presence("u1").await.unwrap();
    assert_eq!((me.online, me.connections), (true, 1));
    assert!(me.since.is_some());
    let many = p.presence_of(&["nobody", "u1"]).await.unwrap();
    let counts: Vec<usize> = many.iter().map(|u| u.connections).collect();
    assert_eq!(counts, vec![0, 1]);
    let page = p.group_presence("g", None, 10).await.unwrap();
    assert_eq!(page.members.len(), 1);
    assert_eq!((page.members[0].user.as_str(), page.next), ("u1", None));
    s.stop().await;
}

#[tokio::test]
async fn publisher_errors_say_what_to_do() {
    let s = Server::start().await;
    let bad_key = Publisher::new(s.http(), "wrong").unwrap();
    assert!(matches!(
        bad_key.notify_user("u1", "info", json!({})).await,
        Err(Error::Unauthorized(_))
    ));
    let p = Publisher::new(s.http(), KEY).unwrap();
    assert!(matches!(
        p.notify_user("u1", "pong", json!({})).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        p.notify_user("u1", "info", json!([1])).await,
        Err(Error::Invalid(_))
    ));
    let huge = json!({"pad": "x".repeat(2 * 1024 * 1024)});
    match p.notify_user("u1", "info", huge).await {
        Err(Error::Rejected {
            status: 413,
            message,
        }) => assert!(message.contains("larger")),
        other => panic!("expected 413, got {other:?}"),
    }
    assert!(matches!(
        Publisher::new("ftp://x", KEY),
        Err(Error::Invalid(_))
    ));
    let addr = s.addr;
    s.stop().await;
    let down = Publisher::builder(format!("http://{addr}"), KEY)
        .retry_deadline(Duration::from_millis(300))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap();
    match down.notify_user("u1", "info", json!({})).await {
        Err(Error::Unavailable { attempts, .. }) => assert!(attempts > 1, "it retried"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_publisher_works_from_plain_threads_and_spawn_blocking() {
    let s = Server::start().await;
    let mut sub = fast_subscriber(s.ws(), "job-owner");
    expect_connected(&mut sub).await;
    let url = s.http();
    // A plain thread with no runtime of its own, several at once.
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                let p = pgdn_client::blocking::Publisher::new(url, KEY).unwrap();
                for i in 0..5 {
                    let r = p
                        .notify_user("job-owner", "task_progress", json!({"n": t * 100 + i}))
                        .unwrap();
                    assert_eq!(r.delivered, Some(1));
                }
                p.stats().unwrap().total_connections
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 1);
    }
    let mut got = Vec::new();
    for _ in 0..15 {
        got.push(next_n(&mut sub).await);
    }
    got.sort();
    let mut want: Vec<u64> = (0..3)
        .flat_map(|t| (0..5).map(move |i| t * 100 + i))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // Inside spawn_blocking, where a runtime is entered: no panic.
    let url2 = url.clone();
    let r = tokio::task::spawn_blocking(move || {
        let p = pgdn_client::blocking::Publisher::new(url2, KEY).unwrap();
        p.notify_user("job-owner", "task_completed", json!({"n": 999}))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.delivered, Some(1));
    assert_eq!(next_n(&mut sub).await, 999);
    let url3 = url.clone();
    let online = tokio::task::spawn_blocking(move || {
        let p = pgdn_client::blocking::Publisher::new(url3, KEY).unwrap();
        (
            p.presence("job-owner").unwrap().online,
            p.presence_of(&["job-owner"]).unwrap()[0].connections,
        )
    })
    .await
    .unwrap();
    assert_eq!(online, (true, 1));
    s.stop().await;
}

#[tokio::test]
async fn a_publish_retried_across_a_server_restart_is_delivered_exactly_once() {
    let s = Server::start().await;
    let addr = s.addr;
    let mut sub = fast_subscriber(s.ws(), "u1");
    expect_connected(&mut sub).await;
    // The publisher goes through a proxy that refuses connections until
    // the test opens it: its retries then land once the subscriber is back.
    let proxy = Proxy::start(addr).await;
    proxy.set_open(false);
    s.stop().await;
    let p = Publisher::builder(format!("http://{}", proxy.addr), KEY)
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .unwrap();
    let publish = tokio::spawn(async move { p.notify_user("u1", "info", json!({"n": 42})).await });
    proxy.wait_refused(2).await;
    let s = Server::restart_on(addr).await;
    s.wait_connections(1).await;
    expect_connected(&mut sub).await;
    proxy.set_open(true);
    let receipt = publish.await.unwrap().unwrap();
    assert_eq!(receipt.delivered, Some(1));
    loop {
        match next_event(&mut sub).await {
            Event::HistoryGap => continue,
            Event::Notification(n) => {
                assert_eq!(n.payload["n"], 42);
                assert_eq!(n.id, receipt.id);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(s.pgdn.hub().stats().messages_published, 1, "published once");
    // Publishing the same id again is not delivered again.
    let again = Publisher::new(s.http(), KEY).unwrap();
    let dup = again
        .publish(
            pgdn_client::PublishRequest::new(
                pgdn_client::Target::user("u1"),
                pgdn_client::MessageType::info(),
            )
            .with_id(receipt.id.clone()),
        )
        .await
        .unwrap();
    assert_eq!(dup, receipt);
    again
        .notify_user("u1", "info", json!({"n": 43}))
        .await
        .unwrap();
    assert_eq!(next_n(&mut sub).await, 43, "nothing in between");
    s.stop().await;
}

/// The first attempt reaches the server but its reply is too slow; the
/// client times out and retries with the same id: one delivery.
#[tokio::test]
async fn a_retry_after_a_timeout_is_not_delivered_twice() {
    use async_trait::async_trait;
    use pgdn_client::MessageId;

    /// A single-node broker whose first publish is slow.
    #[derive(Default)]
    struct SlowFirst(AtomicUsize, pgdn_server::core::LocalBroker);
    #[async_trait]
    impl pgdn_server::core::Broker for SlowFirst {
        fn start(&self, node: pgdn_server::core::Delivery) {
            self.1.start(node);
        }
        async fn publish(
            &self,
            e: &pgdn_server::core::Envelope,
        ) -> pgdn_server::core::Result<pgdn_server::core::Published> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            self.1.publish(e).await
        }
    }
    let hub = pgdn_server::Hub::builder()
        .broker(Arc::new(SlowFirst::default()))
        .build();
    let pgdn = Pgdn::builder()
        .hub(hub)
        .jwt_secret(SECRET)
        .publish_key(KEY)
        .build()
        .unwrap();
    let s = Server::on(TcpListener::bind("127.0.0.1:0").await.unwrap(), pgdn).await;
    let mut sub = fast_subscriber(s.ws(), "u1");
    expect_connected(&mut sub).await;
    let p = Publisher::builder(s.http(), KEY)
        .request_timeout(Duration::from_millis(200))
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .build()
        .unwrap();
    let receipt = p.notify_user("u1", "info", json!({"n": 1})).await.unwrap();
    assert_eq!(next_n(&mut sub).await, 1);
    p.notify_user("u1", "info", json!({"n": 2})).await.unwrap();
    assert_eq!(next_n(&mut sub).await, 2, "the first was delivered once");
    assert!(MessageId::new(receipt.id.as_str()).is_ok());
    // Whether the server saw the hang-up (the first attempt was cancelled
    // and released its id) or not (the retry waited for it and got its
    // receipt), each message went out once.
    assert_eq!(s.pgdn.hub().stats().messages_published, 2);
    s.stop().await;
}

/// A TCP proxy the test controls: `cut()` drops every connection through it
/// while the server keeps running; while closed it drops new connections
/// at once and counts them.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    open: Arc<std::sync::atomic::AtomicBool>,
    refused: tokio::sync::watch::Receiver<usize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (refused_tx, refused) = tokio::sync::watch::channel(0usize);
        let (list, is_open) = (conns.clone(), open.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    drop(client);
                    refused_tx.send_modify(|n| *n += 1);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        Proxy {
            addr,
            conns,
            open,
            refused,
            accept,
        }
    }

    fn cut(&self) {
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }

    /// Waits until at least `n` connections were refused.
    async fn wait_refused(&self, n: usize) {
        let mut rx = self.refused.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|r| *r >= n))
            .await
            .expect("refused in time")
            .unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn a_subscriber_that_loses_its_connection_gets_everything_after_reconnecting() {
    let s = Server::start().await;
    let proxy = Proxy::start(s.addr).await;
    let mut sub = fast_subscriber(format!("ws://{}/ws", proxy.addr), "u1");
    assert!(!expect_connected(&mut sub).await);
    let p = Publisher::new(s.http(), KEY).unwrap();
    p.notify_user("u1", "info", json!({"n": 0})).await.unwrap();
    assert_eq!(next_n(&mut sub).await, 0);

    proxy.cut();
    s.wait_connections(0).await;
    for n in 1..=20 {
        p.notify_user("u1", "info", json!({"n": n})).await.unwrap();
    }
    // It reconnects by itself and resumes from the last id it saw.
    assert!(expect_connected(&mut sub).await, "reconnected with since=");
    for n in 1..=20 {
        assert_eq!(next_n(&mut sub).await, n);
    }
    p.notify_user("u1", "info", json!({"n": 21})).await.unwrap();
    assert_eq!(
        next_n(&mut sub).await,
        21,
        "no duplicates before live traffic"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_subscriber_follows_the_server_across_a_restart() {
    let s = Server::start().await;
    let addr = s.addr;
    let mut sub = fast_subscriber(s.ws(), "u1");
    expect_connected(&mut sub).await;
    s.stop().await;
    match next_event(&mut sub).await {
        Event::Disconnected { code, .. } => assert_eq!(code, Some(1001)),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let s = Server::restart_on(addr).await;
    expect_connected(&mut sub).await;
    Publisher::new(s.http(), KEY)
        .unwrap()
        .notify_user("u1", "info", json!({"n": 5}))
        .await
        .unwrap();
    assert_eq!(next_n(&mut sub).await, 5);
    s.stop().await;
}

#[tokio::test]
async fn a_subscriber_stops_on_an_auth_failure() {
    let s = Server::start().await;
    let mut sub = Subscriber::new(s.ws(), "not-a-token").subscribe().unwrap();
    match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
        Some(Err(Error::Unauthorized(reason))) => assert_eq!(reason, "invalid token"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .is_none(),
        "and then ends"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_token_callback_is_asked_before_every_connection() {
    let s = Server::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut sub = Subscriber::with_token_callback(s.ws(), move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                Ok(token("u1"))
            } else {
                Err("token service says no".to_string())
            }
        }
    })
    .backoff(Duration::from_millis(10), Duration::from_millis(50))
    .subscribe()
    .unwrap();
    expect_connected(&mut sub).await;
    s.pgdn
        .hub()
        .close_all(pgdn_server::core::DisconnectReason::ServerShutdown);
    expect_connected(&mut sub).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    s.pgdn
        .hub()
        .close_all(pgdn_server::core::DisconnectReason::ServerShutdown);
    loop {
        match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
            Some(Ok(Event::Disconnected { .. })) => continue,
            Some(Err(Error::Token(msg))) => {
                assert!(msg.contains("says no"));
                break;
            }
            other => panic!("expected a token error, got {other:?}"),
        }
    }
    s.stop().await;
}

/// 5xx and 429 are retried, every attempt carries the same generated id,
/// and 4xx is not retried.
#[tokio::test]
async fn retries_5xx_and_429_with_the_same_id_and_not_4xx() {
    use warp::Filter;
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let route = warp::path!("api" / "v1" / "publish")
        .and(warp::body::json())
        .map(move |body: serde_json::Value| {
            let mut log = log.lock().unwrap();
            log.push(body["id"].as_str().unwrap_or_default().to_string());
            let status = match log.len() {
                1 => 503,
                2 => 429,
                _ if body["type"] == "bad" => 400,
                _ => 200,
            };
            let reply = if status == 200 {
                json!({"id": body["id"], "delivered": 1})
            } else {
                json!({"error": format!("status {status}")})
            };
            warp::reply::with_status(
                warp::reply::json(&reply),
                warp::http::StatusCode::from_u16(status).unwrap(),
            )
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    let p = Publisher::builder(format!("http://{addr}"), KEY)
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .build()
        .unwrap();
    let receipt = p.notify_user("u1", "info", json!({})).await.unwrap();
    let ids = seen.lock().unwrap().clone();
    assert_eq!(ids.len(), 3, "two failures, then success");
    assert!(ids.iter().all(|id| id == receipt.id.as_str()), "{ids:?}");
    match p.notify_user("u1", "bad", json!({})).await {
        Err(Error::Rejected {
            status: 400,
            message,
        }) => assert_eq!(message, "status 400"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 4, "a 400 is not retried");
}

/// A server that closes a connection the moment its token's `exp` passes
/// (leeway 0), so that token lifetimes of a few seconds can be tested.
async fn start_expiring() -> Server {
    let pgdn = Pgdn::builder()
        .authenticator(JwtAuthenticator::new(SECRET).leeway(Duration::ZERO))
        .publish_key(KEY)
        .build()
        .unwrap();
    Server::on(TcpListener::bind("127.0.0.1:0").await.unwrap(), pgdn).await
}

/// A token for `user` valid for `ttl` (`exp` is whole seconds, so it
/// lives between `ttl - 1 s` and `ttl`).
fn token_for(user: &str, ttl: Duration) -> String {
    JwtAuthenticator::new(SECRET)
        .issue(user, &["g"], ttl)
        .unwrap()
}

/// Publishes `{"n": 0..count}` to `users`, one every 50 ms.
fn publish_stream(http: String, users: &'static [&'static str], count: u64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let p = Publisher::new(http, KEY).unwrap();
        let mut every = tokio::time::interval(Duration::from_millis(50));
        for n in 0..count {
            every.tick().await;
            p.notify_users(users, "info", json!({"n": n}))
                .await
                .unwrap();
        }
    })
}

/// What a subscriber saw until its `count`th notification.
#[derive(Debug, Default)]
struct Seen {
    ns: Vec<u64>,
    refreshed: usize,
    refresh_failed: usize,
    /// (close code, retry_in) of every disconnect.
    disconnects: Vec<(Option<u16>, Duration)>,
    /// `resumed` of every reconnect.
    reconnects: Vec<bool>,
}

async fn collect(sub: &mut Subscription, count: usize) -> Seen {
    let mut seen = Seen::default();
    while seen.ns.len() < count {
        match next_event(sub).await {
            Event::Notification(n) => seen.ns.push(n.payload["n"].as_u64().unwrap()),
            Event::TokenRefreshed { expires_at } => {
                assert!(expires_at.is_some(), "a JWT connection keeps an expiry");
                seen.refreshed += 1;
            }
            Event::TokenRefreshFailed { .. } => seen.refresh_failed += 1,
            Event::Disconnected { code, retry_in, .. } => seen.disconnects.push((code, retry_in)),
            Event::Connected { resumed, .. } => seen.reconnects.push(resumed),
            // The subscriber's keepalive (every 25 s).
            Event::Frame(f) if f["type"] == "pong" => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    seen
}

/// The issue's scenario: tokens that live 5 s, a steady stream for 30 s.
/// The subscriber refreshes in band before each expiry, so the connection
/// is never closed, and every message arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_with_5_s_tokens_refreshes_in_band_and_misses_nothing_for_30_s() {
    const COUNT: u64 = 600; // 30 s at one per 50 ms
    let s = start_expiring().await;
    let minted = Arc::new(AtomicUsize::new(0));
    let counter = minted.clone();
    let mut sub = Subscriber::with_token_callback(s.ws(), move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok(token_for("u1", Duration::from_secs(5))) }
    })
    .backoff(Duration::from_millis(20), Duration::from_millis(200))
    .subscribe()
    .unwrap();
    assert!(!expect_connected(&mut sub).await);
    let publisher = publish_stream(s.http(), &["u1"], COUNT);
    let seen = collect(&mut sub, COUNT as usize).await;
    publisher.await.unwrap();
    assert_eq!(
        seen.ns,
        (0..COUNT).collect::<Vec<_>>(),
        "all, once, in order"
    );
    assert_eq!(seen.disconnects, vec![], "refreshed in time, never closed");
    assert_eq!(seen.refresh_failed, 0);
    // Tokens live 4-5 s and are refreshed at 80 %: at least 6 refreshes in 30 s.
    assert!(seen.refreshed >= 6, "{seen:?}");
    // One for the connection, one per refresh (and maybe one in flight).
    let minted = minted.load(Ordering::SeqCst);
    assert!(
        (seen.refreshed + 1..=seen.refreshed + 2).contains(&minted),
        "{minted} {seen:?}"
    );
    assert_eq!(s.pgdn.hub().stats().messages_published, COUNT);
    s.stop().await;
}

/// When the token cannot be refreshed in band, the server closes with 4001
/// at expiry and the subscriber reconnects at once with a fresh token and
/// `since=`: nothing is lost either. `a` does not refresh in band; `b`'s
/// in-band refreshes are refused (its callback then hands out a token for
/// another user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_token_expires_reconnects_with_since_and_misses_nothing() {
    const COUNT: u64 = 140; // 7 s at one per 50 ms
    let ttl = Duration::from_secs(3);
    let s = start_expiring().await;
    let mut a =
        Subscriber::with_token_callback(s.ws(), move || async move { Ok(token_for("a", ttl)) })
            .in_band_refresh(false)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .subscribe()
            .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut b = Subscriber::with_token_callback(s.ws(), move || {
        // Calls alternate: a connection, then its in-band refresh.
        let user = if counter.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
            "b"
        } else {
            "someone-else"
        };
        async move { Ok(token_for(user, ttl)) }
    })
    .backoff(Duration::from_millis(20), Duration::from_millis(200))
    .subscribe()
    .unwrap();
    expect_connected(&mut a).await;
    expect_connected(&mut b).await;
    let publisher = publish_stream(s.http(), &["a", "b"], COUNT);
    let (seen_a, seen_b) = tokio::join!(
        collect(&mut a, COUNT as usize),
        collect(&mut b, COUNT as usize)
    );
    publisher.await.unwrap();
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        assert_eq!(
            seen.ns,
            (0..COUNT).collect::<Vec<_>>(),
            "{name}: all, once, in order"
        );
        assert!(seen.disconnects.len() >= 2, "{name}: {seen:?}");
        assert!(
            seen.disconnects
                .iter()
                .all(|d| *d == (Some(4001), Duration::ZERO)),
            "{name}: closed for expiry, reconnected at once: {seen:?}"
        );
        assert!(
            seen.reconnects.iter().all(|r| *r),
            "{name}: resumed with since="
        );
        assert_eq!(seen.refreshed, 0, "{name}");
    }
    assert_eq!(seen_a.refresh_failed, 0, "a never tried");
    assert!(seen_b.refresh_failed >= 2, "{seen_b:?}");
    s.stop().await;
}

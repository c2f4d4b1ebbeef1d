//! The browser client (`/pgdn.js`) and the demo page in a real headless
//! Chromium, driven over the Chrome DevTools Protocol (`browser/cdp.rs`).
//!
//! One scenario, in one browser: the demo page (a) receives a notification,
//! (b) has its connection cut by a TCP proxy the test controls while the
//! server keeps running, and gets what was published meanwhile after
//! reconnecting by itself, (c) follows the server across a restart on the
//! same port; (d) a page written for pgdn-ws (a raw WebSocket) still works;
//! (e) a bad token stops the client (1008, no retry); (f) an app uses
//! pgdn.js directly, and a link gone silent is found dead by its pings.
//!
//! The server runs in-process. Waits poll the page's state every 50 ms up
//! to 15 s; the one sleep checks that nothing happens after 1008.
//! Chromium is required: the test fails, saying how to install it, when it
//! is missing. `PGDN_SCREENSHOT=<file.png>` saves a screenshot of the demo
//! page. A last test checks how `/pgdn.js` is served, without a browser.

#[path = "browser/cdp.rs"]
mod cdp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp::Browser;
use pgdn_server::{Config, JwtAuthenticator, Pgdn};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &[u8] = b"browser-test-secret";
const KEY: &str = "browser-test-key";
const USER: &str = "browser-user";
const WAIT: Duration = Duration::from_secs(15);

/// A pgdn server on a listener of its own, restartable on the same address.
struct Server {
    addr: SocketAddr,
    pgdn: Pgdn,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(addr: SocketAddr) -> Server {
        Self::start_with(addr, Config::default()).await
    }

    async fn start_with(addr: SocketAddr, config: Config) -> Server {
        let listener = TcpListener::bind(addr).await.expect("bind the server");
        let pgdn = Pgdn::builder()
            .config(config)
            .jwt_secret(SECRET)
            .publish_key(KEY)
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(pgdn.clone().serve(listener, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            pgdn,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Shuts down (closing every WebSocket with 1001) and waits for it.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("server stops in time")
            .unwrap();
    }

    async fn wait_connections(&self, n: usize) {
        let mut rx = self.pgdn.hub().watch_connections();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c == n))
            .await
            .unwrap_or_else(|_| panic!("never reached {n} connections"))
            .unwrap();
    }

    /// Publishes `{"n": n}` to `user` over HTTP; returns the message id.
    async fn publish(&self, user: &str, n: u64) -> String {
        self.publish_to(json!({ "user": user }), n).await
    }

    /// Publishes `{"n": n}` to `target` over HTTP; returns the message id.
    async fn publish_to(&self, target: Value, n: u64) -> String {
        let body = json!({"target": target, "type": "info",
                          "payload": {"title": format!("Note {n}"), "message": "from the browser test", "n": n}});
        let res = self
            .http
            .post(format!("http://{}/api/v1/publish", self.addr))
            .bearer_auth(KEY)
            .json(&body)
            .timeout(WAIT)
            .send()
            .await
            .expect("publish");
        assert_eq!(res.status(), 200, "publish refused");
        let reply: Value = res.json().await.unwrap();
        reply["id"].as_str().unwrap().to_string()
    }
}

fn token(user: &str) -> String {
    JwtAuthenticator::new(SECRET)
        .issue(user, &["g"], Duration::from_secs(600))
        .unwrap()
}

/// A TCP proxy the test controls: `cut()` drops every connection through
/// it while the server keeps running; `stall()` stops forwarding on the
/// open ones without closing them (a dead link); while closed it drops new
/// connections at once. Counts the connections it accepted.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    open: Arc<AtomicBool>,
    stall: tokio::sync::watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicUsize::new(0));
        // Bumped by stall(): connections opened before stop forwarding.
        let (stall, stall_rx) = tokio::sync::watch::channel(0u64);
        let (list, is_open, count) = (conns.clone(), open.clone(), accepted.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                if !is_open.load(Ordering::SeqCst) {
                    continue; // dropped: the browser sees a failed connection
                }
                let mut stalled = stall_rx.clone();
                let task = tokio::spawn(async move {
                    let epoch = *stalled.borrow_and_update();
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Holds both sockets open, forwarding nothing, until cut().
                        () = async {
                            let _ = stalled.wait_for(|e| *e != epoch).await;
                        } => std::future::pending().await,
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        Proxy {
            addr,
            conns,
            open,
            stall,
            accepted,
            accept,
        }
    }

    fn stall(&self) {
        self.stall.send_modify(|e| *e += 1);
    }

    fn cut(&self) {
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The ids of what the demo page received, oldest first.
async fn received_ids(b: &mut Browser) -> Vec<String> {
    let v = b.eval("pgdnDemo.received.map((n) => n.id)").await;
    serde_json::from_value(v).unwrap()
}

/// Serves `html` at `/` on a port of its own: an app's frontend.
async fn serve_page(html: String) -> SocketAddr {
    use warp::Filter;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let page = warp::path::end().map(move || warp::reply::html(html.clone()));
    tokio::spawn(warp::serve(page).incoming(listener).run());
    addr
}

#[tokio::test]
async fn the_demo_page_and_pgdn_js_in_headless_chromium() {
    let started = Instant::now();
    let mut b = Browser::launch().await;
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let proxy = Proxy::start(addr).await;
    let launched = started.elapsed();

    // (a) The demo page, loaded through the proxy, connects with the token
    // from its URL and shows a notification.
    b.navigate(&format!("http://{}/?token={}", proxy.addr, token(USER)))
        .await;
    let first_conn = b
        .wait_for(
            "the page to connect",
            "window.pgdnDemo && pgdnDemo.state === 'connected' && pgdnDemo.connectionId",
        )
        .await;
    assert_eq!(b.eval("typeof Pgdn.Client").await, "function");
    assert_eq!(b.eval("pgdnDemo.userId").await, USER);
    assert_eq!(b.eval("pgdnDemo.resumed").await, false);
    let mut ids = vec![server.publish(USER, 0).await];
    b.wait_for("notification 0", "pgdnDemo.received.length === 1")
        .await;
    assert_eq!(received_ids(&mut b).await, ids);
    assert_eq!(b.eval("pgdnDemo.received[0].payload.n").await, 0);
    assert_eq!(b.eval("pgdnDemo.lastId").await, ids[0].as_str());

    // (b) Its connection is cut while the server keeps running. What is
    // published while it is away comes, after it reconnects by itself with
    // since=, exactly once and in order. The proxy refuses connections
    // until all three are published, so they can only come from the replay.
    proxy.set_open(false);
    proxy.cut();
    server.wait_connections(0).await;
    b.wait_for(
        "the page to notice the cut",
        "pgdnDemo.state === 'disconnected' || pgdnDemo.state === 'connecting'",
    )
    .await;
    for n in 1..=3 {
        ids.push(server.publish(USER, n).await);
    }
    proxy.set_open(true);
    let expr = format!(
        "pgdnDemo.state === 'connected' && pgdnDemo.connectionId !== {first_conn} \
         && pgdnDemo.received.length >= 4"
    );
    let second_conn = b.wait_for("the page to resume", &expr).await;
    assert_eq!(
        received_ids(&mut b).await,
        ids,
        "all of them, once, in order"
    );
    assert_eq!(b.eval("pgdnDemo.resumed").await, true, "it sent since=");
    assert_eq!(b.eval("pgdnDemo.historyGaps").await, 0);
    ids.push(server.publish(USER, 4).await);
    b.wait_for(
        "live traffic after the replay",
        "pgdnDemo.received.length >= 5",
    )
    .await;
    assert_eq!(
        received_ids(&mut b).await,
        ids,
        "no duplicates after the replay"
    );

    // (c) The server restarts on the same port: the page reconnects by
    // itself. The new server does not know the page's last id, so it says
    // history_gap; new notifications arrive.
    server.stop().await;
    b.wait_for(
        "the page to see the server go",
        "pgdnDemo.state === 'disconnected' || pgdnDemo.state === 'connecting'",
    )
    .await;
    let server = Server::start(addr).await;
    let expr = format!("pgdnDemo.state === 'connected' && pgdnDemo.connectionId !== {second_conn}");
    b.wait_for("the page to reconnect to the new server", &expr)
        .await;
    assert_eq!(b.eval("pgdnDemo.historyGaps").await, 1);
    ids.push(server.publish(USER, 5).await);
    b.wait_for(
        "a notification from the new server",
        "pgdnDemo.received.length >= 6",
    )
    .await;
    assert_eq!(received_ids(&mut b).await, ids);
    assert_eq!(b.eval("pgdnDemo.connects").await, 3);
    if let Some(path) = std::env::var_os("PGDN_SCREENSHOT") {
        b.screenshot(path.as_ref()).await;
    }

    // (d) A page written for pgdn-ws, with a raw WebSocket and no pgdn.js,
    // works unchanged. It is served by an app of its own (another origin),
    // as pgdn-ws frontends usually are.
    let page = format!(
        "<!doctype html><title>pgdn-ws page</title><script>
         window.msgs = [];
         const ws = new WebSocket('ws://{addr}/ws?token={}');
         ws.onmessage = (ev) => window.msgs.push(JSON.parse(ev.data));
         ws.onopen = () => ws.send(JSON.stringify({{type: 'ping', timestamp: 7}}));
         </script>",
        token("legacy-user")
    );
    let app = serve_page(page).await;
    b.navigate(&format!("http://{app}/")).await;
    b.wait_for(
        "the pgdn-ws page to connect",
        "window.msgs && msgs.some((m) => m.type === 'pong')",
    )
    .await;
    let id = server.publish("legacy-user", 6).await;
    let expr = format!("msgs.some((m) => m.id === '{id}')");
    b.wait_for("the pgdn-ws page's notification", &expr).await;
    let msgs = b.eval("msgs").await;
    assert_eq!(msgs[0]["type"], "connection");
    assert_eq!(msgs[0]["user_id"], "legacy-user");
    assert_eq!(msgs[1], json!({"type": "pong", "timestamp": 7}));
    assert_eq!(msgs[2]["id"], id.as_str());
    assert_eq!(msgs[2]["payload"]["n"], 6);

    // (e) A bad token: the client stops on 1008 and does not try again.
    b.navigate(&format!("http://{}/?token=not-a-valid-token", proxy.addr))
        .await;
    b.wait_for(
        "the page to stop",
        "window.pgdnDemo && pgdnDemo.state === 'stopped'",
    )
    .await;
    let stopped = b
        .eval("({code: pgdnDemo.closeCode, reason: pgdnDemo.closeReason, by: pgdnDemo.stoppedBy, client: pgdnDemo.client.state, retryAt: pgdnDemo.client.retryAt})")
        .await;
    assert_eq!(
        stopped,
        json!({"code": 1008, "reason": "invalid token", "by": "server", "client": "stopped", "retryAt": null})
    );
    // The absence of a retry can only be seen over time: twice the longest
    // first backoff (0.5 s).
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(proxy.accepted(), before, "no new connection after 1008");
    assert_eq!(b.eval("pgdnDemo.state").await, "stopped");

    // (f) An app of its own origin uses pgdn.js directly: the script and
    // the endpoint (given as an http:// URL) come from the pgdn server, the
    // token from an async callback, called before every attempt. A link
    // that goes silent is found dead by the missing pong and replaced, and
    // it resumes from a group message's id.
    let page = format!(
        "<!doctype html><title>app</title><script src='http://{proxy}/pgdn.js'></script><script>
         window.t = {{events: [], notes: [], tokens: 0}};
         window.client = new Pgdn.Client({{
           url: 'http://{proxy}/ws',
           token: async () => {{ t.tokens += 1; return '{}'; }},
           pingInterval: 600, minBackoff: 50, maxBackoff: 200,
           onConnect: (e) => t.events.push(['connect', e.userId, e.resumed]),
           onDisconnect: (e) => t.events.push(['disconnect', e.code, e.reason, e.wasConnected]),
           onNotification: (n) => t.notes.push(n.id),
         }});
         client.connect();
         </script>",
        token(USER),
        proxy = proxy.addr,
    );
    let app = serve_page(page).await;
    b.navigate(&format!("http://{app}/")).await;
    b.wait_for(
        "the app to connect",
        "window.client && client.state === 'connected'",
    )
    .await;
    let group = server.publish_to(json!({"group": "g"}), 7).await;
    let expr = format!("client.lastId === '{group}'");
    b.wait_for("the group message", &expr).await;
    proxy.stall();
    b.wait_for(
        "the silent link to be found dead and replaced",
        "t.events.length >= 3 && client.state === 'connected'",
    )
    .await;
    let broadcast = server.publish_to(json!({"broadcast": {}}), 8).await;
    let expr = format!("client.lastId === '{broadcast}'");
    b.wait_for("the broadcast", &expr).await;
    let state = b
        .eval("({events: t.events, notes: t.notes, tokens: t.tokens})")
        .await;
    assert_eq!(
        state,
        json!({
            "events": [
                ["connect", USER, false],
                ["disconnect", 4000, "no pong", true],
                ["connect", USER, true],
            ],
            "notes": [group, broadcast],
            "tokens": 2,
        })
    );
    b.eval("client.disconnect()").await;
    assert_eq!(b.eval("client.state").await, "idle");

    proxy.cut();
    server.stop().await;
    eprintln!(
        "browser test: Chromium up in {launched:?}, whole scenario {:?}",
        started.elapsed()
    );
}

/// `/pgdn.js` is served as JavaScript whether or not the demo page is on
/// (apps load it too); `/` follows `Config::demo_page`.
#[tokio::test]
async fn pgdn_js_is_served_with_or_without_the_demo_page() {
    for demo_page in [true, false] {
        let mut config = Config::default();
        config.demo_page = demo_page;
        let s = Server::start_with("127.0.0.1:0".parse().unwrap(), config).await;
        let get = |path: &str| s.http.get(format!("http://{}{path}", s.addr)).send();
        let js = get("/pgdn.js").await.unwrap();
        assert_eq!(js.status(), 200);
        assert_eq!(
            js.headers()["content-type"],
            "application/javascript; charset=utf-8"
        );
        assert!(js.text().await.unwrap().contains("root.Pgdn = { Client"));
        let page = get("/").await.unwrap();
        if demo_page {
            assert_eq!(page.status(), 200);
            assert!(
                page.text()
                    .await
                    .unwrap()
                    .contains(r#"<script src="pgdn.js">"#)
            );
        } else {
            assert_eq!(page.status(), 404);
        }
        s.stop().await;
    }
}

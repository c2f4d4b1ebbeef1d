//! The browser client (`/pgdn.js`) and the demo page in a real headless
//! Chromium, driven over the Chrome DevTools Protocol (`browser/cdp.rs`).
//!
//! The main scenario, in one browser: the demo page (a) receives a notification,
//! (b) has its connection cut by a TCP proxy the test controls while the
//! server keeps running, and gets what was published meanwhile after
//! reconnecting by itself, (c) follows the server across a restart on the
//! same port; (d) a page written for pgdn-ws (a raw WebSocket) still works;
//! (e) a bad token stops the client (1008, no retry); (f) an app uses
//! pgdn.js directly, and a link gone silent is found dead by its pings.
//!
//! Then, each in a browser of its own: a plain `EventSource` page resumes
//! through the browser's own `Last-Event-ID`; `/pgdn.js` falls back to
//! Server-Sent Events behind a proxy that refuses WebSocket upgrades,
//! keeping its resume point across both transports; and pgdn.js lives with
//! tokens valid for a few seconds (in-band refresh on WebSocket, reconnect
//! on 4001 over SSE), as does a raw pgdn-ws page; and a page of another
//! origin gets its WebSocket and its `EventSource` only once the server
//! lists that origin (the main scenario's other-origin apps are listed).
//!
//! The server runs in-process, inside a small warp app that also serves
//! the test's pages (same origin as the endpoints) and mints tokens. Waits
//! poll the page's state every 50 ms up to 15 s; the two sleeps check that
//! nothing happens after 1008 (or its SSE equivalent, a 401).
//! Chromium is required: the test fails, saying how to install it, when it
//! is missing. `PGDN_SCREENSHOT=<file.png>` saves a screenshot of the demo
//! page. A last test checks how `/pgdn.js` is served, without a browser.

#[path = "browser/cdp.rs"]
mod cdp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp::Browser;
use pgdn_server::{Config, JwtAuthenticator, Pgdn};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &[u8] = b"browser-test-secret";
const KEY: &str = "browser-test-key";
const USER: &str = "browser-user";
const WAIT: Duration = Duration::from_secs(15);

/// The test's pages, by name: served at `/app/<name>`.
type Pages = Arc<Mutex<HashMap<String, String>>>;

/// A pgdn server on a listener of its own, restartable on the same address:
/// a warp app that mounts pgdn's routes next to its own, `/app/<name>`
/// (the pages set with [`Server::page`]) and `/app/token?user=<id>&secs=<n>`
/// (a token for `user`, valid `n` seconds: the app's backend minting them).
struct Server {
    addr: SocketAddr,
    pgdn: Pgdn,
    http: reqwest::Client,
    pages: Pages,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(addr: SocketAddr) -> Server {
        Self::start_with(addr, Config::default(), JwtAuthenticator::new(SECRET)).await
    }

    async fn start_with(addr: SocketAddr, config: Config, auth: JwtAuthenticator) -> Server {
        use warp::Filter;
        let listener = TcpListener::bind(addr).await.expect("bind the server");
        let pgdn = Pgdn::builder()
            .config(config)
            .authenticator(auth)
            .publish_key(KEY)
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let addr = listener.local_addr().unwrap();
        let pages = Pages::default();
        let routes = pgdn.routes().or(app_routes(pages.clone())).unify();
        // What `Pgdn::serve` does, for an app that serves the routes itself.
        let app = pgdn.clone();
        let task = tokio::spawn(async move {
            let service = app.service().clone();
            warp::serve(routes)
                .incoming(listener)
                .graceful(async move {
                    let _ = rx.await;
                    service.begin_shutdown();
                })
                .run()
                .await;
            app.shutdown().await;
        });
        Server {
            addr,
            pgdn,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            pages,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Serves `html` at `/app/<name>`.
    fn page(&self, name: &str, html: String) {
        self.pages.lock().unwrap().insert(name.into(), html);
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
    token_for(user, Duration::from_secs(600))
}

fn token_for(user: &str, ttl: Duration) -> String {
    JwtAuthenticator::new(SECRET)
        .issue(user, &["g"], ttl)
        .unwrap()
}

/// The app's own routes: see [`Server`].
fn app_routes(
    pages: Pages,
) -> impl warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    use warp::{Filter, Reply};
    let mint = warp::path!("app" / "token")
        .and(warp::query::<HashMap<String, String>>())
        .map(|q: HashMap<String, String>| {
            let secs = q.get("secs").and_then(|s| s.parse().ok()).unwrap_or(600);
            let user = q.get("user").map_or(USER, String::as_str);
            let token = token_for(user, Duration::from_secs(secs));
            warp::reply::with_header(token, "cache-control", "no-store").into_response()
        });
    let page = warp::path!("app" / String).map(move |name: String| {
        match pages.lock().unwrap().get(&name) {
            Some(html) => warp::reply::html(html.clone()).into_response(),
            None => warp::http::StatusCode::NOT_FOUND.into_response(),
        }
    });
    mint.or(page).unify()
}

/// A TCP proxy the test controls: `cut()` drops every connection through
/// it while the server keeps running; `stall()` stops forwarding on the
/// open ones without closing them (a dead link); while closed it drops new
/// connections at once; while refusing upgrades it answers a request that
/// asks for a WebSocket upgrade with 403 (as some corporate proxies do) and
/// passes every other one through. Counts the connections it accepted and
/// the upgrades it refused.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    open: Arc<AtomicBool>,
    refuse_upgrades: Arc<AtomicBool>,
    stall: tokio::sync::watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        let refuse_upgrades = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        // Bumped by stall(): connections opened before stop forwarding.
        let (stall, stall_rx) = tokio::sync::watch::channel(0u64);
        let (list, is_open, count) = (conns.clone(), open.clone(), accepted.clone());
        let (refusing, refusals) = (refuse_upgrades.clone(), refused.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                if !is_open.load(Ordering::SeqCst) {
                    continue; // dropped: the browser sees a failed connection
                }
                let mut stalled = stall_rx.clone();
                let refuse = refusing.load(Ordering::SeqCst);
                let refusals = refusals.clone();
                let task = tokio::spawn(async move {
                    let epoch = *stalled.borrow_and_update();
                    // Only a connection's first request is looked at:
                    // browsers open each WebSocket on a connection of its own.
                    let mut head = Vec::new();
                    if refuse {
                        let Some(h) = read_request_head(&mut client).await else {
                            return;
                        };
                        if is_websocket_upgrade(&h) {
                            refusals.fetch_add(1, Ordering::SeqCst);
                            let body = "WebSocket upgrades are not allowed here";
                            let reply = format!(
                                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = client.write_all(reply.as_bytes()).await;
                            return;
                        }
                        head = h;
                    }
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
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
            refuse_upgrades,
            stall,
            accepted,
            refused,
            accept,
        }
    }

    /// From now on, answers WebSocket upgrade requests with 403.
    fn set_refuse_upgrades(&self, refuse: bool) {
        self.refuse_upgrades.store(refuse, Ordering::SeqCst);
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
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

/// Reads up to the end of a request's head (what was read past it, too);
/// `None` if the client closed first or the head is unreasonably long.
async fn read_request_head(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf)
}

/// Whether a request head carries `Upgrade: websocket`.
fn is_websocket_upgrade(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("upgrade")
                && value.trim().eq_ignore_ascii_case("websocket")
        })
    })
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

/// A port of its own for an app's frontend, and its origin: bound before
/// the pgdn server starts, so that the server can allow that origin.
async fn page_listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    (listener, origin)
}

/// Serves `html` at `/` on `listener`: an app's frontend.
fn serve_page(listener: TcpListener, html: String) -> SocketAddr {
    use warp::Filter;
    let addr = listener.local_addr().unwrap();
    let page = warp::path::end().map(move || warp::reply::html(html.clone()));
    tokio::spawn(warp::serve(page).incoming(listener).run());
    addr
}

#[tokio::test]
async fn the_demo_page_and_pgdn_js_in_headless_chromium() {
    let started = Instant::now();
    let mut b = Browser::launch().await;
    // The apps of (d) and (f) are of other origins, which the server allows.
    let (legacy_app, legacy_origin) = page_listener().await;
    let (own_app, own_origin) = page_listener().await;
    let mut config = Config::default();
    config.allowed_origins = vec![legacy_origin, own_origin];
    let auth = || JwtAuthenticator::new(SECRET);
    let server = Server::start_with("127.0.0.1:0".parse().unwrap(), config.clone(), auth()).await;
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
    let server = Server::start_with(addr, config, auth()).await;
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
    // works unchanged. It is served by an app of its own (another origin,
    // listed in the server's allowed origins), as pgdn-ws frontends
    // usually are.
    let page = format!(
        "<!doctype html><title>pgdn-ws page</title><script>
         window.msgs = [];
         const ws = new WebSocket('ws://{addr}/ws?token={}');
         ws.onmessage = (ev) => window.msgs.push(JSON.parse(ev.data));
         ws.onopen = () => ws.send(JSON.stringify({{type: 'ping', timestamp: 7}}));
         </script>",
        token("legacy-user")
    );
    let app = serve_page(legacy_app, page);
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
    let app = serve_page(own_app, page);
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

/// docs/protocol.md v1.1 section 1 in a real browser: a page of another origin
/// opens a WebSocket and an `EventSource` to pgdn. By default both are
/// refused (403 before any upgrade or stream; nothing is registered);
/// with the page's origin listed, both connect, and the stream carries the
/// `Access-Control-Allow-Origin` the browser needs to read it.
#[tokio::test]
async fn a_page_of_another_origin_connects_only_when_its_origin_is_listed() {
    let mut b = Browser::launch().await;
    let (app, origin) = page_listener().await;
    // One page for both servers: `?server=<host:port>&token=<token>`.
    let page = "<!doctype html><title>other origin</title><script>
         window.r = {ws: [], sse: [], wsClose: null, sseErrors: 0};
         const q = new URLSearchParams(location.search);
         const server = q.get('server'), token = q.get('token');
         const ws = new WebSocket(`ws://${server}/ws?token=${token}`);
         ws.onmessage = (e) => r.ws.push(JSON.parse(e.data));
         ws.onclose = (e) => { r.wsClose = e.code; };
         const es = new EventSource(`http://${server}/sse?token=${token}`);
         es.onmessage = (e) => r.sse.push(JSON.parse(e.data));
         es.onerror = () => { r.sseErrors += 1; es.close(); };
         </script>";
    let app = serve_page(app, page.to_string());
    let auth = || JwtAuthenticator::new(SECRET);

    let mut config = Config::default();
    config.allowed_origins = vec![origin];
    let listed = Server::start_with("127.0.0.1:0".parse().unwrap(), config, auth()).await;
    let url =
        |server: &Server| format!("http://{app}/?server={}&token={}", server.addr, token(USER));
    b.navigate(&url(&listed)).await;
    b.wait_for(
        "both transports to connect from the listed origin",
        "r.ws.length > 0 && r.sse.length > 0",
    )
    .await;
    let got = b
        .eval("[r.ws[0].type, r.sse[0].type, r.wsClose, r.sseErrors]")
        .await;
    assert_eq!(got, json!(["connection", "connection", null, 0]));
    listed.wait_connections(2).await;
    b.navigate("about:blank").await;
    listed.stop().await;

    let default = Server::start("127.0.0.1:0".parse().unwrap()).await;
    b.navigate(&url(&default)).await;
    b.wait_for(
        "both transports to fail from an origin not listed",
        "r.wsClose !== null && r.sseErrors > 0",
    )
    .await;
    let got = b.eval("[r.ws.length, r.sse.length, r.wsClose]").await;
    assert_eq!(
        got,
        json!([0, 0, 1006]),
        "refused before any upgrade or stream"
    );
    assert_eq!(default.pgdn.hub().stats().connections_opened, 0);
    default.stop().await;
}

/// `/pgdn.js` is served as JavaScript whether or not the demo page is on
/// (apps load it too); `/` follows `Config::demo_page`.
#[tokio::test]
async fn pgdn_js_is_served_with_or_without_the_demo_page() {
    for demo_page in [true, false] {
        let mut config = Config::default();
        config.demo_page = demo_page;
        let s = Server::start_with(
            "127.0.0.1:0".parse().unwrap(),
            config,
            JwtAuthenticator::new(SECRET),
        )
        .await;
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

/// A page with a plain `EventSource` (no pgdn.js) receives notifications;
/// after its stream is cut it reconnects by itself, and the browser's own
/// `Last-Event-ID` (the URL has no `since=`) makes the server replay what
/// was published meanwhile: nothing lost, nothing twice.
#[tokio::test]
async fn a_plain_event_source_resumes_through_last_event_id() {
    let started = Instant::now();
    let mut b = Browser::launch().await;
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let proxy = Proxy::start(server.addr).await;
    server.page(
        "sse",
        format!(
            "<!doctype html><title>EventSource</title><script>
             window.t = {{frames: [], eventIds: [], opens: 0, errors: 0}};
             window.es = new EventSource('/sse?token={}');
             es.onopen = () => {{ t.opens += 1; }};
             es.onerror = () => {{ t.errors += 1; }};
             es.onmessage = (ev) => {{ t.frames.push(JSON.parse(ev.data)); t.eventIds.push(ev.lastEventId); }};
             </script>",
            token(USER)
        ),
    );
    b.navigate(&format!("http://{}/app/sse", proxy.addr)).await;
    b.wait_for("the stream to open", "window.t && t.frames.length >= 1")
        .await;
    assert_eq!(b.eval("t.frames[0].type").await, "connection");
    assert_eq!(b.eval("t.frames[0].user_id").await, USER);
    let mut ids = vec![server.publish(USER, 0).await];
    b.wait_for("notification 0", "t.frames.length >= 2").await;

    // Cut, with the proxy refusing connections until both are published:
    // they can only come from the replay.
    proxy.set_open(false);
    proxy.cut();
    server.wait_connections(0).await;
    b.wait_for(
        "the page to see the stream end",
        "t.errors >= 1 && es.readyState === EventSource.CONNECTING",
    )
    .await;
    for n in 1..=2 {
        ids.push(server.publish(USER, n).await);
    }
    proxy.set_open(true);
    // Chromium waits 3 s before it reconnects (the server sends no `retry:`).
    b.wait_for(
        "the browser to reconnect by itself and get the replay",
        "t.opens >= 2 && t.frames.length >= 5",
    )
    .await;
    ids.push(server.publish(USER, 3).await);
    b.wait_for("live traffic after the replay", "t.frames.length >= 6")
        .await;

    let frames = b.eval("t.frames").await;
    let kinds: Vec<&str> = frames
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["connection", "info", "connection", "info", "info", "info"],
        "no history_gap, no close: {frames}"
    );
    let notes: Vec<&str> = frames
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["id"].as_str())
        .collect();
    assert_eq!(notes, ids, "all of them, once, in order");
    // Each notification's event carried its id (what Last-Event-ID echoes);
    // the connection frame's event keeps the last one.
    let event_ids = b.eval("t.eventIds").await;
    assert_eq!(
        event_ids,
        json!(["", ids[0], ids[0], ids[1], ids[2], ids[3]])
    );
    assert_eq!(b.eval("[t.opens, es.readyState]").await, json!([2, 1]));
    b.eval("es.close()").await;
    server.wait_connections(0).await;
    server.stop().await;
    eprintln!("EventSource resume test: {:?}", started.elapsed());
}

/// An app page on `/pgdn.js` with the default transport (`auto`) behind a
/// proxy that refuses WebSocket upgrades: it falls back to Server-Sent
/// Events and receives; it keeps one resume point across transports (SSE
/// to SSE, SSE to WebSocket once the proxy lets upgrades through, and
/// WebSocket to SSE again); a bad token over SSE stops it like 1008.
#[tokio::test]
async fn pgdn_js_falls_back_to_sse_behind_a_proxy_that_refuses_websocket() {
    let started = Instant::now();
    let mut b = Browser::launch().await;
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let proxy = Proxy::start(server.addr).await;
    server.page(
        "fallback",
        format!(
            "<!doctype html><title>app</title><script src='/pgdn.js'></script><script>
             window.t = {{events: [], notes: []}};
             window.client = new Pgdn.Client({{
               url: '/ws',
               token: () => '{}',
               minBackoff: 400, maxBackoff: 800,
               onConnect: (e) => t.events.push(['connect', e.transport, e.resumed]),
               onStop: (e) => t.events.push(['stop', e.code, e.reason]),
               onHistoryGap: () => t.events.push(['history_gap']),
               onNotification: (n) => t.notes.push(n.id),
             }});
             client.connect();
             </script>",
            token(USER)
        ),
    );
    proxy.set_refuse_upgrades(true);
    b.navigate(&format!("http://{}/app/fallback", proxy.addr))
        .await;
    b.wait_for(
        "the client to connect over SSE",
        "window.client && client.state === 'connected'",
    )
    .await;
    assert_eq!(b.eval("client.transport").await, "sse");
    assert_eq!(proxy.refused(), 1, "it tried a WebSocket first");
    assert_eq!(
        b.eval("client.send({type: 'ping'})").await,
        false,
        "SSE is receive-only"
    );
    let mut ids = vec![server.publish(USER, 0).await];
    b.wait_for("notification 0 over SSE", "t.notes.length >= 1")
        .await;

    // Cut while the proxy refuses connections, publish, reopen: the client
    // reconnects (a WebSocket first, then SSE if that is refused) with
    // since=. `to` is the transport the proxy lets it have after reopening.
    // The proxy reopens while the client waits between attempts (an
    // attempt half made before it would go on over SSE), and the client
    // is told to retry at once.
    let mut away = async |b: &mut Browser, n: u64, to: &str| {
        proxy.set_open(false);
        proxy.cut();
        server.wait_connections(0).await;
        ids.push(server.publish(USER, n).await);
        b.wait_for(
            "the client to wait for its next attempt",
            "client.state === 'disconnected' && client.retryAt - Date.now() > 100",
        )
        .await;
        proxy.set_refuse_upgrades(to == "sse");
        proxy.set_open(true);
        b.eval("client.retryNow(); true").await;
        let expr = format!(
            "client.state === 'connected' && client.transport === '{to}' && t.notes.length >= {}",
            ids.len()
        );
        b.wait_for(&format!("the resume over {to}"), &expr).await;
    };
    away(&mut b, 1, "sse").await;
    away(&mut b, 2, "websocket").await;
    away(&mut b, 3, "sse").await;
    ids.push(server.publish(USER, 4).await);
    b.wait_for("live traffic over SSE", "t.notes.length >= 5")
        .await;
    let state = b.eval("({events: t.events, notes: t.notes})").await;
    assert_eq!(
        state,
        json!({
            "events": [
                ["connect", "sse", false],
                ["connect", "sse", true],
                ["connect", "websocket", true],
                ["connect", "sse", true],
            ],
            "notes": ids,
        }),
        "every notification once, in order, across both transports"
    );
    assert_eq!(proxy.refused(), 3, "each SSE connect followed a refusal");
    b.eval("client.disconnect()").await;

    // A bad token: the WebSocket is refused, the stream answers 401, and
    // the client stops with the server's reason, as after 1008.
    b.eval(
        "window.bad = new Pgdn.Client({url: '/ws', token: 'not-a-valid-token', minBackoff: 50, \
         onStop: (e) => { t.stop = e; }}); bad.connect(); true",
    )
    .await;
    b.wait_for("the bad client to stop", "bad.state === 'stopped'")
        .await;
    assert_eq!(
        b.eval("t.stop").await,
        json!({"code": 1008, "reason": "invalid token"})
    );
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.accepted(), before, "no retry after a 401");
    server.stop().await;
    eprintln!("SSE fallback test: {:?}", started.elapsed());
}

/// Tokens valid for 3 s (no leeway), a token callback that fetches fresh
/// ones from the app, and a publish every 100 ms for 6 s: a pgdn.js client
/// on WebSocket refreshes in-band and keeps its one connection; one on SSE
/// is closed with 4001 at each expiry and reconnects at once with a fresh
/// token and since=; both get every notification once. A raw pgdn-ws page
/// sees the 4001 and reconnects as after any close.
#[tokio::test]
async fn pgdn_js_lives_with_short_lived_tokens() {
    let started = Instant::now();
    let mut b = Browser::launch().await;
    let auth = JwtAuthenticator::new(SECRET).leeway(Duration::ZERO);
    let server = Server::start_with("127.0.0.1:0".parse().unwrap(), Config::default(), auth).await;
    server.page(
        "lifetime",
        format!(
            "<!doctype html><title>app</title><script src='/pgdn.js'></script><script>
             window.t = {{tokens: 0, raw: {{frames: [], closes: []}}}};
             async function fresh() {{
               t.tokens += 1;
               const r = await fetch('/app/token?user={USER}&secs=3', {{cache: 'no-store'}});
               if (!r.ok) throw new Error('token endpoint: ' + r.status);
               return r.text();
             }}
             function client(transport) {{
               const s = t[transport] = {{events: [], frames: [], notes: []}};
               const c = new Pgdn.Client({{
                 url: '/ws', transport, token: fresh, minBackoff: 50, maxBackoff: 200,
                 onConnect: (e) => s.events.push(['connect', e.resumed]),
                 onDisconnect: (e) => s.events.push(['disconnect', e.code, e.reason]),
                 onStop: (e) => s.events.push(['stop', e.code, e.reason]),
                 onHistoryGap: () => s.events.push(['history_gap']),
                 onFrame: (f) => s.frames.push(f.type === 'error' ? f.code : f.type),
                 onNotification: (n) => s.notes.push(n.id),
               }});
               c.connect();
               return c;
             }}
             window.wsClient = client('websocket');
             window.sseClient = client('sse');
             // A pgdn-ws page: a raw WebSocket, a token from its backend, and
             // a reconnect after any close.
             function raw() {{
               fresh().then((token) => {{
                 const ws = new WebSocket('ws://' + location.host + '/ws?token=' + token);
                 ws.onmessage = (ev) => t.raw.frames.push(JSON.parse(ev.data).type);
                 ws.onclose = (ev) => {{ t.raw.closes.push([ev.code, ev.reason]); setTimeout(raw, 100); }};
              }});
             }}
             raw();
             </script>"
        ),
    );
    b.navigate(&format!("http://{}/app/lifetime", server.addr))
        .await;
    b.wait_for(
        "all three to connect",
        "window.t && wsClient.state === 'connected' && sseClient.state === 'connected' \
         && t.raw.frames.includes('connection')",
    )
    .await;
    assert_eq!(b.eval("wsClient.transport").await, "websocket");
    assert!(b.eval("wsClient.expiresAt > Date.now()").await == true);

    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for n in 0..60 {
        tick.tick().await;
        ids.push(server.publish(USER, n).await);
    }
    let expr = format!(
        "t.websocket.notes.length >= {0} && t.sse.notes.length >= {0}",
        ids.len()
    );
    b.wait_for("every notification on both clients", &expr)
        .await;
    // Two expiries of the 3 s tokens: the publishing above takes about
    // 6 s, which may end just before the second.
    b.wait_for(
        "two token expiries on both clients",
        "t.websocket.frames.filter((f) => f === 'refreshed').length >= 2 \
         && t.sse.events.filter((e) => e[0] === 'connect' && e[1]).length >= 2",
    )
    .await;
    let ws = b.eval("t.websocket").await;
    let sse = b.eval("t.sse").await;
    assert_eq!(ws["notes"], json!(ids), "WebSocket: each once, in order");
    assert_eq!(sse["notes"], json!(ids), "SSE: each once, in order");

    // WebSocket: one connection all along, refreshed in-band.
    assert_eq!(ws["events"], json!([["connect", false]]), "{ws}");
    let frames: Vec<&str> = ws["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        frames.iter().filter(|f| **f == "refreshed").count() >= 2,
        "{frames:?}"
    );
    assert!(frames.iter().all(|f| *f == "refreshed"), "{frames:?}");

    // SSE: a 4001 at each expiry, then at once a resuming connection
    // (the last may be under way).
    let mut events = sse["events"].as_array().unwrap().clone();
    if events.len() % 2 == 0 {
        events.pop();
    }
    assert_eq!(events[0], json!(["connect", false]), "{sse}");
    let expired = events.len() / 2;
    assert!(expired >= 2, "{sse}");
    for pair in events[1..].chunks(2) {
        assert_eq!(
            pair,
            [
                json!(["disconnect", 4001, "token expired"]),
                json!(["connect", true])
            ],
            "{sse}"
        );
    }

    // The raw page saw 4001 and came back with a new token.
    let raw = b.eval("t.raw").await;
    assert!(
        raw["closes"]
            .as_array()
            .unwrap()
            .contains(&json!([4001, "token expired"])),
        "{raw}"
    );
    let connections = raw["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| *f == "connection")
        .count();
    assert!(connections >= 2, "{raw}");
    b.eval("wsClient.disconnect(); sseClient.disconnect(); true")
        .await;
    server.stop().await;
    eprintln!(
        "token lifetime test: {:?}, {expired} SSE reconnects on 4001",
        started.elapsed()
    );
}

/// `/pgdn.js` ignores whitespace around a token: one pasted with a
/// trailing newline (a string) or read from a file with one (a token
/// function) connects, over WebSocket and over SSE, and gets its
/// notifications. Without the trim the server sees `token=...%0A` and
/// refuses it (1008, the client stops).
#[tokio::test]
async fn pgdn_js_trims_whitespace_around_a_token() {
    let mut b = Browser::launch().await;
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let tok = token(USER);
    server.page(
        "trim",
        format!(
            "<!doctype html><title>trim</title><script src='/pgdn.js'></script><script>
             window.t = {{pasted: [], fetched: [], stops: []}};
             const common = {{onStop: (e) => t.stops.push(e.reason)}};
             window.pasted = new Pgdn.Client(Object.assign({{
               url: '/ws', transport: 'websocket', token: '{tok}\\n ',
               onNotification: (n) => t.pasted.push(n.payload.n),
             }}, common));
             window.fetched = new Pgdn.Client(Object.assign({{
               url: '/ws', transport: 'sse', token: async () => ' \\t{tok}\\r\\n',
               onNotification: (n) => t.fetched.push(n.payload.n),
             }}, common));
             pasted.connect();
             fetched.connect();
             </script>"
        ),
    );
    b.navigate(&format!("http://{}/app/trim", server.addr))
        .await;
    b.wait_for(
        "both clients to connect (or stop)",
        "window.t && (t.stops.length > 0 || (pasted.state === 'connected' && fetched.state === 'connected'))",
    )
    .await;
    assert_eq!(b.eval("t.stops").await, json!([]), "no token refused");
    server.wait_connections(2).await;
    server.publish(USER, 1).await;
    b.wait_for(
        "the notification on both",
        "t.pasted.length === 1 && t.fetched.length === 1",
    )
    .await;
    assert_eq!(
        b.eval("[t.pasted, t.fetched, pasted.transport, fetched.transport]")
            .await,
        json!([[1], [1], "websocket", "sse"])
    );
    b.navigate("about:blank").await;
    server.stop().await;
}

/// The binary in dev mode with its endpoints moved (`--ws-path`,
/// `--sse-path`): the demo page URL its banner prints connects in
/// Chromium, over WebSocket and (with `&transport=sse`) over SSE, at the
/// configured paths, and shows a notification published with the
/// banner's key. The page learns the paths from the server, not the URL.
#[tokio::test]
async fn the_dev_banner_demo_url_works_with_custom_paths() {
    use std::io::{BufRead, BufReader};
    let mut b = Browser::launch().await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgdn-server"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PGDN_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .args(["--addr", "127.0.0.1:0", "--ws-path", "/custom/ws"])
        .args(["--sse-path", "/custom/events"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the binary starts");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let _child = Kill(child);
    // The banner, up to its third rule (a blocking read: an event).
    let mut banner = Vec::new();
    while banner
        .iter()
        .filter(|l: &&String| l.starts_with("====="))
        .count()
        < 3
    {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "{banner:#?}");
        banner.push(line.trim().to_string());
    }
    std::thread::spawn(move || for _ in reader.lines() {});
    let field = |label: &str| {
        let i = banner.iter().position(|l| l.starts_with(label)).unwrap();
        match banner[i][label.len()..].trim() {
            "" => banner[i + 1].clone(),
            rest => rest.to_string(),
        }
    };
    let page = field("Demo page:");
    let key = field("Publish key:");
    let addr = page
        .strip_prefix("http://")
        .and_then(|p| p.split('/').next())
        .unwrap()
        .to_string();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut n = 0;
    for (url, transport, endpoint) in [
        (page.clone(), "websocket", format!("ws://{addr}/custom/ws")),
        (
            format!("{page}&transport=sse"),
            "sse",
            format!("http://{addr}/custom/events"),
        ),
    ] {
        b.navigate(&url).await;
        b.wait_for(
            "the demo page to connect (or stop)",
            "window.pgdnDemo && (pgdnDemo.state === 'connected' || pgdnDemo.state === 'stopped' \
             || pgdnDemo.attempts > 0)",
        )
        .await;
        let state = b
            .eval("[pgdnDemo.state, pgdnDemo.transport, pgdnDemo.userId]")
            .await;
        assert_eq!(state, json!(["connected", transport, "demo-user"]), "{url}");
        let used = b
            .eval(if transport == "sse" {
                "pgdnDemo.client.sseUrl"
            } else {
                "pgdnDemo.client.url"
            })
            .await;
        assert_eq!(used, endpoint.as_str());
        n += 1;
        let res = http
            .post(format!("http://{addr}/api/v1/publish"))
            .bearer_auth(&key)
            .json(&json!({"target": {"user": "demo-user"}, "type": "info",
                          "payload": {"title": "custom paths", "n": n}}))
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        b.wait_for(
            "the notification on the page",
            "pgdnDemo.received.length === 1",
        )
        .await;
        assert_eq!(b.eval("pgdnDemo.received[0].payload.n").await, n);
        b.navigate("about:blank").await;
    }
}

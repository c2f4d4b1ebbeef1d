//! pgdn's own accept loop: warp routes served over hyper's HTTP/1.1 (with
//! upgrades, for WebSockets), so that no client can pin a connection, a
//! task and a file descriptor without making real requests.
//!
//! warp 0.4's `Server` offers no timeouts: a socket that never sends a
//! request head, trickles it, half-sends an upgrade, stalls its body or
//! idles after a request stays open for ever, and enough of them lock
//! every other client out. Here every connection has a watchdog that
//! knows where the connection is (see [`Phase`]) and drops it at the
//! deadline of that phase:
//!
//! - waiting for a request head: [`Config::header_read_timeout`] from the
//!   connection's start, or from the first byte of the next request on a
//!   kept-alive connection;
//! - between requests: [`Config::keep_alive_timeout`];
//! - answering a request: no deadline (Server-Sent Events streams are
//!   long), except that a request body must arrive in full within
//!   [`Config::body_timeout`] (plus a grace second, so that the publish
//!   API's own 408 goes out first).
//!
//! A connection upgraded to a WebSocket leaves hyper, and its watchdog,
//! at the upgrade: the session's own ping and idle timeout take over.
//!
//! With TLS (feature `tls`), the handshake happens in the connection's own
//! task, never in the accept loop, and belongs to the first request's head:
//! a peer that opens TCP and never finishes the handshake is dropped at
//! [`Config::header_read_timeout`] like one that never sends a request.
//!
//! Accept errors (out of file descriptors: `EMFILE`, `ENFILE`) neither end
//! nor spin the loop: it logs (at most every few seconds), waits a little
//! and tries again, so it serves again as soon as descriptors are free.
//!
//! On shutdown the loop stops accepting, closes connections that have no
//! request in flight, lets the others finish (keep-alive off) while
//! pgdn-core closes every WebSocket with 1001, and drops whatever is left
//! at [`Config::shutdown_timeout`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use pgdn_core::{Config, Service};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::http::{Request, Response};
use warp::{Filter, Rejection, Reply};

/// How long the loop waits after an accept error before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept error is logged per this interval.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// A request body still incomplete this long after `body_timeout` drops
/// its connection (the publish API answers 408 at `body_timeout` itself).
const BODY_GRACE: Duration = Duration::from_secs(1);

/// What terminates TLS on each connection: rustls's acceptor; without the
/// `tls` feature there is none (the type has no value).
#[cfg(feature = "tls")]
pub(crate) type Acceptor = tokio_rustls::TlsAcceptor;
/// What terminates TLS on each connection: without the `tls` feature there
/// is none (the type has no value).
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(crate) enum Acceptor {}

/// The peer address of a request served by [`serve`], in the request's
/// extensions (warp keeps its own address type private).
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

/// The peer address of the connection a request came on.
///
/// Under [`Pgdn::serve`](crate::Pgdn::serve) and
/// [`Pgdn::serve_routes`](crate::Pgdn::serve_routes), use it instead of
/// `warp::addr::remote()`, which only knows the addresses of connections
/// that `warp::serve` accepted (and this filter falls back to it, so it
/// works under both).
pub fn remote_addr() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerAddr>()
        .and(warp::addr::remote())
        .map(|ours: Option<PeerAddr>, warps: Option<SocketAddr>| ours.map(|p| p.0).or(warps))
}

/// The HTTP timeouts of a connection, from [`Config`].
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header_read: Duration,
    keep_alive: Duration,
    body: Duration,
}

impl Timeouts {
    fn new(config: &Config) -> Self {
        Timeouts {
            header_read: config.header_read_timeout,
            keep_alive: config.keep_alive_timeout,
            body: config.body_timeout + BODY_GRACE,
        }
    }
}

/// Where a connection is, for its watchdog.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for (the rest of) a request head, until the deadline.
    Head(Instant),
    /// Kept alive between requests, until the deadline.
    Idle(Instant),
    /// A request is being answered.
    Busy,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Requests whose response is not finished (at most one in HTTP/1.1,
    /// counted to be safe).
    in_flight: usize,
    /// Set while a request body is incomplete.
    body_deadline: Option<Instant>,
}

/// What a connection's watchdog watches: updated by the socket (bytes
/// read), the request (head complete, body complete) and the response
/// (finished).
#[derive(Debug)]
struct Watch {
    timeouts: Timeouts,
    /// `phase` is `Idle`: the socket checks this without the lock on every
    /// read, and takes the lock only to leave `Idle`.
    idle: AtomicBool,
    state: Mutex<State>,
    /// Woken when a deadline may have moved earlier.
    changed: Notify,
}

impl Watch {
    fn new(timeouts: Timeouts) -> Self {
        Watch {
            timeouts,
            idle: AtomicBool::new(false),
            state: Mutex::new(State {
                phase: Phase::Head(Instant::now() + timeouts.header_read),
                in_flight: 0,
                body_deadline: None,
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: on an idle connection, the next request head begins.
    fn on_read(&self) {
        if !self.idle.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state();
        if let Phase::Idle(_) = state.phase {
            state.phase = Phase::Head(Instant::now() + self.timeouts.header_read);
            self.idle.store(false, Ordering::Release);
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A request head is complete (hyper calls the service).
    fn on_request(&self, body_complete: bool) {
        let mut state = self.state();
        state.in_flight += 1;
        state.phase = Phase::Busy;
        state.body_deadline = (!body_complete).then(|| Instant::now() + self.timeouts.body);
        self.idle.store(false, Ordering::Release);
        drop(state);
        self.changed.notify_one();
    }

    /// The request body was read in full.
    fn on_body_complete(&self) {
        self.state().body_deadline = None;
    }

    /// A response is finished (or abandoned).
    fn on_response_end(&self) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.phase = Phase::Idle(Instant::now() + self.timeouts.keep_alive);
            self.idle.store(true, Ordering::Release);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// When the connection is to be dropped, if it is still where it is.
    fn deadline(&self) -> Option<Instant> {
        let state = self.state();
        let phase = match state.phase {
            Phase::Head(at) | Phase::Idle(at) => Some(at),
            Phase::Busy => None,
        };
        match (phase, state.body_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a request is being answered.
    fn busy(&self) -> bool {
        self.state().in_flight > 0
    }
}

/// The socket (TCP, or TLS over TCP), telling its watch when bytes arrive.
struct WatchedIo<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that tells its watch once it was read in full.
struct RequestBody {
    inner: Incoming,
    watch: Arc<Watch>,
    complete: bool,
}

impl RequestBody {
    fn complete(&mut self) {
        if !self.complete {
            self.complete = true;
            self.watch.on_body_complete();
        }
    }
}

impl Body for RequestBody {
    type Data = <Incoming as Body>::Data;
    type Error = <Incoming as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.complete(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Ends a response for the watch when dropped.
struct ResponseGuard(Arc<Watch>);

impl Drop for ResponseGuard {
    fn drop(&mut self) {
        self.0.on_response_end();
    }
}

/// A response body that ends its response for the watch once written in
/// full (or dropped: hyper drops a body once it wrote the last of it).
struct ResponseBody<B> {
    inner: B,
    guard: Option<ResponseGuard>,
}

impl<B: Body + Unpin> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The hyper service of one connection: the warp routes, with the peer
/// address in the request's extensions and the watch told about the
/// request and its response.
struct ConnService<S> {
    inner: S,
    peer: SocketAddr,
    watch: Arc<Watch>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<ResponseBody<B>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let complete = req.body().is_end_stream();
        self.watch.on_request(complete);
        // Dropped with the response future if hyper abandons it.
        let guard = ResponseGuard(self.watch.clone());
        let mut req = req.map(|inner| RequestBody {
            inner,
            watch: self.watch.clone(),
            complete,
        });
        req.extensions_mut().insert(PeerAddr(self.peer));
        let response = self.inner.call(req);
        Box::pin(async move {
            let res = response.await?;
            Ok(res.map(|inner| ResponseBody {
                inner,
                guard: Some(guard),
            }))
        })
    }
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Serves one connection until it ends, its watchdog's deadline passes,
/// or shutdown: on `stop` it is closed if idle and finishes its request
/// otherwise; on `force` it is dropped. With `tls`, the handshake comes
/// first, within the header-read deadline. Without TLS and with
/// `direct_sse`, a first request for the SSE path is served without hyper
/// ([`crate::sse_direct`]).
async fn serve_connection<F>(
    routes: Box<F>,
    stream: TcpStream,
    peer: SocketAddr,
    timeouts: Timeouts,
    (tls, direct_sse): (Option<Acceptor>, Option<crate::sse_direct::DirectSse>),
    stop: CancellationToken,
    force: CancellationToken,
) where
    F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    // Plain TCP, pgdn's own routes: an SSE request skips hyper
    // (`sse_direct.rs`).
    if let (None, Some(direct)) = (&tls, direct_sse) {
        // Boxed, as every phase here: its timer and buffer would
        // otherwise stay in the task for the connection's life.
        let wants = crate::sse_direct::wants(&stream, &direct.path, timeouts.header_read);
        let wants = tokio::select! {
            wants = Box::pin(wants) => wants,
            // No request yet: nothing to finish.
            () = stop.cancelled() => None,
        };
        match wants {
            None => return,
            Some(true) => {
                // The routes are boxed so that this frees them: the task
                // (sized once, for its whole life) holds a pointer.
                drop(routes);
                let sse = crate::sse_direct::serve(
                    direct,
                    stream,
                    peer,
                    timeouts.header_read,
                    (stop, force),
                );
                return Box::pin(sse).await;
            }
            Some(false) => {}
        }
    }
    let watch = Arc::new(Watch::new(timeouts));
    let Some(acceptor) = tls else {
        // Boxed, like the SSE path: the connection's task then holds a
        // pointer rather than the larger of the two.
        return Box::pin(serve_http(*routes, stream, peer, watch, stop, force)).await;
    };
    #[cfg(not(feature = "tls"))]
    match acceptor {}
    // Boxed: the handshake's state (a rustls connection) would otherwise
    // be part of every connection's task, TLS or not.
    #[cfg(feature = "tls")]
    Box::pin(serve_tls(
        *routes, stream, peer, acceptor, watch, stop, force,
    ))
    .await;
}

/// The TLS handshake, within the header-read deadline, then HTTP.
#[cfg(feature = "tls")]
async fn serve_tls<F>(
    routes: F,
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Acceptor,
    watch: Arc<Watch>,
    stop: CancellationToken,
    force: CancellationToken,
) where
    F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let handshake = tokio::select! {
        tls = acceptor.accept(stream) => tls,
        () = sleep_until(watch.deadline()) => {
            tracing::debug!(%peer, "tls handshake timed out; closing the connection");
            return;
        }
        // No request can be in flight yet: nothing to finish.
        () = stop.cancelled() => return,
        () = force.cancelled() => return,
    };
    match handshake {
        Ok(tls) => serve_http(routes, tls, peer, watch, stop, force).await,
        Err(e) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
    }
}

/// Serves HTTP on one connection (after its TLS handshake, if any), as
/// [`serve_connection`] says.
async fn serve_http<F, S>(
    routes: F,
    stream: S,
    peer: SocketAddr,
    watch: Arc<Watch>,
    stop: CancellationToken,
    force: CancellationToken,
) where
    F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        watch: watch.clone(),
    });
    let service = ConnService {
        inner: TowerToHyperService::new(warp::service(routes)),
        peer,
        watch: watch.clone(),
    };
    let mut conn = pin!(
        http1::Builder::new()
            // The watchdog keeps the time; hyper's own header timer would
            // also cut kept-alive connections at the header timeout.
            .header_read_timeout(None)
            .serve_connection(io, service)
            .with_upgrades()
    );
    let mut stopping = false;
    loop {
        if stopping && !watch.busy() {
            return;
        }
        let deadline = watch.deadline();
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            () = sleep_until(deadline) => {
                if watch.deadline().is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!(%peer, "http connection timed out; closing it");
                    return;
                }
            }
            () = watch.changed.notified() => {}
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = force.cancelled() => return,
        }
    }
}

/// Accept errors, logged at most every [`ACCEPT_LOG_INTERVAL`].
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    unlogged: u64,
    since_last_accept: u64,
}

impl AcceptErrors {
    fn failed(&mut self, error: &io::Error) {
        self.since_last_accept += 1;
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < ACCEPT_LOG_INTERVAL)
        {
            self.unlogged += 1;
            return;
        }
        tracing::error!(
            %error,
            unlogged_since_last = self.unlogged,
            "accept failed (out of file descriptors?); retrying every {} ms",
            ACCEPT_BACKOFF.as_millis()
        );
        self.last_logged = Some(now);
        self.unlogged = 0;
    }

    fn accepted(&mut self) {
        if self.since_last_accept > 0 {
            tracing::warn!(
                failures = self.since_last_accept,
                "accepting connections again"
            );
            *self = AcceptErrors::default();
        }
    }
}

/// Errors of one connection that was already gone: the next accept may
/// succeed at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves `routes` on `listener` (over TLS with `tls`) until `shutdown`
/// resolves; then shuts `service` down and returns within its
/// `shutdown_timeout`.
pub(crate) async fn serve<F>(
    routes: F,
    listener: TcpListener,
    tls: Option<Acceptor>,
    service: &Service,
    direct_sse: Option<crate::sse_direct::DirectSse>,
    shutdown: impl Future<Output = ()> + Send,
) where
    F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let timeouts = Timeouts::new(service.config());
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let mut errors = AcceptErrors::default();
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.accepted();
                // pgdn writes whole frames and batches what is queued:
                // Nagle's algorithm would only hold a notification back
                // until the peer acknowledges the previous one, up to its
                // delayed-ACK timeout (40 ms on Linux) under load.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                connections.spawn(serve_connection(
                    Box::new(routes.clone()),
                    stream,
                    peer,
                    timeouts,
                    (tls.clone(), direct_sse.clone()),
                    stop.clone(),
                    force.clone(),
                ));
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the pending connection stays
                // queued and the next accept would fail at once.
                errors.failed(&e);
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    let deadline = Instant::now() + service.config().shutdown_timeout;
    drop(listener);
    service.begin_shutdown();
    stop.cancel();
    connections.close();
    let drained = tokio::time::timeout_at(deadline, async {
        tokio::join!(connections.wait(), service.shutdown());
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            http = connections.len(),
            sessions = service.tasks().len(),
            "shutdown timed out; dropping the connections still open"
        );
        force.cancel();
        connections.wait().await;
    }
}

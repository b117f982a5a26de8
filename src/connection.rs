//! Accepted connections, bounded: how many are open at once, how long one may take to start
//! speaking HTTP/2, and how long one may stay open with no stream on it.
//!
//! - [`Incoming`] accepts with TCP_NODELAY and keepalive set and counts open connections. At the
//!   cap it closes the oldest connection that has not sent its HTTP/2 preface yet (a silent
//!   one) to admit the new one; when there is none, the new connection is closed at once and
//!   the refusal logged. Running out of descriptors pauses accepting briefly instead of
//!   spinning.
//! - [`Conn`] is one connection: it fails its reads, which makes hyper close it, when the
//!   preface has not arrived within the handshake timeout, when it has had no open stream for
//!   the idle timeout, or when it was evicted.
//! - [`StreamCountLayer`] counts each connection's open streams (a request is open until its
//!   response ends or is dropped; see `response_watch`), which is what "idle" means here.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::task::AtomicWaker;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep, sleep},
};
use tokio_stream::Stream;
use tonic::{
    codegen::http,
    transport::server::{Connected, TcpConnectInfo, TcpIncoming},
};
use tracing::{debug, warn};

use crate::response_watch::{ResponseWatch, WatchLayer, WatchRequests};

/// The HTTP/2 client preface, which every gRPC connection starts with.
const PREFACE_LEN: usize = 24;

/// How long accepting pauses when the process is out of file descriptors.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns (soft before, hard).
pub fn raise_open_file_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// Bounds on connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a new connection may take to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// How long a connection may stay open with no stream; `None`: forever.
    pub idle_timeout: Option<Duration>,
}

/// State of one connection shared with the accept loop and the stream counter.
#[derive(Debug)]
struct ConnState {
    handshaken: AtomicBool,
    /// Closed by the accept loop to make room; the connection fails its next read.
    evicted: AtomicBool,
    /// Set once the connection is dropped.
    closed: AtomicBool,
    /// Wakes the connection's task so it notices an eviction or a change in its streams.
    waker: AtomicWaker,
    streams: AtomicUsize,
    /// When the last stream ended (or the connection opened).
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            handshaken: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn is_silent(&self) -> bool {
        !self.handshaken.load(Ordering::SeqCst) && !self.closed.load(Ordering::SeqCst)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().expect("idle clock poisoned")
    }
}

/// What the accept loop and the connections share.
#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    open: AtomicUsize,
    /// Connections that had not sent their preface when admitted, oldest first (pruned as
    /// their front ones speak or close).
    silent: Mutex<VecDeque<Arc<ConnState>>>,
}

impl Shared {
    /// Counts a new connection in, evicting the oldest silent one at the cap; `None` when the
    /// cap is reached by connections that all speak.
    fn admit(&self) -> Option<Arc<ConnState>> {
        let mut silent = self.silent.lock().expect("connection list poisoned");
        while silent.front().is_some_and(|c| !c.is_silent()) {
            silent.pop_front();
        }
        if self.open.load(Ordering::SeqCst) >= self.limits.max_connections {
            // The evicted connection stops counting once its task has dropped it, moments
            // later: until then the count may exceed the cap by the connections evicted.
            let victim = silent.pop_front()?;
            debug!("connection cap reached; closing the oldest connection that never spoke");
            victim.evict();
        }
        self.open.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("sandbox_connections_open").increment(1.0);
        let state = Arc::new(ConnState::new());
        silent.push_back(Arc::clone(&state));
        Some(state)
    }
}

/// Accepted connections, within [`ConnectionLimits`].
pub struct Incoming {
    tcp: TcpIncoming,
    shared: Arc<Shared>,
    paused: Option<Pin<Box<Sleep>>>,
    /// When a refusal or a descriptor shortage was last logged (they come in floods).
    last_complaint: Option<Instant>,
}

impl Incoming {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> Self {
        // Without TCP_NODELAY, Nagle holds each small event behind the previous one's delayed
        // ACK (~40 ms per event).
        let tcp = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        Incoming {
            tcp,
            shared: Arc::new(Shared {
                limits,
                open: AtomicUsize::new(0),
                silent: Mutex::new(VecDeque::new()),
            }),
            paused: None,
            last_complaint: None,
        }
    }

    fn complain(&mut self, message: &str) {
        let now = Instant::now();
        if self
            .last_complaint
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_complaint = Some(now);
            warn!(
                open = self.shared.open.load(Ordering::SeqCst),
                max_connections = self.shared.limits.max_connections,
                "{message} (logged at most every 10s)"
            );
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = &mut self.paused {
                ready!(pause.as_mut().poll(cx));
                self.paused = None;
            }
            let stream = match ready!(Pin::new(&mut self.tcp).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(stream)) => stream,
                Some(Err(e)) if is_out_of_descriptors(&e) => {
                    // The connection stays in the backlog; retrying at once would spin.
                    self.complain("out of file descriptors; pausing accepts");
                    self.paused = Some(Box::pin(sleep(FD_EXHAUSTED_PAUSE)));
                    continue;
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            };
            match self.shared.admit() {
                Some(state) => {
                    return Poll::Ready(Some(Ok(Conn::new(
                        stream,
                        state,
                        Arc::clone(&self.shared),
                    ))));
                }
                None => {
                    drop(stream);
                    refused(Closed::Limit);
                    self.complain("connection refused: --max-connections reached");
                }
            }
        }
    }
}

/// Why the server refused or closed a connection (the `reason` of
/// `sandbox_connections_refused_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Closed {
    /// At `--max-connections`, with no silent connection to close instead.
    Limit,
    /// Closed to make room for a new one: it never spoke HTTP/2.
    Evicted,
    HandshakeTimeout,
    Idle,
    /// Its TLS handshake failed (no common protocol, an untrusted client certificate, ...).
    Tls,
}

pub(crate) fn refused(why: Closed) {
    let reason = match why {
        Closed::Limit => "limit",
        Closed::Evicted => "evicted",
        Closed::HandshakeTimeout => "handshake_timeout",
        Closed::Idle => "idle",
        Closed::Tls => "tls",
    };
    metrics::counter!("sandbox_connections_refused_total", "reason" => reason).increment(1);
}

/// EMFILE or ENFILE: this process, or the host, has no descriptor left.
pub(crate) fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
    )
}

/// One accepted connection.
pub struct Conn {
    io: TcpStream,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    preface_left: usize,
    /// The handshake deadline, then the idle check.
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(io: TcpStream, state: Arc<ConnState>, shared: Arc<Shared>) -> Self {
        let timer = Box::pin(sleep(shared.limits.handshake_timeout));
        Conn {
            io,
            state,
            shared,
            preface_left: PREFACE_LEN,
            timer,
        }
    }

    /// Checks the timers while the connection waits for bytes; an error closes it.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Result<(), (Closed, io::Error)> {
        if self.state.evicted.load(Ordering::SeqCst) {
            return Err((
                Closed::Evicted,
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed to make room: the connection never spoke HTTP/2",
                ),
            ));
        }
        if self.preface_left > 0 {
            if self.timer.as_mut().poll(cx).is_ready() {
                return Err((
                    Closed::HandshakeTimeout,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout",
                    ),
                ));
            }
            return Ok(());
        }
        let Some(idle_timeout) = self.shared.limits.idle_timeout else {
            return Ok(());
        };
        while self.timer.as_mut().poll(cx).is_ready() {
            let idle_until = self.state.idle_since() + idle_timeout;
            if self.state.streams.load(Ordering::SeqCst) == 0 && Instant::now() >= idle_until {
                return Err((
                    Closed::Idle,
                    io::Error::new(io::ErrorKind::TimedOut, "no stream within the idle timeout"),
                ));
            }
            let next = if self.state.streams.load(Ordering::SeqCst) == 0 {
                idle_until
            } else {
                Instant::now() + idle_timeout
            };
            self.timer.as_mut().reset(next);
        }
        Ok(())
    }

    fn saw_bytes(&mut self, n: usize) {
        if self.preface_left == 0 {
            return;
        }
        self.preface_left = self.preface_left.saturating_sub(n);
        if self.preface_left == 0 {
            self.state.handshaken.store(true, Ordering::SeqCst);
            *self.state.idle_since.lock().expect("idle clock poisoned") = Instant::now();
            if let Some(idle_timeout) = self.shared.limits.idle_timeout {
                self.timer.as_mut().reset(Instant::now() + idle_timeout);
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("sandbox_connections_open").decrement(1.0);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.state.waker.register(cx.waker());
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw_bytes(buf.filled().len() - before);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_limits(cx) {
                Ok(()) => Poll::Pending,
                Err((why, e)) => {
                    debug!(error = %e, "closing a connection");
                    refused(why);
                    Poll::Ready(Err(e))
                }
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a request learns of its connection (in its extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    /// The subject of the client's TLS certificate (mTLS; see `tls`), the caller's identity.
    pub client: Option<Arc<str>>,
    state: Arc<ConnState>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.io.connect_info(),
            client: None,
            state: Arc::clone(&self.state),
        }
    }
}

/// Counts a stream as open while it lives.
pub struct OpenStream(Arc<ConnState>);

impl OpenStream {
    fn new(state: Arc<ConnState>) -> Self {
        state.streams.fetch_add(1, Ordering::SeqCst);
        OpenStream(state)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let state = &self.0;
        if state.streams.fetch_sub(1, Ordering::SeqCst) == 1 {
            *state.idle_since.lock().expect("idle clock poisoned") = Instant::now();
            state.waker.wake();
        }
    }
}

/// Tower layer that counts each connection's open streams (see the module docs).
pub type StreamCountLayer = WatchLayer<StreamCounting>;

/// Counts a stream open from its request until its response ends (or is dropped).
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamCounting;

impl WatchRequests for StreamCounting {
    type Watch = Option<OpenStream>;

    fn watch<B>(&self, request: &http::Request<B>) -> Option<OpenStream> {
        request
            .extensions()
            .get::<ConnInfo>()
            .map(|info| OpenStream::new(Arc::clone(&info.state)))
    }
}

impl ResponseWatch for Option<OpenStream> {
    fn end(&mut self) {
        drop(self.take());
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    async fn listen(limits: ConnectionLimits) -> (Incoming, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (Incoming::new(listener, limits), addr)
    }

    fn limits(max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: None,
        }
    }

    async fn accept(incoming: &mut Incoming) -> Conn {
        tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .expect("a connection is accepted")
            .unwrap()
            .unwrap()
    }

    /// Reads from the server side until the connection fails; the error's kind.
    async fn closed_with(conn: &mut Conn) -> io::ErrorKind {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
                .await
                .expect("the connection is closed in time")
            {
                Ok(0) => return io::ErrorKind::UnexpectedEof,
                Ok(_) => continue,
                Err(e) => return e.kind(),
            }
        }
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let (mut incoming, addr) = listen(limits(4)).await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = accept(&mut incoming).await;
        assert!(accepted.connect_info().tcp.remote_addr().is_some());
        assert!(accepted.io.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_connection_without_a_preface_is_closed_after_the_handshake_timeout() {
        let (mut incoming, addr) = listen(ConnectionLimits {
            handshake_timeout: Duration::from_millis(50),
            ..limits(4)
        })
        .await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = accept(&mut incoming).await;
        assert_eq!(closed_with(&mut conn).await, io::ErrorKind::TimedOut);
        drop(conn);
        assert_eq!(incoming.shared.open.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_preface_in_pieces_completes_the_handshake() {
        let (mut incoming, addr) = listen(ConnectionLimits {
            handshake_timeout: Duration::from_millis(300),
            ..limits(4)
        })
        .await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = accept(&mut incoming).await;
        let mut buf = [0u8; 64];
        for piece in PREFACE.chunks(7) {
            client.write_all(piece).await.unwrap();
            let n = conn.read(&mut buf).await.unwrap();
            assert_eq!(n, piece.len());
        }
        assert!(conn.state.handshaken.load(Ordering::SeqCst));
        // Past the handshake timeout the connection stays open (no idle timeout set).
        let pending = tokio::time::timeout(Duration::from_millis(600), conn.read(&mut buf)).await;
        assert!(pending.is_err(), "the connection was closed: {pending:?}");
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_silent_connection_makes_room() {
        let (mut incoming, addr) = listen(limits(2)).await;
        let mut speaking = TcpStream::connect(addr).await.unwrap();
        let mut first = accept(&mut incoming).await;
        speaking.write_all(PREFACE).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(first.read(&mut buf).await.unwrap(), PREFACE.len());
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut silent = accept(&mut incoming).await;

        let _newcomer = TcpStream::connect(addr).await.unwrap();
        let _newcomer_conn = accept(&mut incoming).await;
        assert_eq!(
            closed_with(&mut silent).await,
            io::ErrorKind::ConnectionAborted
        );
        drop(silent);
        assert_eq!(incoming.shared.open.load(Ordering::SeqCst), 2);
        assert!(!first.state.evicted.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn at_the_cap_with_every_connection_speaking_a_newcomer_is_closed() {
        let (mut incoming, addr) = listen(limits(1)).await;
        let mut speaking = TcpStream::connect(addr).await.unwrap();
        let mut first = accept(&mut incoming).await;
        speaking.write_all(PREFACE).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(first.read(&mut buf).await.unwrap(), PREFACE.len());

        let mut refused = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(next.is_err(), "a connection past the cap was admitted");
        let read = tokio::time::timeout(Duration::from_secs(10), refused.read(&mut buf))
            .await
            .expect("the refused connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // Once the speaking connection closes, there is room again.
        drop(first);
        let _later = TcpStream::connect(addr).await.unwrap();
        accept(&mut incoming).await;
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_one_with_a_stream_is_not() {
        let (mut incoming, addr) = listen(ConnectionLimits {
            idle_timeout: Some(Duration::from_millis(100)),
            ..limits(4)
        })
        .await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = accept(&mut incoming).await;
        client.write_all(PREFACE).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), PREFACE.len());

        let stream = OpenStream::new(Arc::clone(&conn.state));
        let busy = tokio::time::timeout(Duration::from_millis(400), conn.read(&mut buf)).await;
        assert!(busy.is_err(), "closed while a stream was open: {busy:?}");
        drop(stream);
        assert_eq!(closed_with(&mut conn).await, io::ErrorKind::TimedOut);
    }
}

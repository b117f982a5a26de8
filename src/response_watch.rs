//! A tower layer that lets a watcher follow each response from its request to its end: the
//! response head, every frame of its body (the trailers among them), and the end of the body or
//! its drop (a client that went away), whichever comes first. Connection accounting
//! (`connection`: a stream is open until its response ends) and per-call metrics (`metrics`)
//! are two such watchers.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::codegen::{Service, http};

/// Follows one response.
pub trait ResponseWatch: Send + Unpin + 'static {
    /// The response's head, once the service answered.
    fn head(&mut self, _status: http::StatusCode, _headers: &http::HeaderMap) {}
    /// A frame of its body.
    fn frame(&mut self, _frame: &Frame<Bytes>) {}
    /// Its body ended, or was dropped before (called once).
    fn end(&mut self) {}
}

/// Makes the watcher of each request.
pub trait WatchRequests: Clone + Send + 'static {
    type Watch: ResponseWatch;
    fn watch<B>(&self, request: &http::Request<B>) -> Self::Watch;
}

/// The layer: `W` makes a watcher per request.
#[derive(Debug, Clone, Default)]
pub struct WatchLayer<W>(pub W);

impl<S, W: Clone> tower::Layer<S> for WatchLayer<W> {
    type Service = Watched<S, W>;

    fn layer(&self, inner: S) -> Watched<S, W> {
        Watched {
            inner,
            watch: self.0.clone(),
        }
    }
}

/// See [`WatchLayer`].
#[derive(Debug, Clone)]
pub struct Watched<S, W> {
    inner: S,
    watch: W,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, W, B, ResBody> Service<http::Request<B>> for Watched<S, W>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    W: WatchRequests,
    ResBody: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut watch = Ending::new(self.watch.watch(&request));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            watch.0.head(response.status(), response.headers());
            if response.body().is_end_stream() {
                watch.finish();
            }
            Ok(response.map(|body| tonic::body::Body::new(WatchedBody { body, watch })))
        })
    }
}

/// A watcher whose `end` is called exactly once: at the end, or when dropped.
struct Ending<W: ResponseWatch>(W, bool);

impl<W: ResponseWatch> Ending<W> {
    fn new(watch: W) -> Self {
        Ending(watch, false)
    }

    fn finish(&mut self) {
        if !std::mem::replace(&mut self.1, true) {
            self.0.end();
        }
    }
}

impl<W: ResponseWatch> Drop for Ending<W> {
    fn drop(&mut self) {
        self.finish();
    }
}

struct WatchedBody<B, W: ResponseWatch> {
    body: B,
    watch: Ending<W>,
}

impl<B, W> http_body::Body for WatchedBody<B, W>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    W: ResponseWatch,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => self.watch.0.frame(frame),
            Poll::Ready(None) => self.watch.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

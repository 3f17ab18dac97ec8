//! The HTTP trigger: the gateway that routes requests to functions.
//!
//! [`serve`] accepts connections and hands each request to the function of the node's
//! current table whose route matches ([`Function`]: a fresh store per request).
//!
//! Host paths under `/.well-known/lepton/`: `health` answers `ok`; `metrics`
//! answers the node's metrics in the OpenMetrics text format (Prometheus scrapes it).

mod body;
mod function;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::locked::{INFERENCE_PREFIX, RESERVED_ROUTE_PREFIX};
use crate::node::Node;

pub use body::{BodyBudget, DEFAULT_BODY_BUDGET};
pub(crate) use body::{BodyError, read as read_body};
pub(crate) use function::next_request_id;
pub use function::{Function, REQUEST_ID_HEADER};

/// Whether `path` is one the host answers itself (under `/.well-known/lepton`, or the
/// Open Inference Protocol's `/v2`).
pub(crate) fn is_host_path(path: &str) -> bool {
    [RESERVED_ROUTE_PREFIX, INFERENCE_PREFIX]
        .iter()
        .any(|prefix| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// Connections open at once, by default; past that new ones wait in the backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How long a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a graceful shutdown waits for in-flight requests before exiting anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a drain with no request left in flight still waits for connections to
/// finish writing what they hold.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The body of every response the gateway sends.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Answers one request on the gateway: host paths, then the node's function table.
pub async fn dispatch(node: &Node, request: hyper::Request<Incoming>) -> hyper::Response<Body> {
    let path = request.uri().path();
    if has_dot_segment(path) {
        return text(
            http::StatusCode::BAD_REQUEST,
            "paths with `.` or `..` segments are refused\n",
        );
    }
    if let Some(rest) = path
        .strip_prefix(INFERENCE_PREFIX)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    {
        let rest = rest.to_owned();
        return crate::infer::dispatch(node, &rest, request).await;
    }
    if let Some(host_path) = path
        .strip_prefix(RESERVED_ROUTE_PREFIX)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    {
        if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
            return text_with(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "host paths answer GET and HEAD only\n",
                (http::header::ALLOW, "GET, HEAD"),
            );
        }
        return match host_path {
            "/health" => text(http::StatusCode::OK, "ok\n"),
            "/metrics" => {
                let mut response = text(http::StatusCode::OK, &node.metrics());
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(crate::ops::metrics::CONTENT_TYPE),
                );
                response
            }
            _ => text(http::StatusCode::NOT_FOUND, "not found\n"),
        };
    }
    // The table is loaded once: this request keeps the version it was routed to,
    // whatever deploys happen while it runs.
    let table = node.table();
    match table.route(path) {
        Some(function) => Arc::clone(function).handle(request).await,
        None => text(
            http::StatusCode::NOT_FOUND,
            "no function serves this path\n",
        ),
    }
}

/// Whether `path` has a `.` or `..` segment, also percent-encoded (`%2e`): such a path
/// is refused rather than routed on its raw text.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".").replace("%2E", ".");
        decoded == "." || decoded == ".."
    })
}

/// A plain-text response made by the host.
pub(crate) fn text(status: http::StatusCode, body: &str) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(full(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// [`text`] with one more header.
pub(crate) fn text_with(
    status: http::StatusCode,
    body: &str,
    (name, value): (http::HeaderName, &'static str),
) -> hyper::Response<Body> {
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(name, http::HeaderValue::from_static(value));
    response
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A request handler for [`serve_connections`]: the request and the peer's address.
pub type Handler = Arc<
    dyn Fn(
            hyper::Request<Incoming>,
            SocketAddr,
        ) -> std::pin::Pin<Box<dyn Future<Output = hyper::Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// Serves the gateway of `node` on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish (for at most [`DRAIN_TIMEOUT`]). At most
/// `max_connections` are open at once: past that, new connections wait in the listen
/// backlog until one closes.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()>,
    max_connections: usize,
) -> anyhow::Result<()> {
    let handler: Handler = Arc::new(move |request, _peer| {
        let node = Arc::clone(&node);
        Box::pin(async move { dispatch(&node, request).await })
    });
    serve_connections(listener, handler, shutdown, max_connections).await
}

/// Accepts connections on `listener` and answers each request with `handler`, until
/// `shutdown` resolves; then drains (for at most [`DRAIN_TIMEOUT`]).
pub async fn serve_connections(
    listener: TcpListener,
    handler: Handler,
    shutdown: impl Future<Output = ()>,
    max_connections: usize,
) -> anyhow::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper skips its header read timeout: a client that never
    // finishes its headers would hold a connection forever.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // A client may shut down its sending side and wait for the answer (as
        // `nc -q` does): it still gets one.
        .half_close(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let connection_slot = tokio::select! {
            slot = Arc::clone(&connections).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without TCP_NODELAY small responses wait for the peer's delayed ACK (~40 ms).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, "set_nodelay failed: {error}");
        }
        let handler = Arc::clone(&handler);
        let requests = Arc::clone(&requests);
        let service = hyper::service::service_fn(move |request| {
            // Counted from the request's head until its response body is dropped
            // (sent or abandoned): what a drain waits for.
            let guard = InFlight::enter(&requests);
            let answer = handler(request, peer);
            async move {
                let response = answer.await;
                Ok::<_, Infallible>(response.map(move |body| {
                    body.map_frame(move |frame| {
                        let _held = &guard;
                        frame
                    })
                    .boxed_unsync()
                }))
            }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _slot = connection_slot;
            if let Err(error) = connection.await {
                tracing::debug!(%peer, "connection ended with an error: {error}");
            }
        });
    }
    drop(listener);
    // Requests in flight finish; a connection with no request (idle, or still sending
    // its headers) does not hold the drain.
    let idle = async {
        while requests.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let closed = graceful.shutdown();
    let mut closed = std::pin::pin!(closed);
    tokio::select! {
        () = &mut closed => tracing::debug!("all connections closed"),
        () = idle => {
            // The last responses may still be in hyper's buffers: give them a moment.
            if tokio::time::timeout(DRAIN_GRACE, &mut closed).await.is_err() {
                tracing::debug!("no request in flight: closing the connections left");
            }
        }
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timeout: closing remaining connections"),
    }
    Ok(())
}

/// One request in flight, counted in the shared counter while it lives.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_segments_are_found_also_encoded() {
        for path in ["/a/../b", "/a/./b", "/..", "/a/%2e%2E/b", "/a/%2e"] {
            assert!(super::has_dot_segment(path), "{path}");
        }
        for path in ["/a/b", "/a/.b", "/a/..b/", "/"] {
            assert!(!super::has_dot_segment(path), "{path}");
        }
    }
}

//! The HTTP trigger: the gateway that routes requests to functions.
//!
//! [`App::load`] compiles (or loads from cache) and pre-instantiates every function of
//! a [`Deployment`]; [`serve`] accepts connections and hands each request to the
//! function whose route matches, in a fresh store.
//!
//! Host paths under `/.well-known/lepton/`: `health` answers `ok`; `metrics`
//! answers per-function counters in the Prometheus text format.

mod function;

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use wasmtime::component::Linker;

use crate::caps::InstanceState;
use crate::engine::Runtime;
use crate::manifest::{Deployment, RESERVED_ROUTE_PREFIX};
use crate::nn::ModelRegistry;
use crate::train::TrainerRegistry;

pub use function::Function;

/// Connections open at once, by default; past that new ones wait in the backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How long a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a graceful shutdown waits for in-flight requests before exiting anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of every response the gateway sends.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Every function of a deployment, ready to serve.
pub struct App {
    /// Ordered by route length, longest first, so the first match is the most specific.
    functions: Vec<Arc<Function>>,
    /// The node's models, when the deployment declares any.
    models: Option<Arc<ModelRegistry>>,
    /// The node's trainers, when the deployment declares any.
    trainers: Option<Arc<TrainerRegistry>>,
}

impl App {
    /// Loads every function of `deployment`: compiles each component once (cached
    /// under `state_dir`) and checks that it is a `wasi:http` proxy this host can run;
    /// loads every model once. Call it inside a tokio runtime (batching models start a task).
    pub fn load(runtime: &Runtime, deployment: &Deployment, state_dir: &Path) -> anyhow::Result<Self> {
        let mut linker = Linker::<InstanceState>::new(runtime.engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from).context("linking WASI")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(anyhow::Error::from).context("linking wasi:http")?;
        crate::nn::add_to_linker(&mut linker, InstanceState::nn).map_err(anyhow::Error::from).context("linking wasi:nn")?;
        let models = if deployment.models.is_empty() {
            None
        } else {
            Some(Arc::new(ModelRegistry::load(deployment, state_dir)?))
        };
        let trainers = if deployment.trainers.is_empty() {
            None
        } else {
            Some(Arc::new(TrainerRegistry::load(deployment, state_dir)?))
        };
        let cache_dir = state_dir.join("components");
        let mut functions = Vec::with_capacity(deployment.functions.len());
        for spec in &deployment.functions {
            let function = Function::load(runtime, &linker, spec, &cache_dir, models.clone(), trainers.clone())
                .with_context(|| format!("function `{}`", spec.name))?;
            functions.push(Arc::new(function));
        }
        functions.sort_by_key(|f| std::cmp::Reverse(f.spec().route.len()));
        let slots: u64 = deployment.functions.iter().map(|f| u64::from(f.max_concurrency)).sum();
        if slots > u64::from(runtime.instances()) {
            tracing::warn!(
                "the functions' max_concurrency adds up to {slots}, more than the {} instance slots of the pool: \
                 requests past that get 503",
                runtime.instances()
            );
        }
        Ok(Self { functions, models, trainers })
    }

    /// The node's models, when the deployment declares any.
    pub fn models(&self) -> Option<&Arc<ModelRegistry>> {
        self.models.as_ref()
    }

    /// The node's trainers, when the deployment declares any.
    pub fn trainers(&self) -> Option<&Arc<TrainerRegistry>> {
        self.trainers.as_ref()
    }

    /// The functions, most specific route first.
    pub fn functions(&self) -> &[Arc<Function>] {
        &self.functions
    }

    fn route(&self, path: &str) -> Option<&Arc<Function>> {
        self.functions.iter().find(|f| {
            let route = f.spec().route.as_str();
            route == "/"
                || path.strip_prefix(route).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// Answers one request.
    pub async fn dispatch(&self, request: hyper::Request<Incoming>) -> hyper::Response<Body> {
        let path = request.uri().path();
        if let Some(host_path) = path
            .strip_prefix(RESERVED_ROUTE_PREFIX)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            return match host_path {
                "/health" => text(http::StatusCode::OK, "ok\n"),
                "/metrics" => text(http::StatusCode::OK, &self.metrics()),
                _ => text(http::StatusCode::NOT_FOUND, "not found\n"),
            };
        }
        match self.route(path) {
            Some(function) => Arc::clone(function).handle(request).await,
            None => text(http::StatusCode::NOT_FOUND, "no function serves this path\n"),
        }
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        for function in &self.functions {
            function.write_metrics(&mut out);
        }
        if let Some(models) = &self.models {
            models.write_metrics(&mut out);
        }
        if let Some(trainers) = &self.trainers {
            trainers.write_metrics(&mut out);
        }
        out
    }
}

/// A plain-text response made by the host.
pub(crate) fn text(status: http::StatusCode, body: &str) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(full(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never: Infallible| match never {}).boxed_unsync()
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish (for at most [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(listener, app, shutdown, DEFAULT_MAX_CONNECTIONS).await
}

/// As [`serve`], with at most `max_connections` open at once: past that, new
/// connections wait in the listen backlog until one closes.
pub async fn serve_with(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    max_connections: usize,
) -> anyhow::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper skips its header read timeout: a client that never
    // finishes its headers would hold a connection forever.
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
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
        let app = Arc::clone(&app);
        let service = hyper::service::service_fn(move |request| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(app.dispatch(request).await) }
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
    tracing::info!("shutting down: waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timeout: closing remaining connections"),
    }
    if let Some(trainers) = app.trainers() {
        trainers.checkpoint_all().await;
    }
    Ok(())
}

//! The admin API: JSON over HTTP on its own listener, under `/v1`, every request
//! authenticated with `Authorization: Bearer <token>`.
//!
//! | request | answer |
//! | --- | --- |
//! | `HEAD /v1/blobs/sha256:<hex>` | 200 when stored, 404 |
//! | `PUT /v1/blobs/sha256:<hex>` | 201 stored (200 already there); 400 digest mismatch; 413 past `--max-blob-size` |
//! | `POST /v1/apps/<app>/versions` (a locked app) | 201 `{app, version, routes}` once it serves; 200 when nothing changed; 400 invalid or missing blobs; 409 route taken |
//! | `GET /v1/apps`, `GET /v1/apps/<app>` | apps, versions, active, routes |
//! | `POST /v1/apps/<app>/rollback` (`{"version": N}`, optional) | 200 `{app, version}`; 404 no such version |
//! | `DELETE /v1/apps/<app>` | 200; 404 |
//! | `GET /v1/status` | functions, models, trainers |
//! | `GET /v1/audit?limit=N` | the audit log, oldest first |
//! | `GET /v1/functions/<f>/logs?app=&since=&after=&follow=1` | the function's log ring as JSON lines; `follow=1` streams |
//! | `GET /v1/alerts` | each alert rule's state and the last changes |
//! | `GET /v1/stats?points=N&step=S` | what the status page charts |
//! | `GET /` (no token) | the status page (HTML; it asks for the token) |
//!
//! Errors are `{"error": {"scope", "key", "reason"}}` (and `"missing": [digests]` for
//! missing blobs), the same words the CLI prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::blobs::BlobError;
use crate::http::{Body, Handler, full};
use crate::locked::{Digest, LockedApp, Name, SpecError};
use crate::node::audit::AuditRecord;
use crate::node::{DeployError, Node};

/// Default cap on one uploaded blob.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 2 << 30;
/// Cap on a JSON request body (a locked app is a few KiB).
pub const MAX_JSON_BODY: usize = 8 << 20;
/// How long a client has to send a JSON body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blob upload may pause between pieces before it is dropped.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Auth failures recorded in the audit log per minute; past that they are counted only.
pub const MAX_AUDITED_AUTH_FAILURES: u64 = 60;

/// The admin API's bearer token.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// Reads the token from `file` when given, else from `<state_dir>/admin-token`,
    /// making that file (32 random bytes, hex, mode 0600) on first start.
    pub fn load_or_create(
        file: Option<&Path>,
        state_dir: &Path,
    ) -> anyhow::Result<(Self, PathBuf)> {
        let path = file.map_or_else(|| state_dir.join("admin-token"), Path::to_owned);
        if file.is_none() && !path.exists() {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .context("reading /dev/urandom for the admin token")?;
            write_private(&path, hex::encode(bytes).as_bytes())?;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the admin token `{}`", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(
            token.len() >= 16,
            "the admin token in `{}` is shorter than 16 characters",
            path.display()
        );
        Ok((Self(Arc::from(token)), path))
    }

    /// Whether `given` is the token, compared in constant time (of the digests).
    fn accepts(&self, given: &str) -> bool {
        let (a, b) = (
            Sha256::digest(self.0.as_bytes()),
            Sha256::digest(given.as_bytes()),
        );
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

/// Writes `bytes` to a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let temp = crate::fsutil::temp_path(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("creating `{}`", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing `{}`", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("renaming into `{}`", path.display()))
}

/// The admin API of one node.
pub struct Admin {
    node: Arc<Node>,
    /// On `lepton control`: the cluster every change is written to.
    cluster: Option<Arc<crate::cluster::Control>>,
    token: AdminToken,
    max_blob_size: u64,
    auth_failures: AtomicU64,
    auth_window: AtomicU64,
}

impl Admin {
    /// The API over `node`, accepting `token`, with blobs up to `max_blob_size`.
    pub fn new(node: Arc<Node>, token: AdminToken, max_blob_size: u64) -> Arc<Self> {
        Self::with_cluster(node, token, max_blob_size, None)
    }

    /// The admin API of a control plane: every change is written to the cluster and
    /// answered once its replicas serve; `/v1/status` shows nodes and replicas.
    pub fn with_cluster(
        node: Arc<Node>,
        token: AdminToken,
        max_blob_size: u64,
        cluster: Option<Arc<crate::cluster::Control>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            cluster,
            token,
            max_blob_size,
            auth_failures: AtomicU64::new(0),
            auth_window: AtomicU64::new(0),
        })
    }

    /// A handler for [`crate::http::serve_connections`].
    pub fn handler(self: &Arc<Self>) -> Handler {
        let admin = Arc::clone(self);
        Arc::new(move |request, peer| {
            let admin = Arc::clone(&admin);
            Box::pin(async move { admin.answer(request, peer).await })
        })
    }

    async fn answer(
        &self,
        request: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> hyper::Response<Body> {
        // The page carries no data: it reads the API with the token it is given.
        if request.uri().path() == "/" && matches!(*request.method(), Method::GET | Method::HEAD) {
            return crate::ops::page::response();
        }
        if !self.authorized(&request) {
            self.audit_auth_failure(&request, peer);
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                SpecError::new("", None, "missing or wrong bearer token"),
            );
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path
            .strip_prefix("/v1/")
            .map(|p| p.split('/').collect())
            .unwrap_or_default();
        let peer = peer.to_string();
        match (&method, segments.as_slice()) {
            (&Method::HEAD, ["blobs", digest]) => match Digest::parse(digest) {
                Ok(digest) if self.node.blobs().touch(&digest) => empty(StatusCode::OK),
                Ok(_) => empty(StatusCode::NOT_FOUND),
                Err(_) => empty(StatusCode::BAD_REQUEST),
            },
            (&Method::PUT, ["blobs", digest]) => match Digest::parse(digest) {
                Ok(digest) => self.put_blob(request, digest).await,
                Err(reason) => error(
                    StatusCode::BAD_REQUEST,
                    SpecError::new("blob", None, reason),
                ),
            },
            (&Method::POST, ["apps", app, "versions"]) => self.deploy(request, app, &peer).await,
            (&Method::GET, ["apps"]) => json(
                StatusCode::OK,
                &serde_json::json!({ "apps": self.node.apps().await }),
            ),
            (&Method::GET, ["apps", app]) => match parse_app(app) {
                Ok(name) => match self.node.apps().await.into_iter().find(|a| a.name == name) {
                    Some(info) => json(StatusCode::OK, &info),
                    None => not_found(app),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
            (&Method::POST, ["apps", app, "rollback"]) => self.rollback(request, app, &peer).await,
            (&Method::DELETE, ["apps", app]) => match parse_app(app) {
                Ok(name) => {
                    let guard = self.change_guard().await;
                    match self.node.remove(&name, &peer).await {
                        Ok(()) => {
                            let answer = serde_json::json!({ "removed": name });
                            self.published(&name, StatusCode::OK, answer, false, guard)
                                .await
                        }
                        Err(e) => deploy_error(&e),
                    }
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
            (&Method::GET, ["status"]) => match &self.cluster {
                Some(cluster) => json(StatusCode::OK, &cluster.status()),
                None => json(StatusCode::OK, &self.node.status()),
            },
            (&Method::GET, ["audit"]) => {
                let limit = query(&request, "limit")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(crate::node::audit::MAX_READ);
                match tokio::task::block_in_place(|| self.node.audit().read(limit)) {
                    Ok(records) => json(StatusCode::OK, &serde_json::json!({ "records": records })),
                    Err(e) => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        SpecError::new("audit", None, format!("{e:#}")),
                    ),
                }
            }
            (&Method::GET, ["functions", function, "logs"]) => self.logs(&request, function),
            // On a control plane the rules are judged by the nodes that serve the
            // functions: it has no state of its own to show.
            (&Method::GET, ["alerts"]) if self.cluster.is_some() => json(
                StatusCode::OK,
                &serde_json::json!({
                    "alerts": [],
                    "events": [],
                    "note": "alert rules are judged on the nodes that serve their functions (each node's audit log and log)",
                }),
            ),
            (&Method::GET, ["alerts"]) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "alerts": self.node.alerts(),
                    "events": self.node.ops().alerts.events(),
                }),
            ),
            (&Method::GET, ["stats"]) => {
                let points = query(&request, "points")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(60_usize)
                    .clamp(1, 600);
                let step = query(&request, "step")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(5_u64)
                    .clamp(1, 60);
                let mut stats = self.node.stats(points, step);
                if let Some(cluster) = &self.cluster {
                    stats["cluster"] = serde_json::to_value(cluster.status()).unwrap_or_default();
                    stats["alerts"] = serde_json::json!([]);
                }
                json(StatusCode::OK, &stats)
            }
            (
                _,
                ["blobs", _]
                | ["apps"]
                | ["apps", _]
                | ["apps", _, "versions" | "rollback"]
                | ["status"]
                | ["audit"]
                | ["functions", _, "logs"]
                | ["alerts"]
                | ["stats"],
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                SpecError::new("", None, format!("{method} is not allowed on {path}")),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                SpecError::new("", None, format!("no such endpoint: {method} {path}")),
            ),
        }
    }

    /// `GET /v1/functions/<function>/logs`.
    fn logs(&self, request: &hyper::Request<Incoming>, function: &str) -> hyper::Response<Body> {
        let bad = |reason: String| {
            error(
                StatusCode::BAD_REQUEST,
                SpecError::new(format!("function `{function}`"), None, reason),
            )
        };
        let ops = self.node.ops();
        let app = match query(request, "app") {
            Some(app) => app.to_owned(),
            None => match ops.apps_with(function).as_slice() {
                [] => {
                    return error(
                        StatusCode::NOT_FOUND,
                        SpecError::new(
                            format!("function `{function}`"),
                            None,
                            "no function of that name serves here",
                        ),
                    );
                }
                [app] => app.clone(),
                apps => {
                    return bad(format!(
                        "apps {} each have a function of that name: add ?app=",
                        apps.join(", ")
                    ));
                }
            },
        };
        let Some(observed) = ops.get(&app, function) else {
            return error(
                StatusCode::NOT_FOUND,
                SpecError::new(
                    format!("function `{function}`"),
                    None,
                    format!("app {app:?} has no function of that name here"),
                ),
            );
        };
        let since_ms = match query(request, "since") {
            None => 0,
            Some(since) => match crate::manifest::parse_duration(since) {
                Ok(ago) => crate::node::store::now_ms()
                    .saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)),
                Err(reason) => return bad(format!("since: {reason}")),
            },
        };
        let after = match query(request, "after").map(str::parse::<u64>) {
            None => 0,
            Some(Ok(after)) => after,
            Some(Err(_)) => return bad("after: expected a record number".to_owned()),
        };
        let follow = matches!(query(request, "follow"), Some("1" | "true"));
        let ring = observed.logs;
        let (records, newest) = ring.read_with_newest(after, since_ms);
        let mut response = if follow {
            crate::ops::logs::follow(ring, (&records, newest, after), ops.closed())
        } else {
            full(Bytes::from(crate::ops::logs::json_lines(&records)))
        };
        let mut answer = hyper::Response::new(Body::default());
        std::mem::swap(answer.body_mut(), &mut response);
        answer.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        answer
    }

    fn authorized(&self, request: &hyper::Request<Incoming>) -> bool {
        request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| self.token.accepts(given.trim()))
    }

    fn audit_auth_failure(&self, request: &hyper::Request<Incoming>, peer: SocketAddr) {
        let minute = crate::node::store::now_ms() / 60_000;
        if self.auth_window.swap(minute, Ordering::Relaxed) != minute {
            self.auth_failures.store(0, Ordering::Relaxed);
        }
        let n = self.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "admin API: refused a request without a valid token");
        if n >= MAX_AUDITED_AUTH_FAILURES {
            return;
        }
        let record = AuditRecord {
            time_ms: crate::node::store::now_ms(),
            action: "auth-failure".to_owned(),
            app: None,
            version: None,
            digests: Vec::new(),
            peer: peer.to_string(),
            outcome: format!(
                "{} {}",
                request.method(),
                request.uri().path().chars().take(200).collect::<String>()
            ),
        };
        if let Err(e) = self.node.audit().append(&record) {
            tracing::error!("cannot write the audit log: {e:#}");
        }
    }

    async fn put_blob(
        &self,
        request: hyper::Request<Incoming>,
        digest: Digest,
    ) -> hyper::Response<Body> {
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                SpecError::new(
                    "blob",
                    None,
                    format!(
                        "the blob is larger than {} bytes (`--max-blob-size`)",
                        self.max_blob_size
                    ),
                ),
            )
        };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_blob_size) {
            return too_large();
        }
        if self.node.blobs().touch(&digest) {
            return json(
                StatusCode::OK,
                &serde_json::json!({ "digest": digest, "stored": false }),
            );
        }
        let mut writer = match self.node.blobs().writer(digest.clone(), self.max_blob_size) {
            Ok(writer) => writer,
            Err(e) => return blob_error(&e, &digest),
        };
        let mut body = request.into_body();
        loop {
            let frame = match tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, body.frame()).await {
                Err(_) => {
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        SpecError::new("blob", None, "the upload stalled"),
                    );
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        SpecError::new("blob", None, format!("reading the body: {e}")),
                    );
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data()
                && let Err(e) = tokio::task::block_in_place(|| writer.write(&data))
            {
                return match e {
                    BlobError::TooLarge { .. } => too_large(),
                    other => blob_error(&other, &digest),
                };
            }
        }
        match tokio::task::spawn_blocking(move || writer.finish()).await {
            Ok(Ok(())) => json(
                StatusCode::CREATED,
                &serde_json::json!({ "digest": digest, "stored": true }),
            ),
            Ok(Err(e)) => blob_error(&e, &digest),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                SpecError::new("blob", None, e.to_string()),
            ),
        }
    }

    async fn deploy(
        &self,
        request: hyper::Request<Incoming>,
        app: &str,
        peer: &str,
    ) -> hyper::Response<Body> {
        let (name, body) = match app_and_body(app, request).await {
            Ok(parsed) => parsed,
            Err(response) => return response,
        };
        let locked: LockedApp = match serde_json::from_slice(&body) {
            Ok(locked) => locked,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    SpecError::new("locked app", None, e.to_string()),
                );
            }
        };
        if locked.name != name {
            return error(
                StatusCode::BAD_REQUEST,
                SpecError::new(
                    "locked app",
                    Some("name"),
                    format!(
                        "is {:?}, but the URL names app {:?}",
                        locked.name.as_str(),
                        app
                    ),
                ),
            );
        }
        let guard = self.change_guard().await;
        match self.node.deploy(locked, peer).await {
            Ok(deployed) => {
                let status = if deployed.unchanged {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                };
                let answer = serde_json::to_value(&deployed).unwrap_or_default();
                self.published(&deployed.app, status, answer, true, guard)
                    .await
            }
            Err(e) => deploy_error(&e),
        }
    }

    async fn rollback(
        &self,
        request: hyper::Request<Incoming>,
        app: &str,
        peer: &str,
    ) -> hyper::Response<Body> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Rollback {
            version: Option<u64>,
        }
        let (name, body) = match app_and_body(app, request).await {
            Ok(parsed) => parsed,
            Err(response) => return response,
        };
        let wanted = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            match serde_json::from_slice::<Rollback>(&body) {
                Ok(r) => r.version,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        SpecError::new("rollback", None, e.to_string()),
                    );
                }
            }
        };
        let guard = self.change_guard().await;
        match self.node.rollback(&name, wanted, peer).await {
            Ok(deployed) => {
                let answer = serde_json::to_value(&deployed).unwrap_or_default();
                self.published(&name, StatusCode::OK, answer, true, guard)
                    .await
            }
            Err(e) => deploy_error(&e),
        }
    }
}

impl Admin {
    /// On a control plane: writes the change to the cluster before answering (and,
    /// when `wait`, waits for its replicas to serve); elsewhere answers as it is.
    /// On a control plane: one change at a time, and none while a takeover reads the
    /// cluster's state (which would undo it).
    async fn change_guard(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.cluster {
            Some(cluster) => Some(cluster.lock_changes().await),
            None => None,
        }
    }

    async fn published(
        &self,
        app: &Name,
        status: StatusCode,
        mut answer: serde_json::Value,
        wait: bool,
        guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> hyper::Response<Body> {
        let Some(cluster) = &self.cluster else {
            return json(status, &answer);
        };
        let written = cluster.publish(app).await;
        drop(guard);
        if let Err(e) = written {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                SpecError::new(
                    format!("app `{app}`"),
                    None,
                    format!(
                        "the control plane has the change but could not write it to the cluster (it retries): {e:#}"
                    ),
                ),
            );
        }
        if wait {
            answer["cluster"] = cluster.wait_serving(app).await;
        }
        json(status, &answer)
    }
}

fn parse_app(app: &str) -> Result<Name, SpecError> {
    Name::new(app).map_err(|reason| SpecError::new(format!("app {app:?}"), None, reason))
}

fn not_found(app: &str) -> hyper::Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        SpecError::new("", None, format!("no app named {app:?}")),
    )
}

/// The app named in the URL and the request's JSON body, or the 4xx answer.
async fn app_and_body(
    app: &str,
    request: hyper::Request<Incoming>,
) -> Result<(Name, Bytes), hyper::Response<Body>> {
    let name = parse_app(app).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    Ok((name, read_json_body(request).await?))
}

async fn read_json_body(request: hyper::Request<Incoming>) -> Result<Bytes, hyper::Response<Body>> {
    match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), MAX_JSON_BODY).collect(),
    )
    .await
    {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            SpecError::new("", None, "the body did not arrive in time"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            SpecError::new(
                "",
                None,
                format!("JSON bodies are at most {MAX_JSON_BODY} bytes"),
            ),
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            SpecError::new("", None, format!("reading the body: {e}")),
        )),
    }
}

fn query<'a>(request: &'a hyper::Request<Incoming>, key: &str) -> Option<&'a str> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

fn blob_error(e: &BlobError, digest: &Digest) -> hyper::Response<Body> {
    let status = match e {
        BlobError::DigestMismatch { .. } => StatusCode::BAD_REQUEST,
        BlobError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(
        status,
        SpecError::new(format!("blob {digest}"), None, format!("{e:#}")),
    )
}

fn deploy_error(e: &DeployError) -> hyper::Response<Body> {
    let status = match e {
        DeployError::Invalid(_) | DeployError::MissingBlobs(_) => StatusCode::BAD_REQUEST,
        DeployError::RouteConflict { .. } | DeployError::ModelConflict { .. } => {
            StatusCode::CONFLICT
        }
        DeployError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut body = serde_json::json!({ "error": e.spec_error() });
    if let DeployError::MissingBlobs(missing) = e {
        body["missing"] = serde_json::json!(missing);
    }
    json(status, &body)
}

fn error(status: StatusCode, error: SpecError) -> hyper::Response<Body> {
    json(
        status,
        &serde_json::json!({ "error": serde_json::to_value(error).unwrap_or_default() }),
    )
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> hyper::Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    let mut response = hyper::Response::new(full(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn empty(status: StatusCode) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}

//! The Open Inference Protocol (KServe v2, as Triton serves it) on declared models.
//!
//! A model with `protocol = "v2"` in its manifest is served on the gateway under
//! `/v2/`, on the same loaded model, sessions and batcher that its app's functions
//! use. A model without it is not reachable from outside: its name answers 404, the
//! same as a name no app declares. With `token_env`, every request for the model
//! must carry `Authorization: Bearer <the value of that variable in the node's
//! environment>` (401 otherwise).
//!
//! Endpoints (REST, as in the protocol's required API):
//!
//! | method | path | answer |
//! | --- | --- | --- |
//! | GET | `/v2` | server name, version, extensions |
//! | GET | `/v2/health/live`, `/v2/health/ready` | 200 (ready: 503 while draining) |
//! | GET | `/v2/models/M[/versions/V]` | metadata: versions, platform, inputs and outputs |
//! | GET | `/v2/models/M[/versions/V]/ready` | 200 when that version serves |
//! | POST | `/v2/models/M[/versions/V]/infer` | an inference ([`wire`]) |
//!
//! A model's version is its app's version. Only the active one serves: another kept
//! version answers 400 (not ready; `lepton rollback` makes it serve), any other 404.

pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest as _;

use crate::http::{Body, BodyError, full};
use crate::locked::{ModelSpec, Name};
use crate::nn::{ErrorCode, Io, ModelSlot};
use crate::node::Node;
use crate::ops::metrics::{InferLabels, StatusClass, metrics};

/// The largest inference request body, JSON and binary data together.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// How long an inference may take, unless the request asks for less
/// (`parameters.timeout`, in microseconds).
pub const INFER_TIMEOUT: Duration = Duration::from_secs(60);

/// Inference requests one model serves at once (queued for its sessions included);
/// past that, 503.
pub const MAX_IN_FLIGHT: usize = 1024;

/// The header that says how much of a body is JSON (binary tensor data extension).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A model served over the protocol: what the gateway needs to answer for it.
pub struct Endpoint {
    name: Name,
    slot: Arc<ModelSlot>,
    /// SHA-256 of the bearer token clients must send, when `token_env` is set.
    token: Option<[u8; 32]>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Endpoint {
    /// The endpoint for `slot`, declared by `spec`; its token read from the node's
    /// environment now.
    pub fn new(spec: &ModelSpec, slot: Arc<ModelSlot>) -> anyhow::Result<Self> {
        let token = match &spec.token_env {
            None => None,
            Some(variable) => {
                let value = std::env::var(variable).map_err(|_| {
                    anyhow::anyhow!(
                        "`token_env`: the environment variable `{variable}` is not set (or not UTF-8) on this node"
                    )
                })?;
                anyhow::ensure!(
                    !value.is_empty(),
                    "`token_env`: the environment variable `{variable}` is empty on this node"
                );
                // HTTP drops whitespace around a header value, so such a token could
                // never be sent as it is; tokens are compared exactly.
                anyhow::ensure!(
                    value.trim() == value,
                    "`token_env`: the environment variable `{variable}` starts or ends with whitespace on this node"
                );
                Some(sha2::Sha256::digest(value.as_bytes()).into())
            }
        };
        Ok(Self {
            name: spec.name.clone(),
            slot,
            token,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// The model's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Whether `headers` carry the token (always, when none is needed). Digests are
    /// compared, so the time taken says nothing about the token.
    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        let given: [u8; 32] = sha2::Sha256::digest(given.as_bytes()).into();
        given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// A JSON error answer: `{"error": message}`.
fn error(status: http::StatusCode, message: &str) -> hyper::Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn json(status: http::StatusCode, value: &serde_json::Value) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(full(Bytes::from(
        serde_json::to_vec(value).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> hyper::Response<Body> {
    let mut response = error(
        http::StatusCode::METHOD_NOT_ALLOWED,
        &format!("this endpoint answers {allow}"),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

/// What a path under `/v2` names.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Server,
    Live,
    Ready,
    Model {
        name: &'a str,
        version: Option<&'a str>,
        action: Action,
    },
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Action {
    Metadata,
    Ready,
    Infer,
}

fn parse_path(rest: &str) -> Option<Target<'_>> {
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    Some(match segments.as_slice() {
        [] | [""] => Target::Server,
        ["health", "live"] => Target::Live,
        ["health", "ready"] => Target::Ready,
        ["models", name, tail @ ..] if !name.is_empty() => {
            let (version, tail) = match tail {
                ["versions", version, tail @ ..] if !version.is_empty() => (Some(*version), tail),
                tail => (None, tail),
            };
            let action = match tail {
                [] => Action::Metadata,
                ["ready"] => Action::Ready,
                ["infer"] => Action::Infer,
                _ => return None,
            };
            Target::Model {
                name,
                version,
                action,
            }
        }
        _ => return None,
    })
}

/// Answers a request under `/v2` (`rest`: the path after `/v2`).
pub async fn dispatch(
    node: &Node,
    rest: &str,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let Some(target) = parse_path(rest) else {
        return error(http::StatusCode::NOT_FOUND, "no such endpoint");
    };
    let method = request.method().clone();
    let reads = method == http::Method::GET || method == http::Method::HEAD;
    match target {
        Target::Server | Target::Live | Target::Ready if !reads => method_not_allowed("GET, HEAD"),
        Target::Server => json(
            http::StatusCode::OK,
            &serde_json::json!({
                "name": "lepton",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": ["binary_tensor_data"],
            }),
        ),
        Target::Live => json(http::StatusCode::OK, &serde_json::json!({ "live": true })),
        Target::Ready => {
            let ready = !node.ops().is_closed();
            let status = if ready {
                http::StatusCode::OK
            } else {
                http::StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &serde_json::json!({ "ready": ready }))
        }
        Target::Model {
            name,
            version,
            action,
        } => {
            let table = node.table();
            let Some((version_served, kept, endpoint)) = table.endpoint(name) else {
                return error(
                    http::StatusCode::NOT_FOUND,
                    &format!("no model named {name:?} is served"),
                );
            };
            if !endpoint.authorized(request.headers()) {
                let mut response = error(
                    http::StatusCode::UNAUTHORIZED,
                    &format!("model `{name}` needs `Authorization: Bearer <token>`"),
                );
                response.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return response;
            }
            if let Some(version) = version
                && let asked = version.parse::<u64>().ok()
                && asked != Some(version_served)
            {
                let kept_here = asked.is_some_and(|v| kept.contains(&v));
                return if kept_here {
                    error(
                        http::StatusCode::BAD_REQUEST,
                        &format!(
                            "version {version} of model `{name}` is not ready: version {version_served} serves (`lepton rollback` makes another serve)"
                        ),
                    )
                } else {
                    error(
                        http::StatusCode::NOT_FOUND,
                        &format!("model `{name}` has no version {version:?}"),
                    )
                };
            }
            match action {
                Action::Metadata | Action::Ready if !reads => method_not_allowed("GET, HEAD"),
                Action::Infer if method != http::Method::POST => method_not_allowed("POST"),
                Action::Metadata => json(
                    http::StatusCode::OK,
                    &metadata(name, version_served, &endpoint.slot),
                ),
                Action::Ready => json(
                    http::StatusCode::OK,
                    &serde_json::json!({ "name": name, "ready": true }),
                ),
                Action::Infer => {
                    let started = Instant::now();
                    let response =
                        infer(node, &endpoint, &version_served.to_string(), request).await;
                    let labels = InferLabels {
                        model: endpoint.name.to_string(),
                        class: StatusClass::of(response.status().as_u16()),
                    };
                    let m = metrics();
                    m.infer_requests.get_or_create(&labels).inc();
                    m.infer_request_seconds
                        .get_or_create(&labels)
                        .observe(started.elapsed().as_secs_f64());
                    response
                }
            }
        }
    }
}

fn describe(ios: &[Io]) -> Vec<serde_json::Value> {
    ios.iter()
        .map(|io| {
            serde_json::json!({
                "name": io.name,
                "datatype": io.ty.name(),
                "shape": io.shape,
            })
        })
        .collect()
}

fn metadata(name: &str, version: u64, slot: &ModelSlot) -> serde_json::Value {
    let model = slot.current();
    let onnx = model.onnx();
    serde_json::json!({
        "name": name,
        "versions": [version.to_string()],
        "platform": "onnxruntime_onnx",
        "inputs": describe(onnx.inputs()),
        "outputs": describe(onnx.outputs()),
    })
}

async fn infer(
    node: &Node,
    endpoint: &Endpoint,
    version: &str,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get(http::header::CONTENT_ENCODING)
        && encoding.as_bytes() != b"identity"
    {
        return error(
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed request bodies (Content-Encoding) are not supported",
        );
    }
    let header_length = match parts.headers.get(HEADER_LENGTH) {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            Some(length) => Some(length),
            None => {
                return error(
                    http::StatusCode::BAD_REQUEST,
                    "Inference-Header-Content-Length is not a number",
                );
            }
        },
    };
    let deadline = tokio::time::Instant::now() + INFER_TIMEOUT;
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_REQUEST_BYTES) {
        return too_large();
    }
    let budget = node.body_budget();
    let read = crate::http::read_body(body, declared, MAX_REQUEST_BYTES, &budget);
    let held = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => {
            return error(
                http::StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            );
        }
        Ok(Ok(held)) => held,
        Ok(Err(BodyError::TooLarge)) => return too_large(),
        Ok(Err(BodyError::OverBudget)) => return over_budget(),
        Ok(Err(BodyError::Read(_))) => {
            return error(
                http::StatusCode::BAD_REQUEST,
                "could not read the request body",
            );
        }
    };
    // JSON decodes to up to 4 times its size: room for that is reserved before the
    // decoding (the body holds 1), then only what the tensors take is kept.
    let Some(decoding) = budget.try_reserve(held.bytes.len() as u64 * 3) else {
        return over_budget();
    };
    let parsed = match wire::parse_request(&held.bytes, header_length) {
        Ok(parsed) => parsed,
        Err(bad) => return error(http::StatusCode::BAD_REQUEST, &bad.0),
    };
    // The tensors are copies: they take the body's place in the node's budget (JSON
    // decodes to up to 4 times its size) until the response is built.
    let decoded = parsed
        .inputs
        .iter()
        .map(|(_, tensor)| tensor.data.len() as u64)
        .sum::<u64>();
    drop(held);
    drop(decoding);
    let Some(_tensors) = budget.try_reserve(decoded) else {
        return over_budget();
    };
    let model = endpoint.slot.current();
    let outputs = model.onnx().outputs();
    let selected: Vec<(String, bool)> = match &parsed.outputs {
        None => outputs
            .iter()
            .map(|io| (io.name.clone(), parsed.binary_output))
            .collect(),
        Some(requested) => {
            if let Some(unknown) = requested
                .iter()
                .find(|r| !outputs.iter().any(|io| io.name == r.name))
            {
                return error(
                    http::StatusCode::BAD_REQUEST,
                    &format!(
                        "unknown output `{}`; model `{}` has {}",
                        unknown.name,
                        endpoint.name,
                        outputs
                            .iter()
                            .map(|io| format!("`{}`", io.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            requested
                .iter()
                .map(|r| (r.name.clone(), r.binary))
                .collect()
        }
    };
    let deadline = match parsed.timeout_us {
        Some(us) => deadline.min(tokio::time::Instant::now() + Duration::from_micros(us)),
        None => deadline,
    };
    let headers = &parts.headers;
    let trace = crate::ops::trace::exporting().then(|| {
        crate::ops::trace::TraceContext::for_request(
            headers
                .get(crate::ops::trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
        )
    });
    let Ok(permit) = Arc::clone(&endpoint.in_flight).try_acquire_owned() else {
        return error(
            http::StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "model `{}` has {MAX_IN_FLIGHT} requests in flight; retry later",
                endpoint.name
            ),
        );
    };
    let computing = Instant::now();
    let computed = tokio::time::timeout_at(deadline, model.compute(parsed.inputs, trace)).await;
    drop(permit);
    if let Some(trace) = trace {
        crate::ops::trace::record_span(
            trace,
            "infer",
            computing,
            Instant::now(),
            vec![opentelemetry::KeyValue::new(
                "lepton.model",
                endpoint.name.to_string(),
            )],
        );
    }
    let mut results = match computed {
        Err(_) => {
            return error(
                http::StatusCode::GATEWAY_TIMEOUT,
                "the inference did not finish in time",
            );
        }
        Ok(Err(e)) => {
            let status = match e.code {
                ErrorCode::InvalidArgument | ErrorCode::InvalidEncoding => {
                    http::StatusCode::BAD_REQUEST
                }
                ErrorCode::TooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
                _ => http::StatusCode::INTERNAL_SERVER_ERROR,
            };
            if status.is_server_error() {
                tracing::warn!(model = %endpoint.name, "inference failed: {}", e.message);
            }
            return error(status, &e.message);
        }
        Ok(Ok(results)) => results,
    };
    let mut chosen = Vec::with_capacity(selected.len());
    for (name, binary) in selected {
        let Some(at) = results.iter().position(|(n, _)| *n == name) else {
            return error(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the model did not produce output `{name}`"),
            );
        };
        let (name, tensor) = results.swap_remove(at);
        chosen.push((name, tensor, binary));
    }
    let encoded = match wire::encode_response(
        endpoint.name.as_str(),
        version,
        parsed.id.as_deref(),
        &chosen,
    ) {
        Ok(encoded) => encoded,
        Err(message) => return error(http::StatusCode::INTERNAL_SERVER_ERROR, &message),
    };
    let mut response = hyper::Response::new(full(Bytes::from(encoded.body)));
    let headers = response.headers_mut();
    match encoded.header_length {
        Some(length) => {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(HEADER_LENGTH, http::HeaderValue::from(length));
        }
        None => {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
    }
    response
}

fn over_budget() -> hyper::Response<Body> {
    let mut response = error(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "the node holds as many request bodies as it may; retry later",
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

fn too_large() -> hyper::Response<Body> {
    error(
        http::StatusCode::PAYLOAD_TOO_LARGE,
        &format!("inference requests are at most {MAX_REQUEST_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::{Action, Target, parse_path};

    #[test]
    fn paths_name_the_endpoints() {
        assert_eq!(parse_path(""), Some(Target::Server));
        assert_eq!(parse_path("/"), Some(Target::Server));
        assert_eq!(parse_path("/health/live"), Some(Target::Live));
        assert_eq!(parse_path("/health/ready"), Some(Target::Ready));
        assert_eq!(
            parse_path("/models/m"),
            Some(Target::Model {
                name: "m",
                version: None,
                action: Action::Metadata
            })
        );
        assert_eq!(
            parse_path("/models/m/versions/3/infer"),
            Some(Target::Model {
                name: "m",
                version: Some("3"),
                action: Action::Infer
            })
        );
        assert_eq!(
            parse_path("/models/m/ready"),
            Some(Target::Model {
                name: "m",
                version: None,
                action: Action::Ready
            })
        );
        for bad in [
            "/health",
            "/models",
            "/models/",
            "/models/m/versions/",
            "/models/m/x",
            "/models/m/infer/x",
        ] {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }
}

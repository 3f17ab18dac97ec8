//! Outgoing HTTP requests through `wasi:http/outgoing-handler`.
//!
//! The host sends a request only to a `scheme://host:port` listed in the
//! function's `allowed_outbound_hosts`; any other destination fails with
//! [`Error`] carrying the `wasi:http` error code (`HTTP-request-denied`).

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, OutgoingBody, OutgoingRequest, Scheme};

use crate::wasi_http::{read_body, to_wasi_method, write_body};

/// Why an outgoing request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Sends `request` (its URI must be absolute) and waits for the whole response.
pub fn send(request: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, Error> {
    let (parts, body) = request.into_parts();
    let headers = Fields::new();
    for (name, value) in &parts.headers {
        headers
            .append(name.as_str(), value.as_bytes())
            .map_err(|e| Error(format!("header {name:?}: {e:?}")))?;
    }
    let outgoing = OutgoingRequest::new(headers);
    let _ = outgoing.set_method(&to_wasi_method(&parts.method));
    let scheme = match parts.uri.scheme_str() {
        Some("https") => Scheme::Https,
        Some("http") | None => Scheme::Http,
        Some(other) => Scheme::Other(other.to_owned()),
    };
    let _ = outgoing.set_scheme(Some(&scheme));
    let _ = outgoing.set_authority(parts.uri.authority().map(http::uri::Authority::as_str));
    let _ = outgoing.set_path_with_query(
        parts
            .uri
            .path_and_query()
            .map(http::uri::PathAndQuery::as_str),
    );
    let outgoing_body = outgoing
        .body()
        .map_err(|()| Error("request body already taken".into()))?;
    let future = outgoing_handler::handle(outgoing, None).map_err(|e| Error(format!("{e:?}")))?;
    write_body(&outgoing_body, &body);
    OutgoingBody::finish(outgoing_body, None).map_err(|e| Error(format!("{e:?}")))?;

    future.subscribe().block();
    let incoming = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(Error(format!("{code:?}"))),
        Some(Err(())) => return Err(Error("response already taken".into())),
        None => return Err(Error("response not ready".into())),
    };
    let mut response = http::Response::builder().status(incoming.status());
    for (name, value) in incoming.headers().entries() {
        response = response.header(name, value);
    }
    let body = match incoming.consume() {
        Ok(body) => read_body(body).map_err(Error)?,
        Err(()) => Vec::new(),
    };
    response.body(body).map_err(|e| Error(e.to_string()))
}

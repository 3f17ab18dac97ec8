//! Conversion between `wasi:http` resources and the [`http`] crate's types.

use std::io::{Read as _, Write as _};

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse,
    ResponseOutparam, Scheme,
};

use crate::{Request, Response};

/// Runs `handler` on one incoming request and writes its response.
pub fn serve(handler: fn(Request) -> Response, request: &IncomingRequest, out: ResponseOutparam) {
    let request = match read_request(request) {
        Ok(request) => request,
        Err(message) => {
            respond(out, plain(400, message));
            return;
        }
    };
    respond(out, handler(request));
}

fn plain(status: u16, message: String) -> Response {
    let mut response = Response::new(message.into_bytes());
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
    response
}

fn read_request(request: &IncomingRequest) -> Result<Request, String> {
    let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
    let mut uri = http::Uri::builder().path_and_query(path);
    if let Some(authority) = request.authority() {
        let scheme = match request.scheme() {
            Some(Scheme::Https) => "https".to_owned(),
            Some(Scheme::Other(other)) => other,
            Some(Scheme::Http) | None => "http".to_owned(),
        };
        uri = uri.scheme(scheme.as_str()).authority(authority);
    }
    let mut builder = http::Request::builder()
        .method(from_wasi_method(request.method()))
        .uri(uri.build().map_err(|e| format!("bad request uri: {e}"))?);
    for (name, value) in request.headers().entries() {
        builder = builder.header(name, value);
    }
    let body = match request.consume() {
        Ok(body) => read_body(body)?,
        Err(()) => Vec::new(),
    };
    builder.body(body).map_err(|e| format!("bad request: {e}"))
}

pub(crate) fn read_body(body: IncomingBody) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    {
        let mut stream = body
            .stream()
            .map_err(|()| "request body already taken".to_owned())?;
        stream
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the body: {e}"))?;
    }
    drop(IncomingBody::finish(body));
    Ok(bytes)
}

fn respond(out: ResponseOutparam, response: Response) {
    let (parts, body) = response.into_parts();
    let headers = Fields::new();
    for (name, value) in &parts.headers {
        // A header the host refuses (a forbidden or malformed one) is dropped.
        let _ = headers.append(name.as_str(), value.as_bytes());
    }
    let outgoing = OutgoingResponse::new(headers);
    let _ = outgoing.set_status_code(parts.status.as_u16());
    let Ok(outgoing_body) = outgoing.body() else {
        return;
    };
    ResponseOutparam::set(out, Ok(outgoing));
    write_body(&outgoing_body, &body);
    let _ = OutgoingBody::finish(outgoing_body, None);
}

pub(crate) fn write_body(body: &OutgoingBody, bytes: &[u8]) {
    if let Ok(mut stream) = body.write() {
        // The client may have gone away; nothing useful is left to do then.
        let _ = stream
            .write_all(bytes)
            .and_then(|()| std::io::Write::flush(&mut stream));
    }
}

pub(crate) fn from_wasi_method(method: Method) -> http::Method {
    match method {
        Method::Get => http::Method::GET,
        Method::Head => http::Method::HEAD,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Delete => http::Method::DELETE,
        Method::Connect => http::Method::CONNECT,
        Method::Options => http::Method::OPTIONS,
        Method::Trace => http::Method::TRACE,
        Method::Patch => http::Method::PATCH,
        Method::Other(other) => {
            http::Method::from_bytes(other.as_bytes()).unwrap_or(http::Method::GET)
        }
    }
}

pub(crate) fn to_wasi_method(method: &http::Method) -> Method {
    match *method {
        http::Method::GET => Method::Get,
        http::Method::HEAD => Method::Head,
        http::Method::POST => Method::Post,
        http::Method::PUT => Method::Put,
        http::Method::DELETE => Method::Delete,
        http::Method::CONNECT => Method::Connect,
        http::Method::OPTIONS => Method::Options,
        http::Method::TRACE => Method::Trace,
        http::Method::PATCH => Method::Patch,
        ref other => Method::Other(other.as_str().to_owned()),
    }
}

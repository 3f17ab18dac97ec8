//! HTTP requests and responses as NATS message payloads, for forwarding between
//! gateways.
//!
//! A payload is `LPT1`, the length of a JSON head as 4 bytes big-endian, the head
//! (method, URI, request id, time left, headers; or status and headers) and the body.
//! Header values travel byte for byte (each byte as one `U+0000..=U+00FF` char), so
//! nothing a client sent is lost or changed; hop-by-hop headers are dropped, and the
//! body's length is set from the body itself.

use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"LPT1";
/// Largest head accepted.
const MAX_HEAD: usize = 1 << 20;

/// Why a payload is not a request or response.
#[derive(Debug, thiserror::Error)]
#[error("malformed forwarded message: {0}")]
pub struct WireError(String);

fn bad(reason: impl Into<String>) -> WireError {
    WireError(reason.into())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestHead {
    method: String,
    uri: String,
    id: String,
    /// Milliseconds left before the request's deadline.
    left_ms: u64,
    headers: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseHead {
    status: u16,
    headers: Vec<(String, String)>,
}

/// A request as a node receives it from another node's gateway.
#[derive(Debug)]
pub struct Forwarded {
    /// The request, its body in memory.
    pub request: http::Request<Bytes>,
    /// The id the first gateway gave it.
    pub id: String,
    /// Time left before its deadline.
    pub left: Duration,
}

fn hop_by_hop(name: &http::HeaderName) -> bool {
    use http::header;
    [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::CONTENT_LENGTH,
    ]
    .contains(name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

fn encode_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.as_bytes().iter().map(|&b| char::from(b)).collect(),
            )
        })
        .collect()
}

fn decode_headers(
    pairs: Vec<(String, String)>,
    body_len: usize,
) -> Result<http::HeaderMap, WireError> {
    let mut headers = http::HeaderMap::with_capacity(pairs.len() + 1);
    for (name, value) in pairs {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(format!("header name {name:?}")))?;
        if hop_by_hop(&name) {
            continue;
        }
        let bytes = value
            .chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| bad("a header value past U+00FF")))
            .collect::<Result<Vec<u8>, _>>()?;
        let value = http::HeaderValue::from_bytes(&bytes)
            .map_err(|_| bad(format!("header value of {name}")))?;
        headers.append(name, value);
    }
    if body_len > 0 {
        headers.insert(http::header::CONTENT_LENGTH, body_len.into());
    }
    Ok(headers)
}

fn frame(head: &impl Serialize, body: &[u8]) -> Bytes {
    let head = serde_json::to_vec(head).unwrap_or_default();
    let mut out = BytesMut::with_capacity(8 + head.len() + body.len());
    out.put_slice(MAGIC);
    out.put_u32(u32::try_from(head.len()).unwrap_or(u32::MAX));
    out.put_slice(&head);
    out.put_slice(body);
    out.freeze()
}

fn unframe<T: serde::de::DeserializeOwned>(payload: &Bytes) -> Result<(T, Bytes), WireError> {
    let rest = payload
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| bad("no LPT1 prefix"))?;
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("truncated"))?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| bad("head length"))?;
    if len > MAX_HEAD {
        return Err(bad(format!("a head of {len} bytes")));
    }
    let start = 8_usize;
    let end = start.checked_add(len).ok_or_else(|| bad("head length"))?;
    let head = payload
        .get(start..end)
        .ok_or_else(|| bad("truncated head"))?;
    let head: T = serde_json::from_slice(head).map_err(|e| bad(format!("head: {e}")))?;
    Ok((head, payload.slice(end..)))
}

/// Encodes `parts` and `body` as a request with id `id` and `left` before its deadline.
pub fn encode_request(
    parts: &http::request::Parts,
    body: &[u8],
    id: &str,
    left: Duration,
) -> Bytes {
    let head = RequestHead {
        method: parts.method.as_str().to_owned(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        id: id.to_owned(),
        left_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        headers: encode_headers(&parts.headers),
    };
    frame(&head, body)
}

/// Decodes a request sent by [`encode_request`].
pub fn decode_request(payload: &Bytes) -> Result<Forwarded, WireError> {
    let (head, body): (RequestHead, Bytes) = unframe(payload)?;
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| bad(format!("method {:?}", head.method)))?;
    let uri: http::Uri = head
        .uri
        .parse()
        .map_err(|_| bad(format!("URI {:?}", head.uri)))?;
    if uri.scheme().is_some() || !uri.path().starts_with('/') {
        return Err(bad(format!("URI {:?} is not origin-form", head.uri)));
    }
    let id_ok = !head.id.is_empty()
        && head.id.len() <= 64
        && head
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err(bad("request id"));
    }
    let headers = decode_headers(head.headers, body.len())?;
    let mut request = http::Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(Forwarded {
        request,
        id: head.id,
        // No function runs longer than the longest timeout: a larger figure (from a
        // hostile bus member) must not overflow a deadline.
        left: Duration::from_millis(head.left_ms).min(crate::locked::MAX_TIMEOUT),
    })
}

/// Encodes a response.
pub fn encode_response(status: http::StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Bytes {
    let head = ResponseHead {
        status: status.as_u16(),
        headers: encode_headers(headers),
    };
    frame(&head, body)
}

/// Decodes a response sent by [`encode_response`].
pub fn decode_response(payload: &Bytes) -> Result<http::Response<Bytes>, WireError> {
    let (head, body): (ResponseHead, Bytes) = unframe(payload)?;
    let status = http::StatusCode::from_u16(head.status)
        .map_err(|_| bad(format!("status {}", head.status)))?;
    let headers = decode_headers(head.headers, body.len())?;
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &[u8])]) -> http::request::Parts {
        let mut builder = http::Request::builder().method("POST").uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, http::HeaderValue::from_bytes(value).expect("value"));
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn a_request_round_trips_byte_for_byte() {
        let p = parts(
            "/detect?x=1&y=%20",
            &[
                ("x-a", b"one"),
                ("x-a", b"two"),
                ("x-latin", b"caf\xe9"),
                ("transfer-encoding", b"chunked"),
                ("connection", b"close"),
            ],
        );
        let payload = encode_request(&p, b"body\0bytes", "abc-1", Duration::from_millis(1234));
        let forwarded = decode_request(&payload).expect("decodes");
        let request = &forwarded.request;
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.uri(), "/detect?x=1&y=%20");
        assert_eq!(forwarded.id, "abc-1");
        assert_eq!(forwarded.left, Duration::from_millis(1234));
        let a: Vec<_> = request.headers().get_all("x-a").iter().collect();
        assert_eq!(a, ["one", "two"]);
        assert_eq!(request.headers()["x-latin"].as_bytes(), b"caf\xe9");
        assert!(!request.headers().contains_key("transfer-encoding"));
        assert!(!request.headers().contains_key("connection"));
        assert_eq!(request.headers()["content-length"], "10");
        assert_eq!(request.body().as_ref(), b"body\0bytes");
    }

    #[test]
    fn a_response_round_trips() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-lepton-request-id", "r-1".parse().expect("value"));
        let payload = encode_response(http::StatusCode::IM_A_TEAPOT, &headers, b"short");
        let response = decode_response(&payload).expect("decodes");
        assert_eq!(response.status(), 418);
        assert_eq!(response.headers()["x-lepton-request-id"], "r-1");
        assert_eq!(response.body().as_ref(), b"short");
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let good = encode_request(&parts("/a", &[]), b"", "id", Duration::ZERO);
        for n in 0..good.len() {
            let _ = decode_request(&good.slice(..n)); // never panics
        }
        let cases: Vec<Bytes> = vec![
            Bytes::from_static(b""),
            Bytes::from_static(b"LPT1"),
            Bytes::from_static(b"LPT1\xff\xff\xff\xff{}"),
            Bytes::from_static(b"XXXX\0\0\0\x02{}"),
            frame(
                &serde_json::json!({"method": "GET", "uri": "http://evil/", "id": "a", "left_ms": 1, "headers": []}),
                b"",
            ),
            frame(
                &serde_json::json!({"method": "GET", "uri": "/", "id": "a b", "left_ms": 1, "headers": []}),
                b"",
            ),
            frame(
                &serde_json::json!({"method": "GET", "uri": "/", "id": "a", "left_ms": 1, "headers": [["x", "\u{100}"]]}),
                b"",
            ),
            frame(
                &serde_json::json!({"method": "GET", "uri": "/", "id": "a", "left_ms": 1, "headers": [["bad name", "v"]]}),
                b"",
            ),
        ];
        for case in cases {
            assert!(decode_request(&case).is_err(), "{case:?}");
        }
        assert!(
            decode_response(&frame(
                &serde_json::json!({"status": 1000, "headers": []}),
                b""
            ))
            .is_err()
        );
        let forever = frame(
            &serde_json::json!({"method": "GET", "uri": "/", "id": "a", "left_ms": u64::MAX, "headers": []}),
            b"",
        );
        let forwarded = decode_request(&forever).expect("decodes");
        assert_eq!(forwarded.left, crate::locked::MAX_TIMEOUT);
        let _ = tokio::time::Instant::now() + forwarded.left; // no overflow
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut payload = b"LPT1".to_vec();
            payload.extend_from_slice(&bytes);
            let payload = Bytes::from(payload);
            let _ = decode_request(&payload);
            let _ = decode_response(&payload);
        }
    }
}

//! The status page: one HTML file with its script and styles inline, embedded in the
//! binary (no CDN, works offline). It reads `/v1/stats` and `/v1/apps` with the
//! admin token, which it takes from the URL fragment (`/#token=...`, never
//! sent to the server) or asks for, and keeps in the tab's `sessionStorage`.

use bytes::Bytes;

/// The page.
pub const HTML: &str = include_str!("page.html");

/// `GET /` on the admin listener.
pub fn response() -> hyper::Response<crate::http::Body> {
    let mut response = hyper::Response::new(crate::http::full(Bytes::from_static(HTML.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing but this page's own inline script and its calls to this origin.
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        http::HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

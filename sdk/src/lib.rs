//! Write Lepton functions in Rust.
//!
//! A Lepton function is a WebAssembly component that exports the standard
//! `wasi:http/incoming-handler` interface; this crate turns a plain function from
//! [`Request`] to [`Response`] (the [`http`] crate's types with a byte body) into
//! such a component. The component runs unchanged on `wasmtime serve` or any other
//! `wasi:http` host.
//!
//! ```no_run
//! use lepton_sdk::{Request, Response};
//!
//! fn hello(req: Request) -> Response {
//!     let who = std::env::var("GREETING").unwrap_or_else(|_| "Hello from Lepton".into());
//!     let _ = req.uri().path();
//!     Response::new(format!("{who}\n").into_bytes())
//! }
//!
//! lepton_sdk::http_handler!(hello);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and name the
//! resulting `.wasm` in `lepton.toml`.
//!
//! What the function may reach is decided by its manifest entry: environment
//! variables, read-only directories and outbound hosts are denied unless granted.
//! [`outbound::send`] makes an outgoing HTTP request; a host that is not in
//! `allowed_outbound_hosts` answers it with an error. [`nn`] runs the models the
//! manifest grants through the standard `wasi:nn` interfaces, and [`train`] trains
//! the ones it declares as trainers through Lepton's `lepton:nn/training`. [`kv`]
//! opens the key-value stores it is granted (`wasi:keyvalue`), and [`config`] reads
//! its configuration (`wasi:config`).
#![deny(missing_docs)]

pub use http;

mod bindings;
pub mod config;
pub mod kv;
pub mod nn;
pub mod outbound;
pub mod train;
mod wasi_http;

/// An incoming HTTP request, with its body read in full.
pub type Request = http::Request<Vec<u8>>;

/// The HTTP response a handler returns.
pub type Response = http::Response<Vec<u8>>;

/// A plain-text response (`text/plain; charset=utf-8`).
pub fn text_response(status: http::StatusCode, body: impl Into<String>) -> Response {
    let mut response = Response::new(body.into().into_bytes());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A 405 answer naming the methods the handler takes (`allow`, e.g. `"POST"`).
pub fn method_not_allowed(allow: &'static str, message: impl Into<String>) -> Response {
    let mut response = text_response(http::StatusCode::METHOD_NOT_ALLOWED, message);
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

/// A 200 response carrying `body` as `application/json`.
pub fn json_response(body: Vec<u8>) -> Response {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[doc(hidden)]
pub mod __private {
    pub use wasip2;

    pub use crate::wasi_http::serve;
}

/// Exports a function `fn(Request) -> Response` as the component's
/// `wasi:http/incoming-handler`.
///
/// Use it once per component, at the crate root.
#[macro_export]
macro_rules! http_handler {
    ($handler:path) => {
        #[doc(hidden)]
        struct __LeptonHttpHandler;

        impl $crate::__private::wasip2::exports::http::incoming_handler::Guest for __LeptonHttpHandler {
            fn handle(
                request: $crate::__private::wasip2::http::types::IncomingRequest,
                response_out: $crate::__private::wasip2::http::types::ResponseOutparam,
            ) {
                $crate::__private::serve($handler, &request, response_out);
            }
        }

        $crate::__private::wasip2::http::proxy::export!(
            __LeptonHttpHandler with_types_in $crate::__private::wasip2
        );
    };
}

//! `hello`: the smallest Lepton function. Answers `Hello from Lepton`, or the
//! `GREETING` environment variable when the manifest grants one.

use lepton_sdk::{Request, Response};

fn hello(_request: Request) -> Response {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello from Lepton".to_owned());
    Response::new(format!("{greeting}\n").into_bytes())
}

lepton_sdk::http_handler!(hello);

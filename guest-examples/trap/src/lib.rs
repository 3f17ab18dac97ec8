//! `trap`: panics on every request after printing to stderr (the host must answer
//! 500 with a request id, log the guest's output, and keep serving).

use lepton_sdk::{Request, Response};

fn trap(_request: Request) -> Response {
    eprintln!("trap: about to panic with a secret internal detail");
    panic!("guest internals: secret-detail-42");
}

lepton_sdk::http_handler!(trap);

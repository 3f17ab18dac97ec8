//! `spin`: never returns (the host must cut it off at the function's `timeout`).

use lepton_sdk::{Request, Response};

fn spin(request: Request) -> Response {
    let mut n: u64 = request.body().len() as u64;
    loop {
        n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        if n == 0 && request.uri().path() == "/never" {
            return Response::new(Vec::new());
        }
    }
}

lepton_sdk::http_handler!(spin);

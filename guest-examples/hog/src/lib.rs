//! `hog`: grows its linear memory 1 MiB at a time until the host refuses.
//!
//! `GET /hog` answers `allocated N MiB` once an allocation fails (the grow failed
//! inside the guest); `GET /hog/abort` allocates infallibly, so the failure aborts
//! the guest (a trap).

use lepton_sdk::{Request, Response};

const MIB: usize = 1 << 20;

fn hog(request: Request) -> Response {
    let abort = request.uri().path().ends_with("/abort");
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        if abort {
            blocks.push(vec![1u8; MIB]);
            continue;
        }
        let mut block = Vec::new();
        if block.try_reserve_exact(MIB).is_err() {
            break;
        }
        block.resize(MIB, 1u8);
        blocks.push(block);
        if blocks.len() > 64 * 1024 {
            break;
        }
    }
    Response::new(format!("allocated {} MiB\n", blocks.len()).into_bytes())
}

lepton_sdk::http_handler!(hog);

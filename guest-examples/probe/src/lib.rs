//! `probe`: tries to reach what the manifest may or may not grant, and reports.
//!
//! - `GET /probe/env?NAME` reads environment variable `NAME`;
//! - `GET /probe/file?/path` reads a file;
//! - `GET /probe/write?/path` tries to create a file;
//! - `GET /probe/http?http://host:port/path` makes an outgoing request;
//! - `GET /probe/tcp?127.0.0.1:port` opens a TCP socket;
//! - `POST /probe/echo` answers the request body's length;
//! - `GET /probe/stdout` prints a line to stdout;
//! - `GET /probe/flood?N` prints `N` lines of 1 KiB to stderr;
//! - `GET /probe/pieces` writes one stderr line in pieces (a write per piece, each
//!   through a stream of its own), then an empty line, then text with no newline.
//!
//! Each answers 200 with `ok: ...` or 403 with `denied: ...`.

use lepton_sdk::{Request, Response, outbound};

fn answer(result: Result<String, String>) -> Response {
    let (status, body) = match result {
        Ok(value) => (200, format!("ok: {value}\n")),
        Err(error) => (403, format!("denied: {error}\n")),
    };
    let mut response = Response::new(body.into_bytes());
    *response.status_mut() = lepton_sdk::http::StatusCode::from_u16(status).unwrap_or_default();
    response
}

fn probe(request: Request) -> Response {
    let what = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
    let arg = request.uri().query().unwrap_or_default().to_owned();
    answer(match what.as_str() {
        "env" => std::env::var(&arg).map_err(|e| e.to_string()),
        "file" => std::fs::read_to_string(&arg).map_err(|e| e.to_string()),
        "write" => std::fs::write(&arg, b"x").map(|()| "written".to_owned()).map_err(|e| e.to_string()),
        "http" => lepton_sdk::http::Request::get(arg.as_str())
            .body(Vec::new())
            .map_err(|e| e.to_string())
            .and_then(|req| outbound::send(req).map_err(|e| e.to_string()))
            .map(|resp| format!("{} {}", resp.status().as_u16(), String::from_utf8_lossy(resp.body()))),
        "tcp" => std::net::TcpStream::connect(arg.as_str()).map(|_| "connected".to_owned()).map_err(|e| e.to_string()),
        "echo" => Ok(format!("{} bytes", request.body().len())),
        "stdout" => {
            println!("probe says hi on stdout");
            Ok("printed".to_owned())
        }
        "pieces" => {
            use std::io::Write as _;
            for piece in ["piece one", " two", " three\n", "\n", "tail without newline"] {
                // `stderr()` is unbuffered: every write is a `get-stderr()` stream of
                // its own.
                let _ = std::io::stderr().write_all(piece.as_bytes());
            }
            Ok("printed".to_owned())
        }
        "flood" => {
            let lines: usize = arg.parse().unwrap_or(0);
            let line = "f".repeat(1023);
            for _ in 0..lines {
                eprintln!("{line}");
            }
            Ok(format!("printed {lines} lines"))
        }
        other => Err(format!("unknown probe {other:?}")),
    })
}

lepton_sdk::http_handler!(probe);

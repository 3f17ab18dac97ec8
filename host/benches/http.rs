//! HTTP throughput and latency of the hello function, beside baselines measured in
//! the same run: a native hyper handler answering the same bytes, and `wasmtime serve`
//! on the same component when a `wasmtime` binary is found (`$WASMTIME` or `PATH`).
//!
//! ```text
//! cargo bench -p lepton-host --bench http            # 5 s per target and concurrency
//! BENCH_SECONDS=10 BENCH_CONNECTIONS=8,64 cargo bench -p lepton-host --bench http
//! ```
#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark may stop at the first failure"
)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use support::{Load, Server, print_header, report, run_load};

const BODY: &[u8] = b"Hello from Lepton\n";

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let connections: Vec<usize> = std::env::var("BENCH_CONNECTIONS")
        .unwrap_or_else(|_| "8,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let duration = Duration::from_secs(seconds);

    let state = tempfile::tempdir().unwrap();
    let manifest = state.path().join("lepton.toml");
    std::fs::write(
        &manifest,
        format!(
            "manifest_version = 1\n[function.hello]\ncomponent = {:?}\nroute = \"/hello\"\nmax_concurrency = 1000\n",
            lepton_test_artifacts::HELLO
        ),
    )
    .unwrap();
    let lepton = Server::lepton(&manifest, &[]);
    let native = native_server();
    let wasmtime = wasmtime_serve();

    let hello = |path| Load {
        path,
        body: None,
        expect: |b| b == BODY,
        headers: Vec::new(),
    };
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("hello function, {seconds} s per run, loopback, keep-alive connections");
    print_header();
    for &c in &connections {
        let native_figures = load.block_on(run_load(native, hello("/hello"), c, duration));
        report("native hyper (baseline)", c, &native_figures);
        let wasmtime_figures = wasmtime.as_ref().map(|server| {
            let figures = load.block_on(run_load(server.address, hello("/"), c, duration));
            report("wasmtime serve -S cli (baseline)", c, &figures);
            figures
        });
        let lepton_figures = load.block_on(run_load(lepton.address, hello("/hello"), c, duration));
        report("lepton up", c, &lepton_figures);
        println!(
            "  ratio lepton / native hyper: {:.2}x throughput (goal >= 0.5x)",
            lepton_figures.requests_per_second / native_figures.requests_per_second
        );
        if let Some(figures) = wasmtime_figures {
            println!(
                "  ratio lepton / wasmtime serve: {:.2}x throughput (goal >= 1.2x)",
                lepton_figures.requests_per_second / figures.requests_per_second
            );
        }
    }
    if wasmtime.is_none() {
        println!("(no `wasmtime` binary found: set WASMTIME=/path/to/wasmtime for that baseline)");
    }
}

/// `wasmtime serve -S cli` on the hello component, when a `wasmtime` binary is there.
fn wasmtime_serve() -> Option<Server> {
    let binary = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    Command::new(&binary)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(&binary)
        .args([
            "serve",
            "-S",
            "cli",
            "--addr",
            &address.to_string(),
            lepton_test_artifacts::HELLO,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server {
        child,
        address,
        admin: None,
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(address).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(server)
}

/// A hyper server on its own two-thread runtime answering the same bytes.
fn native_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            BODY,
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    address
}

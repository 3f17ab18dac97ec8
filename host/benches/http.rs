//! HTTP throughput and latency of the hello function, beside baselines measured in
//! the same run: a native hyper handler answering the same bytes, and `wasmtime serve`
//! on the same component when a `wasmtime` binary is found (`$WASMTIME` or `PATH`).
//!
//! ```text
//! cargo bench -p lepton-host --bench http            # 5 s per target and concurrency
//! BENCH_SECONDS=10 BENCH_CONNECTIONS=8,64 cargo bench -p lepton-host --bench http
//! ```
#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![expect(clippy::unwrap_used, reason = "a benchmark may stop at the first failure")]

use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;

const BODY: &[u8] = b"Hello from Lepton\n";

struct Figures {
    requests_per_second: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
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
    let mut lepton = Server::lepton(&manifest);
    let native = native_server();
    let mut wasmtime = Server::wasmtime_serve();

    let load = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!("hello function, {seconds} s per run, loopback, keep-alive connections");
    println!("{:<34} {:>5} {:>10} {:>9} {:>9} {:>7}", "target", "conns", "req/s", "p50", "p99", "errors");
    for &c in &connections {
        let native_figures = load.block_on(run_load(native, "/hello", c, duration));
        report("native hyper (baseline)", c, &native_figures);
        let wasmtime_figures = wasmtime.as_ref().map(|server| {
            let figures = load.block_on(run_load(server.address, "/", c, duration));
            report("wasmtime serve -S cli (baseline)", c, &figures);
            figures
        });
        let lepton_figures = load.block_on(run_load(lepton.address, "/hello", c, duration));
        report("lepton up", c, &lepton_figures);
        println!(
            "  ratio lepton/native hyper: {:.2}x throughput (goal >= 0.5x)",
            lepton_figures.requests_per_second / native_figures.requests_per_second
        );
        if let Some(figures) = wasmtime_figures {
            println!(
                "  ratio lepton/wasmtime serve: {:.2}x throughput (goal >= 1.2x)",
                lepton_figures.requests_per_second / figures.requests_per_second
            );
        }
    }
    if wasmtime.is_none() {
        println!("(no `wasmtime` binary found: set WASMTIME=/path/to/wasmtime for that baseline)");
    }
    lepton.stop();
    if let Some(server) = wasmtime.as_mut() {
        server.stop();
    }
}

fn report(name: &str, connections: usize, f: &Figures) {
    println!(
        "{name:<34} {connections:>5} {:>10.0} {:>7.0}µs {:>7.0}µs {:>7}",
        f.requests_per_second,
        f.p50.as_secs_f64() * 1e6,
        f.p99.as_secs_f64() * 1e6,
        f.errors
    );
}

struct Server {
    child: Child,
    address: SocketAddr,
}

impl Server {
    fn lepton(manifest: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lepton"))
            .arg("up")
            .arg(manifest)
            .args(["--listen", "127.0.0.1:0"])
            .env("LEPTON_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let address = line.trim().strip_prefix("lepton: listening on http://").unwrap().parse().unwrap();
        Self { child, address }
    }

    fn wasmtime_serve() -> Option<Self> {
        let binary = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
        Command::new(&binary).arg("--version").output().ok().filter(|o| o.status.success())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(&binary)
            .args(["serve", "-S", "cli", "--addr", &address.to_string(), lepton_test_artifacts::HELLO])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(address).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self { child, address })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hyper server on its own two-thread runtime answering the same bytes.
fn native_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(BODY))))
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

/// `connections` keep-alive connections, each sending requests back to back for `duration`.
async fn run_load(address: SocketAddr, path: &'static str, connections: usize, duration: Duration) -> Figures {
    // Warm up: one request per connection's worth, not measured.
    let _ = one_connection(address, path, Duration::from_millis(300)).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(one_connection(address, path, duration)))
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e) = task.await.unwrap();
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pick = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1))).copied().unwrap_or_default();
    Figures {
        requests_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
        errors,
    }
}

async fn one_connection(address: SocketAddr, path: &'static str, duration: Duration) -> (Vec<Duration>, u64) {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut errors = 0;
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let started = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                if ok && body.is_ok_and(|b| b.as_ref() == BODY) {
                    latencies.push(started.elapsed());
                } else {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    (latencies, errors)
}

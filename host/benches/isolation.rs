//! Isolation under load: `/hello` latency at rest, beside the same while 20 requests spin
//! in another function (issue 9, item 5). The baseline is the at-rest run of the same
//! process; the goal is p99 ≤ 10 ms while they spin.
//!
//! ```text
//! cargo bench -p lepton-host --bench isolation
//! BENCH_SECONDS=10 BENCH_SPINNERS=20 cargo bench -p lepton-host --bench isolation
//! ```
#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark may stop at the first failure"
)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use support::{Load, Server, print_header, report, run_load};

fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let spinners: usize = env_or("BENCH_SPINNERS", 20);
    let duration = Duration::from_secs(seconds);
    let state = tempfile::tempdir().unwrap();
    let manifest = state.path().join("lepton.toml");
    std::fs::write(
        &manifest,
        format!(
            "manifest_version = 1\n\
             [function.hello]\ncomponent = {:?}\nroute = \"/hello\"\n\
             [function.spin]\ncomponent = {:?}\nroute = \"/spin\"\ntimeout = \"{}s\"\nmax_concurrency = {spinners}\n",
            lepton_test_artifacts::HELLO,
            lepton_test_artifacts::SPIN,
            seconds * 2 + 30,
        ),
    )
    .unwrap();
    let lepton = Server::lepton(&manifest, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hello = Load {
        path: "/hello",
        body: None,
        expect: |b| b == b"Hello from Lepton\n",
        headers: Vec::new(),
    };
    println!(
        "/hello, one connection, {seconds} s per run; {spinners} requests spinning in `spin` for the second"
    );
    print_header();
    let rest = runtime.block_on(run_load(lepton.address, hello.clone(), 1, duration));
    report("lepton up, at rest (baseline)", 1, &rest);
    let loaded = runtime.block_on(async {
        let address = lepton.address;
        let spinning: Vec<_> = (0..spinners)
            .map(|_| tokio::spawn(get(address, "/spin")))
            .collect();
        // Measure once every spinner is running.
        let started = Instant::now();
        while in_flight(address, "spin").await < spinners as u64 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "spinners never all ran"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let figures = run_load(address, hello.clone(), 1, duration).await;
        for task in spinning {
            task.abort();
        }
        figures
    });
    report(&format!("lepton up, {spinners} spinning"), 1, &loaded);
    println!(
        "  ratio spinning / at rest: p50 {:.2}x, p99 {:.2}x; p99 {:.2} ms (goal <= 10 ms)",
        loaded.p50.as_secs_f64() / rest.p50.as_secs_f64(),
        loaded.p99.as_secs_f64() / rest.p99.as_secs_f64(),
        loaded.p99.as_secs_f64() * 1e3,
    );
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One GET on a fresh connection; the body as text.
async fn get(address: std::net::SocketAddr, path: &str) -> String {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// `lepton_requests_in_flight` of `function`, from the metrics page.
async fn in_flight(address: std::net::SocketAddr, function: &str) -> u64 {
    let metrics = get(address, "/.well-known/lepton/metrics").await;
    let prefix = format!("lepton_requests_in_flight{{function=\"{function}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

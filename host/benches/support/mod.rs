//! Shared by the benches: starting `lepton up`, and a keep-alive HTTP load generator.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// Throughput and latency of one run.
pub struct Figures {
    pub requests_per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub errors: u64,
}

/// What each request sends, and how to tell a good answer.
#[derive(Clone)]
pub struct Load {
    pub path: &'static str,
    pub body: Option<Bytes>,
    pub expect: fn(&[u8]) -> bool,
    /// Headers each request carries besides Host.
    pub headers: Vec<(&'static str, String)>,
}

pub fn print_header() {
    println!(
        "{:<40} {:>5} {:>10} {:>9} {:>9} {:>7}",
        "target", "conns", "req/s", "p50", "p99", "errors"
    );
}

pub fn report(name: &str, connections: usize, f: &Figures) {
    println!(
        "{name:<40} {connections:>5} {:>10.0} {:>7.0}µs {:>7.0}µs {:>7}",
        f.requests_per_second,
        f.p50.as_secs_f64() * 1e6,
        f.p99.as_secs_f64() * 1e6,
        f.errors
    );
}

/// A child process serving HTTP.
pub struct Server {
    pub child: Child,
    pub address: SocketAddr,
    /// The admin API, for `lepton up`.
    #[allow(
        dead_code,
        reason = "each bench compiles this module; only the deploy bench reads it"
    )]
    pub admin: Option<String>,
}

impl Server {
    /// `lepton up MANIFEST` on a free port, waited for through its ready line.
    pub fn lepton(manifest: &std::path::Path, env: &[(&str, &str)]) -> Self {
        Self::lepton_with(&[manifest.as_os_str()], env)
    }

    /// `lepton up ARGS...` on free ports, waited for through its ready line.
    pub fn lepton_with(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lepton"))
            .arg("up")
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("LEPTON_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lepton");
        // The admin line comes first, then the ready line.
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let mut admin = None;
        while !line.starts_with("lepton: listening on ") {
            line.clear();
            if stdout.read_line(&mut line).expect("ready line") == 0 {
                break;
            }
            if let Some(url) = line.trim().strip_prefix("lepton: admin on ") {
                admin = Some(url.to_owned());
            }
        }
        let address = line
            .trim()
            .strip_prefix("lepton: listening on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no ready line: {line:?}"));
        Self {
            child,
            address,
            admin,
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `connections` keep-alive connections, each sending requests back to back for `duration`.
pub async fn run_load(
    address: SocketAddr,
    load: Load,
    connections: usize,
    duration: Duration,
) -> Figures {
    // Warm up, not measured.
    let _ = one_connection(address, load.clone(), Duration::from_millis(300)).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(one_connection(address, load.clone(), duration)))
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e) = task.await.expect("load task");
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Figures {
        requests_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        errors,
    }
}

/// The `q` quantile of sorted `values`.
pub fn quantile(values: &[Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

async fn one_connection(
    address: SocketAddr,
    load: Load,
    duration: Duration,
) -> (Vec<Duration>, u64) {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut errors = 0;
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let mut builder = hyper::Request::builder()
            .uri(load.path)
            .header(hyper::header::HOST, "localhost");
        for (name, value) in &load.headers {
            builder = builder.header(*name, value.as_str());
        }
        let request = match &load.body {
            Some(body) => builder.method("POST").body(Full::new(body.clone())),
            None => builder.method("GET").body(Full::new(Bytes::new())),
        }
        .expect("request");
        let started = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                if ok && body.is_ok_and(|b| (load.expect)(&b)) {
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

//! Inference through Lepton (the `detect` function on the real Magika model, over
//! HTTP) beside native ONNX Runtime on the same input, same library and the same
//! thread settings, measured in the same run.
//!
//! - latency at concurrency 1: `/detect` p50 against a native `Session::run` p50
//!   (goal <= 1.05x), with the HTTP + instantiation cost measured on `/hello`;
//! - throughput at concurrency 32: `/detect` with batching off and on, against native
//!   threads each looping single-request `run` calls on their own session (goal >= 1.0x).
//!
//! Needs `./setup.sh` (ONNX Runtime and the Magika model in `.cache/`).
//!
//! ```text
//! cargo bench -p lepton-host --bench nn
//! ```
#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark may stop at the first failure"
)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ort::session::Session;
use support::{Load, Server, print_header, quantile, report, run_load};

/// Sessions, and intra-op threads per session: the same for Lepton and the baseline.
const SESSIONS: usize = 2;
const THREADS: usize = 1;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let library = std::env::var("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".cache/onnxruntime/libonnxruntime.so"));
    let magika = root.join(".cache/models/magika");
    assert!(
        library.is_file() && magika.join("model.onnx").is_file(),
        "run ./setup.sh first"
    );

    // The request: 8 KiB of a real binary (a component); the model sees its first and
    // last 1024 bytes, as Magika's features take them.
    let file: Vec<u8> = std::fs::read(lepton_test_artifacts::HELLO)
        .unwrap()
        .into_iter()
        .take(8192)
        .collect();
    let features = magika_features(&file);

    // Native baseline.
    let env = ort::init_from(&library)
        .unwrap()
        .with_name("bench")
        .build()
        .unwrap();
    let mut sessions: Vec<Session> = (0..SESSIONS)
        .map(|_| session(&env, &magika.join("model.onnx")))
        .collect();
    let native_latencies = {
        let session = &mut sessions[0];
        let mut latencies = Vec::new();
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            let started = Instant::now();
            run(session, &features);
            latencies.push(started.elapsed());
        }
        latencies.sort_unstable();
        latencies
    };
    let native_throughput = {
        let deadline = Instant::now() + duration;
        let started = Instant::now();
        let runs: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = sessions
                .iter_mut()
                .map(|session| {
                    let features = &features;
                    scope.spawn(move || {
                        let mut n = 0;
                        while Instant::now() < deadline {
                            run(session, features);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        runs as f64 / started.elapsed().as_secs_f64()
    };
    drop(sessions);

    let dir = tempfile::tempdir().unwrap();
    let write_manifest = |name: &str, batch: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "manifest_version = 1\n\
                 [model.magika]\npath = {:?}\nsessions = {SESSIONS}\nthreads = {THREADS}\n{batch}\n\
                 [function.detect]\ncomponent = {:?}\nroute = \"/detect\"\nmodels = [\"magika\"]\nmax_concurrency = 256\n\
                 files = [{{ source = {:?}, destination = \"/magika\" }}]\n\
                 [function.hello]\ncomponent = {:?}\nroute = \"/hello\"\nmax_concurrency = 256\n",
                magika.join("model.onnx").display().to_string(),
                lepton_test_artifacts::DETECT,
                magika.display().to_string(),
                lepton_test_artifacts::HELLO,
            ),
        )
        .unwrap();
        path
    };
    let ort_env = [("ORT_DYLIB_PATH", library.to_str().unwrap())];
    let unbatched = Server::lepton(&write_manifest("plain.toml", ""), &ort_env);

    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let detect = Load {
        path: "/detect",
        body: Some(Bytes::from(file.clone())),
        expect: |b| b.starts_with(b"{\"label\""),
    };
    let hello = Load {
        path: "/hello",
        body: None,
        expect: |b| b == b"Hello from Lepton\n",
    };

    println!(
        "Magika ({} sessions x {} thread), input {} bytes, {seconds} s per run",
        SESSIONS,
        THREADS,
        file.len()
    );
    println!(
        "native ONNX Runtime Session::run, concurrency 1: p50 {:.0}µs p99 {:.0}µs",
        quantile(&native_latencies, 0.5).as_secs_f64() * 1e6,
        quantile(&native_latencies, 0.99).as_secs_f64() * 1e6
    );
    println!("native ONNX Runtime, {SESSIONS} threads looping run: {native_throughput:.0} runs/s");
    print_header();
    let hello1 = load.block_on(run_load(unbatched.address, hello, 1, duration));
    report("lepton /hello (HTTP + instance cost)", 1, &hello1);
    let detect1 = load.block_on(run_load(unbatched.address, detect.clone(), 1, duration));
    report("lepton /detect", 1, &detect1);
    let native_p50 = quantile(&native_latencies, 0.5).as_secs_f64();
    println!(
        "  ratio /detect p50 / native p50: {:.2}x; without the /hello cost: {:.2}x (goal <= 1.05x)",
        detect1.p50.as_secs_f64() / native_p50,
        (detect1.p50.as_secs_f64() - hello1.p50.as_secs_f64()) / native_p50
    );
    let detect32 = load.block_on(run_load(unbatched.address, detect.clone(), 32, duration));
    report("lepton /detect, batching off", 32, &detect32);
    println!(
        "  ratio / native loop: {:.2}x throughput (goal >= 1.0x)",
        detect32.requests_per_second / native_throughput
    );
    drop(unbatched);
    let batched = Server::lepton(
        &write_manifest(
            "batched.toml",
            "batch = { max_size = 32, max_wait = \"2ms\" }",
        ),
        &ort_env,
    );
    let batched32 = load.block_on(run_load(batched.address, detect, 32, duration));
    report("lepton /detect, batching on (32, 2ms)", 32, &batched32);
    println!(
        "  ratio / native loop: {:.2}x throughput (goal >= 1.0x)",
        batched32.requests_per_second / native_throughput
    );
}

fn session(env: &ort::environment::Environment, model: &Path) -> Session {
    Session::builder(env)
        .unwrap()
        .with_intra_threads(THREADS)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .commit_from_file(model)
        .unwrap()
}

fn run(session: &mut Session, features: &[i32]) {
    let input = ort::value::Tensor::from_array((vec![1i64, 2048], features.to_vec())).unwrap();
    let outputs = session.run(vec![("bytes", input.into_dyn())]).unwrap();
    std::hint::black_box(outputs.len());
}

/// Magika's input for `file`: the first and last 1024 bytes after trimming whitespace,
/// padded with 256 (the same tensor the `detect` guest builds for a file this size).
fn magika_features(file: &[u8]) -> Vec<i32> {
    let trimmed = file.trim_ascii();
    let mut features = vec![256i32; 2048];
    for (slot, &byte) in features[..1024].iter_mut().zip(trimmed.iter().take(1024)) {
        *slot = i32::from(byte);
    }
    let tail = &trimmed[trimmed.len().saturating_sub(1024)..];
    let offset = 2048 - tail.len();
    for (slot, &byte) in features[offset..].iter_mut().zip(tail) {
        *slot = i32::from(byte);
    }
    features
}

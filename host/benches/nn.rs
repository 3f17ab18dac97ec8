//! Inference through Lepton (the `detect` function on the real Magika model, over
//! HTTP) beside native ONNX Runtime on the same input, same library and the same
//! thread settings, measured in the same run.
//!
//! - latency at concurrency 1: `/detect` p50 against a native `Session::run` p50
//!   (goal <= 1.05x), with the HTTP + instantiation cost measured on `/hello`;
//! - throughput at concurrency 32: `/detect` with batching off and on, against native
//!   threads each looping single-request `run` calls on their own session (goal >= 1.0x);
//! - the Open Inference Protocol on the same model (`POST /v2/models/magika/infer`,
//!   binary tensor data as `tritonclient` sends it): p50 at concurrency 1 over native
//!   (goal: at most 60 µs more) and throughput at concurrency 32 (goal >= 0.95x native).
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
    let write_manifest = |name: &str, sessions: usize, batch: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "manifest_version = 1\n\
                 [model.magika]\npath = {:?}\nsessions = {sessions}\nthreads = {THREADS}\nprotocol = \"v2\"\n{batch}\n\
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
    let unbatched = Server::lepton(&write_manifest("plain.toml", SESSIONS, ""), &ort_env);

    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let detect = Load {
        path: "/detect",
        body: Some(Bytes::from(file.clone())),
        expect: |b| b.starts_with(b"{\"label\""),
        headers: Vec::new(),
    };
    // What tritonclient sends by default: the JSON header, then the input's bytes.
    let header = format!(
        r#"{{"inputs":[{{"name":"bytes","shape":[1,2048],"datatype":"INT32","parameters":{{"binary_data_size":{}}}}}],"parameters":{{"binary_data_output":true}}}}"#,
        features.len() * 4
    );
    let mut v2_body = header.clone().into_bytes();
    v2_body.extend(features.iter().flat_map(|f| f.to_le_bytes()));
    let v2 = Load {
        path: "/v2/models/magika/infer",
        body: Some(Bytes::from(v2_body)),
        expect: |b| b.starts_with(b"{\"model_name\""),
        headers: vec![("inference-header-content-length", header.len().to_string())],
    };
    // The protocol's own work per request, in process: parsing that body and writing
    // the answer (Magika's 214 scores, binary), without HTTP or the model.
    let wire_p50 = {
        let body = v2.body.clone().unwrap();
        let scores = lepton_host::nn::Tensor {
            dims: vec![1, 214],
            ty: lepton_host::nn::ElementType::Fp32,
            data: vec![0; 214 * 4],
        };
        let mut latencies = Vec::new();
        for _ in 0..20_000 {
            let started = Instant::now();
            let parsed =
                lepton_host::infer::wire::parse_request(&body, Some(header.len())).unwrap();
            std::hint::black_box(&parsed);
            let outputs = [("target_label".to_owned(), scores.clone(), true)];
            let encoded =
                lepton_host::infer::wire::encode_response("magika", "1", None, &outputs).unwrap();
            std::hint::black_box(encoded.body.len());
            latencies.push(started.elapsed());
        }
        latencies.sort_unstable();
        quantile(&latencies, 0.5)
    };
    let hello = Load {
        path: "/hello",
        body: None,
        expect: |b| b == b"Hello from Lepton\n",
        headers: Vec::new(),
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
    println!(
        "protocol parse + encode in process (binary, 8 KiB in, 214 scores out): p50 {:.1}µs",
        wire_p50.as_secs_f64() * 1e6
    );
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
    let v2_1 = load.block_on(run_load(unbatched.address, v2.clone(), 1, duration));
    report("lepton POST /v2/models/magika/infer", 1, &v2_1);
    println!(
        "  /v2 p50 - native p50: {:+.0}µs (goal <= +60µs); ratio {:.2}x",
        (v2_1.p50.as_secs_f64() - native_p50) * 1e6,
        v2_1.p50.as_secs_f64() / native_p50
    );
    let v2_32 = load.block_on(run_load(unbatched.address, v2.clone(), 32, duration));
    report("lepton /v2 infer, batching off", 32, &v2_32);
    println!(
        "  ratio / native loop: {:.2}x throughput (goal >= 0.95x)",
        v2_32.requests_per_second / native_throughput
    );
    let detect32 = load.block_on(run_load(unbatched.address, detect.clone(), 32, duration));
    report("lepton /detect, batching off", 32, &detect32);
    println!(
        "  ratio / native loop: {:.2}x throughput (goal >= 1.0x)",
        detect32.requests_per_second / native_throughput
    );
    drop(unbatched);
    // The same on one session: requests at concurrency 1 then always find the session
    // that ran the last one (with two, they alternate between the sessions' threads).
    let one_session = Server::lepton(&write_manifest("one.toml", 1, ""), &ort_env);
    let v2_one = load.block_on(run_load(one_session.address, v2.clone(), 1, duration));
    drop(one_session);
    report("lepton /v2 infer, 1 session", 1, &v2_one);
    println!(
        "  /v2 p50 - native p50: {:+.0}µs (goal <= +60µs); ratio {:.2}x",
        (v2_one.p50.as_secs_f64() - native_p50) * 1e6,
        v2_one.p50.as_secs_f64() / native_p50
    );
    let batched = Server::lepton(
        &write_manifest(
            "batched.toml",
            SESSIONS,
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
    let v2_batched = load.block_on(run_load(batched.address, v2, 32, duration));
    report("lepton /v2 infer, batching on (32, 2ms)", 32, &v2_batched);
    println!(
        "  ratio / native loop: {:.2}x throughput (goal >= 0.95x)",
        v2_batched.requests_per_second / native_throughput
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

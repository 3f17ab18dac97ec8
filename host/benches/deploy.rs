//! Deploying while serving, beside baselines measured in the same run:
//!
//! - deploy → first 200 of the new route with `lepton deploy` on a running node, with
//!   a cold compile cache and a warm one, against restarting `lepton up` on the same
//!   manifest (the only way before run-time deploys), cold and warm;
//! - the p99 latency of `/hello` under load (keep-alive, 8 connections) while the app
//!   is updated and rolled back in a loop, against its p99 at rest.
//!
//! ```text
//! cargo bench -p lepton-host --bench deploy
//! ```
#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark may stop at the first failure"
)]

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Load, Server, print_header, report, run_load};

fn write_app(dir: &Path, route: &str, greeting: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let manifest = dir.join("lepton.toml");
    std::fs::write(
        &manifest,
        format!(
            "manifest_version = 1\nname = {:?}\n[function.hello]\ncomponent = {:?}\nroute = {route:?}\n\
             max_concurrency = 1000\nenvironment = {{ GREETING = {greeting:?} }}\n",
            dir.file_name().unwrap().to_string_lossy(),
            lepton_test_artifacts::HELLO
        ),
    )
    .unwrap();
    manifest
}

fn deploy(server: &Server, state: &Path, manifest: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_lepton"))
        .args([
            "deploy",
            manifest.to_str().unwrap(),
            "--admin",
            server.admin.as_deref().unwrap(),
            "--state-dir",
        ])
        .arg(state)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_for_200(server: &Server, path: &str) {
    let url = format!("http://{}{path}", server.address);
    while !ureq::get(&url).call().is_ok_and(|r| r.status() == 200) {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let empty: [&std::ffi::OsStr; 2] = ["--state-dir".as_ref(), state.as_os_str()];

    // Run-time deploys: one node, three apps on the same component.
    let node = Server::lepton_with(&empty, &[]);
    let timed = |name: &str, route: &str| {
        let manifest = write_app(&root.path().join(name), route, name);
        let started = Instant::now();
        deploy(&node, &state, &manifest);
        wait_for_200(&node, route);
        started.elapsed()
    };
    let cold = timed("cold", "/cold");
    let warm = timed("warm", "/warm");

    // Baseline: restarting `lepton up` on a manifest, until its first 200.
    // Its state dir is `.lepton/` beside the manifest: a fresh one, then the same.
    let restart = |manifest: &Path| {
        let started = Instant::now();
        let server = Server::lepton(manifest, &[]);
        wait_for_200(&server, "/restart");
        started.elapsed()
    };
    let restart_manifest = write_app(&root.path().join("restart"), "/restart", "r");
    let restart_cold = restart(&restart_manifest);
    let restart_warm = restart(&restart_manifest);

    println!("deploy -> first 200 (ms)          ours   restart baseline   ratio");
    println!(
        "cold compile cache           {:>10.1} {:>15.1} {:>9.2}x",
        ms(cold),
        ms(restart_cold),
        ms(cold) / ms(restart_cold)
    );
    println!(
        "warm compile cache           {:>10.1} {:>15.1} {:>9.2}x",
        ms(warm),
        ms(restart_warm),
        ms(warm) / ms(restart_warm)
    );

    // Latency under load, at rest and while the app is updated in a loop.
    let manifest = write_app(&root.path().join("shop"), "/hello", "v0");
    deploy(&node, &state, &manifest);
    let hello = Load {
        path: "/hello",
        body: None,
        expect: |b| b.starts_with(b"v"),
        headers: Vec::new(),
    };
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seconds = Duration::from_secs(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    println!();
    print_header();
    let rest = load.block_on(run_load(node.address, hello.clone(), 8, seconds));
    report("/hello at rest (baseline)", 8, &rest);
    let stop = Arc::new(AtomicBool::new(false));
    let deploys = Arc::new(AtomicUsize::new(0));
    let updater = {
        let (stop, deploys, state, dir) = (
            Arc::clone(&stop),
            Arc::clone(&deploys),
            state.clone(),
            root.path().join("shop"),
        );
        let admin = node.admin.clone().unwrap();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let manifest = write_app(&dir, "/hello", &format!("v{i}"));
                let status = Command::new(env!("CARGO_BIN_EXE_lepton"))
                    .args([
                        "deploy",
                        manifest.to_str().unwrap(),
                        "--admin",
                        &admin,
                        "--state-dir",
                    ])
                    .arg(&state)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success());
                deploys.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let during = load.block_on(run_load(node.address, hello, 8, seconds));
    stop.store(true, Ordering::Relaxed);
    updater.join().unwrap();
    report(
        &format!("/hello during {} deploys", deploys.load(Ordering::Relaxed)),
        8,
        &during,
    );
    println!(
        "p99 during deploys / at rest: {:.2}x; errors during deploys: {}",
        during.p99.as_secs_f64() / rest.p99.as_secs_f64(),
        during.errors
    );
}

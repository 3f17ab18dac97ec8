//! Time per training step of the digits MLP (64-32-10, ReLU, softmax cross-entropy,
//! AdamW lr 1e-2, batch 32) in Lepton's trainer (candle, in process, no HTTP) against
//! numpy doing the same math (`guest-examples/learn/train_numpy.py`), in the same run,
//! on the same batches from the same initial weights.
//!
//! Needs `./setup.sh` (the digits data, the initial model and the numpy venv).
//!
//! ```text
//! cargo bench -p lepton-host --bench train
//! ```
#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark may stop at the first failure"
)]

use std::path::Path;
use std::time::Instant;

use lepton_host::manifest::Manifest;
use lepton_host::nn::{ElementType, Tensor};
use lepton_host::train::Trainer;

const STEPS: usize = 300;
const WARMUP: usize = 10;
const BATCH: usize = 32;

fn main() {
    // As the `lepton` binary does at start.
    #[expect(unsafe_code, reason = "pin_candle_threads sets the environment")]
    // SAFETY: first thing in `main`, while this is the only thread.
    unsafe {
        lepton_host::train::pin_candle_threads();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join(".cache/models/digits/digits-mlp.onnx");
    let data = root.join(".cache/data/digits/train.json");
    let python = root.join(".cache/venv/bin/python");
    assert!(
        model.is_file() && data.is_file() && python.is_file(),
        "run ./setup.sh first"
    );

    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("lepton.toml");
    std::fs::write(
        &manifest,
        format!(
            "manifest_version = 1\n[trainer.digits]\ninit = {:?}\nloss = \"cross-entropy\"\noptimizer = {{ kind = \"adamw\", lr = 1e-2 }}\ncheckpoint_every = \"1h\"\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let manifest = Manifest::load(&manifest).unwrap();
    let spec = &manifest.app.trainers[0];

    let data: serde_json::Value = serde_json::from_slice(&std::fs::read(&data).unwrap()).unwrap();
    let images: Vec<Vec<f32>> = data["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32 / 16.0)
                .collect()
        })
        .collect();
    let labels: Vec<i64> = data["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    // Step i takes rows (i*B .. i*B+B) mod len, as the numpy script does.
    let batch = |step: usize| {
        let rows: Vec<usize> = (0..BATCH)
            .map(|i| (step * BATCH + i) % images.len())
            .collect();
        let pixels: Vec<u8> = rows
            .iter()
            .flat_map(|&r| images[r].iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        let targets: Vec<u8> = rows.iter().flat_map(|&r| labels[r].to_le_bytes()).collect();
        (
            vec![(
                "images".to_owned(),
                Tensor {
                    dims: vec![BATCH as u32, 64],
                    ty: ElementType::Fp32,
                    data: pixels,
                },
            )],
            Tensor {
                dims: vec![BATCH as u32],
                ty: ElementType::I64,
                data: targets,
            },
        )
    };

    // Warm-up on a throwaway trainer, then the timed run from the initial weights.
    let mut warm = Trainer::load(spec, &model, &dir.path().join("warm")).unwrap();
    for step in 0..WARMUP {
        let (inputs, targets) = batch(step);
        warm.step(&inputs, &targets).unwrap();
    }
    drop(warm);
    let batches: Vec<_> = (0..STEPS).map(batch).collect();
    let mut trainer = Trainer::load(spec, &model, &dir.path().join("timed")).unwrap();
    let started = Instant::now();
    let mut loss = 0.0;
    for (inputs, targets) in &batches {
        loss = trainer.step(inputs, targets).unwrap();
    }
    let lepton_us = started.elapsed().as_secs_f64() * 1e6 / STEPS as f64;

    let output = std::process::Command::new(&python)
        .arg(root.join("guest-examples/learn/train_numpy.py"))
        .args(["--steps", &STEPS.to_string(), "--batch", &BATCH.to_string()])
        .current_dir(&root)
        .output()
        .unwrap();
    let numpy = String::from_utf8_lossy(&output.stdout);
    let numpy_us: f64 = numpy
        .trim()
        .strip_prefix("numpy: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|us| us.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "unexpected numpy output {numpy:?} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });

    println!(
        "digits MLP 64-32-10, batch {BATCH}, AdamW lr 1e-2, {STEPS} steps after {WARMUP} warm-up steps"
    );
    println!("lepton trainer (candle, CPU): {lepton_us:.1} us/step, final loss {loss:.4}");
    println!("{}", numpy.trim());
    println!(
        "ratio lepton / numpy: {:.2}x time per step (goal <= 1.5x PyTorch; numpy stands in)",
        lepton_us / numpy_us
    );
}

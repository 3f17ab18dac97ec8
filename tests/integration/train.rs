//! Training (`lepton:nn/training`): rejected graphs, input validation, grants,
//! publishing, checkpoints across a kill -9, and learning digits over HTTP.

use crate::onnx::one_node_model;
use crate::util::{Lepton, Project, manifest, root, tensor_line as line};

/// The untrained digits MLP that `./setup.sh` generates (64 -> 32 -> 10).
pub fn digits_model() -> String {
    root()
        .join(".cache/models/digits/digits-mlp.onnx")
        .display()
        .to_string()
}

fn check_error(model: Vec<u8>) -> String {
    let project = Project::new(&manifest(
        "[trainer.bad]\ninit = \"bad.onnx\"\nloss = \"mse\"\noptimizer = { kind = \"sgd\", lr = 0.1 }\n",
    ));
    std::fs::write(project.path("bad.onnx"), model).expect("write model");
    let (status, _, stderr) = project.run(&["check"]);
    assert!(!status.success(), "check accepted the graph");
    let start = stderr
        .find("error: ")
        .unwrap_or_else(|| panic!("no error in {stderr}"));
    stderr[start..].trim_end().to_owned()
}

#[test]
fn graphs_that_cannot_be_trained_are_rejected_at_start_naming_the_node() {
    assert_eq!(
        check_error(one_node_model("LSTM", "recurrent", &[], &[])),
        "error: trainer `bad`: node `recurrent` (op `LSTM`) cannot be trained: recurrent ops stop gradients in candle-onnx"
    );
    assert_eq!(
        check_error(one_node_model("BatchNormalization", "bn", &[], &[])),
        "error: trainer `bad`: node `bn` (op `BatchNormalization`) cannot be trained: training-mode batch normalization is not supported"
    );
    assert_eq!(
        check_error(one_node_model("MaxPool", "pool", &[], &[])),
        "error: trainer `bad`: node `pool` (op `MaxPool`) cannot be trained: pooling is not supported for training"
    );
    assert_eq!(
        check_error(one_node_model("Softmax", "probabilities", &[], &[])),
        "error: trainer `bad`: node `probabilities` (op `Softmax`) has no `axis`: gradients stop there in candle-onnx; set the axis"
    );
    assert_eq!(
        check_error(one_node_model("Relu", "relu", &[], &[("unused", 4)])),
        "error: trainer `bad`: gradients do not reach initializer `unused`: an op between it and the output does not propagate them"
    );
    assert_eq!(
        check_error(one_node_model("Relu", "relu", &[], &[])),
        "error: trainer `bad`: the graph has no float initializers to train"
    );
}

pub fn images(rows: u32, width: u32) -> String {
    let data: Vec<u8> = (0..rows * width)
        .flat_map(|i| ((i % 17) as f32 / 16.0).to_le_bytes())
        .collect();
    line("images", "FP32", &[rows, width], &data)
}

pub fn labels(values: &[i64]) -> String {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    line("targets", "I64", &[values.len() as u32], &data)
}

/// nnprobe granted trainer `digits` (publishing model `digits`) and model `digits`.
pub fn probe_project(extra_trainer: &str) -> Project {
    Project::new(&manifest(&format!(
        "[model.digits]\npath = {model:?}\n\
         [model.other]\npath = {model:?}\n\
         [trainer.digits]\ninit = {model:?}\nloss = \"cross-entropy\"\noptimizer = {{ kind = \"adamw\", lr = 1e-2 }}\npublishes = \"digits\"\n{extra_trainer}\n\
         [trainer.secret]\ninit = {model:?}\nloss = \"cross-entropy\"\noptimizer = {{ kind = \"sgd\", lr = 0.1, momentum = 0.9 }}\n\
         [function.nn]\ncomponent = \"{{NNPROBE}}\"\nroute = \"/nn/...\"\nmodels = [\"digits\"]\ntrainers = [\"digits\"]\n",
        model = digits_model()
    )))
}

fn start(project: &Project) -> Lepton {
    project.up_with_ort()
}

#[test]
fn bad_training_inputs_are_invalid_argument_errors_and_grants_hold() {
    let project = probe_project("");
    let lepton = start(&project);
    let step = |body: String| lepton.post("/nn/step/digits", body.as_bytes()).body;

    let ok = step(images(2, 64) + &labels(&[3, 7]));
    assert!(
        ok.starts_with("loss ") && ok.ends_with(" steps 1\n"),
        "{ok}"
    );
    assert_eq!(
        step(images(2, 64) + &labels(&[3, 12])),
        "error: ErrorCode::InvalidArgument: label 12 is out of range [0, 10)"
    );
    assert_eq!(
        step(images(2, 64) + &labels(&[3])),
        "error: ErrorCode::InvalidArgument: targets have dimensions [1], expected [2]"
    );
    assert_eq!(
        step(images(2, 63) + &labels(&[3, 7])),
        "error: ErrorCode::InvalidArgument: input `images` has dimensions [2, 63], the graph takes [None, Some(64)] (None: any)"
    );
    assert_eq!(
        step(line("images", "I32", &[1, 64], &[0; 256]) + &labels(&[3])),
        "error: ErrorCode::InvalidArgument: input `images` is INT32, the graph takes FP32"
    );
    assert_eq!(
        step(line("images", "FP32", &[1, 64], &[0; 8]) + &labels(&[3])),
        "error: ErrorCode::InvalidArgument: input `images`: tensor of dimensions [1, 64] and type FP32 needs 256 bytes, got 8"
    );
    assert_eq!(
        step(images(1, 64) + &line("targets", "FP32", &[1], &[0; 4])),
        "error: ErrorCode::InvalidArgument: cross-entropy targets are class indices (INT64 or INT32), got FP32"
    );
    // Nothing above was applied.
    assert!(step(images(2, 64) + &labels(&[1, 2])).ends_with(" steps 2\n"));
    // Grants: another trainer looks absent; publishing is limited to `publishes`.
    assert_eq!(
        lepton
            .post(
                "/nn/step/secret",
                (images(1, 64) + &labels(&[1])).as_bytes()
            )
            .body,
        "error: ErrorCode::NotFound: no trainer named \"secret\""
    );
    assert_eq!(
        lepton.post("/nn/publish/digits/other", b"").body,
        "error: ErrorCode::Security: trainer `digits` may not publish \"other\" (its `publishes` is Some(\"digits\"))"
    );
    assert_eq!(lepton.post("/nn/publish/digits/digits", b"").body, "ok\n");
}

#[test]
fn published_weights_serve_inference_with_the_same_loss_as_evaluate() {
    let project = probe_project("");
    let lepton = start(&project);
    let batch = images(4, 64) + &labels(&[0, 1, 2, 3]);
    for _ in 0..20 {
        assert!(
            lepton
                .post("/nn/step/digits", batch.as_bytes())
                .body
                .starts_with("loss ")
        );
    }
    let evaluated = lepton.post("/nn/evaluate/digits", batch.as_bytes()).body;
    let trainer_loss: f32 = evaluated
        .split(' ')
        .nth(1)
        .and_then(|l| l.parse().ok())
        .expect("loss");
    assert_eq!(lepton.post("/nn/publish/digits/digits", b"").body, "ok\n");
    // Inference through wasi:nn on the published weights: the same logits, so the same loss.
    let reply = lepton.post("/nn/compute/digits", images(4, 64).as_bytes());
    assert_eq!(reply.status, 200, "{reply:?}");
    let logits: Vec<f32> = {
        let hex = reply.body.split(' ').nth(3).expect("data").trim();
        (0..hex.len() / 8)
            .map(|i| {
                let bytes: Vec<u8> = (0..4)
                    .map(|j| {
                        u8::from_str_radix(&hex[8 * i + 2 * j..8 * i + 2 * j + 2], 16).expect("hex")
                    })
                    .collect();
                f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
            })
            .collect()
    };
    let inference_loss = logits
        .chunks(10)
        .zip([0usize, 1, 2, 3])
        .map(|(row, label)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            max + sum.ln() - row[label]
        })
        .sum::<f32>()
        / 4.0;
    assert!(
        (inference_loss - trainer_loss).abs() < 1e-4,
        "inference {inference_loss}, evaluate {trainer_loss}"
    );

    // Published weights outlive a restart (here a kill -9).
    let mut lepton = lepton;
    lepton.child.kill().expect("kill -9");
    lepton.child.wait().expect("wait");
    let restarted = start(&project);
    assert_eq!(
        restarted
            .post("/nn/compute/digits", images(4, 64).as_bytes())
            .body,
        reply.body
    );
}

pub fn steps_and_loss(reply: &str) -> (u64, f32) {
    let parts: Vec<&str> = reply.split_whitespace().collect();
    match parts.as_slice() {
        ["loss", loss, "steps", steps] => {
            (steps.parse().expect("steps"), loss.parse().expect("loss"))
        }
        _ => panic!("unexpected reply {reply:?}"),
    }
}

#[test]
fn kill_9_and_restart_resume_from_the_last_checkpoint() {
    let project = probe_project("checkpoint_every = \"1h\"");
    let batch = images(4, 64) + &labels(&[5, 6, 7, 8]);
    let at_checkpoint = {
        let mut lepton = start(&project);
        for _ in 0..10 {
            lepton.post("/nn/step/digits", batch.as_bytes());
        }
        assert_eq!(lepton.post("/nn/checkpoint/digits", b"").body, "ok\n");
        let at_checkpoint =
            steps_and_loss(&lepton.post("/nn/evaluate/digits", batch.as_bytes()).body);
        for _ in 0..3 {
            lepton.post("/nn/step/digits", batch.as_bytes());
        }
        lepton.child.kill().expect("kill -9");
        lepton.child.wait().expect("wait");
        at_checkpoint
    };
    assert_eq!(at_checkpoint.0, 10);
    let lepton = start(&project);
    let resumed = steps_and_loss(&lepton.post("/nn/evaluate/digits", batch.as_bytes()).body);
    assert_eq!(resumed.0, 10, "step count after restart");
    assert!(
        (resumed.1 - at_checkpoint.1).abs() < 1e-6,
        "weights after restart: {resumed:?} vs {at_checkpoint:?}"
    );
    assert_eq!(
        steps_and_loss(&lepton.post("/nn/step/digits", batch.as_bytes()).body).0,
        11
    );
}

#[test]
fn trainers_checkpoint_periodically() {
    let project = probe_project("checkpoint_every = \"1s\"");
    let batch = images(2, 64) + &labels(&[1, 2]);
    {
        let mut lepton = start(&project);
        for _ in 0..5 {
            lepton.post("/nn/step/digits", batch.as_bytes());
        }
        lepton.wait_for_log("checkpoint written trainer=digits steps=5");
        lepton.child.kill().expect("kill -9");
        lepton.child.wait().expect("wait");
    }
    let lepton = start(&project);
    assert_eq!(
        steps_and_loss(&lepton.post("/nn/evaluate/digits", batch.as_bytes()).body).0,
        5
    );
}

/// The `learn` example: the digits data that `./setup.sh` generates.
fn digits(split: &str) -> (Vec<serde_json::Value>, Vec<i64>) {
    let path = root().join(format!(".cache/data/digits/{split}.json"));
    let data: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("run ./setup.sh")).expect("json");
    let images = data["images"].as_array().expect("images").clone();
    let labels = data["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_i64().expect("label"))
        .collect();
    (images, labels)
}

fn accuracy(lepton: &Lepton, images: &[serde_json::Value], labels: &[i64]) -> f64 {
    let reply = lepton.post(
        "/classify",
        serde_json::json!({ "images": images })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let answer: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    let predicted = answer["labels"].as_array().expect("labels");
    let right = predicted
        .iter()
        .zip(labels)
        .filter(|(p, l)| p.as_i64() == Some(**l))
        .count();
    right as f64 / labels.len() as f64
}

fn learn_project() -> Project {
    Project::new(&manifest(&format!(
        "[model.digits]\npath = {model:?}\n\
         [trainer.digits]\ninit = {model:?}\nloss = \"cross-entropy\"\noptimizer = {{ kind = \"adamw\", lr = 1e-2 }}\npublishes = \"digits\"\n\
         [function.learn]\ncomponent = \"{{LEARN}}\"\nroute = \"/learn/...\"\ntrainers = [\"digits\"]\nmodels = [\"digits\"]\n\
         [function.classify]\ncomponent = \"{{LEARN}}\"\nroute = \"/classify\"\nmodels = [\"digits\"]\n",
        model = digits_model()
    )))
}

#[test]
fn learning_digits_over_http_reaches_90_percent_held_out_accuracy() {
    let (train_images, train_labels) = digits("train");
    let (test_images, test_labels) = digits("test");
    let project = learn_project();
    let lepton = start(&project);
    let before = accuracy(&lepton, &test_images, &test_labels);
    assert!(before < 0.3, "untrained accuracy {before}");

    let batch = 32;
    let mut last = serde_json::Value::Null;
    for step in 0..300 {
        let rows: Vec<usize> = (0..batch)
            .map(|i| (step * batch + i) % train_images.len())
            .collect();
        let body = serde_json::json!({
            "images": rows.iter().map(|&r| train_images[r].clone()).collect::<Vec<_>>(),
            "labels": rows.iter().map(|&r| train_labels[r]).collect::<Vec<_>>(),
        });
        let reply = lepton.post("/learn", body.to_string().as_bytes());
        assert_eq!(reply.status, 200, "step {step}: {reply:?}");
        last = serde_json::from_str(&reply.body).expect("json");
    }
    assert_eq!(last["steps"], 300);
    assert!(last["loss"].as_f64().expect("loss") < 0.5, "{last}");

    // Until published, inference still serves the untrained weights.
    assert!(accuracy(&lepton, &test_images, &test_labels) < 0.3);
    let published = lepton.post("/learn/publish", b"");
    assert_eq!(published.status, 200, "{published:?}");
    let after = accuracy(&lepton, &test_images, &test_labels);
    assert!(
        after >= 0.9,
        "held-out accuracy after 300 steps: {after} (before: {before})"
    );

    // Inference on the published weights gives the loss the trainer evaluates.
    let body = serde_json::json!({ "images": test_images, "labels": test_labels }).to_string();
    let evaluated: serde_json::Value =
        serde_json::from_str(&lepton.post("/learn/evaluate", body.as_bytes()).body).expect("json");
    let classified: serde_json::Value =
        serde_json::from_str(&lepton.post("/classify", body.as_bytes()).body).expect("json");
    let (e, c) = (
        evaluated["loss"].as_f64().expect("loss"),
        classified["loss"].as_f64().expect("loss"),
    );
    assert!((e - c).abs() < 1e-4, "evaluate {e}, inference {c}");
}

#[test]
fn learn_reports_bad_batches_as_client_errors() {
    let project = learn_project();
    let lepton = start(&project);
    let row = vec![0; 64];
    let out_of_range = lepton.post(
        "/learn",
        serde_json::json!({ "images": [row], "labels": [10] })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(out_of_range.status, 400);
    assert_eq!(
        out_of_range.body.trim_end(),
        "invalid-argument: label 10 is out of range [0, 10)"
    );
    let short_row = lepton.post("/learn", br#"{"images": [[1, 2, 3]], "labels": [1]}"#);
    assert_eq!(short_row.status, 400, "{short_row:?}");
    let checkpoint = lepton.post("/learn/checkpoint", b"");
    assert_eq!(
        (checkpoint.status, checkpoint.body.as_str()),
        (200, "{\"steps\":0}")
    );
}

#[test]
fn trainer_target_gpu_without_cuda_trains_on_the_cpu_and_says_so() {
    let project = probe_project("target = \"gpu\"");
    let lepton = start(&project);
    lepton.wait_for_log("training on the CPU");
    let reply = lepton
        .post(
            "/nn/step/digits",
            (images(1, 64) + &labels(&[4])).as_bytes(),
        )
        .body;
    assert!(reply.ends_with(" steps 1\n"), "{reply}");
}

#[test]
fn sigterm_checkpoints_the_trainers_that_changed() {
    let project = probe_project("checkpoint_every = \"1h\"");
    let batch = images(2, 64) + &labels(&[3, 4]);
    {
        let mut lepton = start(&project);
        for _ in 0..3 {
            lepton.post("/nn/step/digits", batch.as_bytes());
        }
        assert!(lepton.signal_and_wait("TERM").success());
    }
    let lepton = start(&project);
    assert_eq!(
        steps_and_loss(&lepton.post("/nn/evaluate/digits", batch.as_bytes()).body).0,
        3
    );
}

#[test]
fn a_batch_with_nan_is_refused_and_leaves_the_weights_alone() {
    // ReLU would hide a NaN in the loss while it reaches every first-layer weight.
    let project = probe_project("");
    let lepton = start(&project);
    let batch = images(2, 64) + &labels(&[3, 7]);
    let before = lepton.post("/nn/evaluate/digits", batch.as_bytes()).body;
    let mut pixels: Vec<u8> = (0..128)
        .flat_map(|i| ((i % 17) as f32 / 16.0).to_le_bytes())
        .collect();
    pixels[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    let poisoned = line("images", "FP32", &[2, 64], &pixels) + &labels(&[3, 7]);
    assert_eq!(
        lepton.post("/nn/step/digits", poisoned.as_bytes()).body,
        "error: ErrorCode::InvalidArgument: input `images` holds NaN: values must be finite"
    );
    let mut infinite = pixels.clone();
    infinite[40..44].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let infinite = line("images", "FP32", &[2, 64], &infinite) + &labels(&[3, 7]);
    assert!(
        lepton
            .post("/nn/step/digits", infinite.as_bytes())
            .body
            .contains("holds inf")
    );
    assert_eq!(
        lepton.post("/nn/evaluate/digits", batch.as_bytes()).body,
        before,
        "the weights did not move"
    );
    let ok = lepton.post("/nn/step/digits", batch.as_bytes()).body;
    assert!(
        ok.ends_with(" steps 1\n"),
        "refused steps are not counted: {ok}"
    );
}

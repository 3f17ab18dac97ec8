//! wasi-nn: tensors of every type in and out, grants, uploads, bad inputs, batching.

use crate::onnx::identity_model;
use crate::util::{Lepton, Project, manifest, tensor_line as line};

const ALL_TYPES: [(&str, &str); 7] = [
    ("a", "FP16"),
    ("b", "FP32"),
    ("c", "FP64"),
    ("d", "BF16"),
    ("e", "U8"),
    ("f", "I32"),
    ("g", "I64"),
];

fn element_size(ty: &str) -> usize {
    match ty {
        "U8" => 1,
        "FP16" | "BF16" => 2,
        "FP32" | "I32" => 4,
        _ => 8,
    }
}

/// A project serving nnprobe with an identity model `ident` over all types, a
/// second model `other` it is not granted, and `extra` manifest lines for the function.
fn project(extra: &str, model_extra: &str) -> Project {
    let project = Project::new(&manifest(&format!(
        "[model.ident]\npath = \"ident.onnx\"\n{model_extra}\n\
         [model.other]\npath = \"other.onnx\"\n\
         [function.nn]\ncomponent = \"{{NNPROBE}}\"\nroute = \"/nn/...\"\nmodels = [\"ident\"]\n{extra}\n"
    )));
    std::fs::write(project.path("ident.onnx"), identity_model(&ALL_TYPES, 3)).expect("write model");
    std::fs::write(
        project.path("other.onnx"),
        identity_model(&[("x", "FP32")], 1),
    )
    .expect("write model");
    project
}

fn start(project: &Project) -> Lepton {
    project.up_with_ort()
}

fn all_inputs(rows: u32, seed: u8) -> String {
    ALL_TYPES
        .iter()
        .map(|(name, ty)| {
            let len = rows as usize * 3 * element_size(ty);
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            line(name, ty, &[rows, 3], &data)
        })
        .collect()
}

#[test]
fn every_tensor_type_goes_in_and_comes_out_unchanged() {
    let project = project("", "");
    let lepton = start(&project);
    let inputs = all_inputs(2, 7);
    let reply = lepton.post("/nn/compute/ident", inputs.as_bytes());
    assert_eq!(reply.status, 200, "{reply:?}");
    let expected: String = inputs.lines().map(|l| format!("out_{l}\n")).collect();
    assert_eq!(reply.body, expected);
}

#[test]
fn only_granted_models_load_and_others_look_absent() {
    let project = project("", "");
    let lepton = start(&project);
    assert_eq!(lepton.get("/nn/load/ident").body, "ok\n");
    let not_granted = lepton.get("/nn/load/other");
    let unknown = lepton.get("/nn/load/nowhere");
    assert_eq!(not_granted.status, 400);
    assert_eq!(
        not_granted.body,
        "error: ErrorCode::NotFound: no model named \"other\""
    );
    assert_eq!(
        unknown.body,
        "error: ErrorCode::NotFound: no model named \"nowhere\""
    );
}

#[test]
fn loading_from_bytes_needs_allow_model_upload_and_is_capped() {
    let model = identity_model(&[("x", "FP32")], 1);
    let denied = start(&project("", ""));
    assert_eq!(
        denied.post("/nn/upload", &model).body,
        "error: ErrorCode::Security: loading a model from bytes is not allowed for this function (`allow_model_upload`)"
    );
    let allowed = start(&project(
        "allow_model_upload = true\nmax_model_upload_size = \"1KiB\"",
        "",
    ));
    assert_eq!(allowed.post("/nn/upload", &model).body, "ok\n");
    assert_eq!(allowed.post("/nn/upload-sdk", &model).body, "ok\n");
    assert!(
        denied
            .post("/nn/upload-sdk", &model)
            .body
            .starts_with("error: security: "),
        "SDK errors carry the code"
    );
    let too_large = allowed.post("/nn/upload", &vec![0u8; 2048]);
    assert!(
        too_large
            .body
            .starts_with("error: ErrorCode::TooLarge: model is 2048 bytes"),
        "{too_large:?}"
    );
    let garbage = allowed.post("/nn/upload", b"not an onnx model");
    assert!(
        garbage
            .body
            .starts_with("error: ErrorCode::InvalidEncoding: "),
        "{garbage:?}"
    );
    assert_eq!(allowed.get("/.well-known/lepton/health").status, 200);
}

#[test]
fn malformed_inputs_are_invalid_argument_errors() {
    let project = project("", "");
    let lepton = start(&project);
    let good = all_inputs(1, 1);
    let compute = |body: String| lepton.post("/nn/compute/ident", body.as_bytes()).body;

    let renamed = good.replacen("a FP16", "zz FP16", 1);
    assert_eq!(
        compute(renamed),
        "error: ErrorCode::InvalidArgument: unknown input `zz`; model `ident` takes `a`, `b`, `c`, `d`, `e`, `f`, `g`"
    );
    let missing: String = good.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        compute(missing),
        "error: ErrorCode::InvalidArgument: missing input `a`"
    );
    let wrong_type = good.replacen("b FP32", "b I32", 1);
    assert_eq!(
        compute(wrong_type),
        "error: ErrorCode::InvalidArgument: input `b` is INT32, the model takes FP32"
    );
    let wrong_shape = good.replacen("e U8 1,3 ", "e U8 3,1 ", 1);
    assert_eq!(
        compute(wrong_shape),
        "error: ErrorCode::InvalidArgument: input `e` has dimensions [3, 1], the model takes [-1, 3] (-1: any)"
    );
    let short = good.replacen("e U8 1,3 ", "e U8 1,3 ff", 1);
    assert_eq!(
        compute(short),
        "error: ErrorCode::InvalidArgument: input `e`: tensor of dimensions [1, 3] and type UINT8 needs 3 bytes, got 4"
    );
    // The server is unharmed.
    assert_eq!(
        lepton.post("/nn/compute/ident", good.as_bytes()).status,
        200
    );
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_rows_back() {
    let project = project(
        "max_concurrency = 64",
        "batch = { max_size = 64, max_wait = \"200ms\" }",
    );
    let lepton = start(&project);
    let url = lepton.url("/nn/compute/ident");
    let start = std::sync::Arc::new(std::sync::Barrier::new(16));
    let handles: Vec<_> = (0..16u8)
        .map(|seed| {
            let url = url.clone();
            let start = std::sync::Arc::clone(&start);
            std::thread::spawn(move || {
                let inputs = all_inputs(1 + u32::from(seed % 3), seed);
                start.wait();
                let reply = crate::util::reply(ureq::post(&url).send_bytes(inputs.as_bytes()));
                (inputs, reply)
            })
        })
        .collect();
    for handle in handles {
        let (inputs, reply) = handle.join().expect("thread");
        assert_eq!(reply.status, 200, "{reply:?}");
        let expected: String = inputs.lines().map(|l| format!("out_{l}\n")).collect();
        assert_eq!(reply.body, expected);
    }
    let runs = lepton.metric("lepton_model_runs_total", "ident");
    assert_eq!(lepton.metric("lepton_model_requests_total", "ident"), 16);
    assert!(
        runs < 16,
        "16 concurrent requests took {runs} runs: nothing was batched"
    );
}

#[test]
fn target_gpu_without_cuda_falls_back_to_cpu_and_says_so() {
    let project = project("", "target = \"gpu\"");
    let lepton = start(&project);
    let log = lepton.wait_for_log("running on the CPU");
    assert!(
        log.contains("target \"gpu\": CUDA is not available"),
        "{log}"
    );
    assert_eq!(
        lepton
            .post("/nn/compute/ident", all_inputs(1, 3).as_bytes())
            .status,
        200
    );
}

#[test]
fn a_missing_onnx_runtime_is_a_clear_startup_error() {
    let project = project("", "");
    let (status, stdout, stderr) = {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_lepton"))
            .args(["up", "--listen", "127.0.0.1:0"])
            .current_dir(project.dir.path())
            .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
            .output()
            .expect("run lepton");
        (
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert!(!status.success());
    assert_eq!(stdout, "");
    assert!(
        stderr.contains(
            "`models`: ORT_DYLIB_PATH is `/nonexistent/libonnxruntime.so`, which is not a file"
        ),
        "{stderr}"
    );
}

#[test]
fn a_guest_cannot_make_the_host_hold_more_tensor_data_than_its_memory_limit() {
    let project = project("memory_limit = \"16MiB\"", "");
    let lepton = start(&project);
    assert_eq!(lepton.get("/nn/hoard/4").body, "ok: holding 4\n");
    // 20 MiB of tensors held at once is over the 16 MiB budget: the guest traps.
    let reply = lepton.get("/nn/hoard/20");
    assert_eq!(reply.status, 500, "{reply:?}");
    lepton.wait_for_log("tensors held on the host would exceed 16777216 bytes");
    // Dropped tensors are refunded: the next request has its whole budget.
    assert_eq!(lepton.get("/nn/hoard/4").body, "ok: holding 4\n");
}

#[test]
fn onnx_runtime_is_found_beside_the_binary_without_the_variable() {
    // The project is a temp dir far from the checkout, `ORT_DYLIB_PATH` is unset: the
    // library `./setup.sh` put in the checkout the binary was built in is found.
    let project = project("", "");
    let lepton = project.up();
    let log = lepton.wait_for_log("ONNX Runtime loaded");
    assert!(
        log.contains(".cache/onnxruntime/libonnxruntime.so"),
        "{log}"
    );
    assert_eq!(
        lepton
            .post("/nn/compute/ident", all_inputs(1, 3).as_bytes())
            .status,
        200
    );
}

//! The Open Inference Protocol on declared models, driven by a real client:
//! `tritonclient[http]` from PyPI (in `.cache/venv`, installed by `./test.sh`), with
//! native ONNX Runtime (the `onnxruntime` wheel) as the reference for every answer.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{Project, json_reply, manifest, reply, root};

fn python() -> PathBuf {
    root().join(".cache/venv/bin/python")
}

fn client_script() -> PathBuf {
    root().join("tests/integration/v2_client.py")
}

/// Runs `v2_client.py ARGS...`; its one JSON line.
fn client(args: &[&str]) -> serde_json::Value {
    let output = Command::new(python())
        .arg(client_script())
        .args(args)
        .output()
        .expect("run the venv's python (./test.sh installs tritonclient into .cache/venv)");
    assert!(
        output.status.success(),
        "v2_client.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("one JSON line")
}

fn magika() -> PathBuf {
    root().join(".cache/models/magika/model.onnx")
}

/// A project serving an identity model of every datatype, Magika, an unexposed model
/// and one behind a token, with `/detect` beside them.
fn project() -> (Project, Vec<String>) {
    let project = Project::new("");
    let dir = project.dir.path();
    std::fs::copy(magika(), dir.join("magika.onnx")).expect("copy magika");
    let models: Vec<String> =
        serde_json::from_value(client(&["models", dir.to_str().expect("utf-8")]))
            .expect("model names");
    let mut text = String::new();
    for name in &models {
        text.push_str(&format!(
            "[model.{name}]\npath = \"{name}.onnx\"\nprotocol = \"v2\"\n"
        ));
    }
    text.push_str(
        "[model.magika]\npath = \"magika.onnx\"\nprotocol = \"v2\"\nbatch = { max_size = 8, max_wait = \"1ms\" }\n\
         [model.hidden]\npath = \"id-fp32.onnx\"\n\
         [model.secret]\npath = \"id-fp32.onnx\"\nprotocol = \"v2\"\ntoken_env = \"V2_TEST_TOKEN\"\n\
         [function.nn]\ncomponent = \"{NNPROBE}\"\nroute = \"/nn/...\"\nmodels = [\"hidden\", \"magika\"]\n",
    );
    std::fs::write(dir.join("lepton.toml"), manifest(&text)).expect("manifest");
    (project, models)
}

fn up(project: &Project) -> crate::util::Lepton {
    let library = crate::util::ort_library();
    project.up_with(
        &[],
        &[
            ("ORT_DYLIB_PATH", library.to_str().expect("utf-8")),
            ("V2_TEST_TOKEN", "s3cret"),
        ],
    )
}

#[test]
fn tritonclient_gets_native_answers_for_every_datatype_and_magika() {
    let (project, models) = project();
    let lepton = up(&project);
    let seen = client(&[
        "check",
        &lepton.address,
        project.dir.path().to_str().expect("utf-8"),
    ]);
    for datatype in [
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
        "BF16", "FP32", "FP64", "BYTES",
    ] {
        assert_eq!(seen[datatype], "ok", "{datatype}: {seen}");
    }
    assert_eq!(models.len(), 14);
    assert_eq!(seen["server"], "lepton");
    assert_eq!(seen["magika_version"], "1");
    // tritonclient gives the status as text.
    let status = |key: &str| {
        seen[key][0]
            .as_str()
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0)
    };
    let message = |key: &str| seen[key][1].as_str().unwrap_or_default().to_owned();
    assert_eq!(status("wrong_shape"), 400, "{seen}");
    assert!(
        message("wrong_shape").contains("has dimensions [3, 2047], the model takes [-1, 2048]"),
        "{seen}"
    );
    assert_eq!(status("wrong_type"), 400);
    assert!(
        message("wrong_type").contains("is INT64, the model takes INT32"),
        "{seen}"
    );
    assert_eq!(status("wrong_name"), 400);
    assert!(
        message("wrong_name").contains("unknown input `nope`"),
        "{seen}"
    );
    assert_eq!(status("wrong_output"), 400);
    assert!(
        message("wrong_output").contains("unknown output `nope`"),
        "{seen}"
    );
    // A model without `protocol` is as absent as one nobody declared.
    assert_eq!(status("hidden"), 404);
    assert_eq!(status("unknown"), 404);
    assert_eq!(
        message("hidden").replace("hidden", "X"),
        message("unknown").replace("no-such-model", "X")
    );
    assert_eq!(seen["hidden_ready"], false);
    assert_eq!(status("old_version"), 404);
    assert_eq!(status("no_token"), 401);
    assert_eq!(status("wrong_token"), 401);

    // The protocol's requests are counted, and run on the same model functions use.
    let runs_before = lepton.metric("lepton_model_requests_total", "magika");
    assert!(runs_before >= 3, "{runs_before}");
    assert_eq!(
        lepton.metric("lepton_infer_requests_total{class=\"2xx\"}", "magika"),
        3
    );
    assert_eq!(
        lepton.metric("lepton_infer_requests_total{class=\"4xx\"}", "magika"),
        4
    );
}

fn infer(lepton: &crate::util::Lepton, model: &str, body: &str) -> (u16, serde_json::Value) {
    json_reply(
        ureq::post(&lepton.url(&format!("/v2/models/{model}/infer")))
            .set("Content-Type", "application/json")
            .send_string(body),
    )
}

#[test]
fn bad_requests_get_a_json_error_and_the_server_keeps_serving() {
    let (project, _) = project();
    let lepton = up(&project);
    let x = |data: &str| {
        format!(r#"{{"inputs":[{{"name":"x","shape":[1,3],"datatype":"FP32","data":{data}}}]}}"#)
    };
    for (body, status, needle) in [
        ("not json".to_owned(), 400, "not a valid inference request"),
        (x("[1,2]"), 400, "has 2 elements, the shape needs 3"),
        (x(r#"[1,2,"3"]"#), 400, "is not a FP32 element"),
        (x("[[1,2,3]]").replace("FP32", "FP99"), 400, "unknown datatype"),
        (x("[1,2,3]").replace("[1,3]", "[3,1]"), 400, "has dimensions [3, 1], the model takes [-1, 3]"),
        (x("[1,2,3]").replace("\"x\"", "\"y\""), 400, "unknown input `y`"),
        (
            r#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}}]}"#.to_owned(),
            400,
            "binary_data_size is 12, but 0 bytes",
        ),
        (format!("[{}]", "[".repeat(200)), 400, "not a valid inference request"),
        // Nested data past JSON's depth limit, inside an input: refused, no stack overflow.
        (
            x(&format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000))),
            400,
            "`data`: recursion limit exceeded",
        ),
        // Parameter values are read only where known, and never echoed.
        (
            x("[1,2,3]").replacen("{", r#"{"parameters":{"binary_data_output":"SECRETSECRET","other":[[[1]]]},"#, 1),
            400,
            "parameter `binary_data_output` must be true or false",
        ),
    ] {
        let (code, answer) = infer(&lepton, "id-fp32", &body);
        assert_eq!(code, status, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{body}: {answer}");
        assert!(!error.contains("SECRET"), "{answer}");
    }
    // BYTES that ONNX string tensors cannot hold.
    let (code, answer) = infer(
        &lepton,
        "id-bytes",
        r#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"BYTES","data":["a","b\u0000","c"]}]}"#,
    );
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap_or_default().contains("NUL"),
        "{answer}"
    );
    // Methods, endpoints, compression.
    let get = reply(ureq::get(&lepton.url("/v2/models/id-fp32/infer")).call());
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));
    assert_eq!(
        reply(ureq::get(&lepton.url("/v2/models/id-fp32/nope")).call()).status,
        404
    );
    let gzip = ureq::post(&lepton.url("/v2/models/id-fp32/infer"))
        .set("Content-Encoding", "gzip")
        .send_bytes(b"x");
    assert_eq!(reply(gzip).status, 415);
    // A declared length past the cap is refused before the body is read.
    let huge = crate::util::raw_request(
        &lepton.address,
        "POST /v2/models/id-fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\nConnection: close\r\n\r\n",
    );
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    // Still serving, JSON in and out, the id echoed.
    let (code, answer) = infer(
        &lepton,
        "id-fp32",
        r#"{"id":"r-1","inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[[1,2.5,-3]]}]}"#,
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"model_name":"id-fp32","model_version":"1","id":"r-1",
            "outputs":[{"name":"y","datatype":"FP32","shape":[1,3],"data":[1.0,2.5,-3.0]}]})
    );
}

#[test]
fn models_and_versions_follow_deploys_and_v2_routes_are_reserved() {
    let (project, _) = project();
    let lepton = up(&project);
    let ready = |path: &str| reply(ureq::get(&lepton.url(path)).call()).status;
    assert_eq!(ready("/v2/models/magika/versions/1/ready"), 200);
    // A second deploy (Magika no longer exposed, the identity models kept) makes
    // version 2 active: version 1 is kept but not ready, Magika is gone.
    let text = std::fs::read_to_string(project.manifest()).expect("manifest");
    let changed = text.replacen(
        "path = \"magika.onnx\"\nprotocol = \"v2\"\n",
        "path = \"magika.onnx\"\n",
        1,
    );
    assert_ne!(changed, text);
    std::fs::write(project.manifest(), changed).expect("write");
    let (status, out, err) = lepton.client(&project, &["deploy"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(ready("/v2/models/magika/ready"), 404);
    assert_eq!(ready("/v2/models/id-int8/versions/2/ready"), 200);
    let old = json_reply(ureq::get(&lepton.url("/v2/models/id-int8/versions/1")).call());
    assert_eq!(old.0, 400, "{old:?}");
    assert!(
        old.1["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not ready"),
        "{old:?}"
    );
    let (_, metadata) = json_reply(ureq::get(&lepton.url("/v2/models/id-int8")).call());
    assert_eq!(metadata["versions"], serde_json::json!(["2"]));
    // Another app may not serve a model by a name already served.
    let other = Project::new(&format!(
        "manifest_version = 1\nname = \"other\"\n[model.id-int8]\npath = {:?}\nprotocol = \"v2\"\n",
        project.path("id-int8.onnx").display().to_string()
    ));
    let (status, out, err) = lepton.client(&other, &["deploy"]);
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains("already served under /v2/models/id-int8 by app"),
        "{err}"
    );
    // A model with a type wasi-nn cannot carry (strings) is not granted to a function:
    // refused at deploy, not at the guest's first call.
    let strings = Project::new(&manifest(&format!(
        "name = \"strings\"\n[model.words]\npath = {:?}\n\
         [function.w]\ncomponent = \"{{NNPROBE}}\"\nroute = \"/w\"\nmodels = [\"words\"]\n",
        project.path("id-bytes.onnx").display().to_string()
    )));
    let (status, out, err) = lepton.client(&strings, &["deploy"]);
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains("model `words` has input `x` of type BYTES, which wasi-nn cannot carry"),
        "{err}"
    );
    // Live and ready.
    assert_eq!(ready("/v2/health/live"), 200);
    assert_eq!(ready("/v2/health/ready"), 200);
}

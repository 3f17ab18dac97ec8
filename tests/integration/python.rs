//! Python functions: `guest-examples/python/` built from source with componentize-py
//! 0.25.1 (from PyPI, in `.cache/venv`, installed by `./test.sh`) against the
//! `lepton:function/python-guest` world and `sdk/python`, served by the real binary.
//! The Python Magika answers as the Rust `detect` does, through the same model.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::util::{Project, manifest, reply, root};

/// Builds `guest-examples/python/NAME/app.py` once per test run; its `.wasm`.
fn build(name: &'static str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<&'static str, PathBuf>>> =
        OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let out = root().join("target/guests/python");
    std::fs::create_dir_all(&out).expect("output dir");
    let wasm = out.join(format!("{name}.wasm"));
    let output = Command::new(root().join(".cache/venv/bin/componentize-py"))
        .arg("-d")
        .arg(root().join("wit"))
        .args(["-w", "lepton:function/python-guest", "componentize", "-p"])
        .arg(root().join("sdk/python"))
        .arg("-p")
        .arg(root().join("guest-examples/python").join(name))
        .args(["app", "-o"])
        .arg(&wasm)
        .output()
        .expect("run componentize-py (./test.sh installs it into .cache/venv)");
    assert!(
        output.status.success(),
        "componentize-py {name}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    built.insert(name, wasm.clone());
    wasm
}

#[test]
fn python_hello_reads_config_counts_in_a_store_and_echoes_the_request() {
    let hello = build("hello");
    let project = Project::new(&manifest(&format!(
        "[function.py]\ncomponent = {:?}\nroute = \"/py/...\"\nkey_value_stores = [\"default\"]\n\
         config = {{ greeting = \"Hi from wasi:config\" }}\n\
         [function.plain]\ncomponent = {:?}\nroute = \"/plain/...\"\n",
        hello.display().to_string(),
        hello.display().to_string()
    )));
    let lepton = project.up();
    let answer = reply(ureq::post(&lepton.url("/py/hello")).send_bytes(&[7u8; 100_000]));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body,
        "Hi from wasi:config (POST /py/hello, 100000 bytes)\n"
    );
    for expected in ["1\n", "2\n"] {
        assert_eq!(
            reply(ureq::post(&lepton.url("/py/hello/count")).call()).body,
            expected
        );
    }
    // The same component granted nothing: the default greeting, and its store call
    // fails inside the guest (a 500 from the SDK), not the host.
    assert_eq!(
        lepton.get("/plain/x").body,
        "Hello from Python (GET /plain/x, 0 bytes)\n"
    );
    let denied = reply(ureq::post(&lepton.url("/plain/count")).call());
    assert_eq!(denied.status, 500, "{}", denied.body);
    assert!(denied.body.contains("KvError"), "{}", denied.body);
    assert_eq!(lepton.get("/py/hello").status, 200);
}

#[test]
fn python_magika_answers_as_the_rust_detect_does() {
    let detect = build("detect");
    let magika = root().join(".cache/models/magika");
    let project = Project::new(&manifest(&format!(
        "[model.magika]\npath = {:?}\n\
         [function.detect]\ncomponent = \"{{DETECT}}\"\nroute = \"/detect\"\nmodels = [\"magika\"]\n\
         files = [{{ source = {:?}, destination = \"/magika\" }}]\n\
         [function.pydetect]\ncomponent = {:?}\nroute = \"/pydetect\"\nmodels = [\"magika\"]\n\
         files = [{{ source = {:?}, destination = \"/magika\" }}]\n",
        magika.join("model.onnx").display().to_string(),
        magika.display().to_string(),
        detect.display().to_string(),
        magika.display().to_string()
    )));
    let lepton = project.up_with_ort();
    let samples: Vec<Vec<u8>> = vec![
        std::fs::read(root().join("host/src/kv/mod.rs")).expect("rust"),
        std::fs::read(root().join("README.md")).expect("markdown"),
        std::fs::read(root().join("sdk/python/lepton/nn.py")).expect("python"),
        std::fs::read(root().join("Cargo.lock")).expect("toml"),
        std::fs::read(root().join("docs/status-page.png")).expect("png"),
        b"hi".to_vec(),
        Vec::new(),
        b"   \n\n\n   \x00\x01\x02 binary-ish tail \xff\xfe".to_vec(),
    ];
    for sample in &samples {
        for mode in ["high-confidence", "best-guess"] {
            let ask = |path: &str| {
                let (status, value) = crate::util::json_reply(
                    ureq::post(&lepton.url(&format!("{path}?mode={mode}"))).send_bytes(sample),
                );
                assert_eq!(status, 200, "{path}: {value}");
                value
            };
            let (rust, python) = (ask("/detect"), ask("/pydetect"));
            assert_eq!(rust["label"], python["label"], "{rust} {python}");
            assert_eq!(rust["dl_label"], python["dl_label"], "{rust} {python}");
            let (a, b) = (
                rust["score"].as_f64().unwrap_or(-1.0),
                python["score"].as_f64().unwrap_or(-2.0),
            );
            assert!((a - b).abs() < 1e-6, "{rust} {python}");
        }
    }
    let wrong = reply(ureq::get(&lepton.url("/pydetect")).call());
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("POST")));
}

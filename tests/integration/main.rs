//! Integration tests: the real `lepton` binary on `127.0.0.1:0`, real components
//! built from `guest-examples/`, real HTTP requests.

mod onnx;
mod python;
mod util;

mod adversarial;
mod caps;
mod cli;
mod cluster;
mod deploy;
mod detect;
mod inference;
mod kv;
mod limits;
mod manifest;
mod nn;
mod ops;
mod serve;
mod train;

/// Every guest example is exercised by at least one test here.
#[test]
fn every_guest_has_a_host_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/integration");
    let mut sources = String::new();
    for entry in std::fs::read_dir(&dir).expect("tests/integration exists") {
        let path = entry.expect("readable dir").path();
        if path.file_name().is_some_and(|n| n != "main.rs") {
            sources.push_str(&std::fs::read_to_string(&path).expect("readable test source"));
        }
    }
    for (name, _) in lepton_test_artifacts::ALL {
        // Tests name a guest's component as `{NAME}` in the manifests they write.
        let placeholder = format!("{{{}}}", name.to_uppercase().replace('-', "_"));
        assert!(
            sources.contains(&placeholder),
            "guest `{name}` has no host test (no manifest uses `{placeholder}`)"
        );
    }
}

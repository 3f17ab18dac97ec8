//! `lepton check`.

use crate::util::{Project, manifest};

#[test]
fn check_accepts_a_valid_manifest() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n\
         [function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n",
    ));
    let (status, stdout, stderr) = project.run(&["check"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        stdout,
        "ok: function `hello` serves /hello\nok: function `probe` serves /probe/...\nok: lepton.toml is valid\n"
    );
}

#[test]
fn check_rejects_a_file_that_is_not_a_component() {
    let project = Project::new(&manifest(
        "[function.bad]\ncomponent = \"core.wasm\"\nroute = \"/bad\"\n",
    ));
    // A valid core module, but not a component.
    std::fs::write(project.path("core.wasm"), b"\0asm\x01\0\0\0").expect("write");
    let (status, _, stderr) = project.run(&["check"]);
    assert!(!status.success());
    assert!(
        stderr.contains("error: function `bad`: `component`: not a valid WebAssembly component"),
        "{stderr}"
    );
}

#[test]
fn check_rejects_a_component_that_is_not_an_http_proxy() {
    let project = Project::new(&manifest(
        "[function.empty]\ncomponent = \"empty.wasm\"\nroute = \"/e\"\n",
    ));
    // The smallest component: a header and nothing else, so no `wasi:http` export.
    std::fs::write(project.path("empty.wasm"), b"\0asm\x0d\0\x01\0").expect("write");
    let (status, _, stderr) = project.run(&["check"]);
    assert!(!status.success());
    assert!(
        stderr.contains(
            "error: function `empty`: `component`: the component does not export `wasi:http/incoming-handler` (the wasi:http proxy world)"
        ),
        "{stderr}"
    );
}

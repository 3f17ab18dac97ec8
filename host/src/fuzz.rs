//! Property-based fuzzing (stable Rust, `proptest`) of everything the node parses from
//! untrusted hands: manifests, locked apps (the admin API's deploy body), routes and
//! outbound hosts, sizes and durations, wasi:nn tensors, uploaded ONNX models, and
//! WebAssembly components (`wasm-smith` modules wrapped as components, through the
//! same check a deploy runs). Each property: no panic, and whatever is accepted is
//! consistent (it validates, and it round-trips).
//!
//! CI runs the default case count; `./fuzz.sh` runs 1,000,000 cases per target
//! (`PROPTEST_CASES`), in release mode. Counts and findings: `docs/security.md`.

use proptest::prelude::*;

use crate::locked::{LockedApp, OutboundHost, Route};
use crate::manifest::Manifest;

/// Cases per target: `PROPTEST_CASES`, or `default` (CI's short count).
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A project directory with a (fake) component and model file in it.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("f.wasm"), b"\0asm\x0d\0\x01\0").expect("write");
    std::fs::write(dir.path().join("m.onnx"), b"model").expect("write");
    std::fs::create_dir_all(dir.path().join("static")).expect("mkdir");
    std::fs::write(dir.path().join("static/a.txt"), b"a").expect("write");
    dir
}

/// Text that looks like what a manifest value might hold, hostile or not.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9/._:*\\[\\]-]{0,24}",
        "(/|/x|/x/\\.\\.\\.|/\\.\\.\\.|/a/\\*|//|/\\.\\./)",
        "[0-9]{1,20}(B|KiB|MiB|GiB|ms|s|m|h|)",
        "(http|https|ftp)://[a-z0-9.:\\[\\] -]{0,20}",
        any::<String>(),
    ]
}

/// A TOML manifest assembled from known keys and hostile values.
fn manifest_toml() -> impl Strategy<Value = String> {
    let function = (
        "[a-z][a-z0-9-]{0,8}",
        value_text(),
        proptest::option::of(value_text()),
        proptest::option::of(value_text()),
        proptest::collection::vec(value_text(), 0..3),
        proptest::option::of(0u64..5),
        any::<bool>(),
    );
    (
        proptest::collection::vec(function, 0..4),
        any::<bool>(),
        proptest::option::of("[a-z0-9-]{0,10}"),
    )
        .prop_map(|(functions, with_model, name)| {
            let mut text = String::from("manifest_version = 1\n");
            if let Some(name) = name {
                text.push_str(&format!("name = {name:?}\n"));
            }
            if with_model {
                text.push_str("[model.m]\npath = \"m.onnx\"\n");
            }
            for (name, route, timeout, size, hosts, concurrency, files) in functions {
                text.push_str(&format!(
                    "[function.{name}]\ncomponent = \"f.wasm\"\nroute = {route:?}\n"
                ));
                if let Some(timeout) = timeout {
                    text.push_str(&format!("timeout = {timeout:?}\n"));
                }
                if let Some(size) = size {
                    text.push_str(&format!(
                        "max_body_size = {size:?}\nmemory_limit = {size:?}\n"
                    ));
                }
                text.push_str(&format!("allowed_outbound_hosts = {hosts:?}\n"));
                if let Some(n) = concurrency {
                    text.push_str(&format!("max_concurrency = {n}\n"));
                }
                if files {
                    text.push_str("files = [{ source = \"static\", destination = \"/static\" }]\n");
                }
                if with_model {
                    text.push_str("models = [\"m\"]\n");
                }
            }
            text
        })
}

/// Whatever `from_toml` accepts validates as a locked app and survives JSON.
fn check_accepted(manifest: &Manifest) {
    manifest
        .app
        .validate()
        .expect("an accepted manifest validates");
    let json = serde_json::to_vec(&manifest.app).expect("serializes");
    let back: LockedApp = serde_json::from_slice(&json).expect("round-trips");
    assert_eq!(back.digest(), manifest.app.digest());
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn manifest_text_never_panics(text in any::<String>()) {
        let dir = project();
        if let Ok(manifest) = Manifest::from_toml(&text, &dir.path().join("lepton.toml")) {
            check_accepted(&manifest);
        }
    }

    #[test]
    fn structured_manifests_never_panic_and_what_passes_is_consistent(text in manifest_toml()) {
        let dir = project();
        if let Ok(manifest) = Manifest::from_toml(&text, &dir.path().join("lepton.toml")) {
            check_accepted(&manifest);
        }
    }

    #[test]
    fn locked_app_json_never_panics(
        text in manifest_toml(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let dir = project();
        let Ok(manifest) = Manifest::from_toml(&text, &dir.path().join("lepton.toml")) else {
            return Ok(());
        };
        // The admin API's deploy body: a valid locked app with bytes changed.
        let mut json = serde_json::to_vec(&manifest.app).expect("serializes");
        for (at, byte) in flips {
            let i = at.index(json.len());
            json[i] = byte;
        }
        if let Ok(app) = serde_json::from_slice::<LockedApp>(&json)
            && app.validate().is_ok()
        {
            let again: LockedApp =
                serde_json::from_slice(&serde_json::to_vec(&app).expect("serializes")).expect("parses");
            prop_assert_eq!(again.digest(), app.digest());
        }
    }

    #[test]
    fn locked_app_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(app) = serde_json::from_slice::<LockedApp>(&bytes) {
            let _ = app.validate();
        }
    }

    #[test]
    fn routes_and_outbound_hosts_round_trip(text in value_text()) {
        if let Ok(route) = Route::parse(&text) {
            prop_assert_eq!(Route::parse(&route.to_string()), Ok(route.clone()));
            prop_assert!(route.to_string().is_ascii());
        }
        if let Ok(host) = OutboundHost::parse(&text) {
            prop_assert_eq!(OutboundHost::parse(&host.to_string()), Ok(host));
        }
        let _ = crate::manifest::parse_size(&text);
        let _ = crate::manifest::parse_duration(&text);
    }

    #[test]
    fn tensor_lengths_are_checked_without_overflow(
        dims in proptest::collection::vec(any::<u32>(), 0..8),
        len in 0usize..4096,
        ty in 0usize..crate::nn::ElementType::ALL.len(),
        fill in any::<u8>(),
    ) {
        let ty = crate::nn::ElementType::ALL[ty];
        let tensor = crate::nn::Tensor { dims, ty, data: vec![fill; len] };
        if tensor.check_length().is_ok() {
            let n = tensor.element_count().expect("counted");
            match ty.size() {
                Some(size) => prop_assert_eq!(n * size, len),
                None => prop_assert_eq!(crate::nn::byte_element_count(&tensor.data), Ok(n)),
            }
        }
    }

    #[test]
    fn onnx_inspection_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        uploaded in any::<bool>(),
    ) {
        let _ = crate::nn::inspect_model(&bytes, uploaded);
    }
}

/// A `wasm-smith` module from `seed`, wrapped as a component (one core module, no
/// instances), so a deploy's check compiles it with Cranelift.
fn component_from(seed: &[u8]) -> Option<Vec<u8>> {
    let mut input = arbitrary::Unstructured::new(seed);
    let module = wasm_smith::Module::new(wasm_smith::Config::default(), &mut input).ok()?;
    let module = module.to_bytes();
    let mut component = wasm_encoder::Component::new();
    component.section(&wasm_encoder::RawSection {
        id: wasm_encoder::ComponentSectionId::CoreModule as u8,
        data: &module,
    });
    Some(component.finish())
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn generated_components_go_through_a_deploy_check_without_panicking(
        seed in proptest::collection::vec(any::<u8>(), 64..4096),
        raw in any::<bool>(),
    ) {
        let bytes = if raw { Some(seed) } else { component_from(&seed) };
        let Some(bytes) = bytes else { return Ok(()) };
        let _ = check_component(&bytes);
    }
}

/// `lepton check`'s path on a component: validate, compile (cached), link. Whether
/// it passed.
fn check_component(bytes: &[u8]) -> bool {
    let dir = project();
    std::fs::write(dir.path().join("f.wasm"), bytes).expect("write");
    let text = "manifest_version = 1\n[function.f]\ncomponent = \"f.wasm\"\nroute = \"/f\"\n";
    let manifest = Manifest::from_toml(text, &dir.path().join("lepton.toml")).expect("manifest");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = crate::node::NodeConfig::new(dir.path().join("state"))
            .restore(false)
            .max_instances(4);
        let node = crate::node::Node::open(config).await.expect("node");
        // Almost always an error (nothing exports wasi:http); never a panic.
        node.check(&manifest).await.is_ok()
    })
}

#[test]
fn a_real_component_passes_the_same_check() {
    let hello = std::fs::read(lepton_test_artifacts::HELLO).expect("hello component");
    assert!(
        check_component(&hello),
        "the harness itself must let a good component through"
    );
    assert!(
        !check_component(b"\0asm\x0d\0\x01\0"),
        "an empty component exports nothing"
    );
}

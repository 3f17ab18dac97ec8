//! Manifest errors: each is reported at start, with its exact message, and nothing serves.

use crate::util::{Project, manifest};

/// Runs `lepton up` on `text` and returns the error it exits with.
fn up_error(text: &str) -> String {
    let project = Project::new(text);
    let (status, stdout, stderr) = project.run(&["up", "lepton.toml", "--listen", "127.0.0.1:0"]);
    assert!(!status.success(), "lepton up accepted a bad manifest");
    assert_eq!(stdout, "", "nothing may listen");
    let start = stderr
        .find("error: ")
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    stderr[start..].trim_end().to_owned()
}

const HELLO: &str = "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n";

#[test]
fn unknown_key_names_the_key_and_line() {
    assert_eq!(
        up_error(&manifest(&format!("{HELLO}tiemout = \"5s\"\n"))),
        "error: invalid manifest `lepton.toml`: TOML parse error at line 5, column 1
  |
5 | tiemout = \"5s\"
  | ^^^^^^^
unknown field `tiemout`, expected one of `component`, `route`, `timeout`, `memory_limit`, `max_concurrency`, \
`max_queue`, `max_body_size`, `environment`, `files`, `allowed_outbound_hosts`, `models`, \
`allow_model_upload`, `max_model_upload_size`, `trainers`, `key_value_stores`, `config`, `replicas`, `scale`, `placement`"
    );
}

#[test]
fn unknown_top_level_key() {
    assert_eq!(
        up_error(&manifest(&format!("{HELLO}[functions.typo]\nroute = \"/x\"\n"))),
        "error: invalid manifest `lepton.toml`: TOML parse error at line 5, column 2
  |
5 | [functions.typo]
  |  ^^^^^^^^^
unknown field `functions`, expected one of `manifest_version`, `name`, `function`, `model`, `trainer`, `alert`"
    );
}

#[test]
fn bad_function_name() {
    assert_eq!(
        up_error(&manifest(
            "[function.Hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n"
        )),
        "error: invalid manifest `lepton.toml`: function `Hello`: invalid name: use 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter"
    );
}

#[test]
fn missing_component_file() {
    let error = up_error(&manifest(
        "[function.hello]\ncomponent = \"missing.wasm\"\nroute = \"/hello\"\n",
    ));
    assert_eq!(
        error,
        "error: invalid manifest `lepton.toml`: function `hello`: `component`: cannot read \"./missing.wasm\": No such file or directory (os error 2)"
    );
}

#[test]
fn bad_duration() {
    assert_eq!(
        up_error(&manifest(&format!("{HELLO}timeout = \"5 parsecs\"\n"))),
        "error: invalid manifest `lepton.toml`: function `hello`: `timeout`: invalid duration \"5 parsecs\" (expected a whole number with ms, s, m or h, e.g. \"5s\")"
    );
}

#[test]
fn bad_size() {
    assert_eq!(
        up_error(&manifest(&format!("{HELLO}memory_limit = \"64 megs\"\n"))),
        "error: invalid manifest `lepton.toml`: function `hello`: `memory_limit`: invalid size \"64 megs\" (expected a whole number with B, KiB, MiB or GiB, e.g. \"64MiB\")"
    );
    assert_eq!(
        up_error(&manifest(&format!("{HELLO}memory_limit = \"8GiB\"\n"))),
        "error: invalid manifest `lepton.toml`: function `hello`: `memory_limit`: must be between 64KiB (one page) and 4GiB"
    );
}

#[test]
fn duplicate_route() {
    assert_eq!(
        up_error(&manifest(&format!(
            "{HELLO}[function.again]\ncomponent = \"{{HELLO}}\"\nroute = \"/hello/\"\n"
        ))),
        "error: invalid manifest `lepton.toml`: functions `again` and `hello` both claim route \"/hello\""
    );
}

#[test]
fn bad_outbound_host() {
    assert_eq!(
        up_error(&manifest(&format!(
            "{HELLO}allowed_outbound_hosts = [\"http://*:80\"]\n"
        ))),
        "error: invalid manifest `lepton.toml`: function `hello`: `allowed_outbound_hosts`: \"http://*:80\" must be exactly scheme://host:port (no path, user or wildcard)"
    );
}

#[test]
fn missing_files_source() {
    assert_eq!(
        up_error(&manifest(&format!(
            "{HELLO}files = [{{ source = \"nope\", destination = \"/static\" }}]\n"
        ))),
        "error: invalid manifest `lepton.toml`: function `hello`: `files`: source \"./nope\" is not a directory"
    );
}

#[test]
fn reserved_route_and_version() {
    assert_eq!(
        up_error(&manifest(
            "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/.well-known/lepton/x\"\n"
        )),
        "error: invalid manifest `lepton.toml`: function `hello`: `route`: \"/.well-known/lepton/x\" is reserved for the host (paths under `/.well-known/lepton`)"
    );
    assert_eq!(
        up_error(&manifest(
            "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/v2/...\"\n"
        )),
        "error: invalid manifest `lepton.toml`: function `hello`: `route`: \"/v2/...\" is reserved for the host (paths under `/v2`)"
    );
    assert_eq!(
        up_error("manifest_version = 2\n"),
        "error: invalid manifest `lepton.toml`: `manifest_version` is 2, this host supports only 1"
    );
}

#[test]
fn missing_manifest() {
    let project = Project::new("");
    let (status, _, stderr) = project.run(&["up", "nowhere.toml"]);
    assert!(!status.success());
    assert!(
        stderr.contains(
            "error: cannot read manifest `nowhere.toml`: No such file or directory (os error 2)"
        ),
        "{stderr}"
    );
}

#[test]
fn wildcard_routes_other_than_a_final_dots_are_refused() {
    assert_eq!(
        up_error(&manifest(
            "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/api/*\"\n"
        )),
        "error: invalid manifest `lepton.toml`: function `hello`: `route`: \"/api/*\": wildcards are written only as a final \
         `/...` (\"/api/...\" matches /api and everything below it)"
    );
}

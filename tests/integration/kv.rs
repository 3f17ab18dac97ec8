//! `wasi:keyvalue` and `wasi:config` granted per function, through the `kv` guest
//! (`lepton_sdk::kv`, `lepton_sdk::config`) on the real binary.

use crate::util::{Project, manifest, reply};

fn kv_project(extra: &str) -> Project {
    Project::new(&manifest(&format!(
        "name = \"shop\"\n\
         [function.kv]\ncomponent = \"{{KV}}\"\nroute = \"/kv/...\"\nkey_value_stores = [\"default\", \"cache\"]\n\
         config = {{ threshold = \"0.8\", api_key = {{ env = \"KV_TEST_API_KEY\" }} }}\n\
         [function.other]\ncomponent = \"{{KV}}\"\nroute = \"/other/...\"\nkey_value_stores = [\"default\"]\n{extra}"
    )))
}

fn up(project: &Project) -> crate::util::Lepton {
    project.up_with(&[], &[("KV_TEST_API_KEY", "sk-very-secret")])
}

fn put(lepton: &crate::util::Lepton, path: &str, body: &[u8]) -> crate::util::Reply {
    reply(ureq::put(&lepton.url(path)).send_bytes(body))
}

fn send(lepton: &crate::util::Lepton, method: &str, path: &str) -> crate::util::Reply {
    reply(ureq::request(method, &lepton.url(path)).call())
}

#[test]
fn stores_are_granted_per_function_scoped_to_the_app_and_survive_kill_9() {
    let project = kv_project("");
    let lepton = up(&project);
    assert_eq!(send(&lepton, "GET", "/kv/get/greeting").status, 404);
    assert_eq!(put(&lepton, "/kv/set/greeting", b"hello").status, 200);
    let got = send(&lepton, "GET", "/kv/get/greeting");
    assert_eq!((got.status, got.body.as_str()), (200, "hello"));
    // Another function of the app granted the same store sees the same data...
    assert_eq!(send(&lepton, "GET", "/other/get/greeting").body, "hello");
    // ...but not a store it is not granted, and no function opens an undeclared one.
    let denied = send(&lepton, "GET", "/other/get/greeting?store=cache");
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.contains("not granted"), "{}", denied.body);
    assert_eq!(send(&lepton, "GET", "/kv/keys?store=secrets").status, 403);
    // Stores are separate.
    assert_eq!(
        put(&lepton, "/kv/set/greeting?store=cache", b"cached").status,
        200
    );
    assert_eq!(send(&lepton, "GET", "/kv/get/greeting").body, "hello");
    assert_eq!(
        send(&lepton, "GET", "/kv/get/greeting?store=cache").body,
        "cached"
    );
    assert_eq!(
        send(&lepton, "DELETE", "/kv/delete/greeting?store=cache").status,
        200
    );
    assert_eq!(
        send(&lepton, "GET", "/kv/get/greeting?store=cache").status,
        404
    );
    for i in 0..3 {
        assert_eq!(put(&lepton, &format!("/kv/set/k{i}"), b"v").status, 200);
    }
    assert_eq!(
        send(&lepton, "GET", "/kv/keys").body,
        "greeting\nk0\nk1\nk2\n"
    );
    // Another app naming a store `default` has a store of its own.
    let other = Project::new(&manifest(
        "name = \"elsewhere\"\n[function.kv]\ncomponent = \"{KV}\"\nroute = \"/elsewhere/...\"\nkey_value_stores = [\"default\"]\n",
    ));
    let (status, out, err) = lepton.client(&other, &["deploy"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(send(&lepton, "GET", "/elsewhere/get/greeting").status, 404);
    assert_eq!(send(&lepton, "GET", "/elsewhere/keys").body, "\n");
    // kill -9 (Lepton's drop), then the same state dir: every acknowledged write is there.
    drop(lepton);
    let lepton = up(&project);
    assert_eq!(send(&lepton, "GET", "/kv/get/greeting").body, "hello");
    assert_eq!(
        send(&lepton, "GET", "/kv/keys").body,
        "greeting\nk0\nk1\nk2\n"
    );
    // Removing an app removes its stores: deployed again, it starts empty.
    assert_eq!(put(&lepton, "/elsewhere/set/mine", b"x").status, 200);
    let (status, out, err) = lepton.client(&other, &["rm", "elsewhere"]);
    assert!(status.success(), "{out}{err}");
    let (status, out, err) = lepton.client(&other, &["deploy"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(send(&lepton, "GET", "/elsewhere/get/mine").status, 404);
    assert_eq!(send(&lepton, "GET", "/kv/get/greeting").body, "hello");
    // An empty key is the guest's error, the same on a node as in a cluster.
    assert_eq!(put(&lepton, "/kv/set/", b"x").status, 400);
}

#[test]
fn concurrent_increments_lose_none_and_limits_are_guest_errors() {
    let project = kv_project("");
    let lepton = up(&project);
    let url = lepton.url("/kv/increment/hits?by=2");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let answer = reply(ureq::post(&url).call());
                    assert_eq!(answer.status, 200, "{}", answer.body);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("no panic");
    }
    assert_eq!(send(&lepton, "GET", "/kv/get/hits").body, "400");
    // Past the limits: the guest's error (400 here), the store as it was, still serving.
    let big = vec![b'x'; (1 << 20) + 1];
    let refused = put(&lepton, "/kv/set/big", &big);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("values are at most 1048576 bytes"),
        "{}",
        refused.body
    );
    let long_key = "k".repeat(1025);
    let refused = put(&lepton, &format!("/kv/set/{long_key}"), b"v");
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("keys are at most 1024 bytes"),
        "{}",
        refused.body
    );
    assert_eq!(put(&lepton, "/kv/set/text", b"not a number").status, 200);
    let refused = send(&lepton, "POST", "/kv/increment/text");
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("not a decimal number"),
        "{}",
        refused.body
    );
    assert_eq!(send(&lepton, "GET", "/kv/get/big").status, 404);
    assert_eq!(send(&lepton, "GET", "/kv/get/hits").body, "400");
}

#[test]
fn a_function_granted_no_store_may_import_keyvalue_but_opens_none() {
    // Toolchains such as componentize-py import every interface of their world, so
    // the import alone is not refused; opening a store is the interface's
    // access-denied.
    let project = Project::new(&manifest(
        "[function.kv]\ncomponent = \"{KV}\"\nroute = \"/kv/...\"\n",
    ));
    let lepton = project.up();
    let denied = send(&lepton, "GET", "/kv/get/x");
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.contains("not granted"), "{}", denied.body);
    assert_eq!(send(&lepton, "GET", "/kv/config").body, "\n");
}

#[test]
fn config_values_are_the_functions_own_and_secrets_stay_out_of_the_state_dir() {
    let project = kv_project("config = { mode = \"other\" }\n");
    let lepton = up(&project);
    let value = |path: &str| send(&lepton, "GET", path);
    assert_eq!(value("/kv/config/threshold").body, "0.8");
    assert_eq!(value("/kv/config/api_key").body, "sk-very-secret");
    assert_eq!(value("/kv/config").body, "api_key\nthreshold\n");
    assert_eq!(value("/kv/config/mode").status, 404);
    // The other function sees its own keys only.
    assert_eq!(value("/other/config").body, "mode\n");
    assert_eq!(value("/other/config/api_key").status, 404);
    drop(lepton);
    // The secret's value is in no file of the state dir (locked app, audit log, logs).
    for entry in walk(&project.path("state")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes
                .windows(b"sk-very-secret".len())
                .any(|w| w == b"sk-very-secret"),
            "{} holds the secret",
            entry.display()
        );
    }
    // The node's own settings are never handed out.
    let own = Project::new(&manifest(
        "[function.kv]\ncomponent = \"{KV}\"\nroute = \"/kv/...\"\nconfig = { token = { env = \"LEPTON_ADMIN_TOKEN\" } }\n",
    ));
    let (status, out, err) = own.run(&["check"]);
    assert!(!status.success(), "{out}{err}");
    assert!(err.contains("one of the node's own settings"), "{err}");
    // Unset on the node: the deploy is refused, naming the key and the variable.
    let (status, out, err) = project.run(&["check"]);
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains("\"api_key\": the environment variable `KV_TEST_API_KEY` is not set"),
        "{err}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

//! Deploying at run time: versions, rollback, removal, conflicts, rejected versions,
//! the admin API's auth and blobs, zero failures under load, kill -9, shared models,
//! trainers kept across versions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::onnx::identity_model;
use crate::util::{Lepton, PATIENCE, Project, json_reply, manifest, write_file};

/// Writes app `name` (hello at `route`, answering `greeting`) to `DIR/lepton.toml` in
/// `project` and returns the manifest's path relative to the project.
fn hello_app(project: &Project, dir: &str, name: &str, route: &str, greeting: &str) -> String {
    let text = manifest(&format!(
        "name = \"{name}\"\n[function.hello]\ncomponent = \"{{HELLO}}\"\nroute = \"{route}\"\nenvironment = {{ GREETING = \"{greeting}\" }}\n"
    ));
    // `manifest` puts the version line first; `name` must follow it.
    write_file(project.dir.path(), &format!("{dir}/lepton.toml"), &text);
    format!("{dir}/lepton.toml")
}

fn deploy(lepton: &Lepton, project: &Project, manifest: &str) -> (bool, String, String) {
    let (status, stdout, stderr) = lepton.client(project, &["deploy", manifest]);
    (status.success(), stdout, stderr)
}

fn deploy_ok(lepton: &Lepton, project: &Project, manifest: &str) -> String {
    let (ok, stdout, stderr) = deploy(lepton, project, manifest);
    assert!(ok, "deploy failed: {stderr}");
    stdout
}

#[test]
fn deploy_update_noop_rollback_and_remove_on_an_empty_node() {
    let project = Project::empty();
    let lepton = project.up_empty();
    assert_eq!(lepton.get("/hello").status, 404);

    let app = hello_app(&project, "shop", "shop", "/hello", "one");
    assert_eq!(
        deploy_ok(&lepton, &project, &app),
        "deployed shop version 1\n  /hello -> hello\n"
    );
    assert_eq!(lepton.get("/hello").body, "one\n");

    assert_eq!(
        deploy_ok(&lepton, &project, &app),
        "deployed shop version 1 (unchanged)\n  /hello -> hello\n"
    );

    hello_app(&project, "shop", "shop", "/hello", "two");
    assert_eq!(
        deploy_ok(&lepton, &project, &app),
        "deployed shop version 2\n  /hello -> hello\n"
    );
    assert_eq!(lepton.get("/hello").body, "two\n");

    let (status, stdout, stderr) = lepton.client(&project, &["rollback", "shop"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "shop is at version 1\n");
    assert_eq!(lepton.get("/hello").body, "one\n");

    let (_, apps, _) = lepton.client(&project, &["apps"]);
    assert_eq!(
        apps,
        "APP   ACTIVE  VERSIONS  ROUTES\nshop  1       1,2       /hello\n"
    );
    let (code, info) = lepton.admin_get("/v1/apps/shop");
    assert_eq!(code, 200);
    assert_eq!(info["active"], 1);
    assert_eq!(info["versions"].as_array().expect("versions").len(), 2);
    assert!(
        info["versions"][0]["digest"]
            .as_str()
            .expect("digest")
            .starts_with("sha256:")
    );

    let (status, stdout, _) = lepton.client(&project, &["rm", "shop"]);
    assert!(status.success());
    assert_eq!(stdout, "removed shop\n");
    assert_eq!(lepton.get("/hello").status, 404);
    assert_eq!(lepton.admin_get("/v1/apps/shop").0, 404);

    let (_, audit) = lepton.admin_get("/v1/audit");
    let actions: Vec<(String, String)> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or("").to_owned(),
                r["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let expected = [
        ("deploy", "ok"),
        ("deploy", "unchanged"),
        ("deploy", "ok"),
        ("rollback", "ok"),
        ("remove", "ok"),
    ];
    assert_eq!(actions, expected.map(|(a, o)| (a.to_owned(), o.to_owned())));
    assert!(
        audit["records"][0]["peer"]
            .as_str()
            .expect("peer")
            .starts_with("127.0.0.1:")
    );
}

#[test]
fn up_with_a_manifest_redeploys_it_only_when_it_changed() {
    let project = Project::empty();
    let app = hello_app(&project, "site", "site", "/hello", "one");
    let start = |project: &Project| project.start(Some(&project.path(&app)), &[], &[]);
    {
        let lepton = start(&project);
        assert_eq!(lepton.get("/hello").body, "one\n");
    }
    let lepton = start(&project);
    assert_eq!(
        lepton.admin_get("/v1/apps/site").1["active"],
        1,
        "the same content is not a new version"
    );
    drop(lepton);
    hello_app(&project, "site", "site", "/hello", "two");
    let lepton = start(&project);
    assert_eq!(lepton.get("/hello").body, "two\n");
    assert_eq!(lepton.admin_get("/v1/apps/site").1["active"], 2);
}

#[test]
fn two_apps_claiming_one_route_is_a_conflict_naming_both() {
    let project = Project::empty();
    let lepton = project.up_empty();
    deploy_ok(
        &lepton,
        &project,
        &hello_app(&project, "a", "alpha", "/hello", "a"),
    );
    let (ok, _, stderr) = deploy(
        &lepton,
        &project,
        &hello_app(&project, "b", "beta", "/hello", "b"),
    );
    assert!(!ok);
    assert!(
        stderr.contains(
            "error: app `beta`: `route`: route \"/hello\" of function `hello` in app `beta` is already served by function `hello` of app `alpha`"
        ),
        "{stderr}"
    );
    assert_eq!(lepton.get("/hello").body, "a\n");
    // The same over the API: 409 with the error as {scope, key, reason}.
    let locked = serde_json::json!({"lock_version": 1, "name": "beta", "functions": [], "models": [], "trainers": []});
    let (code, _) = lepton.admin_post("/v1/apps/beta/versions", &locked);
    assert_eq!(code, 201, "an app with no routes conflicts with nothing");
}

#[test]
fn a_version_that_fails_to_load_is_rejected_and_the_old_one_keeps_serving() {
    let project = Project::empty();
    let lepton = project.up_empty();
    let app = hello_app(&project, "shop", "shop", "/hello", "one");
    deploy_ok(&lepton, &project, &app);
    // A valid core module, but not a component.
    std::fs::write(project.path("shop/core.wasm"), b"\0asm\x01\0\0\0").expect("write");
    write_file(
        project.dir.path(),
        "shop/lepton.toml",
        "manifest_version = 1\nname = \"shop\"\n[function.hello]\ncomponent = \"core.wasm\"\nroute = \"/hello\"\n",
    );
    let (ok, _, stderr) = deploy(&lepton, &project, &app);
    assert!(!ok);
    assert!(
        stderr.contains("error: function `hello`: `component`: not a valid WebAssembly component"),
        "{stderr}"
    );
    assert_eq!(lepton.get("/hello").body, "one\n");
    assert_eq!(
        lepton.admin_get("/v1/apps/shop").1["versions"]
            .as_array()
            .expect("versions")
            .len(),
        1
    );
}

#[test]
fn the_admin_api_wants_the_token() {
    let project = Project::empty();
    let lepton = project.up_empty();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some(&*format!("Basic {}", lepton.token)),
    ] {
        let mut request = ureq::get(&lepton.admin_url("/v1/apps"));
        if let Some(auth) = auth {
            request = request.set("authorization", auth);
        }
        let reply = crate::util::reply(request.call());
        assert_eq!(reply.status, 401, "{auth:?}");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    let (code, apps) = lepton.admin_get("/v1/apps");
    assert_eq!((code, apps), (200, serde_json::json!({ "apps": [] })));
    let (_, audit) = lepton.admin_get("/v1/audit");
    let failures = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == "auth-failure")
        .count();
    assert_eq!(failures, 3);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(project.path("state/admin-token"))
            .expect("token file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn blobs_are_checked_against_their_digest_and_missing_ones_are_listed() {
    let project = Project::empty();
    let lepton = project.up_empty();
    let digest = |bytes: &[u8]| {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
    };
    let a = digest(b"a");
    let put = |digest: &str, body: &[u8]| {
        json_reply(
            lepton
                .admin_request("PUT", &format!("/v1/blobs/{digest}"))
                .send_bytes(body),
        )
    };
    let (code, answer) = put(&a, b"b");
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]["reason"]
            .as_str()
            .expect("reason")
            .contains(&format!("not {a}")),
        "{answer}"
    );
    let head = |digest: &str| {
        crate::util::reply(
            lepton
                .admin_request("HEAD", &format!("/v1/blobs/{digest}"))
                .call(),
        )
        .status
    };
    assert_eq!(head(&a), 404);
    assert_eq!(put(&a, b"a").0, 201);
    assert_eq!(head(&a), 200);
    assert_eq!(put("sha256:nothex", b"a").0, 400);

    let missing = digest(b"never uploaded");
    let locked = serde_json::json!({"lock_version": 1, "name": "shop", "functions": [{
        "name": "f", "component": missing, "route": "/f", "timeout": 1000, "memory_limit": 65536,
        "max_concurrency": 1, "max_queue": 1, "max_body_size": 1, "environment": [], "files": [],
        "allowed_outbound_hosts": [], "models": [], "allow_model_upload": false, "max_model_upload_size": 0,
        "trainers": []}]});
    let (code, answer) = lepton.admin_post("/v1/apps/shop/versions", &locked);
    assert_eq!(code, 400);
    assert_eq!(answer["missing"], serde_json::json!([missing]));
    // Hostile bodies are clear 400s: a wrong name, an unknown key, not JSON at all.
    assert_eq!(lepton.admin_post("/v1/apps/other/versions", &locked).0, 400);
    let mut extra = locked;
    extra["surprise"] = serde_json::json!(1);
    assert_eq!(lepton.admin_post("/v1/apps/shop/versions", &extra).0, 400);
    let (code, answer) = json_reply(
        lepton
            .admin_request("POST", "/v1/apps/shop/versions")
            .send_string("{{{"),
    );
    assert_eq!(code, 400, "{answer}");
    assert_eq!(lepton.admin_get("/v1/apps/Not%20A%20Name").0, 400);
    assert_eq!(lepton.admin_get("/v1/nothing").0, 404);
    assert_eq!(
        crate::util::reply(lepton.admin_request("PATCH", "/v1/apps").call()).status,
        405
    );
}

#[test]
fn twenty_deploys_and_rollbacks_under_load_fail_no_request() {
    let project = Project::empty();
    let lepton = project.up_empty();
    let app = hello_app(&project, "shop", "shop", "/hello", "v0");
    deploy_ok(&lepton, &project, &app);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let url = lepton.url("/hello");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served, url) = (Arc::clone(&stop), Arc::clone(&served), url.clone());
            std::thread::spawn(move || {
                // Keep-alive connections: a reset one would show as a transport error.
                let agent = ureq::AgentBuilder::new().timeout(PATIENCE).build();
                let mut failures = Vec::new();
                let mut greetings = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    match agent.get(&url).call() {
                        Ok(response) => {
                            greetings.insert(response.into_string().unwrap_or_default());
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                (failures, greetings)
            })
        })
        .collect();
    for i in 1..=10 {
        hello_app(&project, "shop", "shop", "/hello", &format!("v{i}"));
        deploy_ok(&lepton, &project, &app);
        let (status, _, stderr) = lepton.client(&project, &["rollback", "shop"]);
        assert!(status.success(), "{stderr}");
    }
    let before = served.load(Ordering::Relaxed);
    let started = Instant::now();
    while served.load(Ordering::Relaxed) < before + 50 && started.elapsed() < PATIENCE {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let mut greetings = std::collections::BTreeSet::new();
    for client in clients {
        let (failures, seen) = client.join().expect("client thread");
        assert!(
            failures.is_empty(),
            "failed requests during the updates: {failures:?}"
        );
        greetings.extend(seen);
    }
    assert!(
        served.load(Ordering::Relaxed) > 100,
        "too little load to tell"
    );
    assert!(
        greetings.len() >= 2,
        "the updates were never seen: {greetings:?}"
    );
}

#[test]
fn kill_9_during_deploys_then_restart_serves_what_was_acknowledged() {
    let project = Project::empty();
    let app = hello_app(&project, "shop", "shop", "/hello", "g0");
    // Every deploy uses a new greeting, so versions and greetings rise together.
    let mut attempted = 0u64;
    let mut acknowledged: Option<(u64, u64)> = None; // (version, greeting)
    for round in 0..4u64 {
        let mut lepton = project.up_empty();
        // Every acknowledged deploy is there; at most the one in flight at the kill
        // (durable but unanswered) is newer; nothing half-written is served.
        if let Some((version, greeting)) = acknowledged {
            let (_, info) = lepton.admin_get("/v1/apps/shop");
            let active = info["active"].as_u64().expect("an active version");
            assert!(
                (version..=version + 1).contains(&active),
                "round {round}: active {active}, acknowledged {version}"
            );
            let body = lepton.get("/hello").body;
            let served: u64 = body
                .trim()
                .trim_start_matches('g')
                .parse()
                .expect("a greeting");
            assert!(
                (greeting..=attempted).contains(&served),
                "round {round}: serves {body:?}, acknowledged g{greeting}"
            );
        }
        let (admin, token, dir, path) = (
            lepton.admin_url(""),
            lepton.token.clone(),
            project.dir.path().to_owned(),
            app.clone(),
        );
        let first = attempted + 1;
        let (acks, acked) = std::sync::mpsc::channel();
        let deployer = std::thread::spawn(move || {
            let mut done = Vec::new();
            for greeting in first..first + 20 {
                let text = manifest(&format!(
                    "name = \"shop\"\n[function.hello]\ncomponent = \"{{HELLO}}\"\nroute = \"/hello\"\nenvironment = {{ GREETING = \"g{greeting}\" }}\n"
                ));
                std::fs::write(dir.join(&path), text).expect("write manifest");
                let output = std::process::Command::new(env!("CARGO_BIN_EXE_lepton"))
                    .args(["deploy", &path, "--admin", &admin, "--json"])
                    .current_dir(&dir)
                    .env("LEPTON_ADMIN_TOKEN", &token)
                    .output()
                    .expect("run lepton deploy");
                if !output.status.success() {
                    return (done, greeting);
                }
                let answer: serde_json::Value =
                    serde_json::from_slice(&output.stdout).expect("json");
                done.push((answer["version"].as_u64().expect("version"), greeting));
                let _ = acks.send(());
            }
            (done, first + 19)
        });
        // Once a deploy of this round was answered, kill at a different moment each
        // round, with the next deploys in flight.
        acked.recv_timeout(PATIENCE).expect("a deploy answered");
        std::thread::sleep(Duration::from_millis(13 + 61 * round));
        lepton.child.kill().expect("kill -9");
        lepton.child.wait().expect("wait");
        let (done, last_tried) = deployer.join().expect("deployer");
        attempted = last_tried;
        if let Some(&last) = done.last() {
            acknowledged = Some(last);
        }
    }
    assert!(
        acknowledged.is_some(),
        "no deploy was acknowledged in any round"
    );
    let lepton = project.up_empty();
    assert_eq!(lepton.get("/.well-known/lepton/health").status, 200);
}

#[test]
fn two_apps_naming_the_same_model_file_share_one_loaded_model() {
    let project = Project::empty();
    let lepton = project.up_empty();
    let model = identity_model(&[("x", "FP32")], 2);
    for (dir, name, route) in [("a", "alpha", "/a/..."), ("b", "beta", "/b/...")] {
        std::fs::create_dir_all(project.path(dir)).expect("mkdir");
        std::fs::write(project.path(&format!("{dir}/m.onnx")), &model).expect("write model");
        write_file(
            project.dir.path(),
            &format!("{dir}/lepton.toml"),
            &manifest(&format!(
                "name = \"{name}\"\n[model.m]\npath = \"m.onnx\"\nsessions = 1\n\
                 [function.nn]\ncomponent = \"{{NNPROBE}}\"\nroute = \"{route}\"\nmodels = [\"m\"]\n"
            )),
        );
        deploy_ok(&lepton, &project, &format!("{dir}/lepton.toml"));
    }
    let (_, status) = lepton.admin_get("/v1/status");
    assert_eq!(status["resident_models"], 1, "{status}");
    let models = status["models"].as_array().expect("models");
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["digest"], models[1]["digest"]);
    assert_eq!(
        (models[0]["target"].as_str(), models[0]["device"].as_str()),
        (Some("cpu"), Some("cpu"))
    );
    let (status, _, _) = lepton.client(&project, &["rm", "alpha"]);
    assert!(status.success());
    assert_eq!(lepton.admin_get("/v1/status").1["resident_models"], 1);
    let (status, _, _) = lepton.client(&project, &["rm", "beta"]);
    assert!(status.success());
    assert_eq!(
        lepton.admin_get("/v1/status").1["resident_models"],
        0,
        "a model no version uses is unloaded"
    );
}

#[test]
fn a_trainer_keeps_its_steps_across_versions_until_it_changes() {
    let project = Project::empty();
    let lepton = project.up_empty();
    let model = crate::train::digits_model();
    let write = |lr: &str, greeting: &str| {
        write_file(
            project.dir.path(),
            "learn/lepton.toml",
            &manifest(&format!(
                "name = \"learn\"\n[trainer.digits]\ninit = {model:?}\nloss = \"cross-entropy\"\noptimizer = {{ kind = \"adamw\", lr = {lr} }}\n\
                 [function.nn]\ncomponent = \"{{NNPROBE}}\"\nroute = \"/nn/...\"\ntrainers = [\"digits\"]\n\
                 environment = {{ VERSION = \"{greeting}\" }}\n"
            )),
        );
    };
    let step = || {
        let batch = crate::train::images(2, 64) + &crate::train::labels(&[3, 7]);
        let reply = lepton.post("/nn/step/digits", batch.as_bytes());
        assert!(reply.body.starts_with("loss "), "{reply:?}");
        reply
            .body
            .trim_end()
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .expect("steps")
    };
    write("1e-2", "one");
    deploy_ok(&lepton, &project, "learn/lepton.toml");
    assert_eq!((step(), step()), (1, 2));
    write("1e-2", "two");
    deploy_ok(&lepton, &project, "learn/lepton.toml");
    assert_eq!(
        step(),
        3,
        "the same trainer in a new version keeps its state"
    );
    write("5e-3", "two");
    deploy_ok(&lepton, &project, "learn/lepton.toml");
    assert_eq!(step(), 1, "a changed trainer starts from its init");
}

#[test]
fn a_second_process_on_the_same_state_dir_is_refused() {
    let project = Project::empty();
    let lepton = project.up_empty();
    let state = project.path("state");
    let (status, stdout, stderr) = crate::util::run_lepton(
        project.dir.path(),
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(!status.success());
    assert_eq!(stdout, "");
    let holder = format!(
        "is in use by another lepton process (pid {})",
        lepton.child.id()
    );
    assert!(stderr.contains(&holder), "{stderr}");
    assert_eq!(lepton.get("/.well-known/lepton/health").status, 200);
}

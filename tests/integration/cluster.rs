//! The cluster: real `nats-server` processes (with authentication, from `./setup.sh`),
//! `lepton control` and `lepton node` processes on 127.0.0.1 random ports.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{PATIENCE, Project, Reply, json_reply, manifest, reply, root, run_lepton};

/// How long a node kill may take to heal in these tests: the goal is 2 s (the bench
/// measures it); a loaded 2-core CI machine running other tests gets more.
const HEAL_BOUND: Duration = Duration::from_secs(15);

fn nats_server() -> PathBuf {
    let path = root().join(".cache/nats/nats-server");
    assert!(path.is_file(), "run ./setup.sh: no {}", path.display());
    path
}

/// A `nats-server` on a random port; killed when dropped.
struct Nats {
    child: Child,
    conf: PathBuf,
    log: PathBuf,
    /// `host:port` for clients.
    client: String,
    /// `host:port` for leaf connections, when it listens for them.
    leaf: Option<String>,
}

impl Nats {
    /// Starts a server with `config` (its `listen` is added) and waits for its ports.
    #[expect(
        clippy::zombie_processes,
        reason = "the child is kept in `Nats`, whose drop kills and waits for it"
    )]
    fn start(dir: &Path, name: &str, config: &str, wants_leaf: bool) -> Self {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, format!("listen: 127.0.0.1:-1\n{config}")).expect("write conf");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&conf)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let find = |what: &str| {
                text.lines()
                    .find_map(|l| l.split_once(what).map(|(_, rest)| rest.trim().to_owned()))
            };
            let client = find("Listening for client connections on ");
            let leaf = find("Listening for leafnode connections on ");
            let ready = text.contains("Server is ready");
            if let Some(client) = client
                && ready
                && (leaf.is_some() || !wants_leaf)
            {
                return Self {
                    child,
                    conf,
                    log,
                    client,
                    leaf,
                };
            }
            if started.elapsed() > PATIENCE {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Nats {
    /// Stops the server (as a crash would).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same client port and store.
    fn start_again(&mut self) {
        let conf = std::fs::read_to_string(&self.conf).expect("conf");
        let conf = conf.replacen(
            "listen: 127.0.0.1:-1",
            &format!("listen: {}", self.client),
            1,
        );
        std::fs::write(&self.conf, conf).expect("write conf");
        let _ = std::fs::remove_file(&self.log);
        self.child = Command::new(nats_server())
            .arg("-c")
            .arg(&self.conf)
            .arg("-l")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server again");
        eventually(PATIENCE, "nats-server is ready again", || {
            std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains("Server is ready"))
        });
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hub: JetStream (domain `hub`), users `lepton` and `leaf` (for leaf servers),
/// and a `max_payload` that fits the default forwarding cap.
fn hub(dir: &Path) -> Nats {
    let store = dir.join("jetstream");
    Nats::start(
        dir,
        "hub",
        &format!(
            "max_payload: 8454144\n\
             jetstream {{ store_dir: {store:?}, domain: hub }}\n\
             authorization {{ users: [ {{ user: lepton, password: s3cret }} ] }}\n\
             leafnodes {{ listen: 127.0.0.1:-1, authorization {{ user: leaf, password: leafpw }} }}\n"
        ),
        true,
    )
}

/// An edge site's leaf server: it dials the hub; its own clients log in as `edge`.
fn leaf(dir: &Path, hub: &Nats) -> Nats {
    let remote = hub.leaf.as_deref().expect("hub listens for leaves");
    Nats::start(
        dir,
        "leaf",
        &format!(
            "max_payload: 8454144\n\
             authorization {{ user: edge, password: edgepw }}\n\
             leafnodes {{ remotes: [ {{ url: \"nats-leaf://leaf:leafpw@{remote}\" }} ] }}\n"
        ),
        false,
    )
}

fn hub_url(nats: &Nats) -> String {
    format!("nats://lepton:s3cret@{}", nats.client)
}

/// A `lepton control` or `lepton node`; killed when dropped.
struct Proc {
    child: Child,
    /// What its ready line names (`host:port`).
    address: String,
    log: PathBuf,
}

impl Proc {
    fn start(dir: &Path, label: &str, args: &[&str], ready: &str) -> Self {
        let log = dir.join(format!("{label}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_lepton"))
            .args(args)
            .current_dir(dir)
            .env("ORT_DYLIB_PATH", crate::util::ort_library())
            .env("LEPTON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn lepton");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let Some(address) = line.trim_end().strip_prefix(ready).map(str::to_owned) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{label}: no ready line (read {line:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        // Keep the pipe open (and drained) for the life of the process.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stdout.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        Self {
            child,
            address,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn get(&self, path: &str) -> Reply {
        reply(
            ureq::get(&format!("http://{}{path}", self.address))
                .timeout(PATIENCE)
                .call(),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_9();
    }
}

fn control(dir: &Path, label: &str, nats: &str, extra: &[&str]) -> Proc {
    let state = dir.join(label);
    let state = state.to_str().expect("utf-8");
    let mut args = vec![
        "control",
        "--nats",
        nats,
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        state,
    ];
    args.extend_from_slice(extra);
    Proc::start(dir, label, &args, "lepton: admin on http://")
}

fn node(dir: &Path, name: &str, nats: &str, extra: &[&str]) -> Proc {
    let state = dir.join(format!("node-{name}"));
    let state = state.to_str().expect("utf-8");
    let mut args = vec![
        "node",
        "--nats",
        nats,
        "--name",
        name,
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state,
    ];
    args.extend_from_slice(extra);
    Proc::start(dir, name, &args, "lepton: listening on http://")
}

fn token(dir: &Path, label: &str) -> String {
    std::fs::read_to_string(dir.join(label).join("admin-token"))
        .expect("admin token")
        .trim()
        .to_owned()
}

fn admin_get(control: &Proc, token: &str, path: &str) -> serde_json::Value {
    let (status, body) = json_reply(
        ureq::get(&format!("http://{}{path}", control.address))
            .set("authorization", &format!("Bearer {token}"))
            .call(),
    );
    assert_eq!(status, 200, "{body}");
    body
}

/// `lepton deploy` of the project's manifest against `control`.
fn deploy(project: &Project, control: &Proc, token: &str) -> String {
    let admin = format!("http://{}", control.address);
    let (status, out, err) = run_lepton(
        project.dir.path(),
        &["deploy", "--admin", &admin],
        &[("LEPTON_ADMIN_TOKEN", token)],
    );
    assert!(status.success(), "deploy failed: {out}{err}");
    out
}

/// Waits until `check` holds, failing with `what` after `bound`.
fn eventually(bound: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "never happened within {bound:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The nodes a function is placed on, from `GET /v1/status`.
fn placed_on(status: &serde_json::Value, function: &str) -> Vec<String> {
    let mut nodes: Vec<String> = status["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["function"] == function)
        .filter_map(|r| r["node"].as_str().map(str::to_owned))
        .collect();
    nodes.sort();
    nodes
}

const APP: &str = r#"name = "shop"

[function.hello]
component = "{HELLO}"
route = "/hello"
replicas = 2
placement = { tier = "edge" }

[function.gpu]
component = "{HELLO}"
route = "/gpu"
placement = { accelerator = "required" }

[function.zone]
component = "{PROBE}"
route = "/zone/..."
max_body_size = "32MiB"
placement = { tier = "edge", labels = { zone = "b" } }

[function.solo]
component = "{HELLO}"
route = "/solo"
placement = { tier = "edge", labels = { zone = "a" } }

[function.nowhere]
component = "{HELLO}"
route = "/nowhere"
timeout = "1s"
placement = { labels = { zone = "mars" } }
"#;

/// One control plane, a cloud node with a declared accelerator, two edge nodes (one
/// behind a leaf server): placement honours tier, accelerator and labels; every
/// gateway answers every route; bodies past the forwarding cap get 413; a node killed
/// with SIGKILL has its replicas placed elsewhere and its routes answer again.
#[test]
fn a_cluster_places_forwards_and_heals() {
    let project = Project::new(&manifest(APP));
    let dir = project.dir.path();
    let hub = hub(dir);
    let leaf = leaf(dir, &hub);
    let url = hub_url(&hub);
    let edge_url = format!("nats://edge:edgepw@{}", leaf.client);
    let control = control(dir, "control", &url, &[]);
    let token = token(dir, "control");
    let cloud = node(
        dir,
        "cloud-1",
        &url,
        &[
            "--labels",
            "tier=cloud,region=eu-west",
            "--accelerator",
            "nvidia-h200:141GiB",
        ],
    );
    let mut edge_a = node(dir, "edge-a", &url, &["--labels", "tier=edge,zone=a"]);
    let edge_b = node(
        dir,
        "edge-b",
        &edge_url,
        &["--labels", "tier=edge,zone=b", "--jetstream-domain", "hub"],
    );
    let mut edge_a2 = node(dir, "edge-a2", &url, &["--labels", "tier=edge,zone=a"]);

    let out = deploy(&project, &control, &token);
    assert!(out.contains("deployed shop version 1"), "{out}");

    let status = admin_get(&control, &token, "/v1/status");
    assert_eq!(placed_on(&status, "gpu"), ["cloud-1"], "{status:#}");
    assert_eq!(placed_on(&status, "zone"), ["edge-b"], "{status:#}");
    let hello = placed_on(&status, "hello");
    assert_eq!(hello.len(), 2, "{status:#}");
    assert!(hello.iter().all(|n| n.starts_with("edge-")), "{status:#}");
    let solo = placed_on(&status, "solo");
    assert_eq!(solo.len(), 1, "{status:#}");
    assert!(solo[0].starts_with("edge-a"), "{status:#}");
    // The function no node can take: every node's reason is shown.
    let nowhere = status["placements"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["function"] == "nowhere"))
        .cloned()
        .expect("nowhere is listed");
    let rejections = nowhere["unplaced"]["rejections"]
        .as_array()
        .expect("rejections");
    let mut rejected: Vec<&str> = rejections
        .iter()
        .filter_map(|r| r["node"].as_str())
        .collect();
    rejected.sort_unstable();
    assert_eq!(
        rejected,
        ["cloud-1", "edge-a", "edge-a2", "edge-b"],
        "{nowhere:#}"
    );
    assert!(
        rejections.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|t| t.contains("label-mismatch (selector on `zone`)"))),
        "{nowhere:#}"
    );
    let (_, printed, _) = run_lepton(
        dir,
        &["status", "--admin", &format!("http://{}", control.address)],
        &[("LEPTON_ADMIN_TOKEN", &token)],
    );
    assert!(
        printed.contains("edge-b") && printed.contains("nowhere"),
        "{printed}"
    );

    // Every gateway answers every route (the zone route lives only behind the leaf).
    for gateway in [&cloud, &edge_a, &edge_b, &edge_a2] {
        for path in ["/hello", "/gpu", "/solo"] {
            let answer = gateway.get(path);
            assert_eq!(
                answer.status, 200,
                "{path} via {}: {answer:?}",
                gateway.address
            );
            assert_eq!(answer.body, "Hello from Lepton\n");
            assert!(answer.header("x-lepton-request-id").is_some());
        }
        let answer = gateway.get("/zone/echo");
        assert_eq!(answer.status, 200, "via {}: {answer:?}", gateway.address);
        assert_eq!(answer.body, "ok: 0 bytes\n");
        let answer = gateway.get("/nowhere");
        assert_eq!(answer.status, 503, "{answer:?}");
        assert!(answer.body.contains("no replica"), "{answer:?}");
    }
    // Bodies past the forwarding cap (8 MiB) are refused with a message that says so;
    // one under it travels.
    let body = vec![b'x'; 1 << 20];
    let answer =
        reply(ureq::post(&format!("http://{}/zone/echo", cloud.address)).send_bytes(&body));
    assert_eq!(answer.body, "ok: 1048576 bytes\n", "{answer:?}");
    let answer = crate::util::raw_request(
        &cloud.address,
        &format!(
            "POST /zone/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            9 << 20
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("forwards to another node"), "{answer}");

    // SIGKILL the node that runs `solo`: it comes back on the other zone-a node.
    let victim = if solo[0] == "edge-a" {
        &mut edge_a
    } else {
        &mut edge_a2
    };
    victim.kill_9();
    let healed = eventually(
        HEAL_BOUND,
        "/solo answers through cloud-1 after a node kill",
        || cloud.get("/solo").status == 200,
    );
    eprintln!("healed in {healed:?}");
    let survivor = if solo[0] == "edge-a" {
        "edge-a2"
    } else {
        "edge-a"
    };
    eventually(HEAL_BOUND, "the lost node is shown and solo moved", || {
        let status = admin_get(&control, &token, "/v1/status");
        let lost = status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == solo[0].as_str() && n["status"] == "lost");
        lost && placed_on(&status, "solo") == [survivor]
    });
    for path in ["/hello", "/solo", "/gpu"] {
        assert_eq!(edge_b.get(path).status, 200, "{path}");
    }
    for process in [&control, &cloud, &edge_b] {
        assert!(!process.log().contains("panicked"), "{}", process.log());
    }
}

const SCALED: &str = r#"name = "lazy"

[function.hello]
component = "{HELLO}"
route = "/hello"
scale = { min = 0, max = 2, target_concurrency = 10, scale_to_zero_after = "1s" }

[function.always]
component = "{HELLO}"
route = "/always"
"#;

/// The control plane killed and restarted loses nothing, and the nodes serve while it
/// is down; a standby takes over when the leader dies; a function with `min = 0`
/// starts on its first request and goes back to zero when idle.
#[test]
fn control_plane_restarts_standby_takes_over_and_functions_scale_to_zero() {
    let project = Project::new(&manifest(SCALED));
    let dir = project.dir.path();
    let mut hub = hub(dir);
    let url = hub_url(&hub);
    let mut first = control(dir, "control-a", &url, &[]);
    let token = token(dir, "control-a");
    let gateway = node(dir, "n1", &url, &["--labels", "tier=cloud"]);
    let out = deploy(&project, &first, &token);
    assert!(out.contains("deployed lazy version 1"), "{out}");
    assert_eq!(gateway.get("/always").status, 200);

    // Scaled to zero: nothing placed until a request comes; it is held, not refused.
    let status = admin_get(&first, &token, "/v1/status");
    assert!(placed_on(&status, "hello").is_empty(), "{status:#}");
    let cold = Instant::now();
    let answer = gateway.get("/hello");
    assert_eq!(answer.status, 200, "{answer:?}");
    eprintln!("cold start from zero: {:?}", cold.elapsed());
    eventually(
        PATIENCE,
        "hello goes back to zero replicas when idle",
        || placed_on(&admin_get(&first, &token, "/v1/status"), "hello").is_empty(),
    );
    assert_eq!(gateway.get("/hello").status, 200, "and comes back");

    // Killed: the node keeps serving; restarted on its state dir: nothing lost.
    first.kill_9();
    for _ in 0..20 {
        assert_eq!(gateway.get("/always").status, 200);
    }
    let token_file = dir.join("control-a/admin-token");
    let token_file = token_file.to_str().expect("utf-8");
    let restarted = control(dir, "control-a", &url, &[]);
    let apps = admin_get(&restarted, &token, "/v1/apps");
    assert_eq!(apps["apps"][0]["name"], "lazy", "{apps:#}");
    assert_eq!(apps["apps"][0]["active"], 1, "{apps:#}");

    // A standby on its own state dir (empty) and the leader's token waits; when the
    // leader dies it takes over with every app, and deploys go on from it.
    let standby_dir = dir.join("standby");
    std::fs::create_dir_all(&standby_dir).expect("mkdir");
    let standby = {
        let dir = dir.to_owned();
        let url = url.clone();
        let token_file = token_file.to_owned();
        std::thread::spawn(move || {
            control(
                &dir,
                "control-b",
                &url,
                &["--admin-token-file", &token_file],
            )
        })
    };
    eventually(PATIENCE, "the standby waits for the lease", || {
        std::fs::read_to_string(dir.join("control-b.log")).is_ok_and(|l| l.contains("standby"))
    });
    let mut restarted = restarted;
    restarted.kill_9();
    let standby = standby.join().expect("standby started");
    let apps = admin_get(&standby, &token, "/v1/apps");
    assert_eq!(apps["apps"][0]["name"], "lazy", "{apps:#}");
    std::fs::write(
        project.manifest(),
        manifest(&SCALED.replace(
            "route = \"/always\"",
            "route = \"/always\"\nenvironment = { V = \"2\" }",
        )),
    )
    .expect("write manifest");
    let out = deploy(&project, &standby, &token);
    assert!(out.contains("deployed lazy version 2"), "{out}");
    eventually(PATIENCE, "the node serves version 2", || {
        let status = admin_get(&standby, &token, "/v1/status");
        status["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["function"] == "always" && r["version"] == 2 && r["state"] == "running")
    });
    assert_eq!(gateway.get("/always").status, 200);

    // The node killed and started again at once on its state dir, before it counts as
    // lost: it runs what is still placed on it.
    let mut gateway = gateway;
    gateway.kill_9();
    let gateway = node(dir, "n1", &url, &["--labels", "tier=cloud"]);
    let answer = gateway.get("/always");
    assert_eq!(answer.status, 200, "{answer:?}\n{}", gateway.log());

    // NATS down (longer than the lease lasts): the node serves what it runs; when the
    // server is back everyone reconnects, the leader holds its lease again, and deploys
    // go on.
    hub.stop();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(4) {
        assert_eq!(gateway.get("/always").status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    hub.start_again();
    std::fs::write(
        project.manifest(),
        manifest(&SCALED.replace(
            "route = \"/always\"",
            "route = \"/always\"\nenvironment = { V = \"3\" }",
        )),
    )
    .expect("write manifest");
    eventually(PATIENCE, "a deploy goes through after NATS is back", || {
        let admin = format!("http://{}", standby.address);
        let (status, out, _) = run_lepton(
            dir,
            &["deploy", "--admin", &admin],
            &[("LEPTON_ADMIN_TOKEN", token.as_str())],
        );
        status.success() && out.contains("deployed lazy version 3")
    });
    let serves_3 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually(PATIENCE, "the node serves version 3", || {
            admin_get(&standby, &token, "/v1/status")["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["function"] == "always" && r["version"] == 3 && r["state"] == "running")
        })
    }));
    assert!(
        serves_3.is_ok(),
        "control:\n{}\nnode:\n{}",
        standby.log(),
        gateway.log()
    );
    assert!(standby.log().contains("holding it again") || standby.log().contains("renewed again"));
}

/// A node with the wrong NATS password is refused and says why; a blob changed in
/// the object store is refused by the node that fetches it.
#[test]
fn wrong_credentials_and_tampered_blobs_are_refused() {
    let project = Project::new(&manifest(
        "name = \"t\"\n[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\ntimeout = \"2s\"\n",
    ));
    let dir = project.dir.path();
    let hub = hub(dir);
    let url = hub_url(&hub);
    let wrong = format!("nats://lepton:wrong@{}", hub.client);
    let (status, out, err) = run_lepton(
        dir,
        &[
            "node",
            "--nats",
            &wrong,
            "--name",
            "intruder",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!status.success(), "{out}{err}");
    assert!(err.to_lowercase().contains("authorization"), "{err}");

    let control = control(dir, "control", &url, &[]);
    let token = token(dir, "control");
    deploy(&project, &control, &token);
    // Someone with bus access rewrites the component's object.
    let digest = {
        let bytes = std::fs::read(crate::util::artifacts::HELLO).expect("hello");
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .user_and_password("lepton".into(), "s3cret".into())
            .connect(hub.client.as_str())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        let blobs = js
            .get_object_store("lepton_blobs")
            .await
            .expect("object store");
        let mut evil: &[u8] = b"not the component";
        blobs
            .put(digest.as_str(), &mut evil)
            .await
            .expect("overwrite");
    });
    let victim = node(dir, "n1", &url, &[]);
    eventually(PATIENCE, "the node refuses the tampered blob", || {
        victim.log().contains("the bytes hash to")
    });
    eventually(
        PATIENCE,
        "the replica is reported failed, with the reason",
        || {
            let status = admin_get(&control, &token, "/v1/status");
            status["replicas"][0]["state"] == "failed"
                && status["replicas"][0]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("hash"))
        },
    );
    assert!(!victim.log().contains("serving what is placed here"));
    assert_eq!(victim.get("/hello").status, 503);
}

#[test]
fn key_value_stores_are_shared_by_every_replica_across_the_hub_and_an_edge_site() {
    let project = Project::new(&manifest(
        "name = \"shop\"\n[function.kv]\ncomponent = \"{KV}\"\nroute = \"/kv/...\"\nreplicas = 2\nkey_value_stores = [\"default\"]\n",
    ));
    let dir = project.dir.path();
    let hub = hub(dir);
    let leaf = leaf(dir, &hub);
    let url = hub_url(&hub);
    let control = control(dir, "control", &url, &[]);
    let token = token(dir, "control");
    let cloud = node(dir, "cloud-1", &url, &[]);
    // The edge node reaches JetStream through its site's leaf server.
    let edge_url = format!("nats://edge:edgepw@{}", leaf.client);
    let edge = node(dir, "edge-1", &edge_url, &["--jetstream-domain", "hub"]);
    deploy(&project, &control, &token);
    eventually(PATIENCE, "both replicas serve", || {
        let status = admin_get(&control, &token, "/v1/status");
        placed_on(&status, "kv").len() == 2
            && [&cloud, &edge]
                .iter()
                .all(|n| n.get("/kv/keys").status == 200)
    });
    // A write on one node is read on the other.
    let put =
        reply(ureq::put(&format!("http://{}/kv/set/greeting", cloud.address)).send_bytes(b"hello"));
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(edge.get("/kv/get/greeting").body, "hello");
    // Increments from both nodes at once lose none (compare-and-set on the bucket).
    let threads: Vec<_> = [&cloud, &edge]
        .iter()
        .flat_map(|n| {
            let address = n.address.clone();
            (0..3).map(move |_| {
                let address = address.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        let answer = reply(
                            ureq::post(&format!("http://{address}/kv/increment/hits")).call(),
                        );
                        assert_eq!(answer.status, 200, "{}", answer.body);
                    }
                })
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("no panic");
    }
    assert_eq!(cloud.get("/kv/get/hits").body, "60");
    assert_eq!(edge.get("/kv/get/hits").body, "60");
    assert_eq!(edge.get("/kv/keys").body, "greeting\nhits\n");
}

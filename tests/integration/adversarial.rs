//! The node under attack (issue 9): each test reproduces a hole found by attacking the
//! real binary, and keeps it closed. The abuse that already held is kept here too.

use std::time::{Duration, Instant};

use crate::util::{Project, manifest};

/// The `q`-quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index.min(samples.len() - 1)]
}

#[test]
fn twenty_spinning_guests_do_not_starve_another_function_and_time_out_as_504() {
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"4s\"\nmax_concurrency = 20\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up();
    let spinners: Vec<_> = (0..20).map(|_| lepton.get_in_background("/spin")).collect();
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 20);
    let mut latencies = Vec::new();
    while latencies.len() < 100 && lepton.metric("lepton_requests_in_flight", "spin") == 20 {
        let started = Instant::now();
        assert_eq!(lepton.get("/hello").status, 200);
        latencies.push(started.elapsed());
    }
    assert!(latencies.len() >= 50, "only {} samples", latencies.len());
    let p50 = quantile(&mut latencies, 0.5);
    let p99 = quantile(&mut latencies, 0.99);
    // Before the long lane: p50 ≈ 550 ms on 2 cores. The bench measures the real
    // figure (≤ 10 ms); this bound leaves room for a CI machine running other tests.
    assert!(
        p50 < Duration::from_millis(50) && p99 < Duration::from_millis(250),
        "hello p50 {p50:?}, p99 {p99:?} while 20 guests spin"
    );
    for spinner in spinners {
        assert_eq!(spinner.join().expect("thread").status, 504);
    }
    // Timeouts are timeouts: counted as such, not as failures.
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"timeout\"}", "spin"),
        20
    );
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"trap\"}", "spin"),
        0
    );
    assert!(
        !lepton.log().contains("wasm trap: interrupt"),
        "a timeout was logged as a trap"
    );
}

/// `VmHWM` of process `pid` (peak resident set), in bytes.
fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// A `kB` field of `/proc/PID/status` (`VmHWM:`, `VmRSS:`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        * 1024
}

/// Resets the peak resident set of `pid` to its current one.
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}

/// Sends `POST path` announcing `len` bytes and sends them in 1 MiB pieces, `pause`
/// apart; returns the status line's code, if an answer came.
fn slow_upload(address: &str, path: &str, len: usize, pause: Duration) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(crate::util::PATIENCE))
        .expect("timeout");
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    let mut sent = stream.write_all(head.as_bytes()).is_ok();
    let piece = vec![b'u'; 1 << 20];
    let mut left = len;
    while sent && left > 0 {
        let n = left.min(piece.len());
        sent = stream.write_all(&piece[..n]).is_ok();
        left -= n;
        std::thread::sleep(pause);
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

#[test]
fn slow_uploads_are_refused_before_their_bodies_are_read() {
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\nmax_concurrency = 1\nmax_queue = 1\nmax_body_size = \"16MiB\"\ntimeout = \"30s\"\n",
    ));
    let lepton = project.up();
    let pid = lepton.child.id();
    assert_eq!(lepton.post("/probe/echo", b"warm").status, 200);
    reset_peak_rss(pid);
    let before = peak_rss(pid);
    let uploads: Vec<_> = (0..100)
        .map(|_| {
            let address = lepton.address.clone();
            std::thread::spawn(move || {
                slow_upload(&address, "/probe/echo", 10 << 20, Duration::from_millis(20))
            })
        })
        .collect();
    let statuses: Vec<_> = uploads
        .into_iter()
        .map(|u| u.join().expect("thread"))
        .collect();
    let grown = peak_rss(pid).saturating_sub(before);
    let served = statuses.iter().filter(|s| **s == Some(200)).count();
    let refused = statuses.iter().filter(|s| **s == Some(503)).count();
    assert!(served >= 1 && refused >= 50, "statuses {statuses:?}");
    // Before admission came first this took the node up by about 1 GiB.
    assert!(
        grown < 120 << 20,
        "peak RSS grew by {} MiB under 100 slow 10 MiB uploads",
        grown >> 20
    );
    assert_eq!(lepton.post("/probe/echo", b"after").body, "ok: 5 bytes\n");
}

/// A node-wide gauge (no labels) from the metrics page.
fn node_gauge(lepton: &crate::util::Lepton, name: &str) -> u64 {
    let metrics = lepton.get("/.well-known/lepton/metrics").body;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

#[test]
fn bodies_past_the_node_wide_budget_get_503_and_the_budget_comes_back() {
    use std::io::{Read as _, Write as _};
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\nmax_concurrency = 4\nmax_body_size = \"8MiB\"\ntimeout = \"30s\"\n",
    ));
    let lepton = project.up_with(&["--max-body-memory", "4MiB"], &[]);
    assert_eq!(
        node_gauge(&lepton, "lepton_request_body_bytes_budget"),
        4 << 20
    );
    // One upload announces 3.5 MiB and sends 3 MiB of it: the node holds what arrived.
    let mut first = std::net::TcpStream::connect(&lepton.address).expect("connect");
    first
        .write_all(b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3670016\r\n\r\n")
        .expect("write");
    first.write_all(&vec![b'a'; 3 << 20]).expect("write");
    let started = Instant::now();
    while node_gauge(&lepton, "lepton_request_body_bytes_held") < 3 << 20 {
        assert!(started.elapsed() < crate::util::PATIENCE, "never reserved");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A second that would take the node past 4 MiB is refused, the function idle or
    // not, before it sends its body (as curl does for large bodies, it asks first).
    let mut second = std::net::TcpStream::connect(&lepton.address).expect("connect");
    second
        .write_all(b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2097152\r\nexpect: 100-continue\r\n\r\n")
        .expect("write");
    let mut refused = String::new();
    let _ = second.read_to_string(&mut refused);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    // A small one still fits.
    assert_eq!(lepton.post("/probe/echo", b"small").body, "ok: 5 bytes\n");
    first.write_all(&vec![b'a'; 512 << 10]).expect("write");
    let mut answer = [0_u8; 12];
    first.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"HTTP/1.1 200");
    drop(first);
    let started = Instant::now();
    while node_gauge(&lepton, "lepton_request_body_bytes_held") != 0 {
        assert!(started.elapsed() < crate::util::PATIENCE, "never released");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        lepton.post("/probe/echo", &vec![b'c'; 2 << 20]).body,
        "ok: 2097152 bytes\n"
    );
}

/// nnprobe with uploads allowed and no model or file granted.
fn uploader() -> Project {
    let project = Project::new(&manifest(
        "[function.nn]\ncomponent = \"{NNPROBE}\"\nroute = \"/nn/...\"\nallow_model_upload = true\n",
    ));
    std::fs::write(project.path("secret.txt"), "the operator's secret\n").expect("write");
    project
}

#[test]
fn an_uploaded_model_cannot_read_host_files_as_external_data() {
    let project = uploader();
    let lepton = project.up_with_ort();
    // Relative to lepton's working directory (the project), absolute, and escaping.
    for location in [
        "secret.txt",
        "lepton.toml",
        "/etc/hostname",
        "../secret.txt",
    ] {
        let model = crate::onnx::external_data_model(location, 8);
        let reply = lepton.post("/nn/upload", &model);
        assert!(
            reply
                .body
                .starts_with("error: ErrorCode::InvalidEncoding: ")
                && reply.body.contains("external data"),
            "{location}: {reply:?}"
        );
    }
    // A manifest model may not name external data either (each model is one blob).
    let manifest_model = Project::new(&manifest(
        "[model.m]\npath = \"m.onnx\"\n[function.nn]\ncomponent = \"{NNPROBE}\"\nroute = \"/nn/...\"\nmodels = [\"m\"]\n",
    ));
    std::fs::write(
        manifest_model.path("m.onnx"),
        crate::onnx::external_data_model("m.data", 4),
    )
    .expect("write");
    std::fs::write(manifest_model.path("m.data"), "data").expect("write");
    let (status, _, stderr) = crate::util::run_lepton(
        manifest_model.dir.path(),
        &["check", "lepton.toml"],
        &[(
            "ORT_DYLIB_PATH",
            crate::util::ort_library().to_str().expect("utf-8"),
        )],
    );
    assert!(!status.success(), "check passed: {stderr}");
    assert!(stderr.contains("external data"), "{stderr}");
}

#[test]
fn an_uploaded_model_may_not_use_unbounded_operators() {
    let project = uploader();
    let lepton = project.up_with_ort();
    let reply = lepton.post("/nn/upload", &crate::onnx::constant_of_shape_model());
    assert!(
        reply
            .body
            .contains("operator `ConstantOfShape` is not allowed"),
        "{reply:?}"
    );
    assert_eq!(
        lepton
            .post(
                "/nn/upload",
                &crate::onnx::identity_model(&[("x", "FP32")], 1)
            )
            .body,
        "ok\n"
    );
}

/// User plus system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses): utime is the 14th field
    // of the line, stime the 15th, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

#[test]
fn an_inference_past_the_deadline_is_stopped_and_keeps_no_core() {
    inference_past_the_deadline("");
}

#[test]
fn a_batched_inference_past_the_deadline_is_stopped_too() {
    inference_past_the_deadline("batch = { max_size = 4, max_wait = \"1ms\" }\n");
}

fn inference_past_the_deadline(model_extra: &str) {
    let project = Project::new(&manifest(&format!(
        "[model.endless]\npath = \"endless.onnx\"\n{model_extra}\
         [function.nn]\ncomponent = \"{{NNPROBE}}\"\nroute = \"/nn/...\"\nmodels = [\"endless\"]\ntimeout = \"1s\"\n",
    )));
    std::fs::write(
        project.path("endless.onnx"),
        crate::onnx::endless_loop_model(),
    )
    .expect("write");
    let lepton = project.up_with_ort();
    let input = crate::util::tensor_line("v", "FP32", &[1], &1.0_f32.to_le_bytes());
    let reply = lepton.post("/nn/compute/endless", input.as_bytes());
    assert_eq!(reply.status, 504, "{reply:?}");
    // The run is terminated at the deadline: over the next second the node is idle.
    let pid = lepton.child.id();
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(300),
        "the abandoned inference kept running: {used:?} of CPU in 1 s"
    );
    assert_eq!(lepton.get("/.well-known/lepton/health").status, 200);
}

/// The compiled components in a state dir's cache, by name.
fn cached_components(state: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(state.join("components"))
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

#[test]
fn a_tampered_compile_cache_is_recompiled_not_run() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let state = project.path("state");
    drop(project.up());
    let hello = cached_components(&state);
    assert_eq!(hello.len(), 1);
    std::fs::write(
        project.manifest(),
        manifest(
            "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n\
             [function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n",
        ),
    )
    .expect("write");
    drop(project.up());
    let probe: Vec<_> = cached_components(&state)
        .into_iter()
        .filter(|p| !hello.contains(p))
        .collect();
    assert_eq!(probe.len(), 1);
    // Another guest's valid machine code under probe's name...
    std::fs::copy(&hello[0], &probe[0]).expect("copy");
    // ...and hello's own code with a stretch of its middle overwritten.
    let mut bytes = std::fs::read(&hello[0]).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle..middle + 4096].fill(0xcc);
    std::fs::write(&hello[0], &bytes).expect("write");
    let lepton = project.up();
    assert_eq!(lepton.post("/probe/echo", b"abc").body, "ok: 3 bytes\n");
    assert_eq!(lepton.get("/hello").body, "Hello from Lepton\n");
    let log = lepton.log();
    assert_eq!(
        log.matches("recompiling: the cached component is not usable")
            .count(),
        2,
        "{log}"
    );
}

#[test]
fn a_state_dir_others_can_write_is_refused_and_new_ones_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let state = project.path("state");
    drop(project.up());
    let mode = std::fs::metadata(&state)
        .expect("state")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "new state dir mode {mode:o}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let state_arg = state.to_str().expect("utf-8");
    let (status, _, stderr) = project.run(&[
        "up",
        "--state-dir",
        state_arg,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("writable by its group or by others (mode 0777)"),
        "{stderr}"
    );
}

#[test]
fn temporary_files_left_by_a_kill_are_removed_at_start() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let state = project.path("state");
    drop(project.up());
    let left = state.join("blobs/sha256/.abc.tmp-1-0");
    std::fs::write(&left, b"half a blob").expect("write");
    let lepton = project.up();
    assert!(!left.exists(), "the temporary file is still there");
    assert_eq!(lepton.get("/hello").status, 200);
}

#[test]
fn a_fifo_or_a_device_named_as_a_component_is_refused_at_once() {
    let project = Project::new(&manifest(
        "[function.f]\ncomponent = \"fifo.wasm\"\nroute = \"/f\"\n",
    ));
    let made = std::process::Command::new("mkfifo")
        .arg(project.path("fifo.wasm"))
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let (status, _, stderr) = project.run(&["check", "lepton.toml"]);
    assert!(!status.success());
    assert!(stderr.contains("not a regular file"), "{stderr}");
    std::fs::write(
        project.manifest(),
        manifest("[function.f]\ncomponent = \"/dev/zero\"\nroute = \"/f\"\n"),
    )
    .expect("write");
    let (status, _, stderr) = project.run(&["check", "lepton.toml"]);
    assert!(!status.success());
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn a_broken_log_pipe_does_not_stop_the_node() {
    use std::io::BufRead as _;
    let project = Project::new(&manifest(
        "[function.trap]\ncomponent = \"{TRAP}\"\nroute = \"/trap\"\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    // As `lepton up 2>&1 | tee log` when tee dies: stderr is a pipe nobody reads.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lepton"))
        .current_dir(project.dir.path())
        .args([
            "up",
            "lepton.toml",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .env("LEPTON_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stderr.take());
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut address = None;
    while address.is_none() {
        line.clear();
        assert!(
            stdout.read_line(&mut line).expect("read") > 0,
            "no ready line"
        );
        address = line
            .trim_end()
            .strip_prefix("lepton: listening on http://")
            .map(str::to_owned);
    }
    let address = address.expect("address");
    let get = |path: &str| crate::util::reply(ureq::get(&format!("http://{address}{path}")).call());
    for _ in 0..20 {
        assert_eq!(get("/trap").status, 500); // Each logs an error with a backtrace.
        assert_eq!(get("/hello").status, 200);
    }
    let metrics = get("/.well-known/lepton/metrics").body;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lepton_log_records_dropped_total "))
        .and_then(|v| v.parse().ok())
        .expect("dropped counter");
    assert!(dropped > 0, "{metrics}");
    assert!(child.try_wait().expect("wait").is_none(), "the node exited");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn guest_log_floods_share_a_node_wide_budget() {
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\nmax_concurrency = 20\n",
    ));
    let lepton = project.up();
    // 20 requests at once, each printing 2 MiB (its own cap is 1 MiB): 20 MiB logged before.
    let started = Instant::now();
    let floods: Vec<_> = (0..20)
        .map(|_| lepton.get_in_background("/probe/flood?2048"))
        .collect();
    for flood in floods {
        assert_eq!(flood.join().expect("thread").status, 200);
    }
    let logged = std::fs::metadata(&lepton.log_path).expect("log").len();
    // The burst (4 MiB) and what refilled while they ran (1 MiB/s), with room for the
    // records' fields (a third) and the node's own lines.
    let allowed =
        (4.0 + started.elapsed().as_secs_f64()) * 1.34 * f64::from(1 << 20) + f64::from(1 << 20);
    assert!(
        (logged as f64) < allowed && logged < 20 << 20,
        "{} MiB of log in {:?}",
        logged >> 20,
        started.elapsed()
    );
    let dropped = node_gauge(&lepton, "lepton_guest_log_bytes_dropped_total");
    assert!(dropped > 4 << 20, "{dropped} bytes dropped");
}

#[test]
fn an_allowed_name_that_resolves_to_an_internal_address_is_refused() {
    let target = crate::util::pong_server();
    let port = target.rsplit(':').next().expect("port").to_owned();
    let project = Project::new(&manifest(&format!(
        "[function.probe]\ncomponent = \"{{PROBE}}\"\nroute = \"/probe/...\"\n\
         allowed_outbound_hosts = [\"http://localhost:{port}\", \"http://{target}\"]\n"
    )));
    let lepton = project.up();
    // `localhost` is allowed by name, but it is loopback: only a literal address grants that.
    let by_name = lepton.get(&format!("/probe/http?http://localhost:{port}/ping"));
    assert_eq!(by_name.status, 403, "{by_name:?}");
    assert!(
        by_name.body.contains("DestinationIpProhibited"),
        "{by_name:?}"
    );
    lepton.wait_for_log("resolves to the internal address");
    let literal = lepton.get(&format!("/probe/http?http://{target}/ping"));
    assert_eq!(literal.body, "ok: 200 pong\n");
}

#[test]
fn a_function_has_at_most_16_outbound_requests_open() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    // A server that takes connections and answers none until told to.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("address").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    {
        let (accepted, held) = (Arc::clone(&accepted), Arc::clone(&held));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.lock().expect("lock").push(stream);
            }
        });
    }
    let project = Project::new(&manifest(&format!(
        "[function.probe]\ncomponent = \"{{PROBE}}\"\nroute = \"/probe/...\"\nmax_concurrency = 32\n\
         allowed_outbound_hosts = [\"http://{target}\"]\n"
    )));
    let lepton = project.up();
    let requests: Vec<_> = (0..20)
        .map(|_| lepton.get_in_background(&format!("/probe/http?http://{target}/slow")))
        .collect();
    let started = Instant::now();
    while accepted.load(Ordering::SeqCst) < 16
        || requests.iter().filter(|r| r.is_finished()).count() < 4
    {
        assert!(
            started.elapsed() < crate::util::PATIENCE,
            "accepted {accepted:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 16);
    for mut stream in held.lock().expect("lock").drain(..) {
        let _ = std::io::Write::write_all(
            &mut stream,
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow",
        );
    }
    let replies: Vec<_> = requests
        .into_iter()
        .map(|r| r.join().expect("thread"))
        .collect();
    let answered = replies
        .iter()
        .filter(|r| r.body == "ok: 200 slow\n")
        .count();
    let limited = replies
        .iter()
        .filter(|r| r.body.contains("ConnectionLimitReached"))
        .count();
    assert_eq!((answered, limited), (16, 4), "{replies:?}");
}

#[test]
fn host_paths_answer_get_and_head_only() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/...\"\n",
    ));
    let lepton = project.up();
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let reply = crate::util::reply(
            ureq::request(method, &lepton.url("/.well-known/lepton/health")).call(),
        );
        assert_eq!(reply.status, 405, "{method}: {reply:?}");
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    }
    let head = crate::util::reply(ureq::head(&lepton.url("/.well-known/lepton/metrics")).call());
    assert_eq!(head.status, 200);
    assert_eq!(lepton.get("/.well-known/lepton/health").body, "ok\n");
}

#[test]
fn duplicate_input_names_are_invalid_arguments() {
    let project = crate::train::probe_project("");
    let lepton = project.up_with_ort();
    let image = crate::train::images(1, 64);
    let reply = lepton.post("/nn/compute/digits", format!("{image}{image}").as_bytes());
    assert!(
        reply.body.contains("InvalidArgument") && reply.body.contains("more than once"),
        "{reply:?}"
    );
}

#[test]
fn model_counters_never_go_backwards_when_a_publish_replaces_the_model() {
    let project = crate::train::probe_project("");
    let lepton = project.up_with_ort();
    let image = crate::train::images(1, 64);
    for _ in 0..3 {
        assert_eq!(
            lepton.post("/nn/compute/digits", image.as_bytes()).status,
            200
        );
    }
    let requests = lepton.metric("lepton_model_requests_total", "digits");
    let runs = lepton.metric("lepton_model_runs_total", "digits");
    assert!(requests >= 3 && runs >= 3, "{requests} {runs}");
    assert_eq!(lepton.post("/nn/publish/digits/digits", b"").body, "ok\n");
    assert!(lepton.metric("lepton_model_requests_total", "digits") >= requests);
    assert!(lepton.metric("lepton_model_runs_total", "digits") >= runs);
    assert_eq!(
        lepton.post("/nn/compute/digits", image.as_bytes()).status,
        200
    );
    assert_eq!(
        lepton.metric("lepton_model_requests_total", "digits"),
        requests + 1
    );
    assert_eq!(lepton.metric("lepton_model_runs_total", "digits"), runs + 1);
}

#[test]
fn a_second_signal_exits_at_once() {
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"60s\"\n",
    ));
    let mut lepton = project.up();
    let _spinning = lepton.get_in_background("/spin");
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 1);
    lepton.signal("TERM");
    // The first asks for a drain (which would wait up to 30 s for the spinning guest).
    lepton.wait_for_log("SIGTERM received");
    let started = Instant::now();
    lepton.signal("INT");
    let status = lepton.child.wait().expect("wait");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{status:?}");
}

#[test]
fn a_half_sent_request_does_not_hold_shutdown() {
    use std::io::Write as _;
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let mut lepton = project.up();
    let mut stream = std::net::TcpStream::connect(&lepton.address).expect("connect");
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nhost: lo")
        .expect("write");
    // The node has the connection (it answers others meanwhile).
    assert_eq!(lepton.get("/hello").status, 200);
    let started = Instant::now();
    let status = lepton.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
    // The header read timeout is 10 s: shutting down must not wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}

/// Every checkpoint file under the state dir's trainers, newest name last.
fn checkpoint_files(state: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for trainer in std::fs::read_dir(state.join("trainers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for app_trainer in std::fs::read_dir(trainer.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = app_trainer.path().join("checkpoints");
            found.extend(
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
    found.sort();
    found
}

#[test]
fn an_unreadable_checkpoint_falls_back_to_the_last_good_one_and_is_kept_aside() {
    let project = crate::train::probe_project("checkpoint_every = \"1h\"");
    let batch = crate::train::images(4, 64) + &crate::train::labels(&[1, 2, 3, 4]);
    {
        let lepton = project.up_with_ort();
        for round in 0..2 {
            for _ in 0..5 {
                lepton.post("/nn/step/digits", batch.as_bytes());
            }
            assert_eq!(
                lepton.post("/nn/checkpoint/digits", b"").body,
                "ok\n",
                "round {round}"
            );
        }
    }
    let files = checkpoint_files(&project.path("state"));
    assert_eq!(files.len(), 2, "{files:?}");
    for garbage in [
        &b""[..],
        b"\x0a\x03abc",
        b"random bytes that are not a model",
    ] {
        std::fs::write(&files[1], garbage).expect("corrupt the newest");
        let lepton = project.up_with_ort();
        let (steps, _) = crate::train::steps_and_loss(
            &lepton.post("/nn/evaluate/digits", batch.as_bytes()).body,
        );
        assert_eq!(steps, 5, "resumed from the older checkpoint");
        lepton.wait_for_log("is not usable, moved to");
        // The next checkpoint is a new file: nothing is overwritten.
        lepton.post("/nn/step/digits", batch.as_bytes());
        assert_eq!(lepton.post("/nn/checkpoint/digits", b"").body, "ok\n");
        drop(lepton);
        let now = checkpoint_files(&project.path("state"));
        assert_eq!(now.len(), 2, "{now:?}");
        assert!(
            now[1]
                .to_string_lossy()
                .ends_with("step-00000000000000000006.onnx"),
            "{now:?}"
        );
        std::fs::remove_file(&now[1]).expect("back to two");
        std::fs::copy(&now[0], &files[1]).expect("restore the layout");
    }
    let bad = std::fs::read_dir(
        files[0]
            .parent()
            .expect("dir")
            .parent()
            .expect("dir")
            .join("bad"),
    )
    .expect("bad dir")
    .count();
    assert_eq!(bad, 3, "every bad checkpoint is kept");
}

/// The `Seccomp:` mode of every thread of process `pid` (0 off, 2 filtered).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            (field("Name:"), field("Seccomp:"))
        })
        .collect()
}

#[test]
fn every_thread_runs_under_seccomp_and_the_node_still_does_everything() {
    let project = crate::train::probe_project("checkpoint_every = \"1h\"");
    let lepton = project.up_with_ort();
    let log = lepton.wait_for_log("starting a program fails with EPERM");
    assert!(log.contains("seccomp on for every thread"), "{log}");
    // Inference, training, a checkpoint and a publish: threads made after the filter.
    let batch = crate::train::images(4, 64) + &crate::train::labels(&[1, 2, 3, 4]);
    assert_eq!(
        lepton
            .post("/nn/compute/digits", crate::train::images(2, 64).as_bytes())
            .status,
        200
    );
    assert!(
        lepton
            .post("/nn/step/digits", batch.as_bytes())
            .body
            .starts_with("loss ")
    );
    assert_eq!(lepton.post("/nn/checkpoint/digits", b"").body, "ok\n");
    assert_eq!(lepton.post("/nn/publish/digits/digits", b"").body, "ok\n");
    // A deploy through the admin API: blobs written, a component compiled and cached.
    let app = project.path("other.toml");
    std::fs::write(
        &app,
        manifest(
            "name = \"other\"\n[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
        ),
    )
    .expect("write");
    let (status, _, stderr) = lepton.client(&project, &["deploy", app.to_str().expect("utf-8")]);
    assert!(status.success(), "{stderr}");
    assert_eq!(lepton.get("/hello").status, 200);
    let modes = seccomp_modes(lepton.child.id());
    assert!(modes.len() > 4, "{modes:?}");
    assert!(
        modes.iter().all(|(_, mode)| mode == "2"),
        "threads without the filter: {modes:?}"
    );
}

#[test]
fn no_seccomp_runs_without_the_filter() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up_with(&["--no-seccomp"], &[]);
    assert_eq!(lepton.get("/hello").status, 200);
    let modes = seccomp_modes(lepton.child.id());
    assert!(modes.iter().all(|(_, mode)| mode == "0"), "{modes:?}");
    lepton.wait_for_log("--no-seccomp: running without the seccomp filter");
}

/// Sends raw bytes on a fresh connection (closing the write half after), and returns
/// what came back, whatever it is; `None` if the node answered nothing in time.
fn raw_exchange(address: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    match stream.take(1 << 20).read_to_end(&mut answer) {
        Ok(_) => Some(answer),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Some(answer),
        Err(_) => None,
    }
}

/// The status codes of every response in `answer` (pipelined responses included).
fn statuses(answer: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(answer);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

fn abuse_project() -> Project {
    Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n\
         [function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\nmax_body_size = \"64KiB\"\n",
    ))
}

#[test]
fn http_abuse_that_held_keeps_holding() {
    let project = abuse_project();
    let lepton = project.up();
    let huge_header = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let mut past_cap =
        b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n11170\r\n"
            .to_vec();
    past_cap.extend(std::iter::repeat_n(b'c', 0x11170));
    past_cap.extend(b"\r\n0\r\n\r\n");
    let many_headers = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\n{}\r\n",
        (0..500)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: &[(&str, &[u8], &[u16])] = &[
        // Smuggling: with both framings the chunked one counts and the connection is
        // closed after (RFC 9112 6.3), so nothing is left to smuggle; two lengths are refused.
        ("CL and TE", b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nhost: x\r\n\r\n", &[200]),
        ("two lengths", b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab", &[400]),
        ("bad chunk size", b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", &[400]),
        ("chunk past the body cap", past_cap.as_slice(), &[413]),
        ("huge header", huge_header.as_bytes(), &[431]),
        ("many headers", many_headers.as_bytes(), &[431]),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", &[400]),
        ("bad version", b"GET /hello HTTP/9.9\r\nhost: x\r\n\r\n", &[400]),
        ("escape", b"GET /probe/../hello HTTP/1.1\r\nhost: x\r\n\r\n", &[400]),
        ("encoded escape", b"GET /probe/%2e%2E/hello HTTP/1.1\r\nhost: x\r\n\r\n", &[400]),
        ("truncated body", b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab", &[400]),
    ];
    let mut wrong = Vec::new();
    for (name, bytes, expected) in cases {
        let answer =
            raw_exchange(&lepton.address, bytes).unwrap_or_else(|| panic!("{name}: no answer"));
        if &statuses(&answer) != expected {
            wrong.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)])
            ));
        }
        if *name == "CL and TE" {
            let text = String::from_utf8_lossy(&answer);
            assert!(
                text.contains("connection: close") && text.contains("ok: 0 bytes"),
                "{text}"
            );
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Pipelining: both answered, in order, on one connection.
    let pipelined = crate::util::raw_request(
        &lepton.address,
        "GET /hello HTTP/1.1\r\nhost: x\r\n\r\nPOST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nab",
    );
    assert_eq!(statuses(pipelined.as_bytes()), [200, 200], "{pipelined}");
    assert!(
        pipelined.find("Hello from Lepton") < pipelined.find("ok: 2 bytes"),
        "{pipelined}"
    );
    assert_eq!(lepton.get("/hello").status, 200);
}

#[test]
fn slowloris_headers_are_cut_off() {
    use std::io::{Read as _, Write as _};
    let project = abuse_project();
    let lepton = project.up();
    // Headers that never end: the connection is closed by the header read timeout (10 s).
    let mut stream = std::net::TcpStream::connect(&lepton.address).expect("connect");
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nx-a: 1\r\n")
        .expect("write");
    stream
        .set_read_timeout(Some(crate::util::PATIENCE))
        .expect("timeout");
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "held for {:?}",
        started.elapsed()
    );
    assert_eq!(lepton.get("/hello").status, 200);
}

#[test]
fn raw_http_fuzzing_never_takes_the_node_down() {
    use rand::{Rng as _, SeedableRng as _};
    let cases: usize = std::env::var("LEPTON_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("LEPTON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()));
    eprintln!("raw HTTP fuzzing: {cases} cases, LEPTON_FUZZ_SEED={seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let project = abuse_project();
    let lepton = project.up();
    let corpus: [&[u8]; 6] = [
        b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n",
        b"HEAD /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
        b"POST /probe/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\nPOST /probe/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nab",
        b"GET /.well-known/lepton/metrics HTTP/1.1\r\nhost: x\r\n\r\n",
    ];
    let tokens: [&[u8]; 10] = [
        b"\r\n",
        b"\n",
        b"\0",
        b":",
        b" ",
        b"%2e%2e/",
        b"transfer-encoding: chunked\r\n",
        b"content-length: 99999999999\r\n",
        b"\xff\xfe",
        b"/../",
    ];
    for case in 0..cases {
        let mut bytes = corpus[rng.gen_range(0..corpus.len())].to_vec();
        for _ in 0..rng.gen_range(1..6) {
            let at = rng.gen_range(0..=bytes.len());
            match rng.gen_range(0..5) {
                0 if !bytes.is_empty() => {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] = rng.r#gen();
                }
                1 => {
                    let token = tokens[rng.gen_range(0..tokens.len())];
                    bytes.splice(at..at, token.iter().copied());
                }
                2 if at < bytes.len() => {
                    let end = rng.gen_range(at..=bytes.len());
                    bytes.drain(at..end);
                }
                3 => bytes
                    .splice(at..at, std::iter::repeat_n(b'a', rng.gen_range(0..70_000)))
                    .for_each(drop),
                _ => bytes.truncate(at),
            }
        }
        let answer = raw_exchange(&lepton.address, &bytes);
        if let Some(answer) = &answer {
            // Whatever was sent, the node never fails on it.
            assert!(
                !statuses(answer).contains(&500),
                "case {case} (seed {seed}) got a 500 for {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
            );
        }
        if case % 25 == 0 {
            assert_eq!(
                lepton.get("/.well-known/lepton/health").status,
                200,
                "case {case}, seed {seed}"
            );
        }
    }
    assert_eq!(lepton.get("/hello").status, 200);
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"trap\"}", "probe"),
        0
    );
}

#[test]
fn a_host_header_that_is_not_an_authority_is_a_client_error() {
    // Found by the raw HTTP fuzzer: a 500 ("guest failed") before.
    let project = abuse_project();
    let lepton = project.up();
    for host in [&b"\xffx"[..], b"a b", b"x/y", b"[::1"] {
        let mut request = b"GET /hello HTTP/1.1\r\nhost: ".to_vec();
        request.extend_from_slice(host);
        request.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
        let answer = raw_exchange(&lepton.address, &request).expect("answer");
        assert_eq!(
            statuses(&answer),
            [400],
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"trap\"}", "hello"),
        0
    );
}

/// `VmRSS` of process `pid` now, in bytes.
fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

#[test]
fn memory_of_finished_requests_is_given_back() {
    let project = Project::new(&manifest(
        "[function.hog]\ncomponent = \"{HOG}\"\nroute = \"/hog/...\"\nmemory_limit = \"256MiB\"\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up();
    let pid = lepton.child.id();
    let before = rss(pid);
    for _ in 0..16 {
        let reply = lepton.get("/hog");
        assert!(reply.body.starts_with("allocated 25"), "{reply:?}");
    }
    // Each request touched about 255 MiB; 16 of them left 4.1 GiB resident before.
    let grown = rss(pid).saturating_sub(before);
    eprintln!(
        "resident after 16 requests of 255 MiB: +{} MiB",
        grown >> 20
    );
    assert!(
        grown < 700 << 20,
        "{} MiB still resident after the requests",
        grown >> 20
    );
    // Serving goes on, for the large guest and the small one.
    assert!(lepton.get("/hog").body.starts_with("allocated 25"));
    for _ in 0..100 {
        assert_eq!(lepton.get("/hello").status, 200);
    }
}

#[test]
fn the_compile_cache_is_reused_under_a_group_writable_umask() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    // As on Debian for users with a private group (umask 002): files we write must
    // still be ours alone, or the next start refuses its own cache.
    let check = || {
        std::process::Command::new("sh")
            .args([
                "-c",
                "umask 002 && exec \"$0\" check lepton.toml --state-dir state",
            ])
            .arg(env!("CARGO_BIN_EXE_lepton"))
            .current_dir(project.dir.path())
            .env("LEPTON_LOG", "info")
            .output()
            .expect("run lepton check")
    };
    let first = check();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = check();
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{log}");
    assert!(!log.contains("recompiling"), "{log}");
    assert!(log.contains("cached=true"), "{log}");
}

/// The nnprobe body for `/nn/upload-compute`: the model, then tensor lines.
fn upload_compute_body(model: &[u8], tensors: &str) -> Vec<u8> {
    let mut body = format!("{}\n", model.len()).into_bytes();
    body.extend_from_slice(model);
    body.extend_from_slice(tensors.as_bytes());
    body
}

#[test]
fn what_an_uploaded_model_allocates_is_capped() {
    let project = uploader();
    let lepton = project.up_with_ort();
    let pid = lepton.child.id();
    let x = crate::util::tensor_line("x", "FP32", &[64], &[0; 256]);
    // Small: runs.
    let small = lepton.post(
        "/nn/upload-compute",
        &upload_compute_body(&crate::onnx::doubling_model(4), &x),
    );
    assert_eq!(small.body, "ok: 1 outputs\n", "{small:?}");
    // 2^22 × 64 floats (1 GiB) in the last Concat alone: past the 256 MiB arena.
    reset_peak_rss(pid);
    let before = peak_rss(pid);
    let big = lepton.post(
        "/nn/upload-compute",
        &upload_compute_body(&crate::onnx::doubling_model(22), &x),
    );
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(
        big.body.starts_with("error: ErrorCode::RuntimeError"),
        "{big:?}"
    );
    assert!(grown < 600 << 20, "peak RSS grew by {} MiB", grown >> 20);
    assert_eq!(lepton.get("/.well-known/lepton/health").status, 200);
}

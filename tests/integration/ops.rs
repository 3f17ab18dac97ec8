//! What operators see: the metrics page read by Prometheus' own parsers, function
//! logs (also followed), alerts with their webhook, JSON logs, and the status page in
//! a real headless Chromium.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::train::{digits_model, images, labels};
use crate::util::{Lepton, PATIENCE, Project, manifest, root};

/// hello, trap, and nnprobe with model and trainer `digits`.
fn ops_project(extra: &str) -> Project {
    Project::new(&manifest(&format!(
        "name = \"ops\"\n\
         [model.digits]\npath = {model:?}\n\
         [trainer.digits]\ninit = {model:?}\nloss = \"cross-entropy\"\noptimizer = {{ kind = \"adamw\", lr = 1e-2 }}\npublishes = \"digits\"\n\
         [function.hello]\ncomponent = \"{{HELLO}}\"\nroute = \"/hello\"\n\
         [function.trap]\ncomponent = \"{{TRAP}}\"\nroute = \"/trap\"\n\
         [function.probe]\ncomponent = \"{{PROBE}}\"\nroute = \"/probe/...\"\n\
         [function.nn]\ncomponent = \"{{NNPROBE}}\"\nroute = \"/nn/...\"\nmodels = [\"digits\"]\ntrainers = [\"digits\"]\n\
         {extra}",
        model = digits_model()
    )))
}

fn train(lepton: &Lepton, steps: usize) {
    for _ in 0..steps {
        let body = images(4, 64) + &labels(&[1, 3, 5, 7]);
        let answer = lepton.post("/nn/step/digits", body.as_bytes()).body;
        assert!(answer.starts_with("loss "), "{answer}");
    }
}

fn python() -> PathBuf {
    root().join(".cache/venv/bin/python")
}

/// The metrics page parsed by `prometheus_client`'s OpenMetrics parser (strict: it
/// refuses a page without `# EOF`, a sample outside its family, a bad histogram) and by
/// its Prometheus text parser; the families as JSON.
fn parse_with_prometheus(page: &str) -> serde_json::Value {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus
page = sys.stdin.read()
out = {}
for family in openmetrics(page):
    out[family.name] = {"type": family.type, "help": family.documentation,
        "samples": [[s.name, s.labels, s.value] for s in family.samples]}
# The classic text parser reads the same page (Prometheus' own fallback format).
assert len(list(prometheus(page))) >= len(out), "the text parser lost families"
print(json.dumps(out))
"#;
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python (./test.sh installs prometheus-client into .cache/venv)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write the page");
    let output = child.wait_with_output().expect("python");
    assert!(
        output.status.success(),
        "prometheus_client refused the page: {}\n{page}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json")
}

/// The samples named `name` whose labels include every `(key, value)` of `labels`.
fn samples<'a>(
    families: &'a serde_json::Value,
    family: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a serde_json::Value> {
    families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}: {families}"))
        .iter()
        .filter(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .collect()
}

fn value(families: &serde_json::Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(families, family, name, labels);
    assert_eq!(found.len(), 1, "{family} {name} {labels:?}: {found:?}");
    found[0][2].as_f64().expect("number")
}

#[test]
fn the_metrics_page_parses_with_prometheus_parsers_and_counters_survive_a_deploy() {
    let project = ops_project("");
    let lepton = project.up_with_ort();
    for _ in 0..5 {
        assert_eq!(lepton.get("/hello").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(lepton.get("/trap").status, 500);
    }
    train(&lepton, 3);
    for _ in 0..2 {
        let reply = lepton.post("/nn/compute/digits", images(2, 64).as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let reply = lepton.get("/.well-known/lepton/metrics");
    assert_eq!(
        reply.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let families = parse_with_prometheus(&reply.body);
    for (name, family) in families.as_object().expect("families") {
        assert!(
            family["help"].as_str().is_some_and(|h| !h.is_empty()),
            "{name} has no HELP"
        );
        assert_ne!(family["type"], "unknown", "{name} has no TYPE");
    }
    let hello = [("app", "ops"), ("function", "hello")];
    let trap = [("app", "ops"), ("function", "trap")];
    assert_eq!(
        families["lepton_request_duration_seconds"]["type"],
        "histogram"
    );
    let ok = [("app", "ops"), ("function", "hello"), ("class", "2xx")];
    assert_eq!(
        value(
            &families,
            "lepton_request_duration_seconds",
            "lepton_request_duration_seconds_count",
            &ok
        ),
        5.0
    );
    let buckets = samples(
        &families,
        "lepton_request_duration_seconds",
        "lepton_request_duration_seconds_bucket",
        &ok,
    );
    assert!(buckets.len() > 10, "{buckets:?}");
    let inf = buckets
        .iter()
        .find(|b| b[1]["le"] == "+Inf")
        .expect("+Inf bucket");
    assert_eq!(inf[2], 5.0);
    let failed = [("app", "ops"), ("function", "trap"), ("kind", "trap")];
    assert_eq!(
        value(
            &families,
            "lepton_request_failures",
            "lepton_request_failures_total",
            &failed
        ),
        2.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_request_duration_seconds",
            "lepton_request_duration_seconds_count",
            &[("function", "trap"), ("class", "5xx")]
        ),
        2.0
    );
    assert_eq!(
        value(&families, "lepton_requests", "lepton_requests_total", &trap),
        2.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_requests_in_flight",
            "lepton_requests_in_flight",
            &hello
        ),
        0.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_instances_in_use",
            "lepton_instances_in_use",
            &[]
        ),
        0.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_instantiation_seconds",
            "lepton_instantiation_seconds_count",
            &hello
        ),
        5.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_request_queue_wait_seconds",
            "lepton_request_queue_wait_seconds_count",
            &hello
        ),
        5.0
    );
    let digits = [("model", "digits")];
    assert_eq!(
        value(
            &families,
            "lepton_model_requests",
            "lepton_model_requests_total",
            &digits
        ),
        2.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_model_run_seconds",
            "lepton_model_run_seconds_count",
            &digits
        ),
        2.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_model_queue_seconds",
            "lepton_model_queue_seconds_count",
            &digits
        ),
        2.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_model_batch_size",
            "lepton_model_batch_size_sum",
            &digits
        ),
        2.0
    );
    assert!(
        value(
            &families,
            "lepton_model_bytes",
            "lepton_model_bytes",
            &digits
        ) > 1000.0
    );
    let trainer = [("app", "ops"), ("trainer", "digits")];
    assert_eq!(
        value(
            &families,
            "lepton_trainer_steps",
            "lepton_trainer_steps_total",
            &trainer
        ),
        3.0
    );
    assert_eq!(
        value(
            &families,
            "lepton_trainer_step_seconds",
            "lepton_trainer_step_seconds_count",
            &trainer
        ),
        3.0
    );
    assert!(
        value(
            &families,
            "lepton_trainer_loss",
            "lepton_trainer_loss",
            &trainer
        ) > 0.0
    );
    assert!(
        value(
            &families,
            "process_resident_memory_bytes",
            "process_resident_memory_bytes",
            &[]
        ) > 1e6
    );

    // A new version of the app: the function's counters go on from where they were.
    let text = std::fs::read_to_string(project.manifest()).expect("manifest");
    std::fs::write(
        project.manifest(),
        text.replace(
            "route = \"/hello\"",
            "route = \"/hello\"\nenvironment = { GREETING = \"v2\" }",
        ),
    )
    .expect("write manifest");
    let (status, stdout, stderr) = lepton.client(&project, &["deploy"]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("deploy: the node compiles and loads the new version (1/1)"),
        "{stderr}"
    );
    assert_eq!(lepton.get("/hello").body, "v2\n");
    assert_eq!(lepton.metric("lepton_requests_total", "hello"), 6);
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"trap\"}", "trap"),
        2
    );
}

/// `GET /v1/functions/<f>/logs` as records.
fn logs(lepton: &Lepton, query: &str) -> (u16, Vec<serde_json::Value>) {
    let result = lepton
        .admin_request("GET", &format!("/v1/functions/{query}"))
        .call();
    let (status, response) = match result {
        Ok(response) => (response.status(), response),
        Err(ureq::Error::Status(status, response)) => (status, response),
        Err(error) => panic!("{error}"),
    };
    let text = response.into_string().expect("body");
    if status != 200 {
        return (
            status,
            vec![serde_json::from_str(&text).expect("json error")],
        );
    }
    let records = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    (status, records)
}

#[test]
fn function_logs_hold_guest_output_and_requests_and_follow_streams_until_shutdown() {
    let project = ops_project("");
    let mut lepton = project.up_with_ort();
    assert_eq!(lepton.get("/probe/stdout").body, "ok: printed\n");
    assert_eq!(lepton.post("/probe/echo?secret=1", b"12345").status, 200);

    let (status, records) = logs(&lepton, "probe/logs");
    assert_eq!(status, 200);
    let line = records
        .iter()
        .find(|r| r["stream"] == "stdout")
        .expect("the guest's stdout line");
    assert_eq!(line["message"], "probe says hi on stdout");
    let requests: Vec<_> = records
        .iter()
        .filter(|r| r["stream"] == "request")
        .collect();
    assert_eq!(requests.len(), 2, "{records:?}");
    assert_eq!(requests[0]["path"], "/probe/stdout");
    assert_eq!(requests[0]["status"], 200);
    assert_eq!(requests[0]["request_id"], line["request_id"]);
    // The query is not logged: it may carry secrets.
    assert_eq!(requests[1]["path"], "/probe/echo");
    assert_eq!(
        (
            requests[1]["method"].as_str(),
            requests[1]["bytes_in"].as_u64()
        ),
        (Some("POST"), Some(5))
    );
    assert!(requests[1]["latency_ms"].as_f64().is_some_and(|l| l > 0.0));
    // Only what is newer than a record, or than a time.
    let last = records.last().expect("records")["seq"]
        .as_u64()
        .expect("seq");
    assert!(
        logs(&lepton, &format!("probe/logs?after={last}"))
            .1
            .is_empty()
    );
    assert_eq!(
        logs(&lepton, "probe/logs?since=1m&app=ops").1.len(),
        records.len()
    );
    // Bad queries are the client's errors.
    assert_eq!(logs(&lepton, "probe/logs?since=yesterday").0, 400);
    assert_eq!(logs(&lepton, "probe/logs?after=x").0, 400);
    assert_eq!(logs(&lepton, "nobody/logs").0, 404);
    assert_eq!(logs(&lepton, "probe/logs?app=other").0, 404);

    // A second app with a function of the same name: the app must be named.
    let other = Project::new(&manifest(
        "name = \"other\"\n[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/other/...\"\n",
    ));
    let (ok, out, err) = lepton.client(&other, &["deploy"]);
    assert!(ok.success(), "{out}{err}");
    let (status, body) = logs(&lepton, "probe/logs");
    assert_eq!(status, 400);
    assert!(
        body[0]["error"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("?app=")),
        "{body:?}"
    );
    assert_eq!(logs(&lepton, "probe/logs?app=other").1.len(), 0);

    // `lepton logs -f` prints what comes as it comes.
    let admin = lepton.admin_url("");
    let mut follower = Command::new(env!("CARGO_BIN_EXE_lepton"))
        .args(["logs", "probe", "--app", "ops", "-f", "--admin", &admin])
        .env("LEPTON_ADMIN_TOKEN", &lepton.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lepton logs");
    let mut lines = BufReader::new(follower.stdout.take().expect("stdout")).lines();
    // What was there first...
    let first = lines.next().expect("a line").expect("read");
    assert!(first.contains("stdout: probe says hi on stdout"), "{first}");
    assert!(
        lines
            .next()
            .expect("a line")
            .expect("read")
            .contains("GET /probe/stdout -> 200")
    );
    assert!(
        lines
            .next()
            .expect("a line")
            .expect("read")
            .contains("POST /probe/echo -> 200")
    );
    // ...then a request made after it started.
    assert_eq!(lepton.get("/probe/stdout").status, 200);
    assert!(
        lines
            .next()
            .expect("a line")
            .expect("read")
            .contains("stdout: probe says hi on stdout")
    );
    assert!(
        lines
            .next()
            .expect("a line")
            .expect("read")
            .contains("GET /probe/stdout -> 200")
    );

    // A stream that follows ends when the node shuts down: it does not hold the drain.
    let started = Instant::now();
    let status = lepton.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}\n{}", lepton.log());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the drain waited for the log stream"
    );
    let ended = follower.wait().expect("lepton logs exits");
    assert!(ended.success(), "{ended:?}");
}

/// Reads a request's head off `reader`; the value of header `name`, if it has one.
fn header(reader: &mut BufReader<std::net::TcpStream>, name: &str) -> Option<String> {
    let mut found = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            return found;
        }
        if let Some((key, value)) = line.split_once(':')
            && key.eq_ignore_ascii_case(name)
        {
            found = Some(value.trim().to_owned());
        }
    }
}

/// A webhook receiver on loopback: the first call is answered 500 (to be retried),
/// every later one 200; each body is sent on the channel.
fn webhook() -> (String, std::sync::mpsc::Receiver<serde_json::Value>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind webhook");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let length = header(&mut reader, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            if n > 0 {
                let _ = sender.send(serde_json::from_slice(&body).unwrap_or_default());
            }
        }
    });
    (url, receiver)
}

#[test]
fn an_alert_fires_and_resolves_with_audit_records_and_webhook_calls() {
    let project = ops_project(
        "[alert.trap-errors]\nfunction = \"trap\"\nwhen = \"error_rate > 0.5\"\nover = \"2s\"\n\
         [alert.slow-hello]\nfunction = \"hello\"\nwhen = \"p99_latency > 30s\"\n",
    );
    let (url, received) = webhook();
    let lepton = project.start(
        Some(&project.manifest()),
        &["--alert-webhook", &url],
        &[(
            "ORT_DYLIB_PATH",
            crate::util::ort_library().to_str().expect("utf-8"),
        )],
    );
    let (_, alerts) = lepton.admin_get("/v1/alerts");
    assert_eq!(
        alerts["alerts"].as_array().map(Vec::len),
        Some(2),
        "{alerts}"
    );
    assert!(
        alerts["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .all(|a| a["state"] == "ok")
    );
    assert_eq!(lepton.get("/hello").status, 200);
    for _ in 0..3 {
        assert_eq!(lepton.get("/trap").status, 500);
    }
    // The first call is refused by the receiver: this one is its retry.
    let fired = received
        .recv_timeout(PATIENCE)
        .expect("the firing notification");
    assert_eq!(
        (
            fired["app"].as_str(),
            fired["alert"].as_str(),
            fired["state"].as_str()
        ),
        (Some("ops"), Some("trap-errors"), Some("firing"))
    );
    assert_eq!(fired["when"], "error_rate > 0.5");
    assert_eq!(fired["value"], 1.0);
    let (_, alerts) = lepton.admin_get("/v1/alerts");
    let rule = alerts["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .find(|a| a["alert"] == "trap-errors")
        .expect("the rule")
        .clone();
    assert_eq!(rule["state"], "firing", "{alerts}");
    let (status, out, err) = lepton.client(&project, &["status"]);
    assert!(status.success(), "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("trap-errors") && l.contains("FIRING")),
        "{out}"
    );

    // Two seconds without errors: it resolves.
    let resolved = received
        .recv_timeout(PATIENCE)
        .expect("the resolved notification");
    assert_eq!(
        (resolved["alert"].as_str(), resolved["state"].as_str()),
        (Some("trap-errors"), Some("resolved"))
    );
    // The webhook is called as the change is judged; the audit record follows it.
    let started = Instant::now();
    loop {
        let (_, audit) = lepton.admin_get("/v1/audit");
        let actions: Vec<String> = audit["records"]
            .as_array()
            .expect("records")
            .iter()
            .filter(|r| r["peer"] == "alerts")
            .filter_map(|r| r["action"].as_str().map(str::to_owned))
            .collect();
        if actions.len() >= 2 || started.elapsed() > PATIENCE {
            assert_eq!(actions, ["alert-firing", "alert-resolved"], "{audit}");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, alerts) = lepton.admin_get("/v1/alerts");
    assert_eq!(
        alerts["events"].as_array().map(Vec::len),
        Some(2),
        "{alerts}"
    );
    assert!(
        lepton.log().contains("the alert webhook failed"),
        "the refused call was not logged"
    );
}

#[test]
fn bad_alert_rules_and_webhooks_are_refused_with_their_reason() {
    let cases = [
        (
            "function = \"nobody\"\nwhen = \"error_rate > 0.1\"\n",
            "no function named \"nobody\"",
        ),
        (
            "function = \"trap\"\nwhen = \"error_rate >= 0.1\"\n",
            "unknown comparison",
        ),
        (
            "function = \"trap\"\nwhen = \"error_rate > 5\"\n",
            "not between 0 and 1",
        ),
        (
            "function = \"trap\"\nwhen = \"p99_latency > 3\"\n",
            "invalid duration",
        ),
        (
            "function = \"trap\"\nwhen = \"error_rate > 0.1\"\nover = \"1h\"\n",
            "from 1s to 10m",
        ),
        (
            "function = \"trap\"\nwhen = \"error_rate > 0.1\"\nfor = \"1m\"\n",
            "unknown field `for`",
        ),
    ];
    for (rule, reason) in cases {
        let project = ops_project(&format!("[alert.a]\n{rule}"));
        let (status, _, stderr) =
            project.run(&["up", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
        assert!(!status.success());
        assert!(stderr.contains(reason), "{rule}: {stderr}");
    }
    let project = ops_project("");
    let (status, _, stderr) = project.run(&["up", "--alert-webhook", "https://example.com/hook"]);
    assert!(!status.success());
    assert!(stderr.contains("must be an http:// URL"), "{stderr}");
    let (status, _, stderr) = project.run(&["up", "--otlp", "collector:4318"]);
    assert!(!status.success());
    assert!(stderr.contains("--otlp must be an http:// URL"), "{stderr}");
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let project = ops_project("");
    let lepton = project.up_with(
        &["--log-format", "json"],
        &[(
            "ORT_DYLIB_PATH",
            crate::util::ort_library().to_str().expect("utf-8"),
        )],
    );
    assert_eq!(lepton.get("/probe/stdout").status, 200);
    let log = lepton.wait_for_log("probe says hi");
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        records
            .iter()
            .all(|r| r["level"].is_string() && r["timestamp"].is_string())
    );
    let guest = records
        .iter()
        .find(|r| r["message"] == "probe says hi on stdout")
        .expect("the guest's line");
    assert_eq!(
        (guest["function"].as_str(), guest["stream"].as_str()),
        (Some("probe"), Some("stdout"))
    );
    assert!(guest["request_id"].is_string());
    assert!(
        records
            .iter()
            .any(|r| r["message"] == "deployed" && r["app"] == "ops")
    );
    // Without a terminal, progress is a line of the log per step.
    for step in [
        "up: loading model digits (1/6)",
        "up: starting trainer digits (2/6)",
        "up: compiling function hello (3/6)",
    ] {
        assert!(
            records.iter().any(|r| r["message"] == step),
            "no {step:?} in {log}"
        );
    }
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "no Chromium at {} (./test.sh installs Debian's `chromium`; or set CHROMIUM)",
        path.display()
    );
    path
}

/// Chromium, headless and offline, on `url`: `args` decide what it writes.
fn headless(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1600",
            // Virtual time runs the page's script and waits for its fetches.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_status_page_shows_functions_models_and_a_loss_curve_in_chromium() {
    let project =
        ops_project("[alert.trap-errors]\nfunction = \"trap\"\nwhen = \"error_rate > 0.5\"\n");
    let lepton = project.up_with_ort();
    train(&lepton, 8);
    for _ in 0..4 {
        assert_eq!(lepton.get("/hello").status, 200);
        assert_eq!(
            lepton
                .post("/nn/compute/digits", images(2, 64).as_bytes())
                .status,
            200
        );
    }
    assert_eq!(lepton.get("/trap").status, 500);
    // The page carries no data and needs no token; the API it reads does.
    let page = ureq::get(&lepton.admin_url("/")).call().expect("the page");
    assert!(
        page.header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
    );
    assert!(
        page.header("content-security-policy")
            .is_some_and(|c| c.contains("default-src 'none'"))
    );
    let html = page.into_string().expect("html");
    assert!(!html.contains(&lepton.token));
    // Nothing is loaded from elsewhere (the SVG namespace is a name, not a fetch).
    let elsewhere = html.replace("\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !elsewhere.contains("http://") && !elsewhere.contains("https://"),
        "{elsewhere}"
    );
    assert_eq!(
        ureq::get(&lepton.admin_url("/v1/stats"))
            .call()
            .err()
            .and_then(|e| match e {
                ureq::Error::Status(status, _) => Some(status),
                ureq::Error::Transport(_) => None,
            }),
        Some(401)
    );

    let url = lepton.admin_url(&format!("/#token={}", lepton.token));
    let dom = headless(&url, &["--dump-dom"]);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never rendered:\n{dom}"
    );
    for name in [
        "hello",
        "trap",
        "probe",
        "nn",
        "/nn/...",
        "digits",
        "trap-errors",
        "error_rate &gt; 0.5",
    ] {
        assert!(
            dom.contains(&format!(">{name}<")),
            "{name} is not on the page:\n{dom}"
        );
    }
    assert!(dom.contains(">active<"), "no active version:\n{dom}");
    // The loss curve: one point per step, drawn as a path.
    let card = dom
        .split("data-trainer=\"digits\"")
        .nth(1)
        .expect("the trainer's card");
    assert!(card.contains(">8 steps · loss "), "{card}");
    let path = card
        .split("class=\"loss\"")
        .next()
        .and_then(|before| before.rsplit("d=\"").next())
        .expect("the loss path");
    assert_eq!(path.matches('L').count(), 7, "{path}");
    // The model's runs and mean batch.
    let models = dom.split(">digits<").nth(1).expect("the model row");
    assert!(
        models.contains(">4<") && models.contains(">1.00<"),
        "{models}"
    );

    // The screenshot is kept for people to look at (the README shows one).
    let shots = root().join("target/screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let shot = shots.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    headless(&url, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );

    // A wrong token: the page asks again, and says why.
    let dom = headless(
        &lepton.admin_url("/#token=wrong-token-0123456789"),
        &["--dump-dom"],
    );
    assert!(dom.contains("That token was refused."), "{dom}");
    assert!(!dom.contains("data-ready"), "{dom}");
}

/// A server on loopback that answers each request with the `traceparent` it carried.
fn traceparent_echo() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let traceparent =
                header(&mut reader, "traceparent").unwrap_or_else(|| "none".to_owned());
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{traceparent}",
                traceparent.len()
            );
        }
    });
    address
}

#[test]
fn a_clients_trace_reaches_the_guests_outbound_requests_and_the_log() {
    let echo = traceparent_echo();
    let project = Project::new(&manifest(&format!(
        "name = \"ops\"\n[function.probe]\ncomponent = \"{{PROBE}}\"\nroute = \"/probe/...\"\n\
         allowed_outbound_hosts = [\"http://{echo}\"]\n"
    )));
    let lepton = project.up();
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = ureq::get(&lepton.url(&format!("/probe/http?http://{echo}/")))
        .set("traceparent", client)
        .call()
        .expect("probe");
    let body = reply.into_string().expect("body");
    let sent = body
        .trim()
        .strip_prefix("ok: 200 ")
        .expect("the echoed header");
    // Without --otlp no span of the host's is reported: the client's own traceparent
    // is passed on, so what the guest calls joins the client's span.
    let (trace, parent, flags) = {
        let parts: Vec<&str> = sent.split('-').collect();
        assert_eq!(parts.len(), 4, "{sent}");
        (
            parts[1].to_owned(),
            parts[2].to_owned(),
            parts[3].to_owned(),
        )
    };
    assert_eq!(
        (trace.as_str(), flags.as_str()),
        ("4bf92f3577b34da6a3ce929d0e0e4736", "01")
    );
    assert_eq!(parent, "00f067aa0ba902b7");
    // Without a header (or with a bad one) a trace is started.
    let fresh = lepton.get(&format!("/probe/http?http://{echo}/")).body;
    let fresh = fresh
        .trim()
        .strip_prefix("ok: 200 00-")
        .expect("a started trace");
    assert!(!fresh.starts_with("4bf92f35"), "{fresh}");
    let bad = ureq::get(&lepton.url(&format!("/probe/http?http://{echo}/")))
        .set("traceparent", "00-zz-00f067aa0ba902b7-01")
        .call()
        .expect("probe")
        .into_string()
        .expect("body");
    assert!(
        bad.starts_with("ok: 200 00-") && !bad.contains("zz"),
        "{bad}"
    );
    // The log's record of the request names its trace.
    let (_, records) = logs(&lepton, "probe/logs");
    let traces: Vec<&str> = records
        .iter()
        .filter(|r| r["stream"] == "request")
        .filter_map(|r| r["trace_id"].as_str())
        .collect();
    assert_eq!(traces.len(), 3, "{records:?}");
    assert_eq!(traces[0], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(fresh.split('-').next(), Some(traces[1]));
}

/// An OTLP/HTTP collector stand-in: every span of every `POST /v1/traces` (JSON) is
/// sent on the channel as `(name, trace id, span id, parent span id)`.
fn collector() -> (String, std::sync::mpsc::Receiver<[String; 4]>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind collector");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let length = header(&mut reader, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            );
            assert!(
                request_line.starts_with("POST /v1/traces "),
                "{request_line}"
            );
            let export: serde_json::Value = serde_json::from_slice(&body).expect("OTLP JSON");
            for resource in export["resourceSpans"].as_array().into_iter().flatten() {
                assert_eq!(
                    resource["resource"]["attributes"][0]["value"]["stringValue"],
                    "lepton"
                );
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                        let _ = sender.send([
                            text("name"),
                            text("traceId"),
                            text("spanId"),
                            text("parentSpanId"),
                        ]);
                    }
                }
            }
        }
    });
    (url, receiver)
}

#[test]
fn spans_of_a_request_reach_an_otlp_collector_with_their_parentage() {
    let (url, spans) = collector();
    let project = ops_project("");
    let lepton = project.up_with(
        &["--otlp", &url],
        &[(
            "ORT_DYLIB_PATH",
            crate::util::ort_library().to_str().expect("utf-8"),
        )],
    );
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traced = |path: &str, body: &[u8]| {
        ureq::post(&lepton.url(path))
            .set(
                "traceparent",
                &format!("00-{client_trace}-{client_span}-01"),
            )
            .send_bytes(body)
            .expect("a traced request")
            .into_string()
            .expect("body")
    };
    assert!(traced("/nn/compute/digits", images(2, 64).as_bytes()).contains("FP32"));
    let body = images(4, 64) + &labels(&[1, 3, 5, 7]);
    assert!(traced("/nn/step/digits", body.as_bytes()).starts_with("loss "));

    // Two requests: request, instantiate, guest each; compute, queue, run; a step.
    let mut seen: Vec<[String; 4]> = Vec::new();
    let wanted = [
        "request",
        "instantiate",
        "guest",
        "wasi-nn compute",
        "queue",
        "run",
        "training step",
    ];
    let counts = [2, 2, 2, 1, 1, 1, 1];
    let started = Instant::now();
    while wanted
        .iter()
        .zip(counts)
        .any(|(name, n)| seen.iter().filter(|s| s[0] == *name).count() < n)
    {
        let left = PATIENCE.saturating_sub(started.elapsed());
        match spans.recv_timeout(left) {
            Ok(span) => seen.push(span),
            Err(_) => panic!("spans missing; received {seen:?}"),
        }
    }
    assert!(seen.iter().all(|s| s[1] == client_trace), "{seen:?}");
    let by_id = |id: &str| seen.iter().find(|s| s[2] == id).map(|s| s[0].clone());
    let parent_of = |name: &str| -> Vec<Option<String>> {
        seen.iter()
            .filter(|s| s[0] == name)
            .map(|s| by_id(&s[3]))
            .collect()
    };
    for request in seen.iter().filter(|s| s[0] == "request") {
        assert_eq!(
            request[3], client_span,
            "the client's span is the request's parent"
        );
    }
    assert!(
        parent_of("instantiate")
            .iter()
            .all(|p| p.as_deref() == Some("request")),
        "{seen:?}"
    );
    assert!(
        parent_of("guest")
            .iter()
            .all(|p| p.as_deref() == Some("request")),
        "{seen:?}"
    );
    assert_eq!(parent_of("wasi-nn compute"), [Some("guest".to_owned())]);
    assert_eq!(parent_of("queue"), [Some("wasi-nn compute".to_owned())]);
    assert_eq!(parent_of("run"), [Some("wasi-nn compute".to_owned())]);
    assert_eq!(parent_of("training step"), [Some("guest".to_owned())]);
    // Span ids are unique.
    let mut ids: Vec<&str> = seen.iter().map(|s| s[2].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), seen.len());
}

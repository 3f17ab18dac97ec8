//! Starting the real `lepton` binary and talking to it.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use lepton_test_artifacts as artifacts;

/// How long a test waits for something that should happen at once (readiness, a log line).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The workspace root (where `./setup.sh` puts `.cache/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// ONNX Runtime as `./setup.sh` installs it, unless `ORT_DYLIB_PATH` says otherwise.
pub fn ort_library() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH").map_or_else(
        || root().join(".cache/onnxruntime/libonnxruntime.so"),
        PathBuf::from,
    )
}

/// A tensor line of the nnprobe protocol: `name TYPE d1,d2 hexdata`.
pub fn tensor_line(name: &str, ty: &str, dims: &[u32], data: &[u8]) -> String {
    let dims = dims
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    format!("{name} {ty} {dims} {hex}\n")
}

/// A manifest header plus the given function tables, with `{HELLO}`-style
/// placeholders replaced by the components' absolute paths.
pub fn manifest(functions: &str) -> String {
    let mut text = format!("manifest_version = 1\n{functions}");
    for (name, path) in artifacts::ALL {
        text = text.replace(&format!("{{{}}}", name.to_uppercase()), path);
    }
    text
}

/// A temporary project directory holding a manifest.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(manifest_text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("lepton.toml"), manifest_text).expect("write manifest");
        Self { dir }
    }

    /// A temporary directory with no manifest in it (for an empty node).
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn manifest(&self) -> PathBuf {
        self.path("lepton.toml")
    }

    /// Runs `lepton ARGS...` to completion in this directory.
    pub fn run(&self, args: &[&str]) -> (ExitStatus, String, String) {
        run_lepton(self.dir.path(), args, &[])
    }

    /// Starts `lepton up` on a free port and waits for its ready line.
    pub fn up(&self) -> Lepton {
        self.up_with(&[], &[])
    }

    /// Starts `lepton up` with [`ort_library`] as its ONNX Runtime.
    pub fn up_with_ort(&self) -> Lepton {
        let library = ort_library();
        self.up_with(
            &[],
            &[("ORT_DYLIB_PATH", library.to_str().expect("utf-8 path"))],
        )
    }

    pub fn up_with(&self, extra_args: &[&str], env: &[(&str, &str)]) -> Lepton {
        self.start(Some(&self.manifest()), extra_args, env)
    }

    /// Starts `lepton up` with no manifest (an empty node) on this project's state dir.
    pub fn up_empty(&self) -> Lepton {
        let library = ort_library();
        self.start(
            None,
            &[],
            &[("ORT_DYLIB_PATH", library.to_str().expect("utf-8 path"))],
        )
    }

    /// Starts `lepton up [MANIFEST]` on a free port and waits for its ready line.
    pub fn start(
        &self,
        manifest: Option<&Path>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Lepton {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = self.path(&format!("lepton-{n}.log"));
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_lepton"))
            .arg("up")
            .args(manifest)
            .current_dir(self.dir.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(self.path("state"))
            .args(extra_args)
            // Only what a test passes: the variable is not inherited from the caller.
            .env_remove("ORT_DYLIB_PATH")
            .envs(env.iter().copied())
            .env("LEPTON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn lepton up");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut lines = [String::new(), String::new()];
        for line in &mut lines {
            stdout.read_line(line).expect("read ready line");
        }
        let admin = lines[0]
            .trim_end()
            .strip_prefix("lepton: admin on http://")
            .map(str::to_owned);
        let (Some(admin), Some(address)) = (
            admin,
            lines[1]
                .trim_end()
                .strip_prefix("lepton: listening on http://"),
        ) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("no admin and ready lines (read {lines:?}); log:\n{log}");
        };
        let token = std::fs::read_to_string(self.path("state/admin-token"))
            .expect("admin token")
            .trim()
            .to_owned();
        Lepton {
            child,
            stdout,
            address: address.to_owned(),
            admin,
            token,
            log_path,
        }
    }
}

/// A running `lepton up`; killed when dropped.
pub struct Lepton {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
    pub address: String,
    /// The admin API's `host:port`.
    pub admin: String,
    /// The admin API's bearer token.
    pub token: String,
    pub log_path: PathBuf,
}

/// A response, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Lepton {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn get(&self, path: &str) -> Reply {
        reply(ureq::get(&self.url(path)).call())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// An admin API request with the node's token.
    pub fn admin_request(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &self.admin_url(path))
            .set("authorization", &format!("Bearer {}", self.token))
    }

    /// `GET` on the admin API, with the token; the body parsed as JSON.
    pub fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        json_reply(self.admin_request("GET", path).call())
    }

    /// `POST` of a JSON body on the admin API, with the token.
    pub fn admin_post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        json_reply(
            self.admin_request("POST", path)
                .send_string(&body.to_string()),
        )
    }

    /// Runs a client command (`lepton deploy ...`) against this node's admin API.
    pub fn client(&self, project: &Project, args: &[&str]) -> (ExitStatus, String, String) {
        let admin = self.admin_url("");
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--admin", admin.as_str()])
            .collect();
        run_lepton(
            project.dir.path(),
            &args,
            &[("LEPTON_ADMIN_TOKEN", &self.token)],
        )
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Reply {
        reply(ureq::post(&self.url(path)).send_bytes(body))
    }

    /// Sends `GET path` from another thread; join the handle for the reply.
    pub fn get_in_background(&self, path: &str) -> std::thread::JoinHandle<Reply> {
        let url = self.url(path);
        std::thread::spawn(move || reply(ureq::get(&url).call()))
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let started = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "log never contained {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A metric's value from `/.well-known/lepton/metrics`, by its one label's value
    /// (the function's or the model's name).
    pub fn metric(&self, selector: &str, label: &str) -> u64 {
        let metrics = self.get("/.well-known/lepton/metrics").body;
        metric_value(&metrics, selector, label)
            .unwrap_or_else(|| panic!("no metric {selector:?} of {label:?} in:\n{metrics}"))
    }

    /// Waits until `metric` of `function` reaches `value`.
    pub fn wait_for_metric(&self, name: &str, function: &str, value: u64) {
        let started = Instant::now();
        while self.metric(name, function) != value {
            assert!(
                started.elapsed() < PATIENCE,
                "{name} of {function} never reached {value}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` (e.g. "TERM") and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        self.child.wait().expect("wait for lepton")
    }

    /// Sends `signal` (e.g. "TERM").
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// What the process wrote to stdout after its ready line.
    pub fn rest_of_stdout(&mut self) -> String {
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).expect("read stdout");
        rest
    }
}

impl Drop for Lepton {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn reply(result: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("request failed: {error}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|name| {
            let value = response.header(&name).unwrap_or_default().to_owned();
            (name, value)
        })
        .collect();
    let body = response.into_string().expect("utf-8 body");
    Reply {
        status,
        headers,
        body,
    }
}

/// A reply's status and JSON body (`null` when the body is not JSON).
pub fn json_reply(result: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    let reply = reply(result);
    (
        reply.status,
        serde_json::from_str(&reply.body).unwrap_or(serde_json::Value::Null),
    )
}

/// A one-thread HTTP server on loopback that answers every request with `pong`,
/// for outbound-request tests. Returns its `host:port`.
pub fn pong_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind pong server");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buffer = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buffer);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
            );
        }
    });
    address
}

/// Creates `relative` (and its parents) under `root` with `contents`.
pub fn write_file(root: &Path, relative: &str, contents: &str) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
    std::fs::write(path, contents).expect("write");
}

/// Sends `request` as raw bytes (for paths an HTTP client would normalize) and returns
/// the raw answer.
pub fn raw_request(address: &str, request: &str) -> String {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// Runs `lepton ARGS...` to completion in `dir`, with `env` added.
pub fn run_lepton(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_lepton"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("LEPTON_LOG", "info")
        .output()
        .expect("run lepton");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value of `selector` (a family sample's name, with extra labels as in
/// `lepton_request_failures_total{kind="timeout"}`) for function `label` (model, for
/// `lepton_model_*`), read off an OpenMetrics page.
pub fn metric_value(page: &str, selector: &str, label: &str) -> Option<u64> {
    let (name, extra) = match selector.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (selector, ""),
    };
    let kind = if name.starts_with("lepton_model_") || name.starts_with("lepton_infer_") {
        "model"
    } else {
        "function"
    };
    let mut wanted: Vec<String> = extra
        .split(',')
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    wanted.push(format!("{kind}=\"{label}\""));
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            let (sample_name, labels) = sample.split_once('{')?;
            if sample_name != name {
                return None;
            }
            let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            wanted
                .iter()
                .all(|w| labels.contains(&w.as_str()))
                .then(|| value.parse::<f64>().ok().map(|v| v as u64))?
        })
}

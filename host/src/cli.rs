//! The `lepton` command line.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::api::{Admin, AdminToken, DEFAULT_MAX_BLOB_SIZE};
use crate::client::AdminClient;
use crate::manifest::Manifest;
use crate::node::store::DEFAULT_KEEP_VERSIONS;
use crate::node::{Node, NodeConfig};

/// Lepton: serverless AI functions as WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "lepton", version, about)]
pub struct Cli {
    /// How the log on stderr is written: `text`, or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "LEPTON_LOG_FORMAT"
    )]
    log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (control plane, node and gateway in one process), deploying MANIFEST
    /// at start; with no manifest (and none at ./lepton.toml) the node starts empty.
    Up(UpArgs),
    /// Run a cluster's control plane: the admin API, desired state in NATS JetStream,
    /// placement by lepton-scheduler (one leads; another waits as standby).
    Control(ControlArgs),
    /// Run a cluster node: runs what the control plane places on it, and its gateway
    /// serves every route of the cluster.
    Node(NodeArgs),
    /// Validate a manifest and load every component, model and trainer it names, without serving.
    Check {
        /// The manifest.
        #[arg(default_value = "lepton.toml")]
        manifest: PathBuf,
        /// As for `up`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Deploy a manifest to a running node: uploads the blobs it lacks, then the locked app.
    Deploy {
        /// The manifest.
        #[arg(default_value = "lepton.toml")]
        manifest: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the node's apps and their versions.
    Apps {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// What runs on the node: functions, models, trainers.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make an earlier version of an app active again.
    Rollback {
        /// The app.
        app: String,
        /// The version (default: the one before the active one).
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop serving an app and delete its versions.
    Rm {
        /// The app.
        app: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A function's log: its guest's stdout and stderr and a record of each request.
    Logs {
        /// The function.
        function: String,
        /// Its app (needed only when several apps have a function of that name).
        #[arg(long)]
        app: Option<String>,
        /// Keep printing records as they come.
        #[arg(short, long)]
        follow: bool,
        /// Only records of the last DURATION (e.g. `5m`).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The node's audit log.
    Audit {
        /// Newest records to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `lepton up`'s options.
#[derive(Debug, Args)]
struct UpArgs {
    /// The manifest to deploy at start (default: ./lepton.toml when it exists).
    manifest: Option<PathBuf>,
    /// Gateway address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Admin API address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:3001")]
    admin: SocketAddr,
    /// File holding the admin API's bearer token (default: `<state-dir>/admin-token`,
    /// made at first start).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Where blobs, app versions, compiled components, checkpoints and the audit
    /// log are kept; default `.lepton/` beside the manifest (or here).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Versions kept per app; older ones (and blobs only they use) are deleted.
    #[arg(long, default_value_t = DEFAULT_KEEP_VERSIONS)]
    keep_versions: usize,
    /// Largest blob the admin API accepts, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BLOB_SIZE)]
    max_blob_size: u64,
    /// Component instances that may run at once on this node (all functions
    /// together); requests past that answer 503.
    #[arg(long, default_value_t = crate::engine::DEFAULT_POOL_INSTANCES)]
    max_instances: u32,
    /// Client connections open at once; past that new ones wait in the backlog.
    #[arg(long, default_value_t = crate::http::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Run without the seccomp filter (to debug; the node is less contained).
    #[arg(long)]
    no_seccomp: bool,
    /// Bytes of request bodies held at once, all functions together (e.g. `512MiB`);
    /// a body that would go past it answers 503.
    #[arg(long, default_value = "512MiB", value_parser = crate::manifest::parse_size)]
    max_body_memory: u64,
    /// POST each alert change as JSON to this `http://` URL (retried with back-off).
    #[arg(long)]
    alert_webhook: Option<String>,
    /// Export spans over OTLP/HTTP (JSON) to this collector (`http://HOST:4318`).
    #[arg(long)]
    otlp: Option<String>,
}

/// How a cluster process reaches NATS.
#[derive(Debug, Args)]
struct NatsArgs {
    /// NATS server URL(s), comma-separated; credentials as `nats://user:password@host:port`
    /// or `nats://token@host:port`.
    #[arg(long)]
    nats: String,
    /// A NATS credentials file (JWT and nkey seed).
    #[arg(long)]
    nats_creds: Option<PathBuf>,
    /// The hub's JetStream domain, for a process that dials a leaf server (an edge
    /// site's): its KV and object store requests go to the hub's JetStream.
    #[arg(long)]
    jetstream_domain: Option<String>,
}

/// `lepton control`'s options.
#[derive(Debug, Args)]
struct ControlArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Admin API address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:3001")]
    admin: SocketAddr,
    /// File holding the admin API's bearer token (default: `<state-dir>/admin-token`);
    /// give a standby the leader's.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Where the control plane keeps its copy of apps and blobs (default `.lepton/control`).
    #[arg(long, default_value = ".lepton/control")]
    state_dir: PathBuf,
    /// Versions kept per app.
    #[arg(long, default_value_t = DEFAULT_KEEP_VERSIONS)]
    keep_versions: usize,
    /// Largest blob the admin API accepts, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BLOB_SIZE)]
    max_blob_size: u64,
}

/// `lepton node`'s options.
#[derive(Debug, Args)]
struct NodeArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The node's name, unique in the cluster.
    #[arg(long)]
    name: String,
    /// Gateway address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Where blobs, compiled components and checkpoints are kept (default `.lepton/nodes/NAME`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Labels, `k=v,k=v`: `tier=cloud|edge`, `region=...`, and any others placements select on.
    #[arg(long, default_value = "", value_parser = crate::cluster::parse_labels)]
    labels: std::collections::BTreeMap<String, String>,
    /// Declares an accelerator, `NAME:MEMORY` (e.g. `nvidia-h200:141GiB`), as an
    /// operator override of what is detected; may be given more than once.
    #[arg(long, value_parser = crate::cluster::parse_accelerator)]
    accelerator: Vec<(String, u64)>,
    /// Largest request or response body forwarded to another node (e.g. `8MiB`); the
    /// NATS server's max_payload must be larger by 64 KiB.
    #[arg(long, default_value = "8MiB", value_parser = crate::manifest::parse_size)]
    forward_max_body: u64,
    /// Component instances that may run at once on this node.
    #[arg(long, default_value_t = crate::engine::DEFAULT_POOL_INSTANCES)]
    max_instances: u32,
    /// Client connections open at once.
    #[arg(long, default_value_t = crate::http::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Bytes of request bodies held at once (e.g. `512MiB`).
    #[arg(long, default_value = "512MiB", value_parser = crate::manifest::parse_size)]
    max_body_memory: u64,
    /// Run without the seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
    /// Export spans over OTLP/HTTP (JSON) to this collector (`http://HOST:4318`).
    #[arg(long)]
    otlp: Option<String>,
}

/// How client commands find the admin API.
#[derive(Debug, Args)]
struct AdminArgs {
    /// The admin API's URL (default: `$LEPTON_ADMIN`, else `.lepton/admin.url`); the token
    /// is `$LEPTON_ADMIN_TOKEN`, else `.lepton/admin-token`.
    #[arg(long)]
    admin: Option<String>,
    /// Where `lepton up` wrote `admin.url` and `admin-token` (default `.lepton/`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl AdminArgs {
    fn client(&self, manifest: Option<&Path>) -> anyhow::Result<AdminClient> {
        // The node's state dir `lepton up` would use for this manifest, when a node
        // wrote its admin URL there; else `./.lepton`.
        let dir = self.state_dir.clone().unwrap_or_else(|| {
            Some(default_state_dir(manifest))
                .filter(|dir| dir.join("admin.url").is_file())
                .unwrap_or_else(|| PathBuf::from(".lepton"))
        });
        AdminClient::locate(self.admin.clone(), &dir)
    }
}

/// Parses the arguments, installs the log (`filter` decides what is logged) and runs
/// the command.
pub fn main(filter: tracing_subscriber::EnvFilter) -> anyhow::Result<()> {
    let cli = Cli::parse();
    crate::logging::init(filter, cli.log_format);
    match cli.command {
        Command::Up(mut up) => {
            up.manifest = up
                .manifest
                .or_else(|| Some(PathBuf::from("lepton.toml")).filter(|p| p.is_file()));
            tokio_runtime()?.block_on(up.run())
        }
        Command::Control(control) => tokio_runtime()?.block_on(control.run()),
        Command::Node(node) => tokio_runtime()?.block_on(node.run()),
        Command::Check {
            manifest,
            state_dir,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(Some(&manifest)));
            tokio_runtime()?.block_on(check(&manifest, &state_dir))
        }
        Command::Deploy { manifest, admin } => deploy(&manifest, &admin),
        Command::Apps { admin } => apps(&admin),
        Command::Status { admin } => status(&admin),
        Command::Rollback {
            app,
            version,
            admin,
        } => {
            let body = version.map_or_else(
                || serde_json::json!({}),
                |v| serde_json::json!({ "version": v }),
            );
            let answer = admin
                .client(None)?
                .post(&format!("/v1/apps/{app}/rollback"), &body)?
                .ok()?;
            print_or_json(&admin, &answer, |out| {
                writeln!(out, "{app} is at version {}", answer["version"])?;
                Ok(())
            })
        }
        Command::Rm { app, admin } => {
            let answer = admin
                .client(None)?
                .delete(&format!("/v1/apps/{app}"))?
                .ok()?;
            print_or_json(&admin, &answer, |out| {
                writeln!(out, "removed {app}")?;
                Ok(())
            })
        }
        Command::Logs {
            function,
            app,
            follow,
            since,
            admin,
        } => logs(&admin, &function, app.as_deref(), follow, since.as_deref()),
        Command::Audit { limit, admin } => {
            let answer = admin
                .client(None)?
                .get(&format!("/v1/audit?limit={limit}"))?
                .ok()?;
            print_or_json(&admin, &answer, |out| {
                let rows = answer["records"].as_array().cloned().unwrap_or_default();
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r["time_ms"].as_u64().map(format_time).unwrap_or_default(),
                            text(&r["action"]),
                            text(&r["app"]),
                            text(&r["version"]),
                            text(&r["peer"]),
                            text(&r["outcome"]),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["TIME", "ACTION", "APP", "VERSION", "PEER", "OUTCOME"],
                    &rows,
                )
            })
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lepton-worker")
        .build()
        .context("starting the tokio runtime")
}

fn default_state_dir(manifest: Option<&Path>) -> PathBuf {
    match manifest.and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(".lepton"),
        _ => PathBuf::from(".lepton"),
    }
}

impl UpArgs {
    async fn run(self) -> anyhow::Result<()> {
        let mut signals = Signals::install();
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(self.manifest.as_deref()));
        // The manifest is checked first: a bad one fails before anything listens.
        let manifest = self.manifest.as_deref().map(Manifest::load).transpose()?;
        if let Some(url) = &self.alert_webhook {
            crate::ops::alerts::check_webhook(url)?;
        }
        if let Some(url) = &self.otlp {
            crate::ops::trace::traces_endpoint(url)?;
        }
        let config = NodeConfig::new(state_dir.clone())
            .max_instances(self.max_instances)
            .keep_versions(self.keep_versions)
            .body_budget(self.max_body_memory);
        let config = match self.manifest.as_deref().and_then(Path::parent) {
            Some(dir) => config.ort_dir(dir.join(".cache/onnxruntime")),
            None => config,
        };
        let node = Node::open(config).await?;
        if let Some(manifest) = &manifest {
            let app = &manifest.app;
            let steps = app.models.len() + app.trainers.len() + app.functions.len();
            let progress = std::sync::Arc::new(std::sync::Mutex::new(crate::progress::Steps::new(
                "up",
                steps as u64,
            )));
            let reporter = std::sync::Arc::clone(&progress);
            node.set_progress(Some(std::sync::Arc::new(move |what: &str| {
                reporter
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .step(what);
            })));
            let deployed = node.deploy_manifest(manifest, "local").await;
            node.set_progress(None);
            progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .finish();
            let deployed = deployed.map_err(|e| anyhow::anyhow!("{}", e.spec_error()))?;
            tracing::info!(app = %deployed.app, version = deployed.version, unchanged = deployed.unchanged, "deployed");
        }
        let (token, token_path) =
            AdminToken::load_or_create(self.admin_token_file.as_deref(), &state_dir)?;
        let admin_listener = tokio::net::TcpListener::bind(self.admin)
            .await
            .with_context(|| format!("cannot listen on {}", self.admin))?;
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let admin_address = admin_listener
            .local_addr()
            .context("reading the admin address")?;
        let address = listener.local_addr().context("reading the bound address")?;
        let admin_url = format!("http://{admin_address}");
        crate::fsutil::write_atomically(
            &state_dir.join("admin.url"),
            format!("{admin_url}\n").as_bytes(),
        )?;
        tracing::info!(token = %token_path.display(), "admin API on {admin_url}");

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let when_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|&s| s).await;
        };
        let admin = Admin::new(std::sync::Arc::clone(&node), token, self.max_blob_size);
        let admin_server = tokio::spawn(crate::http::serve_connections(
            admin_listener,
            admin.handler(),
            when_stopped(stopped.clone()),
            64,
        ));
        // Everything is loaded and bound: from here on the process needs only the
        // system calls of a serving node.
        if self.no_seccomp {
            tracing::warn!("--no-seccomp: running without the seccomp filter");
        } else {
            crate::sandbox::lock_down()?;
        }
        {
            // The ready lines are for whoever started the node; if nobody reads them
            // any more (a closed pipe), the node serves all the same.
            let mut stdout = std::io::stdout().lock();
            let written = writeln!(stdout, "lepton: admin on {admin_url}")
                .and_then(|()| writeln!(stdout, "lepton: listening on http://{address}"))
                .and_then(|()| stdout.flush());
            if let Err(error) = written {
                tracing::warn!("could not write the ready lines to stdout: {error}");
            }
        }
        if let Some(url) = self.alert_webhook.clone() {
            node.ops().alerts.set_webhook(url);
        }
        if let Some(url) = &self.otlp {
            crate::ops::trace::export_to(url, "lepton")?;
        }
        node.spawn_alerts();
        let closing = std::sync::Arc::clone(&node);
        tokio::spawn(async move {
            signals.next().await;
            let _ = stop.send(true);
            closing.ops().close();
            // A second signal means now: no drain, no checkpoint.
            signals.next().await;
            tracing::warn!("second signal: exiting at once");
            exit_now(130);
        });
        crate::http::serve(
            listener,
            std::sync::Arc::clone(&node),
            when_stopped(stopped),
            self.max_connections,
        )
        .await?;
        tracing::info!("shutting down: requests drained");
        let _ = admin_server.await;
        node.shutdown().await;
        Ok(())
    }
}

/// Prints the ready lines; if nobody reads them any more (a closed pipe), the process
/// serves all the same.
fn ready(lines: &[String]) {
    let mut stdout = std::io::stdout().lock();
    let mut written = Ok(());
    for line in lines {
        written = written.and_then(|()| writeln!(stdout, "{line}"));
    }
    if let Err(error) = written.and_then(|()| stdout.flush()) {
        tracing::warn!("could not write the ready lines to stdout: {error}");
    }
}

fn lock_down(no_seccomp: bool) -> anyhow::Result<()> {
    if no_seccomp {
        tracing::warn!("--no-seccomp: running without the seccomp filter");
        Ok(())
    } else {
        crate::sandbox::lock_down()
    }
}

/// A name unique to this process, for the lease.
fn process_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}-{}-{nanos:08x}", host.trim(), std::process::id())
}

impl ControlArgs {
    async fn run(self) -> anyhow::Result<()> {
        use crate::cluster::{Control, Leadership, bus};
        let mut signals = Signals::install();
        let holder = process_id();
        let client = bus::connect(
            &self.nats.nats,
            self.nats.nats_creds.as_deref(),
            &format!("lepton-control {holder}"),
        )
        .await?;
        let store = bus::Store::open(&client, self.nats.jetstream_domain.as_deref()).await?;
        let admin_listener = tokio::net::TcpListener::bind(self.admin)
            .await
            .with_context(|| format!("cannot listen on {}", self.admin))?;
        let admin_url = format!(
            "http://{}",
            admin_listener
                .local_addr()
                .context("reading the admin address")?
        );
        let leadership = tokio::select! {
            lease = Leadership::acquire(&store, &holder, &admin_url) => lease?,
            () = signals.next() => return Ok(()),
        };
        // Renewed from now on, while the apps are taken over too; once it is lost this
        // process must not act as leader for another moment: it exits.
        let keeper = tokio::spawn(leadership.clone().keep());
        tokio::spawn(async move {
            if let Ok(error) = keeper.await {
                tracing::error!("{error}; exiting");
                exit_now(1);
            }
        });
        let config = NodeConfig::new(self.state_dir.clone())
            .keep_versions(self.keep_versions)
            .ort_dir(PathBuf::from(".cache/onnxruntime"));
        let node = Node::open(config).await?;
        let start = Control::start(
            std::sync::Arc::clone(&node),
            client,
            store,
            holder,
            leadership.clone(),
        );
        let control = tokio::select! {
            control = start => control?,
            () = signals.next() => {
                leadership.release().await;
                return Ok(());
            }
        };
        let (token, token_path) =
            AdminToken::load_or_create(self.admin_token_file.as_deref(), &self.state_dir)?;
        crate::fsutil::write_atomically(
            &self.state_dir.join("admin.url"),
            format!("{admin_url}\n").as_bytes(),
        )?;
        tracing::info!(token = %token_path.display(), "admin API on {admin_url}");
        let closing = std::sync::Arc::clone(&node);
        let admin = Admin::with_cluster(node, token, self.max_blob_size, Some(control));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut stopped_rx = stopped.clone();
        let server = tokio::spawn(crate::http::serve_connections(
            admin_listener,
            admin.handler(),
            async move {
                let _ = stopped_rx.wait_for(|&s| s).await;
            },
            64,
        ));
        ready(&[format!("lepton: admin on {admin_url}")]);
        signals.next().await;
        let _ = stop.send(true);
        closing.ops().close();
        let _ = server.await;
        leadership.release().await;
        Ok(())
    }
}

impl NodeArgs {
    async fn run(self) -> anyhow::Result<()> {
        use crate::cluster::{Agent, AgentConfig, bus};
        let mut signals = Signals::install();
        if let Some(url) = &self.otlp {
            crate::ops::trace::traces_endpoint(url)?;
        }
        let name = crate::locked::Name::new(&self.name)
            .map_err(|e| anyhow::anyhow!("`--name {}`: {e}", self.name))?;
        let client = bus::connect(
            &self.nats.nats,
            self.nats.nats_creds.as_deref(),
            &format!("lepton-node {name}"),
        )
        .await?;
        let store = bus::Store::open(&client, self.nats.jetstream_domain.as_deref()).await?;
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".lepton/nodes").join(name.as_str()));
        let config = NodeConfig::new(state_dir)
            .restore(false)
            .max_instances(self.max_instances)
            .body_budget(self.max_body_memory)
            .ort_dir(PathBuf::from(".cache/onnxruntime"));
        let node = Node::open(config).await?;
        // Every replica of a function sees the same key-value stores.
        node.use_cluster_kv(store.js.clone());
        // ONNX Runtime is loaded now (not at the first model) to know what it can run.
        let (onnx, mut accelerators) = match node.models() {
            Ok(models) => (true, crate::cluster::agent::detect_accelerators(&models)),
            Err(error) => {
                tracing::warn!(
                    "no ONNX Runtime: functions with models are not placed here ({error:#})"
                );
                (false, Vec::new())
            }
        };
        if !self.accelerator.is_empty() {
            accelerators = self.accelerator.clone();
        }
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let address = listener.local_addr().context("reading the bound address")?;
        let agent = Agent::start(
            AgentConfig {
                name,
                labels: self.labels.clone(),
                accelerators,
                onnx,
                gateway: format!("http://{address}"),
                forward_max_body: self.forward_max_body,
            },
            std::sync::Arc::clone(&node),
            client,
            store,
        );
        tokio::select! {
            () = agent.joined() => {}
            () = signals.next() => return Ok(()),
        }
        if let Some(url) = &self.otlp {
            crate::ops::trace::export_to(url, "lepton")?;
        }
        lock_down(self.no_seccomp)?;
        // Alert rules of the functions placed here are judged here (the audit log and
        // the log say when one fires).
        node.spawn_alerts();
        ready(&[format!("lepton: listening on http://{address}")]);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let leaving = std::sync::Arc::clone(&agent);
        tokio::spawn(async move {
            signals.next().await;
            // Other gateways stop sending here first; then local requests drain.
            leaving.leave().await;
            let _ = stop.send(true);
            signals.next().await;
            tracing::warn!("second signal: exiting at once");
            exit_now(130);
        });
        let mut stopped_rx = stopped.clone();
        crate::http::serve_connections(
            listener,
            agent.handler(),
            async move {
                let _ = stopped_rx.wait_for(|&s| s).await;
            },
            self.max_connections,
        )
        .await?;
        tracing::info!("shutting down: requests drained");
        node.shutdown().await;
        Ok(())
    }
}

async fn check(manifest_path: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let manifest = Manifest::load(manifest_path)?;
    // A state dir of its own inside: `check` never touches a running node's state.
    let config = NodeConfig::new(state_dir.join("check")).restore(false);
    let config = match manifest_path.parent() {
        Some(dir) => config.ort_dir(dir.join(".cache/onnxruntime")),
        None => config,
    };
    let node = Node::open(config).await?;
    let lines = node
        .check(&manifest)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.spec_error()))?;
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        writeln!(stdout, "ok: {line}")?;
    }
    writeln!(stdout, "ok: {} is valid", manifest_path.display())?;
    Ok(())
}

fn deploy(manifest_path: &Path, admin: &AdminArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(manifest_path)?;
    let client = admin.client(Some(manifest_path))?;
    let answer = client.deploy(&manifest)?;
    print_or_json(admin, &answer, |out| {
        let unchanged = if answer["unchanged"].as_bool() == Some(true) {
            " (unchanged)"
        } else {
            ""
        };
        writeln!(
            out,
            "deployed {} version {}{unchanged}",
            text(&answer["app"]),
            answer["version"]
        )?;
        for route in answer["routes"].as_array().into_iter().flatten() {
            writeln!(out, "  {} -> {}", text(&route[1]), text(&route[0]))?;
        }
        Ok(())
    })
}

fn apps(admin: &AdminArgs) -> anyhow::Result<()> {
    let answer = admin.client(None)?.get("/v1/apps")?.ok()?;
    print_or_json(admin, &answer, |out| {
        let rows: Vec<Vec<String>> = answer["apps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|app| {
                let versions = app["versions"].as_array().map(|v| {
                    v.iter()
                        .map(|v| text(&v["version"]))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                let routes = app["routes"]
                    .as_array()
                    .map(|r| r.iter().map(|r| text(&r[1])).collect::<Vec<_>>().join(" "));
                vec![
                    text(&app["name"]),
                    text(&app["active"]),
                    versions.unwrap_or_default(),
                    routes.unwrap_or_default(),
                ]
            })
            .collect();
        table(out, &["APP", "ACTIVE", "VERSIONS", "ROUTES"], &rows)
    })
}

fn status(admin: &AdminArgs) -> anyhow::Result<()> {
    let answer = admin.client(None)?.get("/v1/status")?.ok()?;
    print_or_json(admin, &answer, |out| {
        let rows = |key: &str, fields: &[&str]| -> Vec<Vec<String>> {
            answer[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|row| fields.iter().map(|f| text(&row[*f])).collect())
                .collect()
        };
        if answer.get("nodes").is_some() {
            return cluster_status(out, &answer);
        }
        let functions = ["app", "version", "function", "route", "in_flight", "served"];
        table(
            out,
            &["APP", "VERSION", "FUNCTION", "ROUTE", "IN FLIGHT", "SERVED"],
            &rows("functions", &functions),
        )?;
        let models = [
            "app", "model", "digest", "target", "device", "sessions", "requests",
        ];
        writeln!(out)?;
        table(
            out,
            &[
                "APP", "MODEL", "DIGEST", "TARGET", "DEVICE", "SESSIONS", "REQUESTS",
            ],
            &rows("models", &models),
        )?;
        writeln!(out)?;
        table(out, &["APP", "TRAINER", "STEPS", "LAST CHECKPOINT"], &{
            answer["trainers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let last = t["last_checkpoint_ms"]
                        .as_u64()
                        .map(format_time)
                        .unwrap_or_else(|| "-".to_owned());
                    vec![
                        text(&t["app"]),
                        text(&t["trainer"]),
                        text(&t["steps"]),
                        last,
                    ]
                })
                .collect::<Vec<_>>()
        })?;
        let alerts = answer["alerts"].as_array().cloned().unwrap_or_default();
        if !alerts.is_empty() {
            writeln!(out)?;
            let rows: Vec<Vec<String>> = alerts
                .iter()
                .map(|a| {
                    vec![
                        text(&a["app"]),
                        text(&a["alert"]),
                        text(&a["function"]),
                        text(&a["when"]),
                        format!("{}s", a["over_ms"].as_u64().unwrap_or_default() / 1000),
                        text(&a["state"]).to_uppercase(),
                        a["value"]
                            .as_f64()
                            .map_or_else(|| "-".to_owned(), |v| format!("{v:.4}")),
                        a["since_ms"].as_u64().map(format_time).unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "APP", "ALERT", "FUNCTION", "WHEN", "OVER", "STATE", "VALUE", "SINCE",
                ],
                &rows,
            )?;
        }
        Ok(())
    })
}

/// `lepton logs`.
fn logs(
    admin: &AdminArgs,
    function: &str,
    app: Option<&str>,
    follow: bool,
    since: Option<&str>,
) -> anyhow::Result<()> {
    let encode = |v: &str| -> String {
        v.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let mut path = format!("/v1/functions/{}/logs?", encode(function));
    if let Some(app) = app {
        path.push_str(&format!("app={}&", encode(app)));
    }
    if let Some(since) = since {
        path.push_str(&format!("since={}&", encode(since)));
    }
    if follow {
        path.push_str("follow=1");
    }
    let client = admin.client(None)?;
    let mut stdout = std::io::stdout().lock();
    client.get_lines(&path, |line| {
        if admin.json {
            writeln!(stdout, "{line}")?;
        } else {
            let r: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let time = r["time_ms"].as_u64().map(format_time).unwrap_or_default();
            let id = text(&r["request_id"]);
            match r["stream"].as_str() {
                Some("request") => writeln!(
                    stdout,
                    "{time} {id} {} {} -> {} in {:.1} ms ({} bytes in{})",
                    text(&r["method"]),
                    text(&r["path"]),
                    text(&r["status"]),
                    r["latency_ms"].as_f64().unwrap_or_default(),
                    text(&r["bytes_in"]),
                    r["bytes_out"]
                        .as_u64()
                        .map(|b| format!(", {b} out"))
                        .unwrap_or_default(),
                )?,
                stream => writeln!(
                    stdout,
                    "{time} {id} {}: {}",
                    stream.unwrap_or("?"),
                    // Guest output: no escape sequence reaches the terminal.
                    text(&r["message"])
                        .chars()
                        .map(|c| if c.is_control() && c != '\t' {
                            '\u{fffd}'
                        } else {
                            c
                        })
                        .collect::<String>()
                )?,
            }
        }
        stdout.flush()?;
        Ok(())
    })
}

/// `lepton status` against a control plane: nodes, replicas, and why what is not
/// placed could not be.
fn cluster_status(out: &mut dyn std::io::Write, answer: &serde_json::Value) -> anyhow::Result<()> {
    let list = |key: &str| answer[key].as_array().cloned().unwrap_or_default();
    let nodes: Vec<Vec<String>> = list("nodes")
        .iter()
        .map(|n| {
            let labels = n["labels"]
                .as_object()
                .map(|l| {
                    l.iter()
                        .map(|(k, v)| format!("{k}={}", text(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let accelerators = n["accelerators"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|a| text(&a["kind"]))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                text(&n["name"]),
                text(&n["status"]),
                labels,
                accelerators,
                text(&n["gateway"]),
            ]
        })
        .collect();
    table(
        out,
        &["NODE", "STATUS", "LABELS", "ACCELERATORS", "GATEWAY"],
        &nodes,
    )?;
    writeln!(out)?;
    let replicas: Vec<Vec<String>> = list("replicas")
        .iter()
        .map(|r| {
            vec![
                text(&r["app"]),
                text(&r["function"]),
                text(&r["version"]),
                text(&r["node"]),
                text(&r["state"]),
                text(&r["error"]),
            ]
        })
        .collect();
    table(
        out,
        &["APP", "FUNCTION", "VERSION", "NODE", "STATE", "ERROR"],
        &replicas,
    )?;
    for placement in list("placements") {
        let unplaced = &placement["unplaced"];
        if unplaced.is_null() {
            continue;
        }
        writeln!(
            out,
            "\n{}/{}: {} replica(s) not placed:",
            text(&placement["app"]),
            text(&placement["function"]),
            unplaced["wanted"]
        )?;
        for rejection in unplaced["rejections"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "  {}: {}",
                text(&rejection["node"]),
                text(&rejection["reason"])
            )?;
        }
    }
    Ok(())
}

fn print_or_json(
    admin: &AdminArgs,
    answer: &serde_json::Value,
    human: impl FnOnce(&mut dyn std::io::Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if admin.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(answer)?)?;
        Ok(())
    } else {
        human(&mut stdout)
    }
}

/// A JSON value as table text: strings bare, `null` as `-`.
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn table(
    out: &mut dyn std::io::Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The signals that stop a node, installed once (before the node is ready, so that
/// none is missed): SIGINT, SIGTERM, and SIGHUP too, since a closed terminal must not end
/// the node without its checkpoints.
struct Signals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(interrupt), Ok(terminate), Ok(hangup)) => {
                Self(Some((interrupt, terminate, hangup)))
            }
            _ => {
                tracing::warn!("cannot install signal handlers; stop with SIGKILL");
                Self(None)
            }
        }
    }

    /// Waits for the next of them.
    async fn next(&mut self) {
        let Some((interrupt, terminate, hangup)) = &mut self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = hangup.recv() => tracing::info!("SIGHUP received"),
        }
    }
}

/// Ends the process at once, running no exit handlers (ONNX Runtime's static
/// destructors would run while its threads still do).
#[expect(
    unsafe_code,
    reason = "_exit has no preconditions; it is unsafe only as FFI"
)]
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` ends the process; nothing in it depends on our state.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_dates() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_time(1_796_083_200_000), "2026-12-01 00:00:00");
    }
}

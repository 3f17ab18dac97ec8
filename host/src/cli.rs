//! The `lepton` command line.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::engine::Runtime;
use crate::http::{App, serve_with};
use crate::manifest::Deployment;

/// Lepton: serverless AI functions as WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "lepton", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every function of a manifest over HTTP (control plane, node and gateway in one process).
    Up {
        /// The manifest.
        #[arg(default_value = "lepton.toml")]
        manifest: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
        /// Where compiled components, checkpoints and published weights are kept;
        /// defaults to `.lepton/` beside the manifest.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Component instances that may run at once on this node (all functions
        /// together); requests past that answer 503.
        #[arg(long, default_value_t = crate::engine::DEFAULT_POOL_INSTANCES)]
        max_instances: u32,
        /// Client connections open at once; past that new ones wait in the backlog.
        #[arg(long, default_value_t = crate::http::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
    },
    /// Validate a manifest and every component it names, without serving.
    Check {
        /// The manifest.
        #[arg(default_value = "lepton.toml")]
        manifest: PathBuf,
        /// As for `up`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// Parses the arguments and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lepton-worker")
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Up { manifest, listen, state_dir, max_instances, max_connections } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&manifest));
            runtime.block_on(up(&manifest, listen, &state_dir, max_instances, max_connections))
        }
        Command::Check { manifest, state_dir } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&manifest));
            runtime.block_on(async { check(&manifest, &state_dir) })
        }
    }
}

fn default_state_dir(manifest: &Path) -> PathBuf {
    manifest.parent().unwrap_or(Path::new(".")).join(".lepton")
}

async fn up(
    manifest: &Path,
    listen: SocketAddr,
    state_dir: &Path,
    max_instances: u32,
    max_connections: usize,
) -> anyhow::Result<()> {
    let deployment = Deployment::load(manifest)?;
    let runtime = Runtime::with_instances(max_instances)?;
    let app = Arc::new(App::load(&runtime, &deployment, state_dir)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr().context("reading the bound address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "lepton: listening on http://{address}").context("writing to stdout")?;
        stdout.flush().context("writing to stdout")?;
    }
    serve_with(listener, app, shutdown_signal(), max_connections).await
}

fn check(manifest: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let deployment = Deployment::load(manifest)?;
    let runtime = Runtime::new()?;
    let app = App::load(&runtime, &deployment, state_dir)?;
    let mut stdout = std::io::stdout().lock();
    if let Some(models) = app.models() {
        for model in &deployment.models {
            if let Some(loaded) = models.get(&model.name) {
                let onnx = loaded.onnx();
                let describe = |ios: &[crate::nn::Io]| {
                    ios.iter().map(|io| format!("{} {:?} {:?}", io.name, io.ty, io.shape)).collect::<Vec<_>>().join(", ")
                };
                writeln!(
                    stdout,
                    "ok: model `{}` on {:?}: inputs [{}] outputs [{}]",
                    model.name,
                    onnx.target(),
                    describe(onnx.inputs()),
                    describe(onnx.outputs())
                )?;
            }
        }
    }
    if let Some(trainers) = app.trainers() {
        for spec in &deployment.trainers {
            if let Some(trainer) = trainers.get(&spec.name) {
                writeln!(stdout, "ok: trainer `{}` at step {}", spec.name, trainer.steps())?;
            }
        }
    }
    for function in &deployment.functions {
        writeln!(stdout, "ok: function `{}` serves {}", function.name, function.route)?;
    }
    writeln!(stdout, "ok: {} is valid", manifest.display())?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
}

//! The Lepton host: serves WebAssembly components (`wasi:http` proxies) behind HTTP
//! routes, under a deny-by-default capability manifest.
//!
//! The pieces, in the order a request meets them:
//!
//! - [`manifest`]: `lepton.toml` parsed into a validated [`manifest::Manifest`];
//! - [`engine`]: one wasmtime engine per process (pooling allocator, epoch
//!   interruption) and the on-disk cache of compiled components;
//! - [`caps`]: the per-request WASI context built from a function's grants;
//! - [`http`]: the gateway: routing, limits, one fresh store per request.
//!
//! - [`locked`]: the content-addressed app spec ([`locked::LockedApp`]) that the CLI,
//!   the admin API and the node exchange;
//! - [`node`]: the long-lived node: registries, the app store, the atomically swapped
//!   function table, deploy / rollback / remove;
//! - [`api`]: the authenticated admin API; [`client`]: its client for the CLI;
//! - [`ops`]: metrics, function logs, rolling statistics, alerts, the status page.
//!
//! Embedding the host takes a few lines:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use lepton_host::{manifest::Manifest, node::{Node, NodeConfig}};
//!
//! let node = Node::open(NodeConfig::new(".lepton".into())).await?;
//! node.deploy_manifest(&Manifest::load("lepton.toml".as_ref())?, "local").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! lepton_host::http::serve(listener, node, async { let _ = tokio::signal::ctrl_c().await; }, 10_000).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod api;
mod bindings;
pub mod blobs;
pub mod caps;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod egress;
pub mod engine;
pub mod fsutil;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod infer;
pub mod kv;
pub mod locked;
pub mod logging;
pub mod manifest;
pub mod nn;
pub mod node;
pub mod ops;
pub mod progress;
pub mod sandbox;
pub mod train;

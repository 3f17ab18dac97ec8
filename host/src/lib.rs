//! The Lepton host: serves WebAssembly components (`wasi:http` proxies) behind HTTP
//! routes, under a deny-by-default capability manifest.
//!
//! The pieces, in the order a request meets them:
//!
//! - [`manifest`]: `lepton.toml` parsed into a validated [`manifest::Deployment`];
//! - [`engine`]: one wasmtime engine per process (pooling allocator, epoch
//!   interruption) and the on-disk cache of compiled components;
//! - [`caps`]: the per-request WASI context built from a function's grants;
//! - [`http`]: the gateway: routing, limits, one fresh store per request.
//!
//! Embedding the host takes a few lines:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use lepton_host::{engine::Runtime, http::{App, serve}, manifest::Deployment};
//!
//! let deployment = Deployment::load("lepton.toml".as_ref())?;
//! let runtime = Runtime::new()?;
//! let app = Arc::new(App::load(&runtime, &deployment, ".lepton".as_ref())?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! serve(listener, app, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod bindings;
pub mod caps;
pub mod cli;
pub mod engine;
pub mod http;
pub mod manifest;
pub mod nn;
pub mod train;

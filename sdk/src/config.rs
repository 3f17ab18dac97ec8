//! The function's configuration through the standard `wasi:config/store` interface
//! (@0.2.0-rc.1): the manifest's `config = { threshold = "0.8", api_key = { env =
//! "API_KEY" } }`, with `env` values read from the node's environment at deploy.
//!
//! ```no_run
//! let threshold: f32 = lepton_sdk::config::get("threshold")?
//!     .and_then(|v| v.parse().ok())
//!     .unwrap_or(0.5);
//! # let _ = threshold;
//! # Ok::<(), lepton_sdk::config::Error>(())
//! ```

use crate::bindings::wasi::config::store;

/// Why the configuration could not be read (the host's message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<store::Error> for Error {
    fn from(error: store::Error) -> Self {
        match error {
            store::Error::Upstream(message) | store::Error::Io(message) => Self(message),
        }
    }
}

/// The value of `key`, if the manifest sets it.
pub fn get(key: &str) -> Result<Option<String>, Error> {
    Ok(store::get(key)?)
}

/// Every key and value the manifest sets for this function.
pub fn get_all() -> Result<Vec<(String, String)>, Error> {
    Ok(store::get_all()?)
}

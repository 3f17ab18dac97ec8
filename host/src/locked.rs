//! The content-addressed app spec: what the CLI, the admin API and the node exchange.
//!
//! A [`LockedApp`] is a manifest after parsing (sizes and durations are numbers, names
//! are validated [`Name`]s) with every file replaced by the [`Digest`] of its bytes: a
//! component, a model, a trainer's initial graph, or a `files` mount packed as one tar
//! blob. A node resolves digests from its own blob store, never from the caller's file
//! system. Spin's locked app is the model.
//!
//! A locked app that arrives over the API is untrusted: [`LockedApp::validate`] checks
//! every range and reference the manifest parser checks, and every failure is a
//! [`SpecError`] `{scope, key, reason}` that the CLI prints as text and the API returns
//! as JSON, in the same words.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The only locked-app format this host reads.
pub const LOCK_VERSION: u32 = 1;
/// Longest accepted `timeout` (a request is not a batch job).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// A wasm32 linear memory cannot grow past 4 GiB.
pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;
/// Smallest `memory_limit`: one wasm page.
pub const MIN_MEMORY_LIMIT: u64 = 64 << 10;
/// Paths under this prefix belong to the host (health, metrics).
pub const RESERVED_ROUTE_PREFIX: &str = "/.well-known/lepton";

/// Paths the gateway answers with the Open Inference Protocol (models with
/// `protocol = "v2"`): no function route may claim them.
pub const INFERENCE_PREFIX: &str = "/v2";
/// Most functions, models or trainers in one app (each is work at deploy time).
pub const MAX_ITEMS: usize = 256;
/// Most environment variables or `files` mounts of one function.
pub const MAX_GRANTS: usize = 256;
/// Longest route, environment variable or guest path accepted.
pub const MAX_TEXT: usize = 4096;

/// A validation failure: where (`scope`), which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[non_exhaustive]
pub struct SpecError {
    /// `function `hello``, `model `magika``, `app `shop``, or empty for the top level.
    pub scope: String,
    /// The offending key (`route`, `memory_limit`), when one key is at fault.
    pub key: Option<String>,
    /// What is wrong, with the value.
    pub reason: String,
}

impl SpecError {
    /// An error at `scope`, on `key`.
    pub fn new(scope: impl Into<String>, key: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.scope.is_empty() {
            write!(f, "{}: ", self.scope)?;
        }
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// A name of an app, function, model or trainer: 1 to 64 of `a-z`, `0-9`, `-`, `_`,
/// starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(
                "invalid name: use 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter"
                    .to_owned(),
            )
        }
    }

    /// A valid name made from arbitrary text (a directory's name): lowercased, other
    /// characters become `-`; `app` when nothing usable is left.
    pub fn sanitized(text: &str) -> Self {
        let mut name: String = text
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .skip_while(|c| !c.is_ascii_lowercase())
            .take(64)
            .collect();
        while name.ends_with('-') {
            name.pop();
        }
        Self::new(&name).unwrap_or_else(|_| Self("app".to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::new(&value).map_err(|e| format!("{value:?}: {e}"))
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// A content digest, `sha256:` and 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a finished hasher holds.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok = text.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a digest (expected sha256:<64 hex digits>)"
            ))
        }
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    /// The whole `sha256:...` text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::parse(&value)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> Self {
        digest.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed route, in Spin's syntax: `/hello` is exactly `/hello`; `/hello/...` is
/// `/hello` and every path below it (whole segments); `/...` is every path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Route {
    /// The path without a trailing `/...`; `/` for `/...`.
    base: String,
    /// Whether paths below `base` match too.
    prefix: bool,
}

impl Route {
    /// Parses a route. Anything else with `...` or `*`, a query, a fragment, an empty
    /// or dot segment, or a path under [`RESERVED_ROUTE_PREFIX`] is refused.
    pub fn parse(route: &str) -> Result<Self, String> {
        if !route.starts_with('/') {
            return Err(format!("{route:?} must start with '/'"));
        }
        if route.len() > MAX_TEXT {
            return Err(format!("routes are at most {MAX_TEXT} bytes"));
        }
        let (base, prefix) = match route.strip_suffix("/...") {
            Some(base) => (if base.is_empty() { "/" } else { base }, true),
            None => (route, false),
        };
        if base.contains("...") || base.contains('*') {
            return Err(format!(
                "{route:?}: wildcards are written only as a final `/...` (\"/api/...\" matches /api and everything below it)"
            ));
        }
        if base.contains(['?', '#', ' ']) || !base.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!(
                "{route:?} must be a plain ASCII path (no query, fragment, space or control character; percent-encode the rest)"
            ));
        }
        let base = match base.trim_end_matches('/') {
            "" => "/",
            trimmed => trimmed,
        };
        if base.len() > 1
            && base[1..]
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(format!(
                "{route:?} must not have empty, `.` or `..` segments"
            ));
        }
        // Host paths are answered before any route, so only routes inside the
        // reserved prefix are refused (they could never be reached). `/v2` became
        // reserved later (the Open Inference Protocol): manifests refuse it
        // (`Route::check_new`), but versions stored before still load.
        if Self::under(base, RESERVED_ROUTE_PREFIX) {
            return Err(format!(
                "{route:?} is reserved for the host (paths under `{RESERVED_ROUTE_PREFIX}`)"
            ));
        }
        Ok(Self {
            base: base.to_owned(),
            prefix,
        })
    }

    fn under(base: &str, prefix: &str) -> bool {
        base.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Whether this route lies under `/v2`, which the host answers (the Open
    /// Inference Protocol), so that no request would ever reach it.
    pub fn shadowed(&self) -> bool {
        Self::under(&self.base, INFERENCE_PREFIX)
    }

    /// Refuses what a new manifest may no longer say: a route under `/v2`.
    pub fn check_new(&self) -> Result<(), String> {
        if self.shadowed() {
            return Err(format!(
                "{:?} is reserved for the host (paths under `{INFERENCE_PREFIX}`)",
                self.to_string()
            ));
        }
        Ok(())
    }

    /// Whether `path` (already normalized) is served by this route.
    pub fn matches(&self, path: &str) -> bool {
        if !self.prefix {
            return path == self.base;
        }
        if self.base == "/" {
            return true;
        }
        path.strip_prefix(&self.base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Orders routes so that the most specific comes first: exact before prefix of the
    /// same base, longer bases first.
    pub fn specificity(&self) -> (usize, bool) {
        (self.base.len(), !self.prefix)
    }

    /// Whether two routes are the same claim (the same text once normalized).
    pub fn same_as(&self, other: &Self) -> bool {
        self == other
    }
}

impl TryFrom<String> for Route {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::parse(&value)
    }
}

impl From<Route> for String {
    fn from(route: Route) -> Self {
        route.to_string()
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.prefix, self.base.as_str()) {
            (true, "/") => f.write_str("/..."),
            (true, base) => write!(f, "{base}/..."),
            (false, base) => f.write_str(base),
        }
    }
}

/// An exact `scheme://host:port` a guest may send requests to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OutboundHost {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP address, lowercase.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for OutboundHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl TryFrom<String> for OutboundHost {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::parse(&value)
    }
}

impl From<OutboundHost> for String {
    fn from(host: OutboundHost) -> Self {
        host.to_string()
    }
}

impl OutboundHost {
    /// Parses `scheme://host:port`; the port may be left out for the scheme's default.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let (scheme, rest) = pattern
            .split_once("://")
            .ok_or_else(|| format!("{pattern:?} is not of the form scheme://host:port"))?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => {
                return Err(format!(
                    "{pattern:?} has scheme {scheme:?}; expected \"http\" or \"https\""
                ));
            }
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', '*']) {
            return Err(format!(
                "{pattern:?} must be exactly scheme://host:port (no path, user or wildcard)"
            ));
        }
        let parse_port = |port: &str| {
            port.parse::<u16>()
                .map_err(|_| format!("{pattern:?} has an invalid port {port:?}"))
        };
        let (host, port) = if rest.starts_with('[') {
            // An IPv6 literal: `[::1]` or `[::1]:8080`.
            let end = rest
                .find(']')
                .ok_or_else(|| format!("{pattern:?} has an unclosed `[`"))?;
            let (host, after) = rest.split_at(end + 1);
            let port = match after.strip_prefix(':') {
                Some(port) => parse_port(port)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{pattern:?} has text after the address")),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), parse_port(port)?),
                None => (rest.to_owned(), default_port),
            }
        };
        if host.contains(':') && !host.starts_with('[') {
            return Err(format!(
                "{pattern:?}: an IPv6 address is written in brackets, e.g. \"http://[::1]:8080\""
            ));
        }
        if host.is_empty()
            || !host.chars().all(|c| c.is_ascii_graphic())
            || host.contains(['[', ']']) && !(host.starts_with('[') && host.ends_with(']'))
        {
            return Err(format!("{pattern:?} has an invalid host"));
        }
        Ok(Self {
            scheme: scheme.to_owned(),
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether a request to `scheme://host:port` is allowed by this pattern.
    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme == scheme && self.host.eq_ignore_ascii_case(host) && self.port == port
    }
}

/// Where a model or trainer should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The CPU.
    Cpu,
    /// A CUDA GPU where one registers; the CPU otherwise (logged).
    Gpu,
}

/// The loss a trainer minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Softmax cross-entropy of logits `[N, C]` against class indices `[N]`.
    CrossEntropy,
    /// Mean squared error against targets shaped like the output.
    Mse,
}

/// A trainer's optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Optimizer {
    /// AdamW (betas 0.9, 0.999; eps 1e-8).
    AdamW {
        /// Learning rate.
        lr: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// Stochastic gradient descent with momentum.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0: plain SGD).
        momentum: f64,
    },
}

/// Dynamic batching settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Most rows in one run.
    pub max_size: u32,
    /// Longest wait for a batch to fill.
    #[serde(with = "millis")]
    pub max_wait: Duration,
}

/// A read-only directory granted to the guest: a tar blob unpacked by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMount {
    /// The directory's contents, packed as one tar blob.
    pub source: Digest,
    /// Absolute path the guest sees it at.
    pub destination: String,
}

/// A function: its component, route, limits and grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FunctionSpec {
    /// Validated name.
    pub name: Name,
    /// The component's bytes.
    pub component: Digest,
    /// Route, in Spin's syntax.
    pub route: Route,
    /// Wall-clock limit of one request.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Linear memory cap of one instance, in bytes.
    pub memory_limit: u64,
    /// Requests run at once.
    pub max_concurrency: u32,
    /// Requests waiting for a slot before new ones get 503.
    pub max_queue: u32,
    /// Request body cap, in bytes.
    pub max_body_size: u64,
    /// Environment variables granted to the guest.
    pub environment: Vec<(String, String)>,
    /// Read-only directories granted to the guest.
    pub files: Vec<FileMount>,
    /// Outbound HTTP destinations granted to the guest.
    pub allowed_outbound_hosts: Vec<OutboundHost>,
    /// Models the guest may load by name.
    pub models: Vec<Name>,
    /// Whether the guest may load models from bytes.
    pub allow_model_upload: bool,
    /// Cap on a model loaded from bytes.
    pub max_model_upload_size: u64,
    /// Trainers the guest may open.
    pub trainers: Vec<Name>,
    /// `wasi:keyvalue` stores the guest may open (app-scoped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_value_stores: Vec<Name>,
    /// `wasi:config` keys the guest sees: literal values, or the names of node
    /// environment variables read at load (their values are never written here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config: Vec<(String, ConfigValue)>,
    /// How many replicas a cluster runs (`lepton up` runs one).
    #[serde(default, skip_serializing_if = "Scale::is_default")]
    pub scale: Scale,
    /// Where a cluster may place it (ignored by `lepton up`).
    #[serde(default, skip_serializing_if = "PlacementSpec::is_default")]
    pub placement: PlacementSpec,
}

/// A `wasi:config` value: `"text"`, or `{ env = "NAME" }` (read from the node's
/// environment when the app is loaded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ConfigValue {
    /// The value itself.
    Value(String),
    /// The node environment variable holding it.
    Env(String),
}

/// Most `wasi:config` keys of one function.
pub const MAX_CONFIG_KEYS: usize = 256;

/// Longest `wasi:config` value, in bytes.
pub const MAX_CONFIG_VALUE: usize = 64 << 10;

/// Checks a `wasi:config` key: 1 to 128 of ASCII letters, digits, `_`, `.` and `-`.
pub fn check_config_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.len() > 128
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "{key:?} is not a config key (1 to 128 of ASCII letters, digits, `_`, `.` and `-`)"
        ));
    }
    Ok(())
}

/// Most replicas one function may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// How many replicas of a function a cluster runs: `replicas = N`, or
/// `scale = { min, max, target_concurrency, scale_to_zero_after }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Scale {
    /// A fixed count.
    Fixed(u32),
    /// Scaled on observed in-flight requests (Knative's KPA), between `min` and `max`.
    Auto {
        /// Fewest replicas (0: scale to zero).
        min: u32,
        /// Most replicas.
        max: u32,
        /// In-flight requests per replica the autoscaler aims at.
        target_concurrency: u32,
        /// Idle time before the last replica goes (when `min` is 0).
        #[serde(with = "millis")]
        scale_to_zero_after: Duration,
    },
}

impl Default for Scale {
    fn default() -> Self {
        Self::Fixed(1)
    }
}

impl Scale {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether a function uses an accelerator: `accelerator = "required" | "preferred" | "none"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceleratorUse {
    /// Only nodes with an accelerator.
    Required,
    /// Nodes with one score higher.
    Preferred,
    /// Any node; models run on the CPU.
    #[default]
    None,
}

/// `placement = { tier, accelerator, labels, near_region }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// `"cloud"` or `"edge"`: only nodes labelled `tier=` that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Accelerator use.
    #[serde(default, skip_serializing_if = "is_default")]
    pub accelerator: AcceleratorUse,
    /// Labels a node must have, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Region whose nodes score higher (`region=` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_region: Option<String>,
}

impl PlacementSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A model: its ONNX file and how to run it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ModelSpec {
    /// Validated name.
    pub name: Name,
    /// The ONNX file's bytes.
    pub file: Digest,
    /// Requested target.
    pub target: Target,
    /// Dynamic batching, if configured.
    pub batch: Option<BatchSpec>,
    /// Sessions run in parallel; `None`: one per core of the node that runs it (so the
    /// locked app does not depend on the machine that locked it).
    #[serde(default)]
    pub sessions: Option<u32>,
    /// Intra-op threads per session.
    pub threads: u32,
    /// Served to clients over this protocol; `None`: reachable only through functions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// The node's environment variable whose value clients must send as a bearer
    /// token (the name only: the secret is never written into the locked app).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

/// A protocol a model is served over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The Open Inference Protocol (KServe v2, as Triton serves it) under `/v2/`.
    V2,
}

/// A trainer: its initial graph, loss and optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TrainerSpec {
    /// Validated name.
    pub name: Name,
    /// The initial ONNX graph's bytes.
    pub init: Digest,
    /// The loss.
    pub loss: Loss,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Requested target.
    pub target: Target,
    /// Checkpoint period.
    #[serde(with = "millis")]
    pub checkpoint_every: Duration,
    /// The model `publish()` may replace.
    pub publishes: Option<Name>,
}

impl TrainerSpec {
    /// A digest of everything that makes a trainer's state meaningful (its initial
    /// graph and settings): a trainer with the same fingerprint keeps its weights,
    /// step count and checkpoints across versions; another starts afresh.
    pub fn fingerprint(&self) -> Digest {
        Digest::of(&serde_json::to_vec(self).unwrap_or_default())
    }
}

/// An app: one manifest, content-addressed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedApp {
    /// Must be [`LOCK_VERSION`].
    pub lock_version: u32,
    /// The app's name.
    pub name: Name,
    /// Functions, ordered by name.
    pub functions: Vec<FunctionSpec>,
    /// Models, ordered by name.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// Trainers, ordered by name.
    #[serde(default)]
    pub trainers: Vec<TrainerSpec>,
    /// Alert rules, ordered by name (left out when there are none, so apps without
    /// alerts keep their digests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<AlertSpec>,
}

/// What an alert rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertMetric {
    /// 5xx answers / requests.
    ErrorRate,
    /// Requests turned away at capacity / requests.
    RejectedRate,
    /// Median latency, in seconds.
    P50Latency,
    /// 99th percentile latency, in seconds.
    P99Latency,
}

impl AlertMetric {
    /// Its name in a `when`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorRate => "error_rate",
            Self::RejectedRate => "rejected_rate",
            Self::P50Latency => "p50_latency",
            Self::P99Latency => "p99_latency",
        }
    }

    /// Whether its values are durations (written `250ms`), not ratios.
    pub fn is_latency(self) -> bool {
        matches!(self, Self::P50Latency | Self::P99Latency)
    }
}

/// The longest window an alert may judge (the rolling statistics kept per function).
pub const MAX_ALERT_WINDOW: Duration = Duration::from_secs(600);

/// One `[alert.NAME]` rule: fires while `metric` of `function` over the last `over` is
/// above (or below) `threshold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertSpec {
    /// The rule's name.
    pub name: Name,
    /// The function it watches.
    pub function: Name,
    /// What it compares.
    pub metric: AlertMetric,
    /// `true`: fires above the threshold; `false`: below.
    pub above: bool,
    /// A ratio, or seconds for a latency.
    pub threshold: f64,
    /// The rolling window.
    #[serde(with = "millis")]
    pub over: Duration,
}

impl AlertSpec {
    /// The rule as it would be written, e.g. `error_rate > 0.05`.
    pub fn when(&self) -> String {
        let op = if self.above { ">" } else { "<" };
        if self.metric.is_latency() {
            format!(
                "{} {op} {}ms",
                self.metric.as_str(),
                (self.threshold * 1e3).round()
            )
        } else {
            format!("{} {op} {}", self.metric.as_str(), self.threshold)
        }
    }

    /// Parses a `when` such as `error_rate > 0.05` or `p99_latency > 250ms`.
    pub fn parse_when(text: &str) -> Result<(AlertMetric, bool, f64), String> {
        let expected = "expected `METRIC > VALUE` or `METRIC < VALUE`, METRIC one of error_rate, \
                        rejected_rate (ratios from 0 to 1), p50_latency, p99_latency (durations such as 250ms)";
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [metric, op, value] = parts.as_slice() else {
            return Err(format!("invalid {text:?}: {expected}"));
        };
        let metric = match *metric {
            "error_rate" => AlertMetric::ErrorRate,
            "rejected_rate" => AlertMetric::RejectedRate,
            "p50_latency" => AlertMetric::P50Latency,
            "p99_latency" => AlertMetric::P99Latency,
            other => return Err(format!("unknown metric {other:?}: {expected}")),
        };
        let above = match *op {
            ">" => true,
            "<" => false,
            other => return Err(format!("unknown comparison {other:?}: {expected}")),
        };
        let threshold = if metric.is_latency() {
            crate::manifest::parse_duration(value)?.as_secs_f64()
        } else {
            let ratio: f64 = value
                .parse()
                .map_err(|_| format!("invalid ratio {value:?}: {expected}"))?;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(format!("the ratio {value} is not between 0 and 1"));
            }
            ratio
        };
        Ok((metric, above, threshold))
    }

    fn validate(&self) -> Result<(), SpecError> {
        let error = |key: &str, reason: String| {
            SpecError::new(format!("alert `{}`", self.name), Some(key), reason)
        };
        if !self.threshold.is_finite() || self.threshold < 0.0 {
            return Err(error(
                "when",
                "the threshold must be a number of 0 or more".into(),
            ));
        }
        if !self.metric.is_latency() && self.threshold > 1.0 {
            return Err(error("when", "a ratio's threshold is at most 1".into()));
        }
        if self.over < Duration::from_secs(1) || self.over > MAX_ALERT_WINDOW {
            return Err(error(
                "over",
                format!("must be from 1s to {}m", MAX_ALERT_WINDOW.as_secs() / 60),
            ));
        }
        Ok(())
    }
}

impl LockedApp {
    /// The digest of the app's canonical JSON: equal digests, equal apps.
    pub fn digest(&self) -> Digest {
        Digest::of(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// Every blob the app references (components, models, trainer inits, mounts), once each.
    pub fn blobs(&self) -> Vec<Digest> {
        let mut blobs: Vec<Digest> = self
            .functions
            .iter()
            .flat_map(|f| {
                std::iter::once(f.component.clone()).chain(f.files.iter().map(|m| m.source.clone()))
            })
            .chain(self.models.iter().map(|m| m.file.clone()))
            .chain(self.trainers.iter().map(|t| t.init.clone()))
            .collect();
        blobs.sort();
        blobs.dedup();
        blobs
    }

    /// Checks every range and cross-reference; the first failure is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.lock_version != LOCK_VERSION {
            return Err(SpecError::new(
                "",
                Some("lock_version"),
                format!(
                    "is {}, this host reads only {LOCK_VERSION}",
                    self.lock_version
                ),
            ));
        }
        let app = format!("app `{}`", self.name);
        if self.functions.len() > MAX_ITEMS
            || self.models.len() > MAX_ITEMS
            || self.trainers.len() > MAX_ITEMS
            || self.alerts.len() > MAX_ITEMS
        {
            return Err(SpecError::new(
                app,
                None,
                format!("at most {MAX_ITEMS} functions, models and trainers each"),
            ));
        }
        unique(self.models.iter().map(|m| &m.name), "model")?;
        unique(self.trainers.iter().map(|t| &t.name), "trainer")?;
        unique(self.functions.iter().map(|f| &f.name), "function")?;
        unique(self.alerts.iter().map(|a| &a.name), "alert")?;
        for alert in &self.alerts {
            alert.validate()?;
            if !self.functions.iter().any(|f| f.name == alert.function) {
                return Err(SpecError::new(
                    format!("alert `{}`", alert.name),
                    Some("function"),
                    format!(
                        "no function named {:?} in this app",
                        alert.function.as_str()
                    ),
                ));
            }
        }
        for model in &self.models {
            model.validate()?;
        }
        for trainer in &self.trainers {
            trainer.validate()?;
            if let Some(model) = &trainer.publishes
                && !self.models.iter().any(|m| &m.name == model)
            {
                return Err(SpecError::new(
                    format!("trainer `{}`", trainer.name),
                    Some("publishes"),
                    format!(
                        "no model named {:?} (declare it as [model.{model}])",
                        model.as_str()
                    ),
                ));
            }
        }
        for function in &self.functions {
            function.validate()?;
            let scope = || format!("function `{}`", function.name);
            if let Some(missing) = function
                .models
                .iter()
                .find(|m| !self.models.iter().any(|model| &model.name == *m))
            {
                return Err(SpecError::new(
                    scope(),
                    Some("models"),
                    format!(
                        "no model named {:?} (declare it as [model.{missing}])",
                        missing.as_str()
                    ),
                ));
            }
            if let Some(missing) = function
                .trainers
                .iter()
                .find(|t| !self.trainers.iter().any(|tr| &tr.name == *t))
            {
                return Err(SpecError::new(
                    scope(),
                    Some("trainers"),
                    format!(
                        "no trainer named {:?} (declare it as [trainer.{missing}])",
                        missing.as_str()
                    ),
                ));
            }
        }
        for (i, a) in self.functions.iter().enumerate() {
            if let Some(b) = self.functions[i + 1..]
                .iter()
                .find(|b| b.route.same_as(&a.route))
            {
                return Err(SpecError::new(
                    "",
                    None,
                    format!(
                        "functions `{}` and `{}` both claim route \"{}\"",
                        a.name, b.name, a.route
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks that `name` is a portable environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn check_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let starts = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !starts || name.len() > 256 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{name:?} is not an environment variable name (letters, digits and `_`, not starting with a digit, at most 256 bytes)"
        ));
    }
    Ok(())
}

fn unique<'a>(names: impl Iterator<Item = &'a Name>, kind: &str) -> Result<(), SpecError> {
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(SpecError::new(
                format!("{kind} `{name}`"),
                None,
                "declared twice",
            ));
        }
    }
    Ok(())
}

impl FunctionSpec {
    fn validate(&self) -> Result<(), SpecError> {
        let error = |key: &str, reason: String| {
            SpecError::new(format!("function `{}`", self.name), Some(key), reason)
        };
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(error(
                "timeout",
                format!(
                    "must be more than 0s and at most {}s",
                    MAX_TIMEOUT.as_secs()
                ),
            ));
        }
        if !(MIN_MEMORY_LIMIT..=MAX_MEMORY_LIMIT).contains(&self.memory_limit) {
            return Err(error(
                "memory_limit",
                "must be between 64KiB (one page) and 4GiB".to_owned(),
            ));
        }
        if self.max_concurrency == 0 {
            return Err(error("max_concurrency", "must be at least 1".to_owned()));
        }
        if self.environment.len() > MAX_GRANTS
            || self.files.len() > MAX_GRANTS
            || self.allowed_outbound_hosts.len() > MAX_GRANTS
        {
            return Err(error(
                "environment",
                format!("at most {MAX_GRANTS} variables, mounts and hosts each"),
            ));
        }
        for (key, value) in &self.environment {
            if key.is_empty()
                || key.contains(['=', '\0'])
                || value.contains('\0')
                || key.len() + value.len() > MAX_TEXT
            {
                return Err(error("environment", format!("invalid variable {key:?}")));
            }
        }
        if self.config.len() > MAX_CONFIG_KEYS {
            return Err(error("config", format!("at most {MAX_CONFIG_KEYS} keys")));
        }
        for (i, (key, value)) in self.config.iter().enumerate() {
            check_config_key(key).map_err(|e| error("config", e))?;
            if self.config[..i].iter().any(|(k, _)| k == key) {
                return Err(error("config", format!("key {key:?} is given twice")));
            }
            match value {
                ConfigValue::Value(text) if text.len() > MAX_CONFIG_VALUE => {
                    return Err(error(
                        "config",
                        format!("{key:?}: values are at most {MAX_CONFIG_VALUE} bytes"),
                    ));
                }
                ConfigValue::Value(_) => {}
                ConfigValue::Env(name) => {
                    check_env_name(name).map_err(|e| error("config", format!("{key:?}: {e}")))?;
                    if name.starts_with("LEPTON_") {
                        return Err(error(
                            "config",
                            format!(
                                "{key:?}: `{name}` is one of the node's own settings (LEPTON_*), never handed to a function"
                            ),
                        ));
                    }
                }
            }
        }
        if self.key_value_stores.len() > MAX_GRANTS {
            return Err(error(
                "key_value_stores",
                format!("at most {MAX_GRANTS} stores"),
            ));
        }
        match self.scale {
            Scale::Fixed(n) if n > MAX_REPLICAS => {
                return Err(error("replicas", format!("must be at most {MAX_REPLICAS}")));
            }
            Scale::Auto {
                min,
                max,
                target_concurrency,
                ..
            } if max == 0 || min > max || max > MAX_REPLICAS || target_concurrency == 0 => {
                return Err(error(
                    "scale",
                    format!(
                        "needs 0 <= min <= max, 1 <= max <= {MAX_REPLICAS} and target_concurrency >= 1"
                    ),
                ));
            }
            _ => {}
        }
        let placement = &self.placement;
        if let Some(tier) = &placement.tier
            && tier != "cloud"
            && tier != "edge"
        {
            return Err(error(
                "placement",
                format!("tier {tier:?} is not \"cloud\" or \"edge\""),
            ));
        }
        let label_ok = |text: &str| {
            !text.is_empty()
                && text.len() <= 63
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if placement.labels.len() > MAX_GRANTS
            || placement
                .labels
                .iter()
                .any(|(k, v)| !label_ok(k) || !label_ok(v))
            || placement
                .near_region
                .as_deref()
                .is_some_and(|r| !label_ok(r))
        {
            return Err(error(
                "placement",
                "labels and regions are 1 to 63 of a-z, A-Z, 0-9, '-', '_' and '.'".to_owned(),
            ));
        }
        for (i, mount) in self.files.iter().enumerate() {
            let path = &mount.destination;
            if self.files[..i]
                .iter()
                .any(|m| m.destination.trim_end_matches('/') == path.trim_end_matches('/'))
            {
                return Err(error(
                    "files",
                    format!("destination {path:?} is mounted twice"),
                ));
            }
            let clean = path.starts_with('/')
                && path.len() <= MAX_TEXT
                && !path.contains('\0')
                && path.split('/').skip(1).all(|s| s != "." && s != "..");
            if !clean {
                return Err(error(
                    "files",
                    format!("destination {path:?} must be an absolute path without `.` or `..`"),
                ));
            }
        }
        Ok(())
    }
}

impl ModelSpec {
    /// Sessions to run: as declared, else one per core of this machine (at most 256).
    pub fn sessions(&self) -> u32 {
        self.sessions.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(256) as u32)
        })
    }

    fn validate(&self) -> Result<(), SpecError> {
        let scope = || format!("model `{}`", self.name);
        if let Some(name) = &self.token_env {
            if self.protocol.is_none() {
                return Err(SpecError::new(
                    scope(),
                    Some("token_env"),
                    "is for a model served to clients: set `protocol = \"v2\"` too",
                ));
            }
            check_env_name(name)
                .map_err(|reason| SpecError::new(scope(), Some("token_env"), reason))?;
        }
        if let Some(batch) = self.batch
            && (batch.max_size < 1 || batch.max_wait > Duration::from_secs(1))
        {
            return Err(SpecError::new(
                scope(),
                Some("batch"),
                "`max_size` must be at least 1 and `max_wait` at most 1s",
            ));
        }
        if !self.sessions.is_none_or(|n| (1..=256).contains(&n))
            || !(1..=256).contains(&self.threads)
        {
            return Err(SpecError::new(
                scope(),
                None,
                "`sessions` and `threads` must be between 1 and 256",
            ));
        }
        Ok(())
    }
}

impl TrainerSpec {
    fn validate(&self) -> Result<(), SpecError> {
        let error = |key: &str, reason: String| {
            SpecError::new(format!("trainer `{}`", self.name), Some(key), reason)
        };
        let (Optimizer::AdamW { lr, .. } | Optimizer::Sgd { lr, .. }) = self.optimizer;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(error(
                "optimizer.lr",
                format!("{lr} must be a positive number"),
            ));
        }
        match self.optimizer {
            Optimizer::Sgd { momentum, .. } if !(0.0..1.0).contains(&momentum) => {
                return Err(error(
                    "optimizer.momentum",
                    format!("{momentum} must be in [0, 1)"),
                ));
            }
            Optimizer::AdamW { weight_decay, .. }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) =>
            {
                return Err(error(
                    "optimizer.weight_decay",
                    format!("{weight_decay} must be a number >= 0"),
                ));
            }
            _ => {}
        }
        if self.checkpoint_every.is_zero() {
            return Err(error("checkpoint_every", "must be more than 0s".to_owned()));
        }
        Ok(())
    }
}

/// Durations as whole milliseconds in JSON.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        duration: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_use_spins_syntax() {
        let exact = Route::parse("/hello").expect("valid");
        assert!(exact.matches("/hello"));
        assert!(!exact.matches("/hello/x"));
        assert!(!exact.matches("/hellothere"));
        let prefix = Route::parse("/hello/...").expect("valid");
        assert!(prefix.matches("/hello") && prefix.matches("/hello/a/b"));
        assert!(!prefix.matches("/hellothere"));
        let all = Route::parse("/...").expect("valid");
        assert!(all.matches("/") && all.matches("/anything/at/all"));
        assert_eq!(all.to_string(), "/...");
        assert_eq!(
            Route::parse("/hello/").expect("valid").to_string(),
            "/hello"
        );
        assert!(Route::parse("/").expect("valid").matches("/"));
        assert!(!Route::parse("/").expect("valid").matches("/x"));
        for bad in [
            "hello",
            "/api/*",
            "/a/.../b",
            "/a...",
            "/a?b",
            "/a/../b",
            "/a//b",
            "/.well-known/lepton/x",
            "/.well-known/lepton/...",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(Route::parse("/.well-known/leptonx").is_ok());
        // `/v2` is refused in new manifests only; stored routes under it still parse.
        for text in ["/v2", "/v2/...", "/v2/models/x"] {
            let route = Route::parse(text).expect("stored routes load");
            assert!(route.shadowed() && route.check_new().is_err(), "{text}");
        }
        for text in ["/v20", "/v", "/api/v2"] {
            let route = Route::parse(text).expect("valid");
            assert!(!route.shadowed() && route.check_new().is_ok(), "{text}");
        }
        // Every accepted route reads back as itself (it is stored as text).
        for text in ["/", "//", "/a/", "/a//", "/...", "//...", "/a/b/...", "/a/"] {
            let route = Route::parse(text).expect("valid");
            assert_eq!(
                Route::parse(&route.to_string()),
                Ok(route.clone()),
                "{text}"
            );
        }
        assert!(Route::parse("//").expect("valid").matches("/"));
        assert!(Route::parse("/.well-known/...").is_ok());
        let mut routes = [all, prefix, exact];
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        assert_eq!(
            routes.map(|r| r.to_string()),
            ["/hello", "/hello/...", "/..."]
        );
    }

    #[test]
    fn outbound_hosts() {
        let host = OutboundHost::parse("http://127.0.0.1:8080").expect("valid");
        assert!(host.matches("http", "127.0.0.1", 8080));
        assert!(!host.matches("https", "127.0.0.1", 8080));
        assert!(!host.matches("http", "127.0.0.1", 8081));
        assert_eq!(
            OutboundHost::parse("https://Example.com")
                .expect("valid")
                .to_string(),
            "https://example.com:443"
        );
        assert!(OutboundHost::parse("ftp://x:1").is_err());
        assert!(OutboundHost::parse("http://x:1/path").is_err());
        assert!(OutboundHost::parse("http://*:1").is_err());
        assert!(OutboundHost::parse("127.0.0.1:80").is_err());
        assert_eq!(
            OutboundHost::parse("http://[::1]")
                .expect("valid")
                .to_string(),
            "http://[::1]:80"
        );
        assert!(
            OutboundHost::parse("http://[::1]:8080")
                .expect("valid")
                .matches("http", "[::1]", 8080)
        );
        for bad in [
            "http://::1:8080",
            "http://fe80::1",
            "http://exa mple.com",
            "http://ex\tample.com",
            "http://exämple.com",
            "http://a]b",
        ] {
            assert!(OutboundHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_are_plain_ascii() {
        for bad in ["/a\u{7f}b", "/caf\u{e9}", "/a\nb", "/a\tb", "/a b"] {
            assert!(Route::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Route::parse("/caf%C3%A9").is_ok());
    }

    #[test]
    fn names_and_digests() {
        assert!(Name::new("hello-2_x").is_ok());
        assert!(Name::new("Hello").is_err() && Name::new("2x").is_err() && Name::new("").is_err());
        assert_eq!(Name::sanitized(".tmpAbC12").as_str(), "tmpabc12");
        assert_eq!(Name::sanitized("My App!").as_str(), "my-app");
        assert_eq!(Name::sanitized("...").as_str(), "app");
        let digest = Digest::of(b"abc");
        assert_eq!(
            digest.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(digest.as_str()), Ok(digest));
        assert!(Digest::parse("sha256:ABC").is_err() && Digest::parse("md5:00").is_err());
    }

    #[test]
    fn a_hostile_locked_app_is_refused_with_the_key() {
        let json = r#"{"lock_version":1,"name":"a","functions":[{"name":"f","component":"sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "route":"/f","timeout":0,"memory_limit":65536,"max_concurrency":1,"max_queue":1,"max_body_size":1,
            "environment":[],"files":[],"allowed_outbound_hosts":[],"models":[],"allow_model_upload":false,
            "max_model_upload_size":0,"trainers":[]}]}"#;
        let app: LockedApp = serde_json::from_str(json).expect("parses");
        let error = app.validate().expect_err("timeout 0");
        assert_eq!(
            (error.scope.as_str(), error.key.as_deref()),
            ("function `f`", Some("timeout"))
        );
        assert!(serde_json::from_str::<LockedApp>(&json.replace("\"/f\"", "\"/f/*\"")).is_err());
        assert!(
            serde_json::from_str::<LockedApp>(&json.replace("\"name\":\"f\"", "\"name\":\"../f\""))
                .is_err()
        );
        assert!(
            serde_json::from_str::<LockedApp>(
                &json.replace("\"timeout\":0", "\"timeout\":0,\"extra\":1")
            )
            .is_err()
        );
    }
}

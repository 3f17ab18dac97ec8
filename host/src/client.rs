//! The admin API's client, for `lepton deploy`, `apps`, `status`, `rollback`, `rm`
//! and `audit`.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::locked::{Digest, LockedApp};
use crate::manifest::{BlobSource, Manifest};

/// Blobs larger than this get a progress bar while uploading.
const PROGRESS_ABOVE: u64 = 4 << 20;

/// Where the admin API is and how to authenticate.
pub struct AdminClient {
    url: String,
    token: String,
    agent: ureq::Agent,
}

/// An answer of the API: status and JSON body.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body (`null` when it is not JSON).
    pub body: serde_json::Value,
}

impl Answer {
    /// The body, or the API's error as `scope: `key`: reason` text.
    pub fn ok(self) -> anyhow::Result<serde_json::Value> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let error = &self.body["error"];
        let text = match (
            error["scope"].as_str(),
            error["key"].as_str(),
            error["reason"].as_str(),
        ) {
            (scope, key, Some(reason)) => {
                let mut text = String::new();
                if let Some(scope) = scope.filter(|s| !s.is_empty()) {
                    text.push_str(&format!("{scope}: "));
                }
                if let Some(key) = key {
                    text.push_str(&format!("`{key}`: "));
                }
                text.push_str(reason);
                text
            }
            _ => format!("the admin API answered {}: {}", self.status, self.body),
        };
        anyhow::bail!("{text}")
    }
}

impl AdminClient {
    /// The API at `url` (or `$LEPTON_ADMIN`, else `<state_dir>/admin.url`), with the token
    /// `$LEPTON_ADMIN_TOKEN` or else `<state_dir>/admin-token`.
    pub fn locate(url: Option<String>, state_dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| -> anyhow::Result<String> {
            let path = state_dir.join(name);
            Ok(std::fs::read_to_string(&path)
                .with_context(|| {
                    format!("reading `{}` (is `lepton up` running here? else pass --admin URL and set LEPTON_ADMIN_TOKEN)", path.display())
                })?
                .trim()
                .to_owned())
        };
        let url = match url.or_else(|| std::env::var("LEPTON_ADMIN").ok()) {
            Some(url) => url,
            None => read("admin.url")?,
        };
        let token = match std::env::var("LEPTON_ADMIN_TOKEN") {
            Ok(token) => token,
            Err(_) => read("admin-token")?,
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(600))
            .build();
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            token,
            agent,
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.url))
            .set("authorization", &format!("Bearer {}", self.token))
    }

    fn answer(&self, result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<Answer> {
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot reach the admin API at {}", self.url));
            }
        };
        let status = response.status();
        let mut text = String::new();
        response
            .into_reader()
            .take(64 << 20)
            .read_to_string(&mut text)
            .context("reading the answer")?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok(Answer { status, body })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.answer(self.request("GET", path).call())
    }

    /// `GET path`, an answer of JSON lines: `each` is called with every non-blank line
    /// as it arrives (for a stream that follows, until the server ends it).
    pub fn get_lines(
        &self,
        path: &str,
        mut each: impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let response = match self.request("GET", path).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => {
                let mut text = String::new();
                let _ = response
                    .into_reader()
                    .take(1 << 20)
                    .read_to_string(&mut text);
                let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
                Answer { status, body }.ok()?;
                anyhow::bail!("the admin API answered {status}");
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot reach the admin API at {}", self.url));
            }
        };
        let reader = std::io::BufReader::new(response.into_reader());
        for line in reader.lines() {
            let line = line.context("reading the stream")?;
            if !line.trim().is_empty() {
                each(&line)?;
            }
        }
        Ok(())
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> anyhow::Result<Answer> {
        self.answer(self.request("DELETE", path).call())
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<Answer> {
        self.answer(
            self.request("POST", path)
                .set("content-type", "application/json")
                .send_string(&body.to_string()),
        )
    }

    /// Whether the node has blob `digest`.
    pub fn has_blob(&self, digest: &Digest) -> anyhow::Result<bool> {
        let answer = self.answer(self.request("HEAD", &format!("/v1/blobs/{digest}")).call())?;
        match answer.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => answer.ok().map(|_| false),
        }
    }

    /// Uploads blob `digest` from `source`.
    pub fn put_blob(&self, digest: &Digest, source: &BlobSource) -> anyhow::Result<()> {
        let request = self.request("PUT", &format!("/v1/blobs/{digest}"));
        let answer = match source {
            BlobSource::Bytes(bytes) => self.answer(request.send_bytes(bytes))?,
            BlobSource::File(path) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("opening `{}`", path.display()))?;
                let len = file
                    .metadata()
                    .with_context(|| format!("reading `{}`", path.display()))?
                    .len();
                let request = request.set("content-length", &len.to_string());
                if len > PROGRESS_ABOVE {
                    let bar = indicatif::ProgressBar::new(len).with_message(file_name(path));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    let answer = self.answer(request.send(bar.wrap_read(file)));
                    bar.finish_and_clear();
                    answer?
                } else {
                    self.answer(request.send(file))?
                }
            }
        };
        answer.ok().map(drop)
    }

    /// Uploads the blobs of `manifest` the node lacks and deploys its app. Returns the
    /// API's answer (`{app, version, unchanged, routes}`).
    pub fn deploy(&self, manifest: &Manifest) -> anyhow::Result<serde_json::Value> {
        let mut missing = Vec::new();
        for (digest, source) in &manifest.blobs {
            if !self.has_blob(digest)? {
                missing.push((digest, source));
            }
        }
        let mut steps = crate::progress::Steps::new("deploy", missing.len() as u64 + 1);
        for (digest, source) in missing {
            steps.step(&format!("uploading {}", describe(source)));
            self.put_blob(digest, source)
                .with_context(|| format!("uploading {}", describe(source)))?;
        }
        steps.step("the node compiles and loads the new version");
        let answer = self.deploy_locked(&manifest.app);
        steps.finish();
        answer
    }

    /// Posts a locked app.
    pub fn deploy_locked(&self, app: &LockedApp) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::to_value(app).context("encoding the locked app")?;
        self.post(&format!("/v1/apps/{}/versions", app.name), &body)?
            .ok()
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn describe(source: &BlobSource) -> String {
    match source {
        BlobSource::File(path) => format!("`{}`", path.display()),
        BlobSource::Bytes(_) => "a `files` directory".to_owned(),
    }
}

//! `detect`: identifies a file's content type with Google's Magika model over
//! `wasi:nn`, as `magika` 1.0.3 (Python) does.
//!
//! `POST /detect` with the file as the body answers
//! `{"label": "python", "dl_label": "python", "score": 0.99974}`: `label` is
//! Magika's final answer, `dl_label` the model's most probable label (`undefined`
//! when the file is too small to run the model; `score` is 1 then). An optional
//! `?mode=high-confidence|medium-confidence|best-guess` picks Magika's prediction
//! mode (default `high-confidence`).
//!
//! The manifest grants the model as `magika` and the directory holding its
//! `config.min.json` and Magika's `content_types_kb.min.json` at `/magika`.
//! A `wasi:nn` failure answers 500 with its code and message; a missing or bad
//! config answers 500 saying so.

mod magika;

use lepton_sdk::http::{Method, StatusCode};
use lepton_sdk::nn::{self, Graph, Tensor};
use lepton_sdk::{Request, Response, json_response, method_not_allowed, text_response as text};

use crate::magika::{Config, Mode, Step, Verdict};

/// The name under which the manifest grants the model.
const MODEL: &str = "magika";
/// Magika's model config, from the model's directory.
const CONFIG_PATH: &str = "/magika/config.min.json";
/// Magika's content-type table (which labels are text).
const CONTENT_TYPES_PATH: &str = "/magika/content_types_kb.min.json";
/// The model's input and output names.
const INPUT: &str = "bytes";
const OUTPUT: &str = "target_label";

fn detect(request: Request) -> Response {
    if request.method() != Method::POST {
        return method_not_allowed("POST", "use POST with the file as the body\n");
    }
    let Some(mode) = mode(&request) else {
        return text(
            StatusCode::BAD_REQUEST,
            "`mode` must be high-confidence, medium-confidence or best-guess\n".to_owned(),
        );
    };
    match identify(request.body(), mode) {
        Ok(verdict) => json(&verdict),
        Err(message) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{message}\n")),
    }
}

/// The `mode` query parameter, `high-confidence` when absent; `None` when unknown.
fn mode(request: &Request) -> Option<Mode> {
    let query = request.uri().query().unwrap_or_default();
    match query.split('&').find_map(|pair| pair.strip_prefix("mode=")) {
        Some(name) => Mode::parse(name),
        None => Some(Mode::default()),
    }
}

fn identify(content: &[u8], mode: Mode) -> Result<Verdict, String> {
    let config = std::fs::read(CONFIG_PATH).map_err(|e| {
        format!("the magika config `{CONFIG_PATH}` is missing (is `/magika` granted?): {e}")
    })?;
    let config = Config::parse(&config)?;
    let input = match magika::prepare(content, &config) {
        Step::Done(verdict) => return Ok(verdict),
        Step::Infer(input) => input,
    };
    let probabilities = infer(&input).map_err(|e| format!("wasi:nn error: {e}"))?;
    magika::decide(&config, mode, &probabilities, |label| {
        let table = std::fs::read(CONTENT_TYPES_PATH).map_err(|e| {
            format!("the magika content-type table `{CONTENT_TYPES_PATH}` is missing: {e}")
        })?;
        magika::text_labels(&table)?
            .get(label)
            .copied()
            .ok_or_else(|| format!("label {label:?} is not in the magika content-type table"))
    })
}

/// Runs the model on one input row and returns its probabilities.
fn infer(input: &[i32]) -> Result<Vec<f32>, nn::Error> {
    let len = u32::try_from(input.len()).unwrap_or(u32::MAX);
    let input = Tensor::from_i32(&[1, len], input)?;
    let outputs = Graph::load_by_name(MODEL)?.compute(&[(INPUT, &input)])?;
    outputs.require(OUTPUT)?.to_f32()
}

fn json(verdict: &Verdict) -> Response {
    match serde_json::to_vec(verdict) {
        Ok(body) => json_response(body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the answer: {e}\n")),
    }
}

lepton_sdk::http_handler!(detect);

//! `nnprobe`: drives `wasi:nn` through the raw WIT bindings (as a component written in
//! any language would), so host tests can send anything, malformed tensors included.
//!
//! - `GET /nn/load/NAME`: `load-by-name`, answers `ok`.
//! - `POST /nn/compute/NAME`: `load-by-name` + `compute`. Body and answer: one tensor
//!   per line, `name TYPE d1,d2,... hexdata` (TYPE: FP16 FP32 FP64 BF16 U8 I32 I64).
//! - `POST /nn/upload-compute`: `LEN\n`, an ONNX model of LEN bytes, then tensor lines:
//!   `load` of the model from bytes and `compute` on it;
//! - `POST /nn/upload`: `load` of the body as an ONNX graph, answers `ok`
//!   (`/nn/upload-sdk`: the same through `lepton_sdk::nn::Graph::load_onnx`).
//! - `POST /nn/step/TRAINER` (and `/nn/evaluate/TRAINER`): `lepton:nn/training` `open` +
//!   `step` (`evaluate`); the tensor named `targets` is the targets, the others the
//!   inputs; answers `loss L steps N`.
//! - `POST /nn/publish/TRAINER/MODEL`: `open` + `publish(MODEL)`, answers `ok`.
//! - `POST /nn/checkpoint/TRAINER`: `open` + `checkpoint()`, answers `ok`.
//! - `GET /nn/hoard/N`: creates N tensors of 1 MiB and keeps them all, answers `ok`.
//!
//! Failures answer 400 with `error: CODE: message`.

use lepton_sdk::{Request, Response};

wit_bindgen::generate!({
    world: "lepton:function/imports",
    path: "../../wit",
    generate_all,
});

use lepton::nn::training;
use wasi::nn::{errors, graph, tensor};

fn reply(status: u16, body: String) -> Response {
    let mut response = Response::new(body.into_bytes());
    *response.status_mut() = lepton_sdk::http::StatusCode::from_u16(status).unwrap_or_default();
    response
}

fn failure(error: errors::Error) -> String {
    format!("error: {:?}: {}", error.code(), error.data())
}

const TYPES: [(&str, tensor::TensorType); 7] = [
    ("FP16", tensor::TensorType::Fp16),
    ("FP32", tensor::TensorType::Fp32),
    ("FP64", tensor::TensorType::Fp64),
    ("BF16", tensor::TensorType::Bf16),
    ("U8", tensor::TensorType::U8),
    ("I32", tensor::TensorType::I32),
    ("I64", tensor::TensorType::I64),
];

fn parse_tensor(line: &str) -> Result<(String, tensor::Tensor), String> {
    let mut parts = line.split(' ');
    let (Some(name), Some(ty), Some(dims), data) = (parts.next(), parts.next(), parts.next(), parts.next().unwrap_or(""))
    else {
        return Err(format!("bad line {line:?}"));
    };
    let ty = TYPES.iter().find(|(n, _)| *n == ty).map(|(_, t)| *t).ok_or(format!("bad type {ty:?}"))?;
    let dims = dims
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<u32>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let data = (0..data.len() / 2)
        .map(|i| u8::from_str_radix(&data[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_owned(), tensor::Tensor::new(&dims, ty, &data)))
}

fn format_tensor(name: &str, tensor: &tensor::Tensor) -> String {
    let ty = TYPES.iter().find(|(_, t)| *t == tensor.ty()).map_or("?", |(n, _)| n);
    let dims = tensor.dimensions().iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let data: String = tensor.data().iter().map(|b| format!("{b:02x}")).collect();
    format!("{name} {ty} {dims} {data}\n")
}

fn compute(model: &str, body: &str) -> Result<String, String> {
    let graph = graph::load_by_name(model).map_err(failure)?;
    let context = graph.init_execution_context().map_err(failure)?;
    let inputs = body.lines().filter(|l| !l.is_empty()).map(parse_tensor).collect::<Result<Vec<_>, _>>()?;
    let outputs = context.compute(inputs).map_err(failure)?;
    let mut outputs: Vec<_> = outputs.into_iter().collect();
    outputs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(outputs.iter().map(|(name, t)| format_tensor(name, t)).collect())
}

fn upload_compute(body: &[u8]) -> Result<String, String> {
    let newline = body.iter().position(|&b| b == b'\n').ok_or("no length line")?;
    let len: usize = std::str::from_utf8(&body[..newline]).ok().and_then(|l| l.parse().ok()).ok_or("bad length")?;
    let model = body.get(newline + 1..newline + 1 + len).ok_or("short model")?;
    let tensors = String::from_utf8_lossy(&body[newline + 1 + len..]);
    let graph = graph::load(&[model.to_vec()], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Cpu).map_err(failure)?;
    let context = graph.init_execution_context().map_err(failure)?;
    let inputs = tensors.lines().filter(|l| !l.is_empty()).map(parse_tensor).collect::<Result<Vec<_>, _>>()?;
    let outputs = context.compute(inputs).map_err(failure)?;
    Ok(format!("ok: {} outputs\n", outputs.len()))
}

fn train(trainer: &str, body: &str, update: bool) -> Result<String, String> {
    let trainer = training::open(trainer).map_err(failure)?;
    let mut inputs = body.lines().filter(|l| !l.is_empty()).map(parse_tensor).collect::<Result<Vec<_>, _>>()?;
    let position = inputs.iter().position(|(name, _)| name == "targets").ok_or("no `targets` tensor")?;
    let (_, targets) = inputs.remove(position);
    let loss = if update { trainer.step(inputs, targets) } else { trainer.evaluate(inputs, targets) };
    Ok(format!("loss {} steps {}\n", loss.map_err(failure)?, trainer.steps()))
}

fn nnprobe(request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let result = if let Some(name) = path.strip_prefix("/nn/load/") {
        graph::load_by_name(name).map(|_| "ok\n".to_owned()).map_err(failure)
    } else if let Some(name) = path.strip_prefix("/nn/compute/") {
        compute(name, &String::from_utf8_lossy(request.body()))
    } else if let Some(name) = path.strip_prefix("/nn/step/") {
        train(name, &String::from_utf8_lossy(request.body()), true)
    } else if let Some(name) = path.strip_prefix("/nn/evaluate/") {
        train(name, &String::from_utf8_lossy(request.body()), false)
    } else if let Some(rest) = path.strip_prefix("/nn/publish/") {
        let (trainer, model) = rest.split_once('/').unwrap_or((rest, ""));
        training::open(trainer).and_then(|t| t.publish(model)).map(|()| "ok\n".to_owned()).map_err(failure)
    } else if let Some(name) = path.strip_prefix("/nn/checkpoint/") {
        training::open(name).and_then(|t| t.checkpoint()).map(|()| "ok\n".to_owned()).map_err(failure)
    } else if let Some(count) = path.strip_prefix("/nn/hoard/") {
        let block = vec![0u8; 1 << 20];
        let count: usize = count.parse().unwrap_or(0);
        let hoard: Vec<tensor::Tensor> =
            (0..count).map(|_| tensor::Tensor::new(&[1 << 20], tensor::TensorType::U8, &block)).collect();
        Ok(format!("ok: holding {}\n", hoard.len()))
    } else if path == "/nn/upload-sdk" {
        lepton_sdk::nn::Graph::load_onnx(request.body(), false)
            .and_then(|g| g.init_execution_context())
            .map(|_| "ok\n".to_owned())
            .map_err(|e| format!("error: {e}"))
    } else if path == "/nn/upload-compute" {
        // The body: the model's length, a newline, the model, then tensor lines.
        upload_compute(request.body())
    } else if path == "/nn/upload" {
        graph::load(&[request.body().clone()], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Cpu)
            .and_then(|g| g.init_execution_context())
            .map(|_| "ok\n".to_owned())
            .map_err(failure)
    } else {
        Err(format!("unknown path {path:?}"))
    };
    match result {
        Ok(body) => reply(200, body),
        Err(error) => reply(400, error),
    }
}

lepton_sdk::http_handler!(nnprobe);

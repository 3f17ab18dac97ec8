//! The Open Inference Protocol's inference request and response, as JSON with the
//! binary tensor data extension that `tritonclient` uses by default.
//!
//! A request body is a JSON header, then (when the `Inference-Header-Content-Length`
//! header says where the JSON ends) the raw bytes of the inputs that carry
//! `parameters.binary_data_size`, in input order. A response is built the same way
//! for outputs asked for with `binary_data` (or `binary_data_output` on the request).
//!
//! JSON `data` may be flat or nested; it is written straight into little-endian
//! bytes as it is parsed (never as a tree of values), and never past the element
//! count its `shape` declares, so a request holds at most a few times its own size.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeMap as _, SerializeSeq as _, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::nn::{ElementType, Tensor, byte_element_count, byte_elements};

/// A request that cannot be understood: answered with 400 and this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(message: impl Into<String>) -> Result<T, BadRequest> {
    Err(BadRequest(message.into()))
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// Its name.
    pub name: String,
    /// Whether it comes back as binary data.
    pub binary: bool,
}

/// An inference request, parsed and its tensors decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// The inputs, in request order.
    pub inputs: Vec<(String, Tensor)>,
    /// The outputs asked for; `None`: every output, binary when
    /// [`InferRequest::binary_output`].
    pub outputs: Option<Vec<RequestedOutput>>,
    /// `parameters.binary_data_output`.
    pub binary_output: bool,
    /// `parameters.timeout`, in microseconds.
    pub timeout_us: Option<u64>,
}

/// A `parameters` object: its values are kept as unparsed JSON (only a few known
/// keys are ever read), so a client's parameters cost no tree of values.
type Parameters<'a> = HashMap<String, &'a RawValue>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(borrow, default)]
    parameters: Option<Parameters<'a>>,
    #[serde(borrow)]
    inputs: Vec<RawInput<'a>>,
    #[serde(borrow, default)]
    outputs: Option<Vec<RawOutput<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput<'a> {
    name: String,
    shape: Vec<u64>,
    datatype: String,
    #[serde(borrow, default)]
    parameters: Option<Parameters<'a>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput<'a> {
    name: String,
    #[serde(borrow, default)]
    parameters: Option<Parameters<'a>>,
}

/// Inputs and outputs a request may name, at most (a model has far fewer).
pub const MAX_TENSORS: usize = 1024;

fn flag(parameters: Option<&Parameters<'_>>, key: &str) -> Result<Option<bool>, BadRequest> {
    match parameters.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(value) => serde_json::from_str(value.get())
            .map(Some)
            .map_err(|_| BadRequest(format!("parameter `{key}` must be true or false"))),
    }
}

fn unsigned(parameters: Option<&Parameters<'_>>, key: &str) -> Result<Option<u64>, BadRequest> {
    match parameters.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(value) => serde_json::from_str(value.get()).map(Some).map_err(|_| {
            BadRequest(format!(
                "parameter `{key}` must be a whole number of 0 or more"
            ))
        }),
    }
}

/// Parses a request body. `header_length` is the `Inference-Header-Content-Length`
/// header, when the client sent one: the JSON is that many bytes and binary input data
/// follows.
pub fn parse_request(
    body: &[u8],
    header_length: Option<usize>,
) -> Result<InferRequest, BadRequest> {
    let (json, mut binary) = match header_length {
        Some(length) if length > body.len() => {
            return bad(format!(
                "Inference-Header-Content-Length is {length}, but the body is {} bytes",
                body.len()
            ));
        }
        Some(length) => body.split_at(length),
        None => (body, &[][..]),
    };
    let raw: RawRequest<'_> = serde_json::from_slice(json)
        .map_err(|e| BadRequest(format!("the request is not a valid inference request: {e}")))?;
    if raw.inputs.len() > MAX_TENSORS || raw.outputs.as_ref().is_some_and(|o| o.len() > MAX_TENSORS)
    {
        return bad(format!("at most {MAX_TENSORS} inputs and outputs"));
    }
    let parameters = raw.parameters.as_ref();
    for key in ["sequence_id", "sequence_start", "sequence_end"] {
        if parameters.is_some_and(|p| p.contains_key(key)) {
            return bad(format!("`{key}`: sequence batching is not supported"));
        }
    }
    let binary_output = flag(parameters, "binary_data_output")?.unwrap_or(false);
    let timeout_us = unsigned(parameters, "timeout")?;
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in raw.inputs {
        let name = input.name;
        let at = |message: String| BadRequest(format!("input `{name}`: {message}"));
        let ty = ElementType::from_name(&input.datatype).ok_or_else(|| {
            at(format!(
                "unknown datatype {:?} (one of {})",
                input.datatype,
                ElementType::ALL.map(ElementType::name).join(", ")
            ))
        })?;
        let dims = input
            .shape
            .iter()
            .map(|&d| u32::try_from(d))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| {
                at(format!(
                    "shape {:?} has a dimension past {}",
                    input.shape,
                    u32::MAX
                ))
            })?;
        let count = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
            .ok_or_else(|| at(format!("shape {:?} is too large", input.shape)))?;
        let parameters = input.parameters.as_ref();
        if parameters.is_some_and(|p| p.keys().any(|k| k.starts_with("shared_memory"))) {
            return Err(at(
                "shared memory is not supported; send the data in the request".into(),
            ));
        }
        let data = match (
            unsigned(parameters, "binary_data_size").map_err(|e| at(e.0))?,
            input.data,
        ) {
            (Some(_), Some(_)) => {
                return Err(at("has both `data` and `binary_data_size`".into()));
            }
            (Some(size), None) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > binary.len() {
                    return Err(at(format!(
                        "binary_data_size is {size}, but {} bytes of binary data are left",
                        binary.len()
                    )));
                }
                let (data, rest) = binary.split_at(size);
                binary = rest;
                data.to_vec()
            }
            (None, Some(data)) => json_elements(data, ty, count).map_err(|e| at(e.0))?,
            (None, None) => return Err(at("has neither `data` nor `binary_data_size`".into())),
        };
        let tensor = Tensor { dims, ty, data };
        tensor.check_length().map_err(at)?;
        inputs.push((name, tensor));
    }
    if !binary.is_empty() {
        return bad(format!(
            "{} bytes of binary data follow the last input's",
            binary.len()
        ));
    }
    let outputs = match raw.outputs {
        None => None,
        Some(outputs) => {
            let mut requested: Vec<RequestedOutput> = Vec::with_capacity(outputs.len());
            for output in outputs {
                let parameters = output.parameters.as_ref();
                if parameters.is_some_and(|p| p.contains_key("classification")) {
                    return bad(format!(
                        "output `{}`: classification is not supported",
                        output.name
                    ));
                }
                if requested.iter().any(|r| r.name == output.name) {
                    return bad(format!("output `{}` is asked for twice", output.name));
                }
                let binary = flag(parameters, "binary_data")
                    .map_err(|e| BadRequest(format!("output `{}`: {e}", output.name)))?
                    .unwrap_or(binary_output);
                requested.push(RequestedOutput {
                    name: output.name,
                    binary,
                });
            }
            Some(requested)
        }
    };
    Ok(InferRequest {
        id: raw.id,
        inputs,
        outputs,
        binary_output,
        timeout_us,
    })
}

/// Decodes JSON `data` (flat or nested) of `count` elements of `ty` into bytes.
fn json_elements(data: &RawValue, ty: ElementType, count: usize) -> Result<Vec<u8>, BadRequest> {
    let text = data.get();
    // At most what the shape needs, and no more than the JSON could hold (one
    // element takes at least two bytes of it): a huge shape allocates nothing.
    let capacity = count.min(text.len() / 2 + 1) * ty.size().unwrap_or(5);
    let mut out = Vec::with_capacity(capacity);
    let mut found = 0usize;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Elements {
        ty,
        out: &mut out,
        found: &mut found,
        count,
    }
    .deserialize(&mut deserializer)
    .map_err(|e| BadRequest(format!("`data`: {e}")))?;
    if found != count {
        return bad(format!(
            "`data` has {found} elements, the shape needs {count}"
        ));
    }
    Ok(out)
}

/// Appends each leaf of a JSON value to `out` as an element of `ty`.
struct Elements<'a> {
    ty: ElementType,
    out: &'a mut Vec<u8>,
    found: &'a mut usize,
    count: usize,
}

impl Elements<'_> {
    fn element<E: de::Error>(&mut self) -> Result<(), E> {
        *self.found += 1;
        if *self.found > self.count {
            return Err(E::custom(format!(
                "more elements than the shape's {}",
                self.count
            )));
        }
        Ok(())
    }

    fn integer<E: de::Error>(&mut self, value: i128) -> Result<(), E> {
        let out_of_range = || E::custom(format!("{value} is out of range for {}", self.ty));
        macro_rules! put {
            ($t:ty) => {
                self.out.extend_from_slice(
                    &<$t>::try_from(value)
                        .map_err(|_| out_of_range())?
                        .to_le_bytes(),
                )
            };
        }
        match self.ty {
            ElementType::U8 => put!(u8),
            ElementType::U16 => put!(u16),
            ElementType::U32 => put!(u32),
            ElementType::U64 => put!(u64),
            ElementType::I8 => put!(i8),
            ElementType::I16 => put!(i16),
            ElementType::I32 => put!(i32),
            ElementType::I64 => put!(i64),
            // Integers are exact in f64 up to 2^53; past that, the nearest float.
            _ => return self.float(value as f64),
        }
        self.element()
    }

    fn float<E: de::Error>(&mut self, value: f64) -> Result<(), E> {
        match self.ty {
            ElementType::Fp16 => self
                .out
                .extend_from_slice(&half::f16::from_f64(value).to_le_bytes()),
            ElementType::Bf16 => self
                .out
                .extend_from_slice(&half::bf16::from_f64(value).to_le_bytes()),
            ElementType::Fp32 => self.out.extend_from_slice(&(value as f32).to_le_bytes()),
            ElementType::Fp64 => self.out.extend_from_slice(&value.to_le_bytes()),
            // A whole number written as a float (`-0`, `1e3`) is still that integer.
            ty if ty != ElementType::Bool
                && ty != ElementType::Bytes
                && value.is_finite()
                && value.fract() == 0.0
                && value.abs() < 2f64.powi(64) =>
            {
                return self.integer(value as i128);
            }
            ty => return Err(E::custom(format!("{value} is not a {ty} element"))),
        }
        self.element()
    }
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} elements, in an array (nested or flat)", self.ty)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Self {
            ty,
            out,
            found,
            count,
        } = self;
        while seq
            .next_element_seed(Elements {
                ty,
                out: &mut *out,
                found: &mut *found,
                count,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(mut self, value: bool) -> Result<(), E> {
        if self.ty != ElementType::Bool {
            return Err(E::custom(format!("{value} is not a {} element", self.ty)));
        }
        self.out.push(u8::from(value));
        self.element()
    }

    fn visit_i64<E: de::Error>(mut self, value: i64) -> Result<(), E> {
        self.integer(i128::from(value))
    }

    fn visit_u64<E: de::Error>(mut self, value: u64) -> Result<(), E> {
        self.integer(i128::from(value))
    }

    fn visit_f64<E: de::Error>(mut self, value: f64) -> Result<(), E> {
        self.float(value)
    }

    fn visit_str<E: de::Error>(mut self, value: &str) -> Result<(), E> {
        if self.ty != ElementType::Bytes {
            let shown: String = value.chars().take(32).collect();
            let more = if shown.len() < value.len() { "…" } else { "" };
            return Err(E::custom(format!(
                "{shown:?}{more} is not a {} element",
                self.ty
            )));
        }
        let length = u32::try_from(value.len())
            .map_err(|_| E::custom("a BYTES element is at most 4 GiB"))?;
        self.out.extend_from_slice(&length.to_le_bytes());
        self.out.extend_from_slice(value.as_bytes());
        self.element()
    }
}

/// A response: its body and, when binary data follows the JSON, the JSON's length
/// (the `Inference-Header-Content-Length` header).
pub struct Encoded {
    /// The whole body.
    pub body: Vec<u8>,
    /// Bytes of JSON at its start, when binary data follows.
    pub header_length: Option<usize>,
}

/// Writes the response to a request for `model` (at `version`), with `outputs` as
/// chosen: `(name, tensor, binary)` in response order.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[(String, Tensor, bool)],
) -> Result<Encoded, String> {
    let mut binary_len = 0usize;
    let mut described = Vec::with_capacity(outputs.len());
    for (name, tensor, binary) in outputs {
        if tensor.ty == ElementType::Bytes {
            byte_element_count(&tensor.data)?;
        }
        if *binary {
            binary_len += tensor.data.len();
        }
        described.push(Output {
            name,
            tensor,
            binary: *binary,
        });
    }
    let response = Response {
        model_name: model,
        model_version: version,
        id,
        outputs: described,
    };
    let mut body = serde_json::to_vec(&response).map_err(|e| e.to_string())?;
    let json_length = body.len();
    if !outputs.iter().any(|(_, _, binary)| *binary) {
        return Ok(Encoded {
            body,
            header_length: None,
        });
    }
    body.reserve_exact(binary_len);
    for (_, tensor, binary) in outputs {
        if *binary {
            body.extend_from_slice(&tensor.data);
        }
    }
    Ok(Encoded {
        body,
        header_length: Some(json_length),
    })
}

#[derive(Serialize)]
struct Response<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<Output<'a>>,
}

struct Output<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    binary: bool,
}

impl Serialize for Output<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("name", self.name)?;
        map.serialize_entry("datatype", self.tensor.ty.name())?;
        map.serialize_entry("shape", &self.tensor.dims)?;
        if self.binary {
            map.serialize_entry(
                "parameters",
                &serde_json::json!({ "binary_data_size": self.tensor.data.len() }),
            )?;
        } else {
            map.serialize_entry("data", &Data(self.tensor))?;
        }
        map.end()
    }
}

/// A tensor's elements as a flat JSON array (non-finite floats become `null`, as
/// JSON has no number for them: ask for binary data to get them exactly).
struct Data<'a>(&'a Tensor);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tensor = self.0;
        let data = &tensor.data;
        macro_rules! each {
            ($n:literal, $from:expr) => {{
                let mut seq = serializer.serialize_seq(Some(data.len() / $n))?;
                for chunk in data.chunks_exact($n) {
                    let bytes: [u8; $n] = chunk.try_into().unwrap_or([0; $n]);
                    seq.serialize_element(&$from(bytes))?;
                }
                seq.end()
            }};
        }
        match tensor.ty {
            ElementType::Bool => each!(1, |b: [u8; 1]| b[0] != 0),
            ElementType::U8 => each!(1, u8::from_le_bytes),
            ElementType::I8 => each!(1, i8::from_le_bytes),
            ElementType::U16 => each!(2, u16::from_le_bytes),
            ElementType::I16 => each!(2, i16::from_le_bytes),
            ElementType::U32 => each!(4, u32::from_le_bytes),
            ElementType::I32 => each!(4, i32::from_le_bytes),
            ElementType::U64 => each!(8, u64::from_le_bytes),
            ElementType::I64 => each!(8, i64::from_le_bytes),
            ElementType::Fp16 => each!(2, |b| half::f16::from_le_bytes(b).to_f32()),
            ElementType::Bf16 => each!(2, |b| half::bf16::from_le_bytes(b).to_f32()),
            ElementType::Fp32 => each!(4, f32::from_le_bytes),
            ElementType::Fp64 => each!(8, f64::from_le_bytes),
            ElementType::Bytes => {
                let count = byte_element_count(data).map_err(serde::ser::Error::custom)?;
                let mut seq = serializer.serialize_seq(Some(count))?;
                for element in byte_elements(data) {
                    let element = element.map_err(serde::ser::Error::custom)?;
                    // JSON strings are text: bytes that are not UTF-8 are replaced
                    // (ask for binary data to get them exactly).
                    seq.serialize_element(&String::from_utf8_lossy(element))?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn request(json: &str) -> Result<InferRequest, BadRequest> {
        parse_request(json.as_bytes(), None)
    }

    fn input(json: &str) -> Tensor {
        match request(json) {
            Ok(mut r) => r.inputs.remove(0).1,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn nested_and_flat_data_are_the_same_tensor() {
        let flat = input(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"INT16","data":[1,-2,3,4]}]}"#,
        );
        let nested = input(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"INT16","data":[[1,-2],[3,4]]}]}"#,
        );
        assert_eq!(flat, nested);
        assert_eq!(flat.data, [1, 0, 0xfe, 0xff, 3, 0, 4, 0]);
    }

    #[test]
    fn every_type_parses_from_json() {
        let cases = [
            ("BOOL", "[true,false]", vec![1u8, 0]),
            ("UINT8", "[0,255]", vec![0, 255]),
            ("INT8", "[-1,1]", vec![0xff, 1]),
            (
                "UINT64",
                "[18446744073709551615,0]",
                [u64::MAX.to_le_bytes(), [0; 8]].concat(),
            ),
            (
                "FP16",
                "[1.0,-2]",
                [
                    half::f16::from_f32(1.0).to_le_bytes(),
                    half::f16::from_f32(-2.0).to_le_bytes(),
                ]
                .concat(),
            ),
            (
                "BF16",
                "[0.5,3]",
                [
                    half::bf16::from_f32(0.5).to_le_bytes(),
                    half::bf16::from_f32(3.0).to_le_bytes(),
                ]
                .concat(),
            ),
            (
                "FP32",
                "[1.5,2]",
                [1.5f32.to_le_bytes(), 2f32.to_le_bytes()].concat(),
            ),
            (
                "FP64",
                "[0.1,-7]",
                [0.1f64.to_le_bytes(), (-7f64).to_le_bytes()].concat(),
            ),
            (
                "BYTES",
                r#"["ab",""]"#,
                vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0],
            ),
        ];
        for (ty, data, bytes) in cases {
            let tensor = input(&format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{ty}","data":{data}}}]}}"#
            ));
            assert_eq!(tensor.data, bytes, "{ty}");
        }
    }

    #[test]
    fn wrong_elements_and_counts_are_refused() {
        for (ty, data, expected) in [
            ("UINT8", "[256,1]", "256 is out of range for UINT8"),
            ("INT32", "[1.5,1]", "1.5 is not a INT32 element"),
            ("BOOL", "[1,0]", "is not a BOOL element"),
            ("FP32", r#"["a",1]"#, "is not a FP32 element"),
            ("FP32", "[1]", "has 1 elements, the shape needs 2"),
            ("FP32", "[1,2,3]", "more elements than the shape's 2"),
            ("FP32", "{}", "in an array"),
            ("NOPE", "[1,2]", "unknown datatype"),
        ] {
            let error = request(&format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{ty}","data":{data}}}]}}"#
            ))
            .expect_err(ty);
            assert!(error.0.contains(expected), "{ty} {data}: {error}");
        }
    }

    #[test]
    fn binary_inputs_are_taken_in_order_and_counted() {
        let json = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}},{"name":"b","shape":[1],"datatype":"INT32","parameters":{"binary_data_size":4}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&[7, 8, 1, 0, 0, 0]);
        let parsed = parse_request(&body, Some(json.len())).expect("parses");
        assert_eq!(parsed.inputs[0].1.data, [7, 8]);
        assert_eq!(parsed.inputs[1].1.data, 1i32.to_le_bytes());
        assert_eq!(
            parsed.outputs,
            Some(vec![RequestedOutput {
                name: "y".into(),
                binary: true
            }])
        );
        body.push(0);
        assert!(
            parse_request(&body, Some(json.len()))
                .expect_err("extra byte")
                .0
                .contains("1 bytes of binary data follow")
        );
        assert!(parse_request(&body[..json.len() + 3], Some(json.len())).is_err());
        assert!(parse_request(&body, Some(body.len() + 1)).is_err());
        // A byte count that disagrees with the shape.
        let short = json.replace(r#""binary_data_size":4"#, r#""binary_data_size":3"#);
        let mut body = short.as_bytes().to_vec();
        body.extend_from_slice(&[7, 8, 1, 0, 0]);
        assert!(parse_request(&body, Some(short.len())).is_err());
    }

    #[test]
    fn huge_shapes_allocate_nothing_and_fail() {
        let error = request(r#"{"inputs":[{"name":"x","shape":[4294967295,4294967295],"datatype":"FP64","data":[1]}]}"#)
            .expect_err("too few elements");
        assert!(error.0.contains("the shape needs"), "{error}");
        assert!(
            request(
                r#"{"inputs":[{"name":"x","shape":[4294967296],"datatype":"FP64","data":[]}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn sequences_and_shared_memory_are_refused() {
        assert!(request(r#"{"inputs":[],"parameters":{"sequence_id":1}}"#).is_err());
        assert!(request(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"shared_memory_region":"r"}}]}"#).is_err());
        assert!(
            request(r#"{"inputs":[],"outputs":[{"name":"y","parameters":{"classification":2}}]}"#)
                .is_err()
        );
        assert!(request(r#"{"inputs":[],"outputs":[{"name":"y"},{"name":"y"}]}"#).is_err());
        assert!(request(r#"{"inputs":[],"extra":1}"#).is_err());
    }

    #[test]
    fn responses_carry_json_or_binary_outputs() {
        let tensor = Tensor {
            dims: vec![2],
            ty: ElementType::Fp32,
            data: [1.5f32.to_le_bytes(), f32::NAN.to_le_bytes()].concat(),
        };
        let json = encode_response("m", "3", Some("r1"), &[("y".into(), tensor.clone(), false)])
            .expect("encodes");
        assert_eq!(json.header_length, None);
        let value: Value = serde_json::from_slice(&json.body).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"model_name":"m","model_version":"3","id":"r1","outputs":[{"name":"y","datatype":"FP32","shape":[2],"data":[1.5,null]}]})
        );
        let binary = encode_response("m", "3", None, &[("y".into(), tensor.clone(), true)])
            .expect("encodes");
        let length = binary.header_length.expect("binary");
        assert_eq!(&binary.body[length..], &tensor.data[..]);
        let header: Value = serde_json::from_slice(&binary.body[..length]).expect("json");
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
    }

    #[test]
    fn nesting_inside_data_is_bounded() {
        let nested = |depth: usize| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"INT8","data":{}7{}}}]}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        assert_eq!(input(&nested(100)).data, [7]);
        for depth in [1000, 1_000_000] {
            assert!(request(&nested(depth)).is_err(), "{depth}");
        }
    }

    #[test]
    fn bytes_tensors_are_capped_by_element_count() {
        let count = crate::nn::MAX_BYTES_ELEMENTS + 1;
        let body = format!(
            r#"{{"inputs":[{{"name":"x","shape":[{count}],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}}]}}"#,
            count * 4
        );
        let length = body.len();
        let mut body = body.into_bytes();
        body.resize(length + count * 4, 0);
        let error = parse_request(&body, Some(length)).expect_err("too many elements");
        assert!(error.0.contains("at most"), "{error}");
    }

    fn element_json(ty: ElementType, seed: u8) -> String {
        match ty {
            ElementType::Bool => seed.is_multiple_of(2).to_string(),
            ElementType::Bytes => format!("\"s{seed}\""),
            ElementType::Fp16 | ElementType::Bf16 | ElementType::Fp32 | ElementType::Fp64 => {
                format!("{}.5", seed % 8)
            }
            ElementType::I8 | ElementType::I16 | ElementType::I32 | ElementType::I64 => {
                format!("-{}", seed % 100)
            }
            _ => (seed % 100).to_string(),
        }
    }

    proptest::proptest! {
        /// Well-formed requests of any type and shape, JSON or binary, decode to tensors
        /// whose length fits the shape; and any cut or corruption of one is refused or
        /// parsed, never a panic.
        #[test]
        fn structured_requests_decode_or_are_refused(
            ty in 0usize..ElementType::ALL.len(),
            dims in proptest::collection::vec(0u32..4, 0..4),
            seeds in proptest::collection::vec(proptest::prelude::any::<u8>(), 64),
            binary in proptest::prelude::any::<bool>(),
            nest in proptest::prelude::any::<bool>(),
            flip in proptest::option::of((0usize..4096, proptest::prelude::any::<u8>())),
        ) {
            let ty = ElementType::ALL[ty];
            let count: usize = dims.iter().map(|&d| d as usize).product();
            let elements: Vec<String> = (0..count).map(|i| element_json(ty, seeds[i % seeds.len()])).collect();
            let shape = serde_json::to_string(&dims).expect("json");
            let (mut body, header_length) = if binary {
                // The binary form of the same elements, from their JSON decoding.
                let json = format!(r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{}","data":[{}]}}]}}"#, ty.name(), elements.join(","));
                let data = input(&json).data;
                let header = format!(r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{}","parameters":{{"binary_data_size":{}}}}}]}}"#, ty.name(), data.len());
                let length = header.len();
                ([header.into_bytes(), data].concat(), Some(length))
            } else {
                let data = match (nest, dims.first()) {
                    (true, Some(&rows)) if rows > 0 && count > 0 => {
                        let per = count / rows as usize;
                        let rows: Vec<String> = elements.chunks(per).map(|c| format!("[{}]", c.join(","))).collect();
                        format!("[{}]", rows.join(","))
                    }
                    _ => format!("[{}]", elements.join(",")),
                };
                (format!(r#"{{"id":"p","inputs":[{{"name":"x","shape":{shape},"datatype":"{}","data":{data}}}],"outputs":[{{"name":"y","parameters":{{"binary_data":true}}}}]}}"#, ty.name()).into_bytes(), None)
            };
            let parsed = parse_request(&body, header_length);
            proptest::prop_assert!(parsed.is_ok(), "{:?}", parsed);
            let parsed = parsed.expect("checked");
            proptest::prop_assert_eq!(parsed.inputs[0].1.check_length(), Ok(()));
            proptest::prop_assert_eq!(parsed.inputs[0].1.element_count(), Some(count));
            if let Some((at, byte)) = flip
                && !body.is_empty()
            {
                let at = at % body.len();
                body[at] = byte;
                if let Ok(request) = parse_request(&body, header_length) {
                    for (_, tensor) in &request.inputs {
                        proptest::prop_assert_eq!(tensor.check_length(), Ok(()));
                    }
                }
            }
        }

        #[test]
        fn any_body_parses_or_is_refused(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), cut in 0usize..600) {
            let _ = parse_request(&body, Some(cut));
            let _ = parse_request(&body, None);
        }
    }
}

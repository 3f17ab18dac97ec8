//! Inference through the standard `wasi:nn` interfaces
//! (`wasi:nn@0.2.0-rc-2024-10-28`).
//!
//! A function names the models it uses in its manifest entry
//! (`models = ["magika"]`); [`Graph::load_by_name`] opens one of them and any other
//! name fails with [`ErrorCode::NotFound`]. A [`Tensor`] is plain guest memory
//! (dimensions, element type, little-endian bytes) until [`Graph::compute`] hands
//! it to the host, and the outputs come back the same way, so a round trip is:
//!
//! ```no_run
//! use lepton_sdk::nn::{Graph, Tensor};
//!
//! fn classify(bytes: &[u8]) -> Result<Vec<f32>, lepton_sdk::nn::Error> {
//!     let input: Vec<i32> = bytes.iter().map(|&b| i32::from(b)).collect();
//!     let input = Tensor::from_i32(&[1, input.len() as u32], &input)?;
//!     let graph = Graph::load_by_name("magika")?;
//!     let outputs = graph.compute(&[("bytes", &input)])?;
//!     outputs.require("target_label")?.to_f32()
//! }
//! # fn main() {}
//! ```
//!
//! Every failure is an [`Error`]: the host's `wasi:nn` error code and message, or
//! [`ErrorCode::InvalidArgument`] for a tensor whose data does not match its
//! dimensions and type, or that is read as the wrong type.

use std::fmt;

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};

/// Why a `wasi:nn` call failed: the host's error code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What kind of failure, as `wasi:nn` names it.
    pub code: ErrorCode,
    /// The host's (or this crate's) explanation.
    pub message: String,
}

impl Error {
    fn invalid_argument(message: String) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message,
        }
    }
}

impl From<errors::Error> for Error {
    fn from(error: errors::Error) -> Self {
        Self {
            code: error.code().into(),
            message: error.data(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// The `wasi:nn` error codes (`wasi:nn/errors.error-code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The caller passed an invalid argument (a malformed tensor, an unknown input name, ...).
    InvalidArgument,
    /// The model's encoding is not one the host understands.
    InvalidEncoding,
    /// The operation timed out.
    Timeout,
    /// The backend failed while running the model.
    RuntimeError,
    /// The host does not support this operation.
    UnsupportedOperation,
    /// The model (or a tensor) is too large.
    TooLarge,
    /// No model of that name is granted to this function.
    NotFound,
    /// The operation is insecure or not permitted.
    Security,
    /// Any other failure.
    Unknown,
}

impl ErrorCode {
    /// The code's WIT name, e.g. `not-found`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid-argument",
            Self::InvalidEncoding => "invalid-encoding",
            Self::Timeout => "timeout",
            Self::RuntimeError => "runtime-error",
            Self::UnsupportedOperation => "unsupported-operation",
            Self::TooLarge => "too-large",
            Self::NotFound => "not-found",
            Self::Security => "security",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<errors::ErrorCode> for ErrorCode {
    fn from(code: errors::ErrorCode) -> Self {
        use errors::ErrorCode as Wit;
        match code {
            Wit::InvalidArgument => Self::InvalidArgument,
            Wit::InvalidEncoding => Self::InvalidEncoding,
            Wit::Timeout => Self::Timeout,
            Wit::RuntimeError => Self::RuntimeError,
            Wit::UnsupportedOperation => Self::UnsupportedOperation,
            Wit::TooLarge => Self::TooLarge,
            Wit::NotFound => Self::NotFound,
            Wit::Security => Self::Security,
            Wit::Unknown => Self::Unknown,
        }
    }
}

/// The element type of a [`Tensor`] (`wasi:nn/tensor.tensor-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    /// IEEE 754 half precision (2 bytes).
    Fp16,
    /// IEEE 754 single precision, `f32` (4 bytes).
    Fp32,
    /// IEEE 754 double precision, `f64` (8 bytes).
    Fp64,
    /// bfloat16 (2 bytes).
    Bf16,
    /// `u8` (1 byte).
    U8,
    /// `i32` (4 bytes).
    I32,
    /// `i64` (8 bytes).
    I64,
}

impl TensorType {
    /// How many bytes one element takes.
    pub fn size(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::Fp16 | Self::Bf16 => 2,
            Self::Fp32 | Self::I32 => 4,
            Self::Fp64 | Self::I64 => 8,
        }
    }
}

impl From<tensor::TensorType> for TensorType {
    fn from(ty: tensor::TensorType) -> Self {
        use tensor::TensorType as Wit;
        match ty {
            Wit::Fp16 => Self::Fp16,
            Wit::Fp32 => Self::Fp32,
            Wit::Fp64 => Self::Fp64,
            Wit::Bf16 => Self::Bf16,
            Wit::U8 => Self::U8,
            Wit::I32 => Self::I32,
            Wit::I64 => Self::I64,
        }
    }
}

impl From<TensorType> for tensor::TensorType {
    fn from(ty: TensorType) -> Self {
        match ty {
            TensorType::Fp16 => Self::Fp16,
            TensorType::Fp32 => Self::Fp32,
            TensorType::Fp64 => Self::Fp64,
            TensorType::Bf16 => Self::Bf16,
            TensorType::U8 => Self::U8,
            TensorType::I32 => Self::I32,
            TensorType::I64 => Self::I64,
        }
    }
}

/// A dense, row-major tensor: dimensions, element type and the elements as
/// little-endian bytes. Its data always matches its dimensions and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

/// Writes `Tensor::from_*` and `Tensor::to_*` for one element type.
macro_rules! typed {
    ($($elem:ty, $ty:ident, $from:ident, $to:ident;)*) => {$(
        #[doc = concat!("A [`TensorType::", stringify!($ty), "`] tensor of `", stringify!($elem), "` values in row-major order.")]
        ///
        /// Fails with [`ErrorCode::InvalidArgument`] when `values` does not hold
        /// exactly as many elements as `dims` describe.
        pub fn $from(dims: &[u32], values: &[$elem]) -> Result<Self, Error> {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Self::new(dims, TensorType::$ty, data)
        }

        #[doc = concat!("The elements as `", stringify!($elem), "`, in row-major order.")]
        ///
        /// Fails with [`ErrorCode::InvalidArgument`] when the tensor holds another type.
        pub fn $to(&self) -> Result<Vec<$elem>, Error> {
            self.expect_type(TensorType::$ty)?;
            Ok(self
                .data
                .chunks_exact(std::mem::size_of::<$elem>())
                .map(|chunk| {
                    let mut bytes = [0; std::mem::size_of::<$elem>()];
                    bytes.copy_from_slice(chunk);
                    <$elem>::from_le_bytes(bytes)
                })
                .collect())
        }
    )*};
}

impl Tensor {
    /// A tensor from raw little-endian bytes, e.g. for [`TensorType::Fp16`].
    ///
    /// Fails with [`ErrorCode::InvalidArgument`] when `data` is not exactly the
    /// product of `dims` times the element size long.
    pub fn new(dims: &[u32], ty: TensorType, data: Vec<u8>) -> Result<Self, Error> {
        let expected = dims.iter().try_fold(ty.size(), |len, &dim| {
            len.checked_mul(usize::try_from(dim).ok()?)
        });
        if expected != Some(data.len()) {
            return Err(Error::invalid_argument(format!(
                "a {ty:?} tensor of dimensions {dims:?} needs {} bytes, got {}",
                expected.map_or_else(|| "more than usize::MAX".to_owned(), |n| n.to_string()),
                data.len()
            )));
        }
        Ok(Self {
            dims: dims.to_vec(),
            ty,
            data,
        })
    }

    typed! {
        f32, Fp32, from_f32, to_f32;
        f64, Fp64, from_f64, to_f64;
        u8, U8, from_u8, to_u8;
        i32, I32, from_i32, to_i32;
        i64, I64, from_i64, to_i64;
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[u32] {
        &self.dims
    }

    /// The element type.
    pub fn ty(&self) -> TensorType {
        self.ty
    }

    /// The elements as little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The elements as little-endian bytes, without a copy.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    fn expect_type(&self, ty: TensorType) -> Result<(), Error> {
        if self.ty == ty {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "the tensor holds {:?} elements, not {ty:?}",
                self.ty
            )))
        }
    }

    pub(crate) fn to_wit(&self) -> tensor::Tensor {
        tensor::Tensor::new(&self.dims, self.ty.into(), &self.data)
    }

    /// Named inputs as `wasi:nn` named tensors, for [`ExecutionContext::compute`]
    /// and [`crate::train`].
    pub(crate) fn named_to_wit(inputs: &[(&str, &Tensor)]) -> Vec<(String, tensor::Tensor)> {
        inputs
            .iter()
            .map(|(name, tensor)| ((*name).to_owned(), tensor.to_wit()))
            .collect()
    }

    fn from_wit(tensor: &tensor::Tensor) -> Result<Self, Error> {
        Self::new(&tensor.dimensions(), tensor.ty().into(), tensor.data())
    }
}

/// A model the host has loaded (`wasi:nn/graph.graph`).
#[derive(Debug)]
pub struct Graph(graph::Graph);

impl Graph {
    /// Opens the model that the function's manifest grants under `name`.
    ///
    /// Fails with [`ErrorCode::NotFound`] for a model that is not granted.
    pub fn load_by_name(name: &str) -> Result<Self, Error> {
        Ok(Self(graph::load_by_name(name)?))
    }

    /// Loads an ONNX model from its bytes, to run on the CPU (`gpu`: false) or a GPU
    /// where the host has one.
    ///
    /// Lepton allows this only for functions whose manifest sets
    /// `allow_model_upload = true` ([`ErrorCode::Security`] otherwise), up to
    /// `max_model_upload_size` ([`ErrorCode::TooLarge`]).
    pub fn load_onnx(model: &[u8], gpu: bool) -> Result<Self, Error> {
        let target = if gpu {
            graph::ExecutionTarget::Gpu
        } else {
            graph::ExecutionTarget::Cpu
        };
        Ok(Self(graph::load(
            &[model.to_vec()],
            graph::GraphEncoding::Onnx,
            target,
        )?))
    }

    /// A fresh execution context, for running the model more than once.
    pub fn init_execution_context(&self) -> Result<ExecutionContext, Error> {
        Ok(ExecutionContext(self.0.init_execution_context()?))
    }

    /// Runs the model once on named inputs, in a fresh execution context.
    pub fn compute(&self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        self.init_execution_context()?.compute(inputs)
    }
}

/// One inference session on a [`Graph`] (`wasi:nn/inference.graph-execution-context`).
#[derive(Debug)]
pub struct ExecutionContext(inference::GraphExecutionContext);

impl ExecutionContext {
    /// Runs the model on named inputs and returns its named outputs.
    pub fn compute(&self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        let outputs = self
            .0
            .compute(Tensor::named_to_wit(inputs))?
            .iter()
            .map(|(name, tensor)| Ok((name.clone(), Tensor::from_wit(tensor)?)))
            .collect::<Result<_, Error>>()?;
        Ok(Outputs(outputs))
    }
}

/// The named output tensors of one [`Graph::compute`], in the host's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs(Vec<(String, Tensor)>);

impl Outputs {
    /// The output called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, tensor)| tensor)
    }

    /// The output called `name`, or an [`ErrorCode::InvalidArgument`] error that
    /// lists the outputs there are.
    pub fn require(&self, name: &str) -> Result<&Tensor, Error> {
        self.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
            Error::invalid_argument(format!(
                "no output named {name:?}; the outputs are {names:?}"
            ))
        })
    }

    /// The outputs' names and tensors.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(name, tensor)| (name.as_str(), tensor))
    }

    /// How many outputs there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no outputs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl IntoIterator for Outputs {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_round_trips() -> Result<(), Error> {
        let t = Tensor::from_f32(&[2, 2], &[1.0, -2.5, 3.25, f32::MAX])?;
        assert_eq!(
            (t.dims(), t.ty(), t.data().len()),
            (&[2, 2][..], TensorType::Fp32, 16)
        );
        assert_eq!(t.to_f32()?, [1.0, -2.5, 3.25, f32::MAX]);
        assert_eq!(
            Tensor::from_i32(&[3], &[-1, 0, 256])?.to_i32()?,
            [-1, 0, 256]
        );
        assert_eq!(
            Tensor::from_i64(&[1, 2], &[i64::MIN, 7])?.to_i64()?,
            [i64::MIN, 7]
        );
        assert_eq!(Tensor::from_u8(&[2], &[0, 255])?.to_u8()?, [0, 255]);
        assert_eq!(Tensor::from_f64(&[1], &[0.1])?.to_f64()?, [0.1]);
        Ok(())
    }

    #[test]
    fn data_is_little_endian() -> Result<(), Error> {
        assert_eq!(Tensor::from_i32(&[1], &[256])?.data(), [0, 1, 0, 0]);
        Ok(())
    }

    #[test]
    fn scalar_and_empty_shapes() -> Result<(), Error> {
        assert_eq!(Tensor::from_f32(&[], &[4.0])?.to_f32()?, [4.0]);
        assert!(Tensor::from_f32(&[0, 3], &[])?.to_f32()?.is_empty());
        Ok(())
    }

    #[test]
    fn data_must_match_dims() {
        let error = Tensor::from_f32(&[2, 3], &[1.0; 5]).err();
        assert_eq!(
            error.map(|e| e.to_string()),
            Some(
                "invalid-argument: a Fp32 tensor of dimensions [2, 3] needs 24 bytes, got 20"
                    .to_owned()
            )
        );
        let huge = Tensor::new(&[u32::MAX, u32::MAX, u32::MAX], TensorType::I64, Vec::new());
        assert_eq!(huge.map_err(|e| e.code), Err(ErrorCode::InvalidArgument));
    }

    #[test]
    fn reading_the_wrong_type_fails() -> Result<(), Error> {
        let error = Tensor::from_i32(&[1], &[1])?.to_f32().err();
        assert_eq!(
            error.map(|e| e.to_string()),
            Some("invalid-argument: the tensor holds I32 elements, not Fp32".to_owned())
        );
        Ok(())
    }

    #[test]
    fn outputs_by_name() -> Result<(), Error> {
        let outputs = Outputs(vec![("a".to_owned(), Tensor::from_u8(&[1], &[1])?)]);
        assert_eq!(
            outputs.get("a").map(Tensor::to_u8).transpose()?,
            Some(vec![1])
        );
        assert!(outputs.get("b").is_none());
        assert_eq!(
            outputs.require("b").err().map(|e| e.message),
            Some(r#"no output named "b"; the outputs are ["a"]"#.to_owned())
        );
        assert_eq!(outputs.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["a"]);
        Ok(())
    }
}

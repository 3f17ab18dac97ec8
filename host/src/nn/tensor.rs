//! Tensors as the host holds them: dimensions, element type, little-endian bytes.

use crate::bindings::wasi::nn::tensor::TensorType;

/// A tensor owned by the host (a `wasi:nn` tensor resource, or a model output).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub dims: Vec<u32>,
    /// Element type.
    pub ty: TensorType,
    /// Row-major little-endian elements.
    pub data: Vec<u8>,
}

/// Bytes of one element of `ty`.
pub fn element_size(ty: TensorType) -> usize {
    match ty {
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
        TensorType::U8 => 1,
    }
}

impl Tensor {
    /// Elements, or `None` when the product overflows.
    pub fn element_count(&self) -> Option<usize> {
        self.dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
    }

    /// Checks that the data holds exactly `product(dims)` elements of `ty`.
    pub fn check_length(&self) -> Result<(), String> {
        let expected = self
            .element_count()
            .and_then(|n| n.checked_mul(element_size(self.ty)))
            .ok_or_else(|| format!("dimensions {:?} are too large", self.dims))?;
        if expected == self.data.len() {
            Ok(())
        } else {
            Err(format!(
                "tensor of dimensions {:?} and type {:?} needs {expected} bytes, got {}",
                self.dims,
                self.ty,
                self.data.len()
            ))
        }
    }
}

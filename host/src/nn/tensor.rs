//! Tensors as the host holds them: dimensions, element type, little-endian bytes.

use crate::bindings::wasi::nn::tensor::TensorType;

/// The element type of a tensor: every one ONNX Runtime takes that the host carries.
///
/// `wasi:nn` guests reach the types that [`ElementType::wasi`] maps; the Open Inference
/// Protocol reaches them all. Names ([`ElementType::name`]) are the protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElementType {
    /// `BOOL`: one byte, 0 or 1.
    Bool,
    /// `UINT8`.
    U8,
    /// `UINT16`.
    U16,
    /// `UINT32`.
    U32,
    /// `UINT64`.
    U64,
    /// `INT8`.
    I8,
    /// `INT16`.
    I16,
    /// `INT32`.
    I32,
    /// `INT64`.
    I64,
    /// `FP16`: IEEE half precision.
    Fp16,
    /// `BF16`: bfloat16.
    Bf16,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BYTES`: ONNX string tensors. Each element is a 4-byte little-endian length and
    /// that many bytes (the layout of the protocol's binary extension).
    Bytes,
}

impl ElementType {
    /// Every element type.
    pub const ALL: [Self; 14] = [
        Self::Bool,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::Fp16,
        Self::Bf16,
        Self::Fp32,
        Self::Fp64,
        Self::Bytes,
    ];

    /// Bytes of one element; `None` for [`ElementType::Bytes`], whose elements vary.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::Fp16 | Self::Bf16 => 2,
            Self::U32 | Self::I32 | Self::Fp32 => 4,
            Self::U64 | Self::I64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }

    /// The `wasi:nn` tensor type, for the types `wasi:nn` has.
    pub fn wasi(self) -> Option<TensorType> {
        Some(match self {
            Self::U8 => TensorType::U8,
            Self::I32 => TensorType::I32,
            Self::I64 => TensorType::I64,
            Self::Fp16 => TensorType::Fp16,
            Self::Bf16 => TensorType::Bf16,
            Self::Fp32 => TensorType::Fp32,
            Self::Fp64 => TensorType::Fp64,
            _ => return None,
        })
    }

    /// The Open Inference Protocol's name (`"FP32"`, `"INT64"`, `"BYTES"`...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::Fp16 => "FP16",
            Self::Bf16 => "BF16",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// The type named `name` (as [`ElementType::name`] writes it), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| ty.name() == name)
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<TensorType> for ElementType {
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

/// A tensor owned by the host (a `wasi:nn` tensor resource, or a model output).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub dims: Vec<u32>,
    /// Element type.
    pub ty: ElementType,
    /// Row-major little-endian elements (for `BYTES`: length-prefixed, see
    /// [`ElementType::Bytes`]).
    pub data: Vec<u8>,
}

/// The elements of a `BYTES` tensor's data, in order, or what is wrong with it.
pub fn byte_elements(data: &[u8]) -> ByteElements<'_> {
    ByteElements {
        rest: data,
        index: 0,
    }
}

/// How many elements a `BYTES` tensor's data holds, or what is wrong with it (nothing
/// is collected).
pub fn byte_element_count(data: &[u8]) -> Result<usize, String> {
    byte_elements(data).try_fold(0, |n, element| element.map(|_| n + 1))
}

/// Elements of a `BYTES` tensor at most: each becomes a string of its own in ONNX
/// Runtime, so 64 MiB of empty elements would be 16 million allocations.
pub const MAX_BYTES_ELEMENTS: usize = 1 << 20;

/// The elements of a `BYTES` tensor's data, one at a time; an `Err` ends it.
#[derive(Debug, Clone)]
pub struct ByteElements<'a> {
    rest: &'a [u8],
    index: usize,
}

impl<'a> Iterator for ByteElements<'a> {
    type Item = Result<&'a [u8], String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let index = self.index;
        let Some((length, tail)) = self.rest.split_first_chunk::<4>() else {
            self.rest = &[];
            return Some(Err(format!(
                "BYTES element {index} has a truncated 4-byte length"
            )));
        };
        let length = u32::from_le_bytes(*length) as usize;
        if tail.len() < length {
            self.rest = &[];
            return Some(Err(format!(
                "BYTES element {index} is {length} bytes long, but only {} bytes follow",
                tail.len()
            )));
        }
        let (element, tail) = tail.split_at(length);
        self.rest = tail;
        self.index += 1;
        Some(Ok(element))
    }
}

impl Tensor {
    /// Elements, or `None` when the product overflows.
    pub fn element_count(&self) -> Option<usize> {
        self.dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
    }

    /// Checks that the data holds exactly `product(dims)` elements of `ty` (and, for
    /// `BOOL`, that each is 0 or 1).
    pub fn check_length(&self) -> Result<(), String> {
        let count = self
            .element_count()
            .ok_or_else(|| format!("dimensions {:?} are too large", self.dims))?;
        let Some(size) = self.ty.size() else {
            if count > MAX_BYTES_ELEMENTS {
                return Err(format!(
                    "a BYTES tensor has at most {MAX_BYTES_ELEMENTS} elements, dimensions {:?} make {count}",
                    self.dims
                ));
            }
            let found = byte_element_count(&self.data)?;
            return if found == count {
                Ok(())
            } else {
                Err(format!(
                    "tensor of dimensions {:?} and type BYTES needs {count} elements, got {found}",
                    self.dims
                ))
            };
        };
        let expected = count
            .checked_mul(size)
            .ok_or_else(|| format!("dimensions {:?} are too large", self.dims))?;
        if expected != self.data.len() {
            return Err(format!(
                "tensor of dimensions {:?} and type {} needs {expected} bytes, got {}",
                self.dims,
                self.ty,
                self.data.len()
            ));
        }
        if self.ty == ElementType::Bool && self.data.iter().any(|&b| b > 1) {
            return Err("BOOL elements are 0 or 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_wasi_types_map_back() {
        for ty in ElementType::ALL {
            assert_eq!(ElementType::from_name(ty.name()), Some(ty));
            if let Some(wasi) = ty.wasi() {
                assert_eq!(ElementType::from(wasi), ty);
            }
        }
        assert_eq!(ElementType::from_name("fp32"), None);
    }

    #[test]
    fn bytes_tensors_are_counted_by_element() {
        let mut data = Vec::new();
        for element in [&b"ab"[..], b"", b"xyz"] {
            data.extend_from_slice(&(element.len() as u32).to_le_bytes());
            data.extend_from_slice(element);
        }
        let tensor = Tensor {
            dims: vec![3],
            ty: ElementType::Bytes,
            data: data.clone(),
        };
        assert_eq!(tensor.check_length(), Ok(()));
        assert_eq!(
            byte_elements(&data)
                .collect::<Result<Vec<_>, _>>()
                .unwrap_or_default(),
            vec![&b"ab"[..], b"", b"xyz"]
        );
        let short = Tensor {
            data: data[..data.len() - 1].to_vec(),
            ..tensor.clone()
        };
        assert!(short.check_length().is_err());
        let two = Tensor {
            dims: vec![2],
            ..tensor
        };
        assert!(
            two.check_length()
                .expect_err("three elements for two")
                .contains("needs 2 elements, got 3")
        );
    }

    #[test]
    fn bool_elements_are_zero_or_one() {
        let tensor = |data: Vec<u8>| Tensor {
            dims: vec![2],
            ty: ElementType::Bool,
            data,
        };
        assert_eq!(tensor(vec![0, 1]).check_length(), Ok(()));
        assert!(tensor(vec![0, 2]).check_length().is_err());
    }
}
